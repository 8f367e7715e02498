"""KEDA in the local stack (hack/keda.py), checked on a control plane of its own: the aggregated external metrics API
answers through the kube-apiserver, and a ScaledObject with a Prometheus trigger makes KEDA create an HPA that the
controller-manager's HPA controller follows: the target's replicas change when the query's number changes.

The Prometheus server is a stand-in on 127.0.0.1 that answers /api/v1/query with a number the test sets (the
trigger's query text is checked, the number is not computed from series). The scale target is a Deployment whose
pods KWOK makes Ready (no node agent: nothing here needs a real pod process). ``make test`` builds KEDA
(``hack/build-binaries.sh keda``; long cold), and the fixture builds it where it is missing. Timings are printed
(``-s``) and kept in the fixture's state.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import stack
from tests.integration.conftest import Cluster, wait_until
from tests.integration.test_operator_rollout import FakePrometheus  # answers /api/v1/query, records queries

pytestmark = [pytest.mark.harness, pytest.mark.timeout(900)]

NAMESPACE = "autoscale"
QUERY = "sum(shipyard_test_load)"
THRESHOLD = 10


@dataclass
class Keda:
    cluster: Cluster
    state: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def keda() -> Iterator[Keda]:
    keda_mod = stack.load_hack_module("keda")
    cluster_mod = stack.load_hack_module("cluster")
    base = Path(tempfile.mkdtemp(prefix="shipyard-keda-"))
    mark = time.monotonic()
    state = cluster_mod.up(base / "cluster")
    timings = {"cluster_up": time.monotonic() - mark}
    ok = False
    try:
        keda_state = keda_mod.start(base / "keda", state.kubeconfig)
        timings.update({f"keda_{k}": v for k, v in keda_state["timings"].items()})
        yield Keda(cluster=Cluster(kubeconfig=str(state.kubeconfig)), state=keda_state, timings=timings)
        ok = True
    finally:
        keda_mod.stop(base / "keda")
        cluster_mod.down(base / "cluster")
        print(f"\n[keda] timings (s): {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
        if ok:
            shutil.rmtree(base, ignore_errors=True)


def test_external_metrics_api_answers_through_the_aggregator(keda: Keda) -> None:
    out = keda.cluster.kubectl("get", "--raw", "/apis/external.metrics.k8s.io/v1beta1")
    assert json.loads(out.stdout)["groupVersion"] == "external.metrics.k8s.io/v1beta1"
    service = keda.cluster.get("apiservice", "v1beta1.external.metrics.k8s.io")
    assert service is not None
    available = [c for c in service["status"]["conditions"] if c["type"] == "Available"]
    assert available and available[0]["status"] == "True", service["status"]


def build_deployment(name: str) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"containers": [{"name": "app", "image": "shipyard.local/none:1"}]}}},
    }


def build_scaled_object(name: str, target: str, server: str) -> dict[str, Any]:
    """Scale at once both ways (no stabilization window: the HPA's default 300 s scale-down window would hold the
    second step), at least one replica (so the HPA, not KEDA's own scale-to-zero, moves every step)."""
    instant = {"stabilizationWindowSeconds": 0, "policies": [{"type": "Percent", "value": 1000, "periodSeconds": 1}]}
    return {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "scaleTargetRef": {"name": target}, "minReplicaCount": 1, "maxReplicaCount": 10, "pollingInterval": 5,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {"scaleUp": instant, "scaleDown": instant}}},
            "triggers": [{"type": "prometheus", "metadata": {
                "serverAddress": server, "query": QUERY, "threshold": str(THRESHOLD)}}],
        },
    }


def replicas(cluster: Cluster, name: str) -> int:
    deployment = cluster.get("deployment", name, NAMESPACE)
    assert deployment is not None
    return int(deployment["spec"]["replicas"])


def test_scaled_object_moves_replicas_through_the_hpa(keda: Keda) -> None:
    cluster = keda.cluster
    prometheus = FakePrometheus()
    try:
        prometheus.answer = lambda query: 35.0  # -> ceil(35 / 10) = 4 replicas
        cluster.kubectl("create", "namespace", NAMESPACE)
        cluster.kubectl("apply", "-f", "-", input=json.dumps(build_deployment("model")))
        mark = time.monotonic()
        cluster.kubectl("apply", "-f", "-", input=json.dumps(build_scaled_object("model", "model", prometheus.address)))

        hpa: dict[str, Any] | None = None

        def hpa_created() -> bool:
            nonlocal hpa
            hpa = cluster.get("hpa", "keda-hpa-model", NAMESPACE)
            return hpa is not None

        wait_until(hpa_created, 60, message="KEDA created the HPA")
        keda.timings["hpa_created"] = time.monotonic() - mark
        assert hpa is not None
        [metric] = hpa["spec"]["metrics"]
        assert metric["type"] == "External"
        assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": str(THRESHOLD)}
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "model"}

        # The adapter serves the number the stand-in answers (adapter -> operator gRPC -> Prometheus scaler).
        name = metric["external"]["metric"]["name"]
        selector = "scaledobject.keda.sh/name=model"
        raw = cluster.kubectl("get", "--raw", f"/apis/external.metrics.k8s.io/v1beta1/namespaces/{NAMESPACE}/"
                                              f"{name}?labelSelector={selector}")
        assert [i["value"] for i in json.loads(raw.stdout)["items"]] == ["35"]
        assert QUERY in prometheus.queries

        wait_until(lambda: replicas(cluster, "model") == 4, 120, message="the HPA scaled the Deployment to 4")
        keda.timings["scaled_up_1_to_4"] = time.monotonic() - mark

        prometheus.answer = lambda query: 15.0  # -> ceil(15 / 10) = 2
        mark = time.monotonic()
        wait_until(lambda: replicas(cluster, "model") == 2, 120, message="the HPA scaled the Deployment to 2")
        keda.timings["scaled_down_4_to_2"] = time.monotonic() - mark
    finally:
        prometheus.close()


