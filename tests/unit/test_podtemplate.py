"""Unit tests of shipyard.operator.podtemplate and shipyard.operator.disruption: the pod template overlay (its merge
onto Shipyard's templates, the fields Shipyard owns and the Pod Security restricted profile refused by the Python
twin of each admission rule), spec.serving.server's flags (accepted by the runtime's own parser), GPU placement of
compression Jobs, and the PodDisruptionBudgets per live version. What the API server refuses at admission (the CEL
side of the same rules) is tests/integration/test_pod_template.py. No I/O.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from shipyard import contract
from shipyard.operator import disruption, naming, objects, observed, planning, podtemplate
from shipyard.operator import spec as spec_mod
from shipyard.runtime.server import settings as server_settings
from tests import plansim

SECRET_ENV = {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "model-token", "key": "token"}}}
AFFINITY = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ml"]}]}]}}}


def body(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": naming.API_VERSION, "kind": naming.KIND,
            "metadata": {"name": "digits", "namespace": "ml", "uid": "u-1", "generation": 1},
            "spec": {"image": "registry.example/digits:1.0.0", "model": {"path": "/models/digits"}, **spec}}


def parse(**spec: Any) -> spec_mod.ModelDeployment:
    return spec_mod.parse_model_deployment(body(**spec))


def deployment(**spec: Any) -> dict[str, Any]:
    md = parse(**spec)
    return objects.build_deployment(objects.build_meta(body(**spec)), md, md.spec.version, md.spec.image, 2)


def pod(**spec: Any) -> dict[str, Any]:
    template: dict[str, Any] = deployment(**spec)["spec"]["template"]
    return template


COMPRESSION = {"steps": [{"quantize": {"scheme": "int8-dynamic"}}], "evaluation": {"dataset": "builtin:digits"},
               "artifacts": {"pvc": "artifacts"}}


def job_pod(compression: dict[str, Any], serving: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = {"compression": compression, **({"serving": serving} if serving else {})}
    md = parse(**spec)
    assert md.spec.compression is not None
    key = objects.build_artifact_key(md.spec.image, md.spec.compression.build_recipe())
    _, job = objects.build_compression_objects(md, objects.build_meta(body(**spec)), md.spec.version, key)
    template: dict[str, Any] = job["spec"]["template"]
    return template


# ---------------------------------------------------------------------------------------------------------------
# Without a template, server settings or a CUDA recipe, nothing changes


def test_reserved_names_are_shipyards() -> None:
    assert podtemplate.RESERVED_VOLUMES == (objects.ARTIFACTS_VOLUME, objects.CONFIG_VOLUME, objects.TMP_VOLUME,
                                            objects.MODEL_VOLUME)
    assert objects.MODEL_SOURCE_MOUNT in podtemplate.RESERVED_MOUNTS
    assert {naming.LABEL_MODEL, naming.LABEL_VERSION, naming.LABEL_COMPONENT, naming.LABEL_ARTIFACT,
            naming.LABEL_MANAGED_BY} == set(podtemplate.RESERVED_LABELS)
    assert pod()["spec"]["containers"][0]["name"] == podtemplate.SERVING_CONTAINER
    assert job_pod(COMPRESSION)["spec"]["containers"][0]["name"] == podtemplate.COMPRESSION_CONTAINER


@pytest.mark.parametrize("spec", [
    pytest.param({}, id="empty"),
    pytest.param({"serving": {"podTemplate": {}}}, id="empty-template"),
    pytest.param({"serving": {"podTemplate": {"spec": {}, "metadata": {}}}}, id="empty-parts"),
    pytest.param({"serving": {"server": {}}}, id="empty-server"),
    pytest.param({"serving": {"disruptionBudget": {"maxUnavailable": 2}}}, id="disruption-budget"),
])
def test_unset_fields_leave_the_pod_template_as_it_was(spec: dict[str, Any]) -> None:
    assert deployment(**spec) == deployment()  # spec hash included: existing Deployments are not restarted


def test_an_int8_recipe_gets_no_gpu_placement() -> None:
    template = job_pod(COMPRESSION, {"nodeSelector": {"pool": "gpu"}})
    assert "resources" not in template["spec"]["containers"][0]
    assert "nodeSelector" not in template["spec"]


# ---------------------------------------------------------------------------------------------------------------
# The merge


MERGES = [
    pytest.param({"spec": {"serviceAccountName": "model-reader", "automountServiceAccountToken": True}},
                 lambda p: (p["spec"]["serviceAccountName"], p["spec"]["automountServiceAccountToken"]),
                 ("model-reader", True), id="service-account"),
    pytest.param({"spec": {"serviceAccountName": "model-reader"}},
                 lambda p: p["spec"]["automountServiceAccountToken"], False, id="token-stays-unmounted"),
    pytest.param({"spec": {"containers": [{"name": "server", "env": [SECRET_ENV, {"name": "A", "value": "1"}]}]}},
                 lambda p: [e["name"] for e in p["spec"]["containers"][0]["env"]][-3:],
                 [contract.ENV_SHADOW_CONFIG, "TOKEN", "A"], id="env-appended-by-name"),
    pytest.param({"spec": {"containers": [{"name": "server", "env": [SECRET_ENV]}]}},
                 lambda p: p["spec"]["containers"][0]["env"][-1], SECRET_ENV, id="env-from-a-secret-key"),
    pytest.param({"spec": {"containers": [{"name": "server", "envFrom": [{"secretRef": {"name": "creds"}},
                                                                        {"configMapRef": {"name": "cfg"}}]}]}},
                 lambda p: p["spec"]["containers"][0]["envFrom"],
                 [{"secretRef": {"name": "creds"}}, {"configMapRef": {"name": "cfg"}}], id="env-from"),
    pytest.param({"spec": {"containers": [{"name": "server", "args": ["--log-level", "DEBUG"]}]}},
                 lambda p: (p["spec"]["containers"][0]["command"][:2], p["spec"]["containers"][0]["args"]),
                 (["shipyard-runtime", "serve"], ["--log-level", "DEBUG"]), id="extra-args"),
    pytest.param({"spec": {"imagePullSecrets": [{"name": "regcred"}]}},
                 lambda p: p["spec"]["imagePullSecrets"], [{"name": "regcred"}], id="image-pull-secrets"),
    pytest.param({"spec": {"affinity": AFFINITY}}, lambda p: p["spec"]["affinity"], AFFINITY, id="affinity"),
    pytest.param({"spec": {"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone",
                                                           "whenUnsatisfiable": "ScheduleAnyway"}]}},
                 lambda p: p["spec"]["topologySpreadConstraints"][0]["topologyKey"], "zone", id="topology-spread"),
    pytest.param({"spec": {"priorityClassName": "inference"}}, lambda p: p["spec"]["priorityClassName"],
                 "inference", id="priority-class"),
    pytest.param({"metadata": {"labels": {"team": "ml"}, "annotations": {"example.com/owner": "ml"}}},
                 lambda p: (p["metadata"]["labels"]["team"], p["metadata"]["labels"][naming.LABEL_MODEL],
                            p["metadata"]["annotations"]), ("ml", "digits", {"example.com/owner": "ml"}),
                 id="labels-and-annotations"),
    pytest.param({"spec": {"volumes": [{"name": "cache", "emptyDir": {}}],
                           "containers": [{"name": "server", "volumeMounts": [{"name": "cache",
                                                                               "mountPath": "/cache"}]}]}},
                 lambda p: (p["spec"]["volumes"][-1], p["spec"]["containers"][0]["volumeMounts"]),
                 ({"name": "cache", "emptyDir": {}}, [{"name": "tmp", "mountPath": "/tmp"},
                                                      {"name": "shadow-config", "mountPath": "/etc/shipyard/shadow",
                                                       "readOnly": True},
                                                      {"name": "cache", "mountPath": "/cache"}]), id="volumes"),
    pytest.param({"spec": {"containers": [{"name": "proxy", "image": "envoy:1.30", "args": ["-c", "/etc/e.yaml"]}]}},
                 lambda p: p["spec"]["containers"][1],
                 {"name": "proxy", "image": "envoy:1.30", "args": ["-c", "/etc/e.yaml"],
                  "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                                      "capabilities": {"drop": ["ALL"]}}}, id="sidecar-restricted-by-default"),
    pytest.param({"spec": {"containers": [{"name": "proxy", "image": "envoy:1.30", "securityContext": {
        "readOnlyRootFilesystem": True, "capabilities": {"add": ["NET_BIND_SERVICE"]}}}]}},
                 lambda p: p["spec"]["containers"][1]["securityContext"],
                 {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "readOnlyRootFilesystem": True,
                  "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}, id="sidecar-security-merged"),
    pytest.param({"spec": {"nodeSelector": {"zone": "a"}, "tolerations": [{"key": "t", "operator": "Exists"}]}},
                 lambda p: (p["spec"]["nodeSelector"], p["spec"]["tolerations"]),
                 ({"pool": "gpu", "zone": "a"},
                  [{"key": "g", "operator": "Exists"}, {"key": "t", "operator": "Exists"}]),
                 id="node-selector-merged-tolerations-appended"),
    pytest.param({"spec": {"securityContext": {"runAsUser": 20000, "fsGroup": 20000}}},
                 lambda p: p["spec"]["securityContext"],
                 {"runAsNonRoot": True, "runAsUser": 20000, "fsGroup": 20000,
                  "seccompProfile": {"type": "RuntimeDefault"}}, id="pod-security-merged"),
    pytest.param({"spec": {"containers": [{"name": "server", "securityContext": {"runAsUser": 20000}}]}},
                 lambda p: p["spec"]["containers"][0]["securityContext"],
                 {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                  "capabilities": {"drop": ["ALL"]}, "runAsUser": 20000}, id="model-container-security-merged"),
    pytest.param({"spec": {"initContainers": [{"name": "wait", "image": "busybox:1", "command": ["true"]}]}},
                 lambda p: p["spec"]["initContainers"][0]["securityContext"]["capabilities"], {"drop": ["ALL"]},
                 id="init-container"),
]


@pytest.mark.parametrize(("template", "get", "expected"), MERGES)
def test_a_pod_template_is_merged_onto_shipyards(template: dict[str, Any], get: Any, expected: Any) -> None:
    serving = {"podTemplate": template, "nodeSelector": {"pool": "gpu"},
               "tolerations": [{"key": "g", "operator": "Exists"}]}
    assert get(pod(serving=serving)) == expected


def test_the_merge_changes_neither_input() -> None:
    base = pod()
    overlay = {"spec": {"containers": [{"name": "server", "env": [{"name": "A", "value": "1"}]}]}}
    kept = copy.deepcopy((base, overlay))
    merged = podtemplate.build_merged_template(base, overlay)
    assert (base, overlay) == kept and merged != base
    assert podtemplate.build_merged_template(base, {}) == base


def test_a_template_keeps_shipyards_container_first_and_its_own_fields() -> None:
    merged = pod(serving={"podTemplate": {"spec": {"containers": [
        {"name": "proxy", "image": "envoy:1.30"}, {"name": "server", "env": [SECRET_ENV]}]}}})
    server = merged["spec"]["containers"][0]
    assert [c["name"] for c in merged["spec"]["containers"]] == ["server", "proxy"]
    assert server["image"] == "registry.example/digits:1.0.0" and server["readinessProbe"] == pod()["spec"][
        "containers"][0]["readinessProbe"]


def test_the_compression_template_is_merged_onto_the_jobs_pod() -> None:
    compression = {**COMPRESSION, "podTemplate": {"spec": {"serviceAccountName": "bucket-reader", "containers": [
        {"name": "compress", "env": [SECRET_ENV]}]}}}
    template = job_pod(compression)
    assert template["spec"]["serviceAccountName"] == "bucket-reader"
    assert template["spec"]["containers"][0]["env"][-1] == SECRET_ENV
    assert template["spec"]["restartPolicy"] == "Never"


# ---------------------------------------------------------------------------------------------------------------
# Refusals (the Python twins of the admission rules)


def _server(**fields: Any) -> dict[str, Any]:
    return {"spec": {"containers": [{"name": "server", **fields}]}}


REFUSED = [
    # fields Shipyard owns
    pytest.param(_server(image="evil:1"), "containers[0].image", "is Shipyard's", id="model-image"),
    pytest.param(_server(command=["sh"]), "containers[0].command", "is Shipyard's", id="model-command"),
    pytest.param(_server(ports=[{"containerPort": 1}]), "containers[0].ports", "is Shipyard's", id="model-ports"),
    pytest.param(_server(readinessProbe={"exec": {}}), "containers[0].readinessProbe", "is Shipyard's",
                 id="model-readiness-probe"),
    pytest.param(_server(livenessProbe={"exec": {}}), "containers[0].livenessProbe", "is Shipyard's",
                 id="model-liveness-probe"),
    pytest.param(_server(startupProbe={"exec": {}}), "containers[0].startupProbe", "is Shipyard's",
                 id="model-startup-probe"),
    pytest.param(_server(resources={"limits": {"cpu": "1"}}), "containers[0].resources", "spec.serving.resources",
                 id="model-resources"),
    pytest.param(_server(env=[{"name": contract.ENV_ARTIFACT_PATH, "value": "/x"}]), "containers[0].env",
                 "are Shipyard's", id="model-env"),
    pytest.param(_server(volumeMounts=[{"name": "c", "mountPath": "/artifacts"}]), "containers[0].volumeMounts",
                 "are Shipyard's", id="mount-at-artifacts"),
    pytest.param(_server(volumeMounts=[{"name": "c", "mountPath": "/model-source/x"}]),
                 "containers[0].volumeMounts", "are Shipyard's", id="mount-below-model-source"),
    pytest.param({"spec": {"containers": [{"name": "srv"}]}}, "containers[0].image",
                 "a sidecar container must set image", id="renamed-model-container"),
    pytest.param({"spec": {"volumes": [{"name": "artifacts", "emptyDir": {}}]}}, "volumes[0].name",
                 "are Shipyard's", id="volume-named-artifacts"),
    pytest.param({"spec": {"volumes": [{"name": "tmp", "emptyDir": {}}]}}, "volumes[0].name", "are Shipyard's",
                 id="volume-named-tmp"),
    *[pytest.param({"metadata": {"labels": {label: "x"}}}, "metadata.labels", f"label {label} is Shipyard's",
                   id=f"label-{label}") for label in podtemplate.RESERVED_LABELS],
    # the Pod Security restricted profile
    pytest.param({"spec": {"hostNetwork": True}}, "spec.hostNetwork", "restricted", id="host-network"),
    pytest.param({"spec": {"hostPID": True}}, "spec.hostPID", "restricted", id="host-pid"),
    pytest.param({"spec": {"hostIPC": True}}, "spec.hostIPC", "restricted", id="host-ipc"),
    pytest.param(_server(securityContext={"privileged": True}), "securityContext.privileged", "restricted",
                 id="privileged"),
    pytest.param(_server(securityContext={"allowPrivilegeEscalation": True}),
                 "securityContext.allowPrivilegeEscalation", "restricted", id="privilege-escalation"),
    pytest.param(_server(securityContext={"runAsNonRoot": False}), "securityContext.runAsNonRoot", "restricted",
                 id="container-run-as-root"),
    pytest.param({"spec": {"securityContext": {"runAsNonRoot": False}}}, "spec.securityContext.runAsNonRoot",
                 "restricted", id="pod-run-as-root"),
    pytest.param(_server(securityContext={"runAsUser": 0}), "securityContext.runAsUser", "restricted",
                 id="container-uid-0"),
    pytest.param({"spec": {"securityContext": {"runAsUser": 0}}}, "spec.securityContext.runAsUser", "restricted",
                 id="pod-uid-0"),
    pytest.param(_server(securityContext={"capabilities": {"add": ["SYS_ADMIN"]}}),
                 "securityContext.capabilities.add", "restricted", id="capability-added"),
    pytest.param(_server(securityContext={"capabilities": {"drop": ["NET_RAW"]}}),
                 "securityContext.capabilities.drop", "restricted", id="capabilities-kept"),
    pytest.param(_server(securityContext={"seccompProfile": {"type": "Unconfined"}}),
                 "securityContext.seccompProfile.type", "restricted", id="container-seccomp-unconfined"),
    pytest.param({"spec": {"securityContext": {"seccompProfile": {"type": "Unconfined"}}}},
                 "spec.securityContext.seccompProfile.type", "restricted", id="pod-seccomp-unconfined"),
    pytest.param({"spec": {"volumes": [{"name": "host", "hostPath": {"path": "/"}}]}}, "volumes[0].hostPath",
                 "restricted", id="host-path"),
    pytest.param({"spec": {"volumes": [{"name": "n", "nfs": {"server": "s", "path": "/"}}]}}, "volumes[0].nfs",
                 "restricted", id="nfs-volume"),
    pytest.param({"spec": {"containers": [{"name": "p", "image": "p:1", "ports": [
        {"containerPort": 80, "hostPort": 80}]}]}}, "ports[0].hostPort", "restricted", id="host-port"),
    pytest.param(_server(securityContext={"procMount": "Unmasked"}), "securityContext.procMount", "restricted",
                 id="proc-mount"),
    pytest.param({"spec": {"securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"}]}}},
                 "sysctls[0].name", "restricted", id="unsafe-sysctl"),
    pytest.param(_server(securityContext={"appArmorProfile": {"type": "Unconfined"}}),
                 "securityContext.appArmorProfile.type", "restricted", id="apparmor-unconfined"),
    pytest.param({"metadata": {"annotations": {f"{podtemplate.APPARMOR_ANNOTATION}server": "unconfined"}}},
                 "metadata.annotations", "restricted", id="apparmor-annotation"),
    pytest.param(_server(securityContext={"seLinuxOptions": {"type": "spc_t"}}),
                 "securityContext.seLinuxOptions.type", "restricted", id="selinux-type"),
    pytest.param({"spec": {"securityContext": {"seLinuxOptions": {"user": "system_u"}}}},
                 "spec.securityContext.seLinuxOptions.user", "restricted", id="selinux-user"),
]


@pytest.mark.parametrize(("template", "field", "message"), REFUSED)
def test_a_refused_template_names_its_field(template: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(spec_mod.SpecError) as error:
        parse(serving={"podTemplate": template})
    assert error.value.field.startswith("spec.serving.podTemplate."), error.value
    assert error.value.field.endswith(field), error.value
    assert message in error.value.problem, error.value


@pytest.mark.parametrize("template", [
    pytest.param({"spec": {"securityContext": {"sysctls": [{"name": "net.ipv4.tcp_syncookies", "value": "1"}],
                                               "seccompProfile": {"type": "Localhost", "localhostProfile": "p"},
                                               "seLinuxOptions": {"type": "container_t", "level": "s0:c1"}}}},
                 id="safe-sysctl-localhost-seccomp-selinux"),
    pytest.param(_server(securityContext={"capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}),
                 id="net-bind-service"),
    pytest.param({"metadata": {"annotations": {f"{podtemplate.APPARMOR_ANNOTATION}server": "runtime/default"}}},
                 id="apparmor-runtime-default"),
    pytest.param({"spec": {"hostNetwork": False, "containers": [{"name": "p", "image": "p:1", "ports": [
        {"containerPort": 80, "hostPort": 0}]}]}}, id="explicit-safe-values"),
    pytest.param({"spec": {"volumes": [{"name": t.lower(), t: {}}
                                       for t in ("configMap", "secret", "projected", "csi")]}},
                 id="restricted-volume-types"),
])
def test_what_restricted_allows_is_accepted(template: dict[str, Any]) -> None:
    assert parse(serving={"podTemplate": template}).spec.serving.pod_template is not None


def test_the_compression_template_owns_the_compress_container() -> None:
    with pytest.raises(spec_mod.SpecError) as error:
        parse(compression={**COMPRESSION, "podTemplate": {"spec": {"containers": [
            {"name": "compress", "command": ["sh"]}]}}})
    assert error.value.field == "spec.compression.podTemplate.spec.containers[0].command"
    # "server" is just a sidecar there (and needs an image)
    parse(compression={**COMPRESSION, "podTemplate": {"spec": {"containers": [{"name": "server", "image": "x:1"}]}}})


def test_a_mount_over_another_runtimes_model_is_refused_by_the_operator() -> None:
    with pytest.raises(spec_mod.SpecError) as error:
        parse(serving={"runtime": {"preset": "triton"}, "podTemplate": _server(volumeMounts=[
            {"name": "c", "mountPath": "/models/x"}])})
    assert error.value.field == "spec.serving.podTemplate.spec.containers[0].volumeMounts[0].mountPath"
    assert "spec.serving.runtime.modelMountPath" in error.value.problem


# ---------------------------------------------------------------------------------------------------------------
# spec.serving.server


SERVER_SETTINGS = [
    pytest.param({"device": "cuda:0,1"}, ["--device", "cuda:0,1"], "device", "cuda:0,1", id="device"),
    pytest.param({"dtype": "bfloat16"}, ["--dtype", "bfloat16"], "dtype", "bfloat16", id="dtype"),
    pytest.param({"compile": True}, ["--compile"], "compile", True, id="compile"),
    pytest.param({"compile": False}, [], "compile", False, id="compile-false"),
    pytest.param({"compileMode": "max-autotune"}, ["--compile-mode", "max-autotune"], "compile_mode",
                 "max-autotune", id="compile-mode"),
    pytest.param({"maxQueue": 64}, ["--max-queue", "64"], "max_queue", 64, id="max-queue"),
    pytest.param({"maxPayloadBytes": 2048}, ["--max-payload-bytes", "2048"], "max_payload_bytes", 2048,
                 id="max-payload"),
    pytest.param({"requestTimeoutSeconds": 2.5}, ["--request-timeout-s", "2.5"], "request_timeout_s", 2.5,
                 id="request-timeout"),
    pytest.param({"threads": 4}, ["--threads", "4"], "threads", 4, id="threads"),
    pytest.param({"warmupIterations": 0}, ["--warmup-iterations", "0"], "warmup_iterations", 0, id="warmup"),
    pytest.param({"batchSizing": "max"}, ["--batch-sizing", "max"], "batch_sizing", "max", id="batch-sizing"),
    pytest.param({"logLevel": "DEBUG"}, ["--log-level", "DEBUG"], "log_level", "DEBUG", id="log-level"),
]


@pytest.mark.parametrize(("server", "flags", "attribute", "value"), SERVER_SETTINGS)
def test_server_settings_are_flags_the_runtime_reads(server: dict[str, Any], flags: list[str], attribute: str,
                                                     value: object) -> None:
    container = pod(serving={"server": server})["spec"]["containers"][0]
    base = pod()["spec"]["containers"][0]["command"]
    assert container["command"] == [*base, *flags]
    env = {e["name"]: e["value"] for e in container["env"]}
    config = server_settings.build_config(container["command"][2:], env)  # the server's own parser
    assert getattr(config, attribute) == value


def test_every_server_field_has_a_flag() -> None:
    assert set(podtemplate.SERVER_FLAGS) == {f.alias or n for n, f in podtemplate.Server.model_fields.items()}
    known = {a for action in server_settings.build_parser()._actions for a in action.option_strings}
    assert set(podtemplate.SERVER_FLAGS.values()) <= known


def test_server_settings_with_another_runtime_are_refused_naming_both() -> None:
    with pytest.raises(spec_mod.SpecError) as error:
        parse(serving={"server": {"dtype": "float16"}, "runtime": {"preset": "triton"}})
    assert error.value.field == "spec.serving.server" and "spec.serving.runtime" in error.value.problem


# ---------------------------------------------------------------------------------------------------------------
# GPU placement of compression


CUDA = {**COMPRESSION, "steps": [{"quantize": {"scheme": "fp8"}}]}
GPU_SERVING = {"resources": {"limits": {"nvidia.com/gpu": 1}}, "nodeSelector": {"pool": "gpu"},
               "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}


@pytest.mark.parametrize(("compression", "serving", "limits", "selector", "tolerations"), [
    pytest.param(CUDA, GPU_SERVING, {"nvidia.com/gpu": "1"}, {"pool": "gpu"},
                 [{"key": "nvidia.com/gpu", "operator": "Exists"}], id="serving-placement"),
    pytest.param({**CUDA, "resources": {"limits": {"nvidia.com/gpu": 2, "memory": "8Gi"}}}, GPU_SERVING,
                 {"nvidia.com/gpu": "2", "memory": "8Gi"}, {"pool": "gpu"},
                 [{"key": "nvidia.com/gpu", "operator": "Exists"}], id="own-gpus-kept"),
    pytest.param({**CUDA, "podTemplate": {"spec": {"nodeSelector": {"pool": "batch"}}}}, GPU_SERVING,
                 {"nvidia.com/gpu": "1"}, {"pool": "batch"}, [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                 id="own-node-selector"),
    pytest.param({**CUDA, "podTemplate": {"spec": {"tolerations": [{"key": "b", "operator": "Exists"}]}}},
                 GPU_SERVING, {"nvidia.com/gpu": "1"}, {"pool": "gpu"}, [{"key": "b", "operator": "Exists"}],
                 id="own-tolerations"),
    pytest.param(CUDA, {**GPU_SERVING, "podTemplate": {"spec": {"nodeSelector": {"zone": "a"}}}},
                 {"nvidia.com/gpu": "1"}, {"pool": "gpu", "zone": "a"},
                 [{"key": "nvidia.com/gpu", "operator": "Exists"}], id="serving-template-placement"),
])
def test_a_cuda_recipe_runs_on_a_gpu_where_the_serving_pods_run(compression: dict[str, Any],
                                                                serving: dict[str, Any], limits: dict[str, str],
                                                                selector: dict[str, str],
                                                                tolerations: list[dict[str, Any]]) -> None:
    template = job_pod(compression, serving)
    assert template["spec"]["containers"][0]["resources"]["limits"] == limits
    assert template["spec"]["nodeSelector"] == selector
    assert template["spec"]["tolerations"] == tolerations


@pytest.mark.parametrize("scheme", ["fp8", "int4-weight-only"])
def test_a_cuda_only_artifact_with_cpu_serving_is_refused_naming_both(scheme: str) -> None:
    with pytest.raises(spec_mod.SpecError) as error:
        parse(compression={**COMPRESSION, "steps": [{"quantize": {"scheme": scheme}}]})
    assert error.value.field == "spec.serving.resources"
    assert "spec.compression.steps[].quantize.scheme" in error.value.problem


# ---------------------------------------------------------------------------------------------------------------
# PodDisruptionBudgets


@pytest.mark.parametrize(("serving", "desired", "expected"), [
    pytest.param({"replicas": 4}, {"1.0.0": 4, "0.9.0": 0}, {"digits-1-0-0": {"maxUnavailable": 1}},
                 id="default-max-unavailable-1"),
    pytest.param({"replicas": 1}, {"1.0.0": 1}, {}, id="default-none-for-one-replica"),
    pytest.param({"replicas": 1, "disruptionBudget": {"minAvailable": 1}}, {"1.0.0": 1},
                 {"digits-1-0-0": {"minAvailable": 1}}, id="explicit-min-available"),
    pytest.param({"replicas": 4, "disruptionBudget": {"maxUnavailable": "25%"}}, {"1.0.0": 3, "1.1.0": 1},
                 {"digits-1-0-0": {"maxUnavailable": "25%"}, "digits-1-1-0": {"maxUnavailable": "25%"}},
                 id="percent-per-live-version"),
    pytest.param({"replicas": 4, "disruptionBudget": {"enabled": False}}, {"1.0.0": 4}, {}, id="opt-out"),
])
def test_a_budget_per_live_version(serving: dict[str, Any], desired: dict[str, int],
                                   expected: dict[str, dict[str, Any]]) -> None:
    md = parse(serving=serving)
    budgets = disruption.build_budgets(objects.build_meta(body()), md, desired)
    got = {b["metadata"]["name"]: {k: v for k, v in b["spec"].items() if k in ("maxUnavailable", "minAvailable")}
           for b in budgets}
    assert got == expected
    for b in budgets:
        version = next(v for v in desired if naming.build_deployment_name("digits", v) == b["metadata"]["name"])
        assert b["spec"]["selector"]["matchLabels"] == naming.build_version_labels("digits", version)
        assert b["metadata"]["ownerReferences"][0]["kind"] == naming.KIND
        assert b["metadata"]["labels"][naming.LABEL_MANAGED_BY] == naming.MANAGED_BY


def test_both_bounds_are_refused() -> None:
    with pytest.raises(spec_mod.SpecError) as error:
        parse(serving={"disruptionBudget": {"maxUnavailable": 1, "minAvailable": 1}})
    assert error.value.field == "spec.serving.disruptionBudget.minAvailable"


def test_budgets_follow_the_live_versions_through_a_rollout() -> None:
    sim = plansim.Sim(plansim.md("1.0.0", replicas=4)).settle()
    assert set(sim.budgets) == {"digits-1-0-0"}
    sim.set_spec(image="registry.example/acme/digits-model:1.1.0")
    sim.run(lambda s: s.status.get("phase") == "Healthy" and s.status.get("stableVersion") == "1.1.0")
    sim.settle()
    assert set(sim.budgets) == {"digits-1-1-0"}  # the old stable, scaled to 0, lost its budget
    deleted = [(kind, name) for p in sim.plans for _, kind, name in p.delete]
    assert ("PodDisruptionBudget", "digits-1-0-0") in deleted


def test_an_unchanged_budget_is_not_applied_again() -> None:
    md = parse(serving={"replicas": 3})
    meta = objects.build_meta(body())
    (budget,) = disruption.build_budgets(meta, md, {"1.0.0": 3})
    seen = observed.Observed(budgets={budget["metadata"]["name"]: objects.spec_hash_of(budget),
                                      "digits-0-9-0": "x"})
    apply, delete = disruption.plan_budgets(meta, md, {"1.0.0": 3}, seen)
    assert apply == [] and delete == [(disruption.API_VERSION, disruption.KIND, "digits-0-9-0")]


def test_the_planner_applies_the_budget_with_the_deployment() -> None:
    plan = planning.plan_reconcile(body(serving={"replicas": 2}), observed.Observed(), plansim.T0)
    kinds = sorted(o["kind"] for o in plan.apply)
    assert kinds == ["Deployment", "PodDisruptionBudget", "Service"]
