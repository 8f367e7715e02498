"""Pod templates a spec may lay over Shipyard's own, the runtime's own settings, and GPU placement. Pure, no I/O.

``spec.serving.podTemplate`` and ``spec.compression.podTemplate`` are typed overlays (``ServingPodTemplate``,
``CompressionPodTemplate``): the fields a user may set, each bounded, with ``x-kubernetes-preserve-unknown-fields`` only
for deep Kubernetes structures (affinity, topology spread, probes of sidecars, the sources of allowed volume types).
Their rules are ``schema.Constraint``s: one declaration gives the CEL rule the API server checks at admission and
the same rule in Python, which the operator's parser applies to stored objects. They refuse, each naming its field:

- what Shipyard owns: on the model container (``server``; ``compress`` in the compression Job) its image, command,
  ports, probes, resources (``spec.serving.resources`` / ``spec.compression.resources``), the environment Shipyard
  sets and a mount at Shipyard's paths; a volume named as one of Shipyard's; the pod labels Shipyard selects on;
- anything the Kubernetes Pod Security ``restricted`` profile forbids (host namespaces, privileged, privilege
  escalation, root, capabilities beyond NET_BIND_SERVICE, seccomp/AppArmor Unconfined, SELinux types and users,
  procMount, unsafe sysctls, host ports, volume types outside the restricted list).

``build_merged_template`` merges an overlay onto the template Shipyard built with strategic-merge semantics (docs/
pods.md): maps merged, containers by name, env by name, volumes and imagePullSecrets by name, volumeMounts by
mountPath, tolerations appended, the model container's args appended to its own. An absent overlay leaves the
template exactly as it was (no restart of existing Deployments on an operator upgrade).

``Server`` is ``spec.serving.server``: flags of ``shipyard-runtime serve`` (``build_server_args``; unset fields add
nothing). ``build_compression_placement`` gives a compression Job whose recipe needs CUDA a GPU and the serving pods'
node placement. ``assess_spec`` is what only the operator can check (a mount over another runtime's model path).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Final, Literal

from pydantic import BeforeValidator, Field, WithJsonSchema

from shipyard import contract
from shipyard.contract import quantity, schema
from shipyard.operator import runtimes

SERVING_CONTAINER: Final = "server"  # objects._build_shipyard_container / _build_runtime_container
COMPRESSION_CONTAINER: Final = "compress"  # objects.build_compression_objects
# objects.ARTIFACTS_VOLUME, CONFIG_VOLUME, TMP_VOLUME, MODEL_VOLUME (a unit test keeps them equal)
RESERVED_VOLUMES: Final = ("artifacts", "compression-config", "tmp", "model-source")
# contract.ARTIFACTS_MOUNT, objects.MODEL_SOURCE_MOUNT, /tmp, contract.COMPRESSION_CONFIG_MOUNT
RESERVED_MOUNTS: Final = (contract.ARTIFACTS_MOUNT, "/model-source", "/tmp", contract.COMPRESSION_CONFIG_MOUNT)
# The environment Shipyard sets on its containers (objects.build_pod_env, _build_runtime_container)
RESERVED_ENV: Final = (contract.ENV_MODEL_NAME, contract.ENV_MODEL_VERSION, contract.ENV_ARTIFACT_PATH,
                       contract.ENV_MAX_BATCH_SIZE, contract.ENV_MAX_DELAY_MS, contract.ENV_COMPILED, contract.ENV_HTTP,
                       contract.ENV_MODEL_PATH, contract.ENV_HTTP_PORT, contract.ENV_GRPC_PORT,
                       contract.ENV_METRICS_PORT, "OMP_NUM_THREADS")
# Pod labels Shipyard selects and watches on (naming.LABEL_*): a copy would move pods between versions.
RESERVED_LABELS: Final = ("shipyard.dev/model", "shipyard.dev/version", "shipyard.dev/component",
                          "shipyard.dev/artifact", "app.kubernetes.io/managed-by")
# Pod Security Standards, restricted profile (https://kubernetes.io/docs/concepts/security/pod-security-standards/)
RESTRICTED_VOLUMES: Final = ("configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                             "projected", "secret")
REFUSED_VOLUMES: Final = ("hostPath", "nfs", "iscsi", "gcePersistentDisk", "awsElasticBlockStore", "gitRepo", "rbd",
                          "cephfs", "cinder", "fc", "flexVolume", "flocker", "glusterfs", "quobyte", "portworxVolume",
                          "scaleIO", "storageos", "azureDisk", "azureFile", "photonPersistentDisk", "vsphereVolume",
                          "image")
SAFE_SYSCTLS: Final = ("kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                       "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                       "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                       "net.ipv4.tcp_keepalive_probes")
SELINUX_TYPES: Final = ("", "container_t", "container_init_t", "container_kvm_t", "container_engine_t")
ADDABLE_CAPABILITIES: Final = ("NET_BIND_SERVICE",)
APPARMOR_ANNOTATION: Final = "container.apparmor.security.beta.kubernetes.io/"
GPU_RESOURCE: Final = "nvidia.com/gpu"
# A sidecar gets what Shipyard's containers have, unless its own securityContext says otherwise (within restricted).
SIDECAR_SECURITY: Final = {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}

DNS_LABEL: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
LABEL_KEY: Final = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE: Final = r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$"
ENV_NAME: Final = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
MAX_KEY: Final = 317
RESTRICTED: Final = "the Pod Security restricted profile forbids it"


def _quote(values: Sequence[str]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


# ---------------------------------------------------------------------------------------------------------------
# Rules: a field refused when set to a bad value, declared once for CEL and Python


def forbid(field: str, bad_cel: str, bad: Callable[[Any], bool], message: str) -> schema.Constraint:
    """``field`` must not hold a value ``bad_cel`` (CEL, ``{v}`` standing for the field) / ``bad`` (Python) flags;
    the API server reports the error at the field's path, ``message`` saying why."""
    value = bad_cel.replace("{v}", f"self.{field}")
    cel = f"!has(self.{field})" if bad_cel == "true" else f"!has(self.{field}) || !({value})"
    return schema.Constraint(
        schema.Cel(cel, message, field_path=f".{field}", reason="FieldValueForbidden"),
        lambda d: f"@{field}: {message}" if d.get(field) is not None and bad(d[field]) else None)


