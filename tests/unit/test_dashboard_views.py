"""The dashboard's pure parts: what each page shows (shipyard.operator.dashboard.views), the actions' checks, the
request checks, the templates' escaping, and the server's Hub (changes, coalescing, bounded events). No I/O."""

from __future__ import annotations

import datetime
from typing import Any

import jinja2
import pytest

from shipyard.operator.dashboard import server, views

NOW = datetime.datetime(2026, 1, 3, 0, 0, 0, tzinfo=datetime.UTC)
T0 = "2026-01-03T00:00:00Z"
HISTORY = [{"version": "1.0.0", "outcome": "Superseded", "reason": "RolledOut", "time": T0},
           {"version": "1.0.1", "outcome": "Promoted", "reason": "RolledOut", "time": "2026-01-03T00:05:00Z"}]
STEPS = [{"weight": 25, "pause": "60s"}, {"weight": 50, "manual": True}]


def md(status: dict[str, Any] | None = None, *, generation: int = 1, steps: list[dict[str, Any]] | None = None,
       metrics: list[dict[str, Any]] | None = None, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    rollout: dict[str, Any] = {"steps": STEPS if steps is None else steps}
    if metrics is not None:
        rollout["analysis"] = {"metrics": metrics}
    return {"metadata": {"name": "digits", "namespace": "ml", "generation": generation,
                         "annotations": annotations or {}, "managedFields": [{"manager": "x"}]},
            "spec": {"image": "registry.example/digits:1.1.0", "serving": {"replicas": 4}, "rollout": rollout},
            "status": status if status is not None else {}}


PROGRESSING = {"observedGeneration": 1, "phase": "Progressing", "message": "Step 1/2", "stableVersion": "1.0.1",
               "candidateVersion": "1.1.0", "currentStepIndex": 0, "replicas": {"ready": 4}, "history": HISTORY}
HEALTHY = {"observedGeneration": 1, "phase": "Healthy", "stableVersion": "1.0.1", "replicas": {"ready": 4},
           "history": HISTORY}
ROLLED_BACK = {**HEALTHY, "phase": "RolledBack", "history": [
    *HISTORY, {"version": "1.1.0", "outcome": "RolledBack", "reason": "AnalysisFailed", "time": T0}]}


# --- the list -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "events", "expected"), [
    pytest.param(md(PROGRESSING), [], {"phase": "Progressing", "tone": "progress", "stable": "1.0.1",
                                       "candidate": "1.1.0", "step": "1/2 (weight 25%, pause 60s)", "ready": "4/4",
                                       "behind": False, "event": None}, id="progressing"),
    pytest.param(md(HEALTHY), [], {"phase": "Healthy", "tone": "ok", "candidate": "-", "step": "-"}, id="healthy"),
    pytest.param(md({}), [], {"phase": "Pending", "stable": "-", "ready": "0/4", "behind": True}, id="no-status"),
    pytest.param(md(HEALTHY, generation=2), [], {"behind": True}, id="spec-not-observed-yet"),
    pytest.param(md(ROLLED_BACK), [], {"phase": "RolledBack", "tone": "bad"}, id="rolled-back"),
    pytest.param(md(HEALTHY), [{"id": "a", "time": "2026-01-03T00:00:01Z", "reason": "Old"},
                               {"id": "b", "time": "2026-01-03T00:00:09Z", "reason": "New"}],
                 {"event": {"id": "b", "time": "2026-01-03T00:00:09Z", "reason": "New"}}, id="last-event-newest"),
    pytest.param(md(HEALTHY), [{"id": "z", "time": T0, "order": 5, "reason": "First"},
                               {"id": "a", "time": T0, "order": 9, "reason": "Then"}],
                 {"event": {"id": "a", "time": T0, "order": 9, "reason": "Then"}}, id="same-second-by-write-order"),
])
def test_summary_row(body: dict[str, Any], events: list[dict[str, Any]], expected: dict[str, Any]) -> None:
    summary = views.build_summary(body, views.build_recent_events(events))
    assert {k: summary[k] for k in expected} == expected
    assert summary["id"] == "md-ml--digits" and summary["sort"] == "ml/digits"


def test_phase_counts_follow_the_phase_order() -> None:
    rows = [{"phase": p} for p in ("Failed", "Healthy", "Healthy", "Progressing", "Weird")]
    assert views.build_phase_counts(rows) == [("Healthy", 2, "ok"), ("Progressing", 1, "progress"),
                                              ("Failed", 1, "bad"), ("Weird", 1, "neutral")]


