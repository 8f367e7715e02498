"""What the shell observes, as the planner reads it: Deployments' readiness and Jobs' phases, messages and exit
codes (shipyard.operator.observed). Pure."""

from __future__ import annotations

from typing import Any

import pytest

from shipyard.operator import observed


def pod(component: str, *, code: int | None = 1, message: str = "Rejected: accuracy",
        finished: str = "2026-01-01T00:00:00Z", job: str = "digits-compress-abc") -> dict[str, Any]:
    terminated: dict[str, Any] = {"finishedAt": finished, "message": message}
    if code is not None:
        terminated["exitCode"] = code
    return {"kind": "Pod",
            "metadata": {"name": f"p-{component}-{finished}", "namespace": "ml",
                         "labels": {"shipyard.dev/component": component, "job-name": job}},
            "status": {"containerStatuses": [{"state": {"terminated": terminated}}]}}


@pytest.mark.parametrize(("conditions", "active", "phase"), [
    pytest.param([{"type": "Complete", "status": "True"}], 0, "Succeeded", id="complete"),
    pytest.param([{"type": "SuccessCriteriaMet", "status": "True"}], 0, "Succeeded", id="success-criteria-met"),
    pytest.param([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}], 0, "Failed", id="failed"),
    pytest.param([{"type": "FailureTarget", "status": "True", "reason": "DeadlineExceeded"}], 1, "Failed",
                 id="failure-target-before-the-pods-are-gone"),
    pytest.param([], 1, "Running", id="running"),
    pytest.param([], 0, "Pending", id="pending"),
])
def test_job_phase_and_termination_message(conditions: list[dict[str, str]], active: int, phase: str) -> None:
    job = {"metadata": {"name": "digits-compress-abc", "labels": {"shipyard.dev/artifact": "k"}},
           "status": {"conditions": conditions, "active": active}}
    view = observed.build_job_view(job, {"p": pod("compression")})
    assert view.phase == phase and view.key == "k"
    assert view.message == "Rejected: accuracy" and view.exit_code == 1
    assert view.reason == next((c.get("reason", "") for c in conditions if c["type"] in ("Failed", "FailureTarget")),
                               "")


def test_a_failed_job_without_a_pod_message_says_why() -> None:
    job = {"metadata": {"name": "j"}, "status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "Job was active longer"}]}}
    view = observed.build_job_view(job, {})
    assert view.message == "DeadlineExceeded: Job was active longer"
    assert (view.exit_code, view.reason) == (None, "DeadlineExceeded")


def test_the_container_that_finished_last_reports() -> None:
    job = {"metadata": {"name": "digits-compress-abc"}, "status": {"active": 1}}
    pods = {"a": pod("analysis", code=2, message="first try: refused", finished="2026-01-01T00:00:00Z"),
            "b": pod("analysis", code=0, message="[value=0.97]", finished="2026-01-01T00:01:00Z"),
            "c": pod("analysis", code=3, message="someone else's", job="other-job")}
    view = observed.build_job_view(job, pods)
    assert (view.exit_code, view.message) == (0, "[value=0.97]")


def test_a_message_is_redacted_before_it_reaches_status() -> None:
    job = {"metadata": {"name": "digits-compress-abc"}, "status": {}}
    view = observed.build_job_view(job, {"p": pod("analysis", message="GET http://u:s3cret@h/x failed")})
    assert "s3cret" not in view.message


def test_observed_groups_children_by_kind() -> None:
    deployment = {"metadata": {"name": "digits-1-0-0", "generation": 2,
                               "labels": {"shipyard.dev/version": "1.0.0"},
                               "annotations": {"shipyard.dev/image": "r/d:1.0.0", "shipyard.dev/spec-hash": "h"}},
                  "spec": {"replicas": 3},
                  "status": {"readyReplicas": 2, "availableReplicas": 2, "updatedReplicas": 3,
                             "observedGeneration": 2}}
    seen = observed.build_observed({
        "Deployment": {"digits-1-0-0": deployment},
        "Service": {"digits": {"metadata": {"name": "digits", "annotations": {"shipyard.dev/spec-hash": "s"}}}},
        "ConfigMap": {"c": {"metadata": {"name": "c", "annotations": {"shipyard.dev/spec-hash": "m"}}}},
    }, missing_pvc="models")
    view = seen.deployments["1.0.0"]
    assert (view.replicas, view.ready, view.serving, view.rolled_out, view.image) == (3, 2, 2, False, "r/d:1.0.0")
    assert (seen.services, seen.config_maps, seen.missing_pvc, seen.jobs) == ({"digits": "s"}, {"c": "m"}, "models",
                                                                           {})


def test_the_activators_deployment_is_not_a_version() -> None:
    activator = {"metadata": {"name": "digits-activator",
                              "labels": {"shipyard.dev/model": "digits", "shipyard.dev/component": "activator"}},
                 "spec": {"replicas": 1}, "status": {"readyReplicas": 1, "availableReplicas": 1}}
    version = {"metadata": {"name": "digits-1-0-0", "labels": {"shipyard.dev/version": "1.0.0",
                                                               "shipyard.dev/component": "serving"}},
               "spec": {"replicas": 0}, "status": {}}
    seen = observed.build_observed({"Deployment": {"digits-activator": activator, "digits-1-0-0": version}})
    assert set(seen.deployments) == {"1.0.0"}
    assert seen.activator is not None and (seen.activator.name, seen.activator.serving) == ("digits-activator", 1)
    assert observed.build_observed({"Deployment": {"digits-1-0-0": version}}).activator is None
