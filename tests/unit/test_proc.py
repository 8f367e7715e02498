"""hack/proc.py, the one process lifecycle of the local stack (control plane, Prometheus, node agent, fixtures):
the pure decision "alive?" from a /proc state and what waitpid said, then the I/O on real short-lived processes,
among them a zombie leader that cannot be reaped while its other thread still runs (a Go process' exit)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.modules import load_file

PROC = load_file("shipyard_hack_proc", Path(__file__).parents[2] / "hack" / "proc.py")
W = PROC.Waited


@pytest.mark.parametrize(("stat", "state"), [
    pytest.param("1234 (etcd) S 1 1234 1234 0 -1", "S", id="plain"),
    pytest.param("99 (kube-apiserver) Z 1 99 99 0 -1", "Z", id="zombie"),
    pytest.param("7 (a) b (c)) R 1 7 7 0 -1", "R", id="parentheses-and-spaces-in-the-name"),
])
def test_parse_state(stat: str, state: str) -> None:
    assert PROC.parse_state(stat) == state


@pytest.mark.parametrize(("state", "waited", "alive"), [
    pytest.param("S", W.NOT_CHILD, True, id="someone-elses-running"),
    pytest.param("R", W.RUNNING, True, id="own-child-running"),
    pytest.param("D", W.NOT_CHILD, True, id="uninterruptible"),
    pytest.param("T", W.RUNNING, True, id="stopped-is-not-dead"),
    pytest.param(None, W.NOT_CHILD, False, id="no-such-pid"),
    pytest.param(None, W.REAPED, False, id="reaped-just-now"),
    pytest.param("Z", W.REAPED, False, id="own-zombie-reaped"),
    pytest.param("Z", W.RUNNING, True, id="own-zombie-not-reapable-yet-go-leader"),
    pytest.param("Z", W.NOT_CHILD, False, id="someone-elses-zombie"),
    pytest.param("X", W.NOT_CHILD, False, id="dead"),
])
def test_assess_alive(state: str | None, waited: object, alive: bool) -> None:
    assert PROC.assess_alive(state, waited) is alive


# ------------------------------------------------------------------------------------------------- real processes

ZOMBIE_LEADER = ("import ctypes, threading, time; threading.Thread(target=time.sleep, args=(1.0,)).start(); "
                 "ctypes.CDLL(None).pthread_exit(None)")


def wait_state(pid: int, wanted: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while PROC.read_state(pid) != wanted:
        assert time.monotonic() < deadline, f"pid {pid} never reached state {wanted}"
        time.sleep(0.01)


def test_own_zombie_leader_counts_alive_until_reaped() -> None:
    child = subprocess.Popen([sys.executable, "-c", ZOMBIE_LEADER])
    wait_state(child.pid, "Z")  # its main thread is gone, the other one still sleeps: not reapable yet
    assert PROC.alive(child.pid)
    PROC.stop(child.pid, timeout=10)
    assert PROC.read_state(child.pid) is None  # stop returned only once it was reaped
    assert PROC.try_reap(child.pid) is W.NOT_CHILD


def test_stop_kills_after_the_grace_period_and_returns_the_exit_code(tmp_path: Path) -> None:
    log = tmp_path / "ignores-term.log"
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); " \
             "time.sleep(60)"
    child = PROC.spawn([sys.executable, "-c", script], log, header="--- started\n")
    deadline = time.monotonic() + 10
    while "up" not in log.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    started = time.monotonic()
    assert PROC.stop(child, timeout=0.5) == -signal.SIGKILL
    assert 0.4 < time.monotonic() - started < 10
    assert log.read_text().startswith("--- started\nup")
    assert not PROC.alive(child.pid)


def test_stop_takes_the_whole_process_group(tmp_path: Path) -> None:
    """A grandchild in the leader's group that ignores SIGTERM and outlives the leader is killed too."""
    # Each process sets its own SIGTERM disposition before the file says it is ready (no window for the signal).
    script = "trap 'exit 0' TERM; (trap '' TERM; echo $BASHPID > g.tmp && mv g.tmp grandchild; exec sleep 60) & wait"
    child = PROC.spawn(["bash", "-c", script], tmp_path / "log", cwd=tmp_path)
    deadline = time.monotonic() + 10
    while not (tmp_path / "grandchild").exists() or not (tmp_path / "grandchild").read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    grandchild = int((tmp_path / "grandchild").read_text())
    try:
        assert PROC.stop(child, timeout=5) == 0
        deadline = time.monotonic() + 5
        while PROC.read_state(grandchild) not in (None, "Z"):
            assert time.monotonic() < deadline, "the grandchild survived"
            time.sleep(0.02)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild, signal.SIGKILL)  # only when the check failed: leave nothing behind


def test_stop_of_a_gone_process_signals_nothing() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    assert PROC.stop(child.pid) is None
    assert PROC.stop(child) == 0