def test_trimmed_model_keeps_only_what_may_be_shown() -> None:
    body = md(HEALTHY, annotations={"shipyard.dev/promote": "1.1.0", "token": "s3cr3t",
                                    "kubectl.kubernetes.io/last-applied-configuration": "{...}"})
    trimmed = views.build_trimmed_model(body)
    assert trimmed["metadata"]["annotations"] == {"shipyard.dev/promote": "1.1.0"}
    assert "managedFields" not in trimmed["metadata"] and trimmed["status"] == HEALTHY
    assert "s3cr3t" not in repr(trimmed)


@pytest.mark.parametrize(("event", "expected"), [
    pytest.param({"involvedObject": {"kind": "ModelDeployment", "name": "digits", "namespace": "ml"},
                  "metadata": {"name": "digits.1", "resourceVersion": "812"}, "reason": "Promoted", "message": "m",
                  "lastTimestamp": T0, "count": 2},
                 (("ml", "digits"), {"id": "digits.1", "order": 812, "type": "Normal", "reason": "Promoted",
                                     "message": "m", "count": 2, "time": T0}), id="core-v1-event"),
    pytest.param({"involvedObject": {"kind": "ModelDeployment", "name": "digits"},
                  "metadata": {"name": "e", "namespace": "ml", "creationTimestamp": T0}, "eventTime": None},
                 (("ml", "digits"), {"id": "e", "order": 0, "type": "Normal", "reason": "", "message": "", "count": 1,
                                     "time": T0}), id="times-fall-back-to-creation"),
    pytest.param({"involvedObject": {"kind": "Pod", "name": "p"}}, None, id="another-kind"),
])
def test_event_record(event: dict[str, Any], expected: Any) -> None:
    assert views.build_event_record(event) == expected


# --- one model ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "states", "holds"), [
    pytest.param(md(HEALTHY), ["idle", "idle"], ["pause 60s", "manual promotion"], id="no-candidate-idle"),
    pytest.param(md(PROGRESSING), ["current", "pending"], ["pause 60s", "manual promotion"], id="at-first-step"),
    pytest.param(md({**PROGRESSING, "currentStepIndex": 1}), ["done", "current"], ["pause 60s", "manual promotion"],
                 id="at-second-step"),
    pytest.param(md(PROGRESSING, steps=[]), ["current"], ["no pause"], id="no-steps-one-of-100"),
])
def test_steps(body: dict[str, Any], states: list[str], holds: list[str]) -> None:
    steps = views.build_steps(body)
    assert [s["state"] for s in steps] == states and [s["hold"] for s in steps] == holds
    assert steps[-1]["weight"] == (100 if not body["spec"]["rollout"]["steps"] else 50)


def test_a_shadow_step_has_no_weight_and_says_its_copies() -> None:
    steps = views.build_steps(md(PROGRESSING, steps=[{"shadow": {"percent": 10, "minRequests": 200}},
                                                     {"weight": 50}]))
    assert [(s["weight"], s["hold"], s["state"]) for s in steps] == [
        (0, "shadow copies of 10%, minRequests 200", "current"), (50, "no pause", "pending")]


def test_timeline_is_newest_first_and_marks_stable_and_candidate() -> None:
    timeline = views.build_timeline(md({**PROGRESSING, "history": [*HISTORY, {"version": "1.1.0"}]}))
    assert [(t["version"], t["stable"], t["candidate"], t["tone"]) for t in timeline] == [
        ("1.1.0", False, True, "neutral"), ("1.0.1", True, False, "ok"), ("1.0.0", False, False, "neutral")]
    assert timeline[1]["time"] == "2026-01-03 00:05:00"