def forbid_set(field: str, message: str) -> schema.Constraint:
    """``field`` must not be set at all."""
    return forbid(field, "true", lambda _: True, message)


def _is_true(value: Any) -> bool:
    return value is True


def _is_false(value: Any) -> bool:
    return value is False


# ---------------------------------------------------------------------------------------------------------------
# Field types

_PRESERVED: Final = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


def _preserved(description: str, **extra: Any) -> Any:
    return WithJsonSchema({**_PRESERVED, "description": description, **extra})


def _quantity_text(value: object) -> object:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


Quantity = Annotated[
    str, BeforeValidator(_quantity_text), Field(max_length=quantity.MAX_LENGTH, pattern=quantity.PATTERN),
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}], "pattern": quantity.PATTERN,
                    "x-kubernetes-int-or-string": True, "maxLength": quantity.MAX_LENGTH})]
ResourceList = Annotated[dict[str, Quantity], Field(json_schema_extra=schema.k8s(
    max_properties=16, validations=[schema.Cel(f"self.all(k, size(k) <= {MAX_KEY})",
                                               f"resource names must be at most {MAX_KEY} characters")]))]
Name = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
Strings = Annotated[tuple[Annotated[str, Field(max_length=4096)], ...], Field(
    max_length=64, json_schema_extra=schema.k8s(list_type="atomic"))]


def _map_rules(what: str, *, values: bool = True) -> list[schema.Cel]:
    rules = [schema.Cel(f"self.all(k, size(k) <= {MAX_KEY})", f"{what} keys must be at most {MAX_KEY} characters"),
             schema.Cel(f"self.all(k, k.matches('{LABEL_KEY}'))",
                        f"{what} keys must be qualified names ([prefix/]name)")]
    if values:
        rules.append(schema.Cel(f"self.all(k, self[k].matches('{LABEL_VALUE}'))",
                                f"{what} values must be label values (alphanumerics, '-', '_', '.')"))
    return rules


NodeSelector = Annotated[dict[str, Annotated[str, Field(max_length=63)]], Field(json_schema_extra=schema.k8s(
    max_properties=32, validations=_map_rules("nodeSelector")))]
Labels = Annotated[dict[str, Annotated[str, Field(max_length=63)]], Field(json_schema_extra=schema.k8s(
    max_properties=32, validations=_map_rules("labels")))]
Annotations = Annotated[dict[str, Annotated[str, Field(max_length=8192)]], Field(json_schema_extra=schema.k8s(
    max_properties=32, validations=_map_rules("annotations", values=False)))]


class Toleration(schema.ApiModel):
    """A toleration, as in a pod spec."""

    __cel__ = (schema.Cel("!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
                          "a toleration with operator Exists must not set value", field_path=".value"),)

    key: Annotated[str, Field(max_length=317)] | None = None
    """Taint key; empty with operator Exists matches every taint."""
    operator: Literal["Exists", "Equal"] | None = None
    """Exists or Equal (default Equal)."""
    value: Annotated[str, Field(max_length=63)] | None = None
    """Taint value matched with operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches all effects."""
    toleration_seconds: Annotated[int, Field(json_schema_extra=schema.k8s(format="int64"))] | None = None
    """For NoExecute, how long the pod stays bound after the taint appears."""

    def as_k8s(self) -> dict[str, object]:
        """The toleration as in a pod spec (camelCase, unset fields left out)."""
        return self.model_dump(by_alias=True, exclude_none=True)


Tolerations = Annotated[tuple[Toleration, ...], Field(max_length=32, json_schema_extra=schema.k8s(list_type="atomic"))]


# ---------------------------------------------------------------------------------------------------------------
# Security contexts (restricted profile)


class SeccompProfile(schema.ApiModel):
    """A seccomp profile: RuntimeDefault or Localhost (Unconfined is refused)."""

    __constraints__ = (forbid("type", "{v} == 'Unconfined'", lambda v: v == "Unconfined",
                              f"seccomp Unconfined: {RESTRICTED} (use RuntimeDefault or Localhost)"),)

    type: Literal["RuntimeDefault", "Localhost", "Unconfined"]
    """RuntimeDefault or Localhost."""
    localhost_profile: Annotated[str, Field(max_length=1024)] | None = None
    """The profile's file on the node, with type Localhost."""


class AppArmorProfile(schema.ApiModel):
    """An AppArmor profile: RuntimeDefault or Localhost (Unconfined is refused)."""

    __constraints__ = (forbid("type", "{v} == 'Unconfined'", lambda v: v == "Unconfined",
                              f"AppArmor Unconfined: {RESTRICTED} (use RuntimeDefault or Localhost)"),)

    type: Literal["RuntimeDefault", "Localhost", "Unconfined"]
    """RuntimeDefault or Localhost."""
    localhost_profile: Annotated[str, Field(max_length=1024)] | None = None
    """The profile loaded on the node, with type Localhost."""


class SELinuxOptions(schema.ApiModel):
    """SELinux labels: type one of the container types, level free; user and role are refused."""

    __constraints__ = (
        forbid("type", f"!({{v}} in {_quote(SELINUX_TYPES)})", lambda v: v not in SELINUX_TYPES,
               f"SELinux types other than {', '.join(t for t in SELINUX_TYPES if t)}: {RESTRICTED}"),
        forbid_set("user", f"a custom SELinux user: {RESTRICTED}"),
        forbid_set("role", f"a custom SELinux role: {RESTRICTED}"),
    )

    type: Annotated[str, Field(max_length=253)] | None = None
    """container_t, container_init_t, container_kvm_t or container_engine_t."""
    level: Annotated[str, Field(max_length=253)] | None = None
    """The SELinux level (MCS categories)."""
    user: Annotated[str, Field(max_length=253)] | None = None
    """Refused (restricted profile)."""
    role: Annotated[str, Field(max_length=253)] | None = None
    """Refused (restricted profile)."""


