"""Blue-green and the rollback window on the real control plane (KWOK pods, Ready at once): the preview Service, the
switch of the model's Service selector, post-promotion analysis switching back, the previous version kept warm and
then scaled down, and rollback-to inside the window. The same with real pod processes under load: tests/e2e."""

from __future__ import annotations

import json
import time

import pytest
from kopf.testing import KopfRunner

from tests.integration.conftest import Cluster, wait_until
from tests.integration.test_operator_rollout import (
    FakePrometheus,
    analysis,
    events,
    healthy,
    model,
    replicas,
    wait_status,
)

pytestmark = pytest.mark.integration
VERSION_LABEL = "shipyard.dev/version"


def selected(cluster: Cluster, namespace: str, service: str) -> str | None:
    """The version a Service selects ("" for every version), None when the Service does not exist."""
    body = cluster.get("service", service, namespace)
    if body is None:
        return None
    return str(body["spec"]["selector"].get(VERSION_LABEL, ""))


def test_blue_green_previews_switches_and_keeps_the_previous_version_for_its_window(
        cluster: Cluster, operator: KopfRunner, namespace: str, prometheus: FakePrometheus) -> None:
    rollout = {"strategy": "blueGreen", "scaleDownDelaySeconds": 6,
               "analysis": analysis(prometheus.address, minSamples=3),
               "blueGreen": {"postPromotionAnalysis": analysis(prometheus.address, minSamples=3)}}
    cluster.apply(model("bg", "1.0.0", rollout=rollout), namespace)
    wait_status(cluster, namespace, "bg", healthy("1.0.0"), message="1.0.0 healthy")
    assert selected(cluster, namespace, "bg") == "1.0.0"
    cluster.apply(model("bg", "1.1.0", rollout=rollout), namespace)
    seen: list[tuple[str | None, str | None, dict[str, int]]] = []  # (model Service, preview Service, replicas)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        seen.append((selected(cluster, namespace, "bg"), selected(cluster, namespace, "bg-preview"),
                     replicas(cluster, namespace)))
        md = cluster.get("md", "bg", namespace) or {}
        if healthy("1.1.0")(md) and seen[-1][2].get("1.0.0") == 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"not promoted and settled: {md.get('status')}")
    # The preview Service selected the candidate while the model's Service kept the stable, both at full size.
    assert ("1.0.0", "1.1.0", {"1.0.0": 4, "1.1.0": 4}) in seen, seen
    # After the switch the stable stayed at full size (warm, out of traffic) for the window, then went to 0.
    assert ("1.1.0", None, {"1.0.0": 4, "1.1.0": 4}) in seen, seen
    assert seen[-1] == ("1.1.0", None, {"1.0.0": 0, "1.1.0": 4})
    # The model's Service never selected both versions (no mixed traffic in blue-green).
    assert all(s[0] in ("1.0.0", "1.1.0") for s in seen), seen
    story = events(cluster, namespace, "bg")
    for reason in ("RolloutStarted", "StepReady", "Switched", "Promoted", "RollbackWindowClosed"):
        assert reason in story, story
    assert [(h["version"], h["outcome"]) for h in md["status"]["history"]] == [
        ("1.0.0", "Superseded"), ("1.1.0", "Promoted")]


def test_blue_green_switches_back_when_post_promotion_analysis_fails(
        cluster: Cluster, operator: KopfRunner, namespace: str, prometheus: FakePrometheus) -> None:
    prometheus.answer = lambda query: 0.3 if 'version="1.1.0"' in query else 0.0
    # (the initial delay keeps the switched state up for a few polls of this test on a loaded machine)
    rollout = {"strategy": "blueGreen", "blueGreen": {"postPromotionAnalysis": analysis(prometheus.address,
                                                                                        initialDelay="4s")}}
    cluster.apply(model("bgback", "1.0.0", rollout=rollout), namespace)
    wait_status(cluster, namespace, "bgback", healthy("1.0.0"), message="1.0.0 healthy")
    cluster.apply(model("bgback", "1.1.0", rollout=rollout), namespace)
    seen: list[tuple[str | None, str | None, dict[str, int]]] = []  # (status.activeVersion, Service, replicas)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        md = cluster.get("md", "bgback", namespace) or {}
        seen.append(((md.get("status") or {}).get("activeVersion"), selected(cluster, namespace, "bgback"),
                     replicas(cluster, namespace)))
        if md["status"].get("phase") == "RolledBack":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"not switched back: {md.get('status')}")
    # Switched to 1.1.0 with 1.0.0 still at full size (a failure switches back with no cold start).
    assert ("1.1.0", "1.1.0", {"1.0.0": 4, "1.1.0": 4}) in seen, seen
    assert all(r.get("1.0.0") == 4 for _, _, r in seen), seen
    assert selected(cluster, namespace, "bgback") == "1.0.0"
    assert "post-promotion analysis" in md["status"]["message"]
    wait_until(lambda: replicas(cluster, namespace) == {"1.0.0": 4, "1.1.0": 0}, 30, message="1.1.0 scaled down")
    assert "SwitchedBack" in events(cluster, namespace, "bgback")
    assert md["status"]["history"][-1]["outcome"] == "RolledBack"


