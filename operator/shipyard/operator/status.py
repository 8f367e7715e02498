"""The ModelDeployment's status: the one definition of the fields the operator writes (its CRD schema). Pure.

The planner builds status as plain dicts (``planning._build_status``); these types are what the CRD's status
schema is generated from (``shipyard.operator.crd``), and a unit test checks every status the planner writes against
that schema, so a field the API server would prune cannot appear. Enumerations come from the state machine
(``rollout``), the evaluator (``analysis.Phase``) and the provider registry.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from shipyard.contract import schema
from shipyard.operator import analysis, rollout
from shipyard.operator.spec import PROVIDER_KEYS

Int64 = Annotated[int, Field(json_schema_extra=schema.k8s(format="int64"))]
Count = Annotated[int, Field(ge=0)]
Time = Annotated[str, Field(json_schema_extra=schema.k8s(format="date-time"))]
NullableTime = Annotated[str, Field(json_schema_extra=schema.k8s(format="date-time", nullable=True))]


def _text(limit: int, *, nullable: bool = False) -> object:
    return Field(max_length=limit, json_schema_extra=schema.k8s(nullable=nullable))


def _enum(values: tuple[str, ...]) -> object:
    return Field(json_schema_extra={"enum": list(values)})


Verdict = Annotated[str, _enum(("Successful", "Failed", "Inconclusive", "Error", "Pending"))]


class Condition(schema.ApiModel):
    """A condition (the shape of metav1.Condition)."""

    type: Annotated[str, Field(max_length=316)]
    """Type of condition in CamelCase."""
    status: Literal["True", "False", "Unknown"]
    """Status of the condition, one of True, False, Unknown."""
    reason: Annotated[str, Field(max_length=1024)] | None = None
    """Programmatic identifier of the reason for the last transition, in CamelCase."""
    message: Annotated[str, Field(max_length=32768)] | None = None
    """Human-readable details of the last transition."""
    last_transition_time: Time | None = None
    """Last time the condition changed status."""
    observed_generation: Annotated[int, Field(ge=0, json_schema_extra=schema.k8s(format="int64"))] | None = None
    """metadata.generation the condition was set for."""


class HistoryEntry(schema.ApiModel):
    """One version's outcome."""

    version: Annotated[str, Field(max_length=256)] | None = None
    """The version (image tag or sha256-<hex>)."""
    image: Annotated[str, Field(max_length=512)] | None = None
    """The full image reference."""
    artifact: Annotated[str, Field(max_length=256)] | None = None
    """Key of the compressed artifact served, if any."""
    outcome: Annotated[str, _enum(tuple(o.value for o in rollout.Outcome))] | None = None
    """Promoted (became stable), Superseded (replaced by a newer stable, or by a newer spec before it was promoted:
    reason Replaced), RolledBack (failed analysis or startup), Aborted (manual abort), Failed (compression or other
    failure)."""
    reason: Annotated[str, Field(max_length=1024)] | None = None
    """Reason of the outcome in CamelCase, e.g. AnalysisFailed."""
    message: Annotated[str, Field(max_length=4096)] | None = None
    """Details of the outcome."""
    time: Time | None = None
    """When the outcome happened."""
    retry: Int64 | None = None
    """spec.retry when the outcome happened (a failed version is retried when it grows)."""
    retried: bool | None = None
    """A failure retried with the shipyard.dev/retry annotation (it no longer blocks the version)."""
    generation: Int64 | None = None
    """metadata.generation when the outcome happened."""


