"""What the dashboard shows, built from ModelDeployment bodies and Events. Pure: no I/O, no clock (``now`` is passed).

Every page and every live update is rendered from these views by the templates (Jinja2, autoescaped), so the
browser receives only the fields chosen here: annotations and most of ``spec`` never leave the server
(``build_trimmed_model``). Charts are Plotly figures (``build_metric_figure``: plain JSON that plotly.js draws);
the actions' checks are the plugin's own ``build_promote`` / ``build_abort`` / ``build_retry`` / ``build_rollback``,
so a button is enabled exactly when the command would act. ``assess_request`` is the server's refusal of foreign
Hosts and Origins (DNS rebinding, cross-site requests) and of actions without the CSRF token.
"""

from __future__ import annotations

import datetime
import hmac
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from shipyard.operator import analysis, plugin, spec

Key = tuple[str, str]  # (namespace, name)

PHASE_TONES: Final[Mapping[str, str]] = {
    "Healthy": "ok", "Progressing": "progress", "Compressing": "progress", "Pending": "progress",
    "Paused": "paused", "RolledBack": "bad", "Failed": "bad", "Degraded": "bad",
}
OUTCOME_TONES: Final[Mapping[str, str]] = {
    "Promoted": "ok", "Superseded": "neutral", "RolledBack": "bad", "Aborted": "bad", "Failed": "bad",
}
# Verdicts differ by colour and by marker shape (not by colour alone); the colours have >= 4.5:1 contrast on white.
VERDICT_MARKERS: Final[Mapping[str, tuple[str, str]]] = {
    "Successful": ("#1a7f37", "circle"),
    "Failed": ("#b42318", "x"),
    "Inconclusive": ("#5c5c5c", "diamond"),
    "Error": ("#9a4a00", "triangle-up"),
    "Skipped": ("#5c5c5c", "circle-open"),
}
CANDIDATE_COLOUR: Final = "#1f5fa8"
STABLE_COLOUR: Final = "#4d4d4d"
THRESHOLD_COLOUR: Final = "#b42318"
EVENTS_KEPT: Final = 20  # newest Events kept per ModelDeployment
CONTROL_ANNOTATIONS: Final = (spec.ANNOTATION_PROMOTE, spec.ANNOTATION_ABORT, spec.ANNOTATION_RETRY,
                              spec.ANNOTATION_ROLLBACK_TO)


# --- what is kept of an object --------------------------------------------------------------------------------------

