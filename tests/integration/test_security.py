"""Security on the real control plane: what a ModelDeployment can make the operator contact (spec-supplied Prometheus
addresses, scrape targets), that no credential reaches status, Events or the log, and the model pods' security context.

The operator runs as `shipyard-operator` (a local process: flags, environment and log as in production) with an
``--allowed-prometheus-address``; local HTTP servers stand in for Prometheus and for the pods' ``/metrics``.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Cluster, OperatorProcess, create_artifacts_volume, free_port, wait_until
from tests.integration.test_operator_rollout import FakePrometheus, model, replicas, wait_status

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cret"


class MetricsServer:
    """Stands in for a pod's /metrics at one address; records every request. Its counter grows per scrape."""

    def __init__(self, host: str, port: int, model_name: str, version: str) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                outer.requests.append(self.path)
                count = 10 * len(outer.requests)
                data = ("# TYPE shipyard_requests_total counter\n"
                        f'shipyard_requests_total{{model="{model_name}",version="{version}",code="200"}} '
                        f"{count}\n").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def allowed_prometheus() -> Iterator[FakePrometheus]:
    fake = FakePrometheus()
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def secured_operator(cluster: Cluster, allowed_prometheus: FakePrometheus,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("SHIPYARD_PROMETHEUS_ADDRESS", None)
    op = OperatorProcess(cluster.kubeconfig, log, "--all-namespaces", "--allowed-prometheus-address",
                         allowed_prometheus.address, env=env)
    try:
        wait_until(op.live, 30, message="the operator's liveness endpoint")
        yield op
    finally:
        text = op.stop()
        assert "Traceback" not in text, text[-4000:]


def pods_of(cluster: Cluster, namespace: str, version: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", f"shipyard.dev/version={version}", "-o", "json")
    return list(json.loads(out.stdout)["items"])


def pod_ip(cluster: Cluster, namespace: str, name: str) -> str:
    def ready() -> str | None:
        pod = cluster.get("pod", name, namespace)
        conditions = ((pod or {}).get("status") or {}).get("conditions") or []
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
        return (pod or {}).get("status", {}).get("podIP") if ready else None
    return str(wait_until(ready, 30, message=f"pod {name} ready with an IP"))


def rollout_to(cluster: Cluster, namespace: str, name: str, tag: str, **spec: Any) -> None:
    cluster.apply(model(name, tag, replicas=2, **spec), namespace)


def test_spec_prometheus_addresses_are_queried_only_when_allowed_and_no_secret_leaks(
        cluster: Cluster, secured_operator: OperatorProcess, namespace: str,
        allowed_prometheus: FakePrometheus) -> None:
    by_namespace, refused = FakePrometheus(), FakePrometheus()
    try:
        cluster.kubectl("annotate", "namespace", namespace,
                        f"shipyard.dev/allowed-prometheus-addresses=http://203.0.113.9:9090,{by_namespace.address}")
        rollout_to(cluster, namespace, "sec", "1.0.0")
        wait_status(cluster, namespace, "sec", lambda md: md.get("status", {}).get("phase") == "Healthy",
                    message="version 1.0.0 Healthy")
        # An address with credentials is refused at admission (the CRD's rule), without echoing them; what was
        # stored stays. (The operator refuses one too, should it meet one stored before the rule: unit-tested.)
        credentials = allowed_prometheus.address.replace("http://", f"http://admin:{SECRET}@")
        with_credentials = model("sec", "2.0.0", replicas=2, rollout={"steps": [{"weight": 50}], "analysis": {
            "metrics": [{"name": "with-credentials", "prometheus": {"query": "q", "address": credentials}, "max": 1}]}})
        out = cluster.kubectl("apply", "--server-side", "--field-manager=shipyard-tests", "-n", namespace, "-f", "-",
                              input=json.dumps(with_credentials), check=False)
        assert out.returncode != 0 and "must not carry credentials" in out.stderr, out.stderr
        assert "spec.rollout.analysis.metrics[0].prometheus.address" in out.stderr and SECRET not in out.stderr
        assert cluster.get("md", "sec", namespace)["spec"]["image"].endswith(":1.0.0")  # type: ignore[index]
        metrics = [
            {"name": "by-flag", "prometheus": {"query": 'q_flag{v="{{version}}"}',
                                               "address": allowed_prometheus.address}, "max": 1},
            {"name": "by-namespace", "prometheus": {"query": "q_namespace", "address": by_namespace.address + "/"},
             "max": 1},
            {"name": "not-allowed", "prometheus": {"query": "q_refused", "address": refused.address}, "max": 1},
        ]
        rollout_to(cluster, namespace, "sec", "2.0.0", rollout={"steps": [{"weight": 50}], "analysis": {
            "interval": "1s", "consecutiveErrorLimit": 1, "minSamples": 3, "metrics": metrics}})
        md = wait_status(cluster, namespace, "sec", lambda md: md.get("status", {}).get("phase") == "RolledBack",
                         message="the candidate rolled back (its analysis could not query)")
        status = md["status"]
        assert status["stableVersion"] == "1.0.0"
        assert wait_until(lambda: replicas(cluster, namespace) == {"1.0.0": 2, "2.0.0": 0}, 30,
                          message="the stable back at full size, the candidate at zero")
        results = {m["name"]: m for m in status["analysis"]["metrics"]}
        assert results["by-flag"]["verdict"] == "Successful" and results["by-namespace"]["verdict"] == "Successful"
        for name, index, words in (("not-allowed", 2, "shipyard.dev/allowed-prometheus-addresses"),):
            message = results[name]["message"]
            assert results[name]["verdict"] == "Error", results[name]
            assert f"spec.rollout.analysis.metrics[{index}].prometheus.address" in message and words in message
        stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
        assert stalled["status"] == "True" and "could not be measured" in stalled["message"]
        # Allowed addresses were queried; refused ones never got a request.
        assert 'q_flag{v="2.0.0"}' in allowed_prometheus.queries and "q_namespace" in by_namespace.queries
        assert refused.queries == []
        # No credential in status, Events or the operator's log.
        assert SECRET not in json.dumps(cluster.get("md", "sec", namespace)["status"])  # type: ignore[index]
        events = cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
        assert "RolledBack" in events and SECRET not in events
        log = secured_operator.log.read_text()
        assert f"{namespace}/sec" in log and SECRET not in log
    finally:
        by_namespace.close()
        refused.close()


def test_only_pods_of_the_versions_own_deployment_are_scraped(
        cluster: Cluster, secured_operator: OperatorProcess, namespace: str) -> None:
    rollout_to(cluster, namespace, "scr", "1.0.0")
    wait_status(cluster, namespace, "scr", lambda md: md.get("status", {}).get("phase") == "Healthy",
                message="version 1.0.0 Healthy")
    labels = {"shipyard.dev/model": "scr", "shipyard.dev/component": "serving", "shipyard.dev/version": "2.0.0"}
    servers: list[MetricsServer] = []
    try:
        rogues = {}
        for name, host_network in (("rogue-copied-labels", False), ("rogue-host-network", True)):
            port = free_port()
            cluster.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {
                "name": name, "labels": {**labels, "pod-template-hash": "abc"} if host_network else labels,
                "annotations": {"shipyard.dev/port": str(port)}},
                "spec": {"hostNetwork": host_network, "containers": [
                    {"name": "server", "image": "registry.example/rogue:1",
                     "ports": [{"name": "http", "containerPort": port}]}]}}, namespace)
            ip = pod_ip(cluster, namespace, name)
            assert ip.startswith("127."), ip  # the fake pod network is on loopback
            servers.append(rogue := MetricsServer(ip, port, "scr", "2.0.0"))
            rogues[name] = rogue
        rollout_to(cluster, namespace, "scr", "2.0.0", rollout={"steps": [{"weight": 50}], "analysis": {
            "interval": "1s", "consecutiveErrorLimit": 30, "minSamples": 2,
            "metrics": [{"name": "error-rate", "builtin": "errorRate", "max": 0.5}]}})

        def own_pod() -> str | None:
            own = [p for p in pods_of(cluster, namespace, "2.0.0") if p["metadata"].get("ownerReferences")]
            return own[0]["metadata"]["name"] if own else None
        ip = pod_ip(cluster, namespace, str(wait_until(own_pod, 30, message="the candidate's own pod")))
        servers.append(own := MetricsServer(ip, 8080, "scr", "2.0.0"))
        md = wait_status(cluster, namespace, "scr", lambda md: md.get("status", {}).get("stableVersion") == "2.0.0",
                         message="version 2.0.0 promoted on its own pod's metrics")
        (result,) = md["status"]["analysis"]["metrics"]
        assert result["verdict"] == "Successful" and result["query"].startswith("scrape of 1 pod(s)"), result
        assert len(own.requests) >= 2 and set(own.requests) == {"/metrics"}
        assert {name: r.requests for name, r in rogues.items()} == {"rogue-copied-labels": [],
                                                                    "rogue-host-network": []}
    finally:
        for server in servers:
            server.close()


