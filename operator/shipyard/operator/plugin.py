"""`kubectl-shipyard`: the kubectl plugin for ModelDeployments (`kubectl shipyard <command>`).

    kubectl shipyard status digits -n ml        # versions, current step, conditions, analysis table
    kubectl shipyard history digits             # every version tried, with its outcome
    kubectl shipyard promote digits             # promote the candidate now (shipyard.dev/promote)
    kubectl shipyard abort digits               # roll the candidate back (shipyard.dev/abort)
    kubectl shipyard retry digits               # retry the failed version once (shipyard.dev/retry)
    kubectl shipyard rollback digits --to 1.3.2 # return to a kept version (shipyard.dev/rollback-to)
    kubectl shipyard watch digits               # live view until Ctrl-C (or --timeout)
    kubectl shipyard dashboard -A               # a local web UI of every ModelDeployment (http://127.0.0.1:8484)

The controls only set the annotations the operator acts on (it records what it acted on in status.controls);
the plugin never writes spec, so a GitOps tool sees no drift in the fields it owns.

The ``build_*`` functions are pure (formatting, and the choice of annotation with its checks); ``fetch_*``,
``patch_*`` and ``main`` talk to the API server through lightkube with the current kubeconfig.
"""

from __future__ import annotations

import argparse
import datetime
import math
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import httpx2
import lightkube
from lightkube.config.kubeconfig import KubeConfig, SingleConfig
from lightkube.types import PatchType

from shipyard.operator import kube, naming, planning, spec

FIELD_MANAGER = "kubectl-shipyard"
DASHBOARD_PORT = 8484
CONTROLS = ("promote", "abort", "retry", "rollback")  # the commands that set a control annotation


class PluginError(Exception):
    """A problem to report to the user in one line (exit status 1)."""


@dataclass(frozen=True)
class Control:
    """An annotation to set on a ModelDeployment, and what to tell the user about it."""

    annotation: str
    value: str
    summary: str


# --- pure: formatting ----------------------------------------------------------------------------------------------

def build_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain kubectl-style table: columns padded to their widest cell, separated by three spaces."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["   ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)


def build_number(value: object) -> str:
    """A measurement for a table: '-' when absent, NaN spelled out, 4 significant digits otherwise."""
    if value is None or value == "":
        return "-"
    try:
        number = float(str(value))
    except ValueError:
        return str(value)
    if math.isnan(number):
        return "NaN"
    return f"{number:.4g}"


def build_step_text(steps: Sequence[Mapping[str, Any]], index: int | None) -> str:
    """'2/3 (weight 50%, pause 60s)' for a 0-based step index; a spec without steps has one step of 100%."""
    if index is None:
        return "-"
    effective = list(steps) or [{"weight": 100}]
    if not 0 <= index < len(effective):
        return f"{index + 1}/{len(effective)}"
    step = effective[index]
    shadow = step.get("shadow")
    if isinstance(shadow, Mapping):
        until = ", ".join(f"{key} {shadow[key]}" for key in ("minRequests", "duration") if key in shadow)
        return f"{index + 1}/{len(effective)} (shadow {shadow.get('percent')}%, {until or '-'})"
    hold = "manual promotion" if step.get("manual") else (f"pause {step['pause']}" if step.get("pause") else "no pause")
    return f"{index + 1}/{len(effective)} (weight {step.get('weight', 100)}%, {hold})"


def build_shadow_text(status: Mapping[str, Any]) -> str:
    """The shadow step running now (status.shadow), e.g. '1.1.0 gets 10% of the stable's answered requests (copies):
    150/200 compared, 0 dropped, 1 timeouts, 2 errors; agreement 0.993' (pure); '-' when none runs."""
    shadow = status.get("shadow")
    if not isinstance(shadow, Mapping):
        return "-"
    compared = shadow.get("compared", 0)
    wanted = f"/{shadow['minRequests']}" if shadow.get("minRequests") else ""
    until = f"; until {shadow['until']}" if shadow.get("until") else ""
    agreement = shadow.get("agreement")
    return (f"{shadow.get('candidate', '-')} gets {shadow.get('percent', '-')}% of the stable's answered requests "
            f"(copies, no client traffic): {compared}{wanted} compared, {shadow.get('dropped', 0)} dropped, "
            f"{shadow.get('timeouts', 0)} timeouts, {shadow.get('errors', 0)} errors; agreement "
            f"{'-' if agreement is None else build_number(agreement)}{until}")


