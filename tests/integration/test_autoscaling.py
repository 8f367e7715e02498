"""Autoscaling on the real control plane (KWOK pods): the scale subresource (``kubectl scale md``), the refusals of
spec.serving.autoscaling at admission, an HPA targeting the ModelDeployment that the kube-controller-manager's HPA
controller really runs (with no metrics API here it cannot read its metric: replicas held, the Autoscaling condition
says so), and KEDA not installed (Stalled naming it, the fixed replicas serve). KEDA itself under real load: the e2e
tier."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kopf.testing import KopfRunner

from tests.integration.conftest import Cluster, wait_until
from tests.integration.test_crd_admission import DELETE, apply, digits, mutate
from tests.integration.test_operator_rollout import healthy, model, replicas, wait_status

pytestmark = pytest.mark.integration


def condition(md: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (md.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


@pytest.mark.parametrize(("autoscaling", "extra", "field", "message"), [
    pytest.param({"minReplicas": 5, "maxReplicas": 2, "target": 4}, {}, "spec.serving.autoscaling.minReplicas",
                 "minReplicas must not exceed maxReplicas", id="min-above-max"),
    pytest.param({"maxReplicas": 4, "target": 0}, {}, "spec.serving.autoscaling.target",
                 "should be greater than 0", id="zero-target"),
    pytest.param({"maxReplicas": 4, "target": -2}, {}, "spec.serving.autoscaling.target",
                 "should be greater than 0", id="negative-target"),
    pytest.param({"maxReplicas": 4, "target": 3}, {"replicas": 9}, "spec.serving.replicas",
                 "must not exceed spec.serving.autoscaling.maxReplicas", id="fixed-replicas-above-max"),
    pytest.param({"provider": "hpa", "minReplicas": 0, "maxReplicas": 4, "target": 3}, {},
                 "spec.serving.autoscaling.minReplicas", "needs provider keda", id="hpa-to-zero"),
    pytest.param({"metric": "cpu", "maxReplicas": 4, "target": 70}, {"resources": DELETE},
                 "spec.serving.autoscaling.metric", "set spec.serving.resources requests.cpu",
                 id="cpu-without-request"),
    pytest.param({"metric": "gpuUtilization", "maxReplicas": 4, "target": 150}, {},
                 "spec.serving.autoscaling.target", "is a percentage", id="gpu-percent-above-100"),
    pytest.param({"maxReplicas": 4}, {}, "spec.serving.autoscaling.target", "Required value", id="no-target"),
])
def test_bad_autoscaling_is_refused_naming_the_field(cluster: Cluster, namespace: str, autoscaling: dict[str, Any],
                                                     extra: dict[str, Any], field: str, message: str) -> None:
    body = mutate(digits(), ["spec", "serving", "autoscaling"], autoscaling)
    for key, value in extra.items():
        body = mutate(body, ["spec", "serving", key], value)
    out = apply(cluster, namespace, body)
    assert out.returncode != 0, f"accepted: {autoscaling} {extra}"
    assert field in out.stderr and message in out.stderr, out.stderr
    assert cluster.get("modeldeployment", "digits", namespace) is None


def test_kubectl_scale_sets_the_replicas_the_versions_run(cluster: Cluster, operator: KopfRunner,
                                                           namespace: str) -> None:
    cluster.apply(model("sc", "1.0.0", replicas=2), namespace)
    wait_status(cluster, namespace, "sc", healthy("1.0.0"), message="1.0.0 healthy")
    scale = json.loads(cluster.kubectl("get", "--subresource=scale", "md/sc", "-n", namespace, "-o", "json").stdout)
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 2 and scale["status"]["replicas"] == 2
    assert scale["status"]["selector"] == "shipyard.dev/model=sc,shipyard.dev/component=serving"
    cluster.kubectl("scale", "md/sc", "--replicas=5", "-n", namespace)
    wait_until(lambda: replicas(cluster, namespace) == {"1.0.0": 5}, 30, message="scaled to 5")
    md = wait_status(cluster, namespace, "sc", lambda m: m["status"].get("replicas", {}).get("current") == 5,
                     message="status.replicas.current 5")
    assert md["spec"]["serving"]["replicas"] == 5
    header, row = cluster.kubectl("get", "md", "sc", "-n", namespace).stdout.splitlines()[:2]

    def column(name: str) -> str:  # the table is aligned; an empty cell (no candidate) leaves blanks
        start = header.index(name)
        return row[start:].split()[0]

    assert (column("DESIRED"), column("CURRENT")) == ("5", "5")


def test_an_hpa_drives_the_model_deployment_and_holds_replicas_without_metrics(
        cluster: Cluster, operator: KopfRunner, namespace: str) -> None:
    spec = {"serving": {"replicas": 3, "autoscaling": {"provider": "hpa", "minReplicas": 2, "maxReplicas": 6,
                                                       "metric": "inflightRequests", "target": 4}}}
    cluster.apply(model("hp", "1.0.0", replicas=3, **spec), namespace)
    wait_status(cluster, namespace, "hp", healthy("1.0.0"), message="1.0.0 healthy")
    hpa = wait_until(lambda: cluster.get("hpa", "hp", namespace), 30, message="the HPA")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "shipyard.dev/v1alpha1", "kind": "ModelDeployment",
                                             "name": "hp"}
    assert hpa["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"
    # The HPA controller finds the target through the scale subresource, then cannot read its Pods metric (no custom
    # metrics API on this cluster): ScalingActive False, and the operator's Autoscaling condition says so.
    md = wait_status(cluster, namespace, "hp", lambda m: condition(m, "Autoscaling").get("reason") ==
                     "MetricUnavailable", 90, message="the Autoscaling condition")
    assert condition(md, "Autoscaling")["status"] == "False"
    assert "replicas held" in condition(md, "Autoscaling")["message"]
    assert replicas(cluster, namespace) == {"1.0.0": 3} and md["spec"]["serving"]["replicas"] == 3
    assert md["status"]["autoscaling"]["scaler"] == "HorizontalPodAutoscaler/hp"
    # autoscaling removed: the HPA goes
    body = model("hp", "1.0.0", replicas=3)
    cluster.apply(body, namespace)
    wait_until(lambda: cluster.get("hpa", "hp", namespace) is None, 30, message="the HPA deleted")


def test_keda_not_installed_stalls_naming_it_and_the_fixed_replicas_serve(
        cluster: Cluster, operator: KopfRunner, namespace: str) -> None:
    spec = {"serving": {"replicas": 2, "autoscaling": {"maxReplicas": 6, "target": 4}}}
    cluster.apply(model("kd", "1.0.0", replicas=2, **spec), namespace)
    md = wait_status(cluster, namespace, "kd", lambda m: condition(m, "Stalled").get("status") == "True",
                     60, message="stalled")
    assert condition(md, "Stalled")["reason"] == "ScalerUnavailable"
    assert "KEDA's ScaledObject (keda.sh/v1alpha1)" in condition(md, "Autoscaling")["message"]
    wait_until(lambda: replicas(cluster, namespace) == {"1.0.0": 2}, 30, message="the fixed replicas")
    md = wait_status(cluster, namespace, "kd", lambda m: m["status"].get("stableVersion") == "1.0.0",
                     message="1.0.0 stable")
    assert condition(md, "Serving")["status"] == "True"
