"""The e2e scenario of autoscaling, with real pod processes, a real KEDA (its operator and metrics adapter behind the
control plane's aggregator), the kube-controller-manager's HPA controller and the stack's Prometheus, in a namespace
of its own:

12. the digits model (CPU-limited pods) with ``spec.serving.autoscaling`` on requestRate (16 requests/s per pod):
    5 -> 60 requests/s grows it from 1 to 4 replicas (time from the load step to the ScaledObject's decision and to
    the new pods serving, measured); a canary at 25% (a manual step) under that load has 1 candidate and 3 stable pods,
    and a load step down to 20 requests/s shrinks both sides by the step's weight (1 + 1), never sooner than the
    scale-down stabilisation window (45 s), the analysis unaffected;
    then a minute of steady load with no write from either controller (the ModelDeployment's generation, i.e. the
    scaler's writes through the scale subresource, and the operator's Deployment writes, counted); after the load
    stops, back to 1 replica. 0 failed requests throughout.
13. scale to zero and back: the same model with ``minReplicas: 0`` (requestRate, ``cooldownSeconds: 10``): idle,
    KEDA scales it to zero and the model's Service moves to its activator before the last pod goes; a request sent
    then is held by the activator, whose held-requests gauge wakes the model through the ScaledObject's second
    trigger, and is answered once a pod is Ready (time from the first request to its answer, measured); 7 more
    requests sent during the wake-up are answered too; then back to zero.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import re
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.e2e import loadgen, manifests
from tests.e2e.conftest import E2E, Poller, count_ready_pods, record
from tests.e2e.test_examples import delete_namespace, in_namespace, ready
from tests.e2e.test_rollout import LABELS, SAMPLES
from tests.integration.conftest import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

MODEL = "digits"
NAMESPACE = "e2e-autoscaling"
V1, V2 = "3.0.0", "3.1.0"
TARGET = 16  # requests/s per pod: 60/16 = 3.75 -> 4 pods, off the replica boundary where the HPA's 10% tolerance
# would let a measured 61 req/s ask for 5
LOW, HIGH, MIDDLE = 5.0, 60.0, 20.0  # requests/s: 1 pod, ceil(60/16) = 4 pods, ceil(20/16) = 2 pods
SCALE_DOWN_WINDOW_S = 45  # behavior.scaleDown.stabilizationWindowSeconds
# The HPA controller's sync period (kube-controller-manager's default): the window counts from the last higher
# recommendation, which can be up to one sync before the load drop. Without the window the first scale-down would
# come within rateWindowSeconds + one sync (<= 25 s) of the drop; with it, not before window - sync (30 s).
HPA_SYNC_S = 15
STEADY_S = 60


def build_md(tag: str, **rollout: Any) -> dict[str, Any]:
    md = manifests.build_digits(tag, NAMESPACE)
    spec = md["spec"]
    del spec["compression"]
    del spec["serving"]["replicas"]  # the scaler's
    spec["serving"]["autoscaling"] = {
        "minReplicas": 1, "maxReplicas": 5, "metric": "requestRate", "target": TARGET,
        "rateWindowSeconds": 10,  # the stack's Prometheus scrapes every second
        "pollingIntervalSeconds": 2,
        "behavior": {"scaleUp": {"stabilizationWindowSeconds": 0},
                     "scaleDown": {"stabilizationWindowSeconds": SCALE_DOWN_WINDOW_S}},
    }
    spec["rollout"] = {"startupTimeoutSeconds": 300, **rollout}
    return md


@dataclasses.dataclass
class Sample:
    t: float
    generation: int
    desired: int | None  # spec.serving.replicas (the scaler's)
    ready: dict[str, int]  # ready, not terminating pods per version
    phase: str | None
    analysis: str | None


class ScaleWatcher(Poller):
    interval = 0.5

    def __init__(self, e2e: E2E) -> None:
        super().__init__()
        self.e2e = e2e
        self.samples: list[Sample] = []
        self.pod_versions: dict[str, str] = {}

    def poll(self) -> None:
        md = self.e2e.md(MODEL)
        status = md.get("status") or {}
        counts = count_ready_pods(self.e2e, MODEL, self.pod_versions)
        self.samples.append(Sample(time.time(), int(md["metadata"]["generation"]),
                                   md["spec"]["serving"].get("replicas"), counts, status.get("phase"),
                                   (status.get("analysis") or {}).get("phase")))

    def first(self, predicate: Any, since: float) -> Sample | None:
        return next((s for s in list(self.samples) if s.t >= since and predicate(s)), None)

    def wait(self, predicate: Any, since: float, timeout: float, message: str) -> Sample:
        found: Sample = wait_until(lambda: self.first(predicate, since), timeout, interval=0.5,
                                   message=f"{message}; last={self.samples[-1] if self.samples else None}")
        return found


def operator_writes(e2e: E2E, since: float) -> int:
    """The operator's writes to this namespace's Deployments after `since` (its log lines, stamped to the ms)."""
    log = (e2e.workdir.parent / "operator.log").read_text(errors="replace").splitlines()
    count = 0
    for line in log:
        m = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\]", line)
        if not m or f"Deployment {NAMESPACE}/" not in line or not re.search(r"\] (Applied|Scaled) ", line):
            continue
        stamp = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
        if stamp >= since:
            count += 1
    return count


def start_load(e2e: E2E, rate: float) -> loadgen.LoadGenerator:
    """A load at `rate` (the caller stops the previous one and keeps its results)."""
    return loadgen.LoadGenerator(e2e.service_port(MODEL), MODEL, SAMPLES, LABELS, rate=rate, max_seconds=900).start()


def in_own_namespace(e2e: E2E, namespace: str) -> Any:
    """The e2e stack scoped to a namespace of the scenario's own, deleted after it."""
    scoped = in_namespace(e2e, namespace)
    yield scoped
    delete_namespace(scoped)