def build_trimmed_model(body: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a ModelDeployment the dashboard keeps and may show: name, namespace, generation, the control
    annotations (to tell what was asked), spec and status. Other annotations (last-applied-configuration, a GitOps
    tool's) and managedFields are dropped: they are never rendered and cost memory with many objects."""
    meta = body.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    return {
        "metadata": {
            "name": meta.get("name"), "namespace": meta.get("namespace"), "generation": meta.get("generation"),
            "resourceVersion": meta.get("resourceVersion"), "uid": meta.get("uid"),
            "creationTimestamp": meta.get("creationTimestamp"),
            "annotations": {k: str(v) for k, v in annotations.items() if k in CONTROL_ANNOTATIONS},
        },
        "spec": dict(body.get("spec") or {}),
        "status": dict(body.get("status") or {}),
    }


def build_event_record(event: Mapping[str, Any]) -> tuple[Key, dict[str, Any]] | None:
    """(the ModelDeployment it is about, what is kept of a core/v1 Event), or None for another kind's event."""
    involved = event.get("involvedObject") or {}
    if involved.get("kind") != "ModelDeployment" or not involved.get("name"):
        return None
    meta = event.get("metadata") or {}
    time = (event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp")
            or meta.get("creationTimestamp") or "")
    rv = str(meta.get("resourceVersion") or "")
    record = {"id": str(meta.get("name") or ""), "order": int(rv) if rv.isdigit() else 0,
              "type": str(event.get("type") or "Normal"),
              "reason": str(event.get("reason") or ""), "message": str(event.get("message") or "")[:1024],
              "count": event.get("count") or 1, "time": str(time)}
    return (str(involved.get("namespace") or meta.get("namespace") or ""), str(involved["name"])), record


def build_recent_events(events: Iterable[dict[str, Any]], limit: int = EVENTS_KEPT) -> list[dict[str, Any]]:
    """The newest ``limit`` events, newest first: by time (whole seconds), then by their order of writing (the
    resourceVersion, when it is a number as etcd's are), then name."""
    return sorted(events, key=lambda e: (str(e.get("time", "")), e.get("order", 0), str(e.get("id", ""))),
                  reverse=True)[:limit]


# --- small formatting -----------------------------------------------------------------------------------------------

def build_time_text(value: object) -> str:
    """'2026-01-03 00:00:05' (UTC) from an RFC 3339 timestamp; '-' when absent."""
    parsed = analysis.parse_timestamp(value)
    return parsed.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S") if parsed else "-"


def build_bytes_text(value: object) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def build_ratio_text(before: object, after: object, what: str) -> str:
    """'4.02x smaller' / '1.8x faster': before / after, when both are positive numbers."""
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in (before, after)):
        return ""
    return f"{float(before) / float(after):.3g}x {what}"  # type: ignore[arg-type]


def build_percent_text(value: object) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return "-"
    return f"{value * 100:.3g}%"


# --- the list of ModelDeployments -----------------------------------------------------------------------------------

def build_row_id(key: Key) -> str:
    """A DOM id for a ModelDeployment (namespace and name are DNS labels/subdomains: no characters to escape)."""
    return f"md-{key[0]}--{key[1]}"


def build_summary(md: Mapping[str, Any], events: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """One row of the list page: phase, stable, candidate, step, readiness and the last event."""
    meta, status = md.get("metadata") or {}, md.get("status") or {}
    body_spec = md.get("spec") or {}
    key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
    phase = str(status.get("phase") or "Pending")
    replicas = status.get("replicas") or {}
    steps = (body_spec.get("rollout") or {}).get("steps") or []
    desired = (body_spec.get("serving") or {}).get("replicas", 1)
    last = build_recent_events(events, 1)
    observed, generation = status.get("observedGeneration"), meta.get("generation")
    return {
        "id": build_row_id(key), "namespace": key[0], "name": key[1], "phase": phase,
        "tone": PHASE_TONES.get(phase, "neutral"), "message": str(status.get("message") or ""),
        "stable": str(status.get("stableVersion") or "-"), "candidate": str(status.get("candidateVersion") or "-"),
        "step": plugin.build_step_text(steps, status.get("currentStepIndex")) if status.get("candidateVersion")
        else "-",
        "ready": f"{replicas.get('ready', 0)}/{desired}",
        "behind": observed != generation,
        "event": last[0] if last else None,
        "sort": f"{key[0]}/{key[1]}",
    }


def build_phase_counts(summaries: Iterable[Mapping[str, Any]]) -> list[tuple[str, int, str]]:
    """(phase, how many, tone) for the page's header, in the order of PHASE_TONES."""
    counts: dict[str, int] = {}
    for s in summaries:
        counts[str(s["phase"])] = counts.get(str(s["phase"]), 0) + 1
    order = [*PHASE_TONES, *sorted(set(counts) - set(PHASE_TONES))]
    return [(p, counts[p], PHASE_TONES.get(p, "neutral")) for p in order if p in counts]


# --- one ModelDeployment --------------------------------------------------------------------------------------------

def build_steps(md: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rollout's steps with their weights and where the candidate is (done, current, pending); no candidate:
    every step is idle. A spec without steps has one step of 100%."""
    status = md.get("status") or {}
    steps = list(((md.get("spec") or {}).get("rollout") or {}).get("steps") or []) or [{"weight": 100}]
    index = status.get("currentStepIndex") if status.get("candidateVersion") else None
    views = []
    for i, step in enumerate(steps):
        state = "idle" if index is None else "done" if i < index else "current" if i == index else "pending"
        shadow = step.get("shadow")
        if isinstance(shadow, Mapping):  # no client traffic: weight 0, the copies' share in the hold text
            until = ", ".join(f"{k} {shadow[k]}" for k in ("minRequests", "duration") if k in shadow)
            views.append({"number": i + 1, "weight": 0, "hold": f"shadow copies of {shadow.get('percent')}%, {until}",
                          "state": state})
            continue
        hold = ("manual promotion" if step.get("manual") else f"pause {step['pause']}" if step.get("pause")
                else "no pause")
        views.append({"number": i + 1, "weight": int(step.get("weight", 100)), "hold": hold, "state": state})
    return views


def build_timeline(md: Mapping[str, Any]) -> list[dict[str, Any]]:
    """status.history newest first, each marked as the stable or the candidate when it is."""
    status = md.get("status") or {}
    entries = []
    for h in reversed(status.get("history") or []):
        version = str(h.get("version") or "")
        outcome = str(h.get("outcome") or "")
        entries.append({
            "version": version, "outcome": outcome, "tone": OUTCOME_TONES.get(outcome, "neutral"),
            "reason": str(h.get("reason") or ""), "message": str(h.get("message") or ""),
            "time": build_time_text(h.get("time")), "datetime": str(h.get("time") or ""),
            "image": str(h.get("image") or ""), "retry": h.get("retry") or 0, "retried": bool(h.get("retried")),
            "stable": version == status.get("stableVersion"), "candidate": version == status.get("candidateVersion"),
        })
    return entries


def build_artifacts(md: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The compression report of each artifact: bytes, accuracy and latency before and after."""
    views = []
    for a in (md.get("status") or {}).get("artifacts") or []:
        views.append({
            "version": str(a.get("version") or "-"), "phase": str(a.get("phase") or "-"),
            "tone": {"Succeeded": "ok", "Failed": "bad"}.get(str(a.get("phase")), "progress"),
            "key": str(a.get("key") or ""), "message": str(a.get("message") or ""),
            "created": build_time_text(a.get("createdAt")),
            "bytes": (build_bytes_text(a.get("sourceBytes")), build_bytes_text(a.get("compressedBytes")),
                      build_ratio_text(a.get("sourceBytes"), a.get("compressedBytes"), "smaller")),
            "accuracy": (plugin.build_number(a.get("sourceAccuracy")),
                         plugin.build_number(a.get("compressedAccuracy")),
                         f"loss {build_percent_text(a.get('relativeAccuracyLoss'))}"
                         if a.get("relativeAccuracyLoss") is not None else ""),
            "latency": (plugin.build_number(a.get("sourceLatencyMs")),
                        plugin.build_number(a.get("compressedLatencyMs")),
                        build_ratio_text(a.get("sourceLatencyMs"), a.get("compressedLatencyMs"), "faster")),
        })
    return views


def build_conditions(md: Mapping[str, Any]) -> list[dict[str, Any]]:
    views = []
    for c in (md.get("status") or {}).get("conditions") or []:
        abnormal_when_true = c.get("type") in ("Reconciling", "Stalled")
        healthy = (c.get("status") == "True") != abnormal_when_true
        views.append({"type": str(c.get("type") or ""), "status": str(c.get("status") or ""),
                      "reason": str(c.get("reason") or ""), "message": str(c.get("message") or ""),
                      "tone": "ok" if healthy else "bad" if c.get("type") == "Stalled" else "paused"})
    return views


def _metric_specs(md: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    metrics = (((md.get("spec") or {}).get("rollout") or {}).get("analysis") or {}).get("metrics") or []
    return {str(m.get("name")): m for m in metrics if isinstance(m, Mapping)}


def _relative_floor(metric: Mapping[str, Any]) -> float:
    try:
        typed = spec.Metric.model_validate(dict(metric))
    except ValueError:  # an older or odd spec: no floor known, compare with the stable value as it is
        return 0.0
    return analysis.build_relative_floor(typed)


def _chart_time(value: object) -> str | None:
    parsed = analysis.parse_timestamp(value)
    return parsed.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S") if parsed else None


def build_metric_figure(result: Mapping[str, Any], metric: Mapping[str, Any] | None,
                        candidate: str, stable: str) -> dict[str, Any]:
    """A Plotly figure of a metric's recent measurements: the candidate's values (markers by verdict), the
    stable's (metrics compared with it), and the thresholds: max and min as lines, maxRelativeToStable as the limit
    it gave at each measurement (max(stable, the provider's floor) x (1 + maxRelativeToStable))."""
    history = [h for h in result.get("history") or [] if isinstance(h, Mapping) and _chart_time(h.get("time"))]
    times = [_chart_time(h.get("time")) for h in history]
    verdicts = [str(h.get("verdict") or "") for h in history]
    name = str(result.get("name") or "")
    traces: list[dict[str, Any]] = [{
        "type": "scatter", "mode": "lines+markers", "name": f"candidate {candidate}", "x": times,
        "y": [h.get("value") for h in history], "text": verdicts, "connectgaps": False,
        "line": {"color": CANDIDATE_COLOUR, "width": 2},
        "marker": {"size": 10, "color": [VERDICT_MARKERS.get(v, ("#5c5c5c", ""))[0] for v in verdicts],
                   "symbol": [VERDICT_MARKERS.get(v, ("", "circle"))[1] for v in verdicts],
                   "line": {"width": 2, "color": [VERDICT_MARKERS.get(v, ("#5c5c5c", ""))[0] for v in verdicts]}},
        "hovertemplate": "%{x}<br>%{y}<br>%{text}<extra>candidate</extra>",
    }]
    stable_values = [h.get("stableValue") for h in history]
    if any(v is not None for v in stable_values):
        traces.append({"type": "scatter", "mode": "lines+markers", "name": f"stable {stable}", "x": times,
                       "y": stable_values, "connectgaps": False,
                       "line": {"color": STABLE_COLOUR, "width": 2, "dash": "dot"},
                       "marker": {"size": 6, "color": STABLE_COLOUR},
                       "hovertemplate": "%{x}<br>%{y}<extra>stable</extra>"})
    metric = metric or {}
    span = [times[0], times[-1]] if times else []
    for bound in ("max", "min"):
        value = metric.get(bound)
        if isinstance(value, int | float) and not isinstance(value, bool) and span:
            traces.append({"type": "scatter", "mode": "lines", "name": f"{bound} {plugin.build_number(value)}",
                           "x": span, "y": [value, value], "hoverinfo": "skip",
                           "line": {"color": THRESHOLD_COLOUR, "width": 2, "dash": "dash"}})
    relative = metric.get("maxRelativeToStable")
    if isinstance(relative, int | float) and not isinstance(relative, bool) and span:
        floor = _relative_floor(metric)
        limits = [None if s is None else max(float(s), floor) * (1.0 + float(relative)) for s in stable_values]
        traces.append({"type": "scatter", "mode": "lines", "name": f"limit: stable x {1 + float(relative):.3g}",
                       "x": times, "y": limits, "connectgaps": False,
                       "line": {"color": THRESHOLD_COLOUR, "width": 2, "dash": "dash", "shape": "hv"},
                       "hovertemplate": "%{x}<br>%{y}<extra>limit</extra>"})
    layout = {
        "height": 280, "margin": {"l": 56, "r": 16, "t": 36, "b": 44},
        "paper_bgcolor": "#ffffff", "plot_bgcolor": "#ffffff",
        "font": {"family": "system-ui, sans-serif", "size": 13, "color": "#1b1b1b"},
        "xaxis": {"type": "date", "title": {"text": "time (UTC)"}, "gridcolor": "#e3e3e3"},
        "yaxis": {"title": {"text": name}, "gridcolor": "#e3e3e3", "zeroline": True},
        "legend": {"orientation": "h", "x": 0, "y": 1.02, "yanchor": "bottom"}, "showlegend": True,
    }
    return {"data": traces, "layout": layout}


def build_analysis(md: Mapping[str, Any]) -> dict[str, Any] | None:
    """The current analysis: its verdict and, per metric, the counters, the figure and the measurements table."""
    status = md.get("status") or {}
    current = status.get("analysis")
    if not current:
        return None
    specs = _metric_specs(md)
    metrics = []
    for i, result in enumerate(current.get("metrics") or []):
        name = str(result.get("name") or "")
        metric = specs.get(name)
        thresholds = [f"{k} {plugin.build_number(metric[k])}" for k in ("max", "min", "maxRelativeToStable")
                      if metric is not None and metric.get(k) is not None]
        metrics.append({
            "name": name, "chart_id": f"chart-{i}", "provider": str(result.get("provider") or ""),
            "verdict": str(result.get("verdict") or "Pending"), "message": str(result.get("message") or ""),
            "value": plugin.build_number(result.get("lastValue")),
            "stable_value": plugin.build_number(result.get("stableValue")),
            "counts": {k: result.get(k) or 0 for k in ("successes", "failures", "inconclusive", "errors")},
            "thresholds": ", ".join(thresholds) or "exit code",
            "history": [{"time": build_time_text(h.get("time")), "value": plugin.build_number(h.get("value")),
                         "stable": plugin.build_number(h.get("stableValue")), "verdict": str(h.get("verdict") or "")}
                        for h in reversed(result.get("history") or []) if isinstance(h, Mapping)],
            "figure": build_metric_figure(result, metric, str(current.get("version") or "?"),
                                          str(status.get("stableVersion") or "-")),
        })
    return {"version": str(current.get("version") or ""), "phase": str(current.get("phase") or "Pending"),
            "tone": {"Successful": "ok", "Failed": "bad", "Error": "bad", "Inconclusive": "paused"}.get(
                str(current.get("phase")), "progress"),
            "message": str(current.get("message") or ""),
            "detection": plugin.build_number(current.get("detectionBoundSeconds")),
            "started": build_time_text(current.get("startedAt")), "metrics": metrics}


# --- actions --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Access:
    """Whether the user may patch ModelDeployments in a namespace (a SelfSubjectAccessReview's answer)."""

    allowed: bool
    reason: str = ""


def build_actions(md: Mapping[str, Any], *, read_only: bool, access: Access, kept: Sequence[str] | None,
                  now: datetime.datetime) -> dict[str, Any]:
    """Each action with whether it may be taken and, if not, why: the plugin's own checks (the ``build_*`` of
    ``plugin``), then read-only mode, then RBAC. Rollback: one entry per version in the history but the current
    stable one, newest first."""
    meta = md.get("metadata") or {}
    where = f"{meta.get('namespace')}/{meta.get('name')}"
    blocked = ("The dashboard runs read-only (--read-only): no action can be taken." if read_only else
               None if access.allowed else
               f"Your account may not patch ModelDeployments in namespace {meta.get('namespace')} (RBAC, asked with "
               f"a SelfSubjectAccessReview){': ' + access.reason if access.reason else ''}.")

    def check(make: Any, question: str, what: str | None = None) -> dict[str, Any]:
        try:
            control = make()
        except plugin.PluginError as e:
            return {"enabled": False, "reason": f"{e}.", "value": "", "confirm": ""}
        confirm = question.format(value=control.value, where=where)
        if blocked:
            return {"enabled": False, "reason": blocked, "value": control.value, "confirm": confirm}
        return {"enabled": True, "reason": (what or f"Sets {control.annotation}={control.value}") + ".",
                "value": control.value, "confirm": confirm}

    status = md.get("status") or {}
    versions = list(dict.fromkeys(str(h.get("version")) for h in reversed(status.get("history") or [])))
    return {
        "where": where, "blocked": blocked,
        "promote": check(lambda: plugin.build_promote(md), "Promote {value} in {where} now, skipping its remaining "
                         "steps and analysis?"),
        "abort": check(lambda: plugin.build_abort(md), "Abort the rollout of {value} in {where}? The stable "
                       "version keeps serving."),
        "retry": check(lambda: plugin.build_retry(md, plugin.build_retry_token(now)),
                       "Retry the failed version of {where} once more?",
                       f"Sets {spec.ANNOTATION_RETRY} to a new token: the failed version is tried once more"),
        "rollback": [{"version": v, **check(lambda v=v: plugin.build_rollback(md, v, kept),
                                            "Roll {where} back to version {value}?")}
                     for v in versions
                     if not (v == status.get("stableVersion") and not status.get("candidateVersion"))],
    }


# --- request checks -------------------------------------------------------------------------------------------------

def build_allowed_hosts(address: str, port: int) -> frozenset[str]:
    """The Host headers this server answers: its own address and port (and localhost for a loopback address)."""
    host = f"[{address}]" if ":" in address and not address.startswith("[") else address
    names = {host}
    if address in ("127.0.0.1", "::1", "localhost"):
        names |= {"localhost", "127.0.0.1"} if address != "::1" else {"localhost", "[::1]"}
    hosts = {f"{n}:{port}" for n in names}
    if port == 80:
        hosts |= names
    return frozenset(h.lower() for h in hosts)


SAFE_METHODS: Final = frozenset({"GET", "HEAD"})


def assess_request(method: str, headers: Mapping[str, str], *, allowed_hosts: frozenset[str],
                   csrf_token: str) -> str | None:
    """Why the server refuses a request, None to serve it.

    - the Host must be the server's own: a DNS name rebound to 127.0.0.1 carries its own name (DNS rebinding);
    - an Origin, when sent, must be the server's own (a page elsewhere may not use this one);
    - an action (any method but GET/HEAD) must come from the dashboard's page: same Origin (required), JSON, and
      the CSRF token the page was given.
    """
    host = (headers.get("Host") or "").lower()
    if host not in allowed_hosts:
        return f"Host {host or '(none)'!r} is not this dashboard's address (DNS rebinding protection)"
    origin = headers.get("Origin")
    origins = {f"http://{h}" for h in allowed_hosts}
    if origin is not None and origin.lower() not in origins:
        return f"Origin {origin!r} is not this dashboard's"
    if headers.get("Sec-Fetch-Site", "same-origin") == "cross-site":
        return "cross-site requests are refused"
    if method.upper() in SAFE_METHODS:
        return None
    if origin is None:
        return "an action must come from the dashboard's page (no Origin header)"
    if not (headers.get("Content-Type") or "").lower().startswith("application/json"):
        return "an action's body must be JSON"
    sent = headers.get("X-CSRF-Token") or ""
    if not hmac.compare_digest(sent.encode(), csrf_token.encode()):
        return "the CSRF token is missing or wrong: reload the page"
    return None
