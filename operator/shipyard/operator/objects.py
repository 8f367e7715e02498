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
from shipyard.operator import naming, observed, podtemplate, runtimes
from shipyard.operator import spec as spec_mod

ARTIFACTS_VOLUME = "artifacts"
CONFIG_VOLUME = "compression-config"
TMP_VOLUME = "tmp"  # an emptyDir at /tmp: the containers' root filesystems are read-only
MODEL_VOLUME = "model-source"
SHADOW_VOLUME = "shadow-config"  # the <model>-shadow ConfigMap, optional, read-only (docs/shadow.md)
MODEL_SOURCE_MOUNT = "/model-source"  # a pvc:// source model is mounted here (read-only), a downloaded one written here
SERVING_USER = 10001  # the runtime image's user (Dockerfile): model pods and compression Jobs run as it
FETCH_CONTAINER: Final = observed.FETCH_CONTAINER  # the download step (an init container: shipyard-runtime fetch)
CACHE_VOLUME: Final = "model-cache"
CACHE_MOUNT: Final = "/var/cache/shipyard"
CA_VOLUME: Final = "model-ca"
CA_MOUNT: Final = "/etc/shipyard/model-ca"
REGISTRY_AUTH_VOLUME: Final = "registry-auth"
REGISTRY_AUTH_MOUNT: Final = "/etc/shipyard/registry"
REGISTRY_AUTH_KEY: Final = ".dockerconfigjson"  # the key of a kubernetes.io/dockerconfigjson Secret
FETCH_RESOURCES: Final = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}}


@dataclass(frozen=True)
class FetchSettings:
    """How the operator's download steps run (its flags): ``image``, an image with ``shipyard-runtime`` for the
    download step of pods whose server is another runtime (Shipyard's own image has it); ``cache_path``, the node's
    directory of the shared model cache (a hostPath: one download per node and digest), None for none."""

    image: str | None = None
    cache_path: str | None = None


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


def build_artifact_key(image: str, recipe: Mapping[str, Any], model: spec_mod.ModelSource | None = None) -> str:
    """Content address of a compressed artifact: the source image reference, the full recipe and, for a downloaded
    model, its URI and digest (a re-pushed tag with a new digest is a new artifact, never a stale one reused)."""
    document: dict[str, Any] = {"image": image, "recipe": recipe}
    if model is not None and model.remote:  # other sources keep the key they always had (no recompression on upgrade)
        document["model"] = {"uri": model.uri, "digest": model.digest}
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def build_artifact_path(meta: Meta, key: str) -> str:
    return f"{contract.ARTIFACTS_MOUNT}/{meta.namespace}/{meta.name}/{key}"


def build_job_name(meta: Meta, key: str, retry: int, attempt: int = 0) -> str:
    """spec.retry and the artifact's attempt (bumped by the shipyard.dev/retry annotation) give a new Job."""
    return naming.build_name(meta.name, "compress", key[:10], f"r{retry}" if retry else "",
                             f"a{attempt}" if attempt else "")


def build_source_path(md: spec_mod.ModelDeployment) -> str | None:
    """Where the source model is inside the pod: spec.model.path in the image, the model's PVC mounted at
    MODEL_SOURCE_MOUNT, the directory the download step wrote there, or the image volume mounted there (its
    spec.model.path inside); None for a URI scheme this operator cannot fetch (the planner stalls on it)."""
    model = md.spec.model
    if model.image_volume:
        return MODEL_SOURCE_MOUNT + (model.path or "").rstrip("/")
    if model.remote:
        return MODEL_SOURCE_MOUNT
    if model.path is not None:
        return model.path
    pvc = model.pvc
    return None if pvc is None else MODEL_SOURCE_MOUNT + pvc[1].rstrip("/")


def build_oci_reference(model: spec_mod.ModelSource) -> str:
    """The image reference of an oci:// model (pinned by spec.model.digest when one is given). Pure."""
    assert model.uri is not None
    reference = model.uri.removeprefix("oci://")
    if model.digest and "@" not in reference:
        reference = f"{reference}@{model.digest}"
    return reference


def build_model_volume(md: spec_mod.ModelDeployment) -> dict[str, Any] | None:
    """The volume the model is read from: a pvc:// claim, the emptyDir a download step fills, or an image volume."""
    model = md.spec.model
    pvc = model.pvc
    if pvc is not None:
        return {"name": MODEL_VOLUME, "persistentVolumeClaim": {"claimName": pvc[0], "readOnly": True}}
    if model.image_volume:
        return {"name": MODEL_VOLUME, "image": {"reference": build_oci_reference(model), "pullPolicy": "IfNotPresent"}}
    if model.remote:
        return {"name": MODEL_VOLUME, "emptyDir": {}}
    return None


def _add_model_source_volume(md: spec_mod.ModelDeployment, container: dict[str, Any],
                             volumes: list[dict[str, Any]]) -> None:
    """A pvc:// source, a downloaded model or an image volume, mounted read-only at MODEL_SOURCE_MOUNT."""
    volume = build_model_volume(md)
    if volume is None:
        return
    container["volumeMounts"].append({"name": MODEL_VOLUME, "mountPath": MODEL_SOURCE_MOUNT, "readOnly": True})
    volumes.append(volume)