@pytest.fixture(scope="module")
def scaling(e2e: E2E) -> Any:
    yield from in_own_namespace(e2e, NAMESPACE)


def test_12_load_scales_the_model_and_its_canary_proportionally(scaling: E2E) -> None:
    name = "12 autoscaling"
    e2e = scaling
    e2e.cluster.apply(build_md(V1), e2e.namespace)
    wait_until(lambda: ready(e2e, MODEL), timeout=300, interval=1, message=f"{V1} Ready")
    results: list[loadgen.Result] = []
    load = start_load(e2e, LOW)
    timings: dict[str, float | None] = {}
    try:
        with ScaleWatcher(e2e) as watcher:
            wait_until(lambda: any(c["type"] == "Autoscaling" and c["status"] == "True"
                                   for c in (e2e.md(MODEL).get("status") or {}).get("conditions") or []),
                       120, interval=1, message="the Autoscaling condition True (KEDA reads the metric)")
            time.sleep(10)
            assert watcher.samples[-1].desired in (None, 1), watcher.samples[-1]
            # 5 -> 60 requests/s
            results += load.stop()
            step = time.time()
            load = start_load(e2e, HIGH)
            decided = watcher.wait(lambda s: (s.desired or 0) >= 4, step, 180, "the scaler's decision: 4 replicas")
            serving = watcher.wait(lambda s: s.ready.get(V1, 0) >= 4, step, 180, "4 pods of 3.0.0 serving")
            timings["load step 5 -> 60 req/s -> scaler decided 4 replicas (s)"] = round(decided.t - step, 1)
            timings["load step -> 4 pods Ready (s)"] = round(serving.t - step, 1)
            time.sleep(5)
            assert watcher.samples[-1].desired == 4 and watcher.samples[-1].ready.get(V1) == 4, watcher.samples[-1]
            # a canary at 25% (manual step) under that load: 1 candidate, 3 stable
            canary_at = time.time()
            e2e.cluster.apply(build_md(V2, steps=[{"weight": 25, "manual": True}], analysis={
                "interval": "2s", "failureLimit": 1, "metrics": [
                    {"name": "error-rate", "builtin": "errorRate", "max": 0.01}]}), e2e.namespace)
            watcher.wait(lambda s: s.ready.get(V2) == 1 and s.ready.get(V1) == 3, canary_at, 180,
                         "the 25% step: 1 candidate pod and 3 stable")
            wait_until(lambda: (e2e.md(MODEL).get("status") or {}).get("pausedReason") == "ManualStep", 120,
                       interval=1, message="the manual step reached")
            # load step down to 20 requests/s: 2 replicas, split 1 + 1 by the step's weight
            results += load.stop()
            down = time.time()
            load = start_load(e2e, MIDDLE)
            split = watcher.wait(lambda s: s.desired == 2 and s.ready.get(V2) == 1 and s.ready.get(V1) == 1
                                 and sum(s.ready.values()) == 2, down, 240, "2 replicas split 1 + 1")
            timings[f"load step 60 -> 20 req/s -> 1 + 1 pods (s; scale-down window {SCALE_DOWN_WINDOW_S} s)"] = round(
                split.t - down, 1)
            first_down = watcher.first(lambda s: s.desired is not None and s.desired < 4, down)
            assert first_down is not None and first_down.t - down >= SCALE_DOWN_WINDOW_S - HPA_SYNC_S, (
                "scaled down inside the stabilisation window", first_down)
            time.sleep(5)
            # steady: no writes from either controller for a minute
            quiet = time.time()
            generation = e2e.md(MODEL)["metadata"]["generation"]
            time.sleep(STEADY_S)
            md = e2e.md(MODEL)
            scaler_writes = int(md["metadata"]["generation"]) - int(generation)
            own_writes = operator_writes(e2e, quiet)
            status = md.get("status") or {}
            analysis_phase = (status.get("analysis") or {}).get("phase")
            assert status.get("pausedReason") == "ManualStep" and status.get("candidateVersion") == V2, status
            # promote, stop the load: back to 1 replica
            e2e.cluster.kubectl("annotate", "-n", e2e.namespace, f"md/{MODEL}", f"shipyard.dev/promote={V2}")
            wait_until(lambda: (e2e.md(MODEL).get("status") or {}).get("stableVersion") == V2, 120, interval=1,
                       message=f"{V2} promoted")
            results += load.stop()
            load = None
            stopped = time.time()
            back = watcher.wait(lambda s: s.desired == 1 and s.ready.get(V2) == 1 and sum(s.ready.values()) == 1,
                                stopped, 240, "back to 1 replica")
            timings[f"load stopped -> back to 1 replica (s; scale-down window {SCALE_DOWN_WINDOW_S} s)"] = round(
                back.t - stopped, 1)
            assert back.t - stopped >= SCALE_DOWN_WINDOW_S - HPA_SYNC_S, (
                "scaled down inside the stabilisation window", back)
            samples = list(watcher.samples)
            pod_versions = dict(watcher.pod_versions)
    finally:
        if load is not None:
            results += load.stop()
    failed = [r for r in results if r.failed]
    counts = loadgen.count_by_version(loadgen.attribute(results, e2e.conntrack(), pod_versions))
    most = max(sum(s.ready.values()) for s in samples)
    record(name, requests=counts, timings=timings, facts={
        "requests sent": len(results), "failed requests": len(failed),
        "most ready pods at once": most,
        f"writes in {STEADY_S} s of steady load: scaler (generation) / operator (Deployments)":
            f"{scaler_writes} / {own_writes}",
        "analysis of the canary after the load steps": analysis_phase,
    })
    assert not failed, failed[:3]
    assert scaler_writes == 0 and own_writes == 0, (scaler_writes, own_writes)
    assert analysis_phase != "Failed"
    assert most <= 5
    record(name, outcome="passed")