class Capabilities(schema.ApiModel):
    """Linux capabilities: drop must keep ALL; only NET_BIND_SERVICE may be added."""

    __constraints__ = (
        forbid("add", f"{{v}}.exists(c, !(c in {_quote(ADDABLE_CAPABILITIES)}))",
               lambda v: any(c not in ADDABLE_CAPABILITIES for c in v),
               f"capabilities other than NET_BIND_SERVICE: {RESTRICTED}"),
        forbid("drop", "!('ALL' in {v})", lambda v: "ALL" not in v,
               f"keeping capabilities (drop must contain ALL): {RESTRICTED}"),
    )

    add: Annotated[tuple[Annotated[str, Field(max_length=64)], ...], Field(
        max_length=16, json_schema_extra=schema.k8s(list_type="atomic"))] | None = None
    """Added capabilities: at most NET_BIND_SERVICE."""
    drop: Annotated[tuple[Annotated[str, Field(max_length=64)], ...], Field(
        max_length=64, json_schema_extra=schema.k8s(list_type="atomic"))] | None = None
    """Dropped capabilities; must contain ALL (Shipyard's default)."""


def _root_rules() -> tuple[schema.Constraint, ...]:
    return (forbid("runAsNonRoot", "{v} == false", _is_false, f"runAsNonRoot false: {RESTRICTED}"),
            forbid("runAsUser", "{v} == 0", lambda v: v == 0, f"runAsUser 0 (root): {RESTRICTED}"))


class Sysctl(schema.ApiModel):
    """A namespaced sysctl: only the safe set of the baseline profile."""

    __constraints__ = (forbid("name", f"!({{v}} in {_quote(SAFE_SYSCTLS)})", lambda v: v not in SAFE_SYSCTLS,
                              f"sysctls outside the safe set ({', '.join(SAFE_SYSCTLS)}): {RESTRICTED}"),)

    name: Annotated[str, Field(min_length=1, max_length=253)]
    """Sysctl name."""
    value: Annotated[str, Field(max_length=253)]
    """Sysctl value."""


class PodSecurityContext(schema.ApiModel):
    """The pod's security context, merged field by field onto Shipyard's (runAsNonRoot, seccomp RuntimeDefault)."""

    __constraints__ = _root_rules()

    run_as_non_root: bool | None = None
    """Must stay true (restricted)."""
    run_as_user: Annotated[int, Field(ge=0, le=2147483647, json_schema_extra=schema.k8s(format="int64"))] | None = None
    """UID of the containers' processes; not 0."""
    run_as_group: Annotated[int, Field(ge=0, le=2147483647, json_schema_extra=schema.k8s(format="int64"))] | None = None
    """GID of the containers' processes."""
    fs_group: Annotated[int, Field(ge=0, le=2147483647, json_schema_extra=schema.k8s(format="int64"))] | None = None
    """Group owning the pod's volumes."""
    fs_group_change_policy: Literal["OnRootMismatch", "Always"] | None = None
    """When volume ownership is changed to fsGroup."""
    supplemental_groups: Annotated[tuple[Annotated[int, Field(ge=0, le=2147483647, json_schema_extra=schema.k8s(
        format="int64"))], ...], Field(max_length=32, json_schema_extra=schema.k8s(list_type="atomic"))] | None = None
    """Extra groups of the containers' processes."""
    seccomp_profile: SeccompProfile | None = None
    """RuntimeDefault (Shipyard's) or Localhost."""
    app_armor_profile: AppArmorProfile | None = None
    """RuntimeDefault or Localhost."""
    se_linux_options: SELinuxOptions | None = Field(default=None, alias="seLinuxOptions")
    """SELinux labels of the pod."""
    sysctls: Annotated[tuple[Sysctl, ...], Field(max_length=16, json_schema_extra=schema.k8s(
        list_type="atomic"))] | None = None
    """Namespaced sysctls of the safe set only."""


class SecurityContext(schema.ApiModel):
    """A container's security context, merged field by field onto Shipyard's (no privilege escalation, capabilities
    dropped, non-root)."""

    __constraints__ = (
        forbid("privileged", "{v} == true", _is_true, f"privileged: {RESTRICTED}"),
        forbid("allowPrivilegeEscalation", "{v} == true", _is_true, f"allowPrivilegeEscalation true: {RESTRICTED}"),
        forbid("procMount", "{v} != 'Default'", lambda v: v != "Default", f"procMount Unmasked: {RESTRICTED}"),
        *_root_rules(),
    )

    privileged: bool | None = None
    """Refused when true."""
    allow_privilege_escalation: bool | None = None
    """Must stay false (restricted)."""
    run_as_non_root: bool | None = None
    """Must stay true (restricted)."""
    run_as_user: Annotated[int, Field(ge=0, le=2147483647, json_schema_extra=schema.k8s(format="int64"))] | None = None
    """UID of the container's process; not 0."""
    run_as_group: Annotated[int, Field(ge=0, le=2147483647, json_schema_extra=schema.k8s(format="int64"))] | None = None
    """GID of the container's process."""
    read_only_root_filesystem: bool | None = None
    """Whether the root filesystem is read-only."""
    capabilities: Capabilities | None = None
    """Capabilities: drop keeps ALL, add at most NET_BIND_SERVICE."""
    seccomp_profile: SeccompProfile | None = None
    """RuntimeDefault or Localhost."""
    app_armor_profile: AppArmorProfile | None = None
    """RuntimeDefault or Localhost."""
    se_linux_options: SELinuxOptions | None = Field(default=None, alias="seLinuxOptions")
    """SELinux labels of the container."""
    proc_mount: Literal["Default", "Unmasked"] | None = None
    """Default only (restricted)."""


# ---------------------------------------------------------------------------------------------------------------
# Containers


