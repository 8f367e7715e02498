"""Fixtures of the e2e tier: the whole chain real on one machine, started once for the tests/e2e package.

Starts, in order: the local control plane (hack/cluster.py), the node agent (hack/node_agent.py: Node local-0 whose
pods run as real processes, the Service proxy, Prometheus targets; the KWOK nodes tainted), Prometheus from
Debian's package (hack/prometheus.py, file_sd, 1 s scrapes), KEDA (hack/keda.py: its operator and metrics adapter,
the external metrics API registered with the control plane's aggregator) and the operator as a subprocess
(``shipyard-operator --prometheus-address``). Stops them in the reverse order (operator, agent with its pods,
Prometheus, KEDA, control plane) and checks that no pod process is left. The package scope makes the e2e cluster go
away before the next tier starts its own. The agent is started as tests/stack.py says: a machine where it cannot
enforce pods' CPU limits fails the fixture.

Results (timings, requests per version) are collected in RESULTS, written to tests/e2e/results/last-run.json and
printed as a table at the end of the run (with or without -s). Logs of a run are copied to tests/e2e/results/logs/.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import lightkube
import pytest
from lightkube.config.kubeconfig import KubeConfig
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import Pod

from shipyard.operator import naming
from tests import stack
from tests.integration.conftest import Cluster, install_crds, wait_until
from tests.registry import Registry

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NAMESPACE = "e2e"
POD_IP_PREFIX = "127.0.11"
ACTIVATOR_IMAGE = "registry.example/shipyard/operator:e2e"  # the operator's image (hack/e2e-images.yaml): activators
RUNTIME_IMAGE = "registry.example/shipyard/runtime:0.1.0"  # the runtime without a model (--fetch-image)
SERVICE_IP_PREFIX = "127.0.253"  # Services' virtual IPs, apart from the demo's default 127.0.254
# Pods of namespaces labelled shipyard.dev/pod-network=bridge get a network namespace and an address from this range
# (hack/node_agent.py --pod-network): real EndpointSlices, which Traefik (the Gateway API scenarios) routes to.
POD_NETWORK = "10.215.0.0/16"  # apart from the demo's 10.213 and the harness' 10.212: they may run at once
RESULTS: dict[str, Any] = {"scenarios": {}}

ModelDeployment = create_namespaced_resource("shipyard.dev", "v1alpha1", "ModelDeployment", "modeldeployments")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class E2E:
    cluster: Cluster
    client: lightkube.Client
    workdir: Path  # the node agent's work directory
    prometheus: str
    model_cache: Path  # the operator's --model-cache-path (one node: one cache)
    gateway: Any = None  # hack/gateway.py's Gateway: Traefik, the Gateway API controller, on a loopback port
    namespace: str = NAMESPACE

    def service_port(self, name: str, port: str = "http") -> int:
        def read() -> int | None:
            path = self.workdir / "services.json"
            if not path.exists():
                return None
            return json.loads(path.read_text()).get(f"{self.namespace}/{name}", {}).get(port)

        port_number: int = wait_until(read, timeout=60, message=f"the proxy of service {name}")
        return port_number

    def conntrack(self) -> list[dict[str, Any]]:
        path = self.workdir / "conntrack.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def md(self, name: str) -> dict[str, Any]:
        obj = self.client.get(ModelDeployment, name, namespace=self.namespace)
        return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


class Poller:
    """Calls ``poll`` at once and then every ``interval`` seconds in a thread, inside a ``with`` block, for at most
    15 minutes; a failed poll is retried at the next one."""

    interval = 0.25

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)

    def poll(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.poll()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        deadline = time.monotonic() + 900
        while not self._stop.wait(self.interval) and time.monotonic() < deadline:
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a missed poll is retried at the next
                continue


def count_ready_pods(e2e: E2E, model: str, versions: dict[str, str]) -> dict[str, int]:
    """Ready, not terminating serving pods of `model` per version (one LIST); records each pod's version in
    `versions` (pods are gone by the time their requests are attributed)."""
    counts: dict[str, int] = {}
    for pod in e2e.client.list(Pod, namespace=e2e.namespace,
                               labels={naming.LABEL_MODEL: model, naming.LABEL_COMPONENT: "serving"}):
        version = (pod.metadata.labels or {}).get(naming.LABEL_VERSION, "?")
        versions[pod.metadata.name] = version
        conds = {c.type: c.status for c in (pod.status.conditions or [])} if pod.status else {}
        if conds.get("Ready") == "True" and pod.metadata.deletionTimestamp is None:
            counts[version] = counts.get(version, 0) + 1
    return counts


def compression_job(e2e: E2E, name: str) -> dict[str, Any] | None:
    """The compression Job of ModelDeployment `name` in the namespace of `e2e`, None before there is one."""
    out = e2e.cluster.kubectl("get", "jobs", "-n", e2e.namespace, "-l",
                              f"{naming.LABEL_MODEL}={name},{naming.LABEL_COMPONENT}=compression", "-o", "json")
    items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
    return items[0] if items else None


def job_outcome(e2e: E2E, name: str) -> str | None:
    """Complete or Failed once Job `name` has finished, else None."""
    job = e2e.cluster.get("job", name, e2e.namespace)
    for c in (job or {}).get("status", {}).get("conditions") or []:
        if c["type"] in ("Complete", "Failed") and c["status"] == "True":
            return str(c["type"])
    return None


def record(name: str, **fields: Any) -> dict[str, Any]:
    """Adds a scenario's results (timings, requests per version, facts, outcome) to RESULTS; dicts are merged."""
    scenario: dict[str, Any] = RESULTS["scenarios"].setdefault(name, {"outcome": "failed"})
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(scenario.get(key), dict):
            scenario[key].update(value)
        else:
            scenario[key] = value
    return scenario


