"""The rollout state machine: phases, events, reasons and outcomes as enums, and the one transition table. Pure.

Every pass of the planner (``planning.plan_reconcile``) concludes what happened to the ModelDeployment in one
``Event`` (the candidate's step completed, its analysis failed, compression is running, pods were lost, ...); the
new ``status.phase`` is ``transition(previous phase, event)``, looked up in ``TRANSITIONS`` and nowhere else. A pair
missing from the table is a bug (``InvalidTransition``), which the planner's tests, including a property test over
generated specs and states, would find. ``build_diagram`` draws the table (docs/operator.md shows it; a test fails
when the page and the code disagree: ``python -m shipyard.operator.rollout`` prints it).

``Reason`` is every machine-readable reason Shipyard writes: conditions' and ``pausedReason``, history entries and
the Kubernetes Events it posts. ``Outcome`` is a history entry's outcome.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final


class Phase(enum.StrEnum):
    """``status.phase``."""

    PENDING = "Pending"  # nothing planned yet
    COMPRESSING = "Compressing"  # the version's compression Job runs
    PROGRESSING = "Progressing"  # deploying, canary steps, promoting, scaling
    PAUSED = "Paused"  # a manual step, an inconclusive analysis, a failure held by rollback policy Manual
    HEALTHY = "Healthy"  # the spec's version is stable and serves with every replica
    ROLLED_BACK = "RolledBack"  # the spec's version failed; the previous stable serves
    FAILED = "Failed"  # nothing healthy to serve the spec's version with
    DEGRADED = "Degraded"  # the stable serves with fewer ready pods than wanted


class Event(enum.StrEnum):
    """What a pass concluded (exactly one per pass decides the phase)."""

    SPEC_REFUSED = "SpecRefused"  # invalid spec, unsupported source or a child refused, and nothing serves
    SPEC_REFUSED_WHILE_SERVING = "SpecRefusedWhileServing"  # the same while a stable version serves: phase kept
    SOURCE_MISSING = "SourceMissing"  # the model's or the artifacts' volume is missing, and nothing serves
    SOURCE_MISSING_WHILE_SERVING = "SourceMissingWhileServing"
    COMPRESSION_RUNNING = "CompressionRunning"
    VERSION_FAILED = "VersionFailed"  # the spec's version failed (compression, startup) and nothing else serves
    VERSION_ROLLED_BACK = "VersionRolledBack"  # the spec's version failed or was aborted; the stable serves
    DEPLOYING = "Deploying"  # the first version's pods start, or the stable scales
    STEP_PROGRESSING = "StepProgressing"  # canary pods start, a step pauses, analysis runs
    STEP_WAITING_FOR_PROMOTION = "StepWaitingForPromotion"  # a manual step
    ANALYSIS_INCONCLUSIVE = "AnalysisInconclusive"  # no data, or a provider erring within its limit: hold
    FAILURE_HELD = "FailureHeld"  # analysis or startup failed under rollback policy Manual
    ROLLED_BACK = "RolledBack"  # the candidate was rolled back (analysis, startup, abort, rollback-to)
    PROMOTED = "Promoted"  # the candidate (or the first version) became stable
    SERVING = "Serving"  # the stable is the spec's version and every replica is ready
    PODS_LOST = "PodsLost"  # the stable rolled out before and lost ready pods since
    SETTLING = "Settling"  # promoted or serving, but writes remain (the previous stable is scaled down)
    RESTORING = "Restoring"  # rollback-to: the kept version scales up while the current one serves
    WAITING_FOR_CAPACITY = "WaitingForCapacity"  # blue-green: the surge budget cannot hold both versions
    WAITING_FOR_TRAFFIC = "WaitingForTraffic"  # scaled to zero: a new version waits for the model to wake
    TRAFFIC_UNAVAILABLE = "TrafficUnavailable"  # gatewayAPI: the routes cannot carry the rollout; nothing moves


class Reason(enum.StrEnum):
    """Machine-readable reasons: conditions, ``pausedReason``, history entries and Kubernetes Events."""

    # Stalls and pauses
    INVALID_SPEC = "InvalidSpec"
    UNSUPPORTED_MODEL_SOURCE = "UnsupportedModelSource"
    CHILD_REJECTED = "ChildRejected"
    MODEL_VOLUME_MISSING = "ModelVolumeMissing"
    ARTIFACT_VOLUME_MISSING = "ArtifactVolumeMissing"
    COMPRESSION_FAILED = "CompressionFailed"
    MODEL_FETCH_FAILED = "ModelFetchFailed"  # a version's download step fails (its pods retry it with back-off)
    STARTUP_TIMEOUT = "StartupTimeout"
    ANALYSIS_FAILED = "AnalysisFailed"
    ANALYSIS_INCONCLUSIVE = "AnalysisInconclusive"
    MANUAL_STEP = "ManualStep"
    ABORTED = "Aborted"
    MANUAL_ROLLBACK = "ManualRollback"
    REPLACED = "Replaced"
    # spec.rollout.traffic.gatewayAPI: the routes cannot carry the rollout (the stable keeps serving, nothing moves)
    GATEWAY_API_NOT_INSTALLED = "GatewayAPINotInstalled"
    ROUTE_NOT_FOUND = "RouteNotFound"
    ROUTE_NOT_ATTACHED = "RouteNotAttached"
    GATEWAY_NOT_PROGRAMMED = "GatewayNotProgrammed"
    # Conditions
    ROLLED_OUT = "RolledOut"
    AS_EXPECTED = "AsExpected"
    REPLICAS_READY = "ReplicasReady"
    NO_READY_REPLICAS = "NoReadyReplicas"
    ARTIFACT_READY = "ArtifactReady"
    COMPRESSING = "Compressing"
    # Events only
    DEPLOYING = "Deploying"
    COMPRESSED = "Compressed"
    MODEL_FETCHED = "ModelFetched"  # a pod (or a compression Job) downloaded its model, or found it in the node cache
    ROLLOUT_STARTED = "RolloutStarted"
    STEP_READY = "StepReady"
    STEP_COMPLETED = "StepCompleted"
    ROLLED_BACK = "RolledBack"
    PROMOTED = "Promoted"
    PROMOTED_MANUALLY = "PromotedManually"
    RETRYING = "Retrying"
    ROLLBACK_REFUSED = "RollbackRefused"
    DEGRADED = "Degraded"
    RECOVERED = "Recovered"
    ANALYSIS_JOB_STARTED = "AnalysisJobStarted"
    SWITCHED = "Switched"  # blue-green: the active Service moved to the new version
    SWITCHED_BACK = "SwitchedBack"  # blue-green: post-promotion analysis failed, the previous version is active again
    ROLLBACK_STARTED = "RollbackStarted"  # rollback-to a cold version: it scales up before traffic moves
    ROLLBACK_WINDOW_CLOSED = "RollbackWindowClosed"
    INSUFFICIENT_GPUS = "InsufficientGPUs"
    SCALED_TO_ZERO = "ScaledToZero"  # a rollout waits: no pod runs, so no traffic could judge the candidate
    TRAFFIC_RESTORED = "TrafficRestored"  # someone else changed the managed route weights; Shipyard's are back
    SCALER_UNAVAILABLE = "ScalerUnavailable"  # spec.serving.autoscaling cannot be served here (no KEDA, no Prometheus)


class Outcome(enum.StrEnum):
    """A history entry's outcome."""

    PROMOTED = "Promoted"  # became stable
    SUPERSEDED = "Superseded"  # replaced by a newer stable, or by a newer spec before it was promoted
    ROLLED_BACK = "RolledBack"  # failed analysis or startup
    ABORTED = "Aborted"  # manual abort
    FAILED = "Failed"  # compression or other failure