class KeySelector(schema.ApiModel):
    """A key of a Secret or ConfigMap in the namespace (the kubelet reads it; the operator never does)."""

    name: Name
    """Name of the Secret or ConfigMap."""
    key: Annotated[str, Field(min_length=1, max_length=253)]
    """The key."""
    optional: bool | None = None
    """Whether the pod starts without it."""


class EnvVarSource(schema.ApiModel):
    """Where a variable's value comes from: exactly one source."""

    __constraints__ = schema.one_of("secretKeyRef", "configMapKeyRef", "fieldRef", "resourceFieldRef",
                                    what="valueFrom")

    secret_key_ref: KeySelector | None = None
    """A key of a Secret."""
    config_map_key_ref: KeySelector | None = None
    """A key of a ConfigMap."""
    field_ref: Annotated[dict[str, Any] | None, _preserved(
        "A field of the pod (fieldPath, as in a pod spec).", required=["fieldPath"])] = None
    resource_field_ref: Annotated[dict[str, Any] | None, _preserved(
        "A resource of a container (resource, containerName, divisor).", required=["resource"])] = None


class EnvVar(schema.ApiModel):
    """An environment variable: a value, or valueFrom (a Secret's key, a ConfigMap's, a field of the pod)."""

    __constraints__ = (schema.Constraint(
        schema.Cel("!has(self.value) || !has(self.valueFrom)", "an env variable sets value or valueFrom, not both",
                   field_path=".valueFrom", reason="FieldValueForbidden"),
        lambda d: "@valueFrom: an env variable sets value or valueFrom, not both"
        if d.get("value") is not None and d.get("valueFrom") is not None else None),)

    name: Annotated[str, Field(min_length=1, max_length=256, pattern=ENV_NAME)]
    """Variable name."""
    value: Annotated[str, Field(max_length=32768)] | None = None
    """Plain value ($(VAR) references expanded by Kubernetes)."""
    value_from: EnvVarSource | None = None
    """The value's source."""


class LocalReference(schema.ApiModel):
    """A Secret or ConfigMap of the namespace."""

    name: Name
    """Its name."""
    optional: bool | None = None
    """Whether the pod starts without it."""


class EnvFromSource(schema.ApiModel):
    """Every key of a Secret or ConfigMap as variables."""

    __constraints__ = schema.one_of("secretRef", "configMapRef", what="envFrom")

    prefix: Annotated[str, Field(max_length=253)] | None = None
    """Prefix of every variable's name."""
    secret_ref: LocalReference | None = None
    """A Secret."""
    config_map_ref: LocalReference | None = None
    """A ConfigMap."""


class ContainerPort(schema.ApiModel):
    """A port of a sidecar container (no hostPort)."""

    __constraints__ = (forbid("hostPort", "{v} != 0", lambda v: v != 0, f"hostPort: {RESTRICTED}"),)

    name: Annotated[str, Field(max_length=15, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")] | None = None
    """Port name."""
    container_port: Annotated[int, Field(ge=1, le=65535)]
    """Port number."""
    protocol: Literal["TCP", "UDP", "SCTP"] | None = None
    """TCP (default), UDP or SCTP."""
    host_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    """Refused (restricted profile)."""


def _reserved_mount_cel(path: str) -> str:
    return " || ".join(f"{path} == '{p}' || {path}.startsWith('{p}/')" for p in RESERVED_MOUNTS)


def _reserved_mount(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in RESERVED_MOUNTS)


class VolumeMount(schema.ApiModel):
    """A volume mounted in a container."""

    name: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)]
    """The volume's name (spec.volumes)."""
    mount_path: Annotated[str, Field(min_length=1, max_length=1024, pattern="^/")]
    """Where it appears in the container."""
    read_only: bool | None = None
    """Mounted read-only."""
    sub_path: Annotated[str, Field(max_length=1024)] | None = None
    """A path inside the volume to mount instead of its root."""
    sub_path_expr: Annotated[str, Field(max_length=1024)] | None = None
    """subPath with $(VAR) expansion."""


_PROBE = "As in a container spec (httpGet, grpc, tcpSocket, exec; timings)."


class Container(schema.ApiModel):
    """A container: the model container (named as Shipyard's, merged onto it) or a sidecar (any other name, added;
    it must set image)."""

    name: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)]
    """Container name: Shipyard's model container's name merges onto it; another name adds a sidecar."""
    image: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    """Image of a sidecar (the model container's is spec.image)."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    """When the image is pulled."""
    command: Strings | None = None
    """Entrypoint of a sidecar."""
    args: Strings | None = None
    """Arguments; on the model container they are appended to Shipyard's."""
    working_dir: Annotated[str, Field(max_length=1024)] | None = None
    """Working directory."""
    env: Annotated[tuple[EnvVar, ...], Field(max_length=64, json_schema_extra=schema.k8s(
        list_type="map", list_map_keys=["name"]))] | None = None
    """Environment variables, merged by name."""
    env_from: Annotated[tuple[EnvFromSource, ...], Field(max_length=16, json_schema_extra=schema.k8s(
        list_type="atomic"))] | None = None
    """Secrets and ConfigMaps whose keys become variables (appended)."""
    ports: Annotated[tuple[ContainerPort, ...], Field(max_length=16, json_schema_extra=schema.k8s(
        list_type="atomic"))] | None = None
    """Ports of a sidecar."""
    resources: Annotated[dict[str, ResourceList], Field(json_schema_extra=schema.k8s(
        max_properties=2, validations=[schema.Cel("self.all(k, k in ['requests', 'limits'])",
                                                  "resources has requests and limits only")]))] | None = None
    """Resources of a sidecar (requests, limits)."""
    volume_mounts: Annotated[tuple[VolumeMount, ...], Field(max_length=32, json_schema_extra=schema.k8s(
        list_type="map", list_map_keys=["mountPath"]))] | None = None
    """Volume mounts, merged by mountPath."""
    security_context: SecurityContext | None = None
    """Merged field by field onto Shipyard's (a sidecar starts from the same: no privilege escalation, capabilities
    dropped, non-root)."""
    readiness_probe: Annotated[dict[str, Any] | None, _preserved(f"Readiness probe of a sidecar. {_PROBE}")] = None
    liveness_probe: Annotated[dict[str, Any] | None, _preserved(f"Liveness probe of a sidecar. {_PROBE}")] = None
    startup_probe: Annotated[dict[str, Any] | None, _preserved(f"Startup probe of a sidecar. {_PROBE}")] = None
    lifecycle: Annotated[dict[str, Any] | None, _preserved(
        "postStart and preStop hooks, as in a container spec.")] = None


