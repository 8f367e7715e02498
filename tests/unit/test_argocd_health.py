"""The Argo CD health check (deploy/argocd/health.lua) run by a real Lua 5.4 interpreter (Debian's lua5.4) against
ModelDeployment status fixtures of every phase. The fixtures are built the way the operator builds its status
(conditions by ``planning.build_condition``; Ready/Reconciling/Stalled by the rules of ``planning._build_status``
and ``planning.plan_invalid``); tests/integration/test_kstatus.py runs kstatus on the same fixtures."""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from shipyard.operator import planning

REPO = Path(__file__).resolve().parents[2]
HEALTH = REPO / "deploy" / "argocd" / "health.lua"
LUA = shutil.which("lua5.4") or shutil.which("lua")
NOW = datetime.datetime(2026, 1, 3, tzinfo=datetime.UTC)


def build_status(phase: str, *, stalled: str | None = None, paused: str | None = None, candidate: str | None = None,
                 stable: str | None = "1.0.0", observed: int = 2, message: str = "") -> dict[str, Any]:
    """A status as the operator writes it: Ready only when Healthy, Reconciling while not Healthy and not Stalled."""
    ready = phase == "Healthy" and stalled is None
    reason = stalled or paused or ("RolledOut" if ready else phase)
    conditions = [
        planning.build_condition("Ready", ready, "RolledOut" if ready else reason, message, observed, [], NOW),
        planning.build_condition("Reconciling", not ready and stalled is None, reason, message, observed, [], NOW),
        planning.build_condition("Stalled", stalled is not None, stalled or "AsExpected", message, observed, [],
                                 NOW),
    ]
    status: dict[str, Any] = {"observedGeneration": observed, "phase": phase, "message": message,
                              "conditions": conditions}
    if stable:
        status["stableVersion"] = stable
    if candidate:
        status["candidateVersion"] = candidate
    if paused:
        status["pausedReason"] = paused
    return status


def build_model(status: dict[str, Any] | None, generation: int = 2) -> dict[str, Any]:
    body: dict[str, Any] = {"apiVersion": "shipyard.dev/v1alpha1", "kind": "ModelDeployment",
                            "metadata": {"name": "digits", "namespace": "ml", "generation": generation},
                            "spec": {"image": "registry.example/acme/digits:1.1.0",
                                     "model": {"path": "/models/digits"}}}
    if status is not None:
        body["status"] = status
    return body


@dataclass(frozen=True)
class Fixture:
    id: str
    body: dict[str, Any]
    argocd: str  # Argo CD health status
    kstatus: str  # what sigs.k8s.io/cli-utils kstatus computes
    message: str = ""  # a substring of the Argo CD message


