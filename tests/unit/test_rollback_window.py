"""The rollback window, rollback-to without a moment of no ready pod, and blue-green, driven through the planner by
the simulated cluster (tests/plansim.py). ``Sim.min_serving`` is the fewest ready pods the model's Service selected
after any write of any pass: the figure these tests hold at spec.serving.replicas."""

from __future__ import annotations

from typing import Any

import pytest

from shipyard.operator import naming
from tests.plansim import ANALYSIS, IMAGE, Sim, md

REPLICAS = 4


def promoted(**rollout: Any) -> Sim:
    """1.0.0 stable, then 1.1.0 rolled out and promoted with the given rollout settings."""
    sim = Sim(md("1.0.0", rollout=rollout)).settle()
    sim.set_spec(image=f"{IMAGE}:1.1.0")
    sim.run(lambda s: s.status.get("stableVersion") == "1.1.0")
    sim.min_serving = None
    return sim


def version_selected(sim: Sim, service: str = "digits") -> str | None:
    return (sim.selectors.get(service) or {}).get(naming.LABEL_VERSION)


# --- the rollback window ------------------------------------------------------------------------------------------


def test_the_previous_stable_stays_ready_out_of_traffic_through_the_window() -> None:
    sim = promoted(scaleDownDelaySeconds=60)
    sim.step()
    assert sim.replicas() == {"1.0.0": REPLICAS, "1.1.0": REPLICAS}
    assert version_selected(sim) == "1.1.0"  # the kept version takes no traffic
    window = sim.status["rollbackWindow"]
    assert window["version"] == "1.0.0" and sim.status["phase"] == "Healthy"
    sim.run(lambda s: s.replicas()["1.0.0"] == 0)  # the window closes on its own (a timer, no event needed)
    assert "RollbackWindowClosed" in sim.reasons() and "rollbackWindow" not in sim.status
    sim.settle()
    assert sim.status["phase"] == "Healthy"


def test_rollback_to_inside_the_window_switches_at_once_with_no_cold_start() -> None:
    sim = promoted(scaleDownDelaySeconds=600)
    sim.step()
    sim.frozen.add("1.0.0")  # a pod of 1.0.0 started now would never become ready: none may be needed
    sim.annotate("rollback-to", "1.0.0")
    plan = sim.step()
    assert sim.status["stableVersion"] == "1.0.0" and version_selected(sim) == "1.0.0"
    assert plan.scale == () and sim.replicas()["1.1.0"] == REPLICAS  # traffic moves before any pod goes
    sim.settle()
    assert sim.replicas() == {"1.0.0": REPLICAS, "1.1.0": 0}
    assert sim.min_serving == REPLICAS
    assert sim.status["phase"] == "RolledBack" and sim.history()[-1] == ("1.1.0", "RolledBack")
    assert sum(p.rollbacks for p in sim.plans) == 1
    assert any("no cold start" in e.message for p in sim.plans for e in p.events)


def test_rollback_to_outside_the_window_scales_the_kept_version_up_before_traffic_moves() -> None:
    sim = promoted()  # canary default: no window
    sim.settle()
    assert sim.replicas() == {"1.0.0": 0, "1.1.0": REPLICAS}
    sim.frozen.add("1.0.0")  # its pods take time to start
    sim.annotate("rollback-to", "1.0.0")
    for _ in range(5):
        sim.step()
        assert sim.status["stableVersion"] == "1.1.0" and version_selected(sim) == "1.1.0"
        assert sim.replicas() == {"1.0.0": REPLICAS, "1.1.0": REPLICAS}
        assert sim.status["phase"] == "Progressing" and sim.status["restoring"]["version"] == "1.0.0"
    assert "RollbackStarted" in sim.reasons() and "RolledBack" not in sim.reasons()
    sim.frozen.discard("1.0.0")
    sim.deployments["1.0.0"] = sim._ready("1.0.0", REPLICAS)  # started
    sim.settle()
    assert sim.status["stableVersion"] == "1.0.0" and version_selected(sim) == "1.0.0"
    assert sim.replicas() == {"1.0.0": REPLICAS, "1.1.0": 0} and "restoring" not in sim.status
    assert sim.min_serving == REPLICAS
    assert any("cold start" in e.message and e.reason == "RolledBack" for p in sim.plans for e in p.events)