def build_fetch_container(md: spec_mod.ModelDeployment, image: str, settings: FetchSettings,
                          ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The download step of a pod (an init container running ``shipyard-runtime fetch``) and the volumes it needs
    besides the model's: it writes the model into MODEL_SOURCE_MOUNT (an emptyDir) through the node cache when the
    operator has one, checks spec.model.digest, and reports size, time and digest in its termination message. The
    credentials Secret reaches this container only (s3: as environment; oci: the registry config as a file)."""
    model = md.spec.model
    assert model.uri is not None
    scheme = model.uri_scheme
    prefix = contract.FETCH_ENV_PREFIX
    env: list[dict[str, Any]] = [{"name": prefix + "URI", "value": model.uri},
                                 {"name": prefix + "DEST", "value": MODEL_SOURCE_MOUNT}]
    if model.digest:
        env.append({"name": prefix + "DIGEST", "value": model.digest})
    if scheme == "oci" and model.path:
        env.append({"name": prefix + "PATH", "value": model.path})
    mounts: list[dict[str, Any]] = [{"name": MODEL_VOLUME, "mountPath": MODEL_SOURCE_MOUNT},
                                    {"name": TMP_VOLUME, "mountPath": "/tmp"}]
    volumes: list[dict[str, Any]] = []
    if settings.cache_path:
        env.append({"name": prefix + "CACHE", "value": CACHE_MOUNT})
        mounts.append({"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT})
        volumes.append({"name": CACHE_VOLUME, "hostPath": {"path": settings.cache_path, "type": "DirectoryOrCreate"}})
    if model.ca_bundle is not None:
        env.append({"name": prefix + "CA_BUNDLE", "value": f"{CA_MOUNT}/{model.ca_bundle.key}"})
        mounts.append({"name": CA_VOLUME, "mountPath": CA_MOUNT, "readOnly": True})
        volumes.append({"name": CA_VOLUME, "configMap": {"name": model.ca_bundle.config_map_name,
                                                         "items": [{"key": model.ca_bundle.key,
                                                                    "path": model.ca_bundle.key}]}})
    if model.s3 is not None:
        for name, value in (("AWS_ENDPOINT_URL_S3", model.s3.endpoint), ("AWS_REGION", model.s3.region),
                            (prefix + "S3_ADDRESSING", model.s3.addressing)):
            if value:
                env.append({"name": name, "value": value})
    container: dict[str, Any] = {
        "name": FETCH_CONTAINER,
        "image": image,
        "command": [contract.RUNTIME_COMMAND, contract.FETCH_SUBCOMMAND],
        "env": env,
        "resources": FETCH_RESOURCES,
        "volumeMounts": mounts,
        "terminationMessagePath": contract.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        # the runtime image's user, also under another runtime's pod security (which sets no runAsUser)
        "securityContext": {**_container_security(), "runAsUser": SERVING_USER},
    }
    secret = model.credentials.secret_name if model.credentials is not None else None
    if secret and scheme == "s3":
        container["envFrom"] = [{"secretRef": {"name": secret}}]
    elif secret and scheme == "oci":
        env.append({"name": prefix + "REGISTRY_CONFIG", "value": f"{REGISTRY_AUTH_MOUNT}/{REGISTRY_AUTH_KEY}"})
        mounts.append({"name": REGISTRY_AUTH_VOLUME, "mountPath": REGISTRY_AUTH_MOUNT, "readOnly": True})
        volumes.append({"name": REGISTRY_AUTH_VOLUME, "secret": {
            "secretName": secret, "items": [{"key": REGISTRY_AUTH_KEY, "path": REGISTRY_AUTH_KEY}]}})
    return container, volumes


def build_fetch_pod_fields(model: spec_mod.ModelSource) -> dict[str, Any]:
    """Pod spec fields of the pods that download: the credentials' ServiceAccount with its token (workload identity),
    the registry Secret as an image pull secret of an image volume."""
    fields: dict[str, Any] = {}
    credentials = model.credentials
    if credentials is not None and credentials.service_account_name:
        fields.update(serviceAccountName=credentials.service_account_name, automountServiceAccountToken=True)
    if model.image_volume and credentials is not None and credentials.secret_name:
        fields["imagePullSecrets"] = [{"name": credentials.secret_name}]
    return fields


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
                              fetch: FetchSettings | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ConfigMap with the compression config and the Job that runs `shipyard-runtime compress` on it (after its
    download step, for a model in s3://, https:// or oci://)."""
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
    pod_extra: dict[str, Any] = {}
    if md.spec.model.remote:  # the Job runs its own image's shipyard-runtime fetch first
        fetch_container, fetch_volumes = build_fetch_container(md, md.spec.image, fetch or FetchSettings())
        volumes += fetch_volumes
        pod_extra = {"initContainers": [fetch_container], **build_fetch_pod_fields(md.spec.model)}
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
                    **pod_extra,
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
    mounted = artifact_path is not None or spec.model.pvc is not None or spec.model.remote
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
                     artifact_path: str | None = None, fetch: FetchSettings | None = None) -> dict[str, Any]:
    """One version's Deployment. With artifact_path (a compressed artifact), the artifacts PVC is mounted; else a
    downloaded model gets its download step (``fetch``: the operator's settings for it). Shipyard's own server mounts
    the shadow settings (``add_shadow_config``), which its spec hash leaves out: an operator upgrade re-applies (and
    restarts) none of the Deployments rendered before (docs/shadow.md)."""
    deployment = _build_deployment(meta, md, version, image, replicas, artifact_path, fetch, shadow=True)
    if md.spec.serving.runtime is None:
        without = _build_deployment(meta, md, version, image, replicas, artifact_path, fetch, shadow=False)
        deployment["metadata"]["annotations"][naming.ANNOTATION_SPEC_HASH] = spec_hash_of(without)
    return deployment