def build_conditions_text(conditions: Sequence[Mapping[str, Any]]) -> str:
    """'Ready=False (AnalysisInconclusive)  Stalled=False ...': the reason only where the condition is abnormal."""
    parts = []
    for c in conditions:
        text = f"{c.get('type')}={c.get('status')}"
        negative_polarity = c.get("type") in ("Reconciling", "Stalled")  # kstatus: True means not settled
        if (c.get("status") == "True") == negative_polarity and c.get("reason"):
            text += f" ({c['reason']})"
        parts.append(text)
    return "  ".join(parts) or "-"


def build_analysis_table(analysis: Mapping[str, Any] | None) -> str:
    if not analysis:
        return "Analysis: none running"
    head = (f"Analysis of {analysis.get('version', '?')}: {analysis.get('phase', 'Pending')}"
            f" (worst-case detection {build_number(analysis.get('detectionBoundSeconds'))} s)")
    if analysis.get("message"):
        head += f" - {analysis['message']}"
    rows = [[str(m.get("name", "")), str(m.get("provider", "")), str(m.get("verdict", "Pending")),
             build_number(m.get("lastValue")), build_number(m.get("stableValue")),
             str(m.get("successes", 0)), str(m.get("failures", 0)), str(m.get("inconclusive", 0)),
             str(m.get("errors", 0)), str(m.get("message", ""))[:80]]
            for m in analysis.get("metrics") or []]
    table = build_table(["METRIC", "PROVIDER", "VERDICT", "VALUE", "STABLE", "OK", "FAILED", "INCONCLUSIVE",
                         "ERRORS", "MESSAGE"], rows)
    return f"{head}\n{table}"


def build_traffic_text(spec: Mapping[str, Any], status: Mapping[str, Any]) -> str:
    """Where the model's Service (or the Gateway API route's weights) sends traffic, the blue-green preview, the
    rollback window and a rollback-to in
    progress, e.g. 'all to 1.1.0; preview 1.2.0; 1.0.0 kept Ready until 2026-12-02T21:00:00Z' (pure)."""
    strategy = (spec.get("rollout") or {}).get("strategy") or "canary"
    active = status.get("activeVersion")
    activator = (status.get("autoscaling") or {}).get("activator")
    if activator and (status.get("autoscaling") or {}).get("routesToActivator"):
        parts = [f"held by the activator ({activator}) until a pod is Ready"]
    elif status.get("traffic") and status["traffic"].get("canaryWeight") is not None:
        t = status["traffic"]
        routes = " and ".join(f"{kind} {t[key]}" for kind, key in (("HTTPRoute", "httpRoute"),
                                                                   ("GRPCRoute", "grpcRoute")) if t.get(key))
        weights = f"{status.get('stableVersion')} {t.get('stableWeight')}%"
        if status.get("candidateVersion"):
            weights += f", {status['candidateVersion']} {t['canaryWeight']}%"
        parts = [f"{weights} ({routes}{'' if t.get('programmed') else ', not yet programmed'})"]
        if t.get("preview"):
            parts.append(f"preview {t['preview']['header']}: {t['preview']['version']}")
        if t.get("message"):
            parts.append(str(t["message"]))
    elif active:
        parts = [f"all to {active}"]
    elif status.get("candidateVersion") and status.get("shadow"):
        parts = [f"all to {status.get('stableVersion')} (shadow step: {status['candidateVersion']} gets copies)"]
    elif status.get("candidateVersion"):
        parts = [f"split by ready pods between {status.get('stableVersion')} and {status['candidateVersion']}"]
    else:
        parts = ["-"]
    if strategy == "blueGreen":
        parts[0] += " (blue-green)"
    if status.get("previewVersion"):
        parts.append(f"preview {status['previewVersion']}")
    window = status.get("rollbackWindow") or {}
    if window.get("version"):
        parts.append(f"{window['version']} kept Ready until {window.get('until')}")
    restoring = status.get("restoring") or {}
    if restoring.get("version"):
        parts.append(f"rolling back to {restoring['version']} once Ready (since {restoring.get('since')})")
    return "; ".join(parts)


def build_autoscaling_text(status: Mapping[str, Any]) -> str:
    """'keda, requestRate 15 per pod, 1..5 replicas: ScalerReady (KEDA scales on the metric (active))', or '-'."""
    auto = status.get("autoscaling") or {}
    if not auto:
        return "-"
    condition: Mapping[str, Any] = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "Autoscaling"), {})
    state = f": {condition.get('reason')}" + (f" ({condition['message']})" if condition.get("message") else "") \
        if condition else ""
    return (f"{auto.get('provider')}, {auto.get('metric')} {auto.get('target', 0):g} per pod, "
            f"{auto.get('minReplicas')}..{auto.get('maxReplicas')} replicas{state}")


