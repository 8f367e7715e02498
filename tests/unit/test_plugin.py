"""kubectl-shipyard's pure parts: tables and the status view, the choice of control annotation with its checks,
and the one-line messages for API errors."""

from __future__ import annotations

import copy
import re
from typing import Any

import lightkube
import pytest
from lightkube.models import meta_v1

from shipyard.operator import plugin

STEPS = [{"weight": 25, "pause": "60s"}, {"weight": 50, "manual": True}]


def model(status: dict[str, Any] | None = None, image: str = "registry.example/acme/digits:1.1.0",
          generation: int = 2) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "shipyard.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "digits", "namespace": "ml", "generation": generation},
        "spec": {"image": image, "serving": {"replicas": 4}, "rollout": {"steps": STEPS}},
    }
    if status is not None:
        body["status"] = status
    return body


HISTORY = [
    {"version": "1.0.0", "image": "registry.example/acme/digits:1.0.0", "outcome": "Superseded",
     "reason": "RolledOut", "time": "2026-01-01T00:00:00Z", "retry": 0},
    {"version": "1.0.1", "image": "registry.example/acme/digits:1.0.1", "outcome": "Promoted",
     "reason": "RolledOut", "time": "2026-01-02T00:00:00Z", "retry": 0},
]
PROGRESSING = {
    "observedGeneration": 2, "phase": "Paused", "pausedReason": "AnalysisInconclusive",
    "message": "Waiting for metric data", "stableVersion": "1.0.1", "stableImage": "registry.example/acme/digits:1.0.1",
    "candidateVersion": "1.1.0", "candidateImage": "registry.example/acme/digits:1.1.0", "currentStepIndex": 0,
    "stepStartedAt": "2026-01-03T00:00:00Z", "stepReadyAt": "2026-01-03T00:00:05Z",
    "replicas": {"ready": 4, "stable": 3, "candidate": 1},
    "conditions": [
        {"type": "Ready", "status": "False", "reason": "AnalysisInconclusive"},
        {"type": "Reconciling", "status": "True", "reason": "AnalysisInconclusive"},
        {"type": "Stalled", "status": "False", "reason": "AsExpected"},
        {"type": "Serving", "status": "True", "reason": "ReplicasReady"},
    ],
    "analysis": {"version": "1.1.0", "phase": "Inconclusive", "detectionBoundSeconds": 30.0, "metrics": [
        {"name": "error-rate", "provider": "builtin", "verdict": "Successful", "lastValue": 0.00123456,
         "stableValue": 0.002, "successes": 2, "failures": 0, "inconclusive": 0, "errors": 0},
        {"name": "p99-latency", "provider": "prometheus", "verdict": "Inconclusive", "lastValue": None,
         "successes": 0, "failures": 0, "inconclusive": 3, "errors": 0, "message": "no data"},
    ]},
    "history": HISTORY,
}
FAILED = {**PROGRESSING, "phase": "RolledBack", "candidateVersion": None, "candidateImage": None,
          "pausedReason": None, "analysis": None, "currentStepIndex": None, "stepStartedAt": None, "stepReadyAt": None,
          "history": [*HISTORY, {"version": "1.1.0", "image": "registry.example/acme/digits:1.1.0",
                                 "outcome": "RolledBack", "reason": "AnalysisFailed", "time": "2026-01-03T00:01:00Z",
                                 "retry": 0, "message": "error-rate 0.2 > 0.01"}]}


def api_error(code: int, message: str, name: str | None = None) -> lightkube.ApiError:
    details = meta_v1.StatusDetails(name=name, kind="modeldeployments") if name else None
    return lightkube.ApiError(status=meta_v1.Status(code=code, message=message, details=details))


# --- formatting ----------------------------------------------------------------------------------------------------

def test_table_pads_columns_to_the_widest_cell() -> None:
    assert plugin.build_table(["A", "LONGER"], [["xyz", "1"], ["", "22"]]).splitlines() == [
        "A     LONGER", "xyz   1", "      22"]


