"""Pure reconciliation planning: (ModelDeployment, observed children, measurements, now) -> Plan. No I/O.

The rollout is a state machine held in ``status``; every decision is a function of the spec, the observed
cluster, the metric measurements and the clock passed in, so a restarted operator continues where it stopped and
a repeated call with the same inputs plans nothing new (level-triggered, idempotent).

Versions: the image tag is the version. Each live version has its own Deployment (``<model>-<version>``); one
Service selects every serving pod of the model, so traffic splits by ready replicas (no mesh needed).

Lifecycle of a new version (the *target*, from ``spec.image``) next to the *stable* one:

1. **Compressing** (``spec.compression`` set): a Job per (version, recipe) writes a content-addressed artifact;
   an artifact already built for the same key is reused. A failed Job fails the version (``Compressed=False``).
2. **Progressing**: canary steps by replica weight. A step of weight ``w`` gives the candidate
   ``max(1, ceil(replicas x w / 100))`` pods (rounded up, at least one) and the stable ``replicas`` minus the
   candidate's ready pods (so serving capacity never drops), never below ``replicas - canary``. With GPU pods and
   ``maxSurgeGPUs``, the pods above ``replicas`` are limited to ``maxSurgeGPUs / GPUs per pod``, counted after
   every single write: the stable is scaled down first and the candidate grows only into what it gave back, one
   pass later (at 0: in-place replacement). A step is done when its pods are ready, its pause has elapsed
   (or, for a ``manual`` step, the promote annotation names the candidate) and the analysis has not failed; an
   Inconclusive analysis holds the step (**Paused**), neither promoting nor rolling back. A metric whose latest
   measurement erred (provider down, within ``consecutiveErrorLimit``) makes the analysis Inconclusive too.
3. **Promotion**: the candidate is scaled to ``replicas``; once available it becomes stable, the previous stable
   is scaled to zero and kept (up to ``revisionHistoryLimit``) for an instant rollback.
4. **Rollback** when the analysis fails or the candidate is not ready within ``startupTimeoutSeconds``:
   ``Automatic`` scales the candidate to zero and the stable back (phase **RolledBack**, ``Stalled``); ``Manual``
   pauses for the promote or abort annotation. A failed version is not tried again while ``spec.image`` and
   ``spec.retry`` stay the same (a GitOps tool re-applying the same manifest causes no loop); the
   ``shipyard.dev/retry`` annotation retries it once per new value.

The first version of a model has nothing to compare with: it is deployed at full size (no steps, no analysis)
and becomes stable once available.

The phase is never set directly: each pass concludes one ``rollout.Event`` and the phase is
``rollout.transition(previous phase, event)`` (the table in ``rollout``). The spec is parsed once per pass, by the
shell (``plan_reconcile(..., parsed=...)``). Whether and since when the candidate is under analysis is decided in one
place (``plan_analysis_gate``), for the shell's measurements and the planner's folding alike; which metrics are due
is ``analysis.plan_due``. Metrics of planned providers (``job``) are measured by a child (a Job) per measurement
that the planner creates and reads back through the provider (``providers.base.PlannedBackend``), with a Service per
version for it to reach.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from shipyard import contract
from shipyard.operator import analysis, autoscaling, disruption, naming, objects, providers, rollout, traffic
from shipyard.operator import spec as spec_mod
from shipyard.operator.observed import Observed
from shipyard.operator.rollout import Event, Outcome, Phase, Reason

CONDITION_TYPES = ("Ready", "Reconciling", "Stalled", "Compressed", "Serving")
HISTORY_MAX = 50
ARTIFACTS_MAX = 20
FAILED_OUTCOMES = rollout.FAILED_OUTCOMES
VOLUME_POLL = datetime.timedelta(seconds=10)  # a missing PVC is looked for again this often (PVCs are not watched)
# gatewayAPI traffic (routes are not watched): looked at this often during a rollout, and while a route is unusable
TRAFFIC_POLL = datetime.timedelta(seconds=5)
ROUTE_POLL = datetime.timedelta(seconds=1)  # while the Gateway controller has not acted on a route just written
# A controller may report a route's generation before its data plane applies it (Traefik: status in 0.2-0.5 s, the
# traffic within 0.4 s, or after its 2 s reload throttle): nothing scales down until this long after a write.
ROUTE_SETTLE = datetime.timedelta(seconds=3)
GPU = spec_mod.GPU_RESOURCE

# Re-exported builders (the planner's objects live in objects.py).
Meta = objects.Meta
build_meta = objects.build_meta
build_service = objects.build_service
build_deployment = objects.build_deployment


@dataclass(frozen=True)
class EventSpec:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class MeasureRequest:
    """The shell should measure these pulled metrics now: candidate (and stable) version of this model."""

    candidate: str
    stable: str | None
    metrics: tuple[str, ...]  # names of the due metrics the shell measures (pulled providers)


@dataclass(frozen=True)
class AnalysisGate:
    """The candidate is under analysis: since ``started``; ``prior`` is its analysis status so far (None: none)."""

    candidate: str
    started: datetime.datetime
    prior: Mapping[str, Any] | None


@dataclass(frozen=True)
class Plan:
    apply: tuple[dict[str, Any], ...]
    delete: tuple[tuple[str, str, str], ...]  # (apiVersion, kind, name)
    status: dict[str, Any]
    events: tuple[EventSpec, ...]
    requeue_after: float | None
    scale: tuple[tuple[str, int], ...] = ()  # (Deployment name, replicas) of versions other than the target
    rollbacks: int = 0  # rollbacks this plan performs (for the operator's counter)


def build_timestamp(now: datetime.datetime) -> str:
    return analysis.build_timestamp(now)


def parse_time(text: object) -> datetime.datetime | None:
    return analysis.parse_timestamp(text)


def build_condition(type_: str, status: bool | None, reason: str, message: str, generation: int,
                    previous: Sequence[Mapping[str, Any]], now: datetime.datetime) -> dict[str, Any]:
    """A metav1.Condition; lastTransitionTime moves only when the status flips. status None = Unknown."""
    value = "Unknown" if status is None else ("True" if status else "False")
    old = next((c for c in previous if c.get("type") == type_), None)
    changed = old is None or old.get("status") != value
    return {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": build_timestamp(now) if changed or old is None or not old.get("lastTransitionTime")
        else old["lastTransitionTime"],
    }


def build_canary_replicas(total: int, weight: int) -> int:
    """Candidate pods for a step: total x weight / 100 rounded up, at least one (none when total is 0)."""
    if total <= 0:
        return 0
    return min(total, max(1, math.ceil(total * weight / 100)))


StepKind = Literal["shadow", "weighted", "promoting"]


def build_step_kind(spec: spec_mod.ModelDeploymentSpec, step_index: int) -> StepKind:
    """What the canary's step ``step_index`` is: ``shadow`` (the candidate gets copies of requests and no client
    traffic: its route weight is 0), ``weighted`` (it takes its weight's share), or ``promoting`` (past the last step:
    every replica, all traffic once promoted). Pure."""
    steps = spec.rollout.effective_steps
    if step_index >= len(steps):
        return "promoting"
    return "shadow" if steps[step_index].is_shadow else "weighted"


def build_step_pods(total: int, step: spec_mod.RolloutStep) -> int:
    """Candidate pods of a step: its weight's share, or a shadow step's percent (a copy of percent % of the requests
    is that share of the load), rounded up, at least one."""
    share = step.shadow.percent if step.shadow is not None else step.weight
    assert share is not None  # a step sets weight or shadow (admission)
    return build_canary_replicas(total, share)


def build_step_label(step: spec_mod.RolloutStep) -> str:
    """``50%`` for a weighted step, ``shadow 10%`` for a shadow step (messages and Events)."""
    return f"shadow {step.shadow.percent}%" if step.shadow is not None else f"{step.weight}%"


def plan_shadow_replicas(spec: spec_mod.ModelDeploymentSpec, canary: int, now: tuple[int, int]) -> tuple[int, int]:
    """(candidate, stable) replicas of a shadow step: the stable keeps every replica (it serves all traffic), the
    candidate runs ``canary`` pods beside it. With a GPU surge budget (spec.rollout.maxSurgeGPUs) the candidate gets
    at most what the budget holds next to the stable, at least one pod; at 0 the stable gives one pod back first
    (``plan_step_replicas``' order: the stable shrinks in one pass, the candidate grows in the next). Pure."""
    total = spec.serving.effective_replicas
    surge = build_surge_pods(spec)
    if surge is None:
        return canary, total
    wanted = max(1, min(canary, surge)) if total > 0 else 0
    stable = total - max(0, wanted - surge)
    candidate_now, stable_now = now
    return min(wanted, max(candidate_now, total + surge - stable_now)), stable


def build_surge_pods(spec: spec_mod.ModelDeploymentSpec) -> int | None:
    """Pods allowed above `replicas` during a rollout: None = no limit (CPU pods, or maxSurgeGPUs unset)."""
    gpus = spec.serving.resources.gpus
    if gpus <= 0 or spec.rollout.max_surge_gpus is None:
        return None
    return spec.rollout.max_surge_gpus // gpus


def plan_step_replicas(total: int, canary: int, candidate_ready: int, surge: int | None,
                       now: tuple[int, int] | None = None) -> tuple[int, int]:
    """(candidate, stable) replicas while the candidate moves to `canary` pods (see the module docstring).

    With a surge limit and `now` = the (candidate, stable) replicas as they are, the candidate grows only into what
    the stable has already given back: one pass scales the stable down, the next scales the candidate up. The
    candidate is written before the stable in a pass, so planning both at once would hold `replicas + canary` GPU
    pods for a moment. The limit only holds growth back: a candidate already running is never shrunk for it.
    """
    floor = total - canary
    stable = total - min(candidate_ready, canary)
    if surge is None:
        return canary, max(floor, stable, 0)
    stable = max(floor, min(stable, total + surge - canary), 0)
    if now is None:
        return canary, stable
    candidate_now, stable_now = now
    return min(canary, max(candidate_now, total + surge - stable_now)), stable


def plan_canary_replicas(spec: spec_mod.ModelDeploymentSpec, canary: int, candidate_ready: int,
                         now: tuple[int, int]) -> tuple[int, int]:
    """(candidate, stable) replicas of a canary step (``plan_step_replicas``); with a rollback window
    (spec.rollout.scaleDownDelaySeconds) a step to every replica does not scale the stable down: what it has then is
    what the window keeps warm after the promotion (within the GPU surge budget). Pure."""
    total = spec.serving.effective_replicas
    candidate, stable = plan_step_replicas(total, canary, candidate_ready, build_surge_pods(spec), now)
    if canary >= total and spec.rollout.effective_scale_down_delay > 0:
        stable = max(stable, plan_window_replicas(spec, now[1]))
    return candidate, stable


def plan_invalid(meta: Meta, previous: Mapping[str, Any], message: str, now: datetime.datetime,
                 reason: Reason = Reason.INVALID_SPEC) -> Plan:
    """What the schema could not reject (or a child the API server refused): Stalled with the message, and nothing
    touched in the cluster.

    Everything already stored (stable version, history) is kept; the children keep serving as they are.
    """
    prev_conditions = previous.get("conditions") or []
    event = Event.SPEC_REFUSED_WHILE_SERVING if previous.get("stableVersion") else Event.SPEC_REFUSED
    status = {
        **{k: v for k, v in previous.items() if k != "conditions"},
        "observedGeneration": meta.generation,
        "phase": rollout.transition(previous.get("phase"), event).value,
        "message": message,
        "conditions": [
            build_condition("Ready", False, reason, message, meta.generation, prev_conditions, now),
            build_condition("Reconciling", False, reason, message, meta.generation, prev_conditions, now),
            build_condition("Stalled", True, reason, message, meta.generation, prev_conditions, now),
            *[c for c in prev_conditions if c.get("type") not in ("Ready", "Reconciling", "Stalled")],
        ],
    }
    events = () if previous.get("message") == message else (EventSpec("Warning", reason, message),)
    return Plan(apply=(), delete=(), status=status, events=events, requeue_after=None)


@dataclass
class _State:
    """The working copy of the status fields the state machine moves (built from the previous status)."""

    stable: str | None
    stable_image: str | None
    candidate: str | None
    candidate_image: str | None
    step: int
    step_started: datetime.datetime | None
    step_ready: datetime.datetime | None
    paused_reason: str | None
    history: list[dict[str, Any]]
    artifacts: list[dict[str, Any]]
    analysis: dict[str, Any] | None
    controls: dict[str, str]
    window: dict[str, Any] | None = None  # status.rollbackWindow
    restoring: dict[str, Any] | None = None  # status.restoring
    phase: Phase = Phase.PROGRESSING
    message: str = ""
    stalled_reason: str | None = None
    rollbacks: int = 0
    weight: int = 0  # gatewayAPI traffic: the candidate's percentage in the managed route rules, as planned this pass
    previous_weight: int = 0  # the same as the previous pass planned it (status.traffic.canaryWeight)
    # What the previous pass stored: a transition into a pause, a stall or Degraded posts its Event once.
    previous_phase: str | None = None
    previous_paused: str | None = None
    previous_stalled: str | None = None
    waits: list[datetime.datetime] = field(default_factory=list)
    events: list[EventSpec] = field(default_factory=list)

    def event(self, type_: str, reason: str, message: str) -> None:
        self.events.append(EventSpec(type_, reason, message))

    def conclude(self, event: Event) -> None:
        """What this pass concluded: the phase follows from the previous one by the transition table."""
        self.phase = rollout.transition(self.previous_phase, event)

    def wake_at(self, when: datetime.datetime | None) -> None:
        if when is not None:
            self.waits.append(when)

    def record(self, version: str, image: str, outcome: str, reason: str, message: str, now: datetime.datetime,
               retry: int, artifact: str | None = None) -> None:
        entry: dict[str, Any] = {"version": version, "image": image, "outcome": outcome, "reason": reason,
                                 "time": build_timestamp(now), "retry": retry}
        if message:
            entry["message"] = message[:1024]
        if artifact:
            entry["artifact"] = artifact
        self.history.append(entry)
        del self.history[:-HISTORY_MAX]


def _load_state(previous: Mapping[str, Any]) -> _State:
    return _State(
        stable=previous.get("stableVersion"),
        stable_image=previous.get("stableImage"),
        candidate=previous.get("candidateVersion"),
        candidate_image=previous.get("candidateImage"),
        step=int(previous.get("currentStepIndex") or 0),
        step_started=parse_time(previous.get("stepStartedAt")),
        step_ready=parse_time(previous.get("stepReadyAt")),
        paused_reason=previous.get("pausedReason"),
        history=[dict(h) for h in previous.get("history") or []],
        artifacts=[dict(a) for a in previous.get("artifacts") or []],
        analysis=dict(previous["analysis"]) if isinstance(previous.get("analysis"), Mapping) else None,
        controls={k: str(v) for k, v in (previous.get("controls") or {}).items() if v is not None},
        window=dict(previous["rollbackWindow"]) if isinstance(previous.get("rollbackWindow"), Mapping) else None,
        restoring=dict(previous["restoring"]) if isinstance(previous.get("restoring"), Mapping) else None,
        previous_phase=previous.get("phase"),
        previous_paused=previous.get("pausedReason"),
        previous_weight=int((previous.get("traffic") or {}).get("canaryWeight") or 0),
        previous_stalled=next((c.get("reason") for c in previous.get("conditions") or []
                               if c.get("type") == "Stalled" and c.get("status") == "True"), None),
    )


def _last_entry(history: Sequence[Mapping[str, Any]], image: str, version: str | None) -> Mapping[str, Any] | None:
    return next((h for h in reversed(history)
                 if h.get("image") == image and (version is None or h.get("version") == version)), None)


def assess_blocked(history: Sequence[Mapping[str, Any]], image: str, retry: int,
                   version: str | None = None) -> Mapping[str, Any] | None:
    """The failure that keeps `image` (as `version`, which a downloaded model's source is part of) from being rolled
    out again (same image, version and retry), or None."""
    last = _last_entry(history, image, version)
    if (last is not None and last.get("outcome") in FAILED_OUTCOMES and int(last.get("retry") or 0) == retry
            and not last.get("retried")):
        return last
    return None


FETCH_POLL = datetime.timedelta(seconds=5)  # how often the download steps of starting pods are looked at
FETCH_PODS_MAX = 64  # pod names kept in status.modelFetch.pods (the pods whose download was told)


def plan_fetch_checks(md: spec_mod.ModelDeployment, status: Mapping[str, Any], observed: Observed) -> tuple[str, ...]:
    """The version whose serving pods the shell lists this pass, to read their download steps: the one that starts now
    (a rollback-to's, else the candidate, else the stable, else the spec's), while its model is downloaded (not an
    image volume) and some of its pods are not Ready yet or have not had their download told (status.modelFetch).
    Serving pods are not watched; a version at rest costs no request. Pure."""
    model = md.spec.model
    fetch = status.get("modelFetch") or {}
    if not (model.remote and not model.image_volume) and not fetch:
        return ()
    version = ((status.get("restoring") or {}).get("version") or status.get("candidateVersion")
               or status.get("stableVersion") or md.spec.version)
    view = observed.deployments.get(version)
    if view is None or view.replicas <= 0:
        return ()
    told = len(fetch.get("pods") or []) if fetch.get("version") == version else 0
    return (version,) if view.serving < view.replicas or told < min(view.replicas, FETCH_PODS_MAX) else ()


def build_fetch_failure(observed: Observed, version: str) -> str:
    """``; its download step failed: <what fetch said>`` when a pod of ``version`` failed to fetch its model (what a
    startup timeout's record adds), else empty. Pure."""
    failed = next((v for v in observed.fetches.get(version, ()) if v.state == "failed"), None)
    return f"; its download step failed: {failed.message}" if failed is not None and failed.message else ""


def _plan_fetch(md: spec_mod.ModelDeployment, st: _State, observed: Observed, previous: Mapping[str, Any] | None,
                now: datetime.datetime) -> dict[str, Any] | None:
    """status.modelFetch from the download steps of the pods listed this pass (``plan_fetch_checks``): a ModelFetched
    Event per pod whose download finished (its outcome line: size, time, rate, digest, cache hit or miss), and, while
    no pod of the spec's version got its model and one failed to, Stalled (ModelFetchFailed) with what the download
    said (access denied, not found, digest mismatch; never a secret): its pods retry with back-off, so a fixed Secret
    or object needs no action here, and the stable keeps serving."""
    fetch: dict[str, Any] | None = dict(previous) if previous else None
    for version, views in observed.fetches.items():
        if fetch is None or fetch.get("version") != version:
            fetch = {"version": version, "pods": [], "downloads": 0, "cacheHits": 0, "downloadedBytes": 0}
        told = list(fetch.get("pods") or [])
        for view in views:
            if view.state != "done" or view.pod in told:
                continue
            fields = contract.parse_fetch_summary_fields(view.message)
            told.append(view.pod)
            hit = bool(fields.get("cacheHit"))
            fetch["cacheHits" if hit else "downloads"] = int(fetch.get("cacheHits" if hit else "downloads") or 0) + 1
            fetch["downloadedBytes"] = int(fetch.get("downloadedBytes") or 0) + int(fields.get("downloadedBytes") or 0)
            for key in ("bytes", "seconds", "digest"):
                if fields.get(key) is not None:
                    fetch[key] = fields[key]
            fetch["fetchedAt"] = build_timestamp(now)
            said = view.message.split(" [", 1)[0]  # the outcome line without its fields (those are in the status)
            st.event("Normal", Reason.MODEL_FETCHED, f"Pod {view.pod} (version {version}): {said}"[:1024])
        fetch["pods"] = told[-FETCH_PODS_MAX:]
        failed = next((v for v in views if v.state == "failed"), None)
        fetch["failure"] = failed.message[:1024] if failed is not None else None
        got = any(v.state == "done" for v in views) or (observed.deployments.get(version) is not None
                                                          and observed.deployments[version].serving > 0)
        if failed is not None and not got and version == md.spec.version and st.stalled_reason is None:
            st.stalled_reason = Reason.MODEL_FETCH_FAILED
            keeps = f"; version {st.stable} keeps serving" if st.stable and st.stable != version else ""
            st.message = (f"Version {version} cannot fetch its model ({failed.restarts + 1} tries, retried with "
                          f"back-off): {failed.message or 'the download step failed without a message'}{keeps}")
        if any(v.state != "done" for v in views):
            st.wake_at(now + FETCH_POLL)
    return fetch


def plan_volume_checks(md: spec_mod.ModelDeployment, status: Mapping[str, Any]) -> tuple[str, ...]:
    """The PersistentVolumeClaims the shell should check exist before this pass (one GET each, only while needed):
    the artifacts claim while the target's artifact is not there yet, the model's pvc:// claim while its version is
    not serving yet (the compression Job or the new pods read it). Pure."""
    spec = md.spec
    artifacts = status.get("artifacts") or []
    artifact_ready = any(a.get("version") == spec.version and a.get("phase") == "Succeeded" for a in artifacts)
    claims: list[str] = []
    if spec.model.pvc is not None and status.get("stableVersion") != spec.version and not artifact_ready:
        claims.append(spec.model.pvc[0])
    if spec.compression is not None and not artifact_ready:
        claims.append(spec.compression.artifacts_pvc)
    return tuple(dict.fromkeys(claims))


def build_switched(spec: spec_mod.ModelDeploymentSpec, step: int) -> bool:
    """Blue-green: whether the candidate at ``step`` is the active version already (step 1: switched, under its
    post-promotion analysis; step 0: behind the preview Service)."""
    return spec.rollout.strategy == "blueGreen" and step >= 1


def build_active_analysis(spec: spec_mod.ModelDeploymentSpec, step: int) -> spec_mod.Analysis | None:
    """The analysis the candidate is under at ``step``: spec.rollout.analysis (canary steps, blue-green before the
    switch; predictionAgreement only at the shadow step), or after a blue-green switch
    spec.rollout.blueGreen.postPromotionAnalysis. Pure."""
    if build_switched(spec, step):
        return spec.rollout.post_promotion_analysis
    chosen = spec.rollout.analysis
    if chosen is not None and build_step_kind(spec, step) != "shadow":
        # predictionAgreement judges the shadow step only: after it nothing is copied, so it would have no data
        kept = tuple(m for m in chosen.metrics if m.builtin != providers.builtin.PREDICTION_AGREEMENT)
        if len(kept) != len(chosen.metrics):
            return chosen.model_copy(update={"metrics": kept}) if kept else None
    return chosen


def plan_analysis_gate(md: spec_mod.ModelDeployment, candidate: str | None, stable: str | None,
                       step_ready: datetime.datetime | None, status_analysis: Mapping[str, Any] | None,
                       step: int = 0) -> AnalysisGate | None:
    """Whether the spec's version is under analysis now, since when, and its analysis so far. Pure.

    From the candidate's first ready step until it is promoted or fails. Between steps (the next step's pods
    starting) the analysis of a candidate already under analysis goes on: its ready pods keep serving, and a
    failure must not wait for the new pods' startup. The model's first version (no stable) is not analysed.
    """
    spec = md.spec
    if build_active_analysis(spec, step) is None or candidate is None or candidate != spec.version or stable is None:
        return None
    prior = status_analysis if status_analysis is not None and status_analysis.get("version") == candidate else None
    if step_ready is None and prior is None:
        return None
    started = parse_time((prior or {}).get("startedAt")) or step_ready
    if started is None:
        return None
    return AnalysisGate(candidate=candidate, started=started, prior=prior)


def plan_measurement(md: spec_mod.ModelDeployment, status: Mapping[str, Any],
                     now: datetime.datetime) -> MeasureRequest | None:
    """The pulled metrics due for a measurement now (the shell measures them before planning); None: none."""
    step = int(status.get("currentStepIndex") or 0)
    spec_analysis = build_active_analysis(md.spec, step)
    if status.get("phase") not in (Phase.PROGRESSING, Phase.PAUSED) or spec_analysis is None:
        return None
    status_analysis = status.get("analysis") if isinstance(status.get("analysis"), Mapping) else None
    gate = plan_analysis_gate(md, status.get("candidateVersion"), status.get("stableVersion"),
                              parse_time(status.get("stepReadyAt")), status_analysis, step)
    if gate is None:
        return None
    due, _ = analysis.plan_due(gate.prior, spec_analysis, gate.started, now)
    pulled = {m.name for m in providers.plan_pulled(spec_analysis)}
    names = tuple(n for n in due if n in pulled)
    if not names:
        return None
    return MeasureRequest(candidate=gate.candidate, stable=status.get("stableVersion"), metrics=names)


def parse(body: Mapping[str, Any]) -> spec_mod.ModelDeployment | spec_mod.SpecError:
    """The typed view of a ModelDeployment, or why there is none (once per pass: the shell passes it on)."""
    try:
        return spec_mod.parse_model_deployment(body)
    except spec_mod.SpecError as error:
        return error


def plan_reconcile(body: Mapping[str, Any], observed: Observed, now: datetime.datetime,
                   measurements: Mapping[str, analysis.Measurement] | None = None, *,
                   parsed: spec_mod.ModelDeployment | spec_mod.SpecError | None = None,
                   prometheus_address: str | None = None, activator_image: str | None = None,
                   fetch: objects.FetchSettings | None = None) -> Plan:
    """The whole decision for one ModelDeployment (``parsed``: its ``parse``, when the caller has it already;
    ``prometheus_address``: the operator's Prometheus, which a KEDA trigger reads; ``activator_image``: the image
    of the activator of models that scale to zero, None where the operator has none)."""
    meta = build_meta(body)
    previous: Mapping[str, Any] = body.get("status") or {}
    md = parse(body) if parsed is None else parsed
    if isinstance(md, spec_mod.SpecError):
        return plan_invalid(meta, previous, str(md), now)
    spec = md.spec
    if spec.model.uri_scheme == "gs":
        return plan_invalid(meta, previous, (
            "spec.model.uri: gs:// is not fetched by this operator version; use s3://<bucket>/<key> with "
            "spec.model.s3.endpoint https://storage.googleapis.com (GCS's S3 interoperability, HMAC keys in "
            "spec.model.credentials), or https:// with a signed URL"), now, reason=Reason.UNSUPPORTED_MODEL_SOURCE)
    fetch = fetch or objects.FetchSettings()
    if (spec.model.remote and not spec.model.image_volume and spec.serving.runtime is not None
            and not fetch.image):
        return plan_invalid(meta, previous, (
            f"spec.model.uri: a {spec.model.uri_scheme}:// model is downloaded by shipyard-runtime fetch before "
            "the server starts, and the operator has no image for it beside another runtime (--fetch-image, the "
            "chart's operator.fetchImage); set it, or mount an oci:// model as an image volume"),
            now, reason=Reason.UNSUPPORTED_MODEL_SOURCE)
    target, image = spec.version, spec.image
    st = _load_state(previous)
    apply: list[dict[str, Any]] = []
    deletes: list[tuple[str, str, str]] = []
    desired: dict[str, int] = {}  # replicas per version; the target is applied in full, the others scaled

    _handle_rollback_to(md, st, observed, now)
    restoring = st.restoring is not None and _plan_restoring(md, st, observed, desired, now)

    # A retry token (annotation) retries a failed target once per new value.
    blocked = assess_blocked(st.history, image, spec.retry, target) if target != st.stable else None
    token = md.controls.retry
    if token and token != st.controls.get("retry"):
        st.controls["retry"] = token
        if blocked is not None:
            st.event("Normal", Reason.RETRYING, f"Retrying version {target} (shipyard.dev/retry={token})")
            for h in st.history:
                if h is blocked:
                    h["retried"] = True  # keeps the record; no longer blocks
            blocked = None
            for job in observed.jobs.values():  # a failed compression Job is replaced by a new one
                if job.key and job.phase == "Failed":
                    deletes.append(("batch/v1", "Job", job.name))
                    if job.name in observed.config_maps:  # its config (same name) goes with it
                        deletes.append(("v1", "ConfigMap", job.name))
            _retry_compression(md, st)

    # Compression of the target (it reads the source model, so a missing model volume stops it first).
    model_claim = spec.model.pvc[0] if spec.model.pvc else None
    if observed.missing_pvc is not None and observed.missing_pvc == model_claim and blocked is None:
        st.stalled_reason = Reason.MODEL_VOLUME_MISSING
        st.message = (f"The model's PersistentVolumeClaim {model_claim!r} (spec.model.uri) does not exist in "
                      f"namespace {meta.namespace}")
        st.wake_at(now + VOLUME_POLL)
        artifact_path, compression_state = None, "stalled"
    else:
        artifact_path, compression_state = _plan_compression(md, meta, st, observed, now, apply, blocked is not None,
                                                              fetch)

    if compression_state == "failed":
        blocked = assess_blocked(st.history, image, spec.retry, target)

    traffic_problem = assess_traffic(md, meta, observed)
    if st.paused_reason == Reason.SCALED_TO_ZERO and spec.serving.effective_replicas > 0:
        st.paused_reason = None  # awake: the rollout goes on (_plan_asleep)
    if restoring:
        pass
    elif target == st.stable and st.candidate is None:
        _plan_steady(md, st, observed, desired)
    elif blocked is not None:
        _plan_blocked(md, st, observed, desired, blocked)
    elif compression_state in ("pending", "stalled"):
        _plan_waiting_for_artifact(md, st, observed, desired, compression_state)
    elif st.stable is None or st.stable not in observed.deployments:
        _plan_first(md, st, observed, desired, now)
    elif traffic_problem is not None:
        _plan_traffic_blocked(st, observed, desired, traffic_problem, now)
    elif spec.serving.effective_replicas == 0:
        _plan_asleep(md, st, observed, desired, now)
    elif spec.rollout.strategy == "blueGreen":
        _plan_blue_green(md, meta, st, observed, desired, now, measurements or {}, apply)
    else:
        _plan_canary(md, meta, st, observed, desired, now, measurements or {}, apply)
    _plan_window(md, st, observed, desired, now)

    _plan_analysis_children(md, meta, st, observed, apply, deletes)
    shadow_status = _plan_shadow(md, meta, st, observed, apply, deletes)
    scaler = _plan_scaler(md, meta, st, observed, apply, deletes, prometheus_address, activator_image)

    # Older versions: scaled to zero and kept up to revisionHistoryLimit; the oldest beyond it deleted.
    order = {h.get("version"): i for i, h in enumerate(st.history)}
    old_versions = sorted((v for v in observed.deployments if v not in desired),
                          key=lambda v: order.get(v, -1), reverse=True)
    for i, version in enumerate(old_versions):
        if i < spec.revision_history_limit:
            desired[version] = 0
        else:
            deletes.append(("apps/v1", "Deployment", observed.deployments[version].name))

    model_fetch = _plan_fetch(md, st, observed, previous.get("modelFetch"), now)
    _plan_transition_events(st)

    to_activator = assess_routes_to_activator(spec, st, observed, scaler is not None and scaler.activator)
    if scaler is not None and scaler.activator:
        scaler.status["routesToActivator"] = to_activator
    service = build_service(meta, spec.serving.port, objects.build_service_ports(spec.serving),
                            version=build_active_version(spec, st), activator=to_activator)
    if observed.services.get(service["metadata"]["name"]) != objects.spec_hash_of(service):
        apply.append(service)
        # Traffic moves first: no version loses pods before the Service that may still select it has switched
        # (the Service's watch event brings the next pass, which scales down).
        for version, kept in observed.deployments.items():
            if version in desired and desired[version] < kept.replicas:
                desired[version] = kept.replicas
        deletes[:] = [d for d in deletes if d[1] != "Deployment"]  # (beyond revisionHistoryLimit) the next pass
    traffic_status = _plan_routes(md, meta, st, observed, desired, apply, previous, now, traffic_problem)
    budgets, stale_budgets = disruption.plan_budgets(meta, md, desired, observed)  # one per version with replicas
    apply += budgets
    deletes += stale_budgets

    scales: list[tuple[str, int]] = []
    target_view = observed.deployments.get(target)
    if target in desired:
        target_obj = build_deployment(meta, md, target, image, desired[target], artifact_path, fetch)
        if target_view is None or target_view.spec_hash != objects.spec_hash_of(target_obj):
            apply.append(target_obj)
    applied = {o["metadata"]["name"] for o in apply if o["kind"] == "Deployment"}  # (a PDB has its Deployment's name)
    for version, count in sorted(desired.items()):
        view = observed.deployments.get(version)
        # The target is applied when its template changed; a kept one with the same template (a version scaled to 0
        # and wanted again) is only scaled: its stored hash still describes the replicas it was applied with.
        if view is not None and view.replicas != count and view.name not in applied:
            scales.append((view.name, count))

    settled = not apply and not scales and not deletes
    if st.phase == Phase.HEALTHY and not settled:  # reported Healthy only once nothing is left to write
        st.conclude(Event.SETTLING)
    status = _build_status(md, meta, st, previous, observed, now, settled=settled,
                           compression_state=compression_state, scaler=scaler)
    status["modelFetch"] = model_fetch
    status["traffic"] = traffic_status
    status["shadow"] = shadow_status
    waits = [w for w in st.waits if w > now]
    requeue = max(0.05, (min(waits) - now).total_seconds()) if waits else None
    return Plan(apply=tuple(apply), delete=tuple(deletes), status=status, events=tuple(st.events),
                requeue_after=requeue, scale=tuple(scales), rollbacks=st.rollbacks)


def _retry_compression(md: spec_mod.ModelDeployment, st: _State) -> None:
    """A retry of a version whose compression failed: its artifact gets a new attempt, i.e. a new Job (the failed
    Job keeps its name until it is deleted, and must not be read as the new attempt's outcome)."""
    if md.spec.compression is None:
        return
    key = objects.build_artifact_key(md.spec.image, md.spec.compression.build_recipe(), md.spec.model)
    entry = next((a for a in st.artifacts if a.get("key") == key), None)
    if entry is not None and entry.get("phase") == "Failed":
        entry["attempt"] = int(entry.get("attempt") or 0) + 1
        entry["phase"] = "Pending"


def _plan_transition_events(st: _State) -> None:
    """An Event for every entry into a pause, a stall or Degraded that no planning step has already told about."""
    told = {e.reason for e in st.events}
    if st.paused_reason and st.paused_reason != st.previous_paused and st.paused_reason not in told:
        st.event("Normal" if st.paused_reason == Reason.MANUAL_STEP else "Warning", st.paused_reason, st.message)
    warned = any(e.type == "Warning" for e in st.events)  # e.g. RolledBack or StartupTimeout: the stall is told
    if st.stalled_reason and st.stalled_reason != st.previous_stalled and not warned:
        st.event("Warning", st.stalled_reason, st.message)


def _handle_rollback_to(md: spec_mod.ModelDeployment, st: _State, observed: Observed,
                        now: datetime.datetime) -> None:
    """shipyard.dev/rollback-to=<version>: that kept version becomes stable again, never leaving the model without a
    ready pod. A warm version (inside the rollback window, or the stable itself) takes traffic at once; a cold one
    (scaled to 0) is scaled up first while the current version keeps serving (``_plan_restoring``)."""
    wanted = md.controls.rollback_to
    if not wanted or wanted == st.controls.get("rollbackTo"):
        return
    st.controls["rollbackTo"] = wanted
    view = observed.deployments.get(wanted)
    if view is None or wanted == st.stable and st.candidate is None:
        kept = ", ".join(sorted(observed.deployments)) or "none"
        if wanted != st.stable:
            st.event("Warning", Reason.ROLLBACK_REFUSED, f"Version {wanted} is not kept (kept versions: {kept})")
        return
    spec = md.spec
    total = spec.serving.effective_replicas
    if wanted == st.stable or (view.replicas >= total and view.ready >= total):
        warm = "" if wanted == st.stable else "; it was still Ready (rollback window): no cold start"
        _switch_back(md, st, wanted, view.image, now, f"Rolled back to version {wanted} (shipyard.dev/rollback-to)"
                     + warm)
        return
    if st.candidate is not None:  # the candidate goes at once; the stable alone serves until the kept one is Ready
        st.record(st.candidate, st.candidate_image or spec.image, Outcome.ROLLED_BACK, Reason.MANUAL_ROLLBACK,
                  f"Rolled back to {wanted} by shipyard.dev/rollback-to", now, spec.retry)
        st.candidate = st.candidate_image = None
        st.analysis = None
        st.paused_reason = None
    st.window = None
    st.restoring = {"version": wanted, "image": view.image, "since": build_timestamp(now)}
    st.event("Normal", Reason.ROLLBACK_STARTED,
             f"Scaling kept version {wanted} up to {total} replica(s) before moving traffic to it "
             f"(shipyard.dev/rollback-to); version {st.stable} serves until then")


def _switch_back(md: spec_mod.ModelDeployment, st: _State, wanted: str, image: str, now: datetime.datetime,
                 message: str) -> None:
    """``wanted`` (Ready at full size) becomes the stable: the model's Service selects it from this pass on; the
    version left is marked rolled back (not rolled out again until the spec changes) and scaled down once the
    Service has switched."""
    spec = md.spec
    leaving = st.candidate or st.stable
    if leaving is not None and leaving != wanted:
        leaving_image = st.candidate_image if st.candidate else st.stable_image
        st.record(leaving, leaving_image or spec.image, Outcome.ROLLED_BACK, Reason.MANUAL_ROLLBACK,
                  f"Rolled back to {wanted} by shipyard.dev/rollback-to", now, spec.retry)
    if (spec.version != wanted and spec.version != leaving
            and not assess_blocked(st.history, spec.image, spec.retry, spec.version)):
        st.record(spec.version, spec.image, Outcome.ROLLED_BACK, Reason.MANUAL_ROLLBACK,
                  f"Rolled back to {wanted} by shipyard.dev/rollback-to", now, spec.retry)
    st.stable, st.stable_image = wanted, image
    st.candidate = st.candidate_image = None
    st.step, st.step_started, st.step_ready = 0, None, None
    st.analysis = None
    st.paused_reason = None
    st.window = st.restoring = None
    st.rollbacks += 1
    st.event("Warning", Reason.ROLLED_BACK, message)


def _plan_restoring(md: spec_mod.ModelDeployment, st: _State, observed: Observed, desired: dict[str, int],
                    now: datetime.datetime) -> bool:
    """A rollback-to a cold version: it scales up to spec.serving.replicas while the current stable keeps serving
    all traffic; once it is Ready the Service switches to it (``_switch_back``). True: this pass is decided here."""
    assert st.restoring is not None
    spec = md.spec
    total = spec.serving.effective_replicas
    wanted = str(st.restoring.get("version"))
    view = observed.deployments.get(wanted)
    since = parse_time(st.restoring.get("since")) or now
    if view is None:
        st.restoring = None
        st.event("Warning", Reason.ROLLBACK_REFUSED, f"Version {wanted} is not kept any more; staying on {st.stable}")
        return False
    if view.replicas == total and view.rolled_out and view.ready >= total:
        waited = (now - since).total_seconds()
        _switch_back(md, st, wanted, view.image, now,
                     f"Rolled back to version {wanted} (shipyard.dev/rollback-to) once its {total} pod(s) were Ready "
                     f"(cold start {waited:.1f} s)")
        return False
    deadline = since + datetime.timedelta(seconds=spec.rollout.startup_timeout_seconds)
    if now >= deadline:
        st.restoring = None
        st.event("Warning", Reason.ROLLBACK_REFUSED,
                 f"Version {wanted} was not Ready within startupTimeoutSeconds "
                 f"({spec.rollout.startup_timeout_seconds} s); version {st.stable} keeps serving")
        desired[wanted] = 0
        return False
    desired[wanted] = total
    if st.stable is not None and st.stable in observed.deployments:
        desired[st.stable] = max(total, observed.deployments[st.stable].replicas)
    st.wake_at(deadline)
    st.conclude(Event.RESTORING)
    st.message = (f"Rolling back to version {wanted}: {view.ready}/{total} pod(s) ready; version {st.stable} serves "
                  "all traffic until then")
    return True


def plan_window_replicas(spec: spec_mod.ModelDeploymentSpec, current: int) -> int:
    """Pods of the previous stable kept through the rollback window: what it has now, at most spec.serving.replicas,
    and at most what the GPU surge budget allows next to the new stable at full size. Pure."""
    keep = min(current, spec.serving.effective_replicas)
    surge = build_surge_pods(spec)
    return keep if surge is None else min(keep, surge)


def _plan_window(md: spec_mod.ModelDeployment, st: _State, observed: Observed, desired: dict[str, int],
                 now: datetime.datetime) -> None:
    """The rollback window: the previous stable keeps its pods (out of traffic) until ``until``; a new rollout, a
    rollback or the window's end closes it, and the version is then scaled to 0 like any older one."""
    window = st.window
    if window is None:
        return
    version = str(window.get("version"))
    until = parse_time(window.get("until"))
    view = observed.deployments.get(version)
    if st.candidate is not None or version == st.stable or view is None or until is None or now >= until:
        st.window = None
        if view is not None and version != st.stable:
            why = f"version {st.candidate} rolls out" if st.candidate is not None else "its time is up"
            st.event("Normal", Reason.ROLLBACK_WINDOW_CLOSED,
                     f"Rollback window of version {version} closed ({why}): scaling it to 0")
        return
    desired[version] = plan_window_replicas(md.spec, view.replicas)
    st.wake_at(until)


def _plan_compression(md: spec_mod.ModelDeployment, meta: Meta, st: _State, observed: Observed,
                      now: datetime.datetime, apply: list[dict[str, Any]], blocked: bool,
                      fetch: objects.FetchSettings | None = None) -> tuple[str | None, str]:
    """(artifact path to serve or None, state): state is none | ready | pending | stalled | failed."""
    spec = md.spec
    if spec.compression is None:
        return None, "none"
    key = objects.build_artifact_key(spec.image, spec.compression.build_recipe(), spec.model)
    path = objects.build_artifact_path(meta, key)
    entry = next((a for a in st.artifacts if a.get("key") == key), None)
    if entry is not None and entry.get("phase") == "Succeeded":
        return path, "ready"
    if blocked:
        return None, "failed"
    if observed.missing_pvc:
        st.stalled_reason = Reason.ARTIFACT_VOLUME_MISSING
        st.message = (f"The artifacts PersistentVolumeClaim {observed.missing_pvc!r} "
                      f"(spec.compression.artifacts.pvc) does not exist in namespace {meta.namespace}")
        st.wake_at(now + VOLUME_POLL)
        return None, "stalled"
    attempt = int((entry or {}).get("attempt") or 0)
    config_map, job = objects.build_compression_objects(md, meta, spec.version, key, attempt=attempt,
                                                        fetch=fetch)
    name = job["metadata"]["name"]
    if entry is None:
        entry = {"key": key, "version": spec.version, "path": path, "job": name, "phase": "Pending",
                 "createdAt": build_timestamp(now)}
        st.artifacts.append(entry)
        del st.artifacts[:-ARTIFACTS_MAX]
        st.event("Normal", Reason.COMPRESSING, f"Compressing version {spec.version} in Job {name} (artifact {key})")
    entry["job"] = name
    if observed.config_maps.get(name) != objects.spec_hash_of(config_map):
        apply.append(config_map)
    view = observed.jobs.get(name)
    if view is None:
        apply.append(job)
        return None, "pending"
    if view.phase == "Succeeded":
        if view.fetch_message:
            st.event("Normal", Reason.MODEL_FETCHED,
                     f"Job {name} (version {spec.version}): {view.fetch_message.split(' [', 1)[0]}"[:1024])
        entry.update(phase="Succeeded", message=view.message[:1024])
        entry.update(contract.parse_summary_fields(view.message))
        st.event("Normal", Reason.COMPRESSED, f"Compressed version {spec.version}: {view.message}")
        return path, "ready"
    if view.phase == "Failed":
        message = view.message or "the compression Job failed without a message"
        entry.update(phase="Failed", message=message[:1024])
        entry.update(contract.parse_summary_fields(message))
        st.record(spec.version, spec.image, Outcome.FAILED, Reason.COMPRESSION_FAILED, message, now, spec.retry)
        st.event("Warning", Reason.COMPRESSION_FAILED, f"Compression of version {spec.version} failed: {message}")
        if st.candidate == spec.version:
            st.candidate = st.candidate_image = None
        return None, "failed"
    entry["phase"] = "Running" if view.phase == "Running" else "Pending"
    return None, "pending"


def _plan_steady(md: spec_mod.ModelDeployment, st: _State, observed: Observed, desired: dict[str, int]) -> None:
    spec = md.spec
    desired[spec.version] = spec.serving.effective_replicas
    st.stable_image = spec.image
    st.paused_reason = None
    view = observed.deployments.get(spec.version)
    if view is not None and view.replicas == spec.serving.effective_replicas and view.rolled_out:
        st.conclude(Event.SERVING)
        st.message = f"Version {spec.version} serves with {spec.serving.effective_replicas} replica(s)"
        if st.previous_phase == Phase.DEGRADED:
            st.event("Normal", Reason.RECOVERED,
                     f"Version {spec.version}: all {spec.serving.effective_replicas} replica(s) ready")
        return
    if (view is not None and view.replicas == spec.serving.effective_replicas
            and view.observed_generation >= view.generation and view.updated_replicas >= view.replicas):
        # Its Deployment caught up with the spec, yet pods are missing: after a rollout (Healthy or Degraded before)
        # they were lost (evicted, crashing, node gone) and the Deployment controller replaces them: Degraded.
        st.conclude(Event.PODS_LOST)
    else:
        st.conclude(Event.DEPLOYING)
    if st.phase == Phase.DEGRADED:
        st.message = (f"Version {spec.version} serves with {view.serving if view else 0}/"
                      f"{spec.serving.effective_replicas} replica(s) ready; the Deployment is replacing the others")
        if st.previous_phase != Phase.DEGRADED:
            st.event("Warning", Reason.DEGRADED, st.message)
    else:
        ready = view.ready if view else 0
        st.message = f"Scaling version {spec.version}: {ready}/{spec.serving.effective_replicas} replica(s) ready"


def _plan_blocked(md: spec_mod.ModelDeployment, st: _State, observed: Observed, desired: dict[str, int],
                  blocked: Mapping[str, Any]) -> None:
    """The target failed before: the stable serves at full size, the target stays at zero."""
    spec = md.spec
    if st.stable is not None and st.stable in observed.deployments:
        desired[st.stable] = spec.serving.effective_replicas
    if spec.version in observed.deployments:
        desired[spec.version] = 0
    st.candidate = st.candidate_image = None
    outcome, reason = str(blocked.get("outcome")), str(blocked.get("reason") or "Failed")
    st.conclude(Event.VERSION_ROLLED_BACK if outcome in (Outcome.ROLLED_BACK, Outcome.ABORTED) and st.stable
                else Event.VERSION_FAILED)
    st.stalled_reason = reason
    serving = f"; version {st.stable} keeps serving" if st.stable else ""
    said = {"RolledBack": "was rolled back", "Aborted": "was aborted", "Failed": "failed"}.get(outcome, outcome)
    st.message = (f"Version {spec.version} {said} ({reason}): {blocked.get('message', '')}{serving}. "
                  "Change spec.image, bump spec.retry or set the shipyard.dev/retry annotation to try again")


def _plan_waiting_for_artifact(md: spec_mod.ModelDeployment, st: _State, observed: Observed,
                               desired: dict[str, int], state: str) -> None:
    spec = md.spec
    if st.stable is not None and st.stable in observed.deployments:
        desired[st.stable] = spec.serving.effective_replicas
    if state == "stalled":
        st.conclude(Event.SOURCE_MISSING if st.stable is None else Event.SOURCE_MISSING_WHILE_SERVING)
        return
    st.conclude(Event.COMPRESSION_RUNNING)
    st.message = f"Compressing version {spec.version} before rolling it out"


def _plan_first(md: spec_mod.ModelDeployment, st: _State, observed: Observed, desired: dict[str, int],
                now: datetime.datetime) -> None:
    """The model's first version (or no stable Deployment left): full size, stable once available."""
    spec = md.spec
    target, replicas = spec.version, spec.serving.effective_replicas
    if st.candidate != target:
        st.candidate, st.candidate_image = target, spec.image
        st.step, st.step_started, st.step_ready = 0, now, None
        st.event("Normal", Reason.DEPLOYING, f"Deploying version {target} with {replicas} replica(s)")
    desired[target] = replicas
    view = observed.deployments.get(target)
    if view is not None and view.replicas == replicas and view.rolled_out:
        _promote(md, st, now)
        return
    started = st.step_started or now
    deadline = started + datetime.timedelta(seconds=spec.rollout.startup_timeout_seconds)
    if now >= deadline:
        st.record(target, spec.image, Outcome.FAILED, Reason.STARTUP_TIMEOUT,
                  f"not ready within startupTimeoutSeconds ({spec.rollout.startup_timeout_seconds} s)"
                  f"{build_fetch_failure(observed, target)}", now, spec.retry)
        st.event("Warning", Reason.STARTUP_TIMEOUT, f"Version {target} was not ready within "
                                                    f"{spec.rollout.startup_timeout_seconds} s")
        desired[target] = 0
        st.candidate = st.candidate_image = None
        st.conclude(Event.VERSION_FAILED)
        st.stalled_reason = Reason.STARTUP_TIMEOUT
        st.message = f"Version {target} was not ready within {spec.rollout.startup_timeout_seconds} s"
        return
    st.wake_at(deadline)
    ready = view.ready if view else 0
    st.conclude(Event.DEPLOYING)
    st.message = f"Deploying version {target}: {ready}/{replicas} replica(s) ready"


def _plan_asleep(md: spec_mod.ModelDeployment, st: _State, observed: Observed, desired: dict[str, int],
                 now: datetime.datetime) -> None:
    """A new version while the model is scaled to zero: nothing runs, so no request could judge a candidate (a
    canary or blue-green at zero replicas would promote a version no pod ever ran). The rollout waits (Paused,
    ScaledToZero) with every version at zero; a candidate already under way starts its step over once the model
    wakes (the first request, through the activator, or a scale-up)."""
    spec = md.spec
    assert st.stable is not None
    desired[st.stable] = 0
    if st.candidate is not None and st.candidate in observed.deployments:
        desired[st.candidate] = 0
    if st.paused_reason != Reason.SCALED_TO_ZERO:
        if st.candidate is not None:
            st.step_started, st.step_ready = now, None
        st.event("Normal", Reason.SCALED_TO_ZERO,
                 f"Version {spec.version} waits for the model to wake before it rolls out (scaled to zero)")
    st.paused_reason = Reason.SCALED_TO_ZERO
    st.conclude(Event.WAITING_FOR_TRAFFIC)
    st.message = (f"Version {spec.version} waits to roll out: the model is scaled to zero and a rollout needs "
                  f"running pods and traffic; version {st.stable} stays stable until the model wakes (a request "
                  "held by the activator, or spec.serving.replicas above 0)")


def _promote(md: spec_mod.ModelDeployment, st: _State, now: datetime.datetime) -> None:
    spec = md.spec
    for h in st.history:
        if h.get("version") == st.stable and h.get("outcome") == Outcome.PROMOTED:
            h["outcome"] = Outcome.SUPERSEDED.value
    artifact = next((a.get("path") for a in st.artifacts if a.get("version") == spec.version
                     and a.get("phase") == "Succeeded"), None)
    st.record(spec.version, spec.image, Outcome.PROMOTED, Reason.ROLLED_OUT, "", now, spec.retry, artifact=artifact)
    st.event("Normal", Reason.PROMOTED, f"Version {spec.version} is stable and serves all traffic")
    delay = spec.rollout.effective_scale_down_delay
    if st.stable is not None and st.stable != spec.version and delay > 0:
        st.window = {"version": st.stable, "image": st.stable_image,
                     "until": build_timestamp(now + datetime.timedelta(seconds=delay))}
    st.stable, st.stable_image = spec.version, spec.image
    st.candidate = st.candidate_image = None
    st.step, st.step_started, st.step_ready, st.paused_reason = 0, None, None, None
    st.conclude(Event.PROMOTED)  # reported as Progressing until the previous stable is scaled down (Event.SETTLING)
    st.message = f"Version {spec.version} serves with {spec.serving.effective_replicas} replica(s)"


def _fail_candidate(md: spec_mod.ModelDeployment, st: _State, desired: dict[str, int], reason: Reason, message: str,
                    now: datetime.datetime, outcome: Outcome = Outcome.ROLLED_BACK) -> None:
    spec = md.spec
    target = spec.version
    if spec.rollback.policy == "Manual" and outcome == Outcome.ROLLED_BACK:
        if st.paused_reason != reason:
            st.event("Warning", reason, f"Version {target}: {message}; paused (rollback policy Manual)")
        st.conclude(Event.FAILURE_HELD)
        st.paused_reason = reason
        st.message = (f"Version {target} failed ({reason}): {message}. Paused (rollback policy Manual): set "
                      f"shipyard.dev/abort={target} to roll back or shipyard.dev/promote={target} to promote")
        return
    st.record(target, spec.image, outcome, reason, message, now, spec.retry)
    st.event("Warning", Reason.ROLLED_BACK, f"Rolled back version {target} to {st.stable} ({reason}): {message}")
    st.rollbacks += 1
    desired[target] = 0
    if st.stable is not None:
        desired[st.stable] = spec.serving.effective_replicas
    st.candidate = st.candidate_image = None
    st.paused_reason = None
    st.conclude(Event.ROLLED_BACK)
    st.stalled_reason = reason
    st.message = f"Version {target} rolled back ({reason}): {message}; version {st.stable} serves all traffic"


def _start_candidate(md: spec_mod.ModelDeployment, st: _State, now: datetime.datetime, how: str) -> None:
    """The spec's version becomes the candidate (once): a candidate it replaces before promotion is recorded
    Superseded, the step and analysis start over, and RolloutStarted says ``how`` it rolls out."""
    spec = md.spec
    target = spec.version
    if st.candidate == target:
        return
    if st.candidate is not None:
        st.record(st.candidate, st.candidate_image or "", Outcome.SUPERSEDED, Reason.REPLACED,
                  f"replaced by version {target} before it was promoted", now, spec.retry)
    st.candidate, st.candidate_image = target, spec.image
    st.step, st.step_started, st.step_ready, st.paused_reason, st.analysis = 0, now, None, None, None
    st.event("Normal", Reason.ROLLOUT_STARTED, f"Rolling out version {target} next to stable {st.stable} {how}")


def _plan_canary(md: spec_mod.ModelDeployment, meta: Meta, st: _State, observed: Observed, desired: dict[str, int],
                 now: datetime.datetime, measurements: Mapping[str, analysis.Measurement],
                 apply: list[dict[str, Any]]) -> None:
    spec = md.spec
    target, total = spec.version, spec.serving.effective_replicas
    steps = spec.rollout.effective_steps
    _start_candidate(md, st, now, f"in {len(steps)} step(s)")
    assert st.stable is not None
    cand_view = observed.deployments.get(target)
    cand_ready = cand_view.ready if cand_view is not None else 0

    # Manual controls on this candidate.
    if md.controls.abort == target and st.controls.get("abort") != target:
        st.controls["abort"] = target
        _fail_candidate(md, st, desired, Reason.ABORTED, "aborted by shipyard.dev/abort", now,
                        outcome=Outcome.ABORTED)
        return
    if md.controls.promote == target and st.controls.get("promote") != target:
        st.controls["promote"] = target
        st.step = len(steps)
        st.step_started, st.step_ready, st.paused_reason = now, None, None
        st.event("Normal", Reason.PROMOTED_MANUALLY, f"Promoting version {target} now (shipyard.dev/promote)")
    if st.paused_reason == Reason.ANALYSIS_FAILED:
        # Manual rollback policy: hold where the failure happened until abort or promote.
        desired[target] = cand_view.replicas if cand_view else 0
        desired[st.stable] = observed.deployments[st.stable].replicas
        st.conclude(Event.FAILURE_HELD)
        st.message = (f"Version {target} failed its analysis; paused (rollback policy Manual): set "
                      f"shipyard.dev/abort={target} or shipyard.dev/promote={target}")
        return

    promoting = st.step >= len(steps)
    canary = total if promoting else build_step_pods(total, steps[st.step])
    # The stable shrinks by what of the candidate serves now: right after the candidate is scaled up its Deployment
    # has not caught up (`ready` reads 0) while its pods keep serving, and counting them as gone would scale the
    # stable back up for a moment at every step.
    cand_serving = cand_view.serving if cand_view is not None else 0
    now_replicas = (cand_view.replicas if cand_view is not None else 0, observed.deployments[st.stable].replicas)
    gateway = spec.rollout.gateway_api is not None and build_surge_pods(spec) is None
    route_weight = build_route_weight(md, meta, st, observed)
    step_kind = build_step_kind(spec, st.step)
    step_weight = 100 if promoting else (steps[st.step].weight or 0)
    # Until the step's pods are Ready the candidate keeps the previous step's weight; promoting, the weight it had
    # (a shipyard.dev/promote from an early step does not jump to the last step's weight with that step's pods)
    previous_weight = ((steps[st.step - 1].weight or 0) if 0 < st.step < len(steps) else
                       min(st.previous_weight, steps[-1].weight or 0) if promoting else 0)
    if step_kind == "shadow":  # the stable serves all traffic: it keeps every replica
        desired[target], desired[st.stable] = plan_shadow_replicas(spec, canary, now_replicas)
        canary = desired[target]
    else:
        desired[target], desired[st.stable] = plan_canary_replicas(spec, canary, cand_serving, now_replicas)
        if gateway:  # exact weights: the candidate sized for its step's share
            canary = desired[target] = total if promoting else traffic.plan_gateway_replicas(total, step_weight, 0)[0]
    step_done_ready = cand_view is not None and cand_view.replicas == canary and cand_view.rolled_out \
        and cand_ready >= canary
    # The weight moves to the step's only once its pods are Ready; until then the previous step's (whose pods are
    # still there: a canary only grows).
    st.weight = step_weight if step_done_ready and not promoting else previous_weight
    if gateway and step_kind != "shadow":  # the stable sized for the share it keeps, before and after the weight moves
        desired[st.stable] = traffic.plan_gateway_replicas(total, 0, min(route_weight, st.weight))[1]

    if promoting and step_done_ready:
        kept = desired[st.stable]
        _promote(md, st, now)
        desired[target] = total
        desired.pop(st.stable if st.stable != target else "", None)
        if st.window is not None:
            desired[str(st.window["version"])] = kept
        return

    started = st.step_started or now
    if not step_done_ready:
        deadline = started + datetime.timedelta(seconds=spec.rollout.startup_timeout_seconds)
        if now >= deadline:
            _fail_candidate(md, st, desired, Reason.STARTUP_TIMEOUT,
                            f"{cand_ready}/{canary} pod(s) ready after startupTimeoutSeconds "
                            f"({spec.rollout.startup_timeout_seconds} s){build_fetch_failure(observed, target)}", now)
            return
        st.wake_at(deadline)
        st.conclude(Event.STEP_PROGRESSING)
        st.message = (f"Step {min(st.step, len(steps) - 1) + 1}/{len(steps)} of version {target}: "
                      f"{cand_ready}/{canary} canary pod(s) ready" if not promoting else
                      f"Promoting version {target}: {cand_ready}/{total} pod(s) ready")
    elif st.step_ready is None:
        st.step_ready = now
        st.event("Normal", Reason.STEP_READY, f"Step {st.step + 1}/{len(steps)}: {canary}/{total} pod(s) of version "
                                        f"{target} ready ({build_step_label(steps[st.step])})")

    # Analysis runs from the first ready step until promotion.
    verdict = _plan_analysis(md, meta, st, observed, now, measurements, apply)
    if verdict is not None and verdict.phase in (analysis.Phase.FAILED, analysis.Phase.ERROR):
        _fail_candidate(md, st, desired, Reason.ANALYSIS_FAILED, verdict.message, now)
        return
    if not step_done_ready:
        return
    figures = build_shadow_figures(spec, st.analysis)
    shadow_note = build_shadow_note(figures) if steps[st.step].is_shadow else ""
    if _hold_inconclusive(st, target, verdict, f"at step {st.step + 1}/{len(steps)}{shadow_note}"):
        return
    step = steps[st.step]
    assert st.step_ready is not None
    if step.shadow is not None:
        waiting = plan_shadow_wait(step.shadow, verdict, figures, st.step_ready, now)
        if waiting is not None:
            what, until = waiting
            st.wake_at(until)
            st.conclude(Event.STEP_PROGRESSING)
            st.message = (f"Step {st.step + 1}/{len(steps)} of version {target} (shadow {step.shadow.percent}%, "
                          f"{canary} pod(s), no client traffic): {what}")
            return
    if step.manual:
        st.conclude(Event.STEP_WAITING_FOR_PROMOTION)
        st.paused_reason = Reason.MANUAL_STEP
        st.message = (f"Version {target} at step {st.step + 1}/{len(steps)} ({build_step_label(step)}): waiting for "
                      f"shipyard.dev/promote={target}")
        return
    if step.pause_seconds:
        resume = st.step_ready + datetime.timedelta(seconds=step.pause_seconds)
        if now < resume:
            st.wake_at(resume)
            st.conclude(Event.STEP_PROGRESSING)
            st.message = (f"Step {st.step + 1}/{len(steps)} of version {target} ({build_step_label(step)}, {canary} "
                          "pod(s)): "
                          f"pausing until {build_timestamp(resume)}")
            return
    last = st.step == len(steps) - 1
    if last and verdict is not None and verdict.phase is not analysis.Phase.SUCCESSFUL:
        st.conclude(Event.STEP_PROGRESSING)
        st.message = f"Version {target} completed its steps; analysis: {verdict.message}"
        return
    st.event("Normal", Reason.STEP_COMPLETED, f"Step {st.step + 1}/{len(steps)} ({build_step_label(step)}) of "
                                              f"version {target} completed{shadow_note}")
    st.step += 1
    st.step_started, st.step_ready = now, None
    st.conclude(Event.STEP_PROGRESSING)
    promoting = st.step >= len(steps)
    canary = total if promoting else build_step_pods(total, steps[st.step])
    desired[target], desired[st.stable] = plan_canary_replicas(spec, canary, cand_ready, now_replicas)
    if gateway:
        desired[target] = total if promoting else traffic.plan_gateway_replicas(total, steps[st.step].weight or 0,
                                                                                 0)[0]
        desired[st.stable] = traffic.plan_gateway_replicas(total, 0, min(route_weight, st.weight))[1]
    st.message = (f"Promoting version {target}" if promoting else
                  f"Step {st.step + 1}/{len(steps)} of version {target}: scaling to {canary} pod(s)")
    st.wake_at(now + datetime.timedelta(seconds=spec.rollout.startup_timeout_seconds))


def build_backends(md: spec_mod.ModelDeployment, meta: Meta, observed: Observed, candidate: str | None,
                   kind: str = traffic.HTTP_ROUTE) -> traffic.Backends:
    """The Services of the managed route rules: the model's (stable backend), the candidate's own (canary backend),
    and the per-version Service names of every version the model has (a rule naming any of them is managed)."""
    versions = {*observed.deployments, *([candidate] if candidate else [])}
    serving = md.spec.serving
    port = serving.port
    if kind == traffic.GRPC_ROUTE:
        port = serving.grpc.port if serving.grpc is not None else next(
            (int(p["port"]) for p in objects.build_service_ports(serving) if p.get("name") == contract.GRPC_PORT_NAME),
            serving.port)
    return traffic.Backends(
        stable=naming.build_service_name(meta.name),
        canary=naming.build_deployment_name(meta.name, candidate) if candidate else None,
        versions=frozenset(naming.build_deployment_name(meta.name, v) for v in versions), port=port)


def build_route_weight(md: spec_mod.ModelDeployment, meta: Meta, st: _State, observed: Observed) -> int:
    """The candidate's percentage in the HTTPRoute's managed rules as they are now (0 when unknown or unread)."""
    if md.spec.rollout.gateway_api is None or observed.traffic is None:
        return 0
    route = observed.traffic.routes.get(traffic.HTTP_ROUTE)
    if route is None or route.body is None:
        return 0
    return traffic.read_canary_weight(route.rules, build_backends(md, meta, observed, st.candidate)) or 0


def assess_traffic(md: spec_mod.ModelDeployment, meta: Meta, observed: Observed) -> tuple[str, str] | None:
    """Why the Gateway API routes cannot carry a rollout now: (reason, message), None when they can (or with replicas
    traffic, or when the shell read nothing). A route whose rules name neither the model's Service nor a version's
    is refused too: there is nothing to manage."""
    gw = md.spec.rollout.gateway_api
    if gw is None or observed.traffic is None:
        return None
    for kind, name, path in ((traffic.HTTP_ROUTE, gw.http_route, "spec.rollout.traffic.gatewayAPI.httpRoute"),
                             (traffic.GRPC_ROUTE, gw.grpc_route, "spec.rollout.traffic.gatewayAPI.grpcRoute")):
        if name is None:
            continue
        route = observed.traffic.routes.get(kind) or traffic.RouteView(kind=kind, name=name, body=None)
        problem = traffic.assess_route(route, observed.traffic.gateways, meta.namespace, path)
        if problem is not None:
            return problem
        if not any(traffic.assess_managed(r, build_backends(md, meta, observed, None, kind)) for r in route.rules):
            return (Reason.ROUTE_NOT_ATTACHED,
                    f"{kind} {name!r} ({path}) has no rule with a backendRef to Service "
                    f"{naming.build_service_name(meta.name)!r} (the model's Service): add one to the rule that "
                    "should carry the model's traffic; Shipyard sets its weights")
    return None


def _plan_traffic_blocked(st: _State, observed: Observed, desired: dict[str, int], problem: tuple[str, str],
                          now: datetime.datetime) -> None:
    """The routes cannot carry the rollout: nothing moves (every version keeps its replicas, the candidate is not
    started or advanced, the weights stay), the stable keeps serving, the model is Stalled naming the cause."""
    for version, view in observed.deployments.items():
        if version in (st.stable, st.candidate):
            desired[version] = view.replicas
    st.conclude(Event.TRAFFIC_UNAVAILABLE)
    st.stalled_reason = problem[0]
    st.message = f"{problem[1]}; version {st.stable} keeps serving, the rollout waits"
    st.wake_at(now + TRAFFIC_POLL)


def _plan_routes(md: spec_mod.ModelDeployment, meta: Meta, st: _State, observed: Observed, desired: dict[str, int],
                 apply: list[dict[str, Any]], previous: Mapping[str, Any], now: datetime.datetime,
                 problem: tuple[str, str] | None) -> dict[str, Any] | None:
    """gatewayAPI traffic: the managed routes' rules for this pass (the candidate's weight, the preview rule while
    it has a Ready pod), status.traffic, and the order of things: while a route is being rewritten, or its Gateway
    controller has not acted on its generation yet, no version is scaled down (the weight goes to 0 before a rolled
    back candidate's pods go; a promoted version takes the stable backend before the old pods go). A weight someone
    else changed is put back, with a Warning Event. Returns status.traffic."""
    gw = md.spec.rollout.gateway_api
    if gw is None:
        return None
    out: dict[str, Any] = {"httpRoute": gw.http_route, "grpcRoute": gw.grpc_route}
    if observed.traffic is None:
        return out
    weight = st.weight if st.candidate else 0
    cand_view = observed.deployments.get(st.candidate) if st.candidate else None
    preview = (traffic.Preview(gw.preview_header, st.candidate)
               if st.candidate and cand_view is not None and cand_view.serving > 0 else None)
    prev = previous.get("traffic") or {}
    out.update({"stableWeight": 100 - weight, "canaryWeight": weight,
                "preview": {"header": preview.header, "version": preview.version} if preview else None})
    if problem is not None:
        out["message"] = problem[1][:1024]
        out["programmed"] = False
        return out
    hold = False
    changed_at = parse_time(prev.get("changedAt"))
    for kind, name in ((traffic.HTTP_ROUTE, gw.http_route), (traffic.GRPC_ROUTE, gw.grpc_route)):
        route = observed.traffic.routes.get(kind) if name else None
        if route is None or route.body is None:
            continue
        backends = build_backends(md, meta, observed, st.candidate, kind)
        rules = traffic.build_rules(route.rules, backends, weight, preview, kind)
        if not traffic.assess_rules_equal(rules, route.rules):
            apply.append(traffic.build_route_apply(route, rules, meta.namespace))
            found = traffic.read_canary_weight(route.rules, backends)
            if prev.get("canaryWeight") == weight and found is not None and found != weight and \
                    prev.get("programmed"):
                st.event("Warning", Reason.TRAFFIC_RESTORED,
                         f"The weights of {kind} {name!r} were changed by someone else (candidate {found}%, Shipyard's "
                         f"step has {weight}%): restored")
            hold = True
            changed_at = now
        elif not traffic.assess_route_programmed(route):
            hold = True
    if changed_at is not None and now < changed_at + ROUTE_SETTLE:
        hold = True
        st.wake_at(changed_at + ROUTE_SETTLE)
    out["changedAt"] = build_timestamp(changed_at) if changed_at else None
    out["programmed"] = not hold
    if hold:
        for version, view in observed.deployments.items():
            if version in desired and desired[version] < view.replicas:
                desired[version] = view.replicas
        st.wake_at(now + ROUTE_POLL)
    elif st.candidate:
        st.wake_at(now + TRAFFIC_POLL)  # weights someone else changes are noticed within this
    return out


def build_agreement_result(spec: spec_mod.ModelDeploymentSpec,
                           status_analysis: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The status entry (status.analysis.metrics[]) of the analysis' predictionAgreement metric, None without one."""
    analysis_spec = spec.rollout.analysis
    name = next((m.name for m in (analysis_spec.metrics if analysis_spec else ())
                 if m.builtin == providers.builtin.PREDICTION_AGREEMENT), None)
    return next((r for r in (status_analysis or {}).get("metrics") or () if isinstance(r, Mapping)
                 and r.get("name") == name), None) if name is not None else None


def build_shadow_figures(spec: spec_mod.ModelDeploymentSpec,
                         status_analysis: Mapping[str, Any] | None) -> dict[str, float]:
    """The copies by outcome (compared, dropped, timeouts, errors) of the latest predictionAgreement measurement
    that had them; empty before the first. Pure."""
    result = build_agreement_result(spec, status_analysis)
    figures = (result or {}).get("figures")
    return {str(k): float(v) for k, v in figures.items() if isinstance(v, int | float)} \
        if isinstance(figures, Mapping) else {}


def build_shadow_note(figures: Mapping[str, float]) -> str:
    """`` (shadow: 120 compared, 0 dropped, 0 timeouts, 3 errors)``, or nothing before the first measurement."""
    if not figures:
        return ""
    return (" (shadow: " + ", ".join(f"{figures.get(k, 0):.0f} {k}" for k in ("compared", "dropped", "timeouts",
                                                                               "errors")) + ")")


def plan_shadow_wait(shadow: spec_mod.ShadowStep, verdict: analysis.Assessment | None,
                     figures: Mapping[str, float], step_ready: datetime.datetime,
                     now: datetime.datetime) -> tuple[str, datetime.datetime | None] | None:
    """What a shadow step whose candidate is Ready still waits for, and until when (for the duration); None: it is
    done. Done when the analysis is Successful (every metric, predictionAgreement included, passed minSamples
    times), at least minRequests copies were compared, and duration has passed since the candidate was Ready. Pure."""
    parts: list[str] = []
    if verdict is None or verdict.phase is not analysis.Phase.SUCCESSFUL:
        parts.append(f"analysis: {verdict.message if verdict is not None else 'not started'}")
    compared = figures.get("compared", 0.0)
    if shadow.min_requests is not None and compared < shadow.min_requests:
        parts.append(f"{compared:.0f}/{shadow.min_requests} compared copies")
    until: datetime.datetime | None = None
    if shadow.duration_seconds is not None:
        end = step_ready + datetime.timedelta(seconds=shadow.duration_seconds)
        if now < end:
            until = end
            parts.append(f"shadowing until {build_timestamp(end)}")
    return ("; ".join(parts), until) if parts else None


def build_shadow_active(spec: spec_mod.ModelDeploymentSpec, st: _State) -> bool:
    """Whether the stable copies requests to the candidate now: a canary candidate of the spec's version at its
    shadow step, with its pods Ready (before, every copy would be an error). Pure."""
    return (st.candidate is not None and st.candidate == spec.version and st.stable is not None
            and spec.rollout.strategy == "canary" and build_step_kind(spec, st.step) == "shadow"
            and st.step_ready is not None)


def _plan_shadow(md: spec_mod.ModelDeployment, meta: Meta, st: _State, observed: Observed,
                 apply: list[dict[str, Any]], deletes: list[tuple[str, str, str]]) -> dict[str, Any] | None:
    """The ``<model>-shadow`` ConfigMap the pods of Shipyard's own server read (``objects.add_shadow_config``): the
    candidate's own Service, percent, version and comparison while a shadow step runs, empty (off) otherwise; kept
    while the spec has a shadow step, deleted when it has none. Returns status.shadow (None: no shadow step now)."""
    spec = md.spec
    name = naming.build_shadow_config_name(meta.name)
    shadow = spec.rollout.shadow_step
    if shadow is None or spec.serving.runtime is not None or spec.model.output is None:
        if name in observed.config_maps:
            deletes.append(("v1", "ConfigMap", name))
        return None
    active = build_shadow_active(spec, st)
    settings = ""
    url = ""
    if active:
        assert st.candidate is not None
        url = providers.job.build_service_url(meta.name, st.candidate, meta.namespace, spec.serving.port)
        settings = objects.build_shadow_settings(url, st.candidate, shadow.percent, spec.model.output.compare,
                                                 spec.model.output.tolerance)
    config_map = objects.build_shadow_config_map(meta, settings)
    if observed.config_maps.get(name) != objects.spec_hash_of(config_map):
        apply.append(config_map)
    if not active:
        return None
    assert st.candidate is not None and st.stable is not None and st.step_ready is not None
    figures = build_shadow_figures(spec, st.analysis)
    result = build_agreement_result(spec, st.analysis) or {}
    status: dict[str, Any] = {
        "candidate": st.candidate, "url": url, "percent": shadow.percent,
        **{k: int(figures.get(k, 0)) for k in ("compared", "dropped", "timeouts", "errors")},
        "agreement": result.get("lastValue"), "minRequests": shadow.min_requests,
        "until": build_timestamp(st.step_ready + datetime.timedelta(seconds=shadow.duration_seconds))
        if shadow.duration_seconds is not None else None,
    }
    stable_view = observed.deployments.get(st.stable)
    if stable_view is not None and not stable_view.shadow_config:
        note = (f"the stable's pods (version {st.stable}) were deployed by an operator version without the shadow "
                "settings mount and copy nothing: this rollout's shadow step holds without data; its candidate, once "
                "promoted, has the mount (docs/shadow.md)")
        st.message = f"{st.message}; {note}" if st.message else note
    return status


def build_active_version(spec: spec_mod.ModelDeploymentSpec, st: _State) -> str | None:
    """The version the model's Service selects (None: every version's pods, a canary's split by ready pods). Pure.

    At rest the stable only, so that a kept version (the rollback window, a rollback-to scaling up) never takes
    traffic; during a canary both, but the stable only during a shadow step; during blue-green the active one (the
    stable, or the candidate once switched)."""
    if st.candidate is not None and st.stable is not None:
        if spec.rollout.strategy != "blueGreen":
            # a shadow step: the candidate only gets the stable's copies, through its own Service; gatewayAPI: the
            # model's Service is the route's stable backend, the candidate has its own
            if build_step_kind(spec, st.step) == "shadow" or spec.rollout.gateway_api is not None:
                return st.stable
            return None
        return st.candidate if build_switched(spec, st.step) else st.stable
    return st.stable


def build_preview_version(spec: spec_mod.ModelDeploymentSpec, st: _State) -> str | None:
    """Blue-green: the candidate the preview Service selects (while it is not the active one yet). Pure."""
    if spec.rollout.strategy != "blueGreen" or st.candidate is None or st.stable is None:
        return None
    return None if build_switched(spec, st.step) else st.candidate


def _plan_blue_green(md: spec_mod.ModelDeployment, meta: Meta, st: _State, observed: Observed,
                     desired: dict[str, int], now: datetime.datetime,
                     measurements: Mapping[str, analysis.Measurement], apply: list[dict[str, Any]]) -> None:
    """Blue-green: the candidate at full size behind the preview Service while the stable serves everything (step
    0, pre-promotion analysis = spec.rollout.analysis); then the model's Service switches to it at once (step 1,
    post-promotion analysis, the stable still at full size: a failure switches back with no cold start); promoted
    when that analysis succeeds, the previous stable kept for spec.rollout.scaleDownDelaySeconds."""
    spec = md.spec
    target, total = spec.version, spec.serving.effective_replicas
    assert st.stable is not None
    _start_candidate(md, st, now, f"(blue-green: preview {naming.build_preview_service_name(meta.name)}, then a "
                                  "switch of the active Service)")
    switched = build_switched(spec, st.step)
    cand_view = observed.deployments.get(target)
    stable_view = observed.deployments[st.stable]
    cand_ready = cand_view.ready if cand_view is not None else 0
    if md.controls.abort == target and st.controls.get("abort") != target:
        st.controls["abort"] = target
        _fail_candidate(md, st, desired, Reason.ABORTED, "aborted by shipyard.dev/abort", now,
                        outcome=Outcome.ABORTED)
        return
    # shipyard.dev/promote=<candidate>: switch as soon as it is Ready, without waiting for autoPromotion or the
    # pre-promotion analysis (the post-promotion analysis still runs); while a failure is held (rollback policy
    # Manual), promote it.
    forced = md.controls.promote == target
    promote_now = forced and st.controls.get("promote") != target
    if promote_now:
        st.controls["promote"] = target
        st.event("Normal", Reason.PROMOTED_MANUALLY, f"Promoting version {target} (shipyard.dev/promote)")
    if st.paused_reason == Reason.ANALYSIS_FAILED and not promote_now:
        desired[target] = cand_view.replicas if cand_view else 0
        desired[st.stable] = stable_view.replicas
        st.conclude(Event.FAILURE_HELD)
        st.message = (f"Version {target} failed its analysis; paused (rollback policy Manual): set "
                      f"shipyard.dev/abort={target} or shipyard.dev/promote={target}")
        return
    surge = build_surge_pods(spec)
    if surge is not None and surge < total and not switched and (cand_view is None or cand_view.replicas < total):
        # Both versions at full size do not fit the GPU surge budget: wait, the stable untouched.
        desired[st.stable] = max(total, stable_view.replicas)
        if cand_view is not None:
            desired[target] = cand_view.replicas
        gpus = spec.serving.resources.gpus
        message = (f"Blue-green needs {total * gpus} GPU(s) for version {target} next to the stable "
                   f"({total} replica(s) x {gpus}); spec.rollout.maxSurgeGPUs allows {spec.rollout.max_surge_gpus}: "
                   "raise it, or use the canary strategy")
        if st.paused_reason != Reason.INSUFFICIENT_GPUS:
            st.event("Warning", Reason.INSUFFICIENT_GPUS, message)
        st.paused_reason = Reason.INSUFFICIENT_GPUS
        st.conclude(Event.WAITING_FOR_CAPACITY)
        st.message = message
        return
    if st.paused_reason == Reason.INSUFFICIENT_GPUS:
        st.paused_reason = None
    desired[target] = max(total, cand_view.replicas if cand_view is not None else 0)
    desired[st.stable] = max(total, stable_view.replicas)
    ready = cand_view is not None and cand_view.replicas >= total and cand_view.rolled_out and cand_ready >= total
    if promote_now and st.paused_reason == Reason.ANALYSIS_FAILED:
        st.paused_reason = None
        _promote(md, st, now)
        return
    started = st.step_started or now
    if not ready:
        deadline = started + datetime.timedelta(seconds=spec.rollout.startup_timeout_seconds)
        if now >= deadline and not switched:
            _fail_candidate(md, st, desired, Reason.STARTUP_TIMEOUT,
                            f"{cand_ready}/{total} pod(s) ready after startupTimeoutSeconds "
                            f"({spec.rollout.startup_timeout_seconds} s){build_fetch_failure(observed, target)}", now)
            return
        st.wake_at(deadline)
    elif st.step_ready is None:
        st.step_ready = now
        st.event("Normal", Reason.STEP_READY, f"Version {target}: {total}/{total} pod(s) ready behind the preview "
                                              f"Service {naming.build_preview_service_name(meta.name)}")
    verdict = None if forced and not switched else _plan_analysis(md, meta, st, observed, now, measurements, apply)
    stage = "post-promotion analysis" if switched else "analysis"
    if verdict is not None and verdict.phase in (analysis.Phase.FAILED, analysis.Phase.ERROR):
        if switched and spec.rollback.policy == "Automatic":
            st.event("Warning", Reason.SWITCHED_BACK,
                     f"Switched the active Service back to version {st.stable}: {stage} of {target} failed")
        _fail_candidate(md, st, desired, Reason.ANALYSIS_FAILED, f"{stage}: {verdict.message}", now)
        return
    if not ready:
        st.conclude(Event.STEP_PROGRESSING)
        st.message = (f"Version {target} (blue-green, {'active' if switched else 'preview'}): {cand_ready}/{total} "
                      f"pod(s) ready; version {st.stable if not switched else target} serves all traffic")
        return
    if _hold_inconclusive(st, target, verdict, f"({stage})"):
        return
    if verdict is not None and verdict.phase is not analysis.Phase.SUCCESSFUL:
        st.conclude(Event.STEP_PROGRESSING)
        st.message = f"Version {target} ({'active' if switched else 'preview'}): {stage}: {verdict.message}"
        return
    if switched:
        _promote(md, st, now)
        return
    if spec.rollout.blue_green is not None and not spec.rollout.blue_green.auto_promotion and not forced:
        st.conclude(Event.STEP_WAITING_FOR_PROMOTION)
        st.paused_reason = Reason.MANUAL_STEP
        st.message = (f"Version {target} is Ready behind the preview Service "
                      f"{naming.build_preview_service_name(meta.name)}: waiting for shipyard.dev/promote={target}")
        return
    st.paused_reason = None
    st.step, st.step_started, st.step_ready, st.analysis = 1, now, now, None
    st.event("Normal", Reason.SWITCHED, f"Switched the active Service to version {target}")
    if spec.rollout.post_promotion_analysis is None:
        _promote(md, st, now)
        return
    st.conclude(Event.STEP_PROGRESSING)
    st.message = f"Version {target} is active; post-promotion analysis running, version {st.stable} kept Ready"
    _plan_analysis(md, meta, st, observed, now, measurements, apply)  # schedules its first measurement


def _hold_inconclusive(st: _State, target: str, verdict: analysis.Assessment | None, where: str) -> bool:
    """An inconclusive analysis holds the candidate where it is (paused, with an Event on entering the pause);
    True when it does. A conclusive one ends such a pause."""
    if verdict is not None and verdict.phase is analysis.Phase.INCONCLUSIVE:
        if st.paused_reason != Reason.ANALYSIS_INCONCLUSIVE:
            st.event("Warning", Reason.ANALYSIS_INCONCLUSIVE, f"Version {target}: {verdict.message}")
        st.conclude(Event.ANALYSIS_INCONCLUSIVE)
        st.paused_reason = Reason.ANALYSIS_INCONCLUSIVE
        st.message = f"Holding version {target} {where}: {verdict.message}"
        return True
    if st.paused_reason == Reason.ANALYSIS_INCONCLUSIVE:
        st.paused_reason = None
    return False


def _plan_analysis(md: spec_mod.ModelDeployment, meta: Meta, st: _State, observed: Observed,
                   now: datetime.datetime, measurements: Mapping[str, analysis.Measurement],
                   apply: list[dict[str, Any]]) -> analysis.Assessment | None:
    """Folds this pass' measurements into the candidate's analysis and judges it (None: not under analysis).

    Pulled metrics arrive in ``measurements`` (the shell measured them); job metrics are read from their Jobs here,
    and a Job is created for each one that is due and not running yet.
    """
    spec_analysis = build_active_analysis(md.spec, st.step)
    gate = plan_analysis_gate(md, st.candidate, st.stable, st.step_ready, st.analysis, st.step)
    if spec_analysis is None or gate is None:
        return None
    folded = dict(measurements)
    folded.update(_plan_child_measurements(md, meta, st, observed, gate, spec_analysis, now, apply))
    st.analysis = analysis.build_analysis_status(gate.prior, spec_analysis, md.spec.version, folded, gate.started,
                                                 now)
    _, next_due = analysis.plan_due(st.analysis, spec_analysis, gate.started, now)
    st.wake_at(next_due)
    return analysis.Assessment(analysis.Phase(st.analysis["phase"]), str(st.analysis.get("message", "")))


def _plan_child_measurements(md: spec_mod.ModelDeployment, meta: Meta, st: _State, observed: Observed,
                           gate: AnalysisGate, spec_analysis: spec_mod.Analysis, now: datetime.datetime,
                           apply: list[dict[str, Any]]) -> dict[str, analysis.Measurement]:
    """Metrics of planned providers (job): the finished child of each one's current run is its measurement; a due
    metric without a child for its run gets one (run = measurements counted so far, so a restarted operator finds
    the same child)."""
    due, _ = analysis.plan_due(gate.prior, spec_analysis, gate.started, now)
    results = {str(m.get("name")): m for m in (gate.prior or {}).get("metrics") or () if isinstance(m, Mapping)}
    out: dict[str, analysis.Measurement] = {}
    for metric in spec_analysis.metrics:
        backend = providers.planned_backend(metric)
        if backend is None:
            continue
        run = analysis.build_measurement_count(results.get(metric.name))
        name = backend.build_child_name(meta.name, gate.candidate, metric.name, run)
        view = observed.jobs.get(name)
        if view is not None:
            sample = backend.build_sample(view)
            if sample is not None:
                out[metric.name] = analysis.Measurement(candidate=sample)
        elif metric.name in due:
            apply.append(backend.build_child(
                object_meta=lambda n, labels: objects.build_object_meta(meta, n, labels), metric=metric,
                model=meta.name, served_model=md.served_model_name, namespace=meta.namespace,
                candidate=gate.candidate, stable=st.stable, port=md.spec.serving.port, run=run))
    return out


def _plan_analysis_children(md: spec_mod.ModelDeployment, meta: Meta, st: _State, observed: Observed,
                            apply: list[dict[str, Any]], deletes: list[tuple[str, str, str]]) -> None:
    """What job metrics need besides their Jobs: a Service per version for the Job to reach the candidate (and
    compare with the stable) while a candidate is rolled out; finished analysis Jobs of earlier runs, and every
    analysis Job once its candidate is gone, are deleted."""
    spec_analysis = build_active_analysis(md.spec, st.step)
    wants_services = (spec_analysis is not None and st.candidate is not None and st.candidate == md.spec.version
                      and any(providers.planned_backend(m) is not None for m in spec_analysis.metrics))
    versions = [v for v in (st.candidate, st.stable) if v is not None] if wants_services else []
    if md.spec.rollout.gateway_api is not None:
        # the route's canary backend and preview: the candidate's own Service, and a rolled back or replaced
        # version's while its pods still run (the weight leaves it before they go)
        versions += [v for v in (st.candidate, *(v for v, d in observed.deployments.items() if d.replicas > 0))
                     if v is not None and v != st.stable and v not in versions]
    if build_shadow_active(md.spec, st) and st.candidate is not None and st.candidate not in versions:
        versions.append(st.candidate)  # the address the stable's pods copy requests to
    wanted = {naming.build_deployment_name(meta.name, v): v for v in versions}
    model_service = naming.build_service_name(meta.name)
    services = [objects.build_version_service(meta, version, md.spec.serving.port,
                                              objects.build_service_ports(md.spec.serving))
                for version in wanted.values()]
    preview = build_preview_version(md.spec, st)
    if preview is not None:  # blue-green: the candidate's own address from the start (smoke tests, job metrics)
        services.append(objects.build_preview_service(meta, preview, objects.build_service_ports(md.spec.serving)))
    for service in services:
        if observed.services.get(service["metadata"]["name"]) != objects.spec_hash_of(service):
            apply.append(service)
    keep = {model_service, *(o["metadata"]["name"] for o in services)}
    for name in observed.services:
        if name not in keep:
            deletes.append(("v1", "Service", name))
    current_runs = {(str(m.get("name")), analysis.build_measurement_count(m))
                    for m in (st.analysis or {}).get("metrics") or () if isinstance(m, Mapping)}
    for view in observed.jobs.values():
        if view.labels.get(naming.LABEL_COMPONENT) != providers.base.MEASUREMENT_COMPONENT:
            continue
        same_candidate = view.labels.get(naming.LABEL_VERSION) == naming.build_label_value(st.candidate or "")
        metric, run = view.labels.get(providers.base.LABEL_METRIC, ""), view.labels.get(providers.base.LABEL_RUN, "")
        latest = run.isdigit() and (metric, int(run) + 1) in current_runs  # the run just folded: kept to look at
        running = view.phase in ("Pending", "Running") and run.isdigit() and (metric, int(run)) in current_runs
        if not same_candidate or not (latest or running):
            deletes.append(("batch/v1", "Job", view.name))


@dataclass(frozen=True)
class ScalerPlan:
    """What the planner concluded about the scaler: the Autoscaling condition and status.autoscaling; ``activator``:
    the model scales to zero with an activator (its Deployment is planned)."""

    ok: bool | None
    reason: str
    message: str
    status: dict[str, Any]
    activator: bool = False


def assess_activator(spec: spec_mod.ModelDeploymentSpec, activator_image: str | None) -> tuple[str | None, str]:
    """(ready path, "") when the model scales to zero through an activator, else (None, why not: "" when it does not
    scale to zero). Pure. The activator probes the server's HTTP readiness path through the model's Service, so a
    server without one (gRPC only, a TCP probe) cannot use it."""
    auto = spec.serving.autoscaling
    if auto is None or auto.provider != "keda" or auto.min_replicas > 0:
        return None, ""
    if not activator_image:
        return None, ("spec.serving.autoscaling.minReplicas 0 needs the activator, and the operator has no image "
                      "for it (--activator-image, SHIPYARD_ACTIVATOR_IMAGE): holding at least 1 replica")
    path = objects.build_activator_ready_path(spec.serving)
    if path is None:
        return None, ("spec.serving.autoscaling.minReplicas 0 needs an HTTP readiness path on the model's server "
                      "(the activator waits for it through the Service); this server answers none: holding at "
                      "least 1 replica")
    return path, ""


def assess_routes_to_activator(spec: spec_mod.ModelDeploymentSpec, st: _State, observed: Observed,
                               has_activator: bool) -> bool:
    """Whether the model's Service selects the activator rather than model pods. Pure.

    When the model scales to zero, or no pod the Service would select is Ready (waking up), and the activator has a
    Ready pod: requests are held rather than refused. Traffic moves first: the pass that points the Service at the
    activator scales nothing down, so the last pods serve until the Service has left them."""
    # Pods that serve now (ready and available), whether or not a Deployment controller has caught up with a scale:
    # a scale of the stable must not send its traffic to the activator while the controller catches up.
    if not has_activator or observed.activator is None or observed.activator.serving < 1:
        return False
    if spec.serving.effective_replicas == 0:
        return True
    active = build_active_version(spec, st)
    label = None if active is None else naming.build_label_value(active)
    return not any(view.serving for view in observed.deployments.values() if label is None or view.version == label)


def _plan_activator(md: spec_mod.ModelDeployment, meta: Meta, st: _State, observed: Observed,
                    apply: list[dict[str, Any]], deletes: list[tuple[str, str, str]], image: str | None,
                    ready_path: str | None) -> None:
    """The activator's Deployment while the model scales to zero through one; deleted otherwise."""
    if image is not None and ready_path is not None:
        wanted = objects.build_activator_deployment(meta, md, image, ready_path)
        view = observed.activator
        if view is None or view.spec_hash != objects.spec_hash_of(wanted):
            apply.append(wanted)
    elif observed.activator is not None:
        deletes.append(("apps/v1", "Deployment", observed.activator.name))


def _plan_scaler(md: spec_mod.ModelDeployment, meta: Meta, st: _State, observed: Observed,
                 apply: list[dict[str, Any]], deletes: list[tuple[str, str, str]],
                 prometheus_address: str | None, activator_image: str | None = None) -> ScalerPlan | None:
    """The scaler of spec.serving.autoscaling (a ScaledObject or an HPA named as the model, targeting the
    ModelDeployment's scale subresource); any other scaler Shipyard owns is deleted. A scaler that cannot exist here
    (KEDA not installed, no Prometheus for its trigger) stalls the ModelDeployment with a message naming what is
    missing, while the fixed spec.serving.replicas keep being served. None: no autoscaling.

    minReplicas 0 (keda): the activator's Deployment too, and the ScaledObject's trigger on the requests it holds;
    without an activator (no image for it, no HTTP readiness path) the ScaledObject keeps at least one replica and
    the Autoscaling condition says why."""
    spec = md.spec
    auto = spec.serving.autoscaling
    name = naming.build_service_name(meta.name)
    wanted: dict[str, Any] | None = None
    problem: tuple[str, str] | None = None
    ready_path, no_activator = assess_activator(spec, activator_image)
    with_activator = False
    if auto is not None:
        object_meta = objects.build_object_meta(meta, name, naming.build_selector_labels(meta.name))
        if auto.provider == "hpa":
            wanted = autoscaling.build_hpa(object_meta, meta.name, auto)
        elif observed.keda is False:
            problem = (Reason.SCALER_UNAVAILABLE,
                       "spec.serving.autoscaling provider keda needs KEDA's ScaledObject (keda.sh/v1alpha1), which "
                       "this cluster does not serve: install KEDA or use provider hpa; the fixed "
                       f"spec.serving.replicas ({spec.serving.effective_replicas}) keep serving")
        elif prometheus_address is None:
            problem = (Reason.SCALER_UNAVAILABLE,
                       "spec.serving.autoscaling provider keda reads the operator's Prometheus, and none is "
                       "configured (--prometheus-address); the fixed spec.serving.replicas keep serving")
        else:
            query = autoscaling.build_query(auto.metric, meta.namespace, md.served_model_name,
                                            spec.serving.resources.cpu_request_cores,
                                            window_seconds=auto.rate_window_seconds)
            with_activator = ready_path is not None
            activation = autoscaling.build_activation_query(meta.namespace, md.served_model_name) \
                if with_activator else None
            if activation is not None:
                query = autoscaling.build_query_with_activator(query, activation)
            wanted = autoscaling.build_scaled_object(object_meta, meta.name, auto, query, prometheus_address,
                                                     activation)
    _plan_activator(md, meta, st, observed, apply, deletes, activator_image if with_activator else None, ready_path)
    if wanted is not None:
        wanted["metadata"]["annotations"] = {naming.ANNOTATION_SPEC_HASH: objects.build_spec_hash(wanted)}
        view = observed.scalers.get(name)
        if view is None or view.kind != wanted["kind"] or view.spec_hash != objects.spec_hash_of(wanted):
            apply.append(wanted)
    for other, view in sorted(observed.scalers.items()):
        if wanted is None or other != name or view.kind != wanted["kind"]:
            api = autoscaling.KEDA_API if view.kind == autoscaling.SCALED_OBJECT else autoscaling.HPA_API
            deletes.append((api, view.kind, other))
    if auto is None:
        return None
    status: dict[str, Any] = {"provider": auto.provider, "metric": auto.metric, "target": auto.target,
                              "minReplicas": auto.min_replicas, "maxReplicas": auto.max_replicas}
    if problem is not None:
        reason, message = problem
        if st.stalled_reason is None:
            st.stalled_reason = reason
            st.message = f"{st.message}; {message}" if st.message else message
        return ScalerPlan(False, reason, message, status)
    assert wanted is not None
    status["scaler"] = f"{wanted['kind']}/{name}"
    if with_activator:
        status["activator"] = f"Deployment/{naming.build_activator_name(meta.name)}"
    view = observed.scalers.get(name)
    if view is None or view.kind != wanted["kind"]:
        return ScalerPlan(None, "ScalerPending", f"{wanted['kind']} {name} created", status, with_activator)
    if no_activator:
        return ScalerPlan(False, "ActivatorUnavailable", no_activator, status)
    ok, reason, message = autoscaling.assess_scaler(
        view.kind, view.conditions, at_zero=with_activator and spec.serving.effective_replicas == 0)
    return ScalerPlan(ok, reason, message, status, with_activator)


def _build_status(md: spec_mod.ModelDeployment, meta: Meta, st: _State, previous: Mapping[str, Any],
                  observed: Observed, now: datetime.datetime, *, settled: bool, compression_state: str,
                  scaler: ScalerPlan | None = None) -> dict[str, Any]:
    spec = md.spec
    g = meta.generation
    prev_conditions = previous.get("conditions") or []
    healthy = st.phase == Phase.HEALTHY and settled
    stalled = st.stalled_reason is not None
    ready_total = sum(v.ready for v in observed.deployments.values())
    reason = st.stalled_reason or st.paused_reason or ("RolledOut" if healthy else st.phase)
    conditions = [
        build_condition("Ready", healthy, "RolledOut" if healthy else reason, st.message, g, prev_conditions, now),
        build_condition("Reconciling", not healthy and not stalled, reason, st.message if not healthy else "", g,
                        prev_conditions, now),
        build_condition("Stalled", stalled, st.stalled_reason or "AsExpected", st.message if stalled else "", g,
                        prev_conditions, now),
        build_condition("Serving", ready_total > 0 or spec.serving.effective_replicas == 0,
                        "ReplicasReady" if ready_total else "NoReadyReplicas",
                        f"{ready_total} ready replica(s) across versions", g, prev_conditions, now),
    ]
    if spec.compression is not None:
        compressed = {"ready": True, "failed": False}.get(compression_state)
        last_artifact = next((a for a in reversed(st.artifacts) if a.get("version") == spec.version), None)
        msg = str((last_artifact or {}).get("message", ""))
        conditions.append(build_condition(
            "Compressed", compressed,
            {"ready": "ArtifactReady", "failed": "CompressionFailed",
             "stalled": st.stalled_reason or "ArtifactVolumeMissing"}.get(
                compression_state, "Compressing"), msg, g, prev_conditions, now))
    if scaler is not None:
        conditions.append(build_condition("Autoscaling", scaler.ok, scaler.reason, scaler.message, g,
                                          prev_conditions, now))
    serving_versions = [v for v in (st.stable, st.candidate) if v is not None and v in observed.deployments]
    status: dict[str, Any] = {
        "observedGeneration": g,
        "phase": st.phase,
        "message": st.message,
        "stableVersion": st.stable,
        "stableImage": st.stable_image,
        "candidateVersion": st.candidate,
        "candidateImage": st.candidate_image,
        "currentStepIndex": st.step if st.candidate else None,
        "stepStartedAt": build_timestamp(st.step_started) if st.candidate and st.step_started else None,
        "stepReadyAt": build_timestamp(st.step_ready) if st.candidate and st.step_ready else None,
        "activeVersion": build_active_version(spec, st),
        "previewVersion": build_preview_version(spec, st),
        "rollbackWindow": st.window,
        "restoring": st.restoring,
        "pausedReason": st.paused_reason,
        "conditions": conditions,
        "history": st.history,
        "artifacts": st.artifacts or None,
        "analysis": st.analysis,
        "controls": st.controls or None,
        "selector": autoscaling.build_selector(meta.name),
        "autoscaling": scaler.status if scaler is not None else None,
        "replicas": {
            "desired": spec.serving.effective_replicas,
            "current": sum(observed.deployments[v].replicas for v in serving_versions),
            "ready": ready_total,
            "stable": observed.deployments[st.stable].ready if st.stable and st.stable in observed.deployments else 0,
            "candidate": observed.deployments[st.candidate].ready
            if st.candidate and st.candidate in observed.deployments else 0,
        },
    }
    return status


def assess_status_changed(previous: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """True when writing `new` would change what is stored (so idle reconciles write nothing)."""
    return any(previous.get(k) != v for k, v in new.items())