def _build_deployment(meta: Meta, md: spec_mod.ModelDeployment, version: str, image: str, replicas: int,
                      artifact_path: str | None, fetch: FetchSettings | None, *, shadow: bool) -> dict[str, Any]:
    spec = md.spec
    labels = naming.build_version_labels(meta.name, version)
    runtime = spec.serving.runtime
    volumes: list[dict[str, Any]] = [{"name": TMP_VOLUME, "emptyDir": {}}]
    if runtime is None:
        container = _build_shipyard_container(md, version, image, artifact_path)
        if shadow:
            add_shadow_config(container, volumes, meta.name)
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
        elif not artifact_path and (model_volume := build_model_volume(md)) is not None:
            # the claim's directory, the downloaded model, or the image volume's spec.model.path, at modelMountPath
            inside = spec.model.pvc[1] if spec.model.pvc is not None else (
                spec.model.path or "" if spec.model.image_volume else "")
            volume_mount: dict[str, Any] = {"name": MODEL_VOLUME, "mountPath": mount, "readOnly": True}
            if inside.strip("/"):
                volume_mount["subPath"] = inside.strip("/")
            container["volumeMounts"].append(volume_mount)
            volumes.append(model_volume)
    resources = spec.serving.resources.as_k8s()
    if resources:
        container["resources"] = resources
    # A runtime's image runs as its own (non-root) user; Shipyard's as the runtime image's user.
    pod_spec = _build_serving_pod_spec(spec, container, _pod_security() if runtime is None else {
        "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}, volumes)
    if not artifact_path and spec.model.remote:
        if not spec.model.image_volume:  # the download step: Shipyard's image has shipyard-runtime, others' may not
            settings = fetch or FetchSettings()
            fetch_image = image if runtime is None or not settings.image else settings.image
            fetch_container, fetch_volumes = build_fetch_container(md, fetch_image, settings)
            pod_spec["initContainers"] = [fetch_container]
            volumes += fetch_volumes
        pod_spec.update(build_fetch_pod_fields(spec.model))
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


def add_shadow_config(container: dict[str, Any], volumes: list[dict[str, Any]], model: str) -> None:
    """Mounts the shadow settings (the ``<model>-shadow`` ConfigMap, optional: absent is off) into the pods of
    Shipyard's own server, read-only, and points SHIPYARD_SHADOW_CONFIG at its file: a shadow step then switches the
    stable's copying on and off by writing the ConfigMap, which the kubelet refreshes in place (no restart).

    Added after the spec hash is computed: an operator upgrade does not re-apply (and restart) the Deployments it
    rendered before; a version deployed since carries it (docs/shadow.md)."""
    volumes.append(
        {"name": SHADOW_VOLUME, "configMap": {"name": naming.build_shadow_config_name(model), "optional": True}})
    container.setdefault("volumeMounts", []).append(
        {"name": SHADOW_VOLUME, "mountPath": contract.SHADOW_CONFIG_MOUNT, "readOnly": True})
    container.setdefault("env", []).append(
        {"name": contract.ENV_SHADOW_CONFIG, "value": f"{contract.SHADOW_CONFIG_MOUNT}/{contract.SHADOW_CONFIG_KEY}"})


def build_shadow_settings(url: str, version: str, percent: int, compare: str, tolerance: float) -> str:
    """The shadow settings file (``contract.SHADOW_FILE_KEYS``) the stable's pods read while a shadow step runs."""
    return json.dumps({"url": url, "version": version, "percent": percent, "compare": compare,
                       "tolerance": tolerance}, sort_keys=True)


def build_shadow_config_map(meta: Meta, settings: str) -> dict[str, Any]:
    """The ``<model>-shadow`` ConfigMap: ``settings`` (empty: shadowing off) under ``contract.SHADOW_CONFIG_KEY``."""
    return _with_hash({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": build_object_meta(meta, naming.build_shadow_config_name(meta.name),
                                      naming.build_selector_labels(meta.name) | {naming.LABEL_COMPONENT: "shadow"}),
        "data": {contract.SHADOW_CONFIG_KEY: settings},
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
