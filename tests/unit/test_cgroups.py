"""hack/cgroups.py, the node agent's CPU limits on cgroup v1 and v2: which hierarchy a machine's mounts offer, the
files (and values) a limit is written as for each version, and that a pod reading its own cgroup the way the runtime
does (``shipyard.runtime.engine.fetch_cpu_limit``) finds that limit. The I/O runs on a fake tree here; the harness
tier (tests/harness/test_node_agent.py) measures a real limit on the real hierarchy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.modules import load_file

CG = load_file("shipyard_hack_cgroups", Path(__file__).parents[2] / "hack" / "cgroups.py")
H, S = CG.Hierarchy, CG.Step

HYBRID = """tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
UNIFIED = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate,memory_recursiveprot 0 0\n"
SYSTEMD_V1 = ("cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0\n"
              "cgroup /sys/fs/cgroup/cpuset cgroup rw,nosuid,nodev,noexec,relatime,cpuset 0 0\n")
ALL_V2 = "cpuset cpu io memory hugetlb pids rdma misc"


@pytest.mark.parametrize(("mounts", "controllers", "expected"), [
    pytest.param(HYBRID, {"/sys/fs/cgroup/unified": "hugetlb"}, [H(1, Path("/sys/fs/cgroup/cpu"))],
                 id="hybrid-cpu-bound-to-v1"),
    pytest.param(UNIFIED, {"/sys/fs/cgroup": ALL_V2}, [H(2, Path("/sys/fs/cgroup"))], id="unified"),
    pytest.param(UNIFIED, {"/sys/fs/cgroup": "memory pids"}, [], id="unified-without-cpu"),
    pytest.param(UNIFIED, {}, [], id="unified-controllers-unreadable"),
    pytest.param(SYSTEMD_V1, {}, [H(1, Path("/sys/fs/cgroup/cpu,cpuacct"))], id="v1-cpu-cpuacct"),
    pytest.param(SYSTEMD_V1 + "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n", {"/sys/fs/cgroup/unified": "cpu"},
                 [H(2, Path("/sys/fs/cgroup/unified")), H(1, Path("/sys/fs/cgroup/cpu,cpuacct"))], id="v2-first"),
    pytest.param("cgroup /sys/fs/cgroup/cpuset cgroup rw,cpuset 0 0\n", {}, [], id="cpuset-is-not-cpu"),
    pytest.param("cgroup2 /mnt/my\\040cgroups cgroup2 rw 0 0\n", {"/mnt/my cgroups": "cpu"},
                 [H(2, Path("/mnt/my cgroups"))], id="escaped-mount-path"),
    pytest.param("", {}, [], id="none"),
])
def test_plan_hierarchies(mounts: str, controllers: dict[str, str], expected: list[object]) -> None:
    assert CG.plan_hierarchies(mounts, controllers) == expected


@pytest.mark.parametrize(("version", "steps"), [
    pytest.param(1, (S("agent"),), id="v1"),
    pytest.param(2, (S("cgroup.subtree_control", "+cpu"), S("agent"), S("agent/cgroup.subtree_control", "+cpu")),
                 id="v2-enables-cpu-for-children"),
])
def test_plan_agent_cgroup(version: int, steps: tuple[object, ...]) -> None:
    assert CG.plan_agent_cgroup(version, "agent") == steps