def assert_restricted(pod_spec: dict[str, Any], what: str) -> None:
    pod_sc = pod_spec.get("securityContext") or {}
    assert pod_spec.get("automountServiceAccountToken") is False, what
    assert not pod_spec.get("hostNetwork") and not pod_spec.get("hostPID") and not pod_spec.get("hostIPC"), what
    for container in pod_spec["containers"] + (pod_spec.get("initContainers") or []):
        sc = {**pod_sc, **(container.get("securityContext") or {})}
        where = f"{what} container {container['name']}"
        assert sc.get("runAsNonRoot") is True, where
        assert isinstance(sc.get("runAsUser"), int) and sc["runAsUser"] > 0, where
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("privileged") in (None, False), where
        assert (sc.get("capabilities") or {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add"), where
        assert sc.get("seccompProfile") == {"type": "RuntimeDefault"}, where


def test_model_pods_run_non_root_on_a_read_only_root_filesystem(
        cluster: Cluster, secured_operator: OperatorProcess, namespace: str) -> None:
    create_artifacts_volume(cluster, namespace)
    compression = {"steps": [{"quantize": {"scheme": "int8-dynamic"}}], "evaluation": {"dataset": "builtin:digits"},
                   "artifacts": {"pvc": "shipyard-artifacts"}}
    cluster.apply(model("psec", "1.0.0", replicas=1, compression=compression), namespace)
    wait_status(cluster, namespace, "psec", lambda md: md.get("status", {}).get("phase") == "Healthy", 60,
                message="compressed and serving")
    (job,) = json.loads(cluster.kubectl("get", "jobs", "-n", namespace, "-o", "json").stdout)["items"]
    (deployment,) = json.loads(cluster.kubectl("get", "deployments", "-n", namespace, "-o", "json").stdout)["items"]
    assert_restricted(job["spec"]["template"]["spec"], "compression Job")
    assert_restricted(deployment["spec"]["template"]["spec"], "serving Deployment")
    # The pods the controllers made from them carry it too (what the kubelet runs).
    for pod in json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]:
        assert_restricted(pod["spec"], f"pod {pod['metadata']['name']}")