def build_model_text(spec: Mapping[str, Any], status: Mapping[str, Any]) -> str:
    """'s3://models/digits/ (sha256:3f2a9c01...): 0.1.0-m8d1e0b44 fetched by 4 pod(s), 1 download, 3 from the node
    cache, 203.8 kB' for a downloaded model; the path or URI otherwise."""
    model = spec.get("model") or {}
    source = str(model.get("uri") or model.get("path") or "-")
    if model.get("digest"):
        source += f" ({str(model['digest'])[:19]}...)"
    if model.get("mount") == "imageVolume":
        source += ", an image volume"
    fetch = status.get("modelFetch") or {}
    if not fetch:
        return source
    text = (f"{source}: {fetch.get('version')} fetched by {len(fetch.get('pods') or [])} pod(s), "
            f"{fetch.get('downloads', 0)} download(s), {fetch.get('cacheHits', 0)} from the node cache")
    if fetch.get("bytes") is not None:
        text += f", {fetch['bytes']} bytes"
    if fetch.get("failure"):
        text += f"; failing: {fetch['failure']}"
    return text


def build_status_view(md: Mapping[str, Any]) -> str:
    """What `kubectl shipyard status` prints for one ModelDeployment body."""
    meta, body_spec = md.get("metadata") or {}, md.get("spec") or {}
    status = md.get("status") or {}
    generation, observed = meta.get("generation"), status.get("observedGeneration")
    behind = "" if observed == generation else "  (status is behind the spec: not reconciled yet)"
    replicas = status.get("replicas") or {}
    steps = (body_spec.get("rollout") or {}).get("steps") or []
    lines = [
        f"ModelDeployment {meta.get('namespace', '')}/{meta.get('name', '')}   "
        f"generation {generation}, observed {observed if observed is not None else '-'}{behind}",
        f"Phase:       {status.get('phase') or 'Pending (not reconciled yet)'}"
        + (f" ({status['pausedReason']})" if status.get("pausedReason") else ""),
        f"Message:     {status.get('message') or '-'}",
        f"Spec image:  {body_spec.get('image', '-')}",
        f"Model:       {build_model_text(body_spec, status)}",
        f"Stable:      {status.get('stableVersion') or '-'}"
        + (f"   {status['stableImage']}" if status.get("stableImage") else "")
        + f"   ready {replicas.get('stable', 0)}",
        f"Candidate:   {status.get('candidateVersion') or '-'}"
        + (f"   {status['candidateImage']}" if status.get("candidateImage") else "")
        + (f"   ready {replicas.get('candidate', 0)}" if status.get("candidateVersion") else ""),
        f"Step:        {build_step_text(steps, status.get('currentStepIndex'))}"
        + (f"   started {status['stepStartedAt']}" if status.get("stepStartedAt") else "")
        + (f", ready {status['stepReadyAt']}" if status.get("stepReadyAt") else ""),
        f"Replicas:    {replicas.get('ready', 0)} ready of {(body_spec.get('serving') or {}).get('replicas', 1)}"
        + (f" (desired {replicas['desired']}, current {replicas.get('current', 0)})" if "desired" in replicas else ""),
        f"Autoscaling: {build_autoscaling_text(status)}",
        f"Traffic:     {build_traffic_text(body_spec, status)}",
        *([f"Shadow:      {build_shadow_text(status)}"] if any(
            isinstance(s, Mapping) and s.get("shadow") for s in steps) or status.get("shadow") else []),
        f"Conditions:  {build_conditions_text(status.get('conditions') or [])}",
        "",
        build_analysis_table(status.get("analysis")),
    ]
    return "\n".join(lines)


def build_history_table(md: Mapping[str, Any]) -> str:
    history = (md.get("status") or {}).get("history") or []
    if not history:
        return "No history yet."
    rows = [[str(h.get("version", "")), str(h.get("outcome", "")), str(h.get("reason", "") or "-"),
             str(h.get("time", "")), str(h.get("retry", 0)), str(h.get("image", "")),
             str(h.get("message", "") or "")[:80]] for h in history]
    return build_table(["VERSION", "OUTCOME", "REASON", "TIME", "RETRY", "IMAGE", "MESSAGE"], rows)


# --- pure: controls ------------------------------------------------------------------------------------------------