FIXTURES = [
    Fixture("no-status-yet", build_model(None), "Progressing", "Current", "Waiting for the Shipyard operator"),
    Fixture("pending", build_model(build_status("Pending", stable=None, message="Waiting for the first version")),
            "Progressing", "InProgress", "Waiting for the first version"),
    Fixture("compressing", build_model(build_status("Compressing", candidate="1.1.0", message="Compressing 1.1.0")),
            "Progressing", "InProgress", "Compressing 1.1.0"),
    Fixture("progressing", build_model(build_status("Progressing", candidate="1.1.0", message="Step 1/2")),
            "Progressing", "InProgress", "Step 1/2"),
    Fixture("paused-manual-step", build_model(build_status("Paused", paused="ManualStep", candidate="1.1.0",
                                                           message="Waiting for shipyard.dev/promote=1.1.0")),
            "Suspended", "InProgress", "ManualStep: Waiting for shipyard.dev/promote=1.1.0"),
    Fixture("paused-inconclusive", build_model(build_status("Paused", paused="AnalysisInconclusive",
                                                            candidate="1.1.0", message="No data")),
            "Suspended", "InProgress", "AnalysisInconclusive: No data"),
    Fixture("paused-analysis-failed-manual-policy",
            build_model(build_status("Paused", paused="AnalysisFailed", candidate="1.1.0", message="error-rate")),
            "Suspended", "InProgress", "AnalysisFailed: error-rate"),
    Fixture("healthy", build_model(build_status("Healthy", message="Version 1.0.0 serves with 4 replica(s)")),
            "Healthy", "Current", "Version 1.0.0 serves"),
    Fixture("healthy-without-message", build_model(build_status("Healthy")), "Healthy", "Current",
            "Version 1.0.0 is serving"),
    Fixture("rolled-back", build_model(build_status("RolledBack", stalled="AnalysisFailed",
                                                    message="Version 1.1.0 rolled back")),
            "Degraded", "Failed", "Version 1.1.0 rolled back"),
    Fixture("failed-compression", build_model(build_status("Failed", stalled="CompressionFailed", stable=None,
                                                           message="accuracy loss 0.05 > 0.01")),
            "Degraded", "Failed", "accuracy loss"),
    Fixture("failed-startup", build_model(build_status("Failed", stalled="StartupTimeout", stable=None)),
            "Degraded", "Failed", "Stalled: StartupTimeout"),
    Fixture("degraded", build_model(build_status("Degraded", message="2/4 ready")), "Degraded", "InProgress",
            "2/4 ready"),
    Fixture("invalid-spec-over-a-healthy-stable",
            build_model(build_status("Healthy", stalled="ChildRejected", message="Deployment rejected")),
            "Degraded", "Failed", "Deployment rejected"),
    Fixture("paused-route-not-found", build_model(build_status(
        "Paused", stalled="RouteNotFound", candidate="1.1.0",
        message="HTTPRoute 'digits' does not exist in namespace ml; version 1.0.0 keeps serving, the rollout waits")),
            "Degraded", "Failed", "HTTPRoute 'digits' does not exist"),
    Fixture("paused-shadow-no-data", build_model(build_status(
        "Paused", paused="AnalysisInconclusive", candidate="1.1.0",
        message="Holding version 1.1.0 at step 1/2 (shadow: 0 compared, 0 dropped, 0 timeouts, 40 errors)")),
            "Suspended", "InProgress", "AnalysisInconclusive: Holding version 1.1.0 at step 1/2 (shadow"),
    Fixture("generation-not-observed", build_model(build_status("Healthy", observed=1), generation=2),
            "Progressing", "InProgress", "observe generation 2"),
]
PHASES = ["Pending", "Compressing", "Progressing", "Paused", "Healthy", "RolledBack", "Failed", "Degraded"]


def build_lua(value: Any) -> str:
    """A Lua expression for a JSON value (null -> nil, as Argo CD's conversion does)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid Lua escapes for this text
    if isinstance(value, list):
        return "{" + ", ".join(build_lua(v) for v in value) + "}"
    return "{" + ", ".join(f"[{json.dumps(k)}] = {build_lua(v)}" for k, v in value.items() if v is not None) + "}"


def run_health(body: dict[str, Any]) -> tuple[str, str]:
    assert LUA, "lua5.4 is needed (apt-get install lua5.4)"
    script = (f"obj = {build_lua(body)}\n"
              f"local hs = dofile({json.dumps(str(HEALTH))})\n"
              "io.write(hs.status, '\\n', hs.message or '', '\\n')\n")
    out = subprocess.run([LUA, "-"], input=script, capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    status, message = out.stdout.split("\n", 1)
    return status, message.rstrip("\n")


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.id for f in FIXTURES])
def test_health_of_every_phase(fixture: Fixture) -> None:
    status, message = run_health(fixture.body)
    assert status == fixture.argocd
    assert fixture.message in message


def test_fixtures_cover_every_phase_of_the_crd() -> None:
    covered = {(f.body.get("status") or {}).get("phase") for f in FIXTURES}
    assert set(PHASES) <= covered
    crd = yaml.safe_load((REPO / "crds" / "modeldeployments.shipyard.dev.yaml").read_text())
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status["properties"]["phase"]["enum"] == PHASES


@pytest.mark.parametrize(("value", "lua"), [
    (None, "nil"), (True, "true"), (3, "3"), ('a "b"\n', '"a \\"b\\"\\n"'), ([1, "x"], '{1, "x"}'),
    ({"a": 1, "b": None}, '{["a"] = 1}'),
], ids=["null", "bool", "int", "string-escapes", "list", "map-without-nulls"])
def test_lua_literals(value: Any, lua: str) -> None:
    assert build_lua(value) == lua


def test_health_check_returns_a_valid_argocd_status_for_garbage() -> None:
    status, _ = run_health({"metadata": {}, "status": {"phase": "SomethingNew", "conditions": []}})
    assert status in ("Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown")
