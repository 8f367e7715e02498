"""The operator lifecycle on the real control plane: compression Jobs (KWOK completes or fails them), canary steps,
analysis against a local HTTP server that speaks the Prometheus query API, rollback, restarts, GitOps re-applies."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import prometheus_client
import pytest
from kopf.testing import KopfRunner

from tests.integration.conftest import Cluster, create_artifacts_volume, wait_until

pytestmark = pytest.mark.integration
IMAGE = "registry.example/acme/digits-model"
COMPRESSION = {"steps": [{"prune": {"amount": 0.5}}, {"quantize": {"scheme": "int8-dynamic"}}],
               "evaluation": {"dataset": "builtin:digits"}, "artifacts": {"pvc": "shipyard-artifacts"}}


class FakePrometheus:
    """A local HTTP server answering /api/v1/query; `answer(query)` returns a value, None (empty vector) or raises."""

    def __init__(self) -> None:
        self.answer: Callable[[str], float | None] = lambda query: 0.0
        self.queries: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                url = urlparse(self.path)
                query = parse_qs(url.query).get("query", [""])[0]
                outer.queries.append(query)
                try:
                    value = outer.answer(query)
                    result = [] if value is None else [{"metric": {}, "value": [time.time(), str(value)]}]
                    body, code = {"status": "success", "data": {"resultType": "vector", "result": result}}, 200
                except Exception as e:  # the fake says what went wrong, as Prometheus does
                    body, code = {"status": "error", "errorType": "execution", "error": str(e)}, 422
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def model(name: str, tag: str, replicas: int = 4, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "shipyard.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {"image": f"{IMAGE}:{tag}", "model": {"path": "/models/digits"},
                 "serving": {"replicas": replicas}, **spec},
    }


def analysis(address: str, **overrides: Any) -> dict[str, Any]:
    return {"interval": "1s", "failureLimit": 1, "minSamples": 2, "noData": "Inconclusive",
            "prometheus": {"address": address},
            "metrics": [{"name": "error-rate", "builtin": "errorRate", "max": 0.05}], **overrides}


def get(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    md = cluster.get("md", name, namespace)
    assert md is not None
    return md


def condition(md: dict[str, Any], type_: str) -> tuple[str | None, str | None]:
    for c in (md.get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c["status"], c.get("reason")
    return None, None


def wait_status(cluster: Cluster, namespace: str, name: str, predicate: Callable[[dict[str, Any]], bool],
                timeout: float = 60, message: str = "") -> dict[str, Any]:
    result: dict[str, Any] = wait_until(
        lambda: (md := cluster.get("md", name, namespace)) and predicate(md) and md, timeout, message=message)
    return result


def names(cluster: Cluster, kind: str, namespace: str) -> list[str]:
    out = cluster.kubectl("get", kind, "-n", namespace, "-o", "json").stdout
    return sorted(i["metadata"]["name"] for i in json.loads(out)["items"])


def get_deployment(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", "deployment", name, "-n", namespace, "-o", "json").stdout)


def replicas(cluster: Cluster, namespace: str) -> dict[str, int]:
    out = json.loads(cluster.kubectl("get", "deployments", "-n", namespace, "-o", "json").stdout)
    return {d["metadata"]["labels"]["shipyard.dev/version"]: d["spec"]["replicas"] for d in out["items"]}


def events(cluster: Cluster, namespace: str, name: str) -> list[str]:
    out = json.loads(cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)
    items = sorted((e for e in out["items"] if e["involvedObject"]["name"] == name),
                   key=lambda e: (e.get("lastTimestamp") or "", e["metadata"]["name"]))
    return [e["reason"] for e in items]


def healthy(version: str) -> Callable[[dict[str, Any]], bool]:
    return lambda md: (md.get("status") or {}).get("stableVersion") == version and \
        md["status"].get("phase") == "Healthy"


def test_compression_then_canary_steps_then_promotion(
        cluster: Cluster, operator: KopfRunner, namespace: str, prometheus: FakePrometheus) -> None:
    create_artifacts_volume(cluster, namespace)
    steps = [{"weight": 25, "pause": "2s"}, {"weight": 50, "pause": "2s"}]
    spec = {"compression": COMPRESSION, "rollout": {"steps": steps, "analysis": analysis(prometheus.address)}}
    cluster.apply(model("happy", "1.0.0", **spec), namespace)
    md = wait_status(cluster, namespace, "happy", healthy("1.0.0"), message="1.0.0 healthy")
    assert condition(md, "Compressed") == ("True", "ArtifactReady")
    (artifact,) = md["status"]["artifacts"]
    assert artifact["phase"] == "Succeeded" and artifact["path"].startswith(f"/artifacts/{namespace}/happy/")
    dep = cluster.get("deployment", "happy-1-0-0", namespace)
    assert dep is not None
    pod = dep["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env["SHIPYARD_ARTIFACT_PATH"] == artifact["path"]
    assert {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v} == {
        "shipyard-artifacts"}

    seen: set[tuple[int, int]] = set()
    cluster.apply(model("happy", "1.1.0", **spec), namespace)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        r = replicas(cluster, namespace)
        seen.add((r.get("1.0.0", 0), r.get("1.1.0", 0)))
        md = get(cluster, namespace, "happy")
        if healthy("1.1.0")(md) and r.get("1.0.0") == 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"not promoted: {md.get('status')}")
    assert (4, 1) in seen or (3, 1) in seen  # 25%: one candidate pod
    assert (2, 2) in seen  # 50%
    assert [(h["version"], h["outcome"]) for h in md["status"]["history"]] == [
        ("1.0.0", "Superseded"), ("1.1.0", "Promoted")]
    assert md["status"]["analysis"]["phase"] == "Successful"
    assert md["status"]["analysis"]["detectionBoundSeconds"] == 2.0
    assert any('version="1.1.0"' in q for q in prometheus.queries)
    assert len(md["status"]["artifacts"]) == 2
    assert len(names(cluster, "jobs", namespace)) == 2
    story = events(cluster, namespace, "happy")
    for reason in ("Compressing", "Compressed", "RolloutStarted", "StepReady", "StepCompleted", "Promoted"):
        assert reason in story, story


def test_failed_compression_gate_stalls_with_the_numbers(cluster: Cluster, operator: KopfRunner,
                                                         namespace: str) -> None:
    create_artifacts_volume(cluster, namespace)
    cluster.apply(model("gate", "1.0.0"), namespace)
    wait_status(cluster, namespace, "gate", healthy("1.0.0"), message="1.0.0 healthy")
    cluster.apply(model("gate", "1.1.0-gatefail", compression=COMPRESSION), namespace)
    md = wait_status(cluster, namespace, "gate", lambda m: m["status"].get("phase") == "Failed", message="Failed")
    assert condition(md, "Compressed") == ("False", "CompressionFailed")
    assert condition(md, "Stalled") == ("True", "CompressionFailed")
    assert "relative loss 0.3705 > tolerance 0.0100" in md["status"]["message"]
    assert md["status"]["history"][-1]["outcome"] == "Failed"
    assert md["status"]["stableVersion"] == "1.0.0"
    time.sleep(2)
    assert replicas(cluster, namespace) == {"1.0.0": 4}  # no rollout of the rejected version
    assert len(names(cluster, "jobs", namespace)) == 1  # and no new Job
    # The retry annotation (what `kubectl shipyard retry` sets) compresses again in a new Job, and deletes the failed
    # one. This image's gate fails again (KWOK's stage), so it ends Failed again, once more in the history.
    cluster.kubectl("annotate", "-n", namespace, "md/gate", "shipyard.dev/retry=again")
    wait_status(cluster, namespace, "gate", lambda m: [h["outcome"] for h in m["status"]["history"]].count("Failed")
                == 2, message="second attempt failed")
    wait_until(lambda: [n[-3:] for n in names(cluster, "jobs", namespace)] == ["-a1"], 30,
               message="only the new attempt's Job left")
    assert [n[-3:] for n in names(cluster, "configmaps", namespace) if "-compress-" in n] == ["-a1"]
    assert events(cluster, namespace, "gate").count("Retrying") == 1
    assert replicas(cluster, namespace) == {"1.0.0": 4}


def test_a_model_on_a_volume_waits_for_its_claim_then_is_served_from_it(cluster: Cluster, operator: KopfRunner,
                                                                        namespace: str) -> None:
    cluster.apply(model("onpvc", "1.0.0", model={"uri": "pvc://models/digits/1.0.0"}), namespace)
    md = wait_status(cluster, namespace, "onpvc", lambda m: condition(m, "Stalled")[0] == "True",
                     message="Stalled without the claim")
    assert condition(md, "Stalled") == ("True", "ModelVolumeMissing")
    assert "PersistentVolumeClaim 'models' (spec.model.uri) does not exist" in md["status"]["message"]
    assert replicas(cluster, namespace) == {} and events(cluster, namespace, "onpvc") == ["ModelVolumeMissing"]
    create_artifacts_volume(cluster, namespace, name="models")
    wait_status(cluster, namespace, "onpvc", healthy("1.0.0"), message="served once the claim exists")
    pod = get_deployment(cluster, namespace, "onpvc-1-0-0")["spec"]["template"]["spec"]
    assert {"name": "model-source", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in \
        pod["volumes"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["SHIPYARD_ARTIFACT_PATH"] == "/model-source/digits/1.0.0"


def test_failing_metric_rolls_back_and_reapplying_the_same_manifest_does_not_restart(
        cluster: Cluster, operator: KopfRunner, namespace: str, prometheus: FakePrometheus) -> None:
    prometheus.answer = lambda q: 0.4 if 'version="1.1.0"' in q else 0.0
    spec = {"rollout": {"steps": [{"weight": 25, "pause": "30s"}], "analysis": analysis(prometheus.address)}}
    cluster.apply(model("bad", "1.0.0", **spec), namespace)
    wait_status(cluster, namespace, "bad", healthy("1.0.0"), message="1.0.0 healthy")
    cluster.apply(model("bad", "1.1.0", **spec), namespace)
    started = time.monotonic()
    md = wait_status(cluster, namespace, "bad", lambda m: m["status"].get("phase") == "RolledBack", 60,
                     message="RolledBack")
    elapsed = time.monotonic() - started
    assert condition(md, "Stalled") == ("True", "AnalysisFailed")
    assert condition(md, "Ready")[0] == "False"
    assert md["status"]["stableVersion"] == "1.0.0" and md["status"].get("candidateVersion") is None
    assert md["status"]["analysis"]["phase"] == "Failed"
    failing = md["status"]["analysis"]["metrics"][0]
    assert failing["verdict"] == "Failed" and failing["failures"] == 2 and failing["lastValue"] == 0.4
    assert 'version="1.1.0"' in failing["query"]
    assert md["status"]["history"][-1]["outcome"] == "RolledBack"
    wait_until(lambda: replicas(cluster, namespace) == {"1.0.0": 4, "1.1.0": 0}, 30, message="rolled back")
    assert elapsed < 30  # well before the 30 s pause could have promoted anything
    assert events(cluster, namespace, "bad").count("RolledBack") == 1
    # The operator's own metrics (in-process registry of the KopfRunner operator) counted it.
    exported = prometheus_client.generate_latest().decode()
    assert f'shipyard_operator_rollbacks_total{{name="bad",namespace="{namespace}"}} 1.0' in exported
    assert f'metric="error-rate",name="bad",namespace="{namespace}",verdict="Failed"}}' in exported
    assert 'shipyard_operator_reconcile_duration_seconds_count' in exported
    phase = f'shipyard_operator_modeldeployment_phase{{name="bad",namespace="{namespace}",'
    assert f'{phase}shipyard_operator_modeldeployment_phase="RolledBack"}} 1.0' in exported
    assert f'{phase}shipyard_operator_modeldeployment_phase="Progressing"}} 0.0' in exported

    # A GitOps tool re-applies the very same manifest: the failed version is not rolled out again.
    for _ in range(3):
        cluster.apply(model("bad", "1.1.0", **spec), namespace)
        time.sleep(1)
    md = get(cluster, namespace, "bad")
    assert md["status"]["phase"] == "RolledBack"
    assert replicas(cluster, namespace) == {"1.0.0": 4, "1.1.0": 0}
    assert events(cluster, namespace, "bad").count("RolloutStarted") == 1

    # Bumping spec.retry (a spec change) retries it; now healthy, it is promoted.
    prometheus.answer = lambda q: 0.0
    cluster.apply(model("bad", "1.1.0", retry=1, **{"rollout": {"steps": [{"weight": 25, "pause": "1s"}],
                                                                "analysis": analysis(prometheus.address)}}),
                  namespace)
    wait_status(cluster, namespace, "bad", healthy("1.1.0"), 60, message="retried and promoted")


def test_no_data_is_inconclusive_and_holds_without_flapping(
        cluster: Cluster, operator: KopfRunner, namespace: str, prometheus: FakePrometheus) -> None:
    prometheus.answer = lambda q: None if 'version="1.1.0"' in q else 0.0
    spec = {"rollout": {"steps": [{"weight": 50}], "analysis": analysis(prometheus.address)}}
    cluster.apply(model("quiet", "1.0.0", **spec), namespace)
    wait_status(cluster, namespace, "quiet", healthy("1.0.0"), message="1.0.0 healthy")
    cluster.apply(model("quiet", "1.1.0", **spec), namespace)
    md = wait_status(cluster, namespace, "quiet", lambda m: m["status"].get("pausedReason") == "AnalysisInconclusive",
                     message="Inconclusive")
    assert md["status"]["phase"] == "Paused"
    time.sleep(5)  # five more intervals without data
    md = get(cluster, namespace, "quiet")
    assert md["status"]["phase"] == "Paused" and md["status"]["analysis"]["phase"] == "Inconclusive"
    assert replicas(cluster, namespace) == {"1.0.0": 2, "1.1.0": 2}
    story = events(cluster, namespace, "quiet")
    assert "RolledBack" not in story and story.count("AnalysisInconclusive") == 1
    prometheus.answer = lambda q: 0.0  # traffic arrives
    wait_status(cluster, namespace, "quiet", healthy("1.1.0"), message="promoted after data came")


def test_manual_controls_promote_and_rollback_to(cluster: Cluster, operator: KopfRunner, namespace: str) -> None:
    spec = {"rollout": {"steps": [{"weight": 25, "manual": True}, {"weight": 50, "pause": "1h"}]}}
    cluster.apply(model("manual", "1.0.0", **spec), namespace)
    wait_status(cluster, namespace, "manual", healthy("1.0.0"), message="1.0.0 healthy")
    cluster.apply(model("manual", "1.1.0", **spec), namespace)
    wait_status(cluster, namespace, "manual", lambda m: m["status"].get("pausedReason") == "ManualStep",
                message="waiting at the manual step")
    cluster.kubectl("annotate", "-n", namespace, "md/manual", "shipyard.dev/promote=1.1.0")
    wait_status(cluster, namespace, "manual", healthy("1.1.0"), message="promoted by annotation")
    cluster.kubectl("annotate", "-n", namespace, "md/manual", "shipyard.dev/rollback-to=1.0.0")
    md = wait_status(cluster, namespace, "manual", lambda m: m["status"].get("stableVersion") == "1.0.0",
                     message="rolled back to 1.0.0")
    assert md["status"]["controls"] == {"promote": "1.1.0", "rollbackTo": "1.0.0"}
    wait_until(lambda: replicas(cluster, namespace) == {"1.0.0": 4, "1.1.0": 0}, 30, message="1.0.0 at full size")
    assert md["metadata"]["generation"] == 2  # the operator never wrote spec


def test_gpu_rollout_without_spare_gpus_replaces_in_place(cluster: Cluster, operator: KopfRunner,
                                                          namespace: str) -> None:
    """GPU pods land on the GPU node; with maxSurgeGPUs 0 the rollout never holds more GPU pods than replicas."""
    spec = {"serving": {"replicas": 4, "resources": {"limits": {"nvidia.com/gpu": 1}}},
            "rollout": {"steps": [{"weight": 50, "pause": "1s"}], "maxSurgeGPUs": 0}}
    cluster.apply({**model("gpu", "1.0.0"), "spec": {**model("gpu", "1.0.0")["spec"], **spec}}, namespace)
    wait_status(cluster, namespace, "gpu", healthy("1.0.0"), message="1.0.0 healthy")
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
    assert {p["spec"]["nodeName"] for p in pods} == {"kwok-gpu-0"}
    cluster.apply({**model("gpu", "1.1.0"), "spec": {**model("gpu", "1.1.0")["spec"], **spec}}, namespace)
    most = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = replicas(cluster, namespace)
        most = max(most, sum(r.values()))
        if healthy("1.1.0")(get(cluster, namespace, "gpu")) and r.get("1.0.0") == 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("not promoted")
    assert most <= 4


def shadow_spec(address: str) -> dict[str, Any]:
    """A shadow step first (25 %, 200 compared copies), then a weighted step; judged by predictionAgreement."""
    return {"model": {"path": "/models/digits", "output": {"kind": "classes"}},
            "rollout": {"steps": [{"shadow": {"percent": 25, "minRequests": 200}}, {"weight": 50}],
                        "analysis": analysis(address, metrics=[
                            {"name": "agreement", "builtin": "predictionAgreement", "min": 0.95}])}}


def shadow_settings(cluster: Cluster, namespace: str, name: str) -> str | None:
    config_map = cluster.get("configmap", f"{name}-shadow", namespace)
    return None if config_map is None else str((config_map.get("data") or {}).get("shadow.json", ""))


def test_a_shadow_step_copies_to_the_candidate_through_the_config_map_then_goes_on(
        cluster: Cluster, operator: KopfRunner, namespace: str, prometheus: FakePrometheus) -> None:
    compared = {"count": 50.0}

    def answer(query: str) -> float | None:
        if "shipyard_shadow_agreeing_rows_total" in query:
            return 0.99
        if 'outcome="compared"' in query:
            return compared["count"]
        return 0.0

    prometheus.answer = answer
    cluster.apply(model("shadowy", "1.0.0", **shadow_spec(prometheus.address)), namespace)
    wait_status(cluster, namespace, "shadowy", healthy("1.0.0"), message="1.0.0 healthy")
    assert shadow_settings(cluster, namespace, "shadowy") == ""  # the spec has a shadow step: kept, off
    pod = get_deployment(cluster, namespace, "shadowy-1-0-0")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "shadow-config")
    assert volume["configMap"]["name"] == "shadowy-shadow" and volume["configMap"]["optional"] is True

    cluster.apply(model("shadowy", "1.1.0", **shadow_spec(prometheus.address)), namespace)
    md = wait_status(cluster, namespace, "shadowy", lambda m: bool((m.get("status") or {}).get("shadow", {}).get(
        "compared")), message="shadowing, copies counted")
    assert json.loads(shadow_settings(cluster, namespace, "shadowy") or "{}") == {
        "url": f"http://shadowy-1-1-0.{namespace}.svc:8080", "version": "1.1.0", "percent": 25, "compare": "top1",
        "tolerance": 0.0}
    assert md["status"]["shadow"]["candidate"] == "1.1.0" and md["status"]["shadow"]["compared"] == 50
    assert replicas(cluster, namespace) == {"1.0.0": 4, "1.1.0": 1}
    service = cluster.get("service", "shadowy", namespace)
    assert service is not None and service["spec"]["selector"]["shipyard.dev/version"] == "1.0.0"
    assert "shadowy-1-1-0" in names(cluster, "services", namespace)
    md = wait_status(cluster, namespace, "shadowy", lambda m: m["status"].get("analysis", {}).get("phase")
                     == "Successful", message="analysis passed")
    assert md["status"]["currentStepIndex"] == 0 and "50/200 compared copies" in md["status"]["message"]

    compared["count"] = 500.0
    wait_status(cluster, namespace, "shadowy", healthy("1.1.0"), 60, message="shadow step done, then promoted")
    assert shadow_settings(cluster, namespace, "shadowy") == ""
    assert "StepCompleted" in events(cluster, namespace, "shadowy")


def test_a_disagreeing_candidate_is_rolled_back_during_its_shadow_step(
        cluster: Cluster, operator: KopfRunner, namespace: str, prometheus: FakePrometheus) -> None:
    prometheus.answer = lambda q: 0.5 if "shipyard_shadow_agreeing_rows_total" in q else 10.0
    cluster.apply(model("shady", "1.0.0", **shadow_spec(prometheus.address)), namespace)
    wait_status(cluster, namespace, "shady", healthy("1.0.0"), message="1.0.0 healthy")
    cluster.apply(model("shady", "1.1.0", **shadow_spec(prometheus.address)), namespace)
    md = wait_status(cluster, namespace, "shady", lambda m: m["status"].get("phase") == "RolledBack", 60,
                     message="RolledBack")
    assert condition(md, "Stalled") == ("True", "AnalysisFailed") and md["status"].get("shadow") is None
    wait_until(lambda: shadow_settings(cluster, namespace, "shady") == "", 30, message="shadowing off")
    wait_until(lambda: replicas(cluster, namespace) == {"1.0.0": 4, "1.1.0": 0}, 30, message="rolled back")


def test_gateway_api_faults_stall_the_rollout_naming_the_cause_then_weights_are_written(
        cluster: Cluster, operator: KopfRunner, namespace: str) -> None:
    """spec.rollout.traffic gatewayAPI on the real API server, each fault in turn: the Gateway API not installed
    (the API server answers a plain-text 404), the route missing, not accepted by any controller, its Gateway not
    programmed; then a programmed Gateway: the weight lands in the route's rule (spec.rules only, by Shipyard's field
    manager) and the rollout completes."""
    from tests import stack

    gateway = stack.load_hack_module("gateway")
    spec = {"rollout": {"steps": [{"weight": 5, "manual": True}],
                        "traffic": {"gatewayAPI": {"httpRoute": "web"}}}}

    def stalled(reason: str) -> Callable[[dict[str, Any]], bool]:
        return lambda md: condition(md, "Stalled") == ("True", reason)

    crds_before = gateway.crd_status(cluster.kubeconfig)
    assert not any(crds_before.values()), "this test starts without the Gateway API"
    cluster.apply(model("routed", "1.0.0", **spec), namespace)
    wait_status(cluster, namespace, "routed", healthy("1.0.0"), message="1.0.0 healthy (no rollout yet)")
    cluster.apply(model("routed", "1.1.0", **spec), namespace)
    md = wait_status(cluster, namespace, "routed", stalled("GatewayAPINotInstalled"), message="not installed")
    assert "httproutes.gateway.networking.k8s.io is not served" in md["status"]["message"]
    assert replicas(cluster, namespace) == {"1.0.0": 4}  # nothing moved
    try:
        gateway.install_crds(cluster.kubeconfig)
        md = wait_status(cluster, namespace, "routed", stalled("RouteNotFound"), 30, message="route missing")
        assert "HTTPRoute 'web' (spec.rollout.traffic.gatewayAPI.httpRoute) does not exist" in md["status"]["message"]
        route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "web"},
                 "spec": {"parentRefs": [{"name": "edge"}], "hostnames": ["web.example"],
                          "rules": [{"backendRefs": [{"name": "routed", "port": 8080}]},
                                    {"matches": [{"path": {"type": "PathPrefix", "value": "/docs"}}],
                                     "backendRefs": [{"name": "docs", "port": 80}]}]}}
        cluster.apply(route, namespace)
        md = wait_status(cluster, namespace, "routed", stalled("RouteNotAttached"), 30, message="not attached")
        assert "no status from a Gateway controller yet" in md["status"]["message"]
        cluster.apply({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": {"name": "edge"},
                       "spec": {"gatewayClassName": "none", "listeners": [{"name": "http", "port": 80,
                                                                           "protocol": "HTTP"}]}}, namespace)
        generation = json.loads(cluster.kubectl("get", "httproute", "web", "-n", namespace, "-o", "json").stdout)[
            "metadata"]["generation"]

        def route_status(gen: int) -> str:
            return json.dumps({"status": {"parents": [{
                "parentRef": {"name": "edge"}, "controllerName": "example.com/test",
                "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                                "observedGeneration": gen, "lastTransitionTime": "2026-12-03T00:00:00Z"}]}]}})

        cluster.kubectl("patch", "httproute", "web", "-n", namespace, "--subresource=status", "--type=merge",
                        "-p", route_status(generation))
        md = wait_status(cluster, namespace, "routed", stalled("GatewayNotProgrammed"), 30, message="not programmed")
        assert "Gateway 'edge'" in md["status"]["message"] and "not programmed" in md["status"]["message"]
        cluster.kubectl("patch", "gateway", "edge", "-n", namespace, "--subresource=status", "--type=merge", "-p",
                        json.dumps({"status": {"conditions": [{
                            "type": "Programmed", "status": "True", "reason": "Programmed", "message": "",
                            "observedGeneration": 1, "lastTransitionTime": "2026-12-03T00:00:00Z"}]}}))

        def weighted(_: dict[str, Any]) -> bool:  # the fake controller acts on every generation Shipyard writes
            body = json.loads(cluster.kubectl("get", "httproute", "web", "-n", namespace, "-o", "json").stdout)
            gen = body["metadata"]["generation"]
            if body["status"]["parents"][0]["conditions"][0]["observedGeneration"] != gen:
                cluster.kubectl("patch", "httproute", "web", "-n", namespace, "--subresource=status",
                                "--type=merge", "-p", route_status(gen))
            refs = [(b["name"], b.get("weight")) for b in body["spec"]["rules"][0]["backendRefs"]]
            return refs == [("routed", 95), ("routed-1-1-0", 5)]

        wait_status(cluster, namespace, "routed", weighted, 60, message="5% in the route")
        body = json.loads(cluster.kubectl("get", "httproute", "web", "-n", namespace, "-o", "json",
                                          "--show-managed-fields").stdout)
        assert body["spec"]["hostnames"] == ["web.example"] and body["spec"]["rules"][1]["backendRefs"][0][
            "name"] == "docs"  # the rest of the route as it was
        assert [r.get("name") for r in body["spec"]["rules"]] == [None, None, "shipyard-preview"]
        owners = {m["manager"]: m for m in body["metadata"]["managedFields"]}
        owned = json.dumps(owners["shipyard-operator"]["fieldsV1"])
        assert "f:rules" in owned and "f:parentRefs" not in owned and "f:hostnames" not in owned  # spec.rules only
        md = get(cluster, namespace, "routed")
        assert md["status"]["traffic"]["canaryWeight"] == 5 and replicas(cluster, namespace) == {"1.0.0": 4,
                                                                                                  "1.1.0": 1}
        cluster.kubectl("annotate", "-n", namespace, "md/routed", "shipyard.dev/promote=1.1.0")

        def promoted(md: dict[str, Any]) -> bool:
            weighted(md)
            return healthy("1.1.0")(md)

        wait_status(cluster, namespace, "routed", promoted, 60, message="promoted")
        rules = json.loads(cluster.kubectl("get", "httproute", "web", "-n", namespace, "-o", "json").stdout)[
            "spec"]["rules"]
        # back to the rule as written: the model's Service alone, no weight written (the API server's default: 1)
        assert [(b["name"], b.get("weight")) for b in rules[0]["backendRefs"]] == [("routed", 1)]
        assert len(rules) == 2
    finally:
        cluster.kubectl("delete", "md", "routed", "-n", namespace, "--wait=false", check=False)
        gateway.uninstall_crds(cluster.kubeconfig)