FAILED_OUTCOMES: Final = frozenset({Outcome.ROLLED_BACK, Outcome.FAILED, Outcome.ABORTED})
ALL: Final = frozenset(Phase)
SAME: Final = "same"  # a rule whose target is the phase it starts from


@dataclass(frozen=True)
class Rule:
    sources: frozenset[Phase]
    event: Event
    target: Phase | str  # a Phase, or SAME
    note: str


def _rule(sources: Iterable[Phase], event: Event, target: Phase | str, note: str) -> Rule:
    return Rule(frozenset(sources), event, target, note)


RULES: Final[tuple[Rule, ...]] = (
    _rule(ALL, Event.SPEC_REFUSED, Phase.FAILED, "invalid spec, unsupported source or refused child; nothing serves"),
    _rule(ALL, Event.SPEC_REFUSED_WHILE_SERVING, SAME, "the same while the stable serves: nothing is touched"),
    _rule(ALL, Event.SOURCE_MISSING, Phase.FAILED, "model or artifacts volume missing; nothing serves"),
    _rule(ALL, Event.SOURCE_MISSING_WHILE_SERVING, Phase.PROGRESSING, "the same; the stable serves meanwhile"),
    _rule(ALL, Event.COMPRESSION_RUNNING, Phase.COMPRESSING, "the version's compression Job runs"),
    _rule(ALL, Event.VERSION_FAILED, Phase.FAILED, "compression or startup failed; nothing else serves"),
    _rule(ALL, Event.VERSION_ROLLED_BACK, Phase.ROLLED_BACK, "the spec's version failed before; the stable serves"),
    _rule(ALL, Event.DEPLOYING, Phase.PROGRESSING, "first version's pods start, or the stable scales"),
    _rule(ALL, Event.STEP_PROGRESSING, Phase.PROGRESSING, "canary pods start, a step pauses, analysis runs"),
    _rule(ALL, Event.STEP_WAITING_FOR_PROMOTION, Phase.PAUSED, "a manual step waits for shipyard.dev/promote"),
    _rule(ALL, Event.ANALYSIS_INCONCLUSIVE, Phase.PAUSED, "no data, or a provider erring: hold the step"),
    _rule(ALL, Event.FAILURE_HELD, Phase.PAUSED, "failure held by rollback policy Manual"),
    _rule(ALL, Event.ROLLED_BACK, Phase.ROLLED_BACK, "analysis, startup, abort or rollback-to"),
    _rule(ALL, Event.PROMOTED, Phase.HEALTHY, "the candidate became stable"),
    _rule(ALL, Event.SERVING, Phase.HEALTHY, "every replica of the stable ready"),
    _rule(ALL, Event.SETTLING, Phase.PROGRESSING, "Healthy once nothing is left to write (the old stable scales down)"),
    _rule(ALL, Event.RESTORING, Phase.PROGRESSING, "rollback-to a cold version: it scales up, the current serves"),
    _rule(ALL, Event.WAITING_FOR_CAPACITY, Phase.PAUSED,
          "blue-green needs both versions at full size and the GPU surge budget cannot hold them"),
    _rule(ALL, Event.WAITING_FOR_TRAFFIC, Phase.PAUSED,
          "scaled to zero: a new version waits for the first request to wake the model (a canary needs traffic)"),
    _rule(ALL, Event.TRAFFIC_UNAVAILABLE, Phase.PAUSED,
          "gatewayAPI traffic: the route is missing, unattached or its Gateway not programmed; nothing moves"),
    _rule({Phase.HEALTHY, Phase.DEGRADED}, Event.PODS_LOST, Phase.DEGRADED,
          "a rolled-out stable lost ready pods: its Deployment replaces them"),
    _rule(ALL - {Phase.HEALTHY, Phase.DEGRADED}, Event.PODS_LOST, Phase.PROGRESSING,
          "pods missing before the stable ever rolled out: still deploying"),
)


