"""Scenario 17: canary traffic through the Gateway API on a real data plane (Traefik, hack/gateway.py), pods with
real addresses in the stack's pod network (hack/node_agent.py --pod-network) and real EndpointSlices.

1. exact weights: 4 replicas, a 5% step (1 candidate pod) and a 50% step, each share measured from >= 2,000 served
   responses through the gateway within a binomial bound; the preview header reaches only the candidate;
2. a bad version under 20 req/s rolled back: the weight is 0 in the route before the candidate's pods scale down,
   the stable fails nothing, the candidate's failures are bounded by weight x load x detection time.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import lightkube
import pytest
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.apps_v1 import Deployment

from shipyard.operator import naming, traffic
from tests.e2e import loadgen
from tests.e2e.conftest import E2E, Poller, record
from tests.e2e.test_rollout import LABELS, SAMPLES
from tests.integration.conftest import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]
NAMESPACE = "e2e-traffic"
MODEL = "digits"
IMAGE = "registry.example/shipyard/digits-model"
V1, V2, BAD = "1.0.0", "1.1.0", "1.2.0-bad"
REPLICAS = 4
SHARE_REQUESTS = 2000  # responses per measured share
SIGMAS = 4.0  # the binomial bound: |share - p| <= 4 sd (a false failure about once in 16,000 runs)
ROLLBACK_RATE = 20.0
INTERVAL_S, FAILURE_LIMIT = 2, 1
BOUND_S = (FAILURE_LIMIT + 1) * INTERVAL_S  # initialDelay 0
DETECTION_SLACK_S = 5.0  # beyond the analytic bound: scrape, reconcile, a loaded 2-core machine (test_rollout)
DRAIN_S = 5.0  # requests in flight when the weight went to 0
HTTPRoute = create_namespaced_resource("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes")


def model(tag: str, steps: list[dict[str, Any]], analysis: bool) -> dict[str, Any]:
    rollout: dict[str, Any] = {"steps": steps, "startupTimeoutSeconds": 300,
                               "traffic": {"gatewayAPI": {"httpRoute": MODEL}}}
    if analysis:
        rollout["analysis"] = {"interval": f"{INTERVAL_S}s", "failureLimit": FAILURE_LIMIT, "minSamples": 1,
                               "metrics": [{"name": "error-rate", "builtin": "errorRate", "max": 0.05}]}
    return {"apiVersion": "shipyard.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": MODEL, "namespace": NAMESPACE},
            "spec": {"image": f"{IMAGE}:{tag}", "model": {"path": "/models/digits"},
                     "serving": {"replicas": REPLICAS,
                                 "resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                                               "limits": {"cpu": "1", "memory": "1Gi"}}},
                     "rollout": rollout}}


def route(e2e: E2E) -> dict[str, Any]:
    return {"apiVersion": traffic.API_VERSION, "kind": "HTTPRoute",
            "metadata": {"name": MODEL, "namespace": NAMESPACE},
            "spec": {"parentRefs": [e2e.gateway.parent_ref],
                     "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                                "backendRefs": [{"name": MODEL, "port": 8080}]}]}}


def status(e2e: E2E) -> dict[str, Any]:
    return dict(e2e.md(MODEL).get("status") or {})


def measure(e2e: E2E, requests: int, headers: tuple[tuple[str, str], ...] = (),
            rate: float = 250.0) -> dict[str | None, int]:
    """Sends ``requests`` through the gateway; responses by version (None: failed)."""
    load = loadgen.LoadGenerator(e2e.gateway.port, MODEL, SAMPLES, LABELS, rate=rate, max_requests=requests,
                                 max_seconds=300, headers=headers).start()
    wait_until(lambda: len(load.results) >= requests, timeout=300, interval=0.5,
               message=f"{requests} responses through the gateway")
    results = load.stop()
    counts: dict[str | None, int] = {}
    for r in results:
        key = None if r.failed else r.version
        counts[key] = counts.get(key, 0) + 1
    return counts


def binomial_bound(n: int, percent: int) -> tuple[int, int]:
    p = percent / 100
    sd = math.sqrt(n * p * (1 - p))
    return math.floor(n * p - SIGMAS * sd), math.ceil(n * p + SIGMAS * sd)


def wait_weight(e2e: E2E, weight: int, timeout: float = 300) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        st = status(e2e)
        t = st.get("traffic") or {}
        return st if t.get("canaryWeight") == weight and t.get("programmed") else None

    found: dict[str, Any] = wait_until(ready, timeout=timeout, interval=0.5,
                                       message=f"canary weight {weight}% programmed")
    return found


@pytest.fixture(scope="module")
def tx(e2e: E2E) -> E2E:
    """The stack, in this scenario's namespace: its pods in the pod network, the HTTPRoute attached to the gateway."""
    e2e.cluster.kubectl("create", "namespace", NAMESPACE)
    e2e.cluster.kubectl("label", "namespace", NAMESPACE, "shipyard.dev/pod-network=bridge")
    e2e.cluster.apply(route(e2e), NAMESPACE)
    return dataclasses.replace(e2e, namespace=NAMESPACE)