@pytest.mark.parametrize(("version", "cpu", "writes", "pod_mount"), [
    pytest.param(1, "500m", {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "50000"}, "/sys/fs/cgroup/cpu",
                 id="v1-500m"),
    pytest.param(1, "2", {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "200000"}, "/sys/fs/cgroup/cpu",
                 id="v1-2"),
    pytest.param(1, "1m", {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "1000"}, "/sys/fs/cgroup/cpu",
                 id="v1-kernel-minimum"),
    pytest.param(2, "500m", {"cpu.max": "50000 100000"}, "/sys/fs/cgroup", id="v2-500m"),
    pytest.param(2, "1.5", {"cpu.max": "150000 100000"}, "/sys/fs/cgroup", id="v2-fraction"),
    pytest.param(2, "2500m", {"cpu.max": "250000 100000"}, "/sys/fs/cgroup", id="v2-2500m"),
    pytest.param(2, "1m", {"cpu.max": "1000 100000"}, "/sys/fs/cgroup", id="v2-kernel-minimum"),
])
def test_plan_cpu_limit(version: int, cpu: str, writes: dict[str, str], pod_mount: str) -> None:
    plan = CG.plan_cpu_limit(version, "agent", "uid-main", cpu)
    assert plan.cgroup == "agent/uid-main"
    assert plan.steps[0] == S("agent/uid-main")  # the directory before its files
    assert {s.path.removeprefix("agent/uid-main/"): s.value for s in plan.steps[1:]} == writes
    assert list(writes) == [s.path.rsplit("/", 1)[1] for s in plan.steps[1:]]  # v1: the period before the quota
    assert plan.pod_mount == pod_mount


def fake_machine(tmp_path: Path, version: int) -> Path:
    """A mount table naming a fake hierarchy under tmp_path (a v2 root offering the cpu controller)."""
    root = tmp_path / f"v{version}"
    root.mkdir()
    if version == 2:
        (root / "cgroup.controllers").write_text(ALL_V2 + "\n")
        (root / "cgroup.subtree_control").write_text("")
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup{'2' if version == 2 else ''} {root} cgroup{'2' if version == 2 else ''} "
                      f"rw{'' if version == 2 else ',cpu'} 0 0\n")
    return mounts


@pytest.mark.parametrize(("cpu", "threads"), [("500m", 1), ("1500m", 2), ("3", 3)])
@pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])
def test_the_runtime_reads_the_limit_the_agent_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: int,
                                                     cpu: str, threads: int) -> None:
    from shipyard.runtime import engine

    hierarchy, problems = CG.setup("agent", fake_machine(tmp_path, version))
    assert hierarchy == H(version, tmp_path / f"v{version}") and not problems
    if version == 2:
        assert (hierarchy.mount / "cgroup.subtree_control").read_text() == "+cpu"
        assert (hierarchy.mount / "agent" / "cgroup.subtree_control").read_text() == "+cpu"
    plan = CG.plan_cpu_limit(version, "agent", "uid-main", cpu)
    cgroup = CG.apply_cpu_limit(hierarchy, plan)
    # What the pod sees as /sys/fs/cgroup: its own cgroup bound at plan.pod_mount.
    view = tmp_path / "pod-sys-fs-cgroup"
    shutil.copytree(cgroup, view / Path(plan.pod_mount).relative_to("/sys/fs/cgroup"))
    monkeypatch.setattr(engine.os, "sched_getaffinity", lambda _pid: set(range(16)))
    assert engine.fetch_cpu_limit(str(view)) == threads
    assert engine.fetch_cpu_limit(str(tmp_path / "no-limit")) == 16  # the check can fail: no limit, all 16


def test_setup_says_why_when_no_hierarchy_works(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup2 {tmp_path / 'v2'} cgroup2 rw 0 0\n")  # no cgroup.controllers: no cpu offered
    hierarchy, problems = CG.setup("agent", mounts)
    assert hierarchy is None
    assert "no cgroup v1 hierarchy with the cpu controller" in problems[0]


def test_setup_falls_back_to_v1_when_v2_refuses(tmp_path: Path) -> None:
    mounts = fake_machine(tmp_path, 1)
    v2 = tmp_path / "v2"
    (v2 / "cgroup.subtree_control").mkdir(parents=True)  # offers cpu, but enabling it fails (as EBUSY would)
    (v2 / "cgroup.controllers").write_text("cpu\n")
    mounts.write_text(mounts.read_text() + f"cgroup2 {v2} cgroup2 rw 0 0\n")
    hierarchy, problems = CG.setup("agent", mounts)
    assert hierarchy == H(1, tmp_path / "v1")
    assert len(problems) == 1 and problems[0].startswith(f"cgroup v2 at {v2}: ")
    assert not (v2 / "agent").exists()
