"""The shadow step (spec.rollout.steps[0].shadow) in the planner: the candidate beside a stable that keeps every
replica and all client traffic, the <model>-shadow ConfigMap that switches the stable's copying on and off, the
step's end (analysis passed, minRequests compared copies, duration), rollback, no data, and status.shadow. Driven
through the simulated cluster of tests/plansim.py, plus table tests of the pure helpers."""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any

import pytest

from shipyard import contract
from shipyard.operator import analysis, objects, planning
from shipyard.operator import spec as spec_mod
from tests.plansim import IMAGE, Sim, md

AGREEMENT = {"interval": "10s", "failureLimit": 1, "minSamples": 2, "noData": "Inconclusive",
             "metrics": [{"name": "agreement", "builtin": "predictionAgreement", "min": 0.95}]}
OUTPUT = {"kind": "classes"}
CONFIG_MAP = "digits-shadow"


def shadow_body(tag: str = "1.0.0", shadow: dict[str, Any] | None = None, **rollout: Any) -> dict[str, Any]:
    body = md(tag, rollout={"steps": [{"shadow": shadow or {"percent": 25, "minRequests": 100}}, {"weight": 50}],
                            "analysis": AGREEMENT, **rollout})
    body["spec"]["model"]["output"] = OUTPUT
    return body


def shadow_sim(compared_per_second: float = 2.0, **kwargs: Any) -> Sim:
    """1.0.0 settled, then 1.1.0 with a shadow step; each measurement counts `compared_per_second` copies per second
    since the candidate's pods were Ready."""
    sim = Sim(shadow_body(**kwargs)).settle()
    assert sim.status["phase"] == "Healthy"
    sim.set_spec(image=f"{IMAGE}:1.1.0")

    def figures(version: str, now: datetime.datetime) -> dict[str, float]:
        ready = planning.parse_time(sim.status.get("stepReadyAt")) or now
        compared = compared_per_second * (now - ready).total_seconds()
        return {"compared": compared, "dropped": 1.0, "timeouts": 0.0, "errors": 2.0, "rows": compared}

    sim.figures = figures
    sim.measure = lambda version, now: 0.99
    return sim


def settings(sim: Sim) -> dict[str, Any] | None:
    data = sim.config_data.get(CONFIG_MAP, {}).get(contract.SHADOW_CONFIG_KEY)
    return json.loads(data) if data else None


def test_a_shadow_step_runs_the_candidate_beside_the_whole_stable_without_client_traffic() -> None:
    sim = shadow_sim()
    assert CONFIG_MAP in sim.config_maps and settings(sim) is None  # kept while the spec has a shadow step: off
    sim.step()
    assert sim.replicas() == {"1.0.0": 4, "1.1.0": 1}  # 25% of 4; the stable keeps all its replicas
    assert sim.selected_versions() == {"1.0.0"}
    assert settings(sim) is None  # not before the candidate's pods are Ready
    sim.run(lambda s: s.status.get("stepReadyAt") is not None)
    sim.step()
    assert settings(sim) == {"url": "http://digits-1-1-0.ml.svc:8080", "version": "1.1.0", "percent": 25,
                             "compare": "top1", "tolerance": 0.0}
    assert "digits-1-1-0" in sim.services  # the candidate's own Service: where the copies go
    sim.run(lambda s: s.status.get("analysis", {}).get("phase") == "Successful")
    # The analysis passed, but fewer than minRequests copies were compared: the step holds, still without traffic.
    assert sim.status["currentStepIndex"] == 0 and sim.status["phase"] == "Progressing"
    assert "compared copies" in sim.status["message"] and "no client traffic" in sim.status["message"]
    shadow = sim.status["shadow"]
    assert shadow["candidate"] == "1.1.0" and shadow["percent"] == 25 and shadow["minRequests"] == 100
    assert shadow["compared"] < 100 and shadow["dropped"] == 1 and shadow["errors"] == 2
    assert shadow["agreement"] == 0.99
    assert sim.replicas() == {"1.0.0": 4, "1.1.0": 1} and sim.selected_versions() == {"1.0.0"}
    sim.run(lambda s: s.status.get("currentStepIndex") == 1)
    completed = [e.message for p in sim.plans for e in p.events if e.reason == "StepCompleted"]
    assert completed and completed[0].startswith("Step 1/2 (shadow 25%) of version 1.1.0 completed (shadow: ")
    sim.step()
    assert settings(sim) is None and "shadow" not in sim.status  # off once the weighted steps begin
    assert sim.selected_versions() == {"1.0.0", "1.1.0"}
    sim.settle()
    assert sim.status["stableVersion"] == "1.1.0" and sim.replicas() == {"1.0.0": 0, "1.1.0": 4}
    assert settings(sim) is None


