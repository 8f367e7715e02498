"""The Helm chart with the pinned Helm binary: lint, values schema, rendering in both RBAC modes, and on the real
control plane `helm install` + `helm test`, then the operator authenticated AS THE CHART'S ServiceAccount driving
an example to Ready (which proves the RBAC suffices), and `kubectl auth can-i` proving what it must not do.

KWOK fakes the chart's own operator pod (nothing runs inside pods), so the operator runs here as a local process
with a kubeconfig holding a token of the release's ServiceAccount (`kubectl create token`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import (
    Cluster,
    OperatorProcess,
    _load_cluster_module,
    create_artifacts_volume,
    free_port,
    wait_until,
)

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "shipyard"
CRD_SOURCE = REPO / "crds" / "modeldeployments.shipyard.dev.yaml"
HELM = str(_load_cluster_module().binaries()["helm"])
KOPF_CRDS = ("clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev")


def helm(*args: str, kubeconfig: str | None = None, check: bool = True,
         timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HELM_CACHE_HOME="/tmp/shipyard-helm/cache", HELM_CONFIG_HOME="/tmp/shipyard-helm/config",
               HELM_DATA_HOME="/tmp/shipyard-helm/data")
    if kubeconfig:
        env["KUBECONFIG"] = kubeconfig
    out = subprocess.run([HELM, *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({out.returncode}): {out.stdout}\n{out.stderr}")
    return out


def sets(values: dict[str, str]) -> list[str]:
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def render(values: dict[str, str] | None = None, namespace: str = "shipyard-system") -> list[dict[str, Any]]:
    out = helm("template", "sy", str(CHART), "-n", namespace, *sets(values or {}))
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = find(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def all_rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for d in docs if d["kind"] in ("Role", "ClusterRole") for r in d.get("rules") or []]


# --- the RBAC matrix: what the operator's ServiceAccount may do --------------------------------------------------
# (verb, resource[/subresource] with its API group, where) -> (cluster-wide release, watchNamespaces release).
# "watched": a namespace the release watches; "other": one it does not; "cluster": every namespace / cluster scope;
# "release": the webhook notifications' ConfigMap or Secret (by its name) in the release's own namespace,
# "release-other": another object of that kind there. For `namespaces`, the object asked about is the namespace in
# "where". Checked offline against every rule `helm
# template` renders (test_rendered_rbac_gives_exactly_the_matrix) and on the API server's authorizer with the
# release's own token (the install tests). docs/security.md shows this table (test_security_doc_shows_the_matrix).
RBAC_MATRIX: list[tuple[str, str, str, str, bool, bool, str]] = [
    ("get", "", "secrets", "watched", False, False, "no secrets"),
    ("list", "", "secrets", "cluster", False, False, "no secrets"),
    ("watch", "", "secrets", "watched", False, False, "no secrets"),
    ("create", "", "serviceaccounts/token", "watched", False, False, "no tokens of other accounts"),
    ("impersonate", "", "serviceaccounts", "watched", False, False, "no impersonation"),
    ("impersonate", "", "users", "cluster", False, False, "no impersonation"),
    ("escalate", "rbac.authorization.k8s.io", "clusterroles", "cluster", False, False, "no escalation"),
    ("bind", "rbac.authorization.k8s.io", "clusterroles", "cluster", False, False, "no binding"),
    ("escalate", "rbac.authorization.k8s.io", "roles", "watched", False, False, "no escalation"),
    ("create", "rbac.authorization.k8s.io", "clusterrolebindings", "cluster", False, False, "no RBAC writes"),
    ("create", "rbac.authorization.k8s.io", "rolebindings", "watched", False, False, "no RBAC writes"),
    ("patch", "rbac.authorization.k8s.io", "roles", "watched", False, False, "no RBAC writes"),
    ("patch", "rbac.authorization.k8s.io", "clusterroles", "cluster", False, False, "no RBAC writes"),
    ("create", "", "pods/exec", "watched", False, False, "no exec into pods"),
    ("create", "", "pods", "watched", False, False, "pods come from Deployments and Jobs"),
    ("delete", "", "pods", "watched", False, False, "pods come from Deployments and Jobs"),
    ("patch", "", "nodes", "cluster", False, False, "no node writes"),
    ("delete", "", "nodes", "cluster", False, False, "no node writes"),
    ("patch", "", "namespaces", "watched", False, False, "namespaces are read only"),
    ("update", "shipyard.dev", "modeldeployments", "watched", False, False, "never writes spec or metadata"),
    ("patch", "shipyard.dev", "modeldeployments", "watched", False, False, "never writes spec or metadata"),
    ("delete", "apiextensions.k8s.io", "customresourcedefinitions", "cluster", False, False, "CRDs are read only"),
    ("patch", "shipyard.dev", "modeldeployments/status", "watched", True, True, "writes status"),
    ("patch", "shipyard.dev", "modeldeployments/status", "other", True, False, "only watched namespaces"),
    ("watch", "shipyard.dev", "modeldeployments", "watched", True, True, "Kopf watches them"),
    ("list", "shipyard.dev", "modeldeployments", "other", True, False, "only watched namespaces"),
    ("create", "apps", "deployments", "watched", True, True, "one per version (server-side apply)"),
    ("create", "", "services", "watched", True, True, "the model's Service"),
    ("create", "batch", "jobs", "watched", True, True, "compression Jobs"),
    ("create", "batch", "jobs", "other", True, False, "only watched namespaces"),
    ("create", "policy", "poddisruptionbudgets", "watched", True, True, "one per live version"),
    ("delete", "policy", "poddisruptionbudgets", "watched", True, True, "a version scaled to 0 loses its budget"),
    ("create", "autoscaling", "horizontalpodautoscalers", "watched", True, True, "spec.serving.autoscaling (hpa)"),
    ("delete", "autoscaling", "horizontalpodautoscalers", "watched", True, True, "autoscaling removed"),
    ("create", "keda.sh", "scaledobjects", "watched", True, True, "spec.serving.autoscaling (keda)"),
    ("delete", "keda.sh", "scaledobjects", "watched", True, True, "autoscaling removed"),
    ("patch", "gateway.networking.k8s.io", "httproutes", "watched", True, True,
     "gatewayAPI traffic: the managed rules' weights"),
    ("get", "gateway.networking.k8s.io", "gateways", "watched", True, True, "a route's Gateway is programmed"),
    ("delete", "gateway.networking.k8s.io", "httproutes", "watched", False, False, "routes belong to the user"),
    ("create", "gateway.networking.k8s.io", "httproutes", "watched", False, False, "routes belong to the user"),
    ("watch", "", "pods", "watched", True, True, "readiness, scrape targets, compression summaries"),
    ("get", "", "persistentvolumeclaims", "watched", True, True, "the artifacts volume"),
    ("create", "", "events", "watched", True, True, "events on ModelDeployments"),
    ("get", "", "namespaces", "watched", True, True, "the allow-list annotation"),
    ("get", "", "namespaces", "other", True, False, "only watched namespaces"),
    ("get", "", "secrets", "release", True, True, "the notifications Secret (resourceNames): webhook URLs, HMAC key"),
    ("get", "", "configmaps", "release", True, True, "the notifications ConfigMap (resourceNames): its targets"),
    ("list", "", "secrets", "release", False, False, "read by name, with a GET"),
    ("watch", "", "secrets", "release", False, False, "read by name, with a GET"),
    ("get", "", "secrets", "release-other", False, False, "no other secret of its own namespace"),
]
WATCHED, OTHER, RELEASE = "ml", "default", "shipyard-system"
NOTIFICATIONS = "shipyard-notifications"  # the chart's default notifications.configMapName and .secretName


def build_target(where: str, resource: str, watched: str, other: str, release: str) -> tuple[str | None, str | None]:
    """(namespace, object name) a matrix row asks about; None: every namespace / any object."""
    namespace = {"watched": watched, "other": other, "release": release, "release-other": release}.get(where)
    if where == "release":
        return namespace, NOTIFICATIONS
    if where == "release-other":
        return namespace, "another-one"
    return namespace, namespace if resource == "namespaces" and namespace else None


def build_rbac_matrix_markdown() -> str:
    """The matrix as the Markdown table of docs/security.md."""
    lines = ["| verb | resource | where | cluster-wide | watchNamespaces | why |", "|---|---|---|---|---|---|"]
    for verb, group, resource, where, cluster, namespaced, why in RBAC_MATRIX:
        name = f"{group}/{resource}" if group else resource
        lines.append(f"| {verb} | `{name}` | {where} | {'yes' if cluster else 'no'} | "
                     f"{'yes' if namespaced else 'no'} | {why} |")
    return "\n".join(lines)


def assess_rendered_rbac(docs: list[dict[str, Any]], account: str, verb: str, group: str, resource: str,
                         namespace: str | None, name: str | None = None) -> bool:
    """What the rendered Roles/ClusterRoles bound to ``account`` allow (RBAC's rule matching; no wildcards exist; a
    rule with resourceNames matches only a request naming one of them)."""
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d.get("rules") or []
             for d in docs if d["kind"] in ("Role", "ClusterRole")}
    for binding in docs:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s["kind"] == "ServiceAccount" and s["name"] == account for s in binding["subjects"]):
            continue
        scope = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
        if scope is not None and scope != namespace:
            continue
        ref = binding["roleRef"]
        rules = roles[(ref["kind"], scope if ref["kind"] == "Role" else None, ref["name"])]
        if any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
               and ("resourceNames" not in r or name in r["resourceNames"]) for r in rules):
            return True
    return False


def build_access_reviews(watched: str, other: str, namespaced: bool,
                         release: str) -> tuple[dict[str, Any], list[bool]]:
    """A List of SelfSubjectAccessReviews for every matrix row, and the answers the matrix expects."""
    reviews, expected = [], []
    for verb, group, resource, where, cluster, in_namespaces, _ in RBAC_MATRIX:
        name, _, sub = resource.partition("/")
        attributes: dict[str, str] = {"verb": verb, "group": group, "resource": name}
        if sub:
            attributes["subresource"] = sub
        namespace, object_name = build_target(where, name, watched, other, release)
        if namespace is not None:
            attributes["namespace"] = namespace
        if object_name is not None:
            attributes["name"] = object_name
        reviews.append({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                        "spec": {"resourceAttributes": attributes}})
        expected.append(in_namespaces if namespaced else cluster)
    return {"apiVersion": "v1", "kind": "List", "items": reviews}, expected


def assert_rbac_matrix(kubeconfig: Path, watched: str, other: str, namespaced: bool, release: str) -> None:
    """Every row of the matrix, answered by the API server's authorizer for the account of ``kubeconfig``."""
    reviews, expected = build_access_reviews(watched, other, namespaced, release)
    out = subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", "create", "-f", "-", "-o", "json"],
                         input=json.dumps(reviews), capture_output=True, text=True, check=True)
    decoder, text, items = json.JSONDecoder(), out.stdout.strip(), []
    while text:  # kubectl prints one JSON document per created review
        item, end = decoder.raw_decode(text)
        items.extend(item["items"] if item.get("kind") == "List" else [item])
        text = text[end:].strip()
    answers = [bool(item["status"].get("allowed")) for item in items]
    wrong = [f"{row[0]} {row[2]} in {row[3]}: allowed={got}, expected {want}"
             for row, got, want in zip(RBAC_MATRIX, answers, expected, strict=True) if got != want]
    assert not wrong, wrong