def _name(md: Mapping[str, Any]) -> str:
    meta = md.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def _candidate(md: Mapping[str, Any], version: str | None, action: str) -> str:
    candidate = (md.get("status") or {}).get("candidateVersion")
    if not candidate:
        raise PluginError(f"{_name(md)} has no candidate version to {action} "
                          f"(phase {(md.get('status') or {}).get('phase') or 'Pending'})")
    if version is not None and version != candidate:
        raise PluginError(f"version {version} is not the candidate of {_name(md)} (the candidate is {candidate})")
    return str(candidate)


def build_promote(md: Mapping[str, Any], version: str | None = None) -> Control:
    candidate = _candidate(md, version, "promote")
    return Control(spec.ANNOTATION_PROMOTE, candidate, f"Asked to promote {candidate} in {_name(md)}")


def build_abort(md: Mapping[str, Any], version: str | None = None) -> Control:
    candidate = _candidate(md, version, "abort")
    return Control(spec.ANNOTATION_ABORT, candidate, f"Asked to abort the rollout of {candidate} in {_name(md)}")


def build_retry(md: Mapping[str, Any], token: str) -> Control:
    """Retry is for the spec's version when its latest history entry failed; the token must be new."""
    image = str((md.get("spec") or {}).get("image", ""))
    version = spec.image_version(image) if image else "?"
    status = md.get("status") or {}
    history = status.get("history") or []
    last = next((h for h in reversed(history) if h.get("version") == version), None)
    if last is None or last.get("outcome") not in planning.FAILED_OUTCOMES:
        outcome = f"its last outcome is {last.get('outcome')}" if last else "it has no history entry"
        raise PluginError(f"nothing to retry in {_name(md)}: version {version} has not failed ({outcome})")
    if token == (status.get("controls") or {}).get("retry"):
        raise PluginError(f"retry token {token!r} was already used in {_name(md)}: choose a new one")
    return Control(spec.ANNOTATION_RETRY, token,
                   f"Asked to retry {version} ({last.get('outcome')}) in {_name(md)} with token {token}")


def build_rollback(md: Mapping[str, Any], version: str, kept: Sequence[str] | None = None) -> Control:
    """A rollback target must be in status.history and (when known) still kept as a Deployment."""
    status = md.get("status") or {}
    known = list(dict.fromkeys(str(h.get("version")) for h in status.get("history") or []))
    if version not in known:
        raise PluginError(f"version {version} is not in the history of {_name(md)} "
                          f"(versions: {', '.join(known) or 'none'})")
    if version == status.get("stableVersion") and not status.get("candidateVersion"):
        raise PluginError(f"version {version} is already the stable version of {_name(md)}")
    if kept is not None and version not in kept:
        raise PluginError(f"version {version} of {_name(md)} is no longer kept (kept versions: "
                          f"{', '.join(sorted(kept)) or 'none'}; see spec.revisionHistoryLimit)")
    return Control(spec.ANNOTATION_ROLLBACK_TO, version, f"Asked to roll {_name(md)} back to {version}")


def build_api_error(error: lightkube.ApiError, *, verb: str, what: str, namespace: str) -> PluginError:
    """One clear line for an API error: not found (object or CRD), forbidden (missing RBAC), or the server's."""
    code, message = error.status.code, str(error.status.message or "")
    details = error.status.details
    if code == 404 and details is not None and details.name:
        return PluginError(f"{what} not found in namespace {namespace}")
    if code == 404:
        return PluginError(f"the API server does not serve ModelDeployments ({message or 'not found'}): "
                           "is the Shipyard CRD installed (modeldeployments.shipyard.dev)?")
    if code == 403:
        return PluginError(f"not allowed to {verb} {what} in namespace {namespace} (RBAC): {message}. "
                           "Ask for a role that grants it, e.g. the built-in 'edit' role with the Shipyard chart's "
                           "aggregated ModelDeployment rules.")
    if code == 401:
        return PluginError(f"the API server did not accept the credentials ({message}): check the kubeconfig")
    return PluginError(f"the API server refused to {verb} {what} ({code}): {message}")


# --- I/O -----------------------------------------------------------------------------------------------------------

@dataclass
class Session:
    client: lightkube.Client
    namespace: str


def fetch_kubeconfig(kubeconfig: str | None, context: str | None) -> SingleConfig:
    """The user's kubeconfig (the file given, else $KUBECONFIG or ~/.kube/config) at the context given."""
    try:
        config = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
        single = config.get(context_name=context)
    except Exception as e:  # lightkube raises several types for missing or broken kubeconfigs
        raise PluginError(f"cannot load the kubeconfig: {e}") from None
    if single is None:
        raise PluginError(f"context {context!r} is not in the kubeconfig")
    return single