def test_a_candidate_that_disagrees_is_rolled_back_before_any_client_saw_its_answers() -> None:
    sim = shadow_sim()
    sim.measure = lambda version, now: 0.5
    seen: set[str] = set()
    for _ in range(40):
        sim.step()
        seen |= sim.selected_versions() or set()
        if sim.status.get("phase") == "RolledBack":
            break
    sim.step()
    assert sim.status["phase"] == "RolledBack" and sim.history()[-1] == ("1.1.0", "RolledBack")
    assert seen == {"1.0.0"}  # the model's Service never selected the candidate
    assert sim.replicas() == {"1.0.0": 4, "1.1.0": 0}
    assert settings(sim) is None and "shadow" not in sim.status


def test_a_candidate_down_gives_no_data_and_holds_the_step_saying_why() -> None:
    sim = shadow_sim()
    sim.measure = lambda version, now: None  # no compared row: every copy failed
    sim.figures = lambda version, now: {"compared": 0.0, "dropped": 0.0, "timeouts": 0.0, "errors": 40.0}
    sim.run(lambda s: s.status.get("phase") == "Paused")
    assert sim.status["pausedReason"] == "AnalysisInconclusive"
    assert "(shadow: 0 compared, 0 dropped, 0 timeouts, 40 errors)" in sim.status["message"]
    assert sim.status["shadow"]["errors"] == 40 and sim.status["shadow"]["agreement"] is None
    assert sim.replicas() == {"1.0.0": 4, "1.1.0": 1} and sim.selected_versions() == {"1.0.0"}
    assert settings(sim) is not None  # still shadowing: the step goes on once copies are compared again
    sim.measure = lambda version, now: 0.99
    sim.figures = lambda version, now: {"compared": 500.0}
    sim.run(lambda s: s.status.get("currentStepIndex") == 1)


def test_a_shadow_step_with_a_duration_lasts_it_from_the_candidate_being_ready() -> None:
    sim = shadow_sim(shadow={"percent": 100, "duration": "2m"})
    sim.run(lambda s: s.status.get("currentStepIndex") == 1)
    ready = min(planning.parse_time(p.status.get("stepReadyAt")) or sim.now for p in sim.plans)
    assert (sim.now - ready).total_seconds() >= 120
    assert max(p.status["replicas"]["candidate"] for p in sim.plans) == 4  # 100 %: as many pods as the stable


def test_abort_during_the_shadow_step_turns_shadowing_off() -> None:
    sim = shadow_sim()
    sim.run(lambda s: settings(s) is not None)
    sim.annotate("abort", "1.1.0")
    sim.step()
    sim.step()
    assert sim.status["phase"] == "RolledBack" and settings(sim) is None


def test_a_stable_deployed_without_the_shadow_mount_is_named_in_the_message() -> None:
    sim = shadow_sim()
    sim.deployments["1.0.0"] = dataclasses.replace(sim.deployments["1.0.0"], shadow_config=False)
    sim.measure = lambda version, now: None  # it copies nothing: no data
    sim.figures = lambda version, now: None
    sim.run(lambda s: s.status.get("phase") == "Paused")
    assert "were deployed by an operator version without the shadow settings mount" in sim.status["message"]
    assert sim.selected_versions() == {"1.0.0"}


def test_removing_the_shadow_step_deletes_the_config_map() -> None:
    sim = Sim(shadow_body()).settle()
    assert CONFIG_MAP in sim.config_maps
    sim.set_spec(rollout={"steps": [{"weight": 50}]})
    sim.settle()
    assert CONFIG_MAP not in sim.config_maps


# --- pure helpers -------------------------------------------------------------------------------------------------


def parsed_spec(steps: list[dict[str, Any]], **serving: Any) -> spec_mod.ModelDeploymentSpec:
    body = shadow_body()
    body["spec"]["rollout"]["steps"] = steps
    body["spec"]["serving"].update(serving)
    return spec_mod.parse_model_deployment(body).spec


SHADOW = {"shadow": {"percent": 10, "minRequests": 5}}


@pytest.mark.parametrize(("steps", "index", "expected"), [
    pytest.param([SHADOW, {"weight": 50}], 0, "shadow", id="shadow-first"),
    pytest.param([SHADOW, {"weight": 50}], 1, "weighted", id="then-weighted"),
    pytest.param([SHADOW, {"weight": 50}], 2, "promoting", id="past-the-last"),
    pytest.param([SHADOW], 1, "promoting", id="shadow-only-then-promoting"),
])
def test_step_kind(steps: list[dict[str, Any]], index: int, expected: str) -> None:
    assert planning.build_step_kind(parsed_spec(steps), index) == expected


def test_step_kind_without_steps_is_one_weighted_step() -> None:
    spec = spec_mod.parse_model_deployment(md()).spec
    assert [planning.build_step_kind(spec, i) for i in (0, 1)] == ["weighted", "promoting"]