# --- lint and values schema ------------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [
    {},
    {"replicaCount": "3", "watchNamespaces": "{a,b}", "metrics.serviceMonitor.enabled": "true",
     "metrics.podMonitor.enabled": "true"},
], ids=["defaults", "peering-namespaced-monitors"])
def test_helm_lint_passes(values: dict[str, str]) -> None:
    out = helm("lint", "--strict", str(CHART), *sets(values))
    assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout


@pytest.mark.parametrize(("key", "value", "named"), [
    ("replicas", "2", "replicas"),
    ("operator.workerz", "2", "workerz"),
    ("metrics.serviceMonitor.intervall", "10s", "intervall"),
    ("podSecurityContext.runAsRoot", "true", "runAsRoot"),
], ids=["top-level", "operator", "nested-two-levels", "security-context"])
def test_schema_rejects_an_unknown_key_naming_it(key: str, value: str, named: str) -> None:
    out = helm("template", "sy", str(CHART), "--set", f"{key}={value}", check=False)
    assert out.returncode != 0
    assert f"additional properties '{named}' not allowed" in out.stderr, out.stderr


@pytest.mark.parametrize(("key", "value", "where"), [
    ("image.pullPolicy", "Sometimes", "/image/pullPolicy"),
    ("replicaCount", "-1", "/replicaCount"),
    ("watchNamespaces", "{Bad_Name}", "/watchNamespaces/0"),
], ids=["enum", "minimum", "namespace-pattern"])
def test_schema_rejects_a_wrong_value_naming_its_path(key: str, value: str, where: str) -> None:
    out = helm("template", "sy", str(CHART), "--set", f"{key}={value}", check=False)
    assert out.returncode != 0 and f"at '{where}'" in out.stderr, out.stderr


