"""Scenario 18: a shadow step judged by prediction agreement, under 20 req/s through the model's Service.

1. a good candidate (the same model in a new tag) is shadowed with every request, agrees with the stable on >= 0.99
   of the compared rows, and proceeds to its weighted step and promotion;
2. a candidate whose model disagrees on about a tenth of the inputs (``*-disagree``: it never answers 0) is rolled
   back by ``predictionAgreement`` (min 0.99) near 0.90, and no client ever got one of its answers.
The client's p50/p99 with and without shadowing are recorded beside (the benchmark, bench/shadow_bench.py, measures
them at 20 and 200 req/s with the candidate on its own core).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import pytest

from tests.e2e import loadgen
from tests.e2e.conftest import E2E, Poller, record
from tests.e2e.test_rollout import LABELS, SAMPLES
from tests.integration.conftest import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]
NAMESPACE = "e2e-shadow"
MODEL = "digits"
IMAGE = "registry.example/shipyard/digits-model"
V1, V2, DISAGREE = "1.0.0", "1.1.0", "1.2.0-disagree"
RATE = 20.0
MIN_REQUESTS = 300
MIN_AGREEMENT = 0.99
# The *-disagree model agrees with the good one on this share of the digits eval split (it never answers 0): what
# the copies of live requests should show, within a binomial bound over the copies compared.
DISAGREE_AGREEMENT = 0.902
SIGMAS = 4.0


def model(tag: str) -> dict[str, Any]:
    return {"apiVersion": "shipyard.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": MODEL, "namespace": NAMESPACE},
            "spec": {"image": f"{IMAGE}:{tag}", "model": {"path": "/models/digits", "output": {"kind": "classes"}},
                     "serving": {"replicas": 2,
                                 "resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                                               "limits": {"cpu": "1", "memory": "1Gi"}}},
                     "rollout": {"startupTimeoutSeconds": 300,
                                 "steps": [{"shadow": {"percent": 100, "minRequests": MIN_REQUESTS}},
                                           {"weight": 50, "pause": "4s"}],
                                 "analysis": {"interval": "2s", "failureLimit": 1, "minSamples": 1,
                                              "metrics": [{"name": "agreement", "builtin": "predictionAgreement",
                                                           "min": MIN_AGREEMENT},
                                                          {"name": "error-rate", "builtin": "errorRate",
                                                           "max": 0.05}]}}}}


class StatusWatcher(Poller):
    """Samples (time, phase, step, status.shadow) every 0.25 s."""

    def __init__(self, e2e: E2E) -> None:
        super().__init__()
        self.e2e = e2e
        self.samples: list[tuple[float, str, int | None, dict[str, Any]]] = []

    def poll(self) -> None:
        status = self.e2e.md(MODEL).get("status") or {}
        self.samples.append((time.time(), str(status.get("phase")), status.get("currentStepIndex"),
                             dict(status.get("shadow") or {})))

    def shadows(self) -> list[dict[str, Any]]:
        return [s for _, _, _, s in self.samples if s]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latencies(results: list[loadgen.Result], start: float, end: float) -> dict[str, float | int | None]:
    window = [r.finished - r.started for r in results if start <= r.started < end and not r.failed]
    p50, p99 = percentile(window, 0.50), percentile(window, 0.99)
    return {"requests": len(window), "p50 ms": round(p50 * 1000, 1) if p50 is not None else None,
            "p99 ms": round(p99 * 1000, 1) if p99 is not None else None}


@pytest.fixture(scope="module")
def sx(e2e: E2E) -> E2E:
    e2e.cluster.kubectl("create", "namespace", NAMESPACE)
    return dataclasses.replace(e2e, namespace=NAMESPACE)


def status(e2e: E2E) -> dict[str, Any]:
    return dict(e2e.md(MODEL).get("status") or {})


def test_18_shadow_step_promotes_an_agreeing_candidate_and_rolls_back_a_disagreeing_one(sx: E2E) -> None:
    e2e = sx
    name = "18 shadow step judged by predictionAgreement"
    e2e.cluster.apply(model(V1), NAMESPACE)
    wait_until(lambda: status(e2e).get("phase") == "Healthy", timeout=300, message=f"{V1} Healthy")
    load = loadgen.LoadGenerator(e2e.service_port(MODEL), MODEL, SAMPLES, LABELS, rate=RATE,
                                 max_seconds=600).start()
    try:
        with StatusWatcher(e2e) as good:
            time.sleep(10)  # 10 s at rest: the client's latency without shadowing
            good_at = time.time()
            e2e.cluster.apply(model(V2), NAMESPACE)
            wait_until(lambda: status(e2e).get("stableVersion") == V2, timeout=400, message=f"{V2} promoted")
            promoted_at = time.time()
        with StatusWatcher(e2e) as bad:
            bad_at = time.time()
            e2e.cluster.apply(model(DISAGREE), NAMESPACE)
            wait_until(lambda: status(e2e).get("phase") == "RolledBack", timeout=400,
                       message=f"{DISAGREE} rolled back")
            rolled_at = time.time()
            time.sleep(3)
    finally:
        results = load.stop()
    md = e2e.md(MODEL)
    served = {v: sum(1 for r in results if r.version == v) for v in (V1, V2, DISAGREE)}
    failed = [r for r in results if r.failed]
    good_shadow = good.shadows()
    bad_shadow = bad.shadows()
    good_last = good_shadow[-1] if good_shadow else {}
    bad_last = bad_shadow[-1] if bad_shadow else {}
    shadow_end = max((t for t, _, step, s in good.samples if s), default=promoted_at)
    # The candidate's answers reach no client during its shadow step (the model's Service selects the stable only).
    v2_during_shadow = [r for r in results if r.version == V2 and good_at <= r.finished < shadow_end]
    entry = md["status"]["history"][-1]
    record(name, facts={
        "requests": len(results), "served by version": served, "failed": len(failed),
        f"{V2}: last status.shadow": good_last,
        f"{V2}: apply -> promoted (s)": round(promoted_at - good_at, 1),
        f"{V2}: client answers from {V2} during its shadow step": len(v2_during_shadow),
        f"{DISAGREE}: last status.shadow": bad_last,
        f"{DISAGREE}: apply -> RolledBack (s)": round(rolled_at - bad_at, 1),
        f"{DISAGREE}: history": entry,
        "client latency at rest (10 s, 20 req/s, no shadowing)": latencies(results, good_at - 10, good_at),
        f"client latency while {V2} was shadowed (100%)": latencies(results, good_at, shadow_end),
    })
    assert not failed, failed[:5]
    assert good_last.get("agreement") is not None and good_last["agreement"] >= MIN_AGREEMENT, good_last
    assert (good_last.get("compared") or 0) > 0, good_last
    assert not v2_during_shadow, v2_during_shadow[:3]
    assert served[DISAGREE] == 0, "a client got an answer of the disagreeing candidate"
    # Rolled back within a few measurements, on few copies (tens): the agreement that failed it (the history's
    # message; status.shadow is cleared in the same write) is near 0.90, within a binomial bound over the copies the
    # watcher last saw compared (at most that many: a conservative bound), and below the analysis' min.
    found = re.search(r"([0-9.]+) < min", entry.get("message", ""))
    assert found, entry
    measured = float(found.group(1))
    compared = max(1, int(bad_last.get("compared") or 0))
    spread = SIGMAS * math.sqrt(DISAGREE_AGREEMENT * (1 - DISAGREE_AGREEMENT) / compared)
    assert measured < MIN_AGREEMENT and abs(measured - DISAGREE_AGREEMENT) <= spread, (measured, compared, spread)
    assert entry["version"] == DISAGREE and entry["outcome"] == "RolledBack", entry
    assert "agreement" in entry.get("message", ""), entry
    assert md["status"]["stableVersion"] == V2
    record(name, outcome="passed")
