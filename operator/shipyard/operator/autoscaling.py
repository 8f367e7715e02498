"""Autoscaling of a ModelDeployment (``spec.serving.autoscaling``): its types, the scaler object Shipyard owns (a KEDA
``ScaledObject`` with a Prometheus trigger, or an ``autoscaling/v2`` HorizontalPodAutoscaler), and what the scaler's
status says. Pure.

Both scalers target the ModelDeployment's ``scale`` subresource (``spec.serving.replicas``), never a version's
Deployment: the planner splits that one number between the stable and the candidate, so a scale-up in the middle of
a canary grows both by the step's weight and each Deployment has one writer (the operator).

Metric targets are per pod: the scaler's query sums the model's pods and the HPA divides by the target
(``AverageValue``), so ``desired = ceil(sum / target)``, clamped to [minReplicas, maxReplicas].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Final, Literal, TypeAlias

from pydantic import Field

from shipyard import contract
from shipyard.contract import schema
from shipyard.operator import naming

KEDA_API: Final = "keda.sh/v1alpha1"
SCALED_OBJECT: Final = "ScaledObject"
HPA_API: Final = "autoscaling/v2"
HPA: Final = "HorizontalPodAutoscaler"
FALLBACK_FAILURES: Final = 3  # failed metric reads before KEDA holds the current replicas
ACTIVATION_TRIGGER: Final = "activator"  # the ScaledObject trigger on the requests the activator holds

ScalingMetric: TypeAlias = Literal["inflightRequests", "queueDepth", "requestRate", "gpuUtilization", "cpu"]
Provider: TypeAlias = Literal["keda", "hpa"]
PERCENT_METRICS: Final = ("gpuUtilization", "cpu")


class ScalingPolicy(schema.ApiModel):
    """How much may change within a period (as in an HPA's behavior)."""

    type: Literal["Pods", "Percent"]
    """Pods: at most value pods; Percent: at most value % of the current replicas."""
    value: Annotated[int, Field(ge=1, le=10000)]
    """The amount."""
    period_seconds: Annotated[int, Field(ge=1, le=1800)] = 60
    """The window the policy holds over, in seconds. Default 60."""


class ScalingRules(schema.ApiModel):
    """Scaling in one direction."""

    stabilization_window_seconds: Annotated[int, Field(ge=0, le=3600)] | None = None
    """The highest (scale-down) or lowest (scale-up) recommendation of this window is used, so that a short dip or
    spike does not move replicas. Default: the HPA's (0 s up, 300 s down)."""
    policies: Annotated[tuple[ScalingPolicy, ...], Field(max_length=4, json_schema_extra=schema.k8s(
        list_type="atomic"))] | None = None
    """Rate limits; the one allowing the most change applies (selectPolicy Max)."""

    def as_k8s(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.stabilization_window_seconds is not None:
            out["stabilizationWindowSeconds"] = self.stabilization_window_seconds
        if self.policies:
            out["policies"] = [{"type": p.type, "value": p.value, "periodSeconds": p.period_seconds}
                               for p in self.policies]
        return out


class Behavior(schema.ApiModel):
    """The scaler's behavior (autoscaling/v2 HorizontalPodAutoscalerBehavior)."""

    scale_up: ScalingRules | None = None
    scale_down: ScalingRules | None = None

    def as_k8s(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.scale_up is not None:
            out["scaleUp"] = self.scale_up.as_k8s()
        if self.scale_down is not None:
            out["scaleDown"] = self.scale_down.as_k8s()
        return out


class Autoscaling(schema.ApiModel):
    """Load-driven replicas: a scaler sets spec.serving.replicas through the scale subresource within [minReplicas,
    maxReplicas] from a metric of the model's pods; the planner splits it between the versions."""

    __constraints__ = (schema.not_above("minReplicas", "maxReplicas", what="spec.serving.autoscaling"),)
    __cel__ = (
        schema.Cel("!has(self.provider) || self.provider != 'hpa' || !has(self.minReplicas) || self.minReplicas >= 1",
                   "spec.serving.autoscaling.minReplicas 0 (scale to zero) needs provider keda: a "
                   "HorizontalPodAutoscaler does not scale to zero", field_path=".minReplicas"),
        schema.Cel("!has(self.metric) || !(self.metric in ['gpuUtilization', 'cpu']) || self.target <= 100.0",
                   "spec.serving.autoscaling.target of gpuUtilization and cpu is a percentage (at most 100)",
                   field_path=".target"),
    )

    provider: Provider = "keda"
    """keda: a KEDA ScaledObject with a Prometheus trigger on the operator's Prometheus (--prometheus-address); it can
    scale to zero. hpa: an autoscaling/v2 HorizontalPodAutoscaler (cpu from the resource metrics API, the other
    metrics as Pods metrics from a custom metrics API such as prometheus-adapter). Default keda."""
    min_replicas: Annotated[int, Field(ge=0, le=1000)] = 1
    """Fewest replicas; 0 scales to zero when idle (keda only). Default 1."""
    max_replicas: Annotated[int, Field(ge=1, le=1000)]
    """Most replicas."""
    metric: ScalingMetric = "inflightRequests"
    """What drives the replicas: inflightRequests (requests received and not answered, per pod), queueDepth
    (requests waiting for a batch, per pod), requestRate (inference requests per second, per pod), gpuUtilization
    (average GPU utilisation, %), cpu (average CPU use, % of each pod's CPU request). Default inflightRequests."""
    target: Annotated[float, Field(gt=0, le=1000000)]
    """The value of the metric per pod to hold (a percentage for gpuUtilization and cpu)."""
    rate_window_seconds: Annotated[int, Field(ge=5, le=600)] = 60
    """The range of rate() in the requestRate and cpu queries: at least 4 scrapes of the Prometheus (60 s at its usual
    15 s); shorter reacts faster. Default 60."""
    polling_interval_seconds: Annotated[int, Field(ge=1, le=3600)] = 15
    """keda: how often the metric is read. Default 15."""
    cooldown_seconds: Annotated[int, Field(ge=0, le=86400)] = 300
    """keda: how long the metric must stay at 0 before scaling to zero (minReplicas 0). Default 300."""
    behavior: Behavior | None = None
    """Stabilisation windows and rate limits of scaling up and down."""


def plan_replicas(replicas: int, autoscaling: Autoscaling | None) -> int:
    """The replicas the planner splits between versions: spec.serving.replicas, which the scaler writes, brought into
    [minReplicas, maxReplicas] (a manifest's default of 1 below minReplicas is raised before the scaler's first
    decision). Pure."""
    if autoscaling is None:
        return replicas
    return max(autoscaling.min_replicas, min(replicas, autoscaling.max_replicas))


def build_selector(model: str) -> str:
    """The label selector (string form) of the model's serving pods: the scale subresource's, for the HPA."""
    return ",".join(f"{k}={v}" for k, v in naming.build_selector_labels(model).items())


def build_query(metric: ScalingMetric, namespace: str, served_model: str, cpu_request_cores: float | None = None,
                namespace_label: str = "namespace", window_seconds: int = 60) -> str:
    """PromQL of the model's total of ``metric`` over its pods (every version). Pure.

    ``cpu``: the pods' CPU use as a percentage of one pod's request, summed (``cpu_request_cores`` required)."""
    selector = ("{" + f'{namespace_label}="{_escape(namespace)}",{contract.LABEL_MODEL}="{_escape(served_model)}"'
                + "}")
    if metric == "inflightRequests":
        return f"sum({contract.METRIC_INFLIGHT}{selector})"
    if metric == "queueDepth":
        return f"sum({contract.METRIC_QUEUE_DEPTH}{selector})"
    if metric == "requestRate":
        return f"sum(rate({contract.METRIC_REQUESTS_TOTAL}{selector}[{window_seconds}s]))"
    if metric == "gpuUtilization":
        return f"100 * sum({contract.METRIC_GPU_UTILIZATION}{selector})"
    if metric == "cpu":
        if not cpu_request_cores:
            raise ValueError("the cpu metric needs the pods' CPU request")
        return f"100 * sum(rate({contract.METRIC_CPU_SECONDS}{selector}[{window_seconds}s])) / {cpu_request_cores:g}"
    raise ValueError(f"unknown metric {metric!r}")


def build_activation_query(namespace: str, served_model: str, namespace_label: str = "namespace") -> str:
    """PromQL of the requests the model's activator holds (scale from zero: its pods' own metrics are gone). Pure."""
    return (f'sum({contract.METRIC_ACTIVATOR_PENDING}{{{namespace_label}="{_escape(namespace)}",'
            f'{contract.LABEL_MODEL}="{_escape(served_model)}"}})')


def build_query_with_activator(query: str, activation_query: str) -> str:
    """The metric's query of a model that scales to zero: the pods' total, or 0 where the pods have no series but the
    activator reports (the model is at zero: idle, not missing data). Pure.

    KEDA (2.21) counts a trigger whose failures passed the fallback threshold as *active*, so a bare pods' query,
    empty at zero pods, would wake the model every few polls and the cooldown would put it back: a flap. Prometheus
    down, or neither series there, is still an error: held above zero, woken at zero (the safe side: the activator's
    held requests cannot be seen then)."""
    return f"({query}) or on() (0 * {activation_query})"


def build_activation_threshold(autoscaling: Autoscaling) -> float:
    """The activation trigger's per-pod target: held requests are requests in flight, so for inflightRequests and
    queueDepth the metric's own target (a burst of 20 held requests at a target of 4 wakes 5 pods at once); for the
    other metrics held requests mean nothing per pod, and the trigger only wakes the model (one pod), the metric's
    own trigger scaling it from there. Pure."""
    if autoscaling.metric in ("inflightRequests", "queueDepth"):
        return autoscaling.target
    return ACTIVATION_ONLY_TARGET


ACTIVATION_ONLY_TARGET: Final = 1000000.0  # ceil(held / this) = 1 pod: the trigger activates, never sizes


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def build_scaled_object(object_meta: dict[str, Any], model: str, autoscaling: Autoscaling, query: str,
                        prometheus: str, activation_query: str | None = None) -> dict[str, Any]:
    """The KEDA ScaledObject targeting the ModelDeployment's scale subresource. Pure.

    A failed or empty read of the metric (Prometheus down, no series) is an error, not 0 (``ignoreNullValues``
    false), and after ``FALLBACK_FAILURES`` of them KEDA holds the current replicas (``fallback.behavior
    currentReplicas``; its ``replicas``, required, is then unused): missing data never scales to zero. Nothing in it
    follows the replicas the scaler writes, so the operator never rewrites it as load changes.

    ``activation_query`` (minReplicas 0 with an activator): a second trigger on the requests the activator holds,
    the signal that exists at zero pods; KEDA scales from zero when any trigger is active. ``query`` is then
    ``build_query_with_activator``'s, which reads 0 at zero pods rather than failing. Without an activation query
    minReplicas 0 is raised to 1: nothing could bring the model back."""
    spec: dict[str, Any] = {
        "scaleTargetRef": {"apiVersion": f"{naming.GROUP}/{naming.VERSION}", "kind": naming.KIND, "name": model},
        "minReplicaCount": autoscaling.min_replicas if activation_query is not None else max(
            1, autoscaling.min_replicas),
        "maxReplicaCount": autoscaling.max_replicas,
        "pollingInterval": autoscaling.polling_interval_seconds,
        "cooldownPeriod": autoscaling.cooldown_seconds,
        "fallback": {"failureThreshold": FALLBACK_FAILURES, "replicas": max(1, autoscaling.min_replicas),
                     "behavior": "currentReplicas"},
        "triggers": [{
            "type": "prometheus",
            "metricType": "AverageValue",
            "metadata": {"serverAddress": prometheus, "query": query, "threshold": f"{autoscaling.target:g}",
                         "activationThreshold": "0", "ignoreNullValues": "false"},
        }],
    }
    if activation_query is not None:
        # A new model stays up one cooldown before its first sleep (KEDA's default 0 would put a model that no
        # request reached yet to sleep the moment it is Ready).
        spec["initialCooldownPeriod"] = autoscaling.cooldown_seconds
        spec["triggers"].append({
            "type": "prometheus",
            "name": ACTIVATION_TRIGGER,
            "metricType": "AverageValue",
            "metadata": {"serverAddress": prometheus, "query": activation_query,
                         "threshold": f"{build_activation_threshold(autoscaling):g}", "activationThreshold": "0",
                         "ignoreNullValues": "false"},
        })
    if autoscaling.behavior is not None:
        spec["advanced"] = {"horizontalPodAutoscalerConfig": {"behavior": autoscaling.behavior.as_k8s()}}
    return {"apiVersion": KEDA_API, "kind": SCALED_OBJECT, "metadata": object_meta, "spec": spec}


# The Pods metric names a custom metrics adapter serves for the hpa provider (docs/autoscaling.md has the
# prometheus-adapter rules that produce them from the runtime's metrics).
HPA_POD_METRICS: Final[Mapping[str, str]] = {
    "inflightRequests": contract.METRIC_INFLIGHT,
    "queueDepth": contract.METRIC_QUEUE_DEPTH,
    "requestRate": "shipyard_requests_per_second",
    "gpuUtilization": "shipyard_gpu_utilization_percent",
}


def build_hpa(object_meta: dict[str, Any], model: str, autoscaling: Autoscaling) -> dict[str, Any]:
    """The autoscaling/v2 HorizontalPodAutoscaler targeting the ModelDeployment's scale subresource. Pure."""
    if autoscaling.metric == "cpu":
        metric: dict[str, Any] = {"type": "Resource", "resource": {
            "name": "cpu", "target": {"type": "Utilization", "averageUtilization": round(autoscaling.target)}}}
    else:
        metric = {"type": "Pods", "pods": {
            "metric": {"name": HPA_POD_METRICS[autoscaling.metric]},
            "target": {"type": "AverageValue", "averageValue": f"{autoscaling.target:g}"}}}
    spec: dict[str, Any] = {
        "scaleTargetRef": {"apiVersion": f"{naming.GROUP}/{naming.VERSION}", "kind": naming.KIND, "name": model},
        "minReplicas": max(1, autoscaling.min_replicas),
        "maxReplicas": autoscaling.max_replicas,
        "metrics": [metric],
    }
    if autoscaling.behavior is not None:
        spec["behavior"] = autoscaling.behavior.as_k8s()
    return {"apiVersion": HPA_API, "kind": HPA, "metadata": object_meta, "spec": spec}


def assess_scaler(kind: str, conditions: Sequence[Mapping[str, Any]],
                  at_zero: bool = False) -> tuple[bool | None, str, str]:
    """(ok, reason, message) of the scaler from its status conditions; ok None: no verdict yet. Pure.

    ScaledObject: Ready False (e.g. its trigger cannot be read) or Fallback True (the metric failed
    FALLBACK_FAILURES times: replicas held) is not ok; ready ``at_zero`` (scaled to zero with an activator) says so.
    HPA: ScalingActive False (no metrics) or AbleToScale False."""
    by_type = {str(c.get("type")): c for c in conditions}

    def text(c: Mapping[str, Any]) -> str:
        return str(c.get("message") or c.get("reason") or "")[:512]

    if kind == SCALED_OBJECT:
        fallback, ready = by_type.get("Fallback"), by_type.get("Ready")
        if fallback is not None and fallback.get("status") == "True":
            return False, "MetricUnavailable", f"replicas held: {text(fallback)}"
        if ready is None or ready.get("status") == "Unknown":
            return None, "ScalerPending", "the ScaledObject has no verdict yet"
        if ready.get("status") != "True":
            return False, "ScalerNotReady", text(ready)
        if at_zero:
            return True, "ScaledToZero", "scaled to zero: the activator holds requests and wakes the model"
        active = by_type.get("Active")
        state = "active" if active is not None and active.get("status") == "True" else "idle"
        return True, "ScalerReady", f"KEDA scales on the metric ({state})"
    for type_ in ("AbleToScale", "ScalingActive"):
        c = by_type.get(type_)
        if c is not None and c.get("status") == "False":
            reason = "MetricUnavailable" if type_ == "ScalingActive" else "ScalerNotReady"
            return False, reason, f"replicas held: {text(c)}"
    if "ScalingActive" not in by_type:
        return None, "ScalerPending", "the HorizontalPodAutoscaler has no verdict yet"
    return True, "ScalerReady", "the HorizontalPodAutoscaler scales on the metric"
