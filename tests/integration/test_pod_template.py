"""Pod templates, server settings, GPU placement and PodDisruptionBudgets on the real control plane.

Admission (no operator): every refusal of spec.serving.podTemplate / spec.compression.podTemplate (fields Shipyard
owns, the Pod Security restricted profile), spec.serving.server with another runtime and a CUDA-only artifact with
CPU serving pods is made by the API server's CEL rules, naming the field. With the operator (KopfRunner): a template
carrying a service account, env from a Secret (secretKeyRef and envFrom) and an affinity ends up in the version's
Deployment, the compression Job's pod honours spec.compression.podTemplate, and each live version gets its
PodDisruptionBudget, owned by the ModelDeployment and removed when the version is scaled to 0.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kopf.testing import KopfRunner

from tests.integration.conftest import Cluster, create_artifacts_volume, wait_until

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
SECRET_ENV = {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "model-token", "key": "token"}}}
AFFINITY = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
    {"weight": 1, "preference": {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ml"]}]}}]}}


def digits() -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples" / "digits.yaml").read_text())
    return body


def apply(cluster: Cluster, namespace: str, body: dict[str, Any]) -> Any:
    return cluster.kubectl("apply", "--server-side", "--validate=strict", "--field-manager=shipyard-tests",
                           "-n", namespace, "-f", "-", input=json.dumps(body), check=False)


def with_template(template: dict[str, Any], where: str = "serving") -> dict[str, Any]:
    body = digits()
    body["spec"][where]["podTemplate"] = template
    return body


def _server(**fields: Any) -> dict[str, Any]:
    return {"spec": {"containers": [{"name": "server", **fields}]}}


P = "spec.serving.podTemplate.spec"
REFUSED = [
    # fields Shipyard owns
    pytest.param(_server(image="evil:1"), f"{P}.containers[0].image", "is Shipyard's", id="model-image"),
    pytest.param(_server(command=["sh"]), f"{P}.containers[0].command", "is Shipyard's", id="model-command"),
    pytest.param(_server(ports=[{"containerPort": 1}]), f"{P}.containers[0].ports", "is Shipyard's",
                 id="model-ports"),
    pytest.param(_server(readinessProbe={"exec": {"command": ["true"]}}), f"{P}.containers[0].readinessProbe",
                 "is Shipyard's", id="model-readiness-probe"),
    pytest.param(_server(livenessProbe={"exec": {"command": ["true"]}}), f"{P}.containers[0].livenessProbe",
                 "is Shipyard's", id="model-liveness-probe"),
    pytest.param(_server(startupProbe={"exec": {"command": ["true"]}}), f"{P}.containers[0].startupProbe",
                 "is Shipyard's", id="model-startup-probe"),
    pytest.param(_server(env=[{"name": "SHIPYARD_ARTIFACT_PATH", "value": "/x"}]), f"{P}.containers[0].env",
                 "are Shipyard's", id="model-env"),
    pytest.param(_server(volumeMounts=[{"name": "c", "mountPath": "/artifacts"}]),
                 f"{P}.containers[0].volumeMounts", "are Shipyard's", id="mount-at-artifacts"),
    pytest.param(_server(volumeMounts=[{"name": "c", "mountPath": "/model-source"}]),
                 f"{P}.containers[0].volumeMounts", "are Shipyard's", id="mount-at-model-source"),
    pytest.param({"spec": {"containers": [{"name": "model"}]}}, f"{P}.containers[0].image",
                 "a sidecar container must set image", id="renamed-model-container"),
    pytest.param({"spec": {"volumes": [{"name": "artifacts", "emptyDir": {}}]}}, f"{P}.volumes[0].name",
                 "are Shipyard's", id="volume-named-artifacts"),
    *[pytest.param({"metadata": {"labels": {label: "x"}}}, "spec.serving.podTemplate.metadata.labels",
                   f"label {label} is Shipyard's", id=f"label-{label.split('/')[-1]}")
      for label in ("shipyard.dev/model", "shipyard.dev/version", "shipyard.dev/component")],
    # the Pod Security restricted profile
    pytest.param({"spec": {"hostNetwork": True}}, f"{P}.hostNetwork", "restricted", id="host-network"),
    pytest.param({"spec": {"hostPID": True}}, f"{P}.hostPID", "restricted", id="host-pid"),
    pytest.param({"spec": {"hostIPC": True}}, f"{P}.hostIPC", "restricted", id="host-ipc"),
    pytest.param(_server(securityContext={"privileged": True}), f"{P}.containers[0].securityContext.privileged",
                 "restricted", id="privileged"),
    pytest.param(_server(securityContext={"allowPrivilegeEscalation": True}),
                 f"{P}.containers[0].securityContext.allowPrivilegeEscalation", "restricted",
                 id="privilege-escalation"),
    pytest.param(_server(securityContext={"runAsNonRoot": False}),
                 f"{P}.containers[0].securityContext.runAsNonRoot", "restricted", id="run-as-root"),
    pytest.param({"spec": {"securityContext": {"runAsUser": 0}}}, f"{P}.securityContext.runAsUser", "restricted",
                 id="uid-0"),
    pytest.param(_server(securityContext={"capabilities": {"add": ["SYS_ADMIN"]}}),
                 f"{P}.containers[0].securityContext.capabilities.add", "restricted", id="capability-added"),
    pytest.param(_server(securityContext={"seccompProfile": {"type": "Unconfined"}}),
                 f"{P}.containers[0].securityContext.seccompProfile.type", "restricted", id="seccomp-unconfined"),
    pytest.param({"spec": {"volumes": [{"name": "host", "hostPath": {"path": "/"}}]}}, f"{P}.volumes[0].hostPath",
                 "restricted", id="host-path"),
    pytest.param({"spec": {"containers": [{"name": "p", "image": "p:1", "ports": [
        {"containerPort": 80, "hostPort": 80}]}]}}, f"{P}.containers[0].ports[0].hostPort", "restricted",
                 id="host-port"),
    pytest.param(_server(securityContext={"procMount": "Unmasked"}),
                 f"{P}.containers[0].securityContext.procMount", "restricted", id="proc-mount"),
    pytest.param({"spec": {"securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"}]}}},
                 f"{P}.securityContext.sysctls[0].name", "restricted", id="unsafe-sysctl"),
    pytest.param(_server(securityContext={"appArmorProfile": {"type": "Unconfined"}}),
                 f"{P}.containers[0].securityContext.appArmorProfile.type", "restricted", id="apparmor-unconfined"),
    pytest.param({"metadata": {"annotations": {"container.apparmor.security.beta.kubernetes.io/server":
                                               "unconfined"}}},
                 "spec.serving.podTemplate.metadata.annotations", "restricted", id="apparmor-annotation"),
    pytest.param(_server(securityContext={"seLinuxOptions": {"type": "spc_t"}}),
                 f"{P}.containers[0].securityContext.seLinuxOptions.type", "restricted", id="selinux-type"),
]


@pytest.mark.parametrize(("template", "field", "message"), REFUSED)
def test_a_refused_pod_template_is_rejected_at_admission_naming_its_field(
        cluster: Cluster, namespace: str, template: dict[str, Any], field: str, message: str) -> None:
    out = apply(cluster, namespace, with_template(template))
    assert out.returncode != 0, f"accepted: {template}"
    assert f"{field}:" in out.stderr, out.stderr
    assert message in out.stderr, out.stderr
    assert cluster.get("modeldeployment", "digits", namespace) is None


def test_the_compression_template_refuses_what_the_compress_container_owns(cluster: Cluster,
                                                                            namespace: str) -> None:
    out = apply(cluster, namespace, with_template({"spec": {"containers": [{"name": "compress", "image": "x:1"}]}},
                                                  "compression"))
    assert out.returncode != 0
    assert "spec.compression.podTemplate.spec.containers[0].image:" in out.stderr, out.stderr


@pytest.mark.parametrize(("mutate", "fields"), [
    pytest.param(lambda s: s["serving"].update(server={"dtype": "float16"}, runtime={"preset": "triton"}) or
                 s.pop("compression"), ("spec.serving.server:", "spec.serving.runtime"), id="server-with-runtime"),
    pytest.param(lambda s: s["compression"]["steps"].append({"quantize": {"scheme": "fp8"}}),
                 ("spec.serving.resources:", "spec.compression.steps[].quantize.scheme"),
                 id="cuda-artifact-cpu-serving"),
    pytest.param(lambda s: s["serving"].update(disruptionBudget={"maxUnavailable": 1, "minAvailable": 1}),
                 ("spec.serving.disruptionBudget.minAvailable:",), id="budget-both-bounds"),
    pytest.param(lambda s: s["serving"].update(disruptionBudget={"maxUnavailable": "150%"}),
                 ("spec.serving.disruptionBudget.maxUnavailable",), id="budget-percent-over-100"),
])
def test_other_refusals_name_their_fields(cluster: Cluster, namespace: str, mutate: Any,
                                          fields: tuple[str, ...]) -> None:
    body = digits()
    mutate(body["spec"])
    out = apply(cluster, namespace, body)
    assert out.returncode != 0, "accepted"
    for field in fields:
        assert field in out.stderr, out.stderr


FULL_TEMPLATE = {
    "metadata": {"labels": {"team": "ml"}, "annotations": {"example.com/owner": "ml",
                                                           "container.apparmor.security.beta.kubernetes.io/server":
                                                           "runtime/default"}},
    "spec": {
        "serviceAccountName": "model-reader",
        "automountServiceAccountToken": True,
        "imagePullSecrets": [{"name": "regcred"}],
        "affinity": AFFINITY,
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                       "whenUnsatisfiable": "ScheduleAnyway",
                                       "labelSelector": {"matchLabels": {"team": "ml"}}}],
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "example.com/ml", "operator": "Exists", "effect": "NoSchedule"}],
        "securityContext": {"fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"},
                            "sysctls": [{"name": "net.ipv4.tcp_syncookies", "value": "1"}]},
        "volumes": [{"name": "cache", "emptyDir": {}}, {"name": "creds", "secret": {"secretName": "model-token"}}],
        "containers": [
            {"name": "server", "args": ["--log-level", "DEBUG"], "env": [SECRET_ENV, {"name": "A", "value": "1"}],
             "envFrom": [{"secretRef": {"name": "model-token"}, "prefix": "S_"}],
             "volumeMounts": [{"name": "cache", "mountPath": "/cache"},
                              {"name": "creds", "mountPath": "/var/run/creds", "readOnly": True}],
             "securityContext": {"capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}},
            {"name": "proxy", "image": "registry.example/proxy:1.0",
             "ports": [{"containerPort": 9901, "name": "admin"}],
             "resources": {"limits": {"cpu": "100m", "memory": "64Mi"}},
             "readinessProbe": {"tcpSocket": {"port": 9901}}},
        ],
    },
}


def test_a_full_template_and_server_settings_are_accepted(cluster: Cluster, namespace: str) -> None:
    body = with_template(copy.deepcopy(FULL_TEMPLATE))
    body["spec"]["serving"]["server"] = {"dtype": "bfloat16", "maxQueue": 64, "requestTimeoutSeconds": 2.5,
                                         "compile": True, "device": "cpu"}
    body["spec"]["serving"]["disruptionBudget"] = {"maxUnavailable": "25%"}
    body["spec"]["compression"]["podTemplate"] = {"spec": {"serviceAccountName": "bucket-reader"}}
    out = apply(cluster, namespace, body)
    assert out.returncode == 0, out.stderr
    stored = cluster.get("modeldeployment", "digits", namespace)
    assert stored is not None
    assert stored["spec"]["serving"]["podTemplate"]["spec"]["affinity"] == AFFINITY  # preserved as given
    assert stored["spec"]["serving"]["podTemplate"]["spec"]["containers"][1]["readinessProbe"] == {
        "tcpSocket": {"port": 9901}}


def _secrets(cluster: Cluster, namespace: str) -> None:
    cluster.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "model-token"},
                   "stringData": {"token": "t0ken"}}, namespace)
    for account in ("model-reader", "bucket-reader"):
        cluster.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account}}, namespace)


def test_the_operator_renders_the_templates_and_a_budget_per_live_version(
        cluster: Cluster, operator: KopfRunner, namespace: str) -> None:
    _secrets(cluster, namespace)
    create_artifacts_volume(cluster, namespace)
    body = digits()
    body["spec"]["serving"]["replicas"] = 2
    body["spec"]["serving"]["podTemplate"] = {"spec": {
        "serviceAccountName": "model-reader", "affinity": AFFINITY,
        "containers": [{"name": "server", "env": [SECRET_ENV],
                        "envFrom": [{"secretRef": {"name": "model-token"}}]}]}}
    body["spec"]["compression"]["podTemplate"] = {
        "metadata": {"labels": {"team": "ml"}},
        "spec": {"serviceAccountName": "bucket-reader",
                 "containers": [{"name": "compress", "env": [SECRET_ENV]}]}}
    body["spec"]["rollout"] = {}
    cluster.apply(body, namespace)

    def job() -> dict[str, Any] | None:
        items = json.loads(cluster.kubectl("get", "jobs", "-n", namespace, "-o", "json").stdout)["items"]
        return items[0] if items else None

    pod = wait_until(job, 60, message="the compression Job")["spec"]["template"]
    assert pod["spec"]["serviceAccountName"] == "bucket-reader"
    assert pod["metadata"]["labels"]["team"] == "ml"
    assert pod["metadata"]["labels"]["shipyard.dev/component"] == "compression"
    (compress,) = pod["spec"]["containers"]
    assert compress["env"][-1] == SECRET_ENV
    assert pod["spec"]["automountServiceAccountToken"] is False  # not asked for

    dep = wait_until(lambda: cluster.get("deployment", "digits-1-0-0", namespace), 120,
                     message="the Deployment after compression")
    spec = dep["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "model-reader"
    assert spec["affinity"] == AFFINITY
    (server,) = spec["containers"]
    assert SECRET_ENV in server["env"]
    assert server["envFrom"] == [{"secretRef": {"name": "model-token"}}]
    assert server["image"] == body["spec"]["image"] and server["readinessProbe"]["httpGet"]["path"]

    budget = wait_until(lambda: cluster.get("poddisruptionbudget", "digits-1-0-0", namespace), 60,
                        message="the version's PodDisruptionBudget")
    md = cluster.get("modeldeployment", "digits", namespace)
    assert md is not None
    (ref,) = budget["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["uid"]) == ("ModelDeployment", md["metadata"]["uid"])
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]

    # Scaled to 0: the version keeps its Deployment and loses its budget.
    cluster.kubectl("patch", "md", "digits", "-n", namespace, "--type=merge", "-p",
                    json.dumps({"spec": {"serving": {"replicas": 0}}}))
    wait_until(lambda: cluster.get("poddisruptionbudget", "digits-1-0-0", namespace) is None, 60,
               message="the budget deleted at 0 replicas")
    assert cluster.get("deployment", "digits-1-0-0", namespace) is not None