# --- rendering ---------------------------------------------------------------------------------------------------

def test_rendered_crd_is_the_source_crd_with_helm_metadata() -> None:
    source = yaml.safe_load(CRD_SOURCE.read_text())
    (crd,) = find(render(), "CustomResourceDefinition", source["metadata"]["name"])
    assert crd["spec"] == source["spec"]  # includes the '{{version}}' texts, escaped in the template
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert source["metadata"]["labels"].items() <= crd["metadata"]["labels"].items()
    (unkept,) = find(render({"crds.keep": "false"}), "CustomResourceDefinition")
    assert "helm.sh/resource-policy" not in (unkept["metadata"].get("annotations") or {})
    assert not find(render({"crds.install": "false"}), "CustomResourceDefinition")


def test_cluster_mode_renders_one_cluster_role_with_explicit_verbs() -> None:
    docs = render()
    # The one Role: the notifications' ConfigMap and Secret in the release's namespace (test_notifications_role_...)
    assert [r["metadata"]["name"] for r in find(docs, "Role") + find(docs, "RoleBinding")] == [
        "sy-shipyard-notifications"] * 2
    (binding,) = find(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "sy-shipyard", "namespace": "shipyard-system"}]
    (role,) = find(docs, "ClusterRole", binding["roleRef"]["name"])
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert ("shipyard.dev", "modeldeployments/status", "patch") in granted
    assert ("apiextensions.k8s.io", "customresourcedefinitions", "watch") in granted
    # Cluster-wide Kopf does not list namespaces; the operator only reads their allow-list annotation.
    assert [g for g in granted if g[1] == "namespaces"] == [("", "namespaces", "get")]
    assert "--all-namespaces" in operator_container(docs)["args"]