def _build_table(rules: Iterable[Rule]) -> dict[tuple[Phase, Event], Phase]:
    table: dict[tuple[Phase, Event], Phase] = {}
    for rule in rules:
        for source in rule.sources:
            if (source, rule.event) in table:
                raise ValueError(f"two rules for ({source}, {rule.event})")
            table[(source, rule.event)] = source if rule.target == SAME else Phase(rule.target)
    return table


TRANSITIONS: Final[Mapping[tuple[Phase, Event], Phase]] = _build_table(RULES)


class InvalidTransition(ValueError):
    """A (phase, event) pair the table does not have: a bug in the planner."""


def transition(phase: Phase | str | None, event: Event) -> Phase:
    """The phase after ``event`` in ``phase`` (None or an unknown stored phase: Pending)."""
    try:
        current = Phase(phase) if phase else Phase.PENDING
    except ValueError:
        current = Phase.PENDING
    try:
        return TRANSITIONS[(current, event)]
    except KeyError:
        raise InvalidTransition(f"no transition from {current} on {event}") from None


def build_diagram(rules: Iterable[Rule] = RULES) -> str:
    """The transition table as a Mermaid state diagram and a Markdown table (what docs/operator.md shows)."""
    lines = ["```mermaid", "stateDiagram-v2", "    direction LR", "    [*] --> Pending",
             '    state "any phase" as Any']
    rows = ["| from | event | to | when |", "|---|---|---|---|"]
    for rule in rules:
        everywhere = rule.sources == ALL
        sources = ["Any"] if everywhere else sorted(p.value for p in rule.sources)
        target = "(same)" if rule.target == SAME else str(rule.target)
        for source in sources:
            if rule.target == SAME:
                lines.append(f"    {source} --> {source}: {rule.event.value}")
            else:
                lines.append(f"    {source} --> {target}: {rule.event.value}")
        shown = "any" if everywhere else ", ".join(sources)
        if not everywhere and len(rule.sources) > len(ALL) // 2:
            shown = "any but " + ", ".join(sorted(p.value for p in ALL - rule.sources))
        rows.append(f"| {shown} | {rule.event.value} | {target} | {rule.note} |")
    lines.append("```")
    return "\n".join(lines) + "\n\n" + "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(build_diagram())