ZERO_NAMESPACE = "e2e-scale-to-zero"
ZERO_TAG = "3.2.0"
COOLDOWN_S = 10
RATE_WINDOW_S = 10
ASLEEP_S = 15  # at zero with no request: no wake-up (several KEDA polls, past its fallback threshold)
WAKE_REQUESTS = 8  # the first one timed, the others sent over the next 2 s


def build_zero_md() -> dict[str, Any]:
    md = manifests.build_digits(ZERO_TAG, ZERO_NAMESPACE)
    spec = md["spec"]
    del spec["compression"]
    del spec["serving"]["replicas"]
    spec["serving"]["autoscaling"] = {
        # requestRate: any request within the rate window keeps the model awake (an in-flight gauge reads 0 between
        # short requests, so a trickle of traffic would not count as activity)
        "minReplicas": 0, "maxReplicas": 3, "metric": "requestRate", "target": TARGET,
        "rateWindowSeconds": RATE_WINDOW_S, "pollingIntervalSeconds": 2, "cooldownSeconds": COOLDOWN_S,
    }
    spec["rollout"] = {"startupTimeoutSeconds": 300}
    return md


def infer_waiting(port: int, row: list[float], timeout: float = 120) -> tuple[int, float, dict[str, Any]]:
    """(status, seconds to the answer, body) of one inference request that may be held while the model wakes."""
    body = loadgen.build_request(MODEL, [row])
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer", data=body,
                                     headers={"Content-Type": "application/json"})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, time.monotonic() - started, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, time.monotonic() - started, {"raw": error.read()[:300].decode(errors="replace")}


@pytest.fixture(scope="module")
def to_zero(e2e: E2E) -> Any:
    yield from in_own_namespace(e2e, ZERO_NAMESPACE)


def routes_to_activator(e2e: E2E) -> bool:
    service = e2e.cluster.get("service", MODEL, e2e.namespace) or {}
    return bool((service.get("spec") or {}).get("selector", {}).get("shipyard.dev/component") == "activator")


