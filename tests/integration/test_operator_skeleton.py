"""The operator on the real control plane (KopfRunner): children, readiness, new tags, cascade, bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from kopf.testing import KopfRunner

from tests import examples
from tests.integration.conftest import Cluster, create_artifacts_volume, wait_until

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def model(name: str, image: str, replicas: int = 2, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "shipyard.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {"image": image, "model": {"path": "/models/digits"}, "serving": {"replicas": replicas}, **spec},
    }


def condition(body: dict[str, Any] | None, type_: str) -> str | None:
    for c in ((body or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return str(c.get("status"))
    return None


def test_operator_creates_owned_deployment_and_service_and_becomes_ready(
        cluster: Cluster, operator: KopfRunner, namespace: str) -> None:
    cluster.apply(model("digits", "registry.example/acme/digits-model:1.0.0"), namespace)
    dep = wait_until(lambda: cluster.get("deployment", "digits-1-0-0", namespace), 30, message="the Deployment")
    svc = wait_until(lambda: cluster.get("service", "digits", namespace), 30, message="the Service")
    md = cluster.get("modeldeployment", "digits", namespace)
    assert md is not None

    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/acme/digits-model:1.0.0"
    assert dep["metadata"]["labels"]["shipyard.dev/model"] == "digits"
    assert dep["metadata"]["labels"]["shipyard.dev/version"] == "1.0.0"
    assert dep["spec"]["template"]["metadata"]["labels"]["shipyard.dev/version"] == "1.0.0"
    assert dep["spec"]["replicas"] == 2
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SHIPYARD_MODEL_VERSION"] == "1.0.0" and env["SHIPYARD_MODEL_NAME"] == "digits"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    for child in (dep, svc):
        (ref,) = child["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
            "ModelDeployment", "digits", md["metadata"]["uid"], True)
    with_fields = json.loads(cluster.kubectl("get", "deployment", "digits-1-0-0", "-n", namespace, "-o", "json",
                                             "--show-managed-fields").stdout)
    managers = {(f["manager"], f["operation"]) for f in with_fields["metadata"]["managedFields"]}
    assert ("shipyard-operator", "Apply") in managers

    # kstatus readiness as a GitOps tool sees it.
    out = cluster.kubectl("wait", "--for=condition=Ready", "--timeout=60s", "-n", namespace,
                          "modeldeployment/digits", check=False)
    assert out.returncode == 0, out.stderr
    md = cluster.get("modeldeployment", "digits", namespace)
    assert md is not None
    status = md["status"]
    assert status["observedGeneration"] == md["metadata"]["generation"]
    assert status["phase"] == "Healthy"
    assert status["stableVersion"] == "1.0.0"
    assert condition(md, "Reconciling") == "False" and condition(md, "Stalled") == "False"
    # at rest the Service selects the stable version only (a first rollout, with no stable yet, selects every
    # version's pods; the selector narrows in the pass that makes the model Healthy, before Ready is written)
    svc = cluster.get("service", "digits", namespace)
    assert svc is not None
    assert svc["spec"]["selector"] == {"shipyard.dev/model": "digits", "shipyard.dev/component": "serving",
                                       "shipyard.dev/version": "1.0.0"}
    assert [h["version"] for h in status["history"]] == ["1.0.0"]
    # Kopf stored nothing of its own: no finalizer, no progress or diff-base annotations.
    assert not md["metadata"].get("finalizers")
    assert not [a for a in (md["metadata"].get("annotations") or {}) if a.startswith(("kopf.zalando.org",
                                                                                       "shipyard.dev/"))]
    printed = cluster.kubectl("get", "md", "-n", namespace, "digits").stdout
    assert "Healthy" in printed and "1.0.0" in printed


def test_idle_operator_writes_nothing(cluster: Cluster, operator: KopfRunner, namespace: str) -> None:
    cluster.apply(model("idle", "registry.example/acme/digits-model:2.0.0", replicas=1), namespace)
    cluster.kubectl("wait", "--for=condition=Ready", "--timeout=60s", "-n", namespace, "md/idle")
    time.sleep(1.0)  # let the last watch events settle

    def versions() -> dict[str, str]:
        out = cluster.kubectl("get", "md,deployments,services", "-n", namespace, "-o", "json").stdout
        return {f"{i['kind']}/{i['metadata']['name']}": i["metadata"]["resourceVersion"]
                for i in json.loads(out)["items"]}

    before = versions()
    time.sleep(4.0)
    assert versions() == before


def test_new_image_tag_rolls_out_a_new_version_and_keeps_the_old_one(
        cluster: Cluster, operator: KopfRunner, namespace: str) -> None:
    cluster.apply(model("digits", "registry.example/acme/digits-model:1.0.0"), namespace)
    cluster.kubectl("wait", "--for=condition=Ready", "--timeout=60s", "-n", namespace, "md/digits")
    cluster.apply(model("digits", "registry.example/acme/digits-model:1.1.0"), namespace)

    def promoted() -> dict[str, Any] | None:
        md = cluster.get("modeldeployment", "digits", namespace)
        ok = md and md["status"].get("stableVersion") == "1.1.0" and condition(md, "Ready") == "True"
        return md if ok else None

    md = wait_until(promoted, 60, message="version 1.1.0 to become stable")
    assert md["status"]["observedGeneration"] == md["metadata"]["generation"] == 2
    assert md["status"].get("candidateVersion") is None
    assert [(h["version"], h["outcome"]) for h in md["status"]["history"]] == [
        ("1.0.0", "Superseded"), ("1.1.0", "Promoted")]
    new = cluster.get("deployment", "digits-1-1-0", namespace)
    old = wait_until(lambda: (d := cluster.get("deployment", "digits-1-0-0", namespace))
                     and d["spec"]["replicas"] == 0 and d, 30, message="the old version scaled to 0")
    assert new is not None and new["spec"]["replicas"] == 2
    assert new["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":1.1.0")
    assert old["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":1.0.0")
    events = cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    reasons = [e["reason"] for e in json.loads(events)["items"] if e["involvedObject"]["name"] == "digits"]
    assert "Promoted" in reasons and "Deploying" in reasons


def test_revision_history_limit_deletes_the_oldest_versions(
        cluster: Cluster, operator: KopfRunner, namespace: str) -> None:
    for tag in ("1.0.0", "1.1.0", "1.2.0"):
        cluster.apply(model("hist", f"registry.example/acme/digits-model:{tag}", replicas=1,
                            revisionHistoryLimit=1), namespace)
        wait_until(lambda tag=tag: (m := cluster.get("md", "hist", namespace)) and
                   m["status"].get("stableVersion") == tag and condition(m, "Ready") == "True", 60,
                   message=f"version {tag} stable")

    def names() -> list[str]:
        out = cluster.kubectl("get", "deployments", "-n", namespace, "-o", "json").stdout
        return sorted(d["metadata"]["name"] for d in json.loads(out)["items"])

    wait_until(lambda: names() == ["hist-1-1-0", "hist-1-2-0"], 30, message="only the newest old version kept")


def test_deleting_the_model_deployment_cascades(cluster: Cluster, operator: KopfRunner, namespace: str) -> None:
    cluster.apply(model("gone", "registry.example/acme/digits-model:1.0.0", replicas=1), namespace)
    wait_until(lambda: cluster.get("deployment", "gone-1-0-0", namespace), 30, message="the Deployment")
    wait_until(lambda: cluster.get("service", "gone", namespace), 30, message="the Service")
    cluster.kubectl("delete", "md", "gone", "-n", namespace, "--wait=true", "--timeout=30s")
    wait_until(lambda: cluster.get("deployment", "gone-1-0-0", namespace) is None
               and cluster.get("service", "gone", namespace) is None, 60, message="garbage collection")
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
    wait_until(lambda: not json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"],
               60, message=f"the pods to go ({len(pods)} left)")


def test_examples_become_ready(cluster: Cluster, operator: KopfRunner, namespace: str) -> None:
    """Each example (compression included: KWOK completes the Job) reaches Ready."""
    create_artifacts_volume(cluster, namespace)
    for path in examples.PATHS:  # their ModelDeployments (gatewayAPI traffic at rest: ready without its route)
        doc = examples.load_model_deployment(path)
        doc["metadata"].pop("namespace", None)
        cluster.apply(doc, namespace)
    for path in examples.PATHS:
        name = examples.load_model_deployment(path)["metadata"]["name"]
        out = cluster.kubectl("wait", "--for=condition=Ready", "--timeout=90s", "-n", namespace, f"md/{name}",
                              check=False)
        assert out.returncode == 0, f"{path.name}: {out.stderr}"


def test_what_the_schema_cannot_express_is_stalled_and_keeps_what_serves(
        cluster: Cluster, operator: KopfRunner, namespace: str) -> None:
    """A CPU request above its limit passes the CRD (requests and limits are not compared there) but not the API
    server's Deployment validation: Stalled with the server's message, the stable version keeps serving, no crash
    loop."""
    cluster.apply(model("sel", "registry.example/acme/digits-model:1.0.0", replicas=1), namespace)
    cluster.kubectl("wait", "--for=condition=Ready", "--timeout=60s", "-n", namespace, "md/sel")
    bad = model("sel", "registry.example/acme/digits-model:1.1.0", replicas=1)
    bad["spec"]["serving"]["resources"] = {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}
    out = cluster.apply(bad, namespace, check=False)
    assert out.returncode == 0, out.stderr  # admitted: the schema cannot tell
    md = wait_until(lambda: (m := cluster.get("md", "sel", namespace)) and condition(m, "Stalled") == "True" and m,
                    30, message="Stalled")
    stalled = next(c for c in md["status"]["conditions"] if c["type"] == "Stalled")
    assert stalled["reason"] == "ChildRejected"
    assert "sel-1-1-0" in stalled["message"] and "must be less than or equal to cpu limit" in stalled["message"]
    assert md["status"]["observedGeneration"] == md["metadata"]["generation"]
    assert condition(md, "Ready") == "False"
    assert md["status"]["stableVersion"] == "1.0.0"  # nothing already stored is lost
    dep = cluster.get("deployment", "sel-1-0-0", namespace)
    assert dep is not None and dep["spec"]["replicas"] == 1
    assert cluster.get("deployment", "sel-1-1-0", namespace) is None
    # Fixing the spec recovers without a restart of the operator.
    cluster.apply(model("sel", "registry.example/acme/digits-model:1.1.0", replicas=1), namespace)
    wait_until(lambda: (m := cluster.get("md", "sel", namespace)) and m["status"].get("stableVersion") == "1.1.0"
               and condition(m, "Stalled") == "False", 60, message="recovery to 1.1.0")
