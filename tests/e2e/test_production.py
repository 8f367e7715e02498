"""The e2e scenarios of the rollback window and blue-green, with real pod processes (startup takes real time) under
20 req/s, in a namespace of their own on the e2e stack:

10. rollback-to inside the rollback window (spec.rollout.scaleDownDelaySeconds): the previous stable is still Ready,
    out of traffic; the switch is immediate, 0 failed requests, the ready pods behind the model's Service never
    below spec.serving.replicas; then rollback-to a version scaled to 0 (outside any window): it is scaled up first
    (its cold start measured) and traffic moves only once it is Ready, again 0 failed and never below the spec;
11. blue-green: the candidate at full size behind the preview Service (reachable, answering as the new version while
    the model's Service answers as the stable), the switch, promotion; then an inaccurate version (every answer an
    HTTP 200, half of them wrong) switched to and switched back automatically by its post-promotion analysis (an
    accuracy Job scoring the new active version), 0 failed requests.

A watcher polls the model's Service and pods 10 times a second: the fewest ready, not terminating pods the Service
selected at any poll is the figure held at the spec.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest
from lightkube.resources.core_v1 import Service

from shipyard.operator import naming
from tests.e2e import loadgen, manifests
from tests.e2e.conftest import E2E, Poller, count_ready_pods, record
from tests.e2e.test_examples import delete_namespace, in_namespace, post_json, ready
from tests.e2e.test_rollout import LABELS, LOAD_RATE, SAMPLES
from tests.integration.conftest import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

MODEL = "digits"
NAMESPACE = "e2e-production"
REPLICAS = 3
V1, V2, V3, BAD = "2.0.0", "2.1.0", "2.2.0", "2.3.0-inaccurate"


def build_md(tag: str, rollout: dict[str, Any]) -> dict[str, Any]:
    """The e2e digits model without compression (the image's model served as it is), `rollout` as given."""
    md = manifests.build_digits(tag, NAMESPACE)
    spec = md["spec"]
    del spec["compression"]
    spec["serving"]["replicas"] = REPLICAS
    spec["rollout"] = {"startupTimeoutSeconds": 300, **rollout}
    return md


def accuracy_analysis() -> dict[str, Any]:
    """The accuracy Job of scenario 5 (``shipyard-runtime evaluate`` against the candidate's own Service)."""
    analysis: dict[str, Any] = manifests.build_digits_accuracy(V1)["spec"]["rollout"]["analysis"]
    return {**analysis, "minSamples": 1, "failureLimit": 0}


@dataclasses.dataclass
class Sample:
    t: float
    selected: str | None  # the version the model's Service selects ("" for all)
    ready: dict[str, int]  # ready, not terminating pods per version

    @property
    def serving(self) -> int:
        return sum(n for v, n in self.ready.items() if self.selected in ("", naming.build_label_value(v)))


class TrafficWatcher(Poller):
    """Polls the model's Service selector and its pods (10/s) in a thread."""

    interval = 0.1

    def __init__(self, e2e: E2E) -> None:
        super().__init__()
        self.e2e = e2e
        self.samples: list[Sample] = []
        self.pod_versions: dict[str, str] = {}

    def poll(self) -> None:
        service = self.e2e.client.get(Service, MODEL, namespace=self.e2e.namespace)
        selector = (service.spec.selector or {}) if service.spec else {}
        counts = count_ready_pods(self.e2e, MODEL, self.pod_versions)
        self.samples.append(Sample(time.time(), selector.get(naming.LABEL_VERSION, ""), counts))

    def min_serving(self, since: float) -> int:
        return min(s.serving for s in self.samples if s.t >= since)


def start_load(e2e: E2E) -> loadgen.LoadGenerator:
    return loadgen.LoadGenerator(e2e.service_port(MODEL), MODEL, SAMPLES, LABELS, rate=LOAD_RATE,
                                 max_seconds=600).start()


def status_of(e2e: E2E) -> dict[str, Any]:
    return e2e.md(MODEL).get("status") or {}


def first_response_from(results: list[loadgen.Result], version: str, since: float) -> float | None:
    return min((r.finished for r in results if r.version == version and r.started >= since), default=None)


def promote(e2e: E2E, version: str) -> None:
    e2e.cluster.kubectl("annotate", "--overwrite", "-n", e2e.namespace, f"md/{MODEL}",
                        f"shipyard.dev/promote={version}")


def apply(e2e: E2E, tag: str, rollout: dict[str, Any]) -> None:
    e2e.cluster.apply(build_md(tag, rollout), e2e.namespace)


@pytest.fixture(scope="module")
def production(e2e: E2E) -> Any:
    scoped = in_namespace(e2e, NAMESPACE)
    yield scoped
    delete_namespace(scoped)


def test_10_rollback_to_inside_the_window_is_instant_and_outside_it_waits_for_the_cold_start(
        production: E2E) -> None:
    name = "10 rollback window"
    e2e = production
    window = {"scaleDownDelaySeconds": 600}  # no steps: one 100% step, the stable kept at full size
    apply(e2e, V1, window)
    wait_until(lambda: ready(e2e, MODEL), timeout=300, interval=1, message=f"{V1} Ready")
    apply(e2e, V2, window)
    wait_until(lambda: (m := ready(e2e, MODEL)) and m["status"].get("stableVersion") == V2, timeout=300,
               interval=1, message=f"{V2} promoted")
    assert status_of(e2e)["rollbackWindow"]["version"] == V1
    with TrafficWatcher(e2e) as watcher:
        load = start_load(e2e)
        try:
            wait_until(lambda: any(r.version == V2 for r in list(load.results)), 30, message="load on 2.1.0")
            warm = watcher.samples[-1]
            assert warm.selected == V2 and warm.ready.get(V1) == REPLICAS, warm  # V1 Ready, out of traffic
            inside = time.time()
            e2e.cluster.kubectl("annotate", "-n", e2e.namespace, f"md/{MODEL}", f"shipyard.dev/rollback-to={V1}")
            wait_until(lambda: status_of(e2e).get("stableVersion") == V1, 30, interval=0.1, message="back on V1")
            switched_in = time.time() - inside
            wait_until(lambda: first_response_from(list(load.results), V1, inside), 30, interval=0.1,
                       message=f"a response from {V1}")
            traffic_in = first_response_from(list(load.results), V1, inside)
            wait_until(lambda: watcher.samples[-1].ready.get(V2, 0) == 0, 60, message=f"{V2} scaled down")
            time.sleep(2)
            # Outside any window: V2 is at 0 replicas now. Roll back to it: scaled up first, traffic after.
            outside = time.time()
            e2e.cluster.kubectl("annotate", "--overwrite", "-n", e2e.namespace, f"md/{MODEL}",
                                f"shipyard.dev/rollback-to={V2}")
            restoring = wait_until(lambda: status_of(e2e).get("restoring"), 30, interval=0.1,
                                   message="the restore of V2 started")
            assert restoring["version"] == V2 and status_of(e2e)["stableVersion"] == V1
            wait_until(lambda: status_of(e2e).get("stableVersion") == V2, 300, interval=0.2, message="back on V2")
            switched_out = time.time() - outside
            wait_until(lambda: first_response_from(list(load.results), V2, outside), 30, interval=0.1,
                       message=f"a response from {V2}")
            traffic_out = first_response_from(list(load.results), V2, outside)
            wait_until(lambda: watcher.samples[-1].ready.get(V1, 0) == 0, 60, message=f"{V1} scaled down")
            time.sleep(2)
        finally:
            results = load.stop()
    failed = [r for r in results if r.failed]
    counts = loadgen.count_by_version(loadgen.attribute(results, e2e.conntrack(), watcher.pod_versions))
    before_v2_ready = [s for s in watcher.samples if s.t >= outside and s.selected == V1]
    cold = [s for s in before_v2_ready if s.ready.get(V2, 0) < REPLICAS]
    min_in, min_out = watcher.min_serving(inside), watcher.min_serving(outside)
    record(name, requests=counts, timings={
        "inside the window: annotate -> stable switched (s)": round(switched_in, 2),
        "inside the window: annotate -> first response from the old version (s)": round(traffic_in - inside, 2)
        if traffic_in else None,
        "outside: annotate -> switched, the kept version's cold start included (s)": round(switched_out, 1),
        "outside: annotate -> first response from it (s)": round(traffic_out - outside, 1) if traffic_out else None,
    }, facts={
        "requests sent": len(results), "failed requests": len(failed),
        "fewest ready pods behind the Service, inside / outside": f"{min_in} / {min_out} (spec {REPLICAS})",
        "polls while the cold version started (Service kept on the serving one)": len(cold),
    })
    assert not failed, failed[:3]
    assert min_in >= REPLICAS and min_out >= REPLICAS, (min_in, min_out)
    assert cold, "the cold version was never seen starting: the scenario showed nothing"
    assert not any(s.selected == V2 and s.ready.get(V2, 0) < REPLICAS for s in watcher.samples if s.t >= outside)
    assert traffic_in is not None and traffic_out is not None
    record(name, outcome="passed")


def test_11_blue_green_preview_switch_and_automatic_switch_back(production: E2E) -> None:
    name = "11 blue-green"
    e2e = production
    # Each version waits behind the preview for shipyard.dev/promote (what a smoke test or a person sets).
    rollout = {"strategy": "blueGreen", "scaleDownDelaySeconds": 5,
               "blueGreen": {"autoPromotion": False, "postPromotionAnalysis": accuracy_analysis()}}
    apply(e2e, V2, rollout)  # the strategy changes on the stable: nothing rolls out
    time.sleep(2)
    with TrafficWatcher(e2e) as watcher:
        load = start_load(e2e)
        try:
            started = time.time()
            apply(e2e, V3, rollout)
            wait_until(lambda: status_of(e2e).get("previewVersion") == V3, 60, message="the preview")
            preview_port = e2e.service_port(naming.build_preview_service_name(MODEL))
            wait_until(lambda: status_of(e2e).get("pausedReason") == "ManualStep", 300, interval=0.5,
                       message=f"{V3} Ready behind the preview")
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": SAMPLES[0]}]}
            code, previewed = post_json(preview_port, f"/v2/models/{MODEL}/infer", body)
            previewed_at = time.time()
            still_stable = status_of(e2e).get("activeVersion")
            promote(e2e, V3)
            wait_until(lambda: (st := status_of(e2e)).get("stableVersion") == V3 and st.get("phase") == "Healthy",
                       300, interval=0.5, message=f"{V3} promoted")
            promoted = time.time()
            wait_until(lambda: watcher.samples[-1].ready.get(V2, 0) == 0, 90, message=f"{V2} scaled down")
            # An inaccurate version: every answer a 200; the post-promotion accuracy Job fails it.
            bad_at = time.time()
            apply(e2e, BAD, rollout)
            wait_until(lambda: (st := status_of(e2e)).get("previewVersion") == BAD and
                       st.get("pausedReason") == "ManualStep", 300, interval=0.5, message=f"{BAD} in preview")
            promote(e2e, BAD)
            wait_until(lambda: status_of(e2e).get("activeVersion") == BAD, 60, interval=0.1,
                       message=f"switched to {BAD}")
            switched = time.time()
            wait_until(lambda: status_of(e2e).get("phase") == "RolledBack", 300, interval=0.2,
                       message=f"{BAD} switched back")
            switched_back = time.time()
            wait_until(lambda: watcher.samples[-1].ready.get(BAD, 0) == 0, 90, message=f"{BAD} scaled down")
            time.sleep(2)
        finally:
            results = load.stop()
    status = status_of(e2e)
    failed = [r for r in results if r.failed]
    counts = loadgen.count_by_version(loadgen.attribute(results, e2e.conntrack(), watcher.pod_versions))
    wrong = sum(1 for r in results if r.version == BAD and r.correct is False)
    record(name, requests=counts, timings={
        "apply -> promoted, preview and post-promotion accuracy Job included (s)": round(promoted - started, 1),
        "inaccurate: apply -> switched (s)": round(switched - bad_at, 1),
        "inaccurate: switched -> switched back (post-promotion analysis) (s)": round(switched_back - switched, 1),
    }, facts={
        "preview answered as": f"{previewed.get('model_version')} (HTTP {code}) while the Service was on "
                               f"{still_stable}",
        "requests sent": len(results), "failed requests": len(failed),
        "wrong answers from the inaccurate version while active": wrong,
        "fewest ready pods behind the Service": f"{watcher.min_serving(started)} (spec {REPLICAS})",
        "status": f"{status.get('phase')}: {status.get('message')}",
    })
    assert code == 200 and previewed.get("model_version") == V3 and still_stable == V2, (code, previewed)
    assert previewed_at < promoted
    assert not failed, failed[:3]
    assert watcher.min_serving(started) >= REPLICAS
    assert status["stableVersion"] == V3 and status["history"][-1]["version"] == BAD
    assert status["history"][-1]["outcome"] == "RolledBack" and "post-promotion" in status["message"]
    assert counts.get(V3, {}).get("served") and counts.get(BAD, {}).get("served")  # it was really switched to
    record(name, outcome="passed")