class Artifact(schema.ApiModel):
    """One content-addressed artifact and its compression report."""

    key: Annotated[str, Field(max_length=256)] | None = None
    """Content address, a hash of the source image (digest) and the recipe."""
    version: Annotated[str, Field(max_length=256)] | None = None
    """Version the artifact was made from."""
    path: Annotated[str, Field(max_length=1024)] | None = None
    """Directory of the artifact inside the artifacts volume."""
    digest: Annotated[str, Field(max_length=256)] | None = None
    """Digest of the artifact's content (verified when loaded)."""
    job: Annotated[str, Field(max_length=253)] | None = None
    """Name of the compression Job."""
    attempt: Count | None = None
    """Compression attempts retried with the shipyard.dev/retry annotation (each one runs a new Job, suffixed
    -a<attempt>)."""
    phase: Literal["Pending", "Running", "Succeeded", "Failed"] | None = None
    """State of the artifact's compression."""
    message: Annotated[str, Field(max_length=4096)] | None = None
    """Summary from the Job (the gate's figures on failure)."""
    created_at: Time | None = None
    """When the artifact was completed."""
    source_bytes: Int64 | None = None
    """Size of the source model, bytes."""
    compressed_bytes: Int64 | None = None
    """Size of the artifact, bytes."""
    source_accuracy: float | None = None
    """Accuracy of the source model on the evaluation dataset."""
    compressed_accuracy: float | None = None
    """Accuracy of the compressed model on the evaluation dataset."""
    relative_accuracy_loss: float | None = None
    """(source - compressed) / source accuracy."""
    source_latency_ms: float | None = None
    """p50 latency of the source model at batch 1, milliseconds."""
    compressed_latency_ms: float | None = None
    """p50 latency of the compressed model at batch 1, milliseconds."""


class ModelFetch(schema.ApiModel):
    """The download step of a downloaded model's latest version (s3://, https://, oci://): what its pods reported."""

    version: Annotated[str, Field(max_length=256)] | None = None
    """The version whose pods these figures are of."""
    pods: Annotated[tuple[Annotated[str, Field(max_length=253)], ...], Field(
        max_length=64, json_schema_extra=schema.k8s(list_type="atomic"))] | None = None
    """Pods whose download finished (the latest 64), each told by a ModelFetched Event."""
    downloads: Count | None = None
    """Pods that downloaded the model (node cache misses, or no node cache)."""
    cache_hits: Count | None = None
    """Pods that found the model in their node's cache (nothing downloaded)."""
    downloaded_bytes: Int64 | None = None
    """Bytes downloaded by those pods together."""
    bytes: Int64 | None = None
    """Size of the model, bytes."""
    seconds: float | None = None
    """Duration of the latest download step, seconds."""
    digest: Annotated[str, Field(max_length=128)] | None = None
    """sha256 digest of the model's content as downloaded (the manifest digest for oci://)."""
    fetched_at: Time | None = None
    """When the latest download step was seen finished."""
    failure: Annotated[str, _text(1024, nullable=True)] | None = None
    """What the latest failed download step said (access denied, not found, digest mismatch...), null when none."""


NullableNumber = Annotated[float, Field(json_schema_extra=schema.k8s(nullable=True))]


class MetricSample(schema.ApiModel):
    """One measurement of a metric in its recent series (what the dashboard charts)."""

    time: Time | None = None
    """When the measurement was taken."""
    value: NullableNumber | None = None
    """Value measured for the candidate; null without data or on an error."""
    stable_value: NullableNumber | None = None
    """Value measured for the stable (metrics compared with the stable); null otherwise."""
    verdict: Annotated[str, _enum(("Successful", "Failed", "Inconclusive", "Error", "Skipped"))] | None = None
    """Verdict of the measurement; Skipped: no data under noData: Ignore (not counted)."""


