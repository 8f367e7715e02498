"""spec.serving.autoscaling: the scaler objects (pure builders), what their status says, and the planner around them
(tests/plansim.py): the split between versions follows the replicas a scaler writes, the scaler object is written
once (never as load changes), and a scaler that cannot exist here stalls with the fixed replicas still served."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from shipyard.operator import autoscaling, naming
from shipyard.operator import spec as spec_mod
from tests.plansim import IMAGE, STEPS, Sim, md

PROMETHEUS = "http://127.0.0.1:9090"


def auto(**fields: Any) -> autoscaling.Autoscaling:
    return autoscaling.Autoscaling.model_validate({"maxReplicas": 10, "target": 4, **fields})


@pytest.mark.parametrize(("replicas", "bounds", "expected"), [
    pytest.param(3, None, 3, id="no-autoscaling"),
    pytest.param(1, {"minReplicas": 2}, 2, id="default-below-min-raised"),
    pytest.param(30, {}, 10, id="above-max-lowered"),
    pytest.param(0, {"minReplicas": 0}, 0, id="scaled-to-zero"),
    pytest.param(5, {}, 5, id="within"),
])
def test_replicas_within_bounds(replicas: int, bounds: dict[str, Any] | None, expected: int) -> None:
    assert autoscaling.plan_replicas(replicas, None if bounds is None else auto(**bounds)) == expected


@pytest.mark.parametrize(("metric", "expected"), [
    pytest.param("inflightRequests", 'sum(shipyard_inflight_requests{namespace="ml",model="digits"})', id="inflight"),
    pytest.param("queueDepth", 'sum(shipyard_queue_depth{namespace="ml",model="digits"})', id="queue"),
    pytest.param("requestRate", 'sum(rate(shipyard_requests_total{namespace="ml",model="digits"}[60s]))', id="rate"),
    pytest.param("gpuUtilization", '100 * sum(shipyard_gpu_utilization_ratio{namespace="ml",model="digits"})',
                 id="gpu"),
    pytest.param("cpu", '100 * sum(rate(shipyard_cpu_seconds_total{namespace="ml",model="digits"}[60s])) / 0.5',
                 id="cpu-percent-of-the-request"),
])
def test_queries_sum_the_models_pods(metric: autoscaling.ScalingMetric, expected: str) -> None:
    assert autoscaling.build_query(metric, "ml", "digits", 0.5) == expected


def test_the_cpu_query_needs_a_request() -> None:
    with pytest.raises(ValueError, match="CPU request"):
        autoscaling.build_query("cpu", "ml", "digits", None)


def test_scaled_object_targets_the_model_deployment_and_holds_on_missing_data() -> None:
    behavior = {"scaleDown": {"stabilizationWindowSeconds": 60, "policies": [{"type": "Pods", "value": 1}]}}
    obj = autoscaling.build_scaled_object({"name": "digits"}, "digits", auto(minReplicas=0, behavior=behavior),
                                          "sum(x)", PROMETHEUS)
    spec = obj["spec"]
    assert "initialCooldownPeriod" not in spec
    assert obj["apiVersion"] == "keda.sh/v1alpha1" and obj["kind"] == "ScaledObject"
    assert spec["scaleTargetRef"] == {"apiVersion": "shipyard.dev/v1alpha1", "kind": "ModelDeployment",
                                      "name": "digits"}
    # minReplicas 0 without an activation query: nothing could wake the model, so KEDA keeps one pod
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 10)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"] == {"serverAddress": PROMETHEUS, "query": "sum(x)", "threshold": "4",
                                   "activationThreshold": "0", "ignoreNullValues": "false"}
    assert spec["fallback"] == {"failureThreshold": 3, "replicas": 1, "behavior": "currentReplicas"}
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == {
        "scaleDown": {"stabilizationWindowSeconds": 60, "policies": [{"type": "Pods", "value": 1,
                                                                      "periodSeconds": 60}]}}


@pytest.mark.parametrize(("metric", "threshold"), [
    pytest.param("inflightRequests", "4", id="held-requests-are-in-flight-requests"),
    pytest.param("queueDepth", "4", id="queue"),
    pytest.param("requestRate", "1e+06", id="rate-only-activates"),
    pytest.param("cpu", "1e+06", id="cpu-only-activates"),
])
def test_scale_to_zero_adds_the_activators_trigger(metric: autoscaling.ScalingMetric, threshold: str) -> None:
    query = autoscaling.build_activation_query("ml", 'dig"its')
    assert query == 'sum(shipyard_activator_pending_requests{namespace="ml",model="dig\\"its"})'
    obj = autoscaling.build_scaled_object({"name": "digits"}, "digits", auto(minReplicas=0, metric=metric), "sum(x)",
                                          PROMETHEUS, query)
    spec = obj["spec"]
    assert spec["minReplicaCount"] == 0
    assert spec["initialCooldownPeriod"] == 300  # a new model is not put to sleep the moment it is Ready
    first, activation = spec["triggers"]
    assert first["metadata"]["query"] == "sum(x)"
    assert activation["name"] == "activator" and activation["type"] == "prometheus"
    assert activation["metadata"] == {"serverAddress": PROMETHEUS, "query": query, "threshold": threshold,
                                      "activationThreshold": "0", "ignoreNullValues": "false"}


@pytest.mark.parametrize(("conditions", "at_zero", "expected"), [
    pytest.param([{"type": "Ready", "status": "True"}], True, (True, "ScaledToZero"), id="at-zero"),
    pytest.param([{"type": "Ready", "status": "True"}, {"type": "Fallback", "status": "True", "message": "m"}],
                 True, (False, "MetricUnavailable"), id="failing-metrics-at-zero-say-so"),
    pytest.param([{"type": "Ready", "status": "False", "message": "bad query"}], True,
                 (False, "ScalerNotReady"), id="a-broken-scaler-at-zero-says-so"),
])
def test_a_scaled_object_at_zero(conditions: list[dict[str, str]], at_zero: bool,
                                 expected: tuple[bool, str]) -> None:
    ok, reason, _ = autoscaling.assess_scaler("ScaledObject", conditions, at_zero=at_zero)
    assert (ok, reason) == expected


@pytest.mark.parametrize(("metric", "expected"), [
    pytest.param("cpu", {"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}, id="cpu-resource"),
    pytest.param("inflightRequests", {"type": "Pods", "pods": {
        "metric": {"name": "shipyard_inflight_requests"}, "target": {"type": "AverageValue", "averageValue": "70"}}},
        id="pods-metric"),
])
def test_hpa(metric: autoscaling.ScalingMetric, expected: dict[str, Any]) -> None:
    obj = autoscaling.build_hpa({"name": "digits"}, "digits", auto(provider="hpa", metric=metric, target=70))
    assert obj["kind"] == "HorizontalPodAutoscaler" and obj["spec"]["metrics"] == [expected]
    assert obj["spec"]["scaleTargetRef"]["kind"] == "ModelDeployment" and obj["spec"]["minReplicas"] == 1


def cond(type_: str, status: str, message: str = "") -> dict[str, str]:
    return {"type": type_, "status": status, "message": message}


@pytest.mark.parametrize(("kind", "conditions", "expected"), [
    pytest.param("ScaledObject", [], (None, "ScalerPending"), id="keda-no-verdict"),
    pytest.param("ScaledObject", [cond("Ready", "True"), cond("Active", "True")], (True, "ScalerReady"),
                 id="keda-ready"),
    pytest.param("ScaledObject", [cond("Ready", "False", "error querying prometheus")], (False, "ScalerNotReady"),
                 id="keda-not-ready"),
    pytest.param("ScaledObject", [cond("Ready", "True"), cond("Fallback", "True", "fallback in progress")],
                 (False, "MetricUnavailable"), id="keda-fallback-holds"),
    pytest.param("HorizontalPodAutoscaler", [cond("AbleToScale", "True"), cond("ScalingActive", "True")],
                 (True, "ScalerReady"), id="hpa-active"),
    pytest.param("HorizontalPodAutoscaler", [cond("AbleToScale", "True"), cond("ScalingActive", "False", "no metrics")],
                 (False, "MetricUnavailable"), id="hpa-no-metrics"),
    pytest.param("HorizontalPodAutoscaler", [], (None, "ScalerPending"), id="hpa-new"),
])
def test_scaler_status(kind: str, conditions: list[dict[str, str]], expected: tuple[bool | None, str]) -> None:
    ok, reason, _ = autoscaling.assess_scaler(kind, conditions)
    assert (ok, reason) == expected


@pytest.mark.parametrize(("fields", "problem"), [
    pytest.param({"minReplicas": 5, "maxReplicas": 2}, "must not exceed maxReplicas", id="min-above-max"),
    pytest.param({"target": 0}, "greater than 0", id="zero-target"),
    pytest.param({"target": -1}, "greater than 0", id="negative-target"),
])
def test_bad_bounds_are_refused(fields: dict[str, Any], problem: str) -> None:
    with pytest.raises(Exception, match=problem):
        auto(**fields)


# --- the planner ----------------------------------------------------------------------------------------------------


def scaled(replicas: int = 4, **fields: Any) -> Sim:
    sim = Sim(md("1.0.0", replicas=replicas, serving={"replicas": replicas, "autoscaling": {
        "minReplicas": 1, "maxReplicas": 12, "target": 4, **fields}}, rollout={"steps": STEPS}))
    sim.keda, sim.prometheus_address = True, PROMETHEUS
    return sim.settle()


def set_replicas(sim: Sim, replicas: int) -> None:
    """What a scaler does through the scale subresource."""
    sim.body["spec"]["serving"]["replicas"] = replicas
    sim.body["metadata"]["generation"] += 1


def test_the_scaler_is_written_once_and_never_as_replicas_change() -> None:
    sim = scaled()
    assert sim.scaler_writes == 1 and sim.scalers["digits"].kind == "ScaledObject"
    assert sim.status["autoscaling"]["scaler"] == "ScaledObject/digits"
    for replicas in (7, 3, 9):
        set_replicas(sim, replicas)
        sim.settle()
        assert sim.replicas() == {"1.0.0": replicas}
    assert sim.scaler_writes == 1
    assert sim.status["replicas"]["desired"] == 9 and sim.status["replicas"]["current"] == 9
    assert sim.status["selector"] == "shipyard.dev/model=digits,shipyard.dev/component=serving"


def test_a_scale_up_mid_canary_grows_both_versions_by_the_steps_weight() -> None:
    sim = scaled(4)
    sim.set_spec(image=f"{IMAGE}:1.1.0")
    sim.run(lambda s: s.status.get("stepReadyAt") is not None)  # step 1: 25%
    assert sim.replicas() == {"1.0.0": 3, "1.1.0": 1}
    set_replicas(sim, 8)
    sim.run(lambda s: s.replicas() == {"1.0.0": 6, "1.1.0": 2})
    assert sim.status["candidateVersion"] == "1.1.0" and sim.status["currentStepIndex"] == 0
    sim.settle()
    assert sim.replicas()["1.1.0"] == 8 and sim.status["stableVersion"] == "1.1.0"


@pytest.mark.parametrize(("keda", "prometheus", "missing"), [
    pytest.param(False, PROMETHEUS, "KEDA's ScaledObject", id="keda-not-installed"),
    pytest.param(True, None, "--prometheus-address", id="no-prometheus"),
])
def test_a_scaler_that_cannot_exist_stalls_and_the_fixed_replicas_keep_serving(
        keda: bool, prometheus: str | None, missing: str) -> None:
    sim = Sim(md("1.0.0", serving={"replicas": 3, "autoscaling": {"maxReplicas": 6, "target": 4}}))
    sim.keda, sim.prometheus_address = keda, prometheus
    sim.settle()
    assert sim.replicas() == {"1.0.0": 3} and sim.status["stableVersion"] == "1.0.0" and not sim.scalers
    assert sim.condition("Stalled") == ("True", "ScalerUnavailable")
    autoscaling_condition = next(c for c in sim.status["conditions"] if c["type"] == "Autoscaling")
    assert autoscaling_condition["status"] == "False" and missing in autoscaling_condition["message"]
    assert missing in sim.status["message"]


def test_hpa_provider_needs_no_keda_and_removing_autoscaling_deletes_the_scaler() -> None:
    sim = Sim(md("1.0.0", serving={"replicas": 2, "autoscaling": {"provider": "hpa", "maxReplicas": 6,
                                                                 "target": 4}}))
    sim.settle()
    assert sim.scalers["digits"].kind == "HorizontalPodAutoscaler" and sim.replicas() == {"1.0.0": 2}
    del sim.body["spec"]["serving"]["autoscaling"]
    sim.body["metadata"]["generation"] += 1
    sim.settle()
    assert not sim.scalers and "autoscaling" not in sim.status
    assert not any(c["type"] == "Autoscaling" for c in sim.status["conditions"])


def test_scaled_to_zero_and_back_without_an_activator_keeps_one_replica_in_the_scaler() -> None:
    sim = scaled(2, minReplicas=0)  # no --activator-image
    assert sim.activator is None
    assert sim.condition("Autoscaling") == ("False", "ActivatorUnavailable")
    set_replicas(sim, 0)  # kubectl scale --replicas 0 still works: the user's choice
    sim.settle()
    assert sim.replicas() == {"1.0.0": 0} and sim.status["phase"] == "Healthy"
    assert sim.selectors["digits"].get("shipyard.dev/component") == "serving"
    set_replicas(sim, 1)
    sim.settle()
    assert sim.replicas() == {"1.0.0": 1}


def with_activator(replicas: int = 2, **fields: Any) -> Sim:
    sim = Sim(md("1.0.0", replicas=replicas, serving={"replicas": replicas, "autoscaling": {
        "minReplicas": 0, "maxReplicas": 4, "target": 4, **fields}}, rollout={"steps": STEPS}))
    sim.keda, sim.prometheus_address, sim.activator_image = True, PROMETHEUS, "registry.example/shipyard/operator:1"
    return sim.settle()


def test_scale_to_zero_routes_to_the_activator_before_the_last_pod_goes_and_back_once_one_is_ready() -> None:
    sim = with_activator()
    assert sim.activator is not None and sim.activator.name == "digits-activator"
    scaled_object = next(o for p in sim.plans for o in p.apply if o["kind"] == "ScaledObject")
    assert [t.get("name") for t in scaled_object["spec"]["triggers"]] == [None, "activator"]
    assert scaled_object["spec"]["minReplicaCount"] == 0
    assert sim.selectors["digits"]["shipyard.dev/version"] == "1.0.0"
    assert sim.status["autoscaling"]["routesToActivator"] is False
    set_replicas(sim, 0)
    first = sim.step()
    # traffic first: the Service leaves the pods in this pass, the pods go in the next
    assert [o["kind"] for o in first.apply] == ["Service"] and not first.scale
    assert sim.selectors["digits"] == {"shipyard.dev/model": "digits", "shipyard.dev/component": "activator"}
    assert sim.replicas() == {"1.0.0": 2}
    sim.settle()
    assert sim.replicas() == {"1.0.0": 0} and sim.status["autoscaling"]["routesToActivator"] is True
    assert sim.status["phase"] == "Healthy"
    # KEDA wakes the model: the Service stays on the activator until a pod is Ready
    sim.frozen.add("1.0.0")
    set_replicas(sim, 1)
    sim.step()
    assert sim.replicas() == {"1.0.0": 1} and sim.deployments["1.0.0"].ready_replicas == 0
    assert sim.selectors["digits"]["shipyard.dev/component"] == "activator"
    sim.frozen.discard("1.0.0")
    sim.deployments["1.0.0"] = sim._ready("1.0.0", 1)
    sim.settle()
    assert sim.selectors["digits"]["shipyard.dev/version"] == "1.0.0"
    assert sim.status["autoscaling"]["routesToActivator"] is False


def test_the_activator_goes_with_scale_to_zero() -> None:
    sim = with_activator()
    sim.body["spec"]["serving"]["autoscaling"]["minReplicas"] = 1
    sim.body["metadata"]["generation"] += 1
    sim.settle()
    assert sim.activator is None and "activator" not in sim.status["autoscaling"]
    scaled_object = next(o for p in reversed(sim.plans) for o in p.apply if o["kind"] == "ScaledObject")
    assert len(scaled_object["spec"]["triggers"]) == 1


def test_a_server_without_an_http_readiness_path_cannot_use_the_activator() -> None:
    sim = Sim(md("1.0.0", replicas=1, serving={"replicas": 1, "grpc": {"http": False}, "autoscaling": {
        "minReplicas": 0, "maxReplicas": 4, "target": 4}}))
    sim.keda, sim.prometheus_address, sim.activator_image = True, PROMETHEUS, "registry.example/shipyard/operator:1"
    sim.settle()
    assert sim.activator is None
    status, reason = sim.condition("Autoscaling")
    assert (status, reason) == ("False", "ActivatorUnavailable")
    message = next(c for c in sim.status["conditions"] if c["type"] == "Autoscaling")["message"]
    assert "HTTP readiness path" in message


def test_the_activators_pod() -> None:
    sim = with_activator()
    dep = next(o for p in sim.plans for o in p.apply if o["kind"] == "Deployment" and
               o["metadata"]["name"] == "digits-activator")
    pod = dep["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["command"] == ["shipyard-activator"]
    assert container["image"] == "registry.example/shipyard/operator:1"
    assert env["SHIPYARD_ACTIVATOR_UPSTREAM"] == "http://digits.ml.svc:8080"
    assert env["SHIPYARD_ACTIVATOR_READY_PATH"] == "/v2/health/ready" and env["SHIPYARD_ACTIVATOR_MODEL"] == "digits"
    assert {p["name"] for p in container["ports"]} == {"http", "metrics"}
    assert pod["metadata"]["annotations"]["shipyard.dev/port"] == "9091"  # never scraped at its serving port
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert "shipyard.dev/version" not in pod["metadata"]["labels"]


def test_the_spec_parser_reads_autoscaling() -> None:
    parsed = spec_mod.parse_model_deployment(md("1.0.0", serving={"replicas": 1, "autoscaling": {
        "minReplicas": 2, "maxReplicas": 5, "metric": "requestRate", "target": 20}}))
    assert parsed.spec.serving.effective_replicas == 2
    assert naming.build_selector_labels("digits") == {"shipyard.dev/model": "digits",
                                                      "shipyard.dev/component": "serving"}


def test_a_new_version_at_zero_waits_for_the_model_to_wake_then_rolls_out_as_a_canary() -> None:
    sim = with_activator()
    set_replicas(sim, 0)
    sim.settle()
    sim.set_spec(image=f"{IMAGE}:1.1.0")
    sim.settle()
    # no pod of either version ran: nothing could have judged the candidate, so nothing is promoted
    assert sim.replicas() == {"1.0.0": 0} and sim.status["stableVersion"] == "1.0.0"
    assert sim.status["phase"] == "Paused" and sim.status["pausedReason"] == "ScaledToZero"
    assert sim.selectors["digits"]["shipyard.dev/component"] == "activator"  # a request still wakes the model
    assert "ScaledToZero" in sim.reasons()
    set_replicas(sim, 4)  # KEDA wakes it
    sim.run(lambda s: s.replicas().get("1.1.0") == 1 and s.replicas().get("1.0.0") == 3)  # 25%: a real canary
    assert sim.status["candidateVersion"] == "1.1.0" and sim.status["phase"] == "Progressing"
    sim.settle()
    assert sim.status["stableVersion"] == "1.1.0" and sim.replicas()["1.1.0"] == 4


def test_scaled_to_zero_mid_canary_holds_the_step_and_starts_it_over_on_waking() -> None:
    sim = with_activator(4)
    sim.set_spec(image=f"{IMAGE}:1.1.0")
    sim.run(lambda s: s.status.get("stepReadyAt") is not None)
    set_replicas(sim, 0)
    sim.settle()
    assert sim.replicas() == {"1.0.0": 0, "1.1.0": 0} and sim.status["candidateVersion"] == "1.1.0"
    assert sim.status["pausedReason"] == "ScaledToZero" and sim.status["currentStepIndex"] == 0
    assert sim.selectors["digits"]["shipyard.dev/component"] == "activator"
    set_replicas(sim, 4)
    sim.run(lambda s: s.replicas() == {"1.0.0": 3, "1.1.0": 1} and s.status.get("stepReadyAt") is not None)
    assert sim.status["phase"] == "Progressing" and sim.status.get("pausedReason") is None
    # the Service left the activator once pods of the versions it selects were Ready
    assert sim.selectors["digits"]["shipyard.dev/component"] == "serving"
    sim.settle()
    assert sim.status["stableVersion"] == "1.1.0"


@pytest.mark.parametrize(("series", "expected"), [
    pytest.param({'shipyard_activator_pending_requests{namespace="ml",model="digits"}': "0 0 0"}, [0.0],
                 id="at-zero-the-activator-reports-so-the-pods-metric-reads-0"),
    pytest.param({'shipyard_activator_pending_requests{namespace="ml",model="digits"}': "0 0 0",
                  'shipyard_inflight_requests{namespace="ml",model="digits",pod="a"}': "3 3 3",
                  'shipyard_inflight_requests{namespace="ml",model="digits",pod="b"}': "4 4 4"}, [7.0],
                 id="pods-up-their-sum"),
    pytest.param({'shipyard_inflight_requests{namespace="ml",model="digits",pod="a"}': "2 2 2"}, [2.0],
                 id="the-activator-not-scraped-pods-up"),
    pytest.param({'shipyard_inflight_requests{namespace="other",model="digits",pod="a"}': "2 2 2"}, [],
                 id="neither-series-is-missing-data-an-error-for-keda"),
])
def test_the_query_of_a_model_that_scales_to_zero_under_promtool(
        tmp_path: Path, series: dict[str, str], expected: list[float]) -> None:
    """The PromQL itself, evaluated by Prometheus' own engine (promtool test rules, Debian's prometheus package)."""
    query = autoscaling.build_query_with_activator(autoscaling.build_query("inflightRequests", "ml", "digits"),
                                                   autoscaling.build_activation_query("ml", "digits"))
    test = {"tests": [{"interval": "1m",
                       "input_series": [{"series": s, "values": v} for s, v in series.items()],
                       "promql_expr_test": [{"expr": query, "eval_time": "2m",
                                             "exp_samples": [{"labels": "{}", "value": v} for v in expected]}]}]}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(test))
    promtool = shutil.which("promtool")
    assert promtool, "promtool is needed (apt-get install prometheus)"
    out = subprocess.run([promtool, "test", "rules", "test.yaml"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_scale_of_the_stable_never_sends_its_traffic_to_the_activator() -> None:
    sim = with_activator()
    sim.lagging.add("1.0.0")  # its Deployment controller catches up with each scale one pass late
    for replicas in (3, 1, 4):
        set_replicas(sim, replicas)
        for _ in range(4):
            sim.step()
            assert sim.selectors["digits"].get("shipyard.dev/component") == "serving", (replicas, sim.selectors)
    sim.settle()
    assert sim.replicas() == {"1.0.0": 4} and sim.status["autoscaling"]["routesToActivator"] is False