@pytest.mark.parametrize(("value", "text"), [
    (None, "-"), ("", "-"), (float("nan"), "NaN"), (0.00123456, "0.001235"), (2, "2"), ("garbage", "garbage"),
], ids=["none", "empty", "nan", "small", "integer", "not-a-number"])
def test_numbers(value: object, text: str) -> None:
    assert plugin.build_number(value) == text


@pytest.mark.parametrize(("steps", "index", "text"), [
    (STEPS, 0, "1/2 (weight 25%, pause 60s)"),
    (STEPS, 1, "2/2 (weight 50%, manual promotion)"),
    ([], 0, "1/1 (weight 100%, no pause)"),
    (STEPS, 5, "6/2"),
    (STEPS, None, "-"),
], ids=["pause", "manual", "no-steps", "out-of-range", "no-candidate"])
def test_step_text(steps: list[dict[str, Any]], index: int | None, text: str) -> None:
    assert plugin.build_step_text(steps, index) == text


def test_conditions_show_the_reason_only_where_abnormal() -> None:
    assert plugin.build_conditions_text(PROGRESSING["conditions"]) == (
        "Ready=False (AnalysisInconclusive)  Reconciling=True (AnalysisInconclusive)  Stalled=False  Serving=True")


def test_status_view_shows_versions_step_and_analysis_table() -> None:
    view = plugin.build_status_view(model(PROGRESSING))
    lines = view.splitlines()
    assert lines[0].startswith("ModelDeployment ml/digits") and "observed 2" in lines[0] and "behind" not in view
    assert "Phase:       Paused (AnalysisInconclusive)" in lines
    assert "Stable:      1.0.1   registry.example/acme/digits:1.0.1   ready 3" in lines
    assert "Candidate:   1.1.0   registry.example/acme/digits:1.1.0   ready 1" in lines
    assert ("Step:        1/2 (weight 25%, pause 60s)   started 2026-01-03T00:00:00Z, ready 2026-01-03T00:00:05Z"
            in lines)
    assert "Replicas:    4 ready of 4" in lines
    assert "Analysis of 1.1.0: Inconclusive (worst-case detection 30 s)" in lines
    header = next(i for i, line in enumerate(lines) if line.startswith("METRIC"))
    assert lines[header].split() == ["METRIC", "PROVIDER", "VERDICT", "VALUE", "STABLE", "OK", "FAILED",
                                     "INCONCLUSIVE", "ERRORS", "MESSAGE"]
    assert lines[header + 1].split() == ["error-rate", "builtin", "Successful", "0.001235", "0.002", "2", "0",
                                         "0", "0"]
    assert lines[header + 2].split() == ["p99-latency", "prometheus", "Inconclusive", "-", "-", "0", "0", "3", "0",
                                         "no", "data"]


@pytest.mark.parametrize(("status", "expected"), [
    (None, ["Phase:       Pending (not reconciled yet)", "Analysis: none running", "Candidate:   -"]),
    ({**FAILED, "observedGeneration": 1}, ["status is behind the spec", "Phase:       RolledBack", "Step:        -"]),
], ids=["never-reconciled", "behind-the-spec"])
def test_status_view_of_unsettled_objects(status: dict[str, Any] | None, expected: list[str]) -> None:
    view = plugin.build_status_view(model(status))
    for text in expected:
        assert text in view


def test_history_table() -> None:
    lines = plugin.build_history_table(model(FAILED)).splitlines()
    assert lines[0].split() == ["VERSION", "OUTCOME", "REASON", "TIME", "RETRY", "IMAGE", "MESSAGE"]
    assert [line.split()[:2] for line in lines[1:]] == [["1.0.0", "Superseded"], ["1.0.1", "Promoted"],
                                                         ["1.1.0", "RolledBack"]]
    assert lines[3].endswith("error-rate 0.2 > 0.01")
    assert plugin.build_history_table(model()) == "No history yet."