@pytest.mark.parametrize(("artifact", "expected"), [
    pytest.param({"version": "1.1.0", "phase": "Succeeded", "sourceBytes": 1797120, "compressedBytes": 467456,
                  "sourceAccuracy": 0.9722, "compressedAccuracy": 0.9694, "relativeAccuracyLoss": 0.0029,
                  "sourceLatencyMs": 2.1, "compressedLatencyMs": 1.19},
                 {"bytes": ("1.8 MB", "467 kB", "3.84x smaller"), "accuracy": ("0.9722", "0.9694", "loss 0.29%"),
                  "latency": ("2.1", "1.19", "1.76x faster"), "tone": "ok"}, id="succeeded-with-figures"),
    pytest.param({"version": "1.1.0", "phase": "Running"},
                 {"bytes": ("-", "-", ""), "accuracy": ("-", "-", ""), "latency": ("-", "-", ""), "tone": "progress"},
                 id="running-no-figures"),
    pytest.param({"phase": "Failed", "sourceBytes": 10, "compressedBytes": 0},
                 {"bytes": ("10 B", "0 B", ""), "tone": "bad", "version": "-"}, id="failed-no-ratio-by-zero"),
])
def test_compression_report(artifact: dict[str, Any], expected: dict[str, Any]) -> None:
    (view,) = views.build_artifacts(md({"artifacts": [artifact]}))
    assert {k: view[k] for k in expected} == expected


def history(*points: tuple[int, float | None, float | None, str]) -> list[dict[str, Any]]:
    return [{"time": f"2026-01-03T00:00:{s:02d}Z", "value": v, "stableValue": sv, "verdict": verdict}
            for s, v, sv, verdict in points]


@pytest.mark.parametrize(("metric", "points", "names", "limits"), [
    pytest.param({"name": "m", "builtin": "errorRate", "max": 0.05}, [(1, 0.01, None, "Successful")],
                 ["candidate 1.1.0", "max 0.05"], None, id="max-line"),
    pytest.param({"name": "m", "prometheus": {"query": "q"}, "min": 0.9, "max": 1.0},
                 [(1, 0.95, None, "Successful"), (2, 0.8, None, "Failed")],
                 ["candidate 1.1.0", "max 1", "min 0.9"], None, id="band"),
    pytest.param({"name": "m", "builtin": "errorRate", "maxRelativeToStable": 0.5},
                 [(1, 0.004, 0.002, "Successful"), (2, 0.0, 0.0, "Successful"), (3, None, None, "Error")],
                 ["candidate 1.1.0", "stable 1.0.1", "limit: stable x 1.5"], [0.003, 0.0015, None],
                 id="relative-limit-with-the-providers-floor"),
    pytest.param(None, [(1, 0.5, None, "Skipped")], ["candidate 1.1.0"], None, id="metric-gone-from-spec"),
    pytest.param({"name": "m", "builtin": "errorRate", "max": 0.05}, [], ["candidate 1.1.0"], None, id="no-history"),
])
def test_metric_figure(metric: dict[str, Any] | None, points: list[tuple[int, float | None, float | None, str]],
                       names: list[str], limits: list[float | None] | None) -> None:
    result = {"name": "m", "history": history(*points)}
    figure = views.build_metric_figure(result, metric, "1.1.0", "1.0.1")
    assert [t["name"] for t in figure["data"]] == names
    candidate = figure["data"][0]
    assert candidate["x"] == [f"2026-01-03 00:00:{p[0]:02d}" for p in points]  # UTC, as plotly reads dates
    assert candidate["y"] == [p[1] for p in points]
    assert candidate["marker"]["symbol"] == [views.VERDICT_MARKERS[p[3]][1] for p in points]
    if limits is not None:
        assert figure["data"][-1]["y"] == pytest.approx(limits)
    assert figure["layout"]["xaxis"]["type"] == "date"


# --- actions --------------------------------------------------------------------------------------------------------

ALLOWED = views.Access(True)