def promote(e2e: E2E, version: str) -> None:
    e2e.cluster.kubectl("annotate", "--overwrite", "-n", NAMESPACE, "modeldeployment", MODEL,
                        f"shipyard.dev/promote={version}")


def test_17_exact_weights_and_preview_through_traefik(tx: E2E) -> None:
    e2e, ns = tx, NAMESPACE
    name = "17 exact weights through the Gateway API"
    # 5% for a minute (time enough for the 2,000 requests), then 50% until promoted (shipyard.dev/promote promotes at
    # once, from any step)
    steps = [{"weight": 5, "pause": "60s"}, {"weight": 50, "manual": True}]
    started = time.monotonic()
    e2e.cluster.apply(model(V1, steps, analysis=False), ns)
    wait_until(lambda: status(e2e).get("phase") == "Healthy", timeout=300, message=f"{V1} Healthy")
    ready_s = round(time.monotonic() - started, 1)
    slices = e2e.cluster.kubectl("get", "endpointslices", "-n", ns, "-l", f"kubernetes.io/service-name={MODEL}",
                                 "-o", "jsonpath={.items[*].endpoints[*].addresses[0]}").stdout.split()
    at_rest = measure(e2e, 200)

    e2e.cluster.apply(model(V2, steps, analysis=False), ns)
    st = wait_weight(e2e, 5)
    replicas_5 = st["replicas"]
    low5, high5 = binomial_bound(SHARE_REQUESTS, 5)
    share5 = measure(e2e, SHARE_REQUESTS)
    preview = measure(e2e, 200, headers=(("x-shipyard-version", V2),))
    st = wait_weight(e2e, 50)
    assert st.get("pausedReason") == "ManualStep", st.get("message")  # the 50% step itself, not promoting
    low50, high50 = binomial_bound(SHARE_REQUESTS, 50)
    share50 = measure(e2e, SHARE_REQUESTS)
    promote(e2e, V2)
    wait_until(lambda: status(e2e).get("phase") == "Healthy" and status(e2e).get("stableVersion") == V2,
               timeout=300, message=f"{V2} promoted")
    # The data plane converges after the status: Traefik applies a change after its 2 s reload throttle, and the old
    # version's pods answer (preStop) until it did; a request is never lost meanwhile (asserted below).
    time.sleep(5)
    after = measure(e2e, 200)
    rules = e2e.client.get(HTTPRoute, MODEL, namespace=ns).to_dict()["spec"]["rules"]

    record(name, facts={
        "EndpointSlice addresses of the model's Service (pod network)": slices,
        f"{V1} Healthy after (s)": ready_s,
        "at rest, 200 requests": at_rest,
        "5% step: replicas (ready)": replicas_5,
        f"5% step, {SHARE_REQUESTS} requests": share5,
        "5% step: 4-sigma binomial bound on the candidate's responses": [low5, high5],
        f"preview header x-shipyard-version: {V2}, 200 requests": preview,
        f"50% step, {SHARE_REQUESTS} requests": share50,
        "50% step: 4-sigma binomial bound": [low50, high50],
        "after promotion, 200 requests": after,
        "route rules after promotion": rules,
    })
    assert slices and all(not a.startswith("127.") for a in slices), slices
    assert at_rest == {V1: 200}, at_rest
    assert replicas_5["candidate"] == 1 and replicas_5["stable"] == REPLICAS, replicas_5
    assert share5.get(None, 0) == 0 and sum(share5.values()) == SHARE_REQUESTS, share5
    assert low5 <= share5.get(V2, 0) <= high5, (share5, low5, high5)
    assert preview == {V2: 200}, preview
    assert share50.get(None, 0) == 0 and low50 <= share50.get(V2, 0) <= high50, (share50, low50, high50)
    assert after == {V2: 200}, after
    assert len(rules) == 1 and [b["name"] for b in rules[0]["backendRefs"]] == [MODEL], rules
    record(name, outcome="passed")


