"""What the operator observed of a ModelDeployment's children, as the planner reads it. Pure, no I/O.

The shell keeps the raw bodies of the children Shipyard manages (Deployments, Services, Jobs, PDBs, ConfigMaps and the
pods of Jobs) in its cache; ``build_observed`` turns them into the small views the planner decides on. The decisions
about what a child's status means live here, next to the views: when a Deployment's pods count as ready
(``DeploymentView.ready``), what phase a Job is in and what its pod reported (``build_job_view``: the termination
message, the exit code).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shipyard import contract
from shipyard.operator import egress, naming
from shipyard.operator import traffic as traffic_mod

FETCH_CONTAINER = "fetch"  # the download step's init container (objects.FETCH_CONTAINER)


@dataclass(frozen=True)
class DeploymentView:
    """What the planner needs to know about one observed Deployment of the model."""

    name: str
    version: str
    image: str
    replicas: int
    ready_replicas: int = 0
    available_replicas: int = 0
    updated_replicas: int = 0
    generation: int = 1
    observed_generation: int = 0
    spec_hash: str = ""
    shadow_config: bool = True  # its pods read the shadow settings file (SHIPYARD_SHADOW_CONFIG)

    @property
    def rolled_out(self) -> bool:
        """The Deployment controller has caught up and every desired replica is updated and available."""
        return (
            self.observed_generation >= self.generation
            and self.updated_replicas >= self.replicas
            and self.available_replicas >= self.replicas
        )

    @property
    def ready(self) -> int:
        """Ready pods that count for the current spec (0 while the controller has not caught up)."""
        return self.serving if self.observed_generation >= self.generation else 0

    @property
    def serving(self) -> int:
        """Pods ready and available now, whether or not the controller has caught up with a scale: capacity that
        serves traffic (a scale-up does not stop the pods already running)."""
        return min(self.available_replicas, self.ready_replicas)


@dataclass(frozen=True)
class JobView:
    name: str
    key: str  # the artifact key of a compression Job ("" for an analysis Job)
    phase: str  # Pending | Running | Succeeded | Failed
    message: str = ""  # the pod's termination message (a compression Job's summary, an analysis Job's value)
    spec_hash: str = ""
    exit_code: int | None = None  # of the pod's container that terminated last
    reason: str = ""  # why a failed Job failed (its Failed condition: BackoffLimitExceeded, DeadlineExceeded, ...)
    labels: Mapping[str, str] = field(default_factory=dict)
    fetch_message: str = ""  # what the pod's download step (init container ``fetch``) reported when it succeeded


@dataclass(frozen=True)
class FetchView:
    """The download step (init container ``fetch``) of one serving pod: ``state`` running (not finished yet: also
    while it waits to be retried after a failure), done (exited 0) or failed (its last run exited non-zero; the
    kubelet retries it with back-off); ``message``: its termination message (redacted), the outcome line."""

    pod: str
    version: str
    state: str  # waiting | running | done | failed
    message: str = ""
    restarts: int = 0


@dataclass(frozen=True)
class Observed:
    deployments: Mapping[str, DeploymentView] = field(default_factory=dict)  # by version
    services: Mapping[str, str] = field(default_factory=dict)  # Service name -> spec hash
    jobs: Mapping[str, JobView] = field(default_factory=dict)  # by Job name
    config_maps: Mapping[str, str] = field(default_factory=dict)  # ConfigMap name -> spec hash
    missing_pvc: str | None = None  # the artifacts PVC, when the shell found it missing
    budgets: Mapping[str, str] = field(default_factory=dict)  # PodDisruptionBudget name -> spec hash
    scalers: Mapping[str, ScalerView] = field(default_factory=dict)  # ScaledObject / HPA name -> its view
    # Whether the API server serves KEDA's ScaledObjects (None: not looked up, as when no spec needs it)
    keda: bool | None = None
    activator: DeploymentView | None = None  # the activator's Deployment (scale to zero), not a version's
    # the download steps of the pods of versions whose model is being fetched (listed only then), by version
    fetches: Mapping[str, tuple[FetchView, ...]] = field(default_factory=dict)
    # spec.rollout.traffic.gatewayAPI: the managed routes and their Gateways as read this pass (None: not read)
    traffic: traffic_mod.TrafficObserved | None = None


@dataclass(frozen=True)
class ScalerView:
    """A ScaledObject or HorizontalPodAutoscaler Shipyard owns: its spec hash and status conditions."""

    kind: str
    spec_hash: str
    conditions: tuple[Mapping[str, Any], ...] = ()
    desired_replicas: int | None = None  # the HPA's status.desiredReplicas (the ScaledObject's HPA's, via KEDA)



def build_deployment_view(body: Mapping[str, Any]) -> DeploymentView:
    meta, spec, status = body["metadata"], body.get("spec", {}), body.get("status", {})
    annotations = meta.get("annotations") or {}
    return DeploymentView(
        name=meta["name"],
        version=meta.get("labels", {}).get(naming.LABEL_VERSION, ""),
        image=annotations.get(naming.ANNOTATION_IMAGE, ""),
        replicas=int(spec.get("replicas", 1)),
        ready_replicas=int(status.get("readyReplicas", 0)),
        available_replicas=int(status.get("availableReplicas", 0)),
        updated_replicas=int(status.get("updatedReplicas", 0)),
        generation=int(meta.get("generation", 1)),
        observed_generation=int(status.get("observedGeneration", 0)),
        spec_hash=annotations.get(naming.ANNOTATION_SPEC_HASH, ""),
        shadow_config=any(e.get("name") == contract.ENV_SHADOW_CONFIG
                          for c in ((spec.get("template") or {}).get("spec") or {}).get("containers") or ()
                          for e in c.get("env") or ()),
    )


def build_job_view(body: Mapping[str, Any], pods: Mapping[str, Mapping[str, Any]]) -> JobView:
    """A Job's phase from its conditions, and what its pod reported when it terminated: the termination message
    (redacted: a compression summary, an analysis Job's value) and the exit code, of the container that finished
    last."""
    meta, status = body["metadata"], body.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    if conditions.get("Complete") == "True" or conditions.get("SuccessCriteriaMet") == "True":
        phase = "Succeeded"
    elif conditions.get("Failed") == "True" or conditions.get("FailureTarget") == "True":
        phase = "Failed"
    elif status.get("active"):
        phase = "Running"
    else:
        phase = "Pending"
    message = ""
    fetch_message = ""
    exit_code: int | None = None
    newest = ""
    for pod in pods.values():
        if (pod["metadata"].get("labels") or {}).get("job-name") != meta["name"]:
            continue
        pod_status = pod.get("status") or {}
        for cs in [*(pod_status.get("initContainerStatuses") or []), *(pod_status.get("containerStatuses") or [])]:
            terminated = (cs.get("state") or {}).get("terminated") or {}
            finished = str(terminated.get("finishedAt") or "")
            if terminated and finished >= newest:
                newest = finished
                code = terminated.get("exitCode")
                exit_code = code if isinstance(code, int) and not isinstance(code, bool) else exit_code
                if terminated.get("message"):
                    message = egress.redact_text(str(terminated["message"]).strip())
                    if cs.get("name") == FETCH_CONTAINER and code == 0:
                        fetch_message = message
    failed: Mapping[str, Any] = next((c for c in status.get("conditions") or []
                                      if c.get("type") in ("Failed", "FailureTarget") and c.get("status") == "True"),
                                     {})
    reason = str(failed.get("reason") or "")
    if phase == "Failed" and not message:
        message = egress.redact_text(f"{failed.get('reason', 'Failed')}: {failed.get('message', '')}".strip(": "))
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    return JobView(name=meta["name"], key=labels.get(naming.LABEL_ARTIFACT, ""), phase=phase, message=message,
                   spec_hash=annotations.get(naming.ANNOTATION_SPEC_HASH, ""), exit_code=exit_code, reason=reason,
                   labels=dict(labels), fetch_message=fetch_message)


def build_fetch_view(pod: Mapping[str, Any]) -> FetchView | None:
    """What a serving pod's download step reported (None for a pod without one). Pure."""
    meta, status = pod["metadata"], pod.get("status") or {}
    cs = next((c for c in status.get("initContainerStatuses") or [] if c.get("name") == FETCH_CONTAINER), None)
    if cs is None:
        return None
    state, last = cs.get("state") or {}, cs.get("lastState") or {}
    terminated = state.get("terminated") or {}
    failed_before = last.get("terminated") or {}
    code = terminated.get("exitCode")
    if terminated and code == 0:
        kind, source = "done", terminated
    elif terminated:
        kind, source = "failed", terminated
    elif failed_before and failed_before.get("exitCode") not in (0, None):
        kind, source = "failed", failed_before  # waiting for its retry (back-off), or running it again
    else:
        kind, source = ("running" if "running" in state else "waiting"), {}
    message = egress.redact_text(str(source.get("message") or "").strip())
    return FetchView(pod=str(meta.get("name", "")), version=(meta.get("labels") or {}).get(naming.LABEL_VERSION, ""),
                     state=kind, message=message, restarts=int(cs.get("restartCount") or 0))


def build_fetch_views(pods: Sequence[Mapping[str, Any]]) -> dict[str, tuple[FetchView, ...]]:
    """The download steps of serving pods, by version (label value), in pod name order. Pure."""
    out: dict[str, list[FetchView]] = {}
    for pod in pods:
        if pod["metadata"].get("deletionTimestamp"):
            continue
        view = build_fetch_view(pod)
        if view is not None:
            out.setdefault(view.version, []).append(view)
    return {v: tuple(sorted(views, key=lambda f: f.pod)) for v, views in out.items()}


def build_scaler_view(kind: str, body: Mapping[str, Any]) -> ScalerView:
    status = body.get("status") or {}
    return ScalerView(kind=kind, spec_hash=(body["metadata"].get("annotations") or {}).get(
        naming.ANNOTATION_SPEC_HASH, ""), conditions=tuple(status.get("conditions") or ()),
        desired_replicas=status.get("desiredReplicas"))


def build_observed(children: Mapping[str, Mapping[str, Mapping[str, Any]]], missing_pvc: str | None = None,
                   keda: bool | None = None, fetches: Mapping[str, tuple[FetchView, ...]] | None = None) -> Observed:
    """The planner's view of one model's cached children (kind -> name -> body)."""
    deployments = {}
    activator: DeploymentView | None = None
    for body in (children.get("Deployment") or {}).values():
        view = build_deployment_view(body)
        if (body["metadata"].get("labels") or {}).get(naming.LABEL_COMPONENT) == naming.COMPONENT_ACTIVATOR:
            activator = view
        else:
            deployments[view.version] = view
    services = children.get("Service") or {}
    service_hashes = {name: (body["metadata"].get("annotations") or {}).get(naming.ANNOTATION_SPEC_HASH, "")
                      for name, body in services.items()}
    pods = children.get("Pod") or {}
    jobs = {name: build_job_view(body, pods) for name, body in (children.get("Job") or {}).items()}
    config_maps = {name: (body["metadata"].get("annotations") or {}).get(naming.ANNOTATION_SPEC_HASH, "")
                   for name, body in (children.get("ConfigMap") or {}).items()}
    budgets = {name: (body["metadata"].get("annotations") or {}).get(naming.ANNOTATION_SPEC_HASH, "")
               for name, body in (children.get("PodDisruptionBudget") or {}).items()}
    scalers = {name: build_scaler_view(kind, body) for kind in ("ScaledObject", "HorizontalPodAutoscaler")
               for name, body in (children.get(kind) or {}).items()}
    return Observed(deployments=deployments, services=service_hashes, jobs=jobs, config_maps=config_maps,
                    missing_pvc=missing_pvc, budgets=budgets, scalers=scalers, keda=keda, activator=activator,
                    fetches=fetches or {})