class MetricResult(schema.ApiModel):
    """Results of one metric."""

    name: Annotated[str, Field(max_length=63)] | None = None
    """Name of the metric."""
    provider: Annotated[str, _enum(PROVIDER_KEYS)] | None = None
    """Provider of the metric (its field in the spec)."""
    query: Annotated[str, Field(max_length=4096)] | None = None
    """The resolved query (templates replaced), the scraped metric, the request or the Job measured."""
    last_value: NullableNumber | None = None
    """Last measured value of the candidate."""
    stable_value: NullableNumber | None = None
    """Last measured value of the stable (for comparisons with the stable)."""
    verdict: Verdict | None = None
    """Verdict of the last measurement."""
    message: Annotated[str, Field(max_length=4096)] | None = None
    """Details of the last measurement (e.g. the provider's error)."""
    successes: Count | None = None
    """Successful measurements."""
    failures: Count | None = None
    """Failed measurements."""
    inconclusive: Count | None = None
    """Inconclusive measurements."""
    errors: Count | None = None
    """Error measurements."""
    consecutive_errors: Count | None = None
    """Error measurements in a row."""
    measurements: Count | None = None
    """Measurements folded in, ignored ones (noData: Ignore) included; a job metric's next Job is run number
    measurements."""
    last_measured_at: Time | None = None
    """When the last measurement was taken."""
    figures: Annotated[dict[str, float], Field(json_schema_extra=schema.k8s(max_properties=16))] | None = None
    """Counts measured beside the value (builtin predictionAgreement: the stable's copies to the candidate by outcome,
    compared, dropped, timeout and error, and compared rows), as of the last measurement that had them."""
    history: Annotated[tuple[MetricSample, ...], Field(max_length=analysis.METRIC_HISTORY_LIMIT,
                                                       json_schema_extra=schema.k8s(list_type="atomic"))] | None = None
    """The recent measurements, oldest first: the last 30, Skipped ones included."""


class AnalysisStatus(schema.ApiModel):
    """The candidate's current analysis."""

    version: Annotated[str, Field(max_length=256)] | None = None
    """Version analysed."""
    phase: Annotated[str, _enum(("Pending", "Running", "Successful", "Failed", "Inconclusive", "Error"))] | None = None
    """Overall verdict so far."""
    started_at: Time | None = None
    """When the analysis started (candidate Ready)."""
    detection_bound_seconds: float | None = None
    """Worst-case time from a failing candidate to rollback, initialDelay + (failureLimit + 1) x (interval + the
    longest job metric's activeDeadlineSeconds)."""
    message: Annotated[str, Field(max_length=4096)] | None = None
    """Summary of the verdict."""
    metrics: Annotated[tuple[MetricResult, ...], Field(max_length=16, json_schema_extra=schema.k8s(
        list_type="atomic"))] | None = None
    """Per-metric results."""


class Replicas(schema.ApiModel):
    """Replica counts."""

    desired: Count | None = None
    """Replicas to run: spec.serving.replicas (which a scaler writes), within spec.serving.autoscaling's bounds."""
    current: Count | None = None
    """Pods of the versions taking traffic (stable and candidate), as their Deployments ask for now: the scale
    subresource's status.replicas."""
    stable: Count | None = None
    """Desired replicas of the stable version."""
    candidate: Count | None = None
    """Desired replicas of the candidate version."""
    ready: Count | None = None
    """Ready replicas over all live versions."""


class Controls(schema.ApiModel):
    """Values of the manual-control annotations already acted upon, so that each is acted upon once (the operator
    never writes spec or annotations)."""

    promote: Annotated[str, Field(max_length=256)] | None = None
    """Last shipyard.dev/promote value acted upon."""
    abort: Annotated[str, Field(max_length=256)] | None = None
    """Last shipyard.dev/abort value acted upon."""
    retry: Annotated[str, Field(max_length=256)] | None = None
    """Last shipyard.dev/retry value acted upon."""
    rollback_to: Annotated[str, Field(max_length=256)] | None = None
    """Last shipyard.dev/rollback-to value acted upon."""


class RollbackWindow(schema.ApiModel):
    """The previous stable kept serving-ready after a promotion (spec.rollout.scaleDownDelaySeconds)."""

    version: Annotated[str, Field(max_length=256)]
    """The previous stable version."""
    image: Annotated[str, Field(max_length=512)] | None = None
    """Its image."""
    until: Time
    """When its pods are scaled down."""


class Restoring(schema.ApiModel):
    """A shipyard.dev/rollback-to whose version is being scaled up before traffic moves to it."""

    version: Annotated[str, Field(max_length=256)]
    """The version rolled back to."""
    image: Annotated[str, Field(max_length=512)] | None = None
    """Its image."""
    since: Time
    """When it started scaling up (its startupTimeoutSeconds counts from here)."""