def _owned_rules(owner: str, resources_field: str) -> tuple[schema.Constraint, ...]:
    """What a container named ``owner`` (Shipyard's model container) must not set, and what a sidecar must."""

    def on_owner(field: str, message: str, bad_cel: str = "true",
                 bad: Callable[[Any], bool] = lambda _: True) -> schema.Constraint:
        return schema.Constraint(
            schema.Cel(f"self.name != '{owner}' || !has(self.{field}) || !({bad_cel.replace('{v}', f'self.{field}')})",
                       f"{field} of the {owner} container: {message}", field_path=f".{field}",
                       reason="FieldValueForbidden"),
            lambda d: f"@{field}: {message}" if d.get("name") == owner and d.get(field) is not None and bad(d[field])
            else None)

    owned = "is Shipyard's"
    return (
        on_owner("image", f"{owned} (the version's image, spec.image)"),
        on_owner("command", f"{owned} (add args instead)"),
        on_owner("ports", f"{owned} (the serving ports)"),
        *(on_owner(p, f"{owned} (it knows when the model is loaded)")
          for p in ("readinessProbe", "livenessProbe", "startupProbe")),
        on_owner("resources", f"{owned}: set {resources_field}"),
        on_owner("env", f"variables {', '.join(RESERVED_ENV)} are Shipyard's",
                 f"{{v}}.exists(e, e.name in {_quote(RESERVED_ENV)})",
                 lambda v: any(e.name in RESERVED_ENV for e in v)),
        on_owner("volumeMounts", f"mounts at {', '.join(RESERVED_MOUNTS)} (and below) are Shipyard's",
                 f"{{v}}.exists(m, {_reserved_mount_cel('m.mountPath')})",
                 lambda v: any(_reserved_mount(m.mount_path) for m in v)),
        schema.Constraint(
            schema.Cel(f"self.name == '{owner}' || has(self.image)",
                       f"a sidecar container must set image (the model container is named {owner})",
                       field_path=".image", reason="FieldValueRequired"),
            lambda d: None if d.get("name") == owner or d.get("image") is not None else
            f"@image: a sidecar container must set image (the model container is named {owner})"),
    )


class ServingContainer(Container):
    """A container of the inference pods: server (Shipyard's model container) or a sidecar."""

    __constraints__ = _owned_rules(SERVING_CONTAINER, "spec.serving.resources")


class CompressionContainer(Container):
    """A container of the compression Job's pod: compress (Shipyard's) or a sidecar."""

    __constraints__ = _owned_rules(COMPRESSION_CONTAINER, "spec.compression.resources")


class InitContainer(Container):
    """An init container (runs before the model container; a name of its own, an image)."""

    __constraints__ = (
        forbid("name", f"{{v}} in ['{SERVING_CONTAINER}', '{COMPRESSION_CONTAINER}']",
               lambda v: v in (SERVING_CONTAINER, COMPRESSION_CONTAINER), "is the name of Shipyard's container"),
        schema.Constraint(schema.Cel("has(self.image)", "an init container must set image", field_path=".image",
                                     reason="FieldValueRequired"),
                          lambda d: None if d.get("image") is not None else "@image: an init container must set image"),
    )


# ---------------------------------------------------------------------------------------------------------------
# Volumes


_VOLUME_SOURCE = "The volume's source, as in a pod spec."
_REFUSED_SOURCE = f"Refused: not a volume type of the restricted profile ({', '.join(RESTRICTED_VOLUMES)})."
Refused = Annotated[dict[str, Any] | None, _preserved(_REFUSED_SOURCE)]


class Volume(schema.ApiModel):
    """A volume of the pod: one source of the restricted profile's types."""

    __constraints__ = (
        forbid("name", f"{{v}} in {_quote(RESERVED_VOLUMES)}", lambda v: v in RESERVED_VOLUMES,
               f"volumes {', '.join(RESERVED_VOLUMES)} are Shipyard's"),
        *(forbid_set(t, f"{t} volumes: {RESTRICTED} (allowed: {', '.join(RESTRICTED_VOLUMES)})")
          for t in REFUSED_VOLUMES),
        schema.Constraint(
            schema.Cel(" + ".join(f"(has(self.{t}) ? 1 : 0)" for t in RESTRICTED_VOLUMES) + " <= 1",
                       "a volume sets one source", reason="FieldValueForbidden"),
            lambda d: None if sum(d.get(t) is not None for t in RESTRICTED_VOLUMES) <= 1 else
            "a volume sets one source"),
    )

    name: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)]
    """Volume name (not one of Shipyard's: artifacts, compression-config, tmp, model-source)."""
    config_map: Annotated[dict[str, Any] | None, _preserved(_VOLUME_SOURCE)] = None
    csi: Annotated[dict[str, Any] | None, _preserved(_VOLUME_SOURCE)] = None
    downward_api: Annotated[dict[str, Any] | None, _preserved(_VOLUME_SOURCE)] = Field(default=None,
                                                                                      alias="downwardAPI")
    empty_dir: Annotated[dict[str, Any] | None, _preserved(_VOLUME_SOURCE)] = None
    ephemeral: Annotated[dict[str, Any] | None, _preserved(_VOLUME_SOURCE)] = None
    persistent_volume_claim: Annotated[dict[str, Any] | None, _preserved(_VOLUME_SOURCE)] = None
    projected: Annotated[dict[str, Any] | None, _preserved(_VOLUME_SOURCE)] = None
    secret: Annotated[dict[str, Any] | None, _preserved(_VOLUME_SOURCE)] = None
    host_path: Refused = None
    nfs: Refused = None
    iscsi: Refused = None
    gce_persistent_disk: Refused = None
    aws_elastic_block_store: Refused = None
    git_repo: Refused = None
    rbd: Refused = None
    cephfs: Refused = None
    cinder: Refused = None
    fc: Refused = None
    flex_volume: Refused = None
    flocker: Refused = None
    glusterfs: Refused = None
    quobyte: Refused = None
    portworx_volume: Refused = None
    scale_io: Refused = Field(default=None, alias="scaleIO")
    storageos: Refused = None
    azure_disk: Refused = None
    azure_file: Refused = None
    photon_persistent_disk: Refused = None
    vsphere_volume: Refused = None
    image: Refused = None