def test_namespaced_mode_renders_a_role_per_namespace_and_only_cluster_reads() -> None:
    docs = render({"watchNamespaces": "{ml,staging}"})
    roles = [r for r in find(docs, "Role") if not r["metadata"]["name"].endswith("-notifications")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml", "staging"]
    assert sorted(b["metadata"]["namespace"] for b in find(docs, "RoleBinding")
                  if not b["metadata"]["name"].endswith("-notifications")) == ["ml", "staging"]
    assert all(r["rules"] == roles[0]["rules"] for r in roles)
    (reads,) = [c for c in find(docs, "ClusterRole") if not c["metadata"]["name"].endswith(("-view", "-edit"))]
    assert sorted(res for rule in reads["rules"] for res in rule["resources"]) == [
        "customresourcedefinitions", "namespaces"]
    assert all(set(rule["verbs"]) == {"list", "watch"} for rule in reads["rules"])
    args = operator_container(docs)["args"]
    assert "--namespace=ml" in args and "--namespace=staging" in args and "--all-namespaces" not in args
    strict = render({"watchNamespaces": "{ml}", "rbac.clusterReads": "false", "rbac.aggregateToDefaultRoles": "false"})
    assert not find(strict, "ClusterRole") and not find(strict, "ClusterRoleBinding")


@pytest.mark.parametrize("values", [
    {}, {"watchNamespaces": "{ml}", "replicaCount": "2"}, {"replicaCount": "2"},
], ids=["cluster", "namespaced-peering", "cluster-peering"])
def test_rbac_has_no_wildcards_secrets_or_rbac_access(values: dict[str, str]) -> None:
    rules = all_rules(render(values))
    assert rules
    named = [r for r in rules if "resourceNames" in r]
    # resourceNames only for the notifications' ConfigMap and Secret: get, by their names (docs/security.md)
    assert sorted(r["resources"][0] for r in named) == ["configmaps", "secrets"], named
    for rule in named:
        assert rule["resourceNames"] == [NOTIFICATIONS] and rule["verbs"] == ["get"] and len(rule["resources"]) == 1
    for rule in (r for r in rules if "resourceNames" not in r):
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, rule  # no nonResourceURLs
        for key in ("apiGroups", "resources", "verbs"):
            assert rule[key] and not any("*" in item for item in rule[key]), rule
        assert not {"secrets", "roles", "rolebindings", "clusterroles", "clusterrolebindings",
                    "serviceaccounts", "serviceaccounts/token", "pods/exec", "pods/attach", "pods/portforward",
                    "nodes", "nodes/proxy", "services/proxy", "pods/proxy"} & set(rule["resources"]), rule
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
        if "namespaces" in rule["resources"]:
            assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule


def test_notifications_role_reads_exactly_the_two_named_objects_and_the_configmap_renders_targets() -> None:
    docs = render({"notifications.secretName": "hooks", "notifications.configMapName": "targets",
                   "notifications.targets[0].name": "oncall", "notifications.targets[0].urlKey": "slack",
                   "notifications.targets[0].preset": "slack"})
    (role,) = find(docs, "Role", "sy-shipyard-notifications")
    assert role["metadata"]["namespace"] == "shipyard-system"
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["hooks"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["targets"], "verbs": ["get"]}]
    (binding,) = find(docs, "RoleBinding", "sy-shipyard-notifications")
    assert binding["roleRef"]["name"] == "sy-shipyard-notifications"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "sy-shipyard", "namespace": "shipyard-system"}]
    (configmap,) = find(docs, "ConfigMap", "targets")
    assert yaml.safe_load(configmap["data"]["config.yaml"]) == {
        "targets": [{"name": "oncall", "urlKey": "slack", "preset": "slack"}]}
    assert not find(docs, "Secret")  # the administrator's: URLs never sit in values or the release
    container = operator_container(docs)
    assert {"--notifications-secret=hooks", "--notifications-configmap=targets"} <= set(container["args"])
    assert {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in container["env"]
    assert not find(render(), "ConfigMap")  # no targets: no ConfigMap, nothing sent


@pytest.mark.parametrize("namespaced", [False, True], ids=["cluster-wide", "watch-namespaces"])
def test_rendered_rbac_gives_exactly_the_matrix(namespaced: bool) -> None:
    docs = render({"watchNamespaces": f"{{{WATCHED}}}"} if namespaced else {})
    wrong = []
    for verb, group, resource, where, cluster, in_namespaces, _ in RBAC_MATRIX:
        namespace, name = build_target(where, resource, WATCHED, OTHER, RELEASE)
        got = assess_rendered_rbac(docs, "sy-shipyard", verb, group, resource, namespace, name)
        if got != (in_namespaces if namespaced else cluster):
            wrong.append((verb, resource, where, got))
    assert not wrong, wrong


def test_security_doc_shows_the_matrix() -> None:
    doc = (REPO / "docs" / "security.md").read_text()
    table = build_rbac_matrix_markdown()
    assert f"<!-- rbac-matrix: generated from tests/integration/test_chart.py -->\n{table}\n<!-- /rbac-matrix -->" \
        in doc, f"docs/security.md's RBAC matrix differs from the test's; it should read:\n{table}"


def test_secure_defaults() -> None:
    docs = render()
    pod = find(docs, "Deployment")[0]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = operator_container(docs)
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 9090, "health": 8081}
    assert "--liveness=http://0.0.0.0:8081/healthz" in container["args"]
    assert "--metrics-port=9090" in container["args"]
    assert container["resources"]["limits"]["memory"] == "256Mi"
    assert not [a for a in container["args"] if a.startswith("--allowed-prometheus-address")]
    allowed = operator_container(render({"operator.allowedPrometheusAddresses": "{http://a:9090,https://b/prom}"}))
    assert [a for a in allowed["args"] if a.startswith("--allowed-prometheus-address")] == [
        "--allowed-prometheus-address=http://a:9090", "--allowed-prometheus-address=https://b/prom"]
    refused = helm("template", "sy", str(CHART), "--set", "operator.allowedPrometheusAddresses={http://u:p@a:1}",
                   check=False)
    assert refused.returncode != 0 and "/operator/allowedPrometheusAddresses/0" in refused.stderr, refused.stderr


