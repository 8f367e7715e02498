"""CPU limits for the node agent's containers on cgroup v1 or v2, whichever this machine really has: pure planning
(`plan_hierarchies`, `plan_agent_cgroup`, `plan_cpu_limit`) and the file I/O that applies a plan (`fetch_*`,
`apply_steps`, `setup`, `remove`).

A container with ``resources.limits.cpu`` gets a cgroup of its own with a CFS bandwidth quota (period 100 ms),
joins it before it execs its command, and has it bind-mounted, read-only, where the runtime reads its own limit
(``shipyard.runtime.engine.fetch_cpu_limit``: ``/sys/fs/cgroup/cpu.max``, else ``cpu/cpu.cfs_quota_us``):

- v1: the agent's cgroup ``<cpu hierarchy>/shipyard-<node>-<pid>``; a container's (500m) writes
  ``cpu.cfs_period_us`` 100000 and ``cpu.cfs_quota_us`` 50000; the pod sees it at ``/sys/fs/cgroup/cpu``;
- v2: the agent's cgroup ``<cgroup2 mount>/shipyard-<node>-<pid>``, with ``+cpu`` written to the
  ``cgroup.subtree_control`` of the mount's root and of that cgroup; a container's writes ``cpu.max``
  ``50000 100000``; the pod sees it at ``/sys/fs/cgroup``.

Which version: the mounts (``/proc/self/mounts``) and the cgroup2 root's ``cgroup.controllers``. v2 when its cpu
controller is available there (a unified machine; on a hybrid one, like a v1 host with a cgroup2 mount at
``/sys/fs/cgroup/unified``, the cpu controller is bound to v1 and the cgroup2 root does not list it), else the v1
hierarchy that holds the cpu controller. `setup` tries them in that order and proves each by creating the agent's
cgroup and a probe container cgroup with a limit; the first that works is used. When none works the agent says so
(and, with ``--require-cpu-limits``, as the test fixtures run it, refuses to start). The ``+cpu`` written to the
cgroup2 root stays: other cgroups may rely on it.

Standard library only; loaded by hack/node_agent.py as a sibling (see hack/proc.py on how hack/ modules import).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PERIOD_US = 100_000
MIN_QUOTA_US = 1000  # the kernel refuses a smaller quota (v1 and v2)
POD_MOUNT = {1: "/sys/fs/cgroup/cpu", 2: "/sys/fs/cgroup"}  # where fetch_cpu_limit looks, per version
PROBE = "probe"


@dataclass(frozen=True)
class Hierarchy:
    version: int  # 1 or 2
    mount: Path  # where it is mounted on this machine

    def describe(self) -> str:
        return f"cgroup v{self.version} at {self.mount}"


@dataclass(frozen=True)
class Step:
    """Create a directory (`value` None) or write `value` to a file; `path` relative to the hierarchy's mount."""

    path: str
    value: str | None = None


@dataclass(frozen=True)
class CpuLimitPlan:
    cgroup: str  # the container's cgroup, relative to the hierarchy's mount
    steps: tuple[Step, ...]
    pod_mount: str  # where the container sees its own cgroup


def parse_cpu(quantity: str) -> float:
    """CPUs of a Kubernetes CPU quantity: ``500m`` -> 0.5, ``2`` -> 2.0 (pure)."""
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def plan_hierarchies(mounts: str, controllers: Mapping[str, str]) -> list[Hierarchy]:
    """The hierarchies that can hold a CPU quota, best first (pure). `mounts`: /proc/self/mounts; `controllers`:
    the ``cgroup.controllers`` text of each cgroup2 mount point (a missing one counts as empty)."""
    v2: list[Hierarchy] = []
    v1: list[Hierarchy] = []
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        mount, fstype, options = Path(_unescape(fields[1])), fields[2], fields[3].split(",")
        if fstype == "cgroup2" and "cpu" in controllers.get(str(mount), "").split():
            v2.append(Hierarchy(2, mount))
        elif fstype == "cgroup" and "cpu" in options:
            v1.append(Hierarchy(1, mount))
    return [*dict.fromkeys(v2), *dict.fromkeys(v1)]