def build_session(kubeconfig: str | None, context: str | None, namespace: str | None) -> Session:
    single = fetch_kubeconfig(kubeconfig, context)
    client = lightkube.Client(config=single, field_manager=FIELD_MANAGER)
    return Session(client, namespace or single.namespace or "default")


def _call(session: Session, verb: str, what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except lightkube.ApiError as e:
        raise build_api_error(e, verb=verb, what=what, namespace=session.namespace) from None
    except httpx2.HTTPError as e:
        raise PluginError(f"cannot reach the API server: {e}") from None


def _as_dict(obj: Any) -> dict[str, Any]:
    return dict(obj.to_dict()) if hasattr(obj, "to_dict") else dict(obj)


def fetch_model(session: Session, name: str) -> dict[str, Any]:
    res = kube.resource_for(naming.API_VERSION, naming.KIND)
    return _as_dict(_call(session, "get", f'modeldeployment "{name}"', lambda: session.client.get(
        res, name, namespace=session.namespace)))


def fetch_kept_versions(session: Session, name: str) -> list[str] | None:
    """Versions with a Deployment labelled for this model; None when listing Deployments is not allowed."""
    res = kube.resource_for("apps/v1", "Deployment")
    try:
        items = list(session.client.list(res, namespace=session.namespace,
                                         labels={naming.LABEL_MODEL: naming.build_label_value(name)}))
    except lightkube.ApiError as e:
        if e.status.code == 403:
            return None
        raise build_api_error(e, verb="list", what="deployments", namespace=session.namespace) from None
    versions = []
    for item in items:
        labels = (_as_dict(item).get("metadata") or {}).get("labels") or {}
        if labels.get(naming.LABEL_VERSION):
            versions.append(str(labels[naming.LABEL_VERSION]))
    return versions


def patch_control(session: Session, name: str, control: Control) -> dict[str, Any]:
    res = kube.resource_for(naming.API_VERSION, naming.KIND)
    body = {"metadata": {"annotations": {control.annotation: control.value}}}
    return _as_dict(_call(session, "patch", f'modeldeployment "{name}"', lambda: session.client.patch(
        res, name, body, namespace=session.namespace, patch_type=PatchType.MERGE, field_manager=FIELD_MANAGER)))


def fetch_watch(session: Session, name: str, timeout: float | None) -> Iterator[dict[str, Any]]:
    """The object now, then every change, until the timeout (None = forever).

    lightkube's watch re-connects by itself and never ends, so it runs in a daemon thread that hands events over
    through a queue; this generator stops at the deadline whatever the stream does.
    """
    res = kube.resource_for(naming.API_VERSION, naming.KIND)
    deadline = None if timeout is None else time.monotonic() + timeout
    current = fetch_model(session, name)
    yield current
    events: queue.Queue[tuple[str, Any]] = queue.Queue()

    def pump() -> None:
        try:
            for kind, obj in session.client.watch(res, namespace=session.namespace, fields={"metadata.name": name},
                                                  resource_version=(current.get("metadata") or {}).get(
                                                      "resourceVersion")):
                events.put((kind, obj))
        except Exception as e:  # handed to the consumer, which reports it
            events.put(("ERROR", e))

    threading.Thread(target=pump, name="kubectl-shipyard-watch", daemon=True).start()
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return
        try:
            kind, obj = events.get(timeout=left)
        except queue.Empty:
            return
        if kind == "ERROR":
            if isinstance(obj, lightkube.ApiError):
                raise build_api_error(obj, verb="watch", what=f'modeldeployment "{name}"',
                                      namespace=session.namespace)
            raise PluginError(f"lost the watch: {obj}")
        if kind == "DELETED":
            raise PluginError(f'modeldeployment "{name}" was deleted')
        yield _as_dict(obj)


# --- command line --------------------------------------------------------------------------------------------------

def _add_connection_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("-n", "--namespace", default=default,
                        help="namespace (default: the context's, else 'default')")
    parser.add_argument("--kubeconfig", default=default,
                        help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--context", default=default, help="kubeconfig context")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubectl shipyard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_connection_options(parser, None)
    # The same options after the command (`kubectl shipyard status digits -n ml`); SUPPRESS keeps the value given
    # before the command when they are not repeated after it.
    common = argparse.ArgumentParser(add_help=False)
    _add_connection_options(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, text in (("status", "versions, current step, conditions and the analysis table"),
                          ("history", "every version tried, with its outcome")):
        sub.add_parser(command, help=text, parents=[common]).add_argument("name", help="ModelDeployment name")
    for command, text in (("promote", "promote the candidate now, skipping remaining steps and analysis"),
                          ("abort", "abort the candidate's rollout (the stable keeps serving)")):
        p = sub.add_parser(command, help=text, parents=[common])
        p.add_argument("name", help="ModelDeployment name")
        p.add_argument("--version", default=None, help="the candidate version (checked; default: the current one)")
    p = sub.add_parser("retry", help="retry the failed version of the current spec once", parents=[common])
    p.add_argument("name", help="ModelDeployment name")
    p.add_argument("--token", default=None, help="retry token (default: a new one from the time)")
    p = sub.add_parser("rollback", help="return to a kept version from the history", parents=[common])
    p.add_argument("name", help="ModelDeployment name")
    p.add_argument("--to", required=True, dest="to", metavar="VERSION", help="a version in status.history")
    p = sub.add_parser("watch", help="live view of the status until Ctrl-C", parents=[common])
    p.add_argument("name", help="ModelDeployment name")
    p.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
    p = sub.add_parser("dashboard", help="a local web UI of every ModelDeployment (needs the 'dashboard' extra)",
                       parents=[common])
    p.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace the kubeconfig may list")
    p.add_argument("--port", type=int, default=DASHBOARD_PORT,
                   help=f"port to listen on (default {DASHBOARD_PORT}; 0: any free port)")
    p.add_argument("--address", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; the UI acts with your credentials: keep it local)")
    p.add_argument("--read-only", action="store_true", help="no actions (promote, abort, retry, rollback)")
    return parser


def build_retry_token(now: datetime.datetime) -> str:
    return now.strftime("r%Y%m%d%H%M%S")


def apply_control(session: Session, command: str, name: str, *, version: str | None = None,
                  token: str | None = None, to: str | None = None) -> Control:
    """What `kubectl shipyard promote|abort|retry|rollback` does (the dashboard's actions too): read the object,
    choose and check the annotation (``build_*``), set it. Raises PluginError with the reason it refused."""
    md = fetch_model(session, name)
    if command == "promote":
        control = build_promote(md, version)
    elif command == "abort":
        control = build_abort(md, version)
    elif command == "retry":
        control = build_retry(md, token or build_retry_token(datetime.datetime.now(datetime.UTC)))
    elif command == "rollback":
        if not to:
            raise PluginError("rollback needs the version to return to")
        control = build_rollback(md, to, fetch_kept_versions(session, name))
    else:
        raise PluginError(f"unknown control {command!r} (one of {', '.join(CONTROLS)})")
    patch_control(session, name, control)
    return control


def run_dashboard(args: argparse.Namespace) -> int:
    if args.all_namespaces and args.namespace:
        raise PluginError("--namespace and --all-namespaces exclude each other")
    try:
        from shipyard.operator.dashboard import server
    except ImportError as e:  # the extra's libraries (jinja2, plotly, aiohttp-sse) are missing
        raise PluginError(f"the dashboard needs the 'dashboard' extra: pip install 'shipyard-operator[dashboard]' "
                          f"({e})") from None
    return server.main(args)


def run(args: argparse.Namespace, out: TextIO) -> int:
    if args.command == "dashboard":
        return run_dashboard(args)
    session = build_session(args.kubeconfig, args.context, args.namespace)
    if args.command == "watch":
        clear = out.isatty()
        for body in fetch_watch(session, args.name, args.timeout):
            stamp = datetime.datetime.now().strftime("%H:%M:%S")
            if clear:
                out.write("\x1b[H\x1b[2J")
            else:
                out.write(f"--- {stamp}\n")
            out.write(build_status_view(body) + "\n")
            out.flush()
        return 0
    if args.command in ("status", "history"):
        md = fetch_model(session, args.name)
        out.write((build_status_view(md) if args.command == "status" else build_history_table(md)) + "\n")
        return 0
    control = apply_control(session, args.command, args.name, version=getattr(args, "version", None),
                            token=getattr(args, "token", None), to=getattr(args, "to", None))
    out.write(f"{control.summary} ({control.annotation}={control.value}); "
              f"follow it with: kubectl shipyard watch {args.name} -n {session.namespace}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args, sys.stdout)
    except PluginError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