def assert_operator_pod_is_restricted(pod: dict[str, Any]) -> None:
    """The chart's operator pod: non-root with a uid, read-only root, no privilege escalation, no capabilities,
    RuntimeDefault seccomp (it needs its ServiceAccount token: that one is mounted)."""
    for container in pod["containers"]:
        sc = {**pod["securityContext"], **container["securityContext"]}
        assert sc["runAsNonRoot"] is True and isinstance(sc["runAsUser"], int) and sc["runAsUser"] > 0, sc
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, sc
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc.get("privileged") in (None, False), sc
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, sc


@pytest.mark.parametrize(("replicas", "enabled", "peering"), [
    ("1", "false", False), ("1", "true", True), ("3", "false", True),
], ids=["one-standalone", "one-with-peering", "three-forces-peering"])
def test_peering_settings_follow_replicas(replicas: str, enabled: str, peering: bool) -> None:
    docs = render({"replicaCount": replicas, "peering.enabled": enabled})
    container = operator_container(docs)
    deployment = find(docs, "Deployment")[0]
    assert ("--peering=shipyard" in container["args"]) is peering
    assert bool(find(docs, "ClusterKopfPeering")) is peering
    assert bool(find(docs, "CustomResourceDefinition", "clusterkopfpeerings.kopf.dev")) is peering
    if peering:
        # Distinct priorities: every pod computes its own from its IP (the downward API).
        assert container["command"] == ["/bin/sh", "-c"] and "--priority=" in container["args"][0]
        assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in container["env"]
        assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    else:
        assert container["command"] == ["shipyard-operator"]
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert bool(find(docs, "PodDisruptionBudget")) is (int(replicas) > 1)