# --- controls ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("build", "annotation"), [
    (plugin.build_promote, "shipyard.dev/promote"), (plugin.build_abort, "shipyard.dev/abort"),
], ids=["promote", "abort"])
def test_promote_and_abort_name_the_candidate(build: Any, annotation: str) -> None:
    assert build(model(PROGRESSING)) == build(model(PROGRESSING), "1.1.0")
    control = build(model(PROGRESSING))
    assert (control.annotation, control.value) == (annotation, "1.1.0")
    with pytest.raises(plugin.PluginError, match=r"version 1\.0\.9 is not the candidate of ml/digits "
                                                 r"\(the candidate is 1\.1\.0\)"):
        build(model(PROGRESSING), "1.0.9")
    with pytest.raises(plugin.PluginError, match=r"ml/digits has no candidate version to \w+ \(phase RolledBack\)"):
        build(model(FAILED))


def test_retry_needs_a_failed_spec_version_and_a_new_token() -> None:
    control = plugin.build_retry(model(FAILED), "t1")
    assert (control.annotation, control.value) == ("shipyard.dev/retry", "t1")
    assert "RolledBack" in control.summary
    with pytest.raises(plugin.PluginError, match="already used"):
        plugin.build_retry(model({**FAILED, "controls": {"retry": "t1"}}), "t1")


@pytest.mark.parametrize(("status", "image", "message"), [
    (PROGRESSING, "registry.example/acme/digits:1.0.1", "version 1.0.1 has not failed .its last outcome is Promoted"),
    (PROGRESSING, "registry.example/acme/digits:2.0.0", "version 2.0.0 has not failed .it has no history entry"),
    (None, "registry.example/acme/digits:1.0.0", "version 1.0.0 has not failed"),
], ids=["promoted", "never-tried", "no-status"])
def test_retry_refuses_what_has_not_failed(status: dict[str, Any] | None, image: str, message: str) -> None:
    with pytest.raises(plugin.PluginError, match=message):
        plugin.build_retry(model(status, image=image), "t2")


def test_rollback_to_a_kept_version_in_history() -> None:
    control = plugin.build_rollback(model(FAILED), "1.0.0", kept=["1.0.0", "1.0.1", "1.1.0"])
    assert (control.annotation, control.value) == ("shipyard.dev/rollback-to", "1.0.0")
    assert plugin.build_rollback(model(PROGRESSING), "1.0.1", kept=None).value == "1.0.1"  # stable, mid-rollout


@pytest.mark.parametrize(("version", "kept", "message"), [
    ("0.9.0", None, r"version 0\.9\.0 is not in the history of ml/digits \(versions: 1\.0\.0, 1\.0\.1, 1\.1\.0\)"),
    ("1.0.1", None, r"version 1\.0\.1 is already the stable version of ml/digits"),
    ("1.0.0", ["1.0.1"], r"version 1\.0\.0 of ml/digits is no longer kept \(kept versions: 1\.0\.1; "),
], ids=["not-in-history", "already-stable", "no-longer-kept"])
def test_rollback_refusals(version: str, kept: list[str] | None, message: str) -> None:
    with pytest.raises(plugin.PluginError, match=message):
        plugin.build_rollback(model(FAILED), version, kept)


def test_controls_do_not_modify_the_object() -> None:
    body = model(FAILED)
    before = copy.deepcopy(body)
    plugin.build_retry(body, "x")
    plugin.build_rollback(body, "1.0.0")
    assert body == before


# --- errors and the command line -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("error", "text"), [
    (api_error(404, 'modeldeployments.shipyard.dev "nope" not found', name="nope"),
     'modeldeployment "nope" not found in namespace ml'),
    (api_error(404, "the server could not find the requested resource"),
     "does not serve ModelDeployments .* is the Shipyard CRD installed"),
    (api_error(403, 'User "jane" cannot patch resource "modeldeployments"'),
     'not allowed to patch modeldeployment "nope" in namespace ml \\(RBAC\\): User "jane" cannot patch'),
    (api_error(401, "Unauthorized"), "did not accept the credentials"),
    (api_error(500, "boom"), r"refused to patch .*\(500\): boom"),
], ids=["object-not-found", "crd-missing", "forbidden", "unauthorized", "server-error"])
def test_api_errors_become_one_clear_line(error: lightkube.ApiError, text: str) -> None:
    message = str(plugin.build_api_error(error, verb="patch", what='modeldeployment "nope"', namespace="ml"))
    assert "\n" not in message
    assert re.search(text, message), message