# ---------------------------------------------------------------------------------------------------------------
# The pod template


def _forbid_label(label: str) -> schema.Constraint:
    return forbid("labels", f"'{label}' in {{v}}", lambda v: label in v,
                  f"label {label} is Shipyard's (it selects and watches pods by it)")


class PodMetadata(schema.ApiModel):
    """Labels and annotations of the pods, merged onto Shipyard's (its own labels are refused)."""

    __constraints__ = (
        *(_forbid_label(label) for label in RESERVED_LABELS),
        forbid("annotations", f"{{v}}.exists(k, k.startsWith('{APPARMOR_ANNOTATION}') && self.annotations[k] != "
                              "'runtime/default' && !self.annotations[k].startsWith('localhost/'))",
               lambda v: any(k.startswith(APPARMOR_ANNOTATION) and val != "runtime/default"
                             and not val.startswith("localhost/") for k, val in v.items()),
               f"an AppArmor profile other than runtime/default or localhost/*: {RESTRICTED}"),
    )

    labels: Labels | None = None
    """Pod labels (not Shipyard's: shipyard.dev/model, version, component, artifact, app.kubernetes.io/managed-by)."""
    annotations: Annotations | None = None
    """Pod annotations."""


def _host_rule(field: str) -> schema.Constraint:
    return forbid(field, "{v} == true", _is_true, f"{field} true: {RESTRICTED}")


class PodSpec(schema.ApiModel):
    """The pod spec fields a template may set; the rest is Shipyard's."""

    __constraints__ = (_host_rule("hostNetwork"), _host_rule("hostPID"), _host_rule("hostIPC"))

    service_account_name: Name | None = None
    """ServiceAccount of the pods (its token is mounted only with automountServiceAccountToken true)."""
    automount_service_account_token: bool | None = None
    """Mount the ServiceAccount's token (Shipyard's default: false)."""
    image_pull_secrets: Annotated[tuple[LocalReference, ...], Field(max_length=16, json_schema_extra=schema.k8s(
        list_type="map", list_map_keys=["name"]))] | None = None
    """Secrets to pull the images with (merged by name)."""
    affinity: Annotated[dict[str, Any] | None, _preserved(
        "Node and pod (anti-)affinity, as in a pod spec (nodeAffinity, podAffinity, podAntiAffinity).")] = None
    topology_spread_constraints: Annotated[tuple[Annotated[dict[str, Any], WithJsonSchema({
        **_PRESERVED, "required": ["maxSkew", "topologyKey", "whenUnsatisfiable"],
        "description": "A topology spread constraint, as in a pod spec."})], ...], Field(
        max_length=8, json_schema_extra=schema.k8s(list_type="atomic"))] | None = None
    """How the pods spread over zones and nodes (appended)."""
    priority_class_name: Name | None = None
    """PriorityClass of the pods."""
    runtime_class_name: Name | None = None
    """RuntimeClass of the pods (e.g. nvidia)."""
    scheduler_name: Name | None = None
    """Scheduler of the pods."""
    termination_grace_period_seconds: Annotated[int, Field(ge=0, le=86400)] | None = None
    """Seconds a stopping pod is given (Shipyard's: 30, which its server's drain fits in)."""
    dns_policy: Literal["ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"] | None = None
    """DNS policy."""
    dns_config: Annotated[dict[str, Any] | None, _preserved("DNS settings (nameservers, searches, options).")] = None
    node_selector: NodeSelector | None = None
    """Node labels, merged onto spec.serving.nodeSelector."""
    tolerations: Tolerations | None = None
    """Tolerations, appended to Shipyard's."""
    security_context: PodSecurityContext | None = None
    """The pod's security context, merged field by field onto Shipyard's."""
    volumes: Annotated[tuple[Volume, ...], Field(max_length=32, json_schema_extra=schema.k8s(
        list_type="map", list_map_keys=["name"]))] | None = None
    """Extra volumes (types of the restricted profile; not Shipyard's names)."""
    init_containers: Annotated[tuple[InitContainer, ...], Field(max_length=4, json_schema_extra=schema.k8s(
        list_type="map", list_map_keys=["name"]))] | None = None
    """Init containers, run before Shipyard's container."""
    host_network: bool | None = None
    """Refused when true (restricted profile)."""
    host_pid: bool | None = Field(default=None, alias="hostPID")
    """Refused when true (restricted profile)."""
    host_ipc: bool | None = Field(default=None, alias="hostIPC")
    """Refused when true (restricted profile)."""


class ServingPodSpec(PodSpec):
    """The inference pods' spec fields a template may set."""

    containers: Annotated[tuple[ServingContainer, ...], Field(max_length=8, json_schema_extra=schema.k8s(
        list_type="map", list_map_keys=["name"]))] | None = None
    """server (merged onto Shipyard's model container: args, env, envFrom, volumeMounts, securityContext,
    workingDir, lifecycle) and sidecars (any other name, with an image)."""


class CompressionPodSpec(PodSpec):
    """The compression Job pod's spec fields a template may set."""

    containers: Annotated[tuple[CompressionContainer, ...], Field(max_length=8, json_schema_extra=schema.k8s(
        list_type="map", list_map_keys=["name"]))] | None = None
    """compress (merged onto Shipyard's: args, env, envFrom, volumeMounts, securityContext, workingDir) and
    sidecars (any other name, with an image)."""


