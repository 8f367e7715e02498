"""Builders of the Kubernetes objects Shipyard owns (pure; no I/O): Deployments, the Service, compression Jobs.

Each object carries a hash of its own content (annotation ``shipyard.dev/spec-hash``) so that the shell applies
only what differs from what it observed: an idle operator makes no writes.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from shipyard import contract
from shipyard.contract import quantity
from shipyard.operator import naming, podtemplate, runtimes
from shipyard.operator import spec as spec_mod

ARTIFACTS_VOLUME = "artifacts"
CONFIG_VOLUME = "compression-config"
TMP_VOLUME = "tmp"  # an emptyDir at /tmp: the containers' root filesystems are read-only
MODEL_VOLUME = "model-source"
MODEL_SOURCE_MOUNT = "/model-source"  # a pvc:// source model is mounted here (read-only)
SERVING_USER = 10001  # the runtime image's user (Dockerfile): model pods and compression Jobs run as it


@dataclass(frozen=True)
class Meta:
    name: str
    namespace: str
    uid: str
    generation: int


def build_meta(body: Mapping[str, Any]) -> Meta:
    m = body["metadata"]
    return Meta(name=m["name"], namespace=m["namespace"], uid=m.get("uid", ""), generation=int(m.get("generation", 1)))


def build_spec_hash(obj: Mapping[str, Any]) -> str:
    """A stable hash of what Shipyard applies, stored on the object so that unchanged objects are not re-applied."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def spec_hash_of(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata", {}).get("annotations") or {}).get(naming.ANNOTATION_SPEC_HASH, ""))


def _with_hash(obj: dict[str, Any]) -> dict[str, Any]:
    obj["metadata"].setdefault("annotations", {})[naming.ANNOTATION_SPEC_HASH] = build_spec_hash(obj)
    return obj