@pytest.fixture(scope="package")
def e2e(oci_registry: Registry) -> Iterator[E2E]:
    stack.check_host(prometheus=True)
    cluster_mod = stack.load_hack_module("cluster")
    prometheus_mod = stack.load_hack_module("prometheus")
    keda_mod = stack.load_hack_module("keda")
    gateway_mod = stack.load_hack_module("gateway")
    base = Path(tempfile.mkdtemp(prefix="shipyard-e2e-"))
    workdir = base / "agent"
    venv = Path(sys.prefix)
    timings: dict[str, float] = {}
    RESULTS["environment"] = {"cpus": os.cpu_count(), "startedAt": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "workdir": str(base)}
    RESULTS["timings"] = timings
    started = time.monotonic()
    state = cluster_mod.up(base / "cluster")
    timings["controlPlaneUpSeconds"] = round(time.monotonic() - started, 1)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    prometheus_dir = base / "prometheus"
    failed = True
    try:
        cluster = Cluster(kubeconfig=str(state.kubeconfig))
        install_crds(cluster)
        mark = time.monotonic()
        procs["agent"] = stack.start_agent(state.kubeconfig, workdir, base / "agent.log", POD_IP_PREFIX,
                                           "--registry-ca", str(oci_registry.ca),  # image volumes: the registry's CA
                                           "--pod-network", POD_NETWORK, service_ip_prefix=SERVICE_IP_PREFIX)
        timings["agentReadySeconds"] = round(time.monotonic() - mark, 1)
        mark = time.monotonic()
        _, prometheus_url = prometheus_mod.start(prometheus_dir, workdir / "prometheus-targets.json")
        timings["prometheusReadySeconds"] = round(time.monotonic() - mark, 1)
        mark = time.monotonic()
        keda_mod.start(base / "keda", state.kubeconfig)  # the autoscaling scenarios' scaler
        timings["kedaReadySeconds"] = round(time.monotonic() - mark, 1)
        mark = time.monotonic()
        gateway = gateway_mod.start(base / "gateway", state.kubeconfig)  # the Gateway API scenarios' data plane
        timings["gatewayReadySeconds"] = round(time.monotonic() - mark, 1)
        liveness = free_port()
        model_cache = base / "model-cache"  # the node's model cache (a hostPath), writable by the pods' user
        model_cache.mkdir()
        model_cache.chmod(0o1777)
        procs["operator"] = stack.proc.spawn(
            [str(venv / "bin" / "shipyard-operator"), "--all-namespaces", "--kubeconfig", str(state.kubeconfig),
             "--metrics-port", str(free_port()), "--metrics-address", "127.0.0.1",
             "--liveness", f"http://127.0.0.1:{liveness}/healthz", "--prometheus-address", prometheus_url,
             "--activator-image", ACTIVATOR_IMAGE, "--fetch-image", RUNTIME_IMAGE,
             "--model-cache-path", str(model_cache)],
            base / "operator.log")

        def operator_live() -> bool:
            assert procs["operator"].poll() is None, (base / "operator.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{liveness}/healthz", timeout=1) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_until(operator_live, timeout=60, message="the operator's liveness endpoint")
        timings["stackUpSeconds"] = round(time.monotonic() - started, 1)
        cluster.kubectl("create", "namespace", NAMESPACE)
        client = lightkube.Client(config=KubeConfig.from_file(str(state.kubeconfig)), field_manager="shipyard-e2e")
        yield E2E(cluster=cluster, client=client, workdir=workdir, prometheus=prometheus_url, model_cache=model_cache,
                  gateway=gateway)
        failed = False
    finally:
        mark = time.monotonic()
        codes = {}
        if "operator" in procs:
            codes["operator"] = stack.proc.stop(procs["operator"], 30)
        if "agent" in procs:
            codes["agent"] = stack.proc.stop(procs["agent"], 90)
        prometheus_mod.stop(prometheus_dir)
        keda_mod.stop(base / "keda")
        gateway_mod.stop(base / "gateway")
        cluster_mod.down(base / "cluster")
        timings["teardownSeconds"] = round(time.monotonic() - mark, 1)
        _keep_logs(base)
        stray = stack.stray_pod_processes(base / "agent.log")
        RESULTS["teardown"] = {"exitCodes": codes, "strayPodProcesses": stray}
        if not failed and not stray:
            shutil.rmtree(base, ignore_errors=True)
    assert not stray, f"pod processes left running after the node agent stopped: {stray}"
    assert codes.get("agent") == 0, f"the node agent exited with {codes.get('agent')} (see results/logs/agent.log)"
    assert codes.get("operator") == 0, f"the operator exited with {codes.get('operator')}"