def test_rollback_to_inside_the_window_moves_the_service_before_any_pod_goes(
        cluster: Cluster, operator: KopfRunner, namespace: str) -> None:
    rollout = {"scaleDownDelaySeconds": 600}
    cluster.apply(model("win", "1.0.0", rollout=rollout), namespace)
    wait_status(cluster, namespace, "win", healthy("1.0.0"), message="1.0.0 healthy")
    cluster.apply(model("win", "1.1.0", rollout=rollout), namespace)
    md = wait_status(cluster, namespace, "win", healthy("1.1.0"), message="1.1.0 healthy")
    assert md["status"]["rollbackWindow"]["version"] == "1.0.0"
    assert replicas(cluster, namespace) == {"1.0.0": 4, "1.1.0": 4} and selected(cluster, namespace, "win") == "1.1.0"
    # Watch the Service and the Deployments together: 1.1.0 may lose pods only after the Service left it.
    watcher = cluster.kubectl  # (one kubectl get per poll; the switch is at most one reconcile pass)
    cluster.kubectl("annotate", "-n", namespace, "md/win", "shipyard.dev/rollback-to=1.0.0")
    order: list[tuple[str | None, int]] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        out = json.loads(watcher("get", "service,deployment", "-n", namespace, "-o", "json").stdout)["items"]
        service = next(i for i in out if i["kind"] == "Service" and i["metadata"]["name"] == "win")
        dep = next(i for i in out if i["kind"] == "Deployment" and i["metadata"]["name"] == "win-1-1-0")
        order.append((service["spec"]["selector"].get(VERSION_LABEL), dep["spec"]["replicas"]))
        if order[-1] == ("1.0.0", 0):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"not rolled back: {order}")
    assert ("1.1.0", 0) not in order, order  # never: the Service on 1.1.0 while 1.1.0 is scaled down
    md = wait_status(cluster, namespace, "win", lambda m: m["status"].get("stableVersion") == "1.0.0",
                     message="1.0.0 stable")
    assert md["status"]["phase"] == "RolledBack" and "rollbackWindow" not in md["status"]
    assert any("no cold start" in e for e in _messages(cluster, namespace, "win"))


def test_rollback_to_a_cold_version_scales_it_up_before_traffic_moves(
        cluster: Cluster, operator: KopfRunner, namespace: str) -> None:
    cluster.apply(model("cold", "1.0.0"), namespace)
    wait_status(cluster, namespace, "cold", healthy("1.0.0"), message="1.0.0 healthy")
    cluster.apply(model("cold", "1.1.0"), namespace)
    wait_status(cluster, namespace, "cold", healthy("1.1.0"), message="1.1.0 healthy")
    wait_until(lambda: replicas(cluster, namespace) == {"1.0.0": 0, "1.1.0": 4}, 30, message="1.0.0 at 0")
    cluster.kubectl("annotate", "-n", namespace, "md/cold", "shipyard.dev/rollback-to=1.0.0")
    md = wait_status(cluster, namespace, "cold", lambda m: m["status"].get("stableVersion") == "1.0.0",
                     message="1.0.0 stable")
    wait_until(lambda: replicas(cluster, namespace) == {"1.0.0": 4, "1.1.0": 0}, 30, message="1.1.0 at 0")
    story = events(cluster, namespace, "cold")
    assert "RollbackStarted" in story and "RolledBack" in story, story  # (the order: tests/unit, e2e)
    assert any("cold start" in e for e in _messages(cluster, namespace, "cold"))
    assert md["status"]["history"][-1] == {**md["status"]["history"][-1], "version": "1.1.0",
                                           "outcome": "RolledBack"}


def _messages(cluster: Cluster, namespace: str, name: str) -> list[str]:
    out = json.loads(cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)
    return [e.get("message", "") for e in out["items"] if e["involvedObject"]["name"] == name]


def test_rollout_settings_admitted_and_shown_by_explain(cluster: Cluster) -> None:
    out = cluster.kubectl("explain", "modeldeployment.spec.rollout.scaleDownDelaySeconds").stdout
    assert "rollback window" in out.lower()
    out = cluster.kubectl("explain", "modeldeployment.spec.rollout.blueGreen").stdout
    assert "postPromotionAnalysis" in out
