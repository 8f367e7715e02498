"""kstatus compatibility: sigs.k8s.io/cli-utils' own kstatus library (what Flux, Config Sync and kpt use to wait for
resources), built from the Go module proxy into the cache (hack/kstatus), computes the expected status for the
ModelDeployment status fixtures of every phase after a round trip through the real API server (status
subresource, so the fixtures are valid against the CRD's schema). The Argo CD health check runs on the same
objects read back."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Cluster, _load_cluster_module
from tests.unit.test_argocd_health import FIXTURES, Fixture, run_health

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "hack" / "kstatus"


def build_kstatus() -> Path:
    """The kstatus tool, built once per source version into the project's binary cache."""
    digest = hashlib.sha256(b"".join((SOURCE / f).read_bytes() for f in ("go.mod", "go.sum", "main.go")))
    target = _load_cluster_module().cache_dir() / "bin" / f"kstatus-{digest.hexdigest()[:12]}" / "kstatus"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(["go", "build", "-o", str(target), "."], cwd=SOURCE, capture_output=True, text=True,
                             env=dict(os.environ, CGO_ENABLED="0"), timeout=900)
        assert out.returncode == 0, f"building hack/kstatus failed: {out.stderr}"
    return target


def compute(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = subprocess.run([str(build_kstatus())], input=json.dumps(objects), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    result: list[dict[str, Any]] = json.loads(out.stdout)
    return result


def store(cluster: Cluster, namespace: str, index: int, fixture: Fixture) -> dict[str, Any]:
    """Creates the fixture's object (at its generation) and writes its status; returns what the server stores."""
    name = f"md-{index}"
    body = json.loads(json.dumps(fixture.body))
    body["metadata"] = {"name": name}
    for replicas in range(1, fixture.body["metadata"]["generation"] + 1):  # each spec change bumps the generation
        body["spec"]["serving"] = {"replicas": replicas}
        cluster.apply(body, namespace)
    if "status" in fixture.body:
        cluster.kubectl("patch", "md", name, "-n", namespace, "--subresource=status", "--type=merge",
                        "-p", json.dumps({"status": fixture.body["status"]}))
    stored = cluster.get("md", name, namespace)
    assert stored is not None
    assert stored["metadata"]["generation"] == fixture.body["metadata"]["generation"]
    return stored


def test_kstatus_and_argocd_agree_with_the_documented_mapping(cluster: Cluster, namespace: str) -> None:
    stored = [store(cluster, namespace, i, f) for i, f in enumerate(FIXTURES)]
    for fixture, obj in zip(FIXTURES, stored, strict=True):
        assert obj.get("status") == fixture.body.get("status"), f"{fixture.id}: the API server changed the status"
    results = compute(stored)
    got = {f.id: r["status"] for f, r in zip(FIXTURES, results, strict=True)}
    assert got == {f.id: f.kstatus for f in FIXTURES}
    health = {f.id: run_health(obj)[0] for f, obj in zip(FIXTURES, stored, strict=True)}
    assert health == {f.id: f.argocd for f in FIXTURES}


def test_kstatus_reports_a_stale_generation_with_both_numbers(cluster: Cluster, namespace: str) -> None:
    (fixture,) = [f for f in FIXTURES if f.id == "generation-not-observed"]
    (result,) = compute([store(cluster, namespace, 0, fixture)])
    assert result == {"status": "InProgress", "conditions": ["Reconciling=True"],
                      "message": "ModelDeployment generation is 2, but latest observed generation is 1"}