@pytest.mark.parametrize(("status", "read_only", "access", "kept", "enabled", "reason"), [
    pytest.param(PROGRESSING, False, ALLOWED, None,
                 {"promote": True, "abort": True, "retry": False, "rollback": {"1.0.0": True, "1.0.1": True}},
                 {"promote": "Sets shipyard.dev/promote=1.1.0.", "retry": "nothing to retry"}, id="progressing"),
    pytest.param(HEALTHY, False, ALLOWED, ["1.0.1"],
                 {"promote": False, "abort": False, "retry": False, "rollback": {"1.0.0": False}},
                 {"promote": "has no candidate version to promote", "rollback-1.0.0": "no longer kept"},
                 id="healthy-current-stable-not-offered"),
    pytest.param(ROLLED_BACK, False, ALLOWED, ["1.0.0", "1.0.1", "1.1.0"],
                 {"promote": False, "abort": False, "retry": True, "rollback": {"1.1.0": True, "1.0.0": True}},
                 {"retry": "Sets shipyard.dev/retry to a new token"}, id="rolled-back-retry"),
    pytest.param(PROGRESSING, True, ALLOWED, None,
                 {"promote": False, "abort": False, "retry": False, "rollback": {"1.0.0": False, "1.0.1": False}},
                 {"promote": "read-only (--read-only)", "retry": "nothing to retry"}, id="read-only"),
    pytest.param(PROGRESSING, False, views.Access(False, "no RBAC policy matched"), None,
                 {"promote": False, "abort": False, "retry": False, "rollback": {"1.0.0": False, "1.0.1": False}},
                 {"promote": "may not patch ModelDeployments in namespace ml (RBAC, asked with a "
                             "SelfSubjectAccessReview): no RBAC policy matched."}, id="rbac-denied"),
])
def test_actions(status: dict[str, Any], read_only: bool, access: views.Access, kept: list[str] | None,
                 enabled: dict[str, Any], reason: dict[str, str]) -> None:
    actions = views.build_actions(md(status), read_only=read_only, access=access, kept=kept, now=NOW)
    got = {k: actions[k]["enabled"] for k in ("promote", "abort", "retry")}
    got["rollback"] = {r["version"]: r["enabled"] for r in actions["rollback"]}
    assert got == enabled
    for key, text in reason.items():
        name, _, version = key.partition("-")
        item = next(r for r in actions["rollback"] if r["version"] == version) if version else actions[name]
        assert text in item["reason"], item
    if actions["promote"]["value"]:
        assert actions["promote"]["confirm"] == "Promote 1.1.0 in ml/digits now, skipping its remaining steps and " \
                                                "analysis?"


# --- request checks -------------------------------------------------------------------------------------------------

HOSTS = views.build_allowed_hosts("127.0.0.1", 8484)
TOKEN = "t0ken"
ACTION = {"Host": "127.0.0.1:8484", "Origin": "http://127.0.0.1:8484", "Content-Type": "application/json",
          "X-CSRF-Token": TOKEN}


@pytest.mark.parametrize(("method", "headers", "refusal"), [
    pytest.param("GET", {"Host": "127.0.0.1:8484"}, None, id="page"),
    pytest.param("GET", {"Host": "localhost:8484"}, None, id="page-by-localhost"),
    pytest.param("GET", {"Host": "LOCALHOST:8484"}, None, id="host-case-insensitive"),
    pytest.param("GET", {"Host": "attacker.example:8484"}, "DNS rebinding", id="rebound-name"),
    pytest.param("GET", {"Host": "127.0.0.1:9999"}, "DNS rebinding", id="other-port"),
    pytest.param("GET", {}, "'(none)'", id="no-host"),
    pytest.param("GET", {"Host": "127.0.0.1:8484", "Origin": "http://attacker.example"}, "Origin", id="foreign-origin"),
    pytest.param("GET", {"Host": "127.0.0.1:8484", "Sec-Fetch-Site": "cross-site"}, "cross-site", id="cross-site"),
    pytest.param("POST", ACTION, None, id="action"),
    pytest.param("POST", {**ACTION, "Origin": "http://localhost:8484"}, None, id="action-from-localhost-page"),
    pytest.param("POST", {k: v for k, v in ACTION.items() if k != "Origin"}, "no Origin header", id="no-origin"),
    pytest.param("POST", {**ACTION, "Origin": "http://127.0.0.1:9999"}, "Origin", id="other-local-port"),
    pytest.param("POST", {**ACTION, "X-CSRF-Token": "guess"}, "CSRF token", id="wrong-token"),
    pytest.param("POST", {k: v for k, v in ACTION.items() if k != "X-CSRF-Token"}, "CSRF token", id="no-token"),
    pytest.param("POST", {**ACTION, "Content-Type": "application/x-www-form-urlencoded"}, "JSON", id="form-post"),
    pytest.param("DELETE", ACTION, None, id="any-unsafe-method-needs-the-same"),
])
def test_request_checks(method: str, headers: dict[str, str], refusal: str | None) -> None:
    got = views.assess_request(method, headers, allowed_hosts=HOSTS, csrf_token=TOKEN)
    assert (got is None) if refusal is None else (got is not None and refusal in got), got


@pytest.mark.parametrize(("address", "port", "hosts"), [
    pytest.param("127.0.0.1", 8484, {"127.0.0.1:8484", "localhost:8484"}, id="loopback"),
    pytest.param("::1", 8484, {"[::1]:8484", "localhost:8484"}, id="ipv6-loopback"),
    pytest.param("192.0.2.7", 80, {"192.0.2.7:80", "192.0.2.7"}, id="other-address-default-port"),
])
def test_allowed_hosts(address: str, port: int, hosts: set[str]) -> None:
    assert views.build_allowed_hosts(address, port) == hosts