def _keep_logs(base: Path) -> None:
    target = RESULTS_DIR / "logs"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True, exist_ok=True)
    for name in ("agent.log", "operator.log"):
        if (base / name).exists():
            shutil.copy(base / name, target / name)
    if (base / "prometheus" / "prometheus.log").exists():
        shutil.copy(base / "prometheus" / "prometheus.log", target / "prometheus.log")
    for log in sorted((base / "keda" / "logs").glob("*.log")):
        shutil.copy(log, target / log.name)
    if (base / "agent" / "logs").is_dir():
        shutil.copytree(base / "agent" / "logs", target / "pods", dirs_exist_ok=True)
    if (base / "cluster" / "logs").is_dir():
        shutil.copytree(base / "cluster" / "logs", target / "cluster", dirs_exist_ok=True)


# ------------------------------------------------------------------------------------------------ reporting


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not RESULTS["scenarios"]:
        return
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    RESULTS["exitStatus"] = int(exitstatus)
    (RESULTS_DIR / "last-run.json").write_text(json.dumps(RESULTS, indent=2, sort_keys=True) + "\n")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS["scenarios"]:
        return
    write = terminalreporter.write_line
    terminalreporter.section("shipyard e2e results (tests/e2e/results/last-run.json)")
    timings = RESULTS.get("timings", {})
    if timings:
        write("stack: " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    for name, scenario in RESULTS["scenarios"].items():
        write(f"{name}: {scenario.get('outcome', '?')}")
        width = max([44, *(len(k) for k in (scenario.get("timings") or {})), *(len(f"requests {v}") for v in
                     (scenario.get("requests") or {}))])
        for key, value in (scenario.get("timings") or {}).items():
            write(f"    {key:<{width}} {value}")
        for version, counts in (scenario.get("requests") or {}).items():
            served, failed = counts.get("served", 0), counts.get("failed", 0)
            write(f"    {'requests ' + version:<{width}} served {served:>6}  failed {failed:>5}")
        for key, value in (scenario.get("facts") or {}).items():
            write(f"    {key:<{width}} {value}")