class AutoscalingStatus(schema.ApiModel):
    """The scaler of spec.serving.autoscaling (its health is the Autoscaling condition)."""

    provider: Annotated[str, Field(max_length=16)] | None = None
    """keda or hpa."""
    scaler: Annotated[str, Field(max_length=128)] | None = None
    """The object Shipyard owns: ScaledObject/<name> or HorizontalPodAutoscaler/<name>."""
    metric: Annotated[str, Field(max_length=32)] | None = None
    """The metric it scales on."""
    target: float | None = None
    """Its target per pod."""
    min_replicas: Count | None = None
    """Fewest replicas."""
    max_replicas: Count | None = None
    """Most replicas."""
    activator: Annotated[str, Field(max_length=128)] | None = None
    """minReplicas 0: the activator's Deployment, which holds requests while no model pod is Ready."""
    routes_to_activator: bool | None = None
    """True while the model's Service selects the activator (scaled to zero, or waking up)."""


class TrafficPreview(schema.ApiModel):
    """The preview rule: requests with this header and value reach the candidate only."""

    header: Annotated[str, Field(max_length=256)]
    """Header name."""
    version: Annotated[str, Field(max_length=256)]
    """Its value: the candidate's version."""


class TrafficStatus(schema.ApiModel):
    """Traffic through Gateway API routes (spec.rollout.traffic.gatewayAPI)."""

    http_route: Annotated[str, Field(max_length=253)] | None = Field(default=None, alias="httpRoute")
    """The HTTPRoute whose managed rules carry the model's traffic."""
    grpc_route: Annotated[str, Field(max_length=253)] | None = Field(default=None, alias="grpcRoute")
    """The GRPCRoute, when one is managed too."""
    stable_weight: Annotated[int, Field(ge=0, le=100)] | None = None
    """Percentage the stable version (the model's Service) gets in the managed rules."""
    canary_weight: Annotated[int, Field(ge=0, le=100)] | None = None
    """Percentage the candidate's Service gets (0 at rest)."""
    preview: TrafficPreview | None = None
    """The preview rule while a candidate is Ready; absent otherwise."""
    programmed: bool | None = None
    """Whether the Gateway controller has acted on the routes as Shipyard last wrote them (observedGeneration) and
    the settle time since the write has passed."""
    changed_at: Time | None = None
    """When Shipyard last wrote the routes' rules."""
    message: Annotated[str, Field(max_length=1024)] | None = None
    """Why the routes cannot carry the rollout, when they cannot."""


class ShadowStatus(schema.ApiModel):
    """The shadow step running now (spec.rollout.steps[0].shadow), from the latest predictionAgreement measurement."""

    candidate: Annotated[str, Field(max_length=256)] | None = None
    """The candidate version the stable's pods copy requests to."""
    url: Annotated[str, Field(max_length=512)] | None = None
    """The candidate's own Service the copies go to."""
    percent: Annotated[int, Field(ge=0, le=100)] | None = None
    """Share of the stable's answered requests copied."""
    compared: Count | None = None
    """Copies whose two answers were compared (summed over the stable's pods, since shadowing to the candidate
    began); what minRequests counts."""
    dropped: Count | None = None
    """Copies not sent: too many in flight."""
    timeouts: Count | None = None
    """Copies the candidate did not answer in time."""
    errors: Count | None = None
    """Copies the candidate failed, or answered with something that cannot be compared (or was down)."""
    agreement: NullableNumber | None = None
    """The last predictionAgreement measured: agreeing rows / compared rows over the interval; null without data."""
    min_requests: Count | None = None
    """The step's minRequests, when set."""
    until: NullableTime | None = None
    """When the step's duration is over (from the candidate's pods being Ready), when set."""