def test_peering_priority_command_gives_distinct_priorities() -> None:
    """The shell line the chart runs, executed here with a stand-in for shipyard-operator."""
    script = operator_container(render({"replicaCount": "2"}))["args"][0]
    script = script.replace("exec shipyard-operator", "echo").replace("python3 ", f"{sys.executable} ")
    seen = set()
    for ip in ("10.244.0.7", "10.244.1.7", "fd00::a"):
        out = subprocess.run(["/bin/sh", "-c", script, "x", "--all-namespaces"], capture_output=True, text=True,
                             env={"POD_IP": ip, "PATH": os.environ["PATH"]}, check=True)
        args = out.stdout.split()
        assert args[0] == "--all-namespaces" and args[1].startswith("--priority=")
        seen.add(int(args[1].split("=", 1)[1]))
    assert len(seen) == 3


def test_monitors_and_their_guard() -> None:
    docs = render({"metrics.serviceMonitor.enabled": "true", "metrics.podMonitor.enabled": "true",
                   "metrics.serviceMonitor.labels.release": "kube-prometheus"})
    (sm,) = find(docs, "ServiceMonitor")
    (pm,) = find(docs, "PodMonitor")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics" and pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    (svc,) = find(docs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    out = helm("template", "sy", str(CHART), "--set", "metrics.serviceMonitor.enabled=true",
               "--set", "metrics.service.enabled=false", check=False)
    assert out.returncode != 0 and "metrics.service.enabled" in out.stderr


# --- on the control plane ----------------------------------------------------------------------------------------