@pytest.mark.parametrize(("replicas", "percent", "gpus", "max_surge", "now", "expected"), [
    pytest.param(4, 25, 0, None, (0, 4), (1, 4), id="cpu-stable-keeps-all"),
    pytest.param(4, 100, 0, None, (0, 4), (4, 4), id="cpu-100-percent"),
    pytest.param(10, 15, 0, None, (0, 10), (2, 10), id="rounds-up"),
    pytest.param(4, 50, 1, 1, (0, 4), (1, 4), id="gpu-surge-one-pod"),
    pytest.param(4, 50, 1, 8, (0, 4), (2, 4), id="gpu-surge-enough"),
    pytest.param(4, 50, 1, 0, (0, 4), (0, 3), id="gpu-no-spare-stable-gives-one-back-first"),
    pytest.param(4, 50, 1, 0, (0, 3), (1, 3), id="gpu-no-spare-candidate-takes-it"),
])
def test_shadow_replicas(replicas: int, percent: int, gpus: int, max_surge: int | None, now: tuple[int, int],
                         expected: tuple[int, int]) -> None:
    body = shadow_body()
    body["spec"]["serving"]["replicas"] = replicas
    if gpus:
        body["spec"]["serving"]["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    if max_surge is not None:
        body["spec"]["rollout"]["maxSurgeGPUs"] = max_surge
    spec = spec_mod.parse_model_deployment(body).spec
    canary = planning.build_canary_replicas(replicas, percent)
    assert planning.plan_shadow_replicas(spec, canary, now) == expected


READY = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
PASSED = analysis.Assessment(analysis.Phase.SUCCESSFUL, "All passed.")
RUNNING = analysis.Assessment(analysis.Phase.RUNNING, "Waiting for 2 successful measurement(s) of agreement.")


@pytest.mark.parametrize(("shadow", "verdict", "compared", "elapsed", "expected"), [
    pytest.param({"minRequests": 100}, PASSED, 100, 5, None, id="requests-reached"),
    pytest.param({"minRequests": 100}, PASSED, 99, 5, "99/100 compared copies", id="requests-short"),
    pytest.param({"minRequests": 100}, RUNNING, 500, 5, "analysis: Waiting for 2", id="analysis-running"),
    pytest.param({"minRequests": 100}, None, 500, 5, "analysis: not started", id="no-analysis-yet"),
    pytest.param({"duration": "1m"}, PASSED, 0, 59, "shadowing until 2025-01-01T00:01:00Z", id="duration-short"),
    pytest.param({"duration": "1m"}, PASSED, 0, 60, None, id="duration-over"),
    pytest.param({"duration": "1m", "minRequests": 10}, PASSED, 10, 30, "shadowing until", id="both-time-last"),
    pytest.param({"duration": "1m", "minRequests": 10}, PASSED, 3, 90, "3/10 compared", id="both-requests-last"),
    pytest.param({"duration": "1m", "minRequests": 10}, PASSED, 10, 90, None, id="both-done"),
])
def test_shadow_wait(shadow: dict[str, Any], verdict: analysis.Assessment | None, compared: float, elapsed: float,
                     expected: str | None) -> None:
    step = spec_mod.ShadowStep.model_validate({"percent": 10, **shadow})
    now = READY + datetime.timedelta(seconds=elapsed)
    waiting = planning.plan_shadow_wait(step, verdict, {"compared": compared}, READY, now)
    if expected is None:
        assert waiting is None
    else:
        assert waiting is not None and expected in waiting[0]


def test_shipyards_server_pods_mount_the_shadow_settings_outside_the_spec_hash() -> None:
    body = shadow_body()
    m = spec_mod.parse_model_deployment(body)
    meta = objects.build_meta(body)
    dep = objects.build_deployment(meta, m, "1.0.0", f"{IMAGE}:1.0.0", 2)
    pod = dep["spec"]["template"]["spec"]
    assert {"name": "shadow-config", "configMap": {"name": CONFIG_MAP, "optional": True}} in pod["volumes"]
    container = pod["containers"][0]
    assert {"name": "shadow-config", "mountPath": contract.SHADOW_CONFIG_MOUNT, "readOnly": True} \
        in container["volumeMounts"]
    assert {"name": contract.ENV_SHADOW_CONFIG, "value": "/etc/shipyard/shadow/shadow.json"} in container["env"]
    body["spec"]["serving"]["runtime"] = {"preset": "triton"}
    body["spec"]["rollout"] = {}
    del body["spec"]["model"]["output"]
    other = spec_mod.parse_model_deployment(body)
    runtime_pod = objects.build_deployment(meta, other, "1.0.0", f"{IMAGE}:1.0.0", 2)["spec"]["template"]["spec"]
    assert "shadow-config" not in json.dumps(runtime_pod)


def test_prediction_agreement_judges_the_shadow_step_only() -> None:
    """After the shadow step nothing is copied: predictionAgreement is no longer measured (it would have no data and
    hold the weighted steps for ever); the other metrics go on."""
    sim = shadow_sim()
    sim.run(lambda s: s.status.get("currentStepIndex") == 1)
    sim.measure = lambda version, now: None  # no data from now on
    requested: list[tuple[str, ...]] = []
    for _ in range(30):
        request = planning.plan_measurement(planning.parse(sim.body), sim.status, sim.now)  # type: ignore[arg-type]
        if request is not None:
            requested.append(request.metrics)
        sim.step()
        if sim.status.get("stableVersion") == "1.1.0":
            break
    assert sim.status["stableVersion"] == "1.1.0" and sim.status["phase"] in ("Healthy", "Progressing")
    assert all("agreement" not in names for names in requested), requested