def test_rollback_to_a_version_that_never_starts_gives_up_and_keeps_the_current_one() -> None:
    sim = promoted(startupTimeoutSeconds=30)
    sim.settle()
    sim.broken.add("1.0.0")
    sim.annotate("rollback-to", "1.0.0")
    sim.run(lambda s: "RollbackRefused" in s.reasons())
    sim.settle()
    assert sim.status["stableVersion"] == "1.1.0" and sim.status["phase"] == "Healthy"
    assert sim.replicas() == {"1.0.0": 0, "1.1.0": REPLICAS} and sim.min_serving == REPLICAS


def test_a_new_rollout_ends_the_window() -> None:
    sim = promoted(scaleDownDelaySeconds=600)
    sim.step()
    sim.set_spec(image=f"{IMAGE}:1.2.0")
    sim.run(lambda s: s.status.get("stableVersion") == "1.2.0")
    sim.step()
    assert sim.replicas()["1.0.0"] == 0 and "RollbackWindowClosed" in sim.reasons()
    assert sim.status["rollbackWindow"]["version"] == "1.1.0"


def test_the_window_keeps_only_what_the_gpu_surge_budget_allows() -> None:
    gpu = {"replicas": REPLICAS, "resources": {"limits": {"nvidia.com/gpu": "1"}}}
    sim = Sim(md("1.0.0", serving=gpu, rollout={"scaleDownDelaySeconds": 600, "maxSurgeGPUs": 2})).settle()
    sim.set_spec(image=f"{IMAGE}:1.1.0")
    sim.run(lambda s: s.status.get("stableVersion") == "1.1.0")
    for _ in range(3):
        sim.step()
    assert sim.replicas() == {"1.0.0": 2, "1.1.0": REPLICAS} and sim.peak_replicas <= REPLICAS + 2


# --- blue-green ---------------------------------------------------------------------------------------------------


def blue_green(**blue_green_spec: Any) -> Sim:
    rollout: dict[str, Any] = {"strategy": "blueGreen", "analysis": ANALYSIS}
    if blue_green_spec:
        rollout["blueGreen"] = blue_green_spec
    sim = Sim(md("1.0.0", rollout=rollout)).settle()
    assert version_selected(sim) == "1.0.0"
    sim.set_spec(image=f"{IMAGE}:1.1.0")
    sim.min_serving = None
    return sim


def test_blue_green_previews_switches_and_keeps_the_previous_version_warm() -> None:
    sim = blue_green()
    sim.run(lambda s: s.status.get("previewVersion") == "1.1.0" and s.replicas().get("1.1.0") == REPLICAS)
    assert version_selected(sim) == "1.0.0" and version_selected(sim, "digits-preview") == "1.1.0"
    assert sim.replicas()["1.0.0"] == REPLICAS
    sim.run(lambda s: s.status.get("stableVersion") == "1.1.0")
    assert version_selected(sim) == "1.1.0" and "Switched" in sim.reasons()
    assert sim.status["rollbackWindow"]["version"] == "1.0.0"  # 30 s by default for blue-green
    sim.step()
    assert "digits-preview" not in sim.services and sim.replicas() == {"1.0.0": REPLICAS, "1.1.0": REPLICAS}
    sim.settle()
    assert sim.replicas() == {"1.0.0": 0, "1.1.0": REPLICAS} and sim.status["phase"] == "Healthy"
    assert sim.min_serving == REPLICAS