class ServingPodTemplate(schema.ApiModel):
    """A pod template merged onto the inference pods' (docs/pods.md): service account, env from Secrets, scheduling
    (affinity, topology spread, priority, node selector, tolerations), labels, annotations, volumes, sidecars. Fields
    Shipyard owns and anything the Pod Security restricted profile forbids are refused. Changing it rolls the
    spec's version's pods."""

    metadata: PodMetadata | None = None
    """Labels and annotations of the pods."""
    spec: ServingPodSpec | None = None
    """The pod spec fields to merge."""


class CompressionPodTemplate(schema.ApiModel):
    """A pod template merged onto the compression Job's pod (docs/pods.md), with the same rules as
    spec.serving.podTemplate; its nodeSelector and tolerations replace the serving pods' that a CUDA recipe's Job
    otherwise gets."""

    metadata: PodMetadata | None = None
    """Labels and annotations of the Job's pod."""
    spec: CompressionPodSpec | None = None
    """The pod spec fields to merge."""


# ---------------------------------------------------------------------------------------------------------------
# The merge


def _merge_by(base: Sequence[Mapping[str, Any]], extra: Sequence[Mapping[str, Any]],
              key: Callable[[Mapping[str, Any]], object],
              merge: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]] | None = None,
              ) -> list[dict[str, Any]]:
    """``base`` with each item of ``extra`` merged onto the item of the same key (replacing it without ``merge``),
    or appended."""
    out = [dict(item) for item in base]
    for item in extra:
        index = next((i for i, b in enumerate(out) if key(b) == key(item)), None)
        if index is None:
            out.append(dict(item))
        else:
            out[index] = merge(out[index], item) if merge else dict(item)
    return out