def plan_agent_cgroup(version: int, name: str) -> tuple[Step, ...]:
    """The agent's own cgroup under the hierarchy's root (pure). On v2 a controller reaches a cgroup's children only
    through its parent's ``cgroup.subtree_control``: the root's for the agent's cgroup, the agent's for each
    container's (which is why the agent's cgroup holds no process itself: v2's no-internal-process rule)."""
    if version == 2:
        return (Step("cgroup.subtree_control", "+cpu"), Step(name), Step(f"{name}/cgroup.subtree_control", "+cpu"))
    if version == 1:
        return (Step(name),)
    raise ValueError(f"unknown cgroup version {version}")


def plan_cpu_limit(version: int, parent: str, name: str, cpu: str) -> CpuLimitPlan:
    """A container's cgroup `parent`/`name` with the CFS quota of the CPU quantity `cpu` (pure)."""
    quota = max(MIN_QUOTA_US, round(parse_cpu(cpu) * PERIOD_US))
    cgroup = f"{parent}/{name}"
    if version == 2:
        writes = (Step(f"{cgroup}/cpu.max", f"{quota} {PERIOD_US}"),)
    elif version == 1:
        writes = (Step(f"{cgroup}/cpu.cfs_period_us", str(PERIOD_US)), Step(f"{cgroup}/cpu.cfs_quota_us", str(quota)))
    else:
        raise ValueError(f"unknown cgroup version {version}")
    return CpuLimitPlan(cgroup, (Step(cgroup), *writes), POD_MOUNT[version])


# ------------------------------------------------------------------------------------------------------------- I/O


def fetch_hierarchies(mounts_file: Path = Path("/proc/self/mounts")) -> list[Hierarchy]:
    mounts = mounts_file.read_text()
    controllers: dict[str, str] = {}
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            mount = _unescape(fields[1])
            with contextlib.suppress(OSError):
                controllers[mount] = (Path(mount) / "cgroup.controllers").read_text()
    return plan_hierarchies(mounts, controllers)


def apply_steps(mount: Path, steps: Sequence[Step]) -> None:
    for step in steps:
        target = mount / step.path
        if step.value is None:
            target.mkdir(exist_ok=True)
        else:
            target.write_text(step.value)


def apply_cpu_limit(hierarchy: Hierarchy, plan: CpuLimitPlan) -> Path:
    """Creates the container's cgroup with its quota; returns its directory (the process joins it through its
    ``cgroup.procs``)."""
    apply_steps(hierarchy.mount, plan.steps)
    return hierarchy.mount / plan.cgroup


def remove(directory: Path) -> None:
    """Removes a cgroup and its children (empty ones: a cgroup with a process in it stays)."""
    if not directory.is_dir():
        return
    for child in sorted((p for p in directory.iterdir() if p.is_dir()), reverse=True):
        remove(child)
    with contextlib.suppress(OSError):
        directory.rmdir()


def setup(name: str, mounts_file: Path = Path("/proc/self/mounts")) -> tuple[Hierarchy | None, list[str]]:
    """The agent's cgroup `name` on the first hierarchy where it and a probe container cgroup with a quota can be
    created; that hierarchy (None when none works) and why each one tried did not."""
    problems: list[str] = []
    try:
        candidates = fetch_hierarchies(mounts_file)
    except OSError as error:
        return None, [f"cannot read {mounts_file}: {error}"]
    if not candidates:
        problems.append(f"{mounts_file} lists no cgroup v1 hierarchy with the cpu controller and no cgroup2 mount "
                        "whose root offers the cpu controller")
    for hierarchy in candidates:
        try:
            apply_steps(hierarchy.mount, plan_agent_cgroup(hierarchy.version, name))
            remove(apply_cpu_limit(hierarchy, plan_cpu_limit(hierarchy.version, name, PROBE, "500m")))
            return hierarchy, problems
        except OSError as error:
            problems.append(f"{hierarchy.describe()}: {error}")
            remove(hierarchy.mount / name)
    return None, problems