class RouteWatcher(Poller):
    """Samples (time, the candidate's weight in the route, its Deployment's spec.replicas) every 0.2 s."""

    interval = 0.2

    def __init__(self, e2e: E2E, version: str) -> None:
        super().__init__()
        self.e2e, self.version = e2e, version
        self.backends = traffic.Backends(stable=MODEL, canary=naming.build_deployment_name(MODEL, version))
        self.samples: list[tuple[float, int | None, int]] = []

    def poll(self) -> None:
        rules = self.e2e.client.get(HTTPRoute, MODEL, namespace=NAMESPACE).to_dict()["spec"]["rules"]
        weight = traffic.read_canary_weight(rules, self.backends)
        try:
            dep = self.e2e.client.get(Deployment, naming.build_deployment_name(MODEL, self.version),
                                      namespace=NAMESPACE)
            replicas = int(dep.spec.replicas or 0) if dep.spec else 0
        except lightkube.ApiError:  # not created yet, or deleted
            replicas = 0
        self.samples.append((time.time(), weight, replicas))


def test_17_rollback_under_load_takes_the_weight_to_zero_before_scale_down(tx: E2E) -> None:
    e2e, ns = tx, NAMESPACE
    name = "17 rollback through the Gateway API under load"
    steps = [{"weight": 25, "pause": "60s"}, {"weight": 50, "pause": "60s"}]
    e2e.cluster.apply(model(V2, steps, analysis=True), ns)  # the stable V2, now with an analysis
    wait_until(lambda: status(e2e).get("phase") == "Healthy", timeout=120, message=f"{V2} Healthy")
    load = loadgen.LoadGenerator(e2e.gateway.port, MODEL, SAMPLES, LABELS, rate=ROLLBACK_RATE,
                                 max_seconds=400).start()
    try:
        with RouteWatcher(e2e, BAD) as watcher:
            time.sleep(2)
            e2e.cluster.apply(model(BAD, steps, analysis=True), ns)
            rolled = wait_until(lambda: status(e2e).get("phase") == "RolledBack" or None, timeout=300,
                                message=f"{BAD} rolled back")
            rolled_at = time.time()
            assert rolled
            wait_until(lambda: watcher.samples and watcher.samples[-1][2] == 0, timeout=120,
                       message=f"{BAD} scaled to 0")
            time.sleep(3)
    finally:
        results = load.stop()
    failed = [r for r in results if r.failed]
    injected = [r for r in failed if r.status == 500 and "injected fault" in (r.error or "")]
    other = [r for r in failed if r not in injected]
    served = {v: sum(1 for r in results if r.version == v) for v in (V2, BAD)}
    first_failed = min((r.finished for r in failed), default=None)
    detection = rolled_at - first_failed if first_failed else None
    # The candidate's pods were scaled down only once its weight in the route was 0.
    first_drop = next((i for i, (_, _, n) in enumerate(watcher.samples)
                       if i and n < watcher.samples[i - 1][2]), None)
    weight_at_drop = watcher.samples[first_drop - 1][1] if first_drop else None
    # when the weight last left the candidate: the first sample at 0 after the last one with weight (before the
    # step's weight was written the route had no candidate backend either)
    last_weighted = max((i for i, (_, w, _) in enumerate(watcher.samples) if w), default=None)
    zero_at = next((t for t, w, n in watcher.samples[last_weighted + 1:] if w == 0 and n > 0), None) \
        if last_weighted is not None else None
    drop_at = watcher.samples[first_drop][0] if first_drop is not None else None
    max_weight = max((w or 0 for _, w, _ in watcher.samples), default=0)
    max_failed = math.ceil(ROLLBACK_RATE * max_weight / 100 * (BOUND_S + DETECTION_SLACK_S + DRAIN_S)) + 16
    record(name, facts={
        "requests": len(results), "served by version": served,
        "failed (all injected by the bad image: HTTP 500)": len(injected),
        "failed otherwise (gateway errors, resets)": len(other),
        "candidate's largest weight (%)": max_weight,
        "failed-request bound": f"{max_failed} = ceil({ROLLBACK_RATE:g}/s x {max_weight}% x ({BOUND_S} + "
                                f"{DETECTION_SLACK_S:g} + {DRAIN_S:g}) s) + 16 in flight",
        "first failed response -> RolledBack (s)": round(detection, 1) if detection is not None else None,
        "weight 0 in the route -> candidate scaled down (s)": round(drop_at - zero_at, 2)
        if drop_at and zero_at else None,
        "candidate weight in the route at its first scale-down": weight_at_drop,
    })
    assert injected, "the bad version answered nothing: the scenario showed nothing"
    assert not other, other[:5]  # 0 failed from the stable; no request lost by the gateway
    assert first_drop is not None and weight_at_drop == 0, watcher.samples
    assert zero_at is not None and drop_at is not None and zero_at <= drop_at
    assert len(injected) <= max_failed, (len(injected), max_failed)
    assert detection is not None and detection <= BOUND_S + DETECTION_SLACK_S + 4, detection
    st = status(e2e)
    assert st["stableVersion"] == V2 and (st.get("traffic") or {}).get("canaryWeight") == 0
    record(name, outcome="passed")