def _merge_maps(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """A field-by-field merge: nested maps merged, anything else (lists too) replaced."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge_maps(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_container(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if key == "env":
            out[key] = _merge_by(out.get(key) or [], value, lambda e: e.get("name"))
        elif key == "volumeMounts":
            out[key] = _merge_by(out.get(key) or [], value, lambda m: m.get("mountPath"))
        elif key in ("envFrom", "args"):
            out[key] = [*(out.get(key) or []), *value]
        elif key in ("securityContext", "resources") and isinstance(value, Mapping):
            out[key] = _merge_maps(out.get(key) or {}, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _sidecar(container: Mapping[str, Any]) -> dict[str, Any]:
    return _merge_container({"name": container["name"], "securityContext": copy.deepcopy(SIDECAR_SECURITY)},
                            container)


def build_overlay(template: ServingPodTemplate | CompressionPodTemplate | None) -> dict[str, Any]:
    """The overlay as a pod template document (only the fields set)."""
    if template is None:
        return {}
    return template.model_dump(mode="json", by_alias=True, exclude_none=True)


def build_merged_template(template: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Shipyard's pod ``template`` ({metadata, spec}) with ``overlay`` merged onto it (strategic-merge semantics, see
    the module docstring). Pure: neither argument is changed; an empty overlay returns an equal template."""
    out = copy.deepcopy(dict(template))
    if not overlay:
        return out
    metadata = overlay.get("metadata") or {}
    meta = out.setdefault("metadata", {})
    if metadata.get("labels"):
        meta["labels"] = {**metadata["labels"], **(meta.get("labels") or {})}  # Shipyard's labels win
    if metadata.get("annotations"):
        meta["annotations"] = {**(meta.get("annotations") or {}), **metadata["annotations"]}
    spec = out.setdefault("spec", {})
    for key, value in (overlay.get("spec") or {}).items():
        if key == "containers":
            spec[key] = _merge_by(spec.get(key) or [], [], lambda c: c.get("name"))
            for container in value:
                index = next((i for i, c in enumerate(spec[key]) if c.get("name") == container["name"]), None)
                if index is None:
                    spec[key].append(_sidecar(container))
                else:
                    spec[key][index] = _merge_container(spec[key][index], container)
        elif key == "initContainers":
            spec[key] = _merge_by(spec.get(key) or [], [_sidecar(c) for c in value], lambda c: c.get("name"))
        elif key in ("volumes", "imagePullSecrets"):
            spec[key] = _merge_by(spec.get(key) or [], value, lambda v: v.get("name"))
        elif key == "tolerations":
            spec[key] = [*(spec.get(key) or []), *(t for t in value if t not in (spec.get(key) or []))]
        elif key == "topologySpreadConstraints":
            spec[key] = _merge_by(spec.get(key) or [], value,
                                  lambda t: (t.get("topologyKey"), t.get("whenUnsatisfiable")))
        elif key in ("nodeSelector", "securityContext"):
            spec[key] = _merge_maps(spec.get(key) or {}, value)
        else:
            spec[key] = copy.deepcopy(value)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The runtime's own settings (spec.serving.server)


class Server(schema.ApiModel):
    """Settings of Shipyard's own server (shipyard-runtime serve), rendered as its flags; unset fields keep the
    server's defaults and the pod template as it was. Not with spec.serving.runtime."""

    device: Annotated[str, Field(max_length=64, pattern=r"^(auto|cpu|cuda(:[0-9]+(,[0-9]+)*)?)$")] | None = None
    """--device: auto (every GPU, else CPU), cpu, cuda, cuda:N[,M]. Default auto."""
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    """--dtype of the served model. Default float32."""
    compile: bool | None = None
    """--compile: torch.compile the model before warm-up. Default false."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None
    """--compile-mode of torch.compile (with compile true)."""
    max_queue: Annotated[int, Field(ge=1, le=1000000)] | None = None
    """--max-queue: queued requests before 503. Default 512."""
    max_payload_bytes: Annotated[int, Field(ge=1024, le=1073741824)] | None = None
    """--max-payload-bytes: request body limit (413 above). Default 16 MiB."""
    request_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] | None = None
    """--request-timeout-s: per-request timeout (504). Default 30."""
    threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    """--threads: torch intra-op threads. Default: from the CPU limit."""
    warmup_iterations: Annotated[int, Field(ge=0, le=1000)] | None = None
    """--warmup-iterations per warm-up batch size. Default 3."""
    batch_sizing: Literal["measured", "max"] | None = None
    """--batch-sizing: measured (the fastest timed size) or max. Default measured."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] | None = None
    """--log-level of the server. Default INFO."""


SERVER_FLAGS: Final = {  # wire name -> flag of shipyard-runtime serve (runtime/shipyard/runtime/server/settings.py)
    "device": "--device", "dtype": "--dtype", "compile": "--compile", "compileMode": "--compile-mode",
    "maxQueue": "--max-queue", "maxPayloadBytes": "--max-payload-bytes",
    "requestTimeoutSeconds": "--request-timeout-s", "threads": "--threads", "warmupIterations": "--warmup-iterations",
    "batchSizing": "--batch-sizing", "logLevel": "--log-level",
}


def build_server_args(server: Server | None) -> list[str]:
    """The serve flags of ``server``'s set fields, in declaration order; [] when none is set."""
    if server is None:
        return []
    args: list[str] = []
    for key, value in server.model_dump(by_alias=True, exclude_none=True).items():
        flag = SERVER_FLAGS[key]
        if isinstance(value, bool):
            args += [flag] if value else []
        elif isinstance(value, float):
            args += [flag, f"{value:g}"]
        else:
            args += [flag, str(value)]
    return args


SERVER_NOT_WITH_RUNTIME: Final = schema.Constraint(
    schema.Cel("!has(self.server) || !has(self.runtime)",
               "spec.serving.server configures Shipyard's server (shipyard-runtime serve), and spec.serving.runtime "
               "replaces it with another: set the runtime's own flags in spec.serving.runtime.args",
               field_path=".server", reason="FieldValueForbidden"),
    lambda d: "@server: configures Shipyard's server, and spec.serving.runtime replaces it with another: set the "
              "runtime's own flags in spec.serving.runtime.args"
    if d.get("server") is not None and d.get("runtime") is not None else None)


# ---------------------------------------------------------------------------------------------------------------
# GPU placement


CUDA_SCHEMES: Final = ("fp8", "int4-weight-only")


def _needs_cuda(compression: Any) -> bool:
    return compression is not None and bool(compression.needs_cuda)


def _has_gpus(resources: Any) -> bool:
    for kind in (resources.limits, resources.requests):
        value = kind.get(GPU_RESOURCE)
        if value is not None and str(value) not in ("0", ""):
            return True
    return False


CUDA_ARTIFACT_NEEDS_GPU_PODS: Final = schema.Constraint(
    schema.Cel(
        "!has(self.compression) || !self.compression.steps.exists(s, has(s.quantize) && "
        f"s.quantize.scheme in {_quote(CUDA_SCHEMES)}) || (has(self.serving) && has(self.serving.resources) && "
        "has(self.serving.resources.limits) && 'nvidia.com/gpu' in self.serving.resources.limits && "
        "string(self.serving.resources.limits['nvidia.com/gpu']) != '0')",
        "spec.compression.steps[].quantize.scheme fp8 and int4-weight-only make a CUDA-only artifact, and "
        "spec.serving.resources requests no GPU: give the inference pods nvidia.com/gpu in "
        "spec.serving.resources.limits, or quantize with an int8 scheme", field_path=".serving.resources",
        reason="FieldValueInvalid"),
    lambda d: "@serving.resources: spec.compression.steps[].quantize.scheme fp8 and int4-weight-only make a "
              "CUDA-only artifact, and spec.serving.resources requests no GPU: give the inference pods nvidia.com/gpu "
              "in spec.serving.resources.limits, or quantize with an int8 scheme"
    if _needs_cuda(d.get("compression")) and d.get("serving") is not None
    and d["serving"].resources.gpus <= 0 else None)


def build_compression_placement(compression: Any, serving: Any) -> tuple[dict[str, str], dict[str, Any]]:
    """(resources to add to the compression container, pod spec fields) for a recipe that needs CUDA: one
    nvidia.com/gpu unless spec.compression.resources asks for GPUs, and the serving pods' nodeSelector and tolerations
    (spec.serving and its podTemplate) unless spec.compression.podTemplate sets its own. ({}, {}) otherwise."""
    if not _needs_cuda(compression):
        return {}, {}
    limits = {} if _has_gpus(compression.resources) else {GPU_RESOURCE: "1"}
    own = build_overlay(compression.pod_template).get("spec") or {}
    serving_overlay = build_overlay(serving.pod_template).get("spec") or {}
    fields: dict[str, Any] = {}
    if "nodeSelector" not in own:
        selector = {**serving.node_selector, **(serving_overlay.get("nodeSelector") or {})}
        if selector:
            fields["nodeSelector"] = selector
    if "tolerations" not in own:
        tolerations = [t.as_k8s() for t in serving.tolerations]
        tolerations += [t for t in serving_overlay.get("tolerations") or [] if t not in tolerations]
        if tolerations:
            fields["tolerations"] = tolerations
    return limits, fields


# ---------------------------------------------------------------------------------------------------------------
# What only the operator checks


def assess_spec(spec: Any, path: str = "spec") -> tuple[str, str] | None:
    """(field, problem) of what admission cannot check, None when fine: a mount of the model container over another
    runtime's model path (spec.serving.runtime.modelMountPath, or its preset's)."""
    serving = spec.serving
    if serving.runtime is None or serving.pod_template is None or serving.pod_template.spec is None:
        return None
    model_path = runtimes.resolve_runtime(serving.runtime).model_mount_path.rstrip("/")
    for i, container in enumerate(serving.pod_template.spec.containers or ()):
        if container.name != SERVING_CONTAINER:
            continue
        for j, mount in enumerate(container.volume_mounts or ()):
            if mount.mount_path.rstrip("/") == model_path or mount.mount_path.startswith(model_path + "/"):
                return (f"{path}.serving.podTemplate.spec.containers[{i}].volumeMounts[{j}].mountPath",
                        f"{mount.mount_path} is where the runtime's model is mounted "
                        f"({path}.serving.runtime.modelMountPath {model_path}): Shipyard's")
    return None
