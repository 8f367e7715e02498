"""Pure planning: the rollout state machine driven through every transition by a small simulated cluster
(tests/plansim.py: a fake API server, controllers, kubelet and clock around the planner).

Because the planner keeps everything in status, a restarted operator is the same planner on the same inputs:
``test_restart_in_every_phase_plans_the_same`` checks exactly that at every pass of every scenario.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from shipyard.operator import planning, providers, rollout
from shipyard.operator.spec import SpecError
from tests.plansim import ANALYSIS, COMPRESSION, CRD, IMAGE, JOB_ANALYSIS, STEPS, T0, Measure, Sim, good, md


def stable_sim(**spec: Any) -> Sim:
    """A model settled on 1.0.0, then spec changed to 1.1.0 with the given rollout settings."""
    sim = Sim(md("1.0.0", **spec)).settle()
    assert sim.status["phase"] == "Healthy"
    sim.set_spec(image=f"{IMAGE}:1.1.0")
    return sim


# --- pure helpers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("total", "weight", "expected"), [
    pytest.param(4, 25, 1, id="exact"),
    pytest.param(4, 10, 1, id="at-least-one"),
    pytest.param(3, 50, 2, id="rounds-up"),
    pytest.param(10, 100, 10, id="full"),
    pytest.param(0, 50, 0, id="no-replicas"),
    pytest.param(1, 1, 1, id="single-replica"),
])
def test_canary_replicas(total: int, weight: int, expected: int) -> None:
    assert planning.build_canary_replicas(total, weight) == expected


@pytest.mark.parametrize(("total", "canary", "ready", "surge", "now", "expected"), [
    pytest.param(4, 1, 0, None, (0, 4), (1, 4), id="cpu-surge-first-stable-stays"),
    pytest.param(4, 1, 1, None, (1, 4), (1, 3), id="cpu-candidate-ready-stable-shrinks"),
    pytest.param(4, 2, 1, None, (1, 3), (2, 3), id="cpu-next-step-shrinks-as-pods-come"),
    pytest.param(4, 2, 0, 0, None, (2, 2), id="gpu-no-spare-in-place"),
    pytest.param(4, 2, 0, 0, (0, 4), (0, 2), id="gpu-no-spare-stable-gives-back-first"),
    pytest.param(4, 2, 0, 0, (0, 2), (2, 2), id="gpu-no-spare-candidate-takes-what-was-given-back"),
    pytest.param(4, 2, 0, 1, None, (2, 3), id="gpu-one-spare-pod"),
    pytest.param(4, 2, 0, 1, (0, 4), (1, 3), id="gpu-one-spare-pod-used-at-once"),
    pytest.param(4, 4, 0, 0, None, (4, 0), id="gpu-promotion-in-place"),
    pytest.param(4, 4, 2, 0, (2, 2), (2, 0), id="gpu-promotion-waits-for-the-stable"),
    pytest.param(2, 1, 1, 0, (1, 4), (1, 1), id="gpu-replicas-lowered-running-candidate-kept"),
    pytest.param(4, 4, 2, None, (2, 2), (4, 2), id="promotion-surge"),
])
def test_step_replicas(total: int, canary: int, ready: int, surge: int | None, now: tuple[int, int] | None,
                       expected: tuple[int, int]) -> None:
    assert planning.plan_step_replicas(total, canary, ready, surge, now) == expected


@pytest.mark.parametrize(("gpus", "max_surge_gpus", "expected"), [
    pytest.param(0, None, None, id="cpu"),
    pytest.param(0, 0, None, id="cpu-ignores-gpu-limit"),
    pytest.param(1, None, None, id="gpu-unlimited"),
    pytest.param(2, 0, 0, id="gpu-in-place"),
    pytest.param(2, 5, 2, id="gpu-whole-pods"),
])
def test_surge_pods(gpus: int, max_surge_gpus: int | None, expected: int | None) -> None:
    body = md(serving={"replicas": 4, **({"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}} if gpus else {})},
              rollout={} if max_surge_gpus is None else {"maxSurgeGPUs": max_surge_gpus})
    from shipyard.operator import spec as spec_mod
    assert planning.build_surge_pods(spec_mod.parse_model_deployment(body).spec) == expected


# --- lifecycles ---------------------------------------------------------------------------------------------------


def test_first_version_is_deployed_at_full_size_and_becomes_healthy() -> None:
    sim = Sim(md("1.0.0")).settle()
    assert sim.replicas() == {"1.0.0": 4}
    assert sim.status["phase"] == "Healthy" and sim.status["stableVersion"] == "1.0.0"
    assert sim.condition("Ready") == ("True", "RolledOut")
    assert sim.condition("Reconciling")[0] == "False" and sim.condition("Stalled")[0] == "False"
    assert sim.history() == [("1.0.0", "Promoted")]
    assert sim.reasons() == ["Deploying", "Promoted"]
    assert "candidateVersion" not in sim.status


def test_canary_steps_pause_then_promote_and_keep_the_old_version() -> None:
    sim = stable_sim(rollout={"steps": STEPS})
    sim.step()
    assert sim.status["candidateVersion"] == "1.1.0" and sim.status["currentStepIndex"] == 0
    assert sim.replicas() == {"1.0.0": 4, "1.1.0": 1}  # surge first: the stable keeps serving
    sim.step()
    assert sim.replicas() == {"1.0.0": 3, "1.1.0": 1}  # 25%: one of four
    assert sim.plans[-1].requeue_after == pytest.approx(60.0)  # the pause from the step's ready time
    sim.run(lambda s: s.status.get("currentStepIndex") == 1)
    assert (sim.now - T0).total_seconds() >= 60
    sim.run(lambda s: s.replicas().get("1.1.0") == 2 and s.replicas().get("1.0.0") == 2)
    sim.settle()
    assert sim.replicas() == {"1.0.0": 0, "1.1.0": 4}
    assert sim.status["phase"] == "Healthy" and sim.status["stableVersion"] == "1.1.0"
    assert sim.history() == [("1.0.0", "Superseded"), ("1.1.0", "Promoted")]
    assert [r for r in sim.reasons() if r in ("RolloutStarted", "StepReady", "StepCompleted", "Promoted")] == [
        "Promoted", "RolloutStarted", "StepReady", "StepCompleted", "StepReady", "StepCompleted", "Promoted"]


def test_analysis_success_is_needed_before_promotion() -> None:
    sim = stable_sim(rollout={"steps": [{"weight": 50}], "analysis": ANALYSIS})
    sim.settle()
    assert sim.status["stableVersion"] == "1.1.0"
    assert sim.measured >= 2  # minSamples 2
    assert sim.status["analysis"]["phase"] == "Successful"
    assert sim.status["analysis"]["detectionBoundSeconds"] == 20.0


def test_failing_analysis_rolls_back_and_gitops_reapply_does_not_loop() -> None:
    sim = stable_sim(rollout={"steps": STEPS, "analysis": ANALYSIS})
    sim.measure = lambda version, now: 0.5 if version == "1.1.0" else 0.0
    sim.run(lambda s: s.status.get("phase") == "RolledBack").step()  # scaled down once the Service switched
    assert sim.replicas() == {"1.0.0": 4, "1.1.0": 0}
    assert sim.status["stableVersion"] == "1.0.0" and "candidateVersion" not in sim.status
    assert sim.condition("Stalled") == ("True", "AnalysisFailed")
    assert sim.condition("Ready")[0] == "False"
    assert sim.history()[-1] == ("1.1.0", "RolledBack")
    assert sum(p.rollbacks for p in sim.plans) == 1
    assert sim.status["analysis"]["phase"] == "Failed"
    assert sim.measured == 2  # failureLimit 1: the second failure decides
    # A GitOps tool applies the same manifest again and again: nothing restarts.
    before = len(sim.reasons())
    for _ in range(10):
        sim.body["metadata"]["generation"] += 1  # e.g. a label touched by the tool
        sim.step()
    assert sim.status["phase"] == "RolledBack" and sim.replicas() == {"1.0.0": 4, "1.1.0": 0}
    assert len(sim.reasons()) == before and sim.plans[-1].rollbacks == 0


@pytest.mark.parametrize("how", ["spec-retry", "annotation", "new-image"])
def test_a_failed_version_is_retried_only_when_asked(how: str) -> None:
    sim = stable_sim(rollout={"analysis": ANALYSIS})
    sim.measure = lambda version, now: 0.5
    sim.run(lambda s: s.status.get("phase") == "RolledBack").step()  # scaled down once the Service switched
    sim.measure = good
    if how == "spec-retry":
        sim.set_spec(retry=1)
    elif how == "annotation":
        sim.annotate("retry", "try-2")
    else:
        sim.set_spec(image=f"{IMAGE}:1.1.1")
    sim.settle()
    assert sim.status["phase"] == "Healthy"
    assert sim.status["stableVersion"] == ("1.1.1" if how == "new-image" else "1.1.0")
    assert ("1.1.0", "RolledBack") in sim.history()


def test_no_data_holds_the_step_without_flapping_then_resumes() -> None:
    sim = stable_sim(rollout={"steps": [{"weight": 25}], "analysis": ANALYSIS})
    sim.measure = lambda version, now: None
    sim.run(lambda s: s.status.get("phase") == "Paused")
    assert sim.status["pausedReason"] == "AnalysisInconclusive"
    for _ in range(20):
        sim.step()
    assert sim.status["phase"] == "Paused" and sim.replicas()["1.1.0"] == 1
    assert sim.reasons().count("AnalysisInconclusive") == 1 and "RolledBack" not in sim.reasons()
    sim.measure = good
    sim.settle()
    assert sim.status["stableVersion"] == "1.1.0"


DOWN = ConnectionError("connection refused")


def outage(start: float, end: float) -> Measure:
    """The provider is down (every query errs) from `start` to `end` seconds after T0, answers 0.0 otherwise."""
    return lambda version, now: DOWN if start <= (now - T0).total_seconds() < end else 0.0


@pytest.mark.parametrize(("steps", "min_samples", "error_limit", "outcome"), [
    pytest.param([{"weight": 25, "pause": "20s"}, {"weight": 50, "pause": "20s"}], 1, 20, "Healthy",
                 id="outage-after-min-samples-holds-the-steps"),
    pytest.param([{"weight": 50}], 3, 20, "Healthy", id="outage-before-min-samples-holds-the-last-step"),
    pytest.param([{"weight": 25, "pause": "20s"}, {"weight": 50, "pause": "20s"}], 1, 2, "RolledBack",
                 id="outage-beyond-consecutive-error-limit-rolls-back"),
])
def test_a_provider_outage_holds_the_step_until_it_answers_again(
        steps: list[dict[str, Any]], min_samples: int, error_limit: int, outcome: str) -> None:
    """Measurements that err say nothing about the candidate: the step holds (Paused, AnalysisInconclusive) as with
    no data, never advancing or promoting on the samples from before the outage, and resumes when the provider
    answers; an outage longer than consecutiveErrorLimit intervals fails the analysis (as documented)."""
    spec = {**ANALYSIS, "interval": "5s", "minSamples": min_samples, "consecutiveErrorLimit": error_limit}
    sim = stable_sim(rollout={"steps": steps, "analysis": spec})
    sim.run(lambda s: s.status.get("analysis") and s.status["analysis"]["metrics"][0]["successes"] >= 1)
    down_at = (sim.now - T0).total_seconds()
    sim.measure = outage(down_at, down_at + 60)
    step_at_outage = sim.status["currentStepIndex"]
    sim.run(lambda s: (s.now - T0).total_seconds() >= down_at + 60 or s.status.get("phase") == "RolledBack")
    if outcome == "RolledBack":
        assert sim.status["phase"] == "RolledBack" and sim.condition("Stalled") == ("True", "AnalysisFailed")
        assert sim.status["analysis"]["phase"] == "Error"
        return
    assert sim.status["phase"] == "Paused" and sim.status["pausedReason"] == "AnalysisInconclusive"
    assert sim.status["analysis"]["phase"] == "Inconclusive"
    assert "could not be measured" in sim.status["analysis"]["message"]
    assert sim.status["currentStepIndex"] == step_at_outage and sim.status["stableVersion"] == "1.0.0"
    assert sim.reasons().count("AnalysisInconclusive") == 1
    assert "StepCompleted" not in sim.reasons()[sim.reasons().index("AnalysisInconclusive"):]
    phases = [p.status["phase"] for p in sim.plans]
    assert phases.count("Paused") == len(phases) - phases.index("Paused")  # held from the first error on
    sim.settle()
    assert sim.status["phase"] == "Healthy" and sim.status["stableVersion"] == "1.1.0"
    assert sim.history() == [("1.0.0", "Superseded"), ("1.1.0", "Promoted")]
    assert "RolledBack" not in sim.reasons()


def test_a_candidate_never_ready_times_out_and_rolls_back() -> None:
    sim = stable_sim(rollout={"steps": STEPS, "startupTimeoutSeconds": 30})
    sim.broken.add("1.1.0")
    sim.run(lambda s: s.status.get("phase") == "RolledBack").step()  # scaled down once the Service switched
    assert sim.condition("Stalled") == ("True", "StartupTimeout")
    assert sim.replicas() == {"1.0.0": 4, "1.1.0": 0}
    assert 30 <= (sim.now - T0).total_seconds() <= 60


def test_first_version_never_ready_fails() -> None:
    sim = Sim(md("1.0.0", rollout={"startupTimeoutSeconds": 20}))
    sim.broken.add("1.0.0")
    sim.run(lambda s: s.status.get("phase") == "Failed")
    assert sim.condition("Stalled") == ("True", "StartupTimeout")
    assert sim.history() == [("1.0.0", "Failed")]


def test_manual_policy_pauses_on_failure_and_abort_rolls_back() -> None:
    sim = stable_sim(rollout={"analysis": ANALYSIS}, rollback={"policy": "Manual"})
    sim.measure = lambda version, now: 0.5
    sim.run(lambda s: s.status.get("phase") == "Paused")
    assert sim.status["pausedReason"] == "AnalysisFailed"
    for _ in range(5):
        sim.step()
    assert sim.status["phase"] == "Paused" and sim.replicas()["1.1.0"] == 4 and "RolledBack" not in sim.reasons()
    assert sim.reasons().count("AnalysisFailed") == 1  # the pause is told once, in a Warning Event
    sim.annotate("abort", "1.1.0")
    sim.settle()
    assert sim.status["phase"] == "RolledBack" and sim.history()[-1] == ("1.1.0", "Aborted")
    assert sim.replicas() == {"1.0.0": 4, "1.1.0": 0}


def test_manual_step_waits_for_promote_which_skips_the_rest() -> None:
    sim = stable_sim(rollout={"steps": [{"weight": 25, "manual": True}, {"weight": 50, "pause": "1h"}]})
    sim.run(lambda s: s.status.get("pausedReason") == "ManualStep")
    for _ in range(5):
        sim.step()
    assert sim.status["phase"] == "Paused" and sim.replicas()["1.1.0"] == 1
    assert sim.reasons().count("ManualStep") == 1
    sim.annotate("promote", "1.1.0")
    sim.settle()
    assert sim.status["stableVersion"] == "1.1.0" and (sim.now - T0).total_seconds() < 3600
    assert "PromotedManually" in sim.reasons()


def test_a_stale_promote_annotation_does_nothing() -> None:
    sim = stable_sim(rollout={"steps": [{"weight": 25, "manual": True}]})
    sim.annotate("promote", "0.9.0")
    sim.run(lambda s: s.status.get("pausedReason") == "ManualStep")
    sim.step()
    assert sim.status["phase"] == "Paused"


def test_rollback_to_a_kept_version() -> None:
    sim = stable_sim()
    sim.settle()
    assert sim.status["stableVersion"] == "1.1.0"
    sim.annotate("rollback-to", "1.0.0")
    sim.settle()
    assert sim.status["stableVersion"] == "1.0.0" and sim.replicas() == {"1.0.0": 4, "1.1.0": 0}
    assert sim.status["phase"] == "RolledBack" and sim.history()[-1] == ("1.1.0", "RolledBack")
    assert sim.plans[-1].rollbacks == 0 and sum(p.rollbacks for p in sim.plans) == 1


def test_rollback_to_an_unknown_version_is_refused_with_an_event() -> None:
    sim = Sim(md("1.0.0")).settle()
    sim.annotate("rollback-to", "0.1.0")
    sim.settle()
    assert sim.status["stableVersion"] == "1.0.0" and "RollbackRefused" in sim.reasons()


def test_analysis_keeps_measuring_while_the_next_steps_pods_start() -> None:
    bad = {"now": False}
    sim = stable_sim(rollout={"steps": STEPS, "analysis": ANALYSIS})
    sim.measure = lambda version, now: 0.5 if bad["now"] else 0.0
    sim.run(lambda s: s.status.get("stepReadyAt") is not None)
    sim.frozen.add("1.1.0")  # step 1's extra pods never get ready; step 0's keep serving
    sim.run(lambda s: s.status.get("currentStepIndex") == 1)
    assert sim.status.get("stepReadyAt") is None
    measured, bad["now"] = sim.measured, True
    sim.run(lambda s: s.status.get("phase") == "RolledBack", max_passes=20).step()  # 100 s, before startup timeout
    assert sim.measured > measured
    assert "error-rate" in sim.status["message"] and sim.status.get("stepReadyAt") is None
    assert sim.replicas()["1.1.0"] == 0 and sim.replicas()["1.0.0"] == 4


def test_the_stable_only_shrinks_while_the_candidate_controller_catches_up() -> None:
    sim = stable_sim(rollout={"steps": [{"weight": 25}, {"weight": 50}, {"weight": 75}]})
    sim.lagging.update({"1.0.0", "1.1.0"})
    stable_sizes = []
    while sim.status.get("stableVersion") != "1.1.0":
        sim.step()
        stable_sizes.append(sim.replicas().get("1.0.0", 0))
        assert len(stable_sizes) < 100
    assert stable_sizes == sorted(stable_sizes, reverse=True), stable_sizes  # never scaled back up
    assert sim.replicas()["1.1.0"] == 4


def test_no_measurement_between_steps_before_an_analysis_began() -> None:
    sim = stable_sim(rollout={"steps": STEPS, "analysis": ANALYSIS})
    sim.broken.add("1.1.0")
    sim.run(lambda s: s.status.get("candidateVersion") == "1.1.0")
    for _ in range(5):
        sim.step()
    assert sim.measured == 0 and sim.status.get("analysis") is None


def test_a_newer_tag_replaces_a_candidate_in_flight() -> None:
    sim = stable_sim(rollout={"steps": [{"weight": 25, "pause": "1h"}]})
    sim.run(lambda s: s.status.get("stepReadyAt") is not None)
    sim.set_spec(image=f"{IMAGE}:1.2.0")
    sim.run(lambda s: s.status.get("candidateVersion") == "1.2.0")
    assert ("1.1.0", "Superseded") in sim.history()
    assert sim.replicas()["1.1.0"] == 0
    # It never failed, so going back to it rolls it out again (a failed version would stay blocked).
    sim.set_spec(image=f"{IMAGE}:1.1.0", rollout={"steps": [{"weight": 25}]})
    sim.settle()
    assert sim.status["phase"] == "Healthy" and sim.status["stableVersion"] == "1.1.0"
    assert sim.history()[-3:] == [("1.1.0", "Superseded"), ("1.2.0", "Superseded"), ("1.1.0", "Promoted")]


def test_gpu_rollout_without_spare_gpus_replaces_in_place() -> None:
    serving = {"replicas": 4, "resources": {"limits": {"nvidia.com/gpu": "1"}}}
    sim = stable_sim(serving=serving, rollout={"steps": [{"weight": 50}], "maxSurgeGPUs": 0})
    sim.peak_replicas = 0
    while sim.status.get("stableVersion") != "1.1.0" or sim.plans[-1].scale:
        sim.step()
    # Never more GPU pods than replicas, after any single write: the operator applies the candidate before it
    # scales the stable, so the candidate may only grow into what the stable has already given back.
    assert sim.peak_replicas <= 4
    assert sim.replicas() == {"1.0.0": 0, "1.1.0": 4}


def test_gpu_rollout_with_one_spare_pod_never_exceeds_it() -> None:
    serving = {"replicas": 4, "resources": {"limits": {"nvidia.com/gpu": "2"}}}
    sim = stable_sim(serving=serving, rollout={"steps": [{"weight": 25}, {"weight": 75}], "maxSurgeGPUs": 3})
    sim.peak_replicas = 0
    sim.run(lambda s: s.status.get("stableVersion") == "1.1.0" and not s.plans[-1].scale and not s.plans[-1].apply)
    assert sim.peak_replicas <= 5  # 3 spare GPUs = one spare pod of 2 GPUs
    assert sim.replicas() == {"1.0.0": 0, "1.1.0": 4}


# --- compression --------------------------------------------------------------------------------------------------


def test_compression_job_then_rollout_serving_the_artifact() -> None:
    sim = Sim(md("1.0.0", compression=COMPRESSION))
    plan = sim.step()
    kinds = sorted(o["kind"] for o in plan.apply)
    assert kinds == ["ConfigMap", "Deployment", "Job", "Service"] or kinds == ["ConfigMap", "Job", "Service"]
    assert sim.status["phase"] == "Compressing" and sim.condition("Compressed")[0] == "Unknown"
    job = next(o for o in plan.apply if o["kind"] == "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][:2] == ["shipyard-runtime", "compress"]
    sim.settle()
    assert sim.status["phase"] == "Healthy"
    assert sim.condition("Compressed") == ("True", "ArtifactReady")
    (artifact,) = sim.status["artifacts"]
    assert artifact["phase"] == "Succeeded" and artifact["compressedBytes"] == 100
    dep = next(o for p in sim.plans for o in p.apply if o["kind"] == "Deployment")
    env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SHIPYARD_ARTIFACT_PATH"] == artifact["path"]
    assert sum(1 for p in sim.plans for o in p.apply if o["kind"] == "Job") == 1


def test_an_existing_artifact_is_reused_without_a_job() -> None:
    sim = Sim(md("1.0.0", compression=COMPRESSION)).settle()
    sim.jobs.clear()  # e.g. the Job's TTL expired
    sim.set_spec(serving={"replicas": 5})
    sim.settle()
    assert not any(o["kind"] == "Job" for p in sim.plans[3:] for o in p.apply)


def test_a_failed_compression_gate_stalls_without_rollout() -> None:
    sim = Sim(md("1.0.0")).settle()
    sim.job_outcome = ("Failed", "rejected: accuracy 0.62 vs 0.97, relative loss 0.361 > 0.01")
    sim.set_spec(image=f"{IMAGE}:1.1.0", compression=COMPRESSION)
    sim.settle()
    assert sim.status["phase"] == "Failed"
    assert sim.condition("Compressed")[0] == "False"
    assert sim.condition("Stalled") == ("True", "CompressionFailed")
    assert "relative loss 0.361" in sim.status["message"]
    assert "1.1.0" not in sim.replicas() and sim.replicas() == {"1.0.0": 4}
    assert sim.history()[-1] == ("1.1.0", "Failed")
    jobs = sum(1 for p in sim.plans for o in p.apply if o["kind"] == "Job")
    for _ in range(5):
        sim.step()
    assert sum(1 for p in sim.plans for o in p.apply if o["kind"] == "Job") == jobs  # not retried


def test_missing_artifact_volume_is_stalled_with_a_clear_message() -> None:
    sim = Sim(md("1.0.0", compression=COMPRESSION))
    sim.missing_pvc = "shipyard-artifacts"
    sim.step()
    assert sim.condition("Stalled") == ("True", "ArtifactVolumeMissing")
    assert "PersistentVolumeClaim 'shipyard-artifacts'" in sim.status["message"]
    assert not any(o["kind"] == "Job" for o in sim.plans[-1].apply)
    for _ in range(3):
        sim.step()
    assert sim.reasons().count("ArtifactVolumeMissing") == 1 and sim.plans[-1].requeue_after == 10.0
    sim.missing_pvc = None  # the PVC was created
    sim.settle()
    assert sim.status["phase"] == "Healthy" and sim.condition("Stalled") == ("False", "AsExpected")


def test_the_retry_annotation_retries_a_failed_compression_with_a_new_job() -> None:
    sim = Sim(md("1.0.0")).settle()
    sim.job_outcome = ("Failed", "rejected: relative loss 0.361 > 0.01")
    sim.set_spec(image=f"{IMAGE}:1.1.0", compression=COMPRESSION)
    sim.settle()
    assert sim.condition("Stalled") == ("True", "CompressionFailed")
    (failed,) = sim.jobs
    sim.job_outcome = ("Succeeded", "accepted: sourceBytes=1000 compressedBytes=90")
    sim.annotate("retry", "after-fixing-the-data")
    sim.settle()
    assert sim.status["phase"] == "Healthy" and sim.status["stableVersion"] == "1.1.0"
    assert failed not in sim.jobs and [name[-3:] for name in sim.jobs] == ["-a1"]
    assert list(sim.config_maps) == list(sim.jobs)  # the failed attempt's config went with its Job
    assert sim.status["artifacts"][-1]["attempt"] == 1 and sim.status["artifacts"][-1]["phase"] == "Succeeded"
    assert sim.reasons().count("Retrying") == 1 and sim.reasons().count("CompressionFailed") == 1
    assert sim.history()[-2:] == [("1.1.0", "Failed"), ("1.1.0", "Promoted")]


# --- health after the rollout -------------------------------------------------------------------------------------


def lose_pods(sim: Sim, version: str, ready: int) -> None:
    """Pods of a rolled-out version die (eviction, crash, node loss): the Deployment is current but short."""
    sim.deployments[version] = dataclasses.replace(sim.deployments[version], ready_replicas=ready,
                                                   available_replicas=ready)


def test_lost_pods_make_a_healthy_model_degraded_until_they_are_back() -> None:
    sim = Sim(md("1.0.0")).settle()
    lose_pods(sim, "1.0.0", 2)
    for _ in range(3):
        plan = sim.step()
        assert plan.apply == () and plan.scale == ()  # the Deployment controller replaces pods, not the operator
    assert sim.status["phase"] == "Degraded" and "2/4 replica(s) ready" in sim.status["message"]
    assert sim.condition("Ready") == ("False", "Degraded") and sim.condition("Stalled")[0] == "False"
    lose_pods(sim, "1.0.0", 0)
    sim.step()
    assert sim.condition("Serving") == ("False", "NoReadyReplicas")
    lose_pods(sim, "1.0.0", 4)
    sim.settle()
    assert sim.status["phase"] == "Healthy" and sim.condition("Ready") == ("True", "RolledOut")
    assert sim.reasons() == ["Deploying", "Promoted", "Degraded", "Recovered"]


@pytest.mark.parametrize(("ready", "phase"), [
    pytest.param(4, "Healthy", id="all-ready"),
    pytest.param(3, "Degraded", id="one-lost"),
    pytest.param(0, "Degraded", id="all-lost"),
])
def test_degraded_only_after_a_rollout(ready: int, phase: str) -> None:
    sim = Sim(md("1.0.0")).settle()
    lose_pods(sim, "1.0.0", ready)
    sim.step()
    assert sim.status["phase"] == phase
    # A scale-up is progress, not a loss: the new pods are starting.
    sim = Sim(md("1.0.0")).settle()
    sim.broken.add("1.0.0")
    sim.set_spec(serving={"replicas": 6})
    for _ in range(3):
        sim.step()
        assert sim.status["phase"] == "Progressing"


# --- model sources ------------------------------------------------------------------------------------------------


def deployment_of(plan: planning.Plan) -> dict[str, Any]:
    return next(o for o in plan.apply if o["kind"] == "Deployment")


def test_a_pvc_model_source_is_mounted_read_only_and_served() -> None:
    sim = Sim(md("1.0.0"))
    sim.body["spec"]["model"] = {"uri": "pvc://models/digits/1.0.0/"}
    pod = deployment_of(sim.step())["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    env = {e["name"]: e["value"] for e in server["env"]}
    assert env["SHIPYARD_ARTIFACT_PATH"] == "/model-source/digits/1.0.0"
    assert {"name": "model-source", "mountPath": "/model-source", "readOnly": True} in server["volumeMounts"]
    assert {"name": "model-source", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in \
        pod["volumes"]
    sim.settle()
    assert sim.status["phase"] == "Healthy"


def test_a_pvc_model_source_is_what_the_compression_job_reads() -> None:
    sim = Sim(md("1.0.0", compression=COMPRESSION))
    sim.body["spec"]["model"] = {"uri": "pvc://models/digits"}
    plan = sim.step()
    config_map = next(o for o in plan.apply if o["kind"] == "ConfigMap")
    assert '"source": "/model-source/digits"' in config_map["data"]["compression.json"]
    pod = next(o for o in plan.apply if o["kind"] == "Job")["spec"]["template"]["spec"]
    assert {"name": "model-source", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in \
        pod["volumes"]
    sim.settle()
    served = deployment_of(next(p for p in sim.plans if any(o["kind"] == "Deployment" for o in p.apply)))
    assert "model-source" not in str(served)  # the artifact is served, from the artifacts volume


@pytest.mark.parametrize("compression", [None, COMPRESSION], ids=["serving", "compression"])
def test_a_missing_model_volume_is_stalled_until_it_exists(compression: dict[str, Any] | None) -> None:
    sim = Sim(md("1.0.0")).settle()
    sim.body["spec"]["model"] = {"uri": "pvc://models/digits"}
    if compression:
        sim.body["spec"]["compression"] = compression
    sim.set_spec(image=f"{IMAGE}:1.1.0")
    sim.missing_pvc = "models"
    for _ in range(3):
        plan = sim.step()
        assert not any(o["kind"] in ("Job", "Deployment") for o in plan.apply)
    assert sim.condition("Stalled") == ("True", "ModelVolumeMissing")
    assert "PersistentVolumeClaim 'models' (spec.model.uri) does not exist in namespace ml" in sim.status["message"]
    assert sim.replicas() == {"1.0.0": 4} and sim.reasons().count("ModelVolumeMissing") == 1
    assert plan.requeue_after == 10.0  # PVCs are not watched: it looks again
    sim.missing_pvc = None
    sim.settle()
    assert sim.status["phase"] == "Healthy" and sim.status["stableVersion"] == "1.1.0"


@pytest.mark.parametrize(("spec", "status", "expected"), [
    pytest.param({"model": {"path": "/m"}}, {}, (), id="image-path-nothing-to-check"),
    pytest.param({"model": {"uri": "pvc://models/d"}}, {}, ("models",), id="model-claim-until-served"),
    pytest.param({"model": {"uri": "pvc://models/d"}}, {"stableVersion": "1.0.0"}, (), id="model-claim-served"),
    pytest.param({"model": {"path": "/m"}, "compression": COMPRESSION}, {}, ("shipyard-artifacts",),
                 id="artifacts-claim-while-compressing"),
    pytest.param({"model": {"uri": "pvc://models/d"}, "compression": COMPRESSION}, {},
                 ("models", "shipyard-artifacts"), id="both"),
    pytest.param({"model": {"uri": "pvc://models/d"}, "compression": COMPRESSION},
                 {"artifacts": [{"version": "1.0.0", "phase": "Succeeded"}]}, (), id="artifact-ready"),
    pytest.param({"model": {"uri": "pvc://shipyard-artifacts/d"}, "compression": COMPRESSION}, {},
                 ("shipyard-artifacts",), id="same-claim-once"),
])
def test_volume_checks(spec: dict[str, Any], status: dict[str, Any], expected: tuple[str, ...]) -> None:
    body = md("1.0.0")
    body["spec"].update(spec)
    parsed = planning.parse(body)
    assert not isinstance(parsed, SpecError)
    assert planning.plan_volume_checks(parsed, status) == expected


def test_a_model_source_this_version_cannot_fetch_is_stalled_and_keeps_the_stable() -> None:
    sim = Sim(md("1.0.0")).settle()
    sim.body["spec"]["model"] = {"uri": "gs://bucket/digits"}
    sim.set_spec(image=f"{IMAGE}:1.1.0")
    plan = sim.step()
    assert sim.condition("Stalled") == ("True", "UnsupportedModelSource")
    assert "gs:// is not fetched by this operator version; use s3://" in sim.status["message"]
    assert plan.apply == () and plan.scale == () and sim.status["stableVersion"] == "1.0.0"
    assert [e.reason for e in plan.events] == ["UnsupportedModelSource"]


# --- idempotency and restarts -------------------------------------------------------------------------------------

SCENARIOS: dict[str, Callable[[], Sim]] = {
    "canary-steps": lambda: stable_sim(rollout={"steps": STEPS, "analysis": ANALYSIS}),
    "rollback": lambda: stable_sim(rollout={"steps": STEPS, "analysis": ANALYSIS}),
    "compression": lambda: Sim(md("1.0.0", compression=COMPRESSION)),
    "gpu-in-place": lambda: stable_sim(serving={"replicas": 4, "resources": {"limits": {"nvidia.com/gpu": "1"}}},
                                       rollout={"steps": [{"weight": 50}], "maxSurgeGPUs": 0}),
    "manual-pause": lambda: stable_sim(rollout={"steps": STEPS, "analysis": ANALYSIS}, rollback={"policy": "Manual"}),
    "manual-step": lambda: stable_sim(rollout={"steps": [{"weight": 25, "manual": True}]}),
    "failed-compression": lambda: Sim(md("1.0.0", compression=COMPRESSION)),
    "startup-timeout": lambda: Sim(md("1.0.0", rollout={"startupTimeoutSeconds": 60})),
    "job-metric": lambda: stable_sim(rollout={"steps": STEPS, "analysis": JOB_ANALYSIS}),
    "job-metric-failing": lambda: stable_sim(rollout={"steps": STEPS, "analysis": JOB_ANALYSIS}),
}
END_PHASES = {"manual-pause": "Paused", "manual-step": "Paused", "failed-compression": "Failed",
              "startup-timeout": "Failed", "rollback": "RolledBack", "job-metric-failing": "RolledBack"}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_restart_in_every_phase_plans_the_same(scenario: str) -> None:
    """At every pass, a fresh planner fed only what is stored (status + cluster) plans exactly the same."""
    sim = SCENARIOS[scenario]()
    if scenario in ("rollback", "manual-pause"):
        sim.measure = lambda version, now: 0.5 if version == "1.1.0" else 0.0
    if scenario == "failed-compression":
        sim.job_outcome = ("Failed", "rejected: relative loss 0.361 > 0.01")
    if scenario == "startup-timeout":
        sim.broken.add("1.0.0")
    if scenario == "job-metric-failing":
        sim.analysis_outcome = lambda version: ("Succeeded", "accuracy 0.80 [value=0.8]", 0)
    for _ in range(60):
        first = sim.plan()
        again = sim.plan()  # a restarted operator: same stored inputs, nothing in memory
        assert first == again
        sim.step()
    assert sim.status["phase"] == END_PHASES.get(scenario, "Healthy")


def test_a_settled_model_plans_no_writes() -> None:
    sim = stable_sim(rollout={"steps": STEPS}).settle()
    for _ in range(3):
        plan = sim.step()
        assert plan.apply == () and plan.scale == () and plan.delete == () and plan.events == ()
        assert plan.requeue_after is None


def test_revision_history_limit_deletes_the_oldest_versions() -> None:
    sim = Sim(md("1.0.0", revisionHistoryLimit=1)).settle()
    for tag in ("1.1.0", "1.2.0", "1.3.0"):
        sim.set_spec(image=f"{IMAGE}:{tag}")
        sim.settle()
    assert sorted(sim.replicas()) == ["1.2.0", "1.3.0"]


def test_condition_transition_time_moves_only_on_flips() -> None:
    earlier = [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    same = planning.build_condition("Ready", True, "RolledOut", "", 3, earlier, T0)
    flipped = planning.build_condition("Ready", False, "Progressing", "", 3, earlier, T0)
    assert same["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert flipped["lastTransitionTime"] == "2026-11-28T12:00:00Z"


def test_invalid_spec_is_stalled_and_keeps_the_stable() -> None:
    sim = Sim(md("1.0.0")).settle()
    sim.body["spec"]["serving"]["replicas"] = -3  # what an old object could hold
    plan = sim.step()
    assert sim.condition("Stalled") == ("True", "InvalidSpec")
    assert "spec.serving.replicas" in sim.status["message"]
    assert sim.status["stableVersion"] == "1.0.0" and plan.apply == () and plan.scale == ()


# --- what the API server keeps ------------------------------------------------------------------------------------


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "status") -> list[str]:
    """Paths in `value` that the CRD's structural schema does not declare: the API server prunes them silently, so
    state kept there would be lost on the next read (as an attempt counter once was)."""
    if isinstance(value, dict) and schema.get("type") == "object":
        if "additionalProperties" in schema or schema.get("x-kubernetes-preserve-unknown-fields"):
            return []
        properties = schema.get("properties", {})
        return [p for k, v in value.items() if v is not None for p in
                ([f"{path}.{k}"] if k not in properties else unknown_fields(v, properties[k], f"{path}.{k}"))]
    if isinstance(value, list) and schema.get("type") == "array":
        return [p for i, v in enumerate(value) for p in unknown_fields(v, schema["items"], f"{path}[{i}]")]
    return []


def test_every_status_field_the_planner_writes_is_in_the_crd_schema() -> None:
    status_schema = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "properties"]["status"]
    statuses: list[dict[str, Any]] = []
    for scenario in SCENARIOS:
        sim = SCENARIOS[scenario]()
        if scenario in ("rollback", "manual-pause"):
            sim.measure = lambda version, now: 0.5 if version == "1.1.0" else 0.0
        if scenario == "failed-compression":
            sim.job_outcome = ("Failed", "rejected: relative loss 0.361 > 0.01")
        if scenario == "job-metric-failing":
            sim.analysis_outcome = lambda version: ("Failed", "could not reach the endpoint", 2)
        for _ in range(40):
            statuses.append(sim.step().status)
        if scenario == "failed-compression":
            sim.annotate("retry", "again")
            sim.annotate("rollback-to", "1.0.0")
            statuses += [sim.step().status for _ in range(5)]
    lost = sorted({p for status in statuses for p in unknown_fields(status, status_schema)})
    assert lost == []



# --- job metrics: a Job per measurement, created and read back by the planner ------------------------------------


def test_a_job_metric_runs_one_job_per_measurement_against_the_candidates_own_service() -> None:
    sim = stable_sim(rollout={"steps": STEPS, "analysis": JOB_ANALYSIS})
    sim.run(lambda s: bool(s.analysis_jobs))
    first = sim.analysis_jobs[0]
    assert first["metadata"]["name"] == providers.job.build_job_name("digits", "1.1.0", "accuracy", 0)
    env = {e["name"]: e["value"] for e in first["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SHIPYARD_ENDPOINT"] == "http://digits-1-1-0.ml.svc:8080"
    assert env["SHIPYARD_REFERENCE_ENDPOINT"] == "http://digits-1-0-0.ml.svc:8080"
    assert env["SHIPYARD_MODEL_VERSION"] == "1.1.0" and env["SHIPYARD_STABLE_VERSION"] == "1.0.0"
    assert env["SHIPYARD_MODEL_NAME"] == "digits"  # the operator's value wins over a copy in the template
    assert set(sim.services) == {"digits", "digits-1-1-0", "digits-1-0-0"}  # the version Services the Job reaches
    sim.settle()
    assert sim.status["phase"] == "Healthy" and sim.status["stableVersion"] == "1.1.0"
    accuracy = sim.plans[-1].status["history"][-1]
    assert accuracy["outcome"] == "Promoted"
    # Two measurements (minSamples) per Job run, numbered 0, 1, ...; each Job's value judged by min 0.9.
    runs = sorted(int(j["metadata"]["labels"]["shipyard.dev/run"]) for j in sim.analysis_jobs)
    assert runs[:2] == [0, 1] and len(runs) == len(set(runs))
    # After the promotion, the version Services and every analysis Job are gone.
    assert set(sim.services) == {"digits"}
    assert not [j for j in sim.jobs.values() if not j.key]


@pytest.mark.parametrize(("outcome", "verdict", "message"), [
    pytest.param(("Succeeded", "accuracy 0.80 [value=0.8]", 0), "Failed", "0.8 < min 0.9", id="value-below-min-fails"),
    pytest.param(("Failed", "accuracy 0.80 below --min", 1), "Failed", "exit code 1: accuracy 0.80 below --min",
                 id="exit-1-fails"),
    pytest.param(("Failed", "could not reach the endpoint", 2), "Error",
                 "the Job could not measure (exit code 2): could not reach the endpoint",
                 id="errors-beyond-the-limit-fail"),
])
def test_a_failing_job_metric_rolls_the_candidate_back(outcome: tuple[str, str, int], verdict: str,
                                                        message: str) -> None:
    sim = stable_sim(rollout={"steps": STEPS, "analysis": JOB_ANALYSIS})
    sim.analysis_outcome = lambda version: outcome
    sim.run(lambda s: s.status.get("phase") == "RolledBack").step()  # scaled down once the Service switched
    assert sim.condition("Stalled") == ("True", "AnalysisFailed")
    assert sim.replicas() == {"1.0.0": 4, "1.1.0": 0}
    metric = next(m for m in sim.plans[-1].status["analysis"]["metrics"] if m["name"] == "accuracy")
    assert metric["verdict"] == verdict and message in metric["message"]


def test_an_erring_job_holds_the_step_until_it_measures_again() -> None:
    sim = stable_sim(rollout={"steps": STEPS, "analysis": JOB_ANALYSIS})
    answers = iter([("Failed", "endpoint not ready", 2)])
    sim.analysis_outcome = lambda version: next(answers, ("Succeeded", "[value=0.95]", 0))
    sim.run(lambda s: s.status.get("pausedReason") == "AnalysisInconclusive")
    assert sim.status["phase"] == "Paused"
    sim.settle()
    assert sim.status["phase"] == "Healthy" and sim.status["stableVersion"] == "1.1.0"


def test_a_restarted_operator_finds_the_running_job_instead_of_starting_another() -> None:
    sim = stable_sim(rollout={"steps": STEPS, "analysis": JOB_ANALYSIS})
    sim.run(lambda s: bool(s.analysis_jobs))
    name = sim.analysis_jobs[-1]["metadata"]["name"]
    sim.jobs[name] = dataclasses.replace(sim.jobs[name], phase="Running")
    again = sim.plan()
    assert not [o for o in again.apply if o["kind"] == "Job"]  # the same run's Job exists: none is created


# --- the state machine --------------------------------------------------------------------------------------------


def test_every_phase_and_reason_the_planner_writes_is_an_enum_member() -> None:
    phases, reasons = set(), set()
    for scenario, make in SCENARIOS.items():
        sim = make()
        if scenario in ("rollback", "manual-pause"):
            sim.measure = lambda version, now: 0.5 if version == "1.1.0" else 0.0
        if scenario == "job-metric-failing":
            sim.analysis_outcome = lambda version: ("Succeeded", "[value=0.1]", 0)
        for _ in range(40):
            plan = sim.step()
            phases.add(plan.status["phase"])
            reasons |= {e.reason for e in plan.events}
            reasons |= {c["reason"] for c in plan.status["conditions"]}
            reasons |= {h["reason"] for h in plan.status.get("history") or []}
            if plan.status.get("pausedReason"):
                reasons.add(plan.status["pausedReason"])
    assert phases <= {p.value for p in rollout.Phase}
    assert reasons - {r.value for r in rollout.Reason} - {p.value for p in rollout.Phase} == set()
