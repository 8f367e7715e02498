"""Fixtures of the harness tier: the test machinery's own checks (marker ``harness``), not Shipyard's behaviour.

``node``: a control plane of this package's own (hack/cluster.py) and the node agent (hack/node_agent.py, started as
tests/stack.py says: CPU limits required), without Prometheus or the operator: what checking the agent as a kubelet
needs, trusting the suite's OCI registry (``oci_registry``) for image volumes, with a pod network (``--pod-network``
POD_NETWORK: pods of namespaces labelled ``shipyard.dev/pod-network=bridge`` get a network namespace and an address
there; all others keep loopback addresses). Stopped at the end of the package, checked for a clean exit, for no pod
process left behind and for nothing left of its pod network (network namespaces, veth, policy rule).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import stack
from tests.integration.conftest import Cluster
from tests.registry import Registry

POD_IP_PREFIX = "127.0.12"  # apart from the e2e tier's 127.0.11 and the demo's 127.0.10
SERVICE_IP_PREFIX = "127.0.252"  # Services' virtual IPs: apart from the e2e tier's 127.0.253 and the demo's 127.0.254
POD_NETWORK = "10.212.0.0/16"  # the harness agent's pod network


@dataclass
class Node:
    cluster: Cluster
    workdir: Path  # the node agent's work directory
    agent_log: Path
    registry: Registry  # the registry the agent trusts (--registry-ca) for image volumes
    pod_network: dict[str, str]  # what the agent created for POD_NETWORK: cidr, netns, hostInterface, hostAddress

    @property
    def cpu_limits(self) -> dict[str, Any]:
        """Where the agent puts CPU limits: {version, mount, cgroup} (its agent-ready file)."""
        limits: dict[str, Any] = json.loads((self.workdir / "agent-ready").read_text())["cpuLimits"]
        return limits


@pytest.fixture(scope="package")
def node(oci_registry: Registry) -> Iterator[Node]:
    stack.check_host(prometheus=False)
    cluster_mod = stack.load_hack_module("cluster")
    base = Path(tempfile.mkdtemp(prefix="shipyard-harness-"))
    state = cluster_mod.up(base / "cluster")
    agent: subprocess.Popen[bytes] | None = None
    code = None
    pod_network: dict[str, str] = {}
    left: list[str] = []
    try:
        agent = stack.start_agent(state.kubeconfig, base / "agent", base / "agent.log", POD_IP_PREFIX,
                                  "--registry-ca", str(oci_registry.ca), "--pod-network", POD_NETWORK,
                                  service_ip_prefix=SERVICE_IP_PREFIX)
        pod_network = json.loads((base / "agent" / "agent-ready").read_text())["podNetwork"]
        yield Node(cluster=Cluster(kubeconfig=str(state.kubeconfig)), workdir=base / "agent",
                   agent_log=base / "agent.log", registry=oci_registry, pod_network=pod_network)
    finally:
        if agent is not None:
            code = stack.proc.stop(agent, 60)
        cluster_mod.down(base / "cluster")
        stray = stack.stray_pod_processes(base / "agent.log")
        left = stack.pod_network_leftovers(pod_network) if pod_network else []
        if agent is not None and code == 0 and not stray and not left:
            shutil.rmtree(base, ignore_errors=True)
    assert not stray, f"pod processes left running after the node agent stopped: {stray} (logs in {base})"
    assert code == 0, f"the node agent exited with {code} (see {base / 'agent.log'})"
    assert not left, f"left of the pod network after the node agent stopped: {left} (logs in {base})"