class ModelDeploymentStatus(schema.ApiModel):
    """Observed state, written by the operator only."""

    observed_generation: Int64 | None = None
    """metadata.generation of the spec this status describes."""
    phase: Annotated[str, _enum(tuple(p.value for p in rollout.Phase))] | None = None
    """Pending (nothing served yet), Compressing (compression Job running), Progressing (canary steps), Paused
    (waiting at a manual step or for a manual decision), Healthy (stable serving the spec's version), RolledBack (the
    spec's version failed, the previous stable serves), Failed (nothing healthy to serve), Degraded (stable serving
    with fewer ready pods than wanted). The transitions: docs/operator.md."""
    message: Annotated[str, Field(max_length=4096)] | None = None
    """Human-readable summary of the current state."""
    stable_version: Annotated[str, _text(256, nullable=True)] | None = None
    """Version serving as stable (receives all traffic at rest)."""
    stable_image: Annotated[str, _text(512, nullable=True)] | None = None
    """Image of the stable version."""
    candidate_version: Annotated[str, _text(256, nullable=True)] | None = None
    """Version being rolled out; null when none."""
    candidate_image: Annotated[str, _text(512, nullable=True)] | None = None
    """Image of the candidate version."""
    current_step_index: Annotated[int, Field(ge=0, json_schema_extra=schema.k8s(nullable=True))] | None = None
    """Index in spec.rollout.steps of the candidate's current step."""
    step_started_at: NullableTime | None = None
    """When the current step started (its startupTimeoutSeconds counts from here)."""
    step_ready_at: NullableTime | None = None
    """When the current step's candidate pods were all ready (its pause counts from here)."""
    active_version: Annotated[str, _text(256, nullable=True)] | None = None
    """The version the model's Service sends traffic to; null while a canary splits it between the candidate and
    the stable by ready pods."""
    preview_version: Annotated[str, _text(256, nullable=True)] | None = None
    """Blue-green: the version behind the preview Service (<name>-preview); null when none."""
    rollback_window: Annotated[RollbackWindow, Field(json_schema_extra=schema.k8s(nullable=True))] | None = None
    """The previous stable, kept Ready for an instant shipyard.dev/rollback-to until ``until``; null when none."""
    restoring: Annotated[Restoring, Field(json_schema_extra=schema.k8s(nullable=True))] | None = None
    """A rollback-to in progress: the kept version scales up while the current one keeps serving."""
    paused_reason: Annotated[str, _text(1024, nullable=True)] | None = None
    """Why the rollout is paused (manual step, manual rollback policy, inconclusive analysis)."""
    conditions: Annotated[tuple[Condition, ...], Field(max_length=32, json_schema_extra=schema.k8s(
        list_type="map", list_map_keys=["type"]))] | None = None
    """kstatus conditions Ready, Reconciling, Stalled and domain conditions such as Compressed and Serving."""
    history: Annotated[tuple[HistoryEntry, ...], Field(max_length=128, json_schema_extra=schema.k8s(
        list_type="atomic"))] | None = None
    """Versions rolled out, oldest first."""
    artifacts: Annotated[tuple[Artifact, ...], Field(max_length=64, json_schema_extra=schema.k8s(
        list_type="atomic"))] | None = None
    """Compressed artifacts of the versions in use or in history."""
    analysis: Annotated[AnalysisStatus, Field(json_schema_extra=schema.k8s(nullable=True))] | None = None
    """The candidate's current analysis."""
    shadow: Annotated[ShadowStatus, Field(json_schema_extra=schema.k8s(nullable=True))] | None = None
    """The shadow step running now: the candidate, the copies by outcome and the agreement; null otherwise."""
    replicas: Replicas | None = None
    """Replica counts."""
    selector: Annotated[str, Field(max_length=1024)] | None = None
    """Label selector of the model's serving pods (the scale subresource's, for HorizontalPodAutoscalers)."""
    autoscaling: Annotated[AutoscalingStatus, Field(json_schema_extra=schema.k8s(nullable=True))] | None = None
    """The scaler of spec.serving.autoscaling; null without autoscaling."""
    model_fetch: Annotated[ModelFetch, Field(json_schema_extra=schema.k8s(nullable=True))] | None = None
    """The download step of a model in s3://, https:// or oci:// (the latest version's pods); null for other models."""
    traffic: Annotated[TrafficStatus, Field(json_schema_extra=schema.k8s(nullable=True))] | None = None
    """Weights and preview of Gateway API traffic; null with replicas traffic."""
    controls: Controls | None = None
    """Values of the manual-control annotations already acted upon, so that each is acted upon once (the operator
    never writes spec or annotations)."""
