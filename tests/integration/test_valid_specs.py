"""Every spec the API server accepts either plans or surfaces as Stalled naming the field: a property test.

Specs are drawn over the CRD's own structural schema (tests/specgen.py: hypothesis, derandomized), submitted to the
real API server with a server-side dry run (defaults applied, CEL rules checked), and every admitted one is handed to
the planner through a simulated cluster (tests/plansim.py): as a new model, and as a new version over a settled
stable, for many passes each. The planner must never raise; where it refuses a spec (what only the operator checks:
the order of compression steps, a model source this version cannot fetch) the status is Stalled with a message
starting with the offending field's path. The counts are printed (``-s``) and asserted to stay meaningful.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings

from shipyard.operator import crd
from tests import plansim, specgen
from tests.integration.conftest import Cluster

pytestmark = pytest.mark.integration

EXAMPLES = 300
MIN_ADMITTED = 150
PASSES = 25
SCHEMA = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
FIELD_PATH = re.compile(r"^(spec|metadata)(\.[A-Za-z0-9/_.-]+|\[\d+\])+: ")


def draw_specs() -> list[dict[str, Any]]:
    drawn: list[dict[str, Any]] = []

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(specgen.build_strategy(SCHEMA))
    def collect(spec: dict[str, Any]) -> None:
        drawn.append(spec)

    collect()
    return drawn


def dry_run(cluster: Cluster, namespace: str, specs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The admitted objects, as the API server returns them (defaults applied), by name; one kubectl call."""
    items = [{"apiVersion": "shipyard.dev/v1alpha1", "kind": "ModelDeployment",
              "metadata": {"name": f"gen-{i:04d}", "namespace": namespace}, "spec": spec}
             for i, spec in enumerate(specs)]
    out = cluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-",
                          input="\n".join(json.dumps(item) for item in items), check=False, timeout=300)
    admitted: dict[str, dict[str, Any]] = {}
    for document in re.split(r"(?m)^(?=\{)", out.stdout):
        if document.strip():
            for obj in (lambda o: o.get("items", [o]))(json.loads(document)):
                admitted[obj["metadata"]["name"]] = obj
    return admitted


def assert_plans_or_stalls(sim: plansim.Sim, where: str) -> str:
    """Runs the simulation; returns how it ended (a phase, or 'Stalled:<reason>')."""
    for _ in range(PASSES):
        try:
            sim.step()
        except Exception as exc:  # the property: never
            raise AssertionError(f"the planner raised on {where}: {type(exc).__name__}: {exc}\n"
                                 f"{yaml.safe_dump(sim.body['spec'])}") from exc
    stalled = next((c for c in sim.status.get("conditions") or [] if c["type"] == "Stalled"), None)
    if stalled and stalled["status"] == "True" and stalled["reason"] in ("InvalidSpec", "UnsupportedModelSource"):
        assert FIELD_PATH.match(sim.status["message"]), (where, sim.status["message"])
        return f"Stalled:{stalled['reason']}"
    return str(sim.status["phase"])


def test_every_admitted_spec_plans_or_stalls_naming_the_field(cluster: Cluster, namespace: str) -> None:
    specs = draw_specs()
    admitted = dry_run(cluster, namespace, specs)
    outcomes: dict[str, int] = {}
    for name, obj in sorted(admitted.items()):
        body = plansim.md("1.0.0")
        body["metadata"]["name"] = "digits"
        body["spec"] = copy.deepcopy(obj["spec"])
        fresh = assert_plans_or_stalls(plansim.Sim(body), f"{name} as a new model")
        outcomes[fresh] = outcomes.get(fresh, 0) + 1
        over = plansim.Sim(plansim.md("1.0.0")).settle()
        over.body["spec"] = copy.deepcopy(obj["spec"])
        over.body["metadata"]["generation"] += 1
        assert_plans_or_stalls(over, f"{name} as a new version over a settled stable")
    print(f"\n{len(specs)} specs drawn, {len(admitted)} admitted by the API server, every one planned "
          f"(as a new model: {dict(sorted(outcomes.items()))})")
    assert len(specs) == EXAMPLES
    assert len(admitted) >= MIN_ADMITTED, f"only {len(admitted)} of {len(specs)} admitted: the generator drifted"
    assert len(outcomes) >= 3  # several kinds of ending (healthy, compressing, stalled, ...), not one