def build_owner_reference(meta: Meta) -> dict[str, Any]:
    return {
        "apiVersion": naming.API_VERSION,
        "kind": naming.KIND,
        "name": meta.name,
        "uid": meta.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def build_object_meta(meta: Meta, name: str, labels: Mapping[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": meta.namespace,
        "labels": {**labels, naming.LABEL_MANAGED_BY: naming.MANAGED_BY},
        "ownerReferences": [build_owner_reference(meta)],
    }


# --- compression -------------------------------------------------------------------------------------------------


def build_artifact_key(image: str, recipe: Mapping[str, Any]) -> str:
    """Content address of a compressed artifact: the source image reference and the full recipe."""
    text = json.dumps({"image": image, "recipe": recipe}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def build_artifact_path(meta: Meta, key: str) -> str:
    return f"{contract.ARTIFACTS_MOUNT}/{meta.namespace}/{meta.name}/{key}"


def build_job_name(meta: Meta, key: str, retry: int, attempt: int = 0) -> str:
    """spec.retry and the artifact's attempt (bumped by the shipyard.dev/retry annotation) give a new Job."""
    return naming.build_name(meta.name, "compress", key[:10], f"r{retry}" if retry else "",
                             f"a{attempt}" if attempt else "")


def build_source_path(md: spec_mod.ModelDeployment) -> str | None:
    """Where the source model is inside the pod: spec.model.path in the image, or the model's PVC mounted at
    MODEL_SOURCE_MOUNT; None for a URI scheme this operator cannot mount (the planner stalls on it)."""
    model = md.spec.model
    if model.path is not None:
        return model.path
    pvc = model.pvc
    return None if pvc is None else MODEL_SOURCE_MOUNT + pvc[1].rstrip("/")


def _add_model_source_volume(md: spec_mod.ModelDeployment, container: dict[str, Any],
                             volumes: list[dict[str, Any]]) -> None:
    """A pvc:// source: its claim mounted read-only at MODEL_SOURCE_MOUNT."""
    pvc = md.spec.model.pvc
    if pvc is None:
        return
    container["volumeMounts"].append({"name": MODEL_VOLUME, "mountPath": MODEL_SOURCE_MOUNT, "readOnly": True})
    volumes.append({"name": MODEL_VOLUME, "persistentVolumeClaim": {"claimName": pvc[0], "readOnly": True}})


def build_compression_config(md: spec_mod.ModelDeployment, meta: Meta, key: str) -> dict[str, Any]:
    """The `shipyard-runtime compress --config` document for this version (the runtime's recipe format)."""
    compression = md.spec.compression
    assert compression is not None
    recipe = compression.model_dump(mode="json", include={"steps", "evaluation", "compiled"}, exclude_none=True)
    if recipe["compiled"].get("mode") == "auto":  # the runtime's default: left out, so that configs (and the Jobs of
        del recipe["compiled"]["mode"]  # runtime images from before the field) stay as they were
    return {
        "source": build_source_path(md),
        "output": build_artifact_path(meta, key),
        "name": md.served_model_name,
        **recipe,
        "terminationLog": contract.TERMINATION_LOG,
        # A Job for a key whose artifact is already on the volume (the ModelDeployment was re-created, or the key
        # aged out of status.artifacts) verifies and reuses it instead of failing on the existing directory.
        "reuseExisting": True,
    }


def build_compression_objects(md: spec_mod.ModelDeployment, meta: Meta, version: str, key: str, attempt: int = 0,
                              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ConfigMap with the compression config and the Job that runs `shipyard-runtime compress` on it."""
    compression = md.spec.compression
    assert compression is not None
    name = build_job_name(meta, key, md.spec.retry, attempt)
    labels = {
        **naming.build_version_labels(meta.name, version),
        naming.LABEL_COMPONENT: "compression",
        naming.LABEL_ARTIFACT: key,
    }
    config = build_compression_config(md, meta, key)
    config_map = _with_hash({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": build_object_meta(meta, name, labels),
        "data": {contract.COMPRESSION_CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True)},
    })
    container: dict[str, Any] = {
        "name": "compress",
        "image": md.spec.image,
        "command": [contract.RUNTIME_COMMAND, contract.COMPRESS_SUBCOMMAND, "--config",
                    f"{contract.COMPRESSION_CONFIG_MOUNT}/{contract.COMPRESSION_CONFIG_FILE}"],
        "env": [
            {"name": contract.ENV_MODEL_NAME, "value": md.served_model_name},
            {"name": contract.ENV_MODEL_VERSION, "value": version},
            {"name": "OMP_NUM_THREADS", "value": str(_cpu_threads(compression.resources))},
        ],
        "volumeMounts": [
            {"name": ARTIFACTS_VOLUME, "mountPath": contract.ARTIFACTS_MOUNT},
            {"name": CONFIG_VOLUME, "mountPath": contract.COMPRESSION_CONFIG_MOUNT, "readOnly": True},
            # the root filesystem is read-only: TorchInductor compiles the AOTInductor package under /tmp
            {"name": TMP_VOLUME, "mountPath": "/tmp"},
        ],
        "terminationMessagePath": contract.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _container_security(),
    }
    resources = compression.resources.as_k8s()
    gpus, placement = podtemplate.build_compression_placement(compression, md.spec.serving)
    if gpus:  # a recipe that needs CUDA, without GPUs in spec.compression.resources
        resources = {**resources, "limits": {**resources.get("limits", {}), **gpus}}
    if resources:
        container["resources"] = resources
    volumes: list[dict[str, Any]] = [
        {"name": ARTIFACTS_VOLUME, "persistentVolumeClaim": {"claimName": compression.artifacts_pvc}},
        {"name": CONFIG_VOLUME, "configMap": {"name": name}},
        {"name": TMP_VOLUME, "emptyDir": {}},
    ]
    _add_model_source_volume(md, container, volumes)
    job = _with_hash({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {**build_object_meta(meta, name, labels),
                     "annotations": {naming.ANNOTATION_IMAGE: md.spec.image}},
        "spec": {
            "backoffLimit": compression.backoff_limit,
            "activeDeadlineSeconds": compression.active_deadline_seconds,
            "ttlSecondsAfterFinished": 7 * 24 * 3600,
            "template": podtemplate.build_merged_template({
                "metadata": {"labels": {**labels, naming.LABEL_MANAGED_BY: naming.MANAGED_BY}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [container],
                    "volumes": volumes,
                    "securityContext": _pod_security(),
                    "enableServiceLinks": False,
                    "automountServiceAccountToken": False,
                    **placement,
                },
            }, podtemplate.build_overlay(compression.pod_template)),
        },
    })
    return config_map, job


def _cpu_threads(resources: spec_mod.Resources) -> int:
    """Torch threads from the CPU limit, else the request (oversubscription makes torch ~10x slower); 2 when
    neither is set. Any quantity the API server accepts works (``1k`` is 1000 cores, ``250000u`` a quarter)."""
    cpu = resources.limits.get("cpu") or resources.requests.get("cpu")
    if not cpu:
        return 2
    return max(1, math.floor(quantity.build_cpu_cores(cpu)))


# --- serving -----------------------------------------------------------------------------------------------------


def build_pod_env(md: spec_mod.ModelDeployment, version: str, artifact_path: str,
                  compressed: bool = False) -> list[dict[str, Any]]:
    """The inference container's environment. A compressed artifact served in a form pinned by
    spec.compression.compiled.mode (on or off) carries the pin; auto, the server's default (serve the form the
    compression Job measured fastest), is left out, so that the pod templates of existing Deployments stay as they
    were (no restart on an operator upgrade)."""
    batching = md.spec.serving.batching
    env = [
        {"name": contract.ENV_MODEL_NAME, "value": md.served_model_name},
        {"name": contract.ENV_MODEL_VERSION, "value": version},
        {"name": contract.ENV_ARTIFACT_PATH, "value": artifact_path},
        {"name": contract.ENV_MAX_BATCH_SIZE, "value": str(batching.max_batch_size)},
        {"name": contract.ENV_MAX_DELAY_MS, "value": str(batching.max_delay_ms)},
    ]
    compression = md.spec.compression
    if compressed and compression is not None and compression.compiled.mode != "auto":
        env.append({"name": contract.ENV_COMPILED, "value": compression.compiled.mode})
    return env


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": SERVING_USER, "fsGroup": SERVING_USER,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _probe_timings(spec: spec_mod.ModelDeploymentSpec) -> dict[str, dict[str, int]]:
    """periodSeconds and failureThreshold of the readiness, liveness and startup probes: the startup probe is retried
    for spec.rollout.startupTimeoutSeconds."""
    return {"readinessProbe": {"periodSeconds": 2, "failureThreshold": 2},
            "livenessProbe": {"periodSeconds": 10, "failureThreshold": 3},
            "startupProbe": {"periodSeconds": 2,
                             "failureThreshold": max(1, spec.rollout.startup_timeout_seconds // 2)}}


def _build_shipyard_container(md: spec_mod.ModelDeployment, version: str, image: str,
                              artifact_path: str | None) -> dict[str, Any]:
    """Shipyard's own server (shipyard-runtime serve). Without spec.serving.grpc exactly the template it always had
    (existing Deployments are not restarted by an operator upgrade)."""
    spec = md.spec
    grpc = spec.serving.grpc
    http = grpc is None or grpc.http
    path = artifact_path or build_source_path(md) or contract.ARTIFACTS_MOUNT
    command = [contract.RUNTIME_COMMAND, contract.SERVE_SUBCOMMAND, "--port", str(contract.SERVING_PORT),
               *podtemplate.build_server_args(spec.serving.server)]
    ports = [{"name": contract.SERVING_PORT_NAME, "containerPort": contract.SERVING_PORT, "protocol": "TCP"}]
    if grpc is not None:
        command += [contract.SERVE_GRPC_PORT_FLAG, str(contract.GRPC_PORT)]
        grpc_port = {"name": contract.GRPC_PORT_NAME, "containerPort": contract.GRPC_PORT, "protocol": "TCP"}
        if http:
            ports.append(grpc_port)
        else:
            command += contract.SERVE_HTTP_OFF_ARGS
            ports = [grpc_port]
    timings = _probe_timings(spec)
    probes: dict[str, Any]
    if http:
        probe = {"port": contract.SERVING_PORT_NAME}
        probes = {"readinessProbe": {"httpGet": {"path": contract.PATH_READY, **probe}, **timings["readinessProbe"]},
                  "livenessProbe": {"httpGet": {"path": contract.PATH_LIVE, **probe}, **timings["livenessProbe"]},
                  "startupProbe": {"httpGet": {"path": contract.PATH_LIVE, **probe}, **timings["startupProbe"]}}
    else:
        probes = {kind: {"grpc": {"port": contract.GRPC_PORT}, **timing} for kind, timing in timings.items()}
    return {
        "name": "server",
        "image": image,
        "command": command,
        "env": build_pod_env(md, version, path, compressed=artifact_path is not None),
        "ports": ports,
        **probes,
        "securityContext": _container_security(),
        "volumeMounts": [{"name": TMP_VOLUME, "mountPath": "/tmp"}],
    }


def _build_runtime_probe(probe: runtimes.Probe | None, resolved: runtimes.ResolvedRuntime) -> dict[str, Any]:
    """An HTTP GET, a gRPC health check, or (no probe given) a TCP check of the serving port."""
    if probe is None:
        return {"tcpSocket": {"port": resolved.serving_port_name}}
    if probe.port == "grpc":
        return {"grpc": {"port": resolved.ports["grpc"]}}  # a gRPC probe takes a number, not a port name
    name = contract.METRICS_PORT_NAME if probe.port == "metrics" and _separate_metrics(resolved) else "http"
    return {"httpGet": {"path": probe.path, "port": name}}


def _separate_metrics(resolved: runtimes.ResolvedRuntime) -> bool:
    return "metrics" in resolved.ports and resolved.ports.get("metrics") != resolved.ports.get("http")


def build_runtime_ports(resolved: runtimes.ResolvedRuntime) -> list[dict[str, Any]]:
    """The container ports of a runtime: http, grpc, and metrics where it is a port of its own."""
    roles: tuple[runtimes.PortName, ...] = ("http", "grpc")
    ports = [{"name": name, "containerPort": resolved.ports[name], "protocol": "TCP"}
             for name in roles if name in resolved.ports]
    if _separate_metrics(resolved):
        ports.append({"name": contract.METRICS_PORT_NAME, "containerPort": resolved.ports["metrics"],
                      "protocol": "TCP"})
    return ports


RUNTIME_DRAIN_SECONDS: Final = 5  # the preStop sleep of another runtime's container (the server's drain propagation)


def _build_runtime_container(md: spec_mod.ModelDeployment, runtime: runtimes.Runtime, version: str, image: str,
                             artifact_path: str | None) -> dict[str, Any]:
    """Another runtime's container: its command, args, env and ports (the preset's, overridden by the spec's), the
    model mounted at its modelMountPath (a pvc:// source or a compressed artifact; a model in the image is where
    spec.model.path says), its probes with the startup probe retried for startupTimeoutSeconds."""
    resolved = runtimes.resolve_runtime(runtime)
    spec = md.spec
    mounted = artifact_path is not None or spec.model.pvc is not None
    model_path = resolved.model_mount_path if mounted else (spec.model.path or resolved.model_mount_path)
    env = [{"name": contract.ENV_MODEL_NAME, "value": md.served_model_name},
           {"name": contract.ENV_MODEL_VERSION, "value": version},
           {"name": contract.ENV_MODEL_PATH, "value": model_path}]
    port_env: tuple[tuple[runtimes.PortName, str], ...] = (
        ("http", contract.ENV_HTTP_PORT), ("grpc", contract.ENV_GRPC_PORT), ("metrics", contract.ENV_METRICS_PORT))
    for role, name in port_env:
        if role in resolved.ports:
            env.append({"name": name, "value": str(resolved.ports[role])})
    env += [{"name": k, "value": v} for k, v in resolved.env]
    timings = _probe_timings(spec)
    container: dict[str, Any] = {"name": "server", "image": image}
    if resolved.command:
        container["command"] = list(resolved.command)
    if resolved.args:
        container["args"] = list(resolved.args)
    container.update({
        "env": env,
        "ports": build_runtime_ports(resolved),
        "readinessProbe": {**_build_runtime_probe(resolved.probes.get("readiness"), resolved),
                           **timings["readinessProbe"]},
        "livenessProbe": {**_build_runtime_probe(resolved.probes.get("liveness"), resolved),
                          **timings["livenessProbe"]},
        "startupProbe": {**_build_runtime_probe(resolved.probes.get("startup"), resolved),
                         **timings["startupProbe"]},
        # Third-party servers stop at SIGTERM without draining (TorchServe drops the requests in flight): the preStop
        # sleep keeps the server answering while its removal from the Service's endpoints propagates, as Shipyard's
        # own server does in-process after SIGTERM.
        "lifecycle": {"preStop": {"sleep": {"seconds": RUNTIME_DRAIN_SECONDS}}},
        # Servers write logs and caches under their home: the root filesystem stays writable, privileges dropped.
        "securityContext": {**_container_security(), "readOnlyRootFilesystem": False},
        "volumeMounts": [{"name": TMP_VOLUME, "mountPath": "/tmp"}],
    })
    return container


def build_deployment(meta: Meta, md: spec_mod.ModelDeployment, version: str, image: str, replicas: int,
                     artifact_path: str | None = None) -> dict[str, Any]:
    """One version's Deployment. With artifact_path (a compressed artifact), the artifacts PVC is mounted."""
    spec = md.spec
    labels = naming.build_version_labels(meta.name, version)
    runtime = spec.serving.runtime
    volumes: list[dict[str, Any]] = [{"name": TMP_VOLUME, "emptyDir": {}}]
    if runtime is None:
        container = _build_shipyard_container(md, version, image, artifact_path)
        if artifact_path and spec.compression is not None:
            container["volumeMounts"].append(
                {"name": ARTIFACTS_VOLUME, "mountPath": contract.ARTIFACTS_MOUNT, "readOnly": True})
            volumes.append({"name": ARTIFACTS_VOLUME, "persistentVolumeClaim": {
                "claimName": spec.compression.artifacts_pvc, "readOnly": True}})
        elif not artifact_path:
            _add_model_source_volume(md, container, volumes)
    else:
        container = _build_runtime_container(md, runtime, version, image, artifact_path)
        mount = runtimes.resolve_runtime(runtime).model_mount_path
        if artifact_path and spec.compression is not None:  # the artifact's own directory, at modelMountPath
            container["volumeMounts"].append({"name": ARTIFACTS_VOLUME, "mountPath": mount, "readOnly": True,
                                              "subPath": artifact_path.removeprefix(contract.ARTIFACTS_MOUNT + "/")})
            volumes.append({"name": ARTIFACTS_VOLUME, "persistentVolumeClaim": {
                "claimName": spec.compression.artifacts_pvc, "readOnly": True}})
        elif not artifact_path and spec.model.pvc is not None:  # the claim's directory, at modelMountPath
            claim, inside = spec.model.pvc
            volume_mount: dict[str, Any] = {"name": MODEL_VOLUME, "mountPath": mount, "readOnly": True}
            if inside.strip("/"):
                volume_mount["subPath"] = inside.strip("/")
            container["volumeMounts"].append(volume_mount)
            volumes.append({"name": MODEL_VOLUME, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
    resources = spec.serving.resources.as_k8s()
    if resources:
        container["resources"] = resources
    # A runtime's image runs as its own (non-root) user; Shipyard's as the runtime image's user.
    pod_spec = _build_serving_pod_spec(spec, container, _pod_security() if runtime is None else {
        "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}, volumes)
    return _with_hash({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {**build_object_meta(meta, naming.build_deployment_name(meta.name, version), labels),
                     "annotations": {naming.ANNOTATION_IMAGE: image}},
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 2,
            "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": podtemplate.build_merged_template({
                "metadata": {"labels": {**labels, naming.LABEL_MANAGED_BY: naming.MANAGED_BY}},
                "spec": pod_spec,
            }, podtemplate.build_overlay(spec.serving.pod_template)),
        },
    })


def _build_serving_pod_spec(spec: spec_mod.ModelDeploymentSpec, container: dict[str, Any],
                            security: dict[str, Any], volumes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The pod spec of a serving pod (a version's, or the activator's): one container, no service account token,
    on the nodes spec.serving places the model on."""
    pod_spec: dict[str, Any] = {"containers": [container]}
    if volumes is not None:
        pod_spec["volumes"] = volumes
    pod_spec.update({"terminationGracePeriodSeconds": 30, "securityContext": security, "enableServiceLinks": False,
                     "automountServiceAccountToken": False})
    if spec.serving.node_selector:
        pod_spec["nodeSelector"] = dict(spec.serving.node_selector)
    if spec.serving.tolerations:
        pod_spec["tolerations"] = [t.as_k8s() for t in spec.serving.tolerations]
    return pod_spec


ACTIVATOR_COMMAND: Final = "shipyard-activator"
ACTIVATOR_PORT: Final = 8080


def build_activator_ready_path(serving: spec_mod.Serving) -> str | None:
    """The HTTP path the activator probes through the model's Service to see model pods behind it: the readiness
    path of the server (Shipyard's, or a runtime's HTTP readiness probe). None: the pods answer no HTTP readiness
    check (gRPC only, or a TCP probe), and the activator cannot tell when they take traffic."""
    if serving.runtime is None:
        return contract.PATH_READY if serving.grpc is None or serving.grpc.http else None
    resolved = runtimes.resolve_runtime(serving.runtime)
    probe = resolved.probes.get("readiness")
    if "http" not in resolved.ports or probe is None or probe.port == "grpc":
        return None
    return probe.path


def build_activator_deployment(meta: Meta, md: spec_mod.ModelDeployment, image: str, ready_path: str) -> dict[str, Any]:
    """The activator of a model that scales to zero (``shipyard-activator``, from the operator's image): one small pod
    that the model's Service selects while no model pod is Ready. It holds the requests that arrive then, exports
    how many (``shipyard_activator_pending_requests``, the ScaledObject's activation trigger) on its metrics port,
    and forwards them through the model's Service once that reaches model pods again."""
    spec = md.spec
    labels = naming.build_activator_labels(meta.name)
    upstream = f"http://{naming.build_service_name(meta.name)}.{meta.namespace}.svc:{spec.serving.port}"
    metrics_port = contract.ACTIVATOR_METRICS_PORT
    env = [{"name": "SHIPYARD_ACTIVATOR_UPSTREAM", "value": upstream},
           {"name": "SHIPYARD_ACTIVATOR_MODEL", "value": md.served_model_name},
           {"name": "SHIPYARD_ACTIVATOR_PORT", "value": str(ACTIVATOR_PORT)},
           {"name": "SHIPYARD_ACTIVATOR_METRICS_PORT", "value": str(metrics_port)},
           {"name": "SHIPYARD_ACTIVATOR_READY_PATH", "value": ready_path},
           {"name": "SHIPYARD_ACTIVATOR_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    probe = {"httpGet": {"path": "/healthz", "port": contract.METRICS_PORT_NAME}, "periodSeconds": 2,
             "failureThreshold": 3}
    container = {
        "name": "activator",
        "image": image,
        "command": [ACTIVATOR_COMMAND],
        "env": env,
        "ports": [{"name": contract.SERVING_PORT_NAME, "containerPort": ACTIVATOR_PORT, "protocol": "TCP"},
                  {"name": contract.METRICS_PORT_NAME, "containerPort": metrics_port, "protocol": "TCP"}],
        "readinessProbe": probe,
        "livenessProbe": {**probe, "periodSeconds": 10},
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": _container_security(),
    }
    pod_spec = _build_serving_pod_spec(spec, container, _pod_security())
    # Scraped at its metrics port only: a scrape of its serving port would be a held request.
    annotations = {naming.ANNOTATION_METRICS_PORT: str(metrics_port), "prometheus.io/scrape": "true",
                   "prometheus.io/port": str(metrics_port)}
    return _with_hash({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {**build_object_meta(meta, naming.build_activator_name(meta.name), labels),
                     "annotations": {naming.ANNOTATION_IMAGE: image}},
        "spec": {
            "replicas": 1,
            "revisionHistoryLimit": 2,
            "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": {**labels, naming.LABEL_MANAGED_BY: naming.MANAGED_BY},
                                      "annotations": annotations},
                         "spec": pod_spec},
        },
    })


def build_service_ports(serving: spec_mod.Serving) -> list[dict[str, Any]]:
    """The ports of the model's Service and of the per-version Services: http at spec.serving.port (while the pods
    serve HTTP), grpc for Shipyard's server at spec.serving.grpc.port, for a runtime at its gRPC port's number."""
    http = {"name": contract.SERVING_PORT_NAME, "port": serving.port, "targetPort": contract.SERVING_PORT_NAME,
            "protocol": "TCP"}
    grpc_port: int | None = None
    has_http = True
    if serving.runtime is not None:
        resolved = runtimes.resolve_runtime(serving.runtime)
        grpc_port = resolved.ports.get("grpc")
        has_http = "http" in resolved.ports
    elif serving.grpc is not None:
        grpc_port, has_http = serving.grpc.port, serving.grpc.http
    ports = [http] if has_http else []
    if grpc_port is not None:
        ports.append({"name": contract.GRPC_PORT_NAME, "port": grpc_port, "targetPort": contract.GRPC_PORT_NAME,
                      "protocol": "TCP", "appProtocol": contract.GRPC_APP_PROTOCOL})
    return ports


def build_version_service(meta: Meta, version: str, port: int,
                          ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A Service over one version's pods only (named as its Deployment): the address analysis Jobs measure the
    candidate (and compare with the stable) at. ``ports``: ``build_service_ports`` (default: http at ``port``)."""
    labels = naming.build_version_labels(meta.name, version)
    return _with_hash({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": build_object_meta(meta, naming.build_deployment_name(meta.name, version), labels),
        "spec": {
            "selector": labels,
            "ports": ports or [{"name": contract.SERVING_PORT_NAME, "port": port,
                                "targetPort": contract.SERVING_PORT_NAME, "protocol": "TCP"}],
        },
    })


def build_service(meta: Meta, port: int, ports: list[dict[str, Any]] | None = None,
                  version: str | None = None, activator: bool = False) -> dict[str, Any]:
    """The model's Service. ``version`` None: every serving pod of the model (a canary's traffic splits between
    versions by ready replicas); a version: that version's pods only (at rest, and blue-green's active version);
    ``activator``: the activator's pod (scaled to zero: no model pod is Ready).
    ``ports``: ``build_service_ports`` (default: http at ``port``)."""
    if activator:
        selector = naming.build_activator_labels(meta.name)
    elif version is None:
        selector = naming.build_selector_labels(meta.name)
    else:
        selector = naming.build_version_labels(meta.name, version)
    return _with_hash({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": build_object_meta(meta, naming.build_service_name(meta.name),
                                      naming.build_selector_labels(meta.name)),
        "spec": {
            "selector": selector,
            "ports": ports or [{"name": contract.SERVING_PORT_NAME, "port": port,
                                "targetPort": contract.SERVING_PORT_NAME, "protocol": "TCP"}],
        },
    })


def build_preview_service(meta: Meta, version: str, ports: list[dict[str, Any]]) -> dict[str, Any]:
    """Blue-green's preview Service (<name>-preview): the candidate's pods only, from the moment they are Ready until
    the switch, for smoke tests and job metrics."""
    labels = naming.build_version_labels(meta.name, version)
    return _with_hash({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": build_object_meta(meta, naming.build_preview_service_name(meta.name),
                                      {**naming.build_selector_labels(meta.name), naming.LABEL_VERSION:
                                       naming.build_label_value(version)}),
        "spec": {"selector": labels, "ports": ports},
    })