@pytest.mark.parametrize(("argv", "command"), [
    (["status", "d"], "status"), (["-n", "ml", "history", "d"], "history"),
    (["promote", "d", "--version", "1.1.0"], "promote"), (["abort", "d"], "abort"),
    (["retry", "d", "--token", "x"], "retry"), (["rollback", "d", "--to", "1.0.0"], "rollback"),
    (["watch", "d", "--timeout", "3"], "watch"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_parser_accepts_every_command(argv: list[str], command: str) -> None:
    assert plugin.build_parser().parse_args(argv).command == command


def test_rollback_requires_to(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        plugin.build_parser().parse_args(["rollback", "d"])
    assert exit_info.value.code == 2 and "--to" in capsys.readouterr().err


@pytest.mark.parametrize(("spec", "status", "expected"), [
    pytest.param({}, {}, "-", id="nothing-yet"),
    pytest.param({}, {"stableVersion": "1.0.0", "activeVersion": "1.0.0"}, "all to 1.0.0", id="at-rest"),
    pytest.param({}, {"stableVersion": "1.0.0", "candidateVersion": "1.1.0"},
                 "split by ready pods between 1.0.0 and 1.1.0", id="canary"),
    pytest.param({"rollout": {"strategy": "blueGreen"}},
                 {"stableVersion": "1.0.0", "candidateVersion": "1.1.0", "activeVersion": "1.0.0",
                  "previewVersion": "1.1.0"}, "all to 1.0.0 (blue-green); preview 1.1.0", id="blue-green-preview"),
    pytest.param({}, {"activeVersion": "1.1.0", "rollbackWindow": {"version": "1.0.0", "until": "T"}},
                 "all to 1.1.0; 1.0.0 kept Ready until T", id="window"),
    pytest.param({}, {"activeVersion": "1.1.0", "restoring": {"version": "1.0.0", "since": "T"}},
                 "all to 1.1.0; rolling back to 1.0.0 once Ready (since T)", id="restoring"),
    pytest.param({}, {"activeVersion": "1.0.0", "autoscaling": {"activator": "Deployment/digits-activator",
                                                                  "routesToActivator": True}},
                 "held by the activator (Deployment/digits-activator) until a pod is Ready", id="scaled-to-zero"),
    pytest.param({}, {"activeVersion": "1.0.0", "autoscaling": {"activator": "Deployment/digits-activator",
                                                                  "routesToActivator": False}},
                 "all to 1.0.0", id="awake-with-an-activator"),
    pytest.param({}, {"stableVersion": "1.0.0", "candidateVersion": "1.1.0", "activeVersion": "1.0.0",
                      "traffic": {"httpRoute": "digits", "stableWeight": 95, "canaryWeight": 5, "programmed": True,
                                  "preview": {"header": "x-shipyard-version", "version": "1.1.0"}}},
                 "1.0.0 95%, 1.1.0 5% (HTTPRoute digits); preview x-shipyard-version: 1.1.0", id="gateway-api"),
    pytest.param({}, {"stableVersion": "1.0.0", "activeVersion": "1.0.0",
                      "traffic": {"httpRoute": "digits", "grpcRoute": "digits-grpc", "stableWeight": 100,
                                  "canaryWeight": 0, "programmed": False}},
                 "1.0.0 100% (HTTPRoute digits and GRPCRoute digits-grpc, not yet programmed)", id="gateway-at-rest"),
])
def test_traffic_line(spec: dict[str, Any], status: dict[str, Any], expected: str) -> None:
    assert plugin.build_traffic_text(spec, status) == expected


@pytest.mark.parametrize(("status", "expected"), [
    pytest.param({}, "-", id="none"),
    pytest.param({"autoscaling": {"provider": "keda", "metric": "requestRate", "target": 15, "minReplicas": 1,
                                  "maxReplicas": 5},
                  "conditions": [{"type": "Autoscaling", "reason": "ScalerReady", "message": "KEDA scales"}]},
                 "keda, requestRate 15 per pod, 1..5 replicas: ScalerReady (KEDA scales)", id="keda-ready"),
    pytest.param({"autoscaling": {"provider": "hpa", "metric": "cpu", "target": 70.5, "minReplicas": 2,
                                  "maxReplicas": 9}}, "hpa, cpu 70.5 per pod, 2..9 replicas", id="no-condition-yet"),
])
def test_autoscaling_line(status: dict[str, Any], expected: str) -> None:
    assert plugin.build_autoscaling_text(status) == expected


D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("spec", "status", "expected"), [
    pytest.param({"model": {"path": "/models/digits"}}, {}, "/models/digits", id="in-the-image"),
    pytest.param({"model": {"uri": "s3://models/digits/", "digest": D}}, {},
                 "s3://models/digits/ (sha256:abababababab...)", id="not-fetched-yet"),
    pytest.param({"model": {"uri": "s3://models/digits/"}},
                 {"modelFetch": {"version": "0.1.0-m1", "pods": ["a", "b", "c", "d"], "downloads": 1, "cacheHits": 3,
                                 "bytes": 2048}},
                 "s3://models/digits/: 0.1.0-m1 fetched by 4 pod(s), 1 download(s), 3 from the node cache, 2048 bytes",
                 id="fetched"),
    pytest.param({"model": {"uri": "s3://models/digits/"}},
                 {"modelFetch": {"version": "0.1.0-m1", "pods": [], "failure": "access denied (403) to s3://m/d/"}},
                 "s3://models/digits/: 0.1.0-m1 fetched by 0 pod(s), 0 download(s), 0 from the node cache; failing: "
                 "access denied (403) to s3://m/d/", id="failing"),
    pytest.param({"model": {"uri": "oci://r.example/m:1", "mount": "imageVolume"}}, {},
                 "oci://r.example/m:1, an image volume", id="image-volume"),
])
def test_model_line(spec: dict[str, Any], status: dict[str, Any], expected: str) -> None:
    assert plugin.build_model_text(spec, status) == expected


SHADOW_STEPS = [{"shadow": {"percent": 10, "minRequests": 200}}, {"weight": 50}]


def test_step_text_of_a_shadow_step() -> None:
    assert plugin.build_step_text(SHADOW_STEPS, 0) == "1/2 (shadow 10%, minRequests 200)"
    assert plugin.build_step_text([{"shadow": {"percent": 5, "duration": "10m"}}], 0) == "1/1 (shadow 5%, duration 10m)"


@pytest.mark.parametrize(("shadow", "text"), [
    pytest.param({"candidate": "1.1.0", "percent": 10, "compared": 150, "dropped": 0, "timeouts": 1, "errors": 2,
                  "agreement": 0.99321, "minRequests": 200},
                 "1.1.0 gets 10% of the stable's answered requests (copies, no client traffic): 150/200 compared, "
                 "0 dropped, 1 timeouts, 2 errors; agreement 0.9932", id="running"),
    pytest.param({"candidate": "1.1.0", "percent": 100, "compared": 0, "dropped": 0, "timeouts": 0, "errors": 40,
                  "agreement": None, "until": "2026-01-03T00:10:00Z"},
                 "1.1.0 gets 100% of the stable's answered requests (copies, no client traffic): 0 compared, "
                 "0 dropped, 0 timeouts, 40 errors; agreement -; until 2026-01-03T00:10:00Z", id="candidate-down"),
    pytest.param(None, "-", id="none"),
])
def test_shadow_text(shadow: dict[str, Any] | None, text: str) -> None:
    assert plugin.build_shadow_text({"shadow": shadow} if shadow else {}) == text


def test_status_view_shows_the_shadow_line_only_with_a_shadow_step() -> None:
    assert "Shadow:" not in plugin.build_status_view(model(PROGRESSING))
    body = model({**PROGRESSING, "activeVersion": "1.0.1", "shadow": {
        "candidate": "1.1.0", "percent": 10, "compared": 3, "dropped": 0, "timeouts": 0, "errors": 0,
        "agreement": 1.0, "minRequests": 200}})
    body["spec"].setdefault("rollout", {})["steps"] = SHADOW_STEPS
    lines = plugin.build_status_view(body).splitlines()
    assert ("Shadow:      1.1.0 gets 10% of the stable's answered requests (copies, no client traffic): 3/200 "
            "compared, 0 dropped, 0 timeouts, 0 errors; agreement 1") in lines
