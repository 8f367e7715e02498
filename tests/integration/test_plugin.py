"""kubectl-shipyard against the real API server: reading status and history, setting the control annotations,
and its errors for unknown objects, versions not in history and missing RBAC. No operator runs: the status is
written directly through the status subresource, as the operator would."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from shipyard.operator import plugin
from tests.integration.conftest import Cluster, wait_until

pytestmark = pytest.mark.integration
NOW = "2026-01-03T00:00:00Z"


def condition(type_: str, status: str, reason: str) -> dict[str, str]:
    return {"type": type_, "status": status, "reason": reason, "message": "", "lastTransitionTime": NOW}


HISTORY = [
    {"version": "1.0.0", "image": "registry.example/acme/digits:1.0.0", "outcome": "Superseded", "reason": "RolledOut",
     "time": NOW, "retry": 0},
    {"version": "1.0.1", "image": "registry.example/acme/digits:1.0.1", "outcome": "Promoted", "reason": "RolledOut",
     "time": NOW, "retry": 0},
]
PROGRESSING = {
    "observedGeneration": 1, "phase": "Progressing", "message": "Step 1/2 ready", "stableVersion": "1.0.1",
    "stableImage": "registry.example/acme/digits:1.0.1", "candidateVersion": "1.1.0",
    "candidateImage": "registry.example/acme/digits:1.1.0", "currentStepIndex": 0, "stepStartedAt": NOW,
    "replicas": {"ready": 4, "stable": 3, "candidate": 1},
    "conditions": [condition("Ready", "False", "Progressing"), condition("Reconciling", "True", "Progressing"),
                   condition("Stalled", "False", "AsExpected")],
    "analysis": {"version": "1.1.0", "phase": "Running", "detectionBoundSeconds": 30, "metrics": [
        {"name": "error-rate", "provider": "builtin", "verdict": "Successful", "lastValue": 0.004,
         "stableValue": 0.003, "successes": 1, "failures": 0, "inconclusive": 0, "errors": 0}]},
    "history": HISTORY,
}
ROLLED_BACK = {
    **PROGRESSING, "phase": "RolledBack", "candidateVersion": None, "candidateImage": None, "currentStepIndex": None,
    "analysis": None,
    "history": [*HISTORY, {"version": "1.1.0", "image": "registry.example/acme/digits:1.1.0", "outcome": "RolledBack",
                           "reason": "AnalysisFailed", "time": NOW, "retry": 0, "message": "error-rate 0.2 > 0.01"}],
}


def create_model(cluster: Cluster, namespace: str, status: dict[str, Any]) -> None:
    cluster.apply({"apiVersion": "shipyard.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "digits"},
                   "spec": {"image": "registry.example/acme/digits:1.1.0", "model": {"path": "/models/digits"},
                            "serving": {"replicas": 4},
                            "rollout": {"steps": [{"weight": 25, "pause": "60s"}, {"weight": 50, "pause": "60s"}]}}},
                  namespace)
    set_status(cluster, namespace, status)


def set_status(cluster: Cluster, namespace: str, status: dict[str, Any]) -> None:
    cluster.kubectl("patch", "md", "digits", "-n", namespace, "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": status}))


def keep_versions(cluster: Cluster, namespace: str, *versions: str) -> None:
    """Deployments labelled as the operator labels kept versions (scaled to 0)."""
    for version in versions:
        labels = {"shipyard.dev/model": "digits", "shipyard.dev/version": version,
                  "shipyard.dev/component": "serving", "app.kubernetes.io/managed-by": "shipyard-tests"}
        cluster.apply({"apiVersion": "apps/v1", "kind": "Deployment",
                       "metadata": {"name": f"digits-{version.replace('.', '-')}", "labels": labels},
                       "spec": {"replicas": 0, "selector": {"matchLabels": labels},
                                "template": {"metadata": {"labels": labels}, "spec": {"containers": [
                                    {"name": "model", "image": f"registry.example/acme/digits:{version}"}]}}}},
                      namespace)


def shipyard(cluster: Cluster | str, namespace: str, *args: str,
             capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    kubeconfig = cluster if isinstance(cluster, str) else cluster.kubeconfig
    code = plugin.main(["--kubeconfig", kubeconfig, "-n", namespace, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def annotations(cluster: Cluster, namespace: str) -> dict[str, str]:
    md = cluster.get("md", "digits", namespace)
    assert md is not None
    return dict(md["metadata"].get("annotations") or {})


# --- reading -----------------------------------------------------------------------------------------------------

def test_status_and_history_read_the_object(cluster: Cluster, namespace: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    create_model(cluster, namespace, PROGRESSING)
    code, out, err = shipyard(cluster, namespace, "status", "digits", capsys=capsys)
    assert code == 0, err
    assert f"ModelDeployment {namespace}/digits" in out
    assert "Candidate:   1.1.0   registry.example/acme/digits:1.1.0   ready 1" in out
    assert "Step:        1/2 (weight 25%, pause 60s)" in out
    assert any(line.split()[:3] == ["error-rate", "builtin", "Successful"] for line in out.splitlines())
    code, out, _ = shipyard(cluster, namespace, "history", "digits", capsys=capsys)
    assert code == 0 and [line.split()[:2] for line in out.splitlines()[1:]] == [
        ["1.0.0", "Superseded"], ["1.0.1", "Promoted"]]


@pytest.mark.parametrize("command", ["status", "history", "promote", "watch"])
def test_unknown_object_is_one_clear_error(cluster: Cluster, namespace: str, command: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = shipyard(cluster, namespace, command, "nope", capsys=capsys)
    assert (code, out) == (1, "")
    assert err == f'error: modeldeployment "nope" not found in namespace {namespace}\n'


# --- controls ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("command", "annotation"), [
    ("promote", "shipyard.dev/promote"), ("abort", "shipyard.dev/abort"),
], ids=["promote", "abort"])
def test_promote_and_abort_annotate_the_candidate(cluster: Cluster, namespace: str, command: str, annotation: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    create_model(cluster, namespace, PROGRESSING)
    code, _, err = shipyard(cluster, namespace, command, "digits", "--version", "1.0.9", capsys=capsys)
    assert code == 1 and "version 1.0.9 is not the candidate" in err
    assert annotation not in annotations(cluster, namespace)
    code, out, err = shipyard(cluster, namespace, command, "digits", capsys=capsys)
    assert code == 0, err
    assert f"({annotation}=1.1.0)" in out
    assert annotations(cluster, namespace)[annotation] == "1.1.0"
    md = json.loads(cluster.kubectl("get", "md", "digits", "-n", namespace, "-o", "json",
                                    "--show-managed-fields").stdout)
    owners = {f["manager"] for f in md["metadata"]["managedFields"] if "f:annotations" in json.dumps(f)}
    assert "kubectl-shipyard" in owners  # its own field manager, never the GitOps tool's or the operator's


def test_retry_after_a_rollback_and_not_before(cluster: Cluster, namespace: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    create_model(cluster, namespace, PROGRESSING)
    code, _, err = shipyard(cluster, namespace, "retry", "digits", capsys=capsys)
    assert code == 1 and "nothing to retry" in err
    set_status(cluster, namespace, ROLLED_BACK)
    code, out, err = shipyard(cluster, namespace, "retry", "digits", "--token", "again-1", capsys=capsys)
    assert code == 0, err
    assert annotations(cluster, namespace)["shipyard.dev/retry"] == "again-1"


def test_rollback_to_a_kept_version_and_refusals(cluster: Cluster, namespace: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    create_model(cluster, namespace, ROLLED_BACK)
    keep_versions(cluster, namespace, "1.0.1", "1.1.0")
    code, _, err = shipyard(cluster, namespace, "rollback", "digits", "--to", "0.9.0", capsys=capsys)
    assert code == 1
    assert err == (f"error: version 0.9.0 is not in the history of {namespace}/digits "
                   "(versions: 1.0.0, 1.0.1, 1.1.0)\n")
    code, _, err = shipyard(cluster, namespace, "rollback", "digits", "--to", "1.0.0", capsys=capsys)
    assert code == 1 and "no longer kept (kept versions: 1.0.1, 1.1.0" in err
    assert "shipyard.dev/rollback-to" not in annotations(cluster, namespace)
    keep_versions(cluster, namespace, "1.0.0")
    code, out, err = shipyard(cluster, namespace, "rollback", "digits", "--to", "1.0.0", capsys=capsys)
    assert code == 0, err
    assert annotations(cluster, namespace)["shipyard.dev/rollback-to"] == "1.0.0"


# --- RBAC ----------------------------------------------------------------------------------------------------------

def token_kubeconfig(cluster: Cluster, namespace: str, account: str, path: Path) -> str:
    token = cluster.kubectl("create", "token", account, "-n", namespace, "--duration=10m").stdout.strip()
    admin = json.loads(cluster.kubectl("config", "view", "--raw", "--flatten", "-o", "json").stdout)
    server = admin["clusters"][0]["cluster"]
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": {"server": server["server"],
                                               "certificate-authority-data": server["certificate-authority-data"]}}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa"}}]}))
    return str(path)


def reader_kubeconfig(cluster: Cluster, namespace: str, account: str, resources: str, path: Path) -> str:
    """A ServiceAccount that may get, list and watch `resources` in the namespace (no more), as a kubeconfig."""
    cluster.kubectl("create", "serviceaccount", account, "-n", namespace)
    cluster.kubectl("create", "role", f"{account}-reads", "-n", namespace, "--verb=get,list,watch",
                    f"--resource={resources}")
    cluster.kubectl("create", "rolebinding", f"{account}-reads", "-n", namespace, f"--role={account}-reads",
                    f"--serviceaccount={namespace}:{account}")
    return token_kubeconfig(cluster, namespace, account, path)


def test_missing_rbac_is_reported_as_such(cluster: Cluster, namespace: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    create_model(cluster, namespace, PROGRESSING)
    cluster.kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    reader = reader_kubeconfig(cluster, namespace, "reader", "modeldeployments.shipyard.dev", tmp_path / "reader")
    nobody = token_kubeconfig(cluster, namespace, "nobody", tmp_path / "nobody")
    code, out, _ = shipyard(reader, namespace, "status", "digits", capsys=capsys)
    assert code == 0 and "Candidate:   1.1.0" in out
    code, _, err = shipyard(reader, namespace, "promote", "digits", capsys=capsys)
    assert code == 1
    assert err.startswith(f'error: not allowed to patch modeldeployment "digits" in namespace {namespace} (RBAC): ')
    assert f"system:serviceaccount:{namespace}:reader" in err
    code, _, err = shipyard(nobody, namespace, "status", "digits", capsys=capsys)
    assert code == 1 and "not allowed to get" in err
    assert "shipyard.dev/promote" not in annotations(cluster, namespace)


# --- watch ---------------------------------------------------------------------------------------------------------

def test_watch_prints_every_change_until_its_timeout(cluster: Cluster, namespace: str) -> None:
    create_model(cluster, namespace, PROGRESSING)
    script = Path(sys.executable).parent / "kubectl-shipyard"  # the console script itself
    proc = subprocess.Popen([str(script), "--kubeconfig", cluster.kubeconfig, "-n", namespace, "watch", "digits",
                             "--timeout", "8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    assert proc.stdout is not None and proc.stderr is not None
    # One reader owns stdout: mixing readline() with communicate() loses what readline() buffered.
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    wait_until(lambda: any(line.startswith("Phase:") for line in list(lines)), 10, message="the first view")
    assert lines[0].startswith("--- ")
    set_status(cluster, namespace, {**PROGRESSING, "phase": "Healthy", "candidateVersion": None,
                                    "stableVersion": "1.1.0", "currentStepIndex": None, "analysis": None})
    proc.wait(timeout=30)
    reader.join(timeout=5)
    err = proc.stderr.read()
    assert proc.returncode == 0, err
    assert time.monotonic() - started < 20
    out = "".join(lines)
    views = out.split("--- ")[1:]
    assert len(views) >= 2, out
    assert "Phase:       Progressing" in views[0], out
    assert "Phase:       Healthy" in views[-1] and "Stable:      1.1.0" in views[-1]