# --- templates: everything from the cluster is escaped --------------------------------------------------------------

HOSTILE = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def macros() -> Any:
    env = jinja2.Environment(loader=jinja2.PackageLoader("shipyard.operator.dashboard", "templates"), autoescape=True)
    return env.get_template("macros.html").module


@pytest.mark.parametrize("where", ["message", "history", "event", "metric", "condition"])
def test_cluster_text_is_escaped(macros: Any, where: str) -> None:
    status: dict[str, Any] = {**PROGRESSING, "history": [{**HISTORY[0], "message": HOSTILE if where == "history"
                                                          else ""}]}
    if where == "message":
        status["message"] = HOSTILE
    if where == "condition":
        status["conditions"] = [{"type": "Ready", "status": "False", "reason": HOSTILE, "message": HOSTILE}]
    if where == "metric":
        status["analysis"] = {"version": "1.1.0", "metrics": [{"name": "m", "message": HOSTILE}]}
    body = md(status)
    events = [{"id": "e", "reason": "R", "message": HOSTILE, "time": T0, "type": "Warning", "count": 1}]
    context = {"summary": views.build_summary(body, events), "md": body, "conditions": views.build_conditions(body),
               "steps": views.build_steps(body), "timeline": views.build_timeline(body),
               "artifacts": views.build_artifacts(body), "analysis": views.build_analysis(body), "events": events,
               "actions": views.build_actions(body, read_only=False, access=ALLOWED, kept=None, now=NOW),
               "image": "i"}
    html = "".join(str(getattr(macros, name)(context)) for name in
                   ("summary", "actions", "steps", "analysis", "timeline", "artifacts", "events"))
    html += str(macros.row(context["summary"], True))
    assert HOSTILE not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


# --- the server's shared state ----------------------------------------------------------------------------------------

def obj(name: str, phase: str = "Healthy", namespace: str = "ml") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": phase}, "status": {"phase": phase}}


def event(name: str, n: int, model: str = "a") -> dict[str, Any]:
    return {"involvedObject": {"kind": "ModelDeployment", "name": model, "namespace": "ml"},
            "metadata": {"name": name}, "reason": f"R{n}",
            "lastTimestamp": f"2026-01-03T00:{n // 60:02d}:{n % 60:02d}Z"}


def test_hub_tells_each_page_what_changed_once_and_replays_since_a_sequence() -> None:
    hub = server.Hub()
    hub.replace_models([obj("a"), obj("b")])
    listing, one = hub.subscribe(None, hub.seq), hub.subscribe(("ml", "b"), hub.seq)
    for _ in range(3):  # coalesced: three changes of a, one entry
        hub.put_model(obj("a", "Progressing"))
        hub.put_model(obj("a", "Healthy"))
    hub.put_model(obj("a", "Healthy"))  # no change: nothing to tell
    assert listing.dirty == {("ml", "a")} and one.dirty == set() and listing.wake.is_set()
    seq = hub.seq
    hub.replace_models([obj("a")])  # b is gone from a new list
    assert ("ml", "b") not in hub.models and one.dirty == {("ml", "b")}
    late = hub.subscribe(None, seq)  # a page that last saw `seq` gets what changed since
    assert late.dirty == {("ml", "b")}
    assert hub.subscribe(None, 0).dirty == {("ml", "a"), ("ml", "b")}


def test_hub_keeps_the_newest_events_per_model_only() -> None:
    hub = server.Hub()
    hub.replace_models([obj("a")])
    for n in range(views.EVENTS_KEPT + 15):
        hub.put_event(event(f"e{n}", n))
    hub.put_event({"involvedObject": {"kind": "Pod", "name": "a", "namespace": "ml"}, "metadata": {"name": "p"}})
    recent = hub.recent_events(("ml", "a"))
    assert len(hub.events[("ml", "a")]) <= views.EVENTS_KEPT + 1
    assert [e["reason"] for e in recent[:2]] == [f"R{views.EVENTS_KEPT + 14}", f"R{views.EVENTS_KEPT + 13}"]
    hub.put_event(event(f"e{views.EVENTS_KEPT + 14}", 0), deleted=True)
    assert hub.recent_events(("ml", "a"), 1)[0]["reason"] == f"R{views.EVENTS_KEPT + 13}"
