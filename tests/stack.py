"""The local stack's processes as the test fixtures start them (process and file I/O): the hack/ modules loaded by
path, the node agent started as the e2e and harness tiers need it, and the check that none of its pods' processes
outlive it. Shared by tests/e2e/conftest.py (the whole chain) and tests/harness/conftest.py (the agent alone).

The agent always runs with ``--require-cpu-limits``: pods' CPU limits are part of what the tiers measure (the
runtime sizes its threads from them; the harness tier checks a limit really holds), so a machine where the agent
cannot enforce them (no usable cgroup v1 or v2 cpu controller) fails the fixture instead of passing without them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.modules import load_file

REPO = Path(__file__).resolve().parents[1]


def load_hack_module(name: str) -> Any:
    """hack/<name>.py as module ``shipyard_hack_<name>`` (hack/ holds scripts, not a package)."""
    return load_file(f"shipyard_hack_{name}", REPO / "hack" / f"{name}.py")


proc = load_hack_module("proc")


def check_host(*, prometheus: bool) -> None:
    """Fails the fixture, naming what is missing, where pods cannot run as real processes (root, util-linux) or,
    with `prometheus`, where Debian's Prometheus is not installed (hack/test.sh installs both)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("the node agent needs root (mount namespaces and bind mounts for pods, cgroups)")
    for tool in ("unshare", "setpriv", "mount"):  # kubectl: built at the cluster's version, put on PATH by up()
        if shutil.which(tool) is None:
            problems.append(f"{tool} not found (apt-get install -y util-linux mount)")
    binary = os.environ.get("SHIPYARD_PROMETHEUS", "/usr/bin/prometheus")
    if prometheus and not Path(binary).exists():
        problems.append(f"{binary} not found: apt-get install -y prometheus")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


def start_agent(kubeconfig: str | Path, workdir: Path, log: Path, pod_ip_prefix: str,
                *args: str, service_ip_prefix: str = "127.0.254", timeout: float = 600) -> subprocess.Popen[bytes]:
    """Starts hack/node_agent.py (this virtualenv's Python and bin/ for pods, the KWOK nodes tainted, the image
    catalogue built, CPU limits required) and waits until it is ready; an agent that exits first, or is ready
    without enforcing CPU limits, fails with its log's tail. Pod IPs are <pod_ip_prefix>.N, Services' virtual IPs
    <service_ip_prefix>.N. `args` are appended to its command line."""
    from tests.integration.conftest import wait_until  # kopf and all: not for the unit tests that load hack/ here

    venv = Path(sys.prefix)
    agent = proc.spawn([str(venv / "bin" / "python"), str(REPO / "hack" / "node_agent.py"), "--kubeconfig",
                        str(kubeconfig), "--workdir", str(workdir), "--venv", str(venv), "--taint-fake-nodes",
                        "--prepare-images", "--require-cpu-limits", "--pod-ip-prefix", pod_ip_prefix,
                        "--service-ip-prefix", service_ip_prefix, *args], log)
    ready = workdir / "agent-ready"

    def agent_ready() -> bool:
        assert agent.poll() is None, (f"the node agent exited with {agent.returncode}:\n"
                                      + log.read_text(errors="replace")[-3000:])
        return ready.exists()

    try:
        # The first run on a machine trains the digits model of the image catalogue (cached afterwards).
        wait_until(agent_ready, timeout=timeout, interval=0.5, message="the node agent")
        info = json.loads(ready.read_text())
        assert info.get("cpuLimits"), f"the node agent does not enforce CPU limits: {info}"
    except BaseException:
        proc.stop(agent, 30)
        raise
    return agent


def pod_network_leftovers(pod_network: dict[str, str]) -> list[str]:
    """What is left on the machine of an agent's pod network (``podNetwork`` of its agent-ready file): its network
    namespaces (the stack's, its pods'), the host's end of its veth, its policy rule."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()
    left = [f"netns {n}" for n in netns if n == pod_network["netns"] or n.startswith(pod_network["netns"] + "-")]
    if Path("/sys/class/net", pod_network["hostInterface"]).exists():
        left.append(f"link {pod_network['hostInterface']}")
    rules = subprocess.run(["ip", "-4", "rule", "show"], capture_output=True, text=True, check=True).stdout
    left += [f"rule {line.strip()}" for line in rules.splitlines() if f"iif {pod_network['hostInterface']} " in line]
    return left


def stray_pod_processes(agent_log: Path) -> list[int]:
    """The pids of the agent's containers (its "Started container ... as pid N" lines) still alive."""
    if not agent_log.exists():
        return []
    pids = []
    for line in agent_log.read_text(errors="replace").splitlines():
        if "Started container" in line and " as pid " in line:
            pids.append(int(line.split(" as pid ", 1)[1].split()[0]))
    return [pid for pid in pids if proc.alive(pid)]