def build_token_kubeconfig(cluster: Cluster, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as a ServiceAccount (a short-lived token from the TokenRequest API)."""
    token = cluster.kubectl("create", "token", account, "-n", namespace, "--duration=1h").stdout.strip()
    admin = json.loads(cluster.kubectl("config", "view", "--raw", "--flatten", "-o", "json").stdout)
    server = admin["clusters"][0]["cluster"]
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "sa",
              "clusters": [{"name": "c", "cluster": {"server": server["server"],
                                                     "certificate-authority-data":
                                                         server["certificate-authority-data"]}}],
              "users": [{"name": "sa", "user": {"token": token}}],
              "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa"}}]}
    path.write_text(json.dumps(config))
    who = subprocess.run(["kubectl", f"--kubeconfig={path}", "auth", "whoami", "-o", "json"],
                         capture_output=True, text=True, check=True)
    assert json.loads(who.stdout)["status"]["userInfo"]["username"] == \
        f"system:serviceaccount:{namespace}:{account}"
    return path


def adopt_crd(cluster: Cluster, release: str, namespace: str) -> None:
    """The session installed the CRD with kubectl; hand it to the release the way Helm adopts existing objects."""
    name = f"crd/{CRD_SOURCE.stem}"
    cluster.kubectl("label", name, "app.kubernetes.io/managed-by=Helm", "--overwrite")
    cluster.kubectl("annotate", name, f"meta.helm.sh/release-name={release}",
                    f"meta.helm.sh/release-namespace={namespace}", "--overwrite")


def assert_no_permission_problems(log: str) -> None:
    for needle in ("Forbidden", "forbidden", "(403)", "Not enough permissions", "Traceback"):
        assert needle not in log, f"{needle!r} in the operator's log:\n{log[-4000:]}"


def apply_example_and_wait_ready(cluster: Cluster, namespace: str) -> dict[str, Any]:
    create_artifacts_volume(cluster, namespace)
    cluster.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "digits.yaml"))
    out = cluster.kubectl("wait", "--for=condition=Ready", "--timeout=90s", "-n", namespace, "md/digits",
                          check=False, timeout=120)
    md = cluster.get("md", "digits", namespace)
    assert out.returncode == 0, f"digits not Ready: {out.stderr} {json.dumps((md or {}).get('status'))}"
    assert md is not None
    return md


def run_helm_test_script(liveness_port: int, metrics_port: int) -> subprocess.CompletedProcess[str]:
    """Runs the chart's `helm test` container command as a local process (KWOK only fakes the pod) with the ports of
    a local operator; BASE is the metrics Service there, 127.0.0.1 here."""
    rendered = helm("template", "sy", str(CHART), "--show-only", "templates/tests/test-operator.yaml",
                    "--set", f"operator.livenessPort={liveness_port}", "--set", f"operator.metricsPort={metrics_port}")
    (container,) = yaml.safe_load(rendered.stdout)["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python3", "-c"]
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"]}, "BASE": "http://127.0.0.1"}
    return subprocess.run([sys.executable, "-c", container["args"][0]], capture_output=True, text=True, env=env,
                          timeout=120)


def can_i(kubeconfig: Path, *args: str) -> bool:
    out = subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", "auth", "can-i", *args],
                         capture_output=True, text=True)
    return out.stdout.strip() == "yes"


@pytest.fixture
def release_namespace(cluster: Cluster) -> Iterator[str]:
    name = f"sys-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    for release in ("sy", "tenant"):
        helm("uninstall", release, "-n", name, "--wait", "--timeout=60s", kubeconfig=cluster.kubeconfig, check=False)
    # The kept Kopf CRDs and the hook-made peering object belong to no release now: remove them so that a
    # later run can install them again (the ModelDeployment CRD stays: the session's other tests use it).
    cluster.kubectl("delete", "clusterkopfpeering", "shipyard", "--ignore-not-found", check=False)
    cluster.kubectl("delete", "crd", *KOPF_CRDS, "--ignore-not-found", check=False)
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_install_test_and_run_the_example_to_ready_under_the_chart_rbac(
        cluster: Cluster, release_namespace: str, namespace: str, tmp_path: Path) -> None:
    kc = cluster.kubeconfig
    adopt_crd(cluster, "sy", release_namespace)
    # Two replicas: peering on, so the Kopf peering CRDs, the hook-made peering object and its RBAC are exercised.
    helm("install", "sy", str(CHART), "-n", release_namespace, "--set", "replicaCount=2", "--wait",
         "--timeout=120s", kubeconfig=kc)
    crd = cluster.get("crd", CRD_SOURCE.stem)
    assert crd is not None and crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == "sy"
    assert cluster.get("clusterkopfpeering", "shipyard") is not None
    tested = helm("test", "sy", "-n", release_namespace, "--timeout=120s", kubeconfig=kc)
    assert "Phase:          Succeeded" in tested.stdout  # KWOK's verdict: nothing ran in the test pod

    sa = build_token_kubeconfig(cluster, release_namespace, "sy-shipyard", tmp_path / "sa.kubeconfig")
    metrics_port = free_port()
    op = OperatorProcess(sa, tmp_path / "operator.log", "--all-namespaces", "--peering=shipyard", "--priority=1000",
                         "--metrics-port", str(metrics_port))
    try:
        wait_until(op.live, 30, message="the operator's liveness endpoint")
        md = apply_example_and_wait_ready(cluster, namespace)
        # What the `helm test` pod really runs: its script, rendered by the chart, against this operator.
        check = run_helm_test_script(op.liveness, metrics_port)
        assert check.returncode == 0 and "The operator is live and serves its metrics" in check.stdout, check
    finally:
        log = op.stop()
    assert md["status"]["phase"] == "Healthy" and md["status"]["stableVersion"] == "1.0.0"
    assert md["status"]["observedGeneration"] == md["metadata"]["generation"]
    for kind, child in (("Job", "digits-compress-"), ("Deployment", "digits-1-0-0"), ("Service", "digits")):
        assert f"Applied {kind} {namespace}/{child}" in log, log[-3000:]
    assert_no_permission_problems(log)
    peering = cluster.get("clusterkopfpeering", "shipyard")
    assert peering is not None  # the operator kept itself alive in it (or removed itself on exit)

    # What the account may and must not do: the whole matrix, on the API server's authorizer.
    assert_rbac_matrix(sa, namespace, "default", namespaced=False, release=release_namespace)
    assert can_i(sa, "watch", "pods", "-A") and not can_i(sa, "get", "secrets", "-A")  # kubectl's own view agrees
    installed = cluster.get("deployment", "sy-shipyard", release_namespace)
    assert installed is not None
    assert_operator_pod_is_restricted(installed["spec"]["template"]["spec"])


def test_namespaced_release_runs_the_example_with_roles_only_in_its_namespace(
        cluster: Cluster, release_namespace: str, namespace: str, tmp_path: Path) -> None:
    kc = cluster.kubeconfig
    helm("install", "tenant", str(CHART), "-n", release_namespace, "--set", "crds.install=false",
         "--set", f"watchNamespaces={{{namespace}}}", "--set", "rbac.aggregateToDefaultRoles=false",
         "--wait", "--timeout=120s", kubeconfig=kc)
    role = cluster.get("role", "tenant-shipyard", namespace)
    assert role is not None
    sa = build_token_kubeconfig(cluster, release_namespace, "tenant-shipyard", tmp_path / "sa.kubeconfig")
    op = OperatorProcess(sa, tmp_path / "operator.log", f"--namespace={namespace}")
    try:
        wait_until(op.live, 30, message="the operator's liveness endpoint")
        md = apply_example_and_wait_ready(cluster, namespace)
    finally:
        log = op.stop()
    assert md["status"]["phase"] == "Healthy"
    assert f"Applied Deployment {namespace}/digits-1-0-0" in log
    assert_no_permission_problems(log)
    assert can_i(sa, "list", "modeldeployments", "-n", namespace)
    assert not can_i(sa, "list", "modeldeployments", "-n", "default")
    assert not can_i(sa, "list", "modeldeployments", "-A")
    assert_rbac_matrix(sa, namespace, "default", namespaced=True, release=release_namespace)