def at_zero(e2e: E2E) -> bool:
    md = e2e.md(MODEL)
    pods = count_ready_pods(e2e, MODEL, {})
    return md["spec"]["serving"].get("replicas") == 0 and not sum(pods.values()) and routes_to_activator(e2e)


def test_13_scale_to_zero_and_back_through_the_activator(to_zero: E2E) -> None:
    name = "13 scale to zero and back"
    e2e = to_zero
    started = time.time()
    e2e.cluster.apply(build_zero_md(), e2e.namespace)
    wait_until(lambda: ready(e2e, MODEL), timeout=300, interval=1, message=f"{ZERO_TAG} Ready")
    port = e2e.service_port(MODEL)
    timings: dict[str, float | None] = {"apply -> Ready (s)": round(time.time() - started, 1)}
    # a few seconds of traffic (KEDA sees the model active: its cooldown counts from the last active read)
    load = start_load(e2e, LOW)
    time.sleep(8)
    warm = load.stop()
    served = time.time()
    assert warm and not [r for r in warm if r.failed], warm[:3]
    wait_until(lambda: at_zero(e2e), 180, interval=0.5,
               message="scaled to zero (spec.serving.replicas 0, no pod, the Service on the activator)")
    timings[f"last request -> scaled to zero, Service on the activator (s; rate window {RATE_WINDOW_S} s + "
            f"cooldownSeconds {COOLDOWN_S})"] = round(time.time() - served, 1)
    # asleep it stays (the pods' query reads 0 where only the activator reports: no wake-up without a request)
    asleep = time.time()
    while time.time() - asleep < ASLEEP_S:
        assert e2e.md(MODEL)["spec"]["serving"].get("replicas") == 0, "woke without a request"
        time.sleep(1)
    md = e2e.md(MODEL)
    condition = next(c for c in md["status"]["conditions"] if c["type"] == "Autoscaling")
    assert md["status"]["autoscaling"]["routesToActivator"] is True, md["status"]["autoscaling"]
    assert md["status"]["phase"] == "Healthy", md["status"]

    # the first request at zero: held by the activator, answered once a pod is Ready
    rows = [SAMPLES[i % len(SAMPLES)] for i in range(WAKE_REQUESTS)]
    with concurrent.futures.ThreadPoolExecutor(WAKE_REQUESTS) as pool:
        first = pool.submit(infer_waiting, port, rows[0])
        others = []
        for row in rows[1:]:
            time.sleep(2 / (WAKE_REQUESTS - 1))
            others.append(pool.submit(infer_waiting, port, row))
        answers = [first.result(), *(f.result() for f in others)]
    woke = time.time()
    statuses = [a[0] for a in answers]
    predictions = [loadgen.parse_predictions(a[2])[0] if a[0] == 200 else None for a in answers]
    correct = sum(1 for i, p in enumerate(predictions) if p == LABELS[i % len(LABELS)])
    timings["first request at zero -> its answer (s)"] = round(answers[0][1], 1)
    timings["slowest of the wake-up requests (s)"] = round(max(a[1] for a in answers), 1)
    pods = count_ready_pods(e2e, MODEL, {})
    service_after = routes_to_activator(e2e)
    # idle again: back to zero
    wait_until(lambda: at_zero(e2e), 180, interval=0.5, message="back to zero after the wake-up")
    timings["wake-up answered -> back at zero (s)"] = round(time.time() - woke, 1)
    events = e2e.cluster.kubectl("get", "events", "-n", e2e.namespace, "-o", "json", "--field-selector",
                                 "involvedObject.kind=ScaledObject").stdout
    activations = [e for e in json.loads(events)["items"] if e.get("reason") == "KEDAScaleTargetActivated"]
    record(name, timings=timings, facts={
        f"replicas at zero for {ASLEEP_S} s with no request": "0 throughout",
        "requests at zero (one timed, the rest during the wake-up)": WAKE_REQUESTS,
        "answers (HTTP status)": statuses,
        "correct predictions": f"{correct}/{WAKE_REQUESTS}",
        "ready pods after the wake-up": pods,
        "Service on the activator after the wake-up": service_after,
        "Autoscaling condition at zero": f"{condition['status']} {condition['reason']}: {condition['message']}",
        "KEDA activations (its Events)": len(activations),
    })
    assert statuses == [200] * WAKE_REQUESTS, answers
    assert correct >= WAKE_REQUESTS - 1, predictions
    assert condition["status"] == "True" and condition["reason"] == "ScaledToZero", condition
    assert not service_after
    record(name, outcome="passed")