def test_blue_green_switches_back_when_post_promotion_analysis_fails() -> None:
    sim = blue_green(postPromotionAnalysis=ANALYSIS)
    # the new version misbehaves only once it takes the real traffic
    sim.measure = lambda version, now: 0.5 if sim.status.get("activeVersion") == "1.1.0" else 0.0
    sim.run(lambda s: s.status.get("activeVersion") == "1.1.0")
    assert sim.status["stableVersion"] == "1.0.0" and sim.status["candidateVersion"] == "1.1.0"
    assert sim.replicas() == {"1.0.0": REPLICAS, "1.1.0": REPLICAS}
    sim.run(lambda s: s.status.get("phase") == "RolledBack")
    assert version_selected(sim) == "1.0.0" and "SwitchedBack" in sim.reasons()
    assert "post-promotion" in sim.status["message"]
    sim.settle()
    assert sim.replicas() == {"1.0.0": REPLICAS, "1.1.0": 0} and sim.min_serving == REPLICAS
    assert sim.history()[-1] == ("1.1.0", "RolledBack")


def test_blue_green_that_fails_before_the_switch_never_takes_traffic() -> None:
    sim = blue_green()
    sim.measure = lambda version, now: 0.5
    seen: set[str | None] = set()
    for _ in range(40):
        sim.step()
        seen.add(version_selected(sim))
        if sim.status.get("phase") == "RolledBack":
            break
    assert seen == {"1.0.0"} and sim.status["phase"] == "RolledBack"
    sim.settle()
    assert sim.replicas() == {"1.0.0": REPLICAS, "1.1.0": 0} and "digits-preview" not in sim.services


def test_blue_green_without_auto_promotion_waits_for_the_promote_annotation() -> None:
    sim = blue_green(autoPromotion=False)
    sim.run(lambda s: s.status.get("pausedReason") == "ManualStep")
    assert sim.status["phase"] == "Paused" and version_selected(sim) == "1.0.0"
    sim.annotate("promote", "1.1.0")
    sim.run(lambda s: s.status.get("stableVersion") == "1.1.0")
    assert version_selected(sim) == "1.1.0" and sim.min_serving == REPLICAS


@pytest.mark.parametrize(("max_surge_gpus", "waits"), [
    pytest.param(2, True, id="two-spare-gpus-for-four-pods-wait"),
    pytest.param(4, False, id="four-spare-gpus-fit"),
])
def test_blue_green_waits_when_the_gpu_surge_budget_cannot_hold_both(max_surge_gpus: int, waits: bool) -> None:
    gpu = {"replicas": REPLICAS, "resources": {"limits": {"nvidia.com/gpu": "1"}}}
    sim = Sim(md("1.0.0", serving=gpu, rollout={"strategy": "blueGreen", "maxSurgeGPUs": max_surge_gpus})).settle()
    sim.set_spec(image=f"{IMAGE}:1.1.0")
    for _ in range(10):
        sim.step()
    if waits:
        assert sim.status["phase"] == "Paused" and sim.status["pausedReason"] == "InsufficientGPUs"
        assert "maxSurgeGPUs" in sim.status["message"] and sim.replicas() == {"1.0.0": REPLICAS}
        assert "InsufficientGPUs" in sim.reasons()
    else:
        sim.settle()
        assert sim.status["stableVersion"] == "1.1.0"
        assert sim.peak_replicas <= REPLICAS + max_surge_gpus


def test_blue_green_abort_switches_back_before_the_candidate_goes() -> None:
    sim = blue_green(postPromotionAnalysis={**ANALYSIS, "initialDelay": "10m"})
    sim.run(lambda s: s.status.get("activeVersion") == "1.1.0")
    sim.annotate("abort", "1.1.0")
    plan = sim.step()
    assert version_selected(sim) == "1.0.0" and plan.scale == ()
    sim.settle()
    assert sim.replicas() == {"1.0.0": REPLICAS, "1.1.0": 0} and sim.min_serving == REPLICAS
    assert sim.history()[-1] == ("1.1.0", "Aborted")
