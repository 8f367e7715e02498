"""One process lifecycle for the local stack's components (process I/O, except the pure `parse_state` and
`assess_alive`): start a command in its own session with its output appended to a log, tell whether a process is
still alive (zombies counted right), and stop its process group (SIGTERM, SIGKILL after a grace period, reaped).

Used by hack/cluster.py (the control plane), hack/prometheus.py, hack/node_agent.py (its pods, with the asyncio
variants `spawn_async`/`stop_async`: an asyncio child is reaped by its event loop, never by `alive`) and the test
fixtures that start the node agent and the operator.

Alive, counting zombies: a process is alive while it has a /proc entry that is not a zombie, and a zombie that is
this process' own child is alive too until `waitpid` collects it. A multi-threaded (Go) process' leader is a zombie
that cannot be reaped while its other threads still exit, so "zombie = dead" would let `stop` return with a process
left behind (commit 2963912); another process' zombie is its parent's to reap, and dead for us.

Loading: hack/ is a folder of scripts, not a package. Run as ``python3 hack/<name>.py`` a script has hack/ on
``sys.path`` already; loaded by path (tests/modules.py ``load_file``, the demo) it does not, so each user puts its
own folder on ``sys.path`` before ``import proc`` (the lines after the imports of hack/cluster.py). Standard
library only: cluster.py and prometheus.py run before any virtualenv exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

KILL_WAIT_S = 30.0  # after SIGKILL: only a process stuck in the kernel (state D) takes longer


class Waited(enum.Enum):
    """What a non-blocking ``waitpid`` said about a pid."""

    NOT_CHILD = "not our child"  # ECHILD: someone else's process (or already reaped)
    RUNNING = "not reapable yet"  # our child, no state change to collect (a Go leader zombie included)
    REAPED = "reaped"  # our child's exit status collected just now: the pid is gone


def parse_state(stat: str) -> str:
    """The state letter (R, S, D, Z, ...) of a /proc/<pid>/stat line; the command name between the parentheses
    may itself hold spaces and parentheses, so the state is the first field after the last ')' (pure)."""
    return stat.rsplit(")", 1)[1].split()[0]


def assess_alive(state: str | None, waited: Waited) -> bool:
    """Whether a process counts as alive (pure). `state`: its /proc state letter, None when it has no /proc entry;
    `waited`: what ``waitpid(pid, WNOHANG)`` said just before."""
    if waited is Waited.REAPED or state is None or state in ("X", "x"):
        return False
    if state == "Z":
        return waited is Waited.RUNNING  # our child: alive until reaped; anyone else's: its parent's business
    return True


def read_state(pid: int) -> str | None:
    try:
        return parse_state(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, IndexError):
        return None


def try_reap(pid: int) -> Waited:
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return Waited.NOT_CHILD
    return Waited.REAPED if reaped == pid else Waited.RUNNING


def alive(pid: int) -> bool:
    """Whether `pid` still runs; reaps it when it is an exited child of this process (not for asyncio children:
    their event loop reaps them, see `stop_async`)."""
    waited = try_reap(pid)
    return assess_alive(read_state(pid), waited)


def signal_group(pid: int, signum: int) -> None:
    """Sends `signum` to the process group `pid` leads (every process is spawned as a session leader); a group that
    is gone is fine."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signum)


@contextlib.contextmanager
def _open_log(log: Path, header: str | None) -> Iterator[BinaryIO]:
    """The log a child appends to (the child gets its own descriptor; this one is closed once it started)."""
    with open(log, "ab") as out:
        if header:
            out.write(header.encode())
            out.flush()
        yield out


def spawn(argv: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None, cwd: Path | str | None = None,
          header: str | None = None) -> subprocess.Popen[bytes]:
    """Starts `argv` as the leader of a new session (its process group is what `stop` signals), stdin from
    /dev/null, stdout and stderr appended to `log` (after `header`, when given)."""
    with _open_log(log, header) as out:
        return subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=None if env is None else dict(env), cwd=cwd)


async def spawn_async(argv: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None,
                      header: str | None = None) -> asyncio.subprocess.Process:
    """`spawn` for an asyncio program: its event loop reaps the child (``await process.wait()``)."""
    with _open_log(log, header) as out:
        return await asyncio.create_subprocess_exec(*argv, stdout=out, stderr=subprocess.STDOUT,
                                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                                    env=None if env is None else dict(env))


def _wait_gone(pid: int, popen: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(max(0.0, min(0.1, deadline - time.monotonic())))
                return True
        elif not alive(pid):
            return True
        else:
            time.sleep(0.05)
        if time.monotonic() >= deadline:
            return False


def stop(target: int | subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """Stops the process group that `target` (a pid, or the Popen that `spawn` returned) leads: SIGTERM, SIGKILL
    after `timeout` s, and returns once the leader is gone (reaped when it is this process' child); then anything
    left in its group is killed too. A process already gone is not signalled. Returns the exit code when `target`
    is a Popen (negative: killed by that signal), else None. Raises RuntimeError when the leader outlives SIGKILL
    by KILL_WAIT_S."""
    popen = target if isinstance(target, subprocess.Popen) else None
    pid = target.pid if isinstance(target, subprocess.Popen) else target
    # Only a group seen running is signalled: a pid recorded long ago may lead someone else's session by now.
    running = (popen.poll() is None) if popen is not None else alive(pid)
    if running:
        signal_group(pid, signal.SIGTERM)
        if not _wait_gone(pid, popen, timeout):
            signal_group(pid, signal.SIGKILL)
            if not _wait_gone(pid, popen, KILL_WAIT_S):
                raise RuntimeError(f"pid {pid} did not exit {KILL_WAIT_S:.0f} s after SIGKILL (state "
                                   f"{read_state(pid)})")
        signal_group(pid, signal.SIGKILL)  # whatever the leader left behind in its group goes with it
    return popen.returncode if popen is not None else None


async def stop_async(process: asyncio.subprocess.Process, grace: float) -> bool:
    """`stop` for a child started by `spawn_async`: SIGTERM to its group, SIGKILL after `grace` s, awaited until the
    event loop has reaped it, then the rest of its group killed. Returns whether SIGKILL was needed."""
    if process.returncode is not None:
        return False
    signal_group(process.pid, signal.SIGTERM)
    killed = False
    try:
        await asyncio.wait_for(process.wait(), max(0.0, grace))
    except TimeoutError:
        killed = True
        signal_group(process.pid, signal.SIGKILL)
        await process.wait()
    signal_group(process.pid, signal.SIGKILL)
    return killed
