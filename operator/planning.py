"""Pure reconciliation planning: (ModelDeployment, observed children, previous status, now) -> Plan. No I/O.

The rollout is a state machine held in ``status``; every decision here is a function of the spec, the observed
cluster and the clock passed in, so a restarted operator continues where it stopped and a repeated call with
the same inputs plans nothing new (level-triggered, idempotent).

Versions: the image tag is the version. Each live version has its own Deployment (``<model>-<version>``);
a Service selects every serving pod of the model, so traffic is split by ready replicas. A new tag starts a
candidate next to the stable version; once the candidate is fully available it is promoted: it becomes
stable and the previous stable version is scaled to zero and kept (up to ``revisionHistoryLimit``) for an
instant rollback.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shipyard.operator import contract, naming
from shipyard.operator import spec as spec_mod

CONDITION_TYPES = ("Ready", "Reconciling", "Stalled", "Serving")
HISTORY_MAX = 50


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

    @property
    def rolled_out(self) -> bool:
        """The Deployment controller has caught up and every desired replica is updated and available."""
        return (
            self.observed_generation >= self.generation
            and self.updated_replicas >= self.replicas
            and self.available_replicas >= self.replicas
        )


@dataclass(frozen=True)
class Observed:
    deployments: Mapping[str, DeploymentView] = field(default_factory=dict)  # by version
    service_hash: str | None = None  # None: no Service yet


@dataclass(frozen=True)
class EventSpec:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Plan:
    apply: tuple[dict[str, Any], ...]
    delete: tuple[tuple[str, str, str], ...]  # (apiVersion, kind, name)
    status: dict[str, Any]
    events: tuple[EventSpec, ...]
    requeue_after: float | None
    scale: tuple[tuple[str, int], ...] = ()  # (Deployment name, replicas) of versions other than the target


@dataclass(frozen=True)
class Meta:
    name: str
    namespace: str
    uid: str
    generation: int


def build_meta(body: Mapping[str, Any]) -> Meta:
    m = body["metadata"]
    return Meta(name=m["name"], namespace=m["namespace"], uid=m.get("uid", ""), generation=int(m.get("generation", 1)))


def build_timestamp(now: datetime.datetime) -> str:
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_spec_hash(obj: Mapping[str, Any]) -> str:
    """A stable hash of what Shipyard applies, stored on the object so that unchanged objects are not re-applied."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def build_owner_reference(meta: Meta) -> dict[str, Any]:
    return {
        "apiVersion": naming.API_VERSION,
        "kind": naming.KIND,
        "name": meta.name,
        "uid": meta.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _with_hash(obj: dict[str, Any]) -> dict[str, Any]:
    obj["metadata"].setdefault("annotations", {})[naming.ANNOTATION_SPEC_HASH] = build_spec_hash(obj)
    return obj


def build_pod_env(md: spec_mod.ModelDeployment, version: str) -> list[dict[str, Any]]:
    spec = md.spec
    env = [
        {"name": contract.ENV_MODEL_NAME, "value": md.served_model_name},
        {"name": contract.ENV_MODEL_VERSION, "value": version},
        {"name": contract.ENV_ARTIFACT_PATH, "value": build_artifact_path(spec)},
    ]
    batching = spec.serving.batching
    env.append({"name": contract.ENV_MAX_BATCH_SIZE, "value": str(batching.max_batch_size)})
    env.append({"name": contract.ENV_MAX_DELAY_MS, "value": str(batching.max_delay_ms)})
    return env


def build_artifact_path(spec: spec_mod.ModelDeploymentSpec) -> str:
    """Where the serving container finds its model: the source model path inside the image."""
    return spec.model.path or contract.ARTIFACTS_MOUNT


def build_deployment(meta: Meta, md: spec_mod.ModelDeployment, version: str, image: str,
                     replicas: int) -> dict[str, Any]:
    spec = md.spec
    labels = naming.build_version_labels(meta.name, version)
    probe = {"port": contract.SERVING_PORT_NAME}
    container: dict[str, Any] = {
        "name": "server",
        "image": image,
        "command": [contract.RUNTIME_COMMAND, contract.SERVE_SUBCOMMAND, "--port", str(contract.SERVING_PORT)],
        "env": build_pod_env(md, version),
        "ports": [{"name": contract.SERVING_PORT_NAME, "containerPort": contract.SERVING_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": contract.PATH_READY, **probe}, "periodSeconds": 2,
                           "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": contract.PATH_LIVE, **probe}, "periodSeconds": 10,
                          "failureThreshold": 3},
        "startupProbe": {"httpGet": {"path": contract.PATH_LIVE, **probe}, "periodSeconds": 2,
                         "failureThreshold": max(1, spec.rollout.startup_timeout_seconds // 2)},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    resources = spec.serving.resources.as_k8s()
    if resources:
        container["resources"] = resources
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "terminationGracePeriodSeconds": 30,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
        "enableServiceLinks": False,
    }
    if spec.serving.node_selector:
        pod_spec["nodeSelector"] = dict(spec.serving.node_selector)
    if spec.serving.tolerations:
        pod_spec["tolerations"] = [t.as_k8s() for t in spec.serving.tolerations]
    return _with_hash({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": naming.build_deployment_name(meta.name, version),
            "namespace": meta.namespace,
            "labels": {**labels, naming.LABEL_MANAGED_BY: naming.MANAGED_BY},
            "annotations": {naming.ANNOTATION_IMAGE: image},
            "ownerReferences": [build_owner_reference(meta)],
        },
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 2,
            "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    })


def build_service(meta: Meta, port: int) -> dict[str, Any]:
    return _with_hash({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": naming.build_service_name(meta.name),
            "namespace": meta.namespace,
            "labels": {**naming.build_selector_labels(meta.name), naming.LABEL_MANAGED_BY: naming.MANAGED_BY},
            "ownerReferences": [build_owner_reference(meta)],
        },
        "spec": {
            "selector": naming.build_selector_labels(meta.name),
            "ports": [{"name": contract.SERVING_PORT_NAME, "port": port, "targetPort": contract.SERVING_PORT_NAME,
                       "protocol": "TCP"}],
        },
    })


def build_condition(type_: str, status: bool, reason: str, message: str, generation: int,
                    previous: Sequence[Mapping[str, Any]], now: datetime.datetime) -> dict[str, Any]:
    """A metav1.Condition; lastTransitionTime moves only when the status flips."""
    value = "True" if status else "False"
    old = next((c for c in previous if c.get("type") == type_), None)
    changed = old is None or old.get("status") != value
    return {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": build_timestamp(now) if changed or not old else old.get("lastTransitionTime"),
    }


def plan_invalid(meta: Meta, previous: Mapping[str, Any], message: str, now: datetime.datetime,
                 reason: str = "InvalidSpec") -> Plan:
    """What the schema could not reject: Stalled with the message, and nothing touched in the cluster.

    Everything already stored (stable version, history) is kept; the children keep serving as they are.
    """
    prev_conditions = previous.get("conditions") or []
    status = {
        **{k: v for k, v in previous.items() if k != "conditions"},
        "observedGeneration": meta.generation,
        "phase": previous.get("phase") if previous.get("stableVersion") else "Failed",
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


def plan_reconcile(body: Mapping[str, Any], observed: Observed, now: datetime.datetime) -> Plan:
    """The whole decision for one ModelDeployment."""
    meta = build_meta(body)
    previous: Mapping[str, Any] = body.get("status") or {}
    try:
        md = spec_mod.parse_model_deployment(body)
    except spec_mod.SpecError as e:
        return plan_invalid(meta, previous, str(e), now)
    spec = md.spec
    image = spec.image
    target = spec.image_ref.version
    stable: str | None = previous.get("stableVersion")
    replicas = spec.serving.replicas
    history = [dict(h) for h in previous.get("history") or []]
    events: list[EventSpec] = []

    target_view = observed.deployments.get(target)
    target_ready = target_view is not None and target_view.replicas == replicas and target_view.rolled_out

    # Replica plan by version.
    desired: dict[str, tuple[str, int]] = {target: (image, replicas)}
    promoted = False
    if stable is not None and stable != target:
        if target_ready:
            promoted = True
        elif stable in observed.deployments:
            desired[stable] = (observed.deployments[stable].image, replicas)
    if stable is None and target_ready:
        promoted = True

    new_stable = target if promoted else stable
    if promoted:
        for h in history:
            if h.get("version") == stable and h.get("outcome") == "Promoted":
                h["outcome"] = "Superseded"
        history.append({"version": target, "image": image, "outcome": "Promoted", "reason": "RolledOut",
                        "time": build_timestamp(now)})
        history = history[-HISTORY_MAX:]
        events.append(EventSpec("Normal", "Promoted", f"Version {target} is stable and serving"))
    elif target_view is None:
        what = "first version" if stable is None else f"candidate next to stable {stable}"
        events.append(EventSpec("Normal", "Deploying", f"Deploying version {target} ({what})"))

    # Older versions: scaled to zero and kept up to revisionHistoryLimit, the oldest beyond it deleted.
    deletes: list[tuple[str, str, str]] = []
    order = {h.get("version"): i for i, h in enumerate(history)}
    old_versions = sorted((v for v in observed.deployments if v not in desired),
                          key=lambda v: order.get(v, -1), reverse=True)
    for i, version in enumerate(old_versions):
        if i < spec.revision_history_limit:
            desired.setdefault(version, (observed.deployments[version].image, 0))
        else:
            deletes.append(("apps/v1", "Deployment", observed.deployments[version].name))

    # The target version's Deployment is rendered from the current spec; every other version keeps the pod
    # template it was deployed with (the stable stays exactly what was running) and only has its replicas set.
    to_apply: list[dict[str, Any]] = []
    target_obj = build_deployment(meta, md, target, image, desired[target][1])
    target_hash = target_obj["metadata"]["annotations"][naming.ANNOTATION_SPEC_HASH]
    if target_view is None or target_view.spec_hash != target_hash:
        to_apply.append(target_obj)
    scales: list[tuple[str, int]] = []
    for version, (_, count) in sorted(desired.items()):
        view = observed.deployments.get(version)
        if version != target and view is not None and view.replicas != count:
            scales.append((view.name, count))
    service = build_service(meta, spec.serving.port)
    if observed.service_hash != service["metadata"]["annotations"][naming.ANNOTATION_SPEC_HASH]:
        to_apply.append(service)

    # Status.
    serving_ready = sum(v.ready_replicas for v in observed.deployments.values())
    done = new_stable == target and target_ready and not to_apply and not scales
    if done:
        phase, message = "Healthy", f"Version {target} serves with {replicas} replica(s)"
    else:
        ready_now = target_view.ready_replicas if target_view else 0
        phase = "Progressing"
        message = f"Rolling out version {target}: {ready_now}/{replicas} replica(s) ready"
    prev_conditions = previous.get("conditions") or []
    g = meta.generation
    conditions = [
        build_condition("Ready", done, "RolledOut" if done else "Progressing", message, g, prev_conditions, now),
        build_condition("Reconciling", not done, "Progressing" if not done else "RolledOut", message, g,
                        prev_conditions, now),
        build_condition("Stalled", False, "Progressing" if not done else "RolledOut", "", g, prev_conditions, now),
        build_condition("Serving", serving_ready > 0 or replicas == 0,
                        "ReplicasReady" if serving_ready else "NoReadyReplicas",
                        f"{serving_ready} ready replica(s) across versions", g, prev_conditions, now),
    ]
    status: dict[str, Any] = {
        "observedGeneration": g,
        "phase": phase,
        "message": message,
        "stableVersion": new_stable,
        "candidateVersion": None if new_stable == target else target,
        "conditions": conditions,
        "history": history,
        "replicas": {
            "ready": serving_ready,
            "stable": _ready_of(observed, new_stable),
            "candidate": _ready_of(observed, target) if new_stable != target else 0,
        },
    }
    return Plan(apply=tuple(to_apply), delete=tuple(deletes), status=status, events=tuple(events),
                requeue_after=None, scale=tuple(scales))


def _ready_of(observed: Observed, version: str | None) -> int:
    view = observed.deployments.get(version) if version else None
    return view.ready_replicas if view else 0


def assess_status_changed(previous: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """True when writing `new` would change what is stored (so idle reconciles write nothing)."""
    return any(previous.get(k) != v for k, v in new.items())
