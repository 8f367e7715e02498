"""The ``job`` metric provider: the Job the planner creates for a measurement (``build_job``) and the measurement its
outcome reports (``build_sample``), judged by the one evaluator. Pure: no I/O."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from shipyard import contract
from shipyard.operator import analysis, naming, objects, observed
from shipyard.operator import spec as spec_mod
from shipyard.operator.analysis import Phase
from shipyard.operator.providers import job

META = objects.Meta(name="digits", namespace="ml", uid="uid-1", generation=3)
TEMPLATE: dict[str, Any] = {
    "metadata": {"labels": {"team": "ml", naming.LABEL_COMPONENT: "serving"}, "annotations": {"a": "b"}},
    "spec": {
        "restartPolicy": "OnFailure",
        "serviceAccountName": "evaluator",
        "containers": [
            {"name": "evaluate", "image": "shipyard-runtime:1", "args": ["evaluate"],
             "env": [{"name": "OTHER", "value": "kept"},
                     {"name": contract.ENV_ENDPOINT, "value": "http://somewhere-else"},
                     {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}}}]},
            {"name": "sidecar", "image": "busybox"},
        ],
        "initContainers": [{"name": "wait", "image": "busybox", "command": ["sh", "-c", "until wget -q $(SHIPYARD_"
                                                                                     "ENDPOINT); do sleep 1; done"]}],
    },
}


def job_metric(name: str = "accuracy", *, min: float | None = None, max: float | None = None,
               **fields: Any) -> spec_mod.Metric:
    return spec_mod.Metric(name=name, job=job.Job(template=copy.deepcopy(TEMPLATE), **fields), min=min, max=max)


def build(metric: spec_mod.Metric | None = None, *, model: str = "digits", candidate: str = "1.2.0",
          stable: str | None = "1.1.0", run: int = 0) -> dict[str, Any]:
    meta = objects.Meta(name=model, namespace="ml", uid="uid-1", generation=3)
    return job.build_job(object_meta=lambda name, labels: objects.build_object_meta(meta, name, labels),
                         metric=metric or job_metric(), model=model, served_model="digits-model", namespace="ml",
                         candidate=candidate, stable=stable, port=8080, run=run)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), f"duplicated env: {names}"
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# ---------------------------------------------------------------------------------------------------------------
# The Job of a measurement

CANDIDATE_URL = "http://digits-1-2-0.ml.svc:8080"
STABLE_URL = "http://digits-1-1-0.ml.svc:8080"


@pytest.mark.parametrize(("stable", "expected"), [
    pytest.param("1.1.0", {contract.ENV_ENDPOINT: CANDIDATE_URL, contract.ENV_MODEL_NAME: "digits-model",
                           contract.ENV_MODEL_VERSION: "1.2.0", contract.ENV_METRIC_NAME: "accuracy",
                           contract.ENV_REFERENCE_ENDPOINT: STABLE_URL, contract.ENV_STABLE_VERSION: "1.1.0"},
                 id="with-a-stable"),
    pytest.param(None, {contract.ENV_ENDPOINT: CANDIDATE_URL, contract.ENV_MODEL_NAME: "digits-model",
                        contract.ENV_MODEL_VERSION: "1.2.0", contract.ENV_METRIC_NAME: "accuracy"},
                 id="first-version-no-reference"),
])
def test_every_container_gets_the_env_once(stable: str | None, expected: dict[str, str]) -> None:
    pod = build(stable=stable)["spec"]["template"]["spec"]
    evaluate, sidecar = pod["containers"]
    [wait] = pod["initContainers"]
    assert env_of(sidecar) == expected and env_of(wait) == expected
    assert env_of(evaluate) == {"OTHER": "kept", "TOKEN": {"secretKeyRef": {"name": "s", "key": "token"}},
                                **expected}  # the user's own SHIPYARD_ENDPOINT is replaced, not duplicated
    assert [e["name"] for e in evaluate["env"]][:2] == ["OTHER", "TOKEN"]  # the user's order kept, ours after
    assert evaluate["args"] == ["evaluate"] and evaluate["image"] == "shipyard-runtime:1"


def test_the_endpoints_are_the_version_services_the_planner_creates() -> None:
    env = env_of(build()["spec"]["template"]["spec"]["containers"][0])
    for version, key in (("1.2.0", contract.ENV_ENDPOINT), ("1.1.0", contract.ENV_REFERENCE_ENDPOINT)):
        service = objects.build_version_service(META, version, 8080)
        name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
        assert env[key] == f"http://{name}.{namespace}.svc:{service['spec']['ports'][0]['port']}"


@pytest.mark.parametrize(("fields", "deadline", "backoff"), [
    pytest.param({}, 600, 0, id="defaults"),
    pytest.param({"active_deadline_seconds": 120, "backoff_limit": 2}, 120, 2, id="from-the-spec"),
])
def test_the_job_runs_once_within_its_deadline(fields: dict[str, Any], deadline: int, backoff: int) -> None:
    body = build(job_metric(**fields))
    assert (body["apiVersion"], body["kind"]) == ("batch/v1", "Job")
    assert body["spec"]["activeDeadlineSeconds"] == deadline and body["spec"]["backoffLimit"] == backoff
    pod = body["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # the template's OnFailure replaced: the exit code is the verdict
    assert pod["serviceAccountName"] == "evaluator"


@pytest.mark.parametrize(("template_value", "expected"), [
    pytest.param(None, False, id="not-mounted-by-default"),
    pytest.param(True, True, id="the-template-asks-for-it"),
    pytest.param(False, False, id="the-template-refuses-it"),
])
def test_the_service_account_token_is_mounted_only_when_asked(template_value: bool | None, expected: bool) -> None:
    metric = job_metric()
    assert metric.job is not None
    if template_value is not None:
        metric.job.template["spec"]["automountServiceAccountToken"] = template_value
    assert build(metric)["spec"]["template"]["spec"]["automountServiceAccountToken"] is expected


def test_labels_name_the_model_version_metric_and_run_and_keep_the_pod_out_of_the_services() -> None:
    body = build(run=4)
    expected = {**naming.build_version_labels("digits", "1.2.0"), naming.LABEL_COMPONENT: job.COMPONENT,
                job.LABEL_METRIC: "accuracy", job.LABEL_RUN: "4"}
    meta = body["metadata"]
    assert meta["labels"] == {**expected, naming.LABEL_MANAGED_BY: naming.MANAGED_BY}
    assert meta["namespace"] == "ml" and meta["ownerReferences"][0]["uid"] == "uid-1"
    pod_meta = body["spec"]["template"]["metadata"]
    # The user's labels kept, ours win; managed-by makes the operator watch the pod (its exit code and message).
    assert pod_meta["labels"] == {"team": "ml", **expected, naming.LABEL_MANAGED_BY: naming.MANAGED_BY}
    assert pod_meta["annotations"] == {"a": "b"}
    for service in (objects.build_version_service(META, "1.2.0", 8080), objects.build_service(META, 8080)):
        selector = service["spec"]["selector"]
        assert not all(pod_meta["labels"].get(k) == v for k, v in selector.items()), service["metadata"]["name"]


def test_the_template_is_not_changed() -> None:
    metric = job_metric()
    before = copy.deepcopy(metric.job.template if metric.job else None)
    build(metric)
    assert metric.job is not None and metric.job.template == before


@pytest.mark.parametrize(("model", "metric_name"), [
    pytest.param("digits", "accuracy", id="short"),
    pytest.param("a-very-long-model-name-that-fills-most-of-a-dns-label-by-itself", "m" * 63, id="long"),
])
def test_job_names_fit_a_label_and_are_stable(model: str, metric_name: str) -> None:
    def name(version: str = "1.2.0", run: int = 0, metric: str = metric_name) -> str:
        return str(build(job_metric(metric), model=model, candidate=version, run=run)["metadata"]["name"])

    names = {name(), name(run=1), name(version="1.2.1"), name(metric="other")}
    assert len(names) == 4  # one Job per (version, metric, run)
    assert all(len(n) <= naming.MAX_NAME and n == naming.build_slug(n) for n in names), names
    assert name() == name() == job.build_job_name(model, "1.2.0", metric_name, 0)  # a restarted operator finds it


# ---------------------------------------------------------------------------------------------------------------
# What a Job reports


def view(phase: str, message: str = "", exit_code: int | None = None, reason: str = "") -> observed.JobView:
    return observed.JobView(name="digits-accuracy-1a2b3c4d-0", key="", phase=phase, message=message,
                            exit_code=exit_code, reason=reason)


@pytest.mark.parametrize(("job_view", "value", "verdict", "note", "error"), [
    pytest.param(view("Pending"), None, None, None, None, id="pending"),
    pytest.param(view("Running"), None, None, None, None, id="running"),
    pytest.param(view("Succeeded", "accuracy 0.93 on 1797 samples [value=0.93]", 0), 0.93, None, "", None,
                 id="value"),
    pytest.param(view("Succeeded", "[value=1e-3]"), 0.001, None, "", None, id="value-without-exit-code"),
    pytest.param(view("Succeeded", "", 0), None, Phase.SUCCESSFUL, "exit code 0", None, id="no-value-successful"),
    pytest.param(view("Succeeded", "all checks passed", 0), None, Phase.SUCCESSFUL, "exit code 0: all checks passed",
                 None, id="message-without-value"),
    pytest.param(view("Succeeded", "[value=high]", 0), None, Phase.SUCCESSFUL, "exit code 0: [value=high]", None,
                 id="value-not-a-number"),
    pytest.param(view("Failed", "accuracy 0.61 < --min 0.9 [value=0.61]", 1), None, Phase.FAILED,
                 "exit code 1: accuracy 0.61 < --min 0.9 [value=0.61]", None, id="exit-1-failed"),
    pytest.param(view("Failed", "", 1, "BackoffLimitExceeded"), None, Phase.FAILED, "exit code 1", None,
                 id="exit-1-without-message"),
    pytest.param(view("Failed", "could not reach http://digits-1-2-0.ml.svc:8080", 2), None, None, "",
                 "the Job could not measure (exit code 2): could not reach http://digits-1-2-0.ml.svc:8080",
                 id="exit-2-error"),
    pytest.param(view("Failed", "", 137, "BackoffLimitExceeded"), None, None, "",
                 "the Job could not measure (exit code 137): BackoffLimitExceeded", id="killed"),
    pytest.param(view("Failed", "DeadlineExceeded: Job was active longer than specified deadline", None,
                      "DeadlineExceeded"), None, None, "",
                 "the Job could not measure (no exit code): DeadlineExceeded: Job was active longer", id="deadline"),
    pytest.param(view("Failed"), None, None, "", "the Job could not measure (no exit code): failed",
                 id="never-ran"),
])
def test_what_a_job_reports(job_view: observed.JobView, value: float | None, verdict: Phase | None,
                            note: str | None, error: str | None) -> None:
    sample = job.build_sample(job_view)
    if note is None:
        assert sample is None  # still measuring
        return
    assert sample is not None
    assert (sample.value, sample.verdict, sample.note) == (value, verdict, note)
    if error is None:
        assert sample.error is None
    else:
        assert sample.error is not None and sample.error.startswith(error)
    assert sample.query.startswith(f"Job {job_view.name}")


def test_a_failed_jobs_cause_reaches_the_sample_through_its_view() -> None:
    """The view the planner reads (``observed.build_job_view``) of a Job past its deadline, whose pod never
    reported: the Error names the Job's reason."""
    body = {"metadata": {"name": "digits-accuracy-1a2b3c4d-0"},
            "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                                       "message": "Job was active longer than specified deadline"}]}}
    sample = job.build_sample(observed.build_job_view(body, {}))
    assert sample is not None and sample.error is not None and "DeadlineExceeded" in sample.error


@pytest.mark.parametrize(("job_view", "thresholds", "phase"), [
    pytest.param(view("Succeeded", "[value=0.93]", 0), {"min": 0.9}, Phase.SUCCESSFUL, id="value-passes"),
    pytest.param(view("Succeeded", "[value=0.85]", 0), {"min": 0.9}, Phase.FAILED, id="value-fails-min"),
    pytest.param(view("Succeeded", "[value=0.85]", 0), {}, Phase.SUCCESSFUL, id="value-without-thresholds"),
    pytest.param(view("Succeeded", "", 0), {"min": 0.9}, Phase.SUCCESSFUL, id="exit-0-without-value"),
    pytest.param(view("Succeeded", "[value=nan]", 0), {"min": 0.9}, Phase.INCONCLUSIVE, id="nan-is-no-data"),
    pytest.param(view("Failed", "[value=0.99]", 1), {"min": 0.9}, Phase.FAILED, id="exit-1-fails-whatever-value"),
    pytest.param(view("Failed", "", 2), {}, Phase.ERROR, id="exit-2-is-an-error"),
])
def test_the_evaluator_judges_a_jobs_sample(job_view: observed.JobView, thresholds: dict[str, Any],
                                             phase: Phase) -> None:
    metric = job_metric(**thresholds)
    sample = job.build_sample(job_view)
    assert sample is not None
    assert analysis.evaluate_sample(metric, analysis.Measurement(candidate=sample), "Inconclusive")[0] is phase