def test_shipyards_scale_to_zero_object_holds_on_missing_data_sleeps_when_idle_and_wakes_on_a_held_request(
        keda: Keda) -> None:
    """The ScaledObject the operator builds for ``minReplicas: 0`` (the pods' query that reads 0 where only the
    activator reports, and the activator's trigger), pointed at a Deployment, under real KEDA. The stand-in answers
    each query with what Prometheus would (the PromQL itself is checked under promtool in the unit tier): a
    Prometheus that errs never scales to zero; idle, it sleeps after the cooldown and stays asleep (no flap: KEDA
    counts a trigger in fallback as active, which a bare pods' query, empty at zero, would be); a request held by the
    activator wakes it; at zero, a Prometheus that errs wakes it too (the safe side)."""
    from shipyard.operator import autoscaling

    cluster = keda.cluster
    prometheus = FakePrometheus()
    activation = autoscaling.build_activation_query(NAMESPACE, "zero")
    main = autoscaling.build_query_with_activator(autoscaling.build_query("inflightRequests", NAMESPACE, "zero"),
                                                  activation)
    values: dict[str, float | None] = {}

    def answer(query: str) -> float | None:
        if query not in values:
            raise ValueError("Prometheus is down")
        return values[query]

    def stays(count: int, seconds: float) -> list[int]:
        seen = []
        for _ in range(int(seconds * 2)):
            seen.append(replicas(cluster, "zero"))
            time.sleep(0.5)
        assert set(seen) == {count}, seen
        return seen

    def assessed(at_zero: bool) -> tuple[bool | None, str, str]:
        scaled = cluster.get("scaledobject", "zero", NAMESPACE) or {}
        return autoscaling.assess_scaler("ScaledObject", (scaled.get("status") or {}).get("conditions") or [],
                                         at_zero=at_zero)

    prometheus.answer = answer
    try:
        cluster.kubectl("create", "namespace", NAMESPACE, check=False)
        cluster.kubectl("apply", "-f", "-", input=json.dumps(build_deployment("zero")))
        spec = autoscaling.Autoscaling.model_validate({"minReplicas": 0, "maxReplicas": 4, "target": 4,
                                                       "pollingIntervalSeconds": 1, "cooldownSeconds": 5})
        obj = autoscaling.build_scaled_object({"name": "zero", "namespace": NAMESPACE}, "zero", spec, main,
                                              prometheus.address, activation)
        obj["spec"]["scaleTargetRef"] = {"name": "zero"}  # a Deployment here, the ModelDeployment in a cluster
        assert obj["spec"]["minReplicaCount"] == 0 and len(obj["spec"]["triggers"]) == 2
        cluster.kubectl("apply", "-f", "-", input=json.dumps(obj))
        quiet = spec.cooldown_seconds + autoscaling.FALLBACK_FAILURES + 4  # past the cooldown and the fallback

        # the metric source down: replicas held, never scaled to zero
        wait_until(lambda: len(prometheus.queries) >= 2 * (autoscaling.FALLBACK_FAILURES + 2), 60,
                   message="KEDA reading the (failing) triggers")
        stays(1, quiet)
        ok, reason, message = assessed(at_zero=False)
        assert (ok, reason) == (False, "MetricUnavailable"), (reason, message)

        # idle: zero after the cooldown, and asleep it stays
        values.update({main: 0.0, activation: 0.0})
        mark = time.monotonic()
        wait_until(lambda: replicas(cluster, "zero") == 0, 60, message="scaled to zero when idle")
        keda.timings["idle_to_zero"] = time.monotonic() - mark
        stays(0, quiet)
        assert assessed(at_zero=True)[:2] == (True, "ScaledToZero")

        # a request held by the activator wakes the model
        values[activation] = 1.0
        mark = time.monotonic()
        wait_until(lambda: replicas(cluster, "zero") >= 1, 60, message="woken by the activator's trigger")
        keda.timings["held_request_to_replicas_1"] = time.monotonic() - mark

        # asleep again, then Prometheus down: woken (the held requests could not be seen)
        values.update({main: 0.0, activation: 0.0})
        wait_until(lambda: replicas(cluster, "zero") == 0, 60, message="back to zero")
        values.clear()
        mark = time.monotonic()
        wait_until(lambda: replicas(cluster, "zero") >= 1, 60, message="woken while the metrics cannot be read")
        keda.timings["metrics_down_at_zero_to_replicas_1"] = time.monotonic() - mark
    finally:
        prometheus.close()
