"""The session cluster fixture's claim, checked: hack/cluster.py's ``down`` (what ``tests/integration/conftest.py``'s
``cluster`` fixture and ``make cluster-down`` call) stops the whole local control plane, leaving no stray process
(not even a zombie of this test process, which is the components' parent) and no listening port.

A second control plane of its own is started here, in its own state directory and on ports the kernel hands out
while the session cluster's are taken, so the cluster the other integration tests use is not touched. Before
``down`` the test records every process in the components' sessions (each is started with ``start_new_session``:
a child of a component would be in its session) with its start time (a reused pid is not ours), and every TCP port
those processes listen on (socket inodes of ``/proc/<pid>/fd`` matched with ``/proc/net/tcp``/``tcp6``), and
checks that these records are complete (every component's process, every port in the cluster's state, none of them
bindable), so that the checks after ``down`` cannot pass for want of anything to check.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import _load_cluster_module

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
TCP_LISTEN = "0A"


@dataclass(frozen=True)
class Proc:
    pid: int
    start: int  # clock ticks after boot (/proc/<pid>/stat field 22): tells this process from a later one on its pid
    name: str
    session: int


def read_proc(pid: int) -> tuple[Proc, str] | None:
    """The process and its state letter (R, S, Z, ...), None when there is no such pid."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = raw[raw.index("(") + 1:raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2:].split()  # fields[0] is field 3 (state)
    return Proc(pid=pid, start=int(fields[19]), name=name, session=int(fields[3])), fields[0]


def processes_in_sessions(sessions: set[int]) -> list[Proc]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            found = read_proc(int(entry.name))
            if found and found[0].session in sessions:
                out.append(found[0])
    return sorted(out, key=lambda p: p.pid)


def still_there(proc: Proc) -> str | None:
    """The state letter of the very process recorded (same pid and start time), zombie included; None when gone."""
    found = read_proc(proc.pid)
    return found[1] if found and found[0].start == proc.start else None


def listening_ports() -> dict[int, int]:
    """Socket inode -> port of every TCP socket in LISTEN (IPv4 and IPv6) in this network namespace."""
    out: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == TCP_LISTEN:
                out[int(cols[9])] = int(cols[1].rsplit(":", 1)[1], 16)
    return out


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def holders(port: int) -> list[str]:
    """Who holds a LISTEN socket on `port` now (for the failure message)."""
    inodes = {inode for inode, p in listening_ports().items() if p == port}
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and socket_inodes(int(entry.name)) & inodes:
            found = read_proc(int(entry.name))
            out.append(f"pid {entry.name} ({found[0].name if found else '?'})")
    return out or ["no process found (a socket in LISTEN without an owner)"]


def bindable(port: int) -> bool:
    """Whether a new listener can take 127.0.0.1:port (SO_REUSEADDR: TIME_WAIT leftovers do not count, a listener
    on the port, on this address or a wildcard, does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
        except OSError:
            return False
    return True


def reap(proc: Proc, timeout: float = 5.0) -> bool:
    """Collects the exit status of a zombie child of this process; False when it is not reaped within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(proc.pid, os.WNOHANG)[0] == proc.pid:
                return True
        except ChildProcessError:
            return still_there(proc) is None  # reaped meanwhile (subprocess reaps dropped Popen objects)
        time.sleep(0.02)
    return False


def kill_leftovers(procs: list[Proc]) -> None:
    """Only for a failed check: stops what this test started and `down` left, so a failure leaks nothing."""
    for proc in procs:
        if still_there(proc) not in (None, "Z"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
    for proc in procs:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(proc.pid, 0)


def test_down_leaves_no_process_and_no_listening_port() -> None:
    mod = _load_cluster_module()
    state_dir = Path(tempfile.mkdtemp(prefix="shipyard-teardown-cluster-"))
    started = time.monotonic()
    state = mod.up(state_dir)
    up_s = time.monotonic() - started
    try:
        assert sorted(state.pids) == sorted(COMPONENTS), state.pids
        # `up` returns once the API serves and the fake nodes are Ready; a component's own port may open a moment
        # later. The record must be complete: every port of the cluster's state among those its processes listen on.
        deadline = time.monotonic() + 30
        while True:
            procs = processes_in_sessions(set(state.pids.values()))
            listening = listening_ports()
            ports = {listening[inode] for p in procs for inode in socket_inodes(p.pid) if inode in listening}
            if set(state.ports.values()) <= ports or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert {p.pid for p in procs} >= set(state.pids.values()), (procs, state.pids)
        assert set(state.ports.values()) <= ports, (state.ports, sorted(ports))
        # None of them can be taken while the cluster runs: `bindable` below is a real check.
        assert not [port for port in ports if bindable(port)], sorted(ports)
    except BaseException:
        mod.down(state_dir)
        raise

    mark = time.monotonic()
    mod.down(state_dir)
    down_s = time.monotonic() - mark
    after = [(p, st) for p in procs if (st := still_there(p))]
    running = [(p, st) for p, st in after if st != "Z"]
    # A zombie: exited, its exit status not collected by this process (the components' parent). `down` reaps its
    # children (a multi-threaded Go leader only once its other threads are gone), so none may be left.
    zombies = [p for p, st in after if st == "Z"]
    unreaped = [p for p in zombies if not reap(p)] if not running else zombies
    listening = listening_ports()
    still_listening = sorted({port for port in listening.values() if port in ports})
    not_bindable = [port for port in sorted(ports) if not bindable(port)]
    if running or unreaped:
        kill_leftovers(procs)
    print(f"\nup {up_s:.1f} s, down {down_s:.1f} s: {len(procs)} processes "
          f"({', '.join(sorted({p.name for p in procs}))}), {len(ports)} listening ports {sorted(ports)}; "
          f"zombies left for the parent to reap: {', '.join(p.name for p in zombies) or 'none'}")

    assert not running, "processes still running after down: " + ", ".join(
        f"{p.name} pid {p.pid} [state {st}]" for p, st in running)
    assert not zombies, f"zombies left after down: {zombies}"
    assert not unreaped, f"zombies this process could not reap: {unreaped}"
    assert not still_listening, {port: holders(port) for port in still_listening}
    assert not not_bindable, {port: holders(port) for port in not_bindable}
    assert not state_dir.exists(), f"down left the state directory {state_dir}"
