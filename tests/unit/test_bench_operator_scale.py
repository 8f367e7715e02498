"""bench/operator_scale.py's pure parts: the same event (the ReplicaSet) resolved for both systems through
ownerReferences, the fastest Argo Rollouts setting counted per N, targets that can fail, and bench/README.md's
operator_scale section generated from bench/results/operator_scale.json (fails when either changed without the
other: regenerate with `python bench/operator_scale.py report`). No I/O besides reading files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.modules import load_file

REPO = Path(__file__).resolve().parents[2]
bench = load_file("shipyard_bench_operator_scale", REPO / "bench" / "operator_scale.py")
NAN = float("nan")


def run(system: str, n: int, all_ready: float, setting: str = "defaults", **extra: Any) -> dict[str, Any]:
    return {"system": system, "n": n, "setting": setting, "flags": [], "all_ready_seconds": all_ready,
            "rss_peak_mb": 100.0, "to_replicaset_p99": 1.0, "idle_writes_per_minute": 0.0, **extra}


def test_the_replicaset_is_resolved_to_its_rollout_or_through_the_deployment_to_its_model() -> None:
    times = bench.build_replicaset_times(
        {"Rollout/r1": 3.0, "Deployment/m1-1-0-0": 5.0, "Deployment/orphan": 1.0},
        {"m1-1-0-0": "m1"})
    assert times == {"r1": 3.0, "m1": 5.0}


@pytest.mark.parametrize(("body", "owner"), [
    pytest.param({"metadata": {"ownerReferences": [{"kind": "Rollout", "name": "r"}]}}, "Rollout/r", id="rollout"),
    pytest.param({"metadata": {"ownerReferences": [{"kind": "Deployment", "name": "d"}]}}, "Deployment/d",
                 id="deployment"),
    pytest.param({"metadata": {}}, None, id="none"),
])
def test_replicaset_owner(body: dict[str, Any], owner: str | None) -> None:
    assert bench.replicaset_owner(body) == owner


def test_the_fastest_argo_setting_counts_and_one_that_did_not_finish_does_not() -> None:
    runs = [run("shipyard", 1000, 90.0), run("argo-rollouts", 1000, 126.0),
            run("argo-rollouts", 1000, 95.0, "qps400"), run("argo-rollouts", 1000, NAN, "qps200")]
    (ratio,) = bench.build_ratios(runs)
    assert ratio["best_setting"] == "qps400"
    assert ratio["ratio"] == pytest.approx(90 / 95)
    assert set(ratio["per_setting"]) == {"defaults", "qps400"}


@pytest.mark.parametrize(("shipyard", "met"), [
    pytest.param(94.0, True, id="faster"),
    pytest.param(96.0, False, id="slower"),
    pytest.param(NAN, False, id="not-all-ready"),
])
def test_the_ratio_target_can_fail(shipyard: float, met: bool) -> None:
    runs = [run("shipyard", 1000, shipyard), run("argo-rollouts", 1000, 95.0, "qps400")]
    targets = dict(bench.assess_targets(runs, bench.build_ratios(runs)))
    name = next(t for t in targets if "ratio <= 1.0" in t)
    assert targets[name] is met


def test_the_readme_section_is_generated_from_the_results() -> None:
    data = json.loads((REPO / "bench" / "results" / "operator_scale.json").read_text())
    readme = (REPO / "bench" / "README.md").read_text()
    assert bench.apply_readme_section(readme, bench.build_readme_section(data)) == readme
    runs = data["runs"]
    assert {r["setting"] for r in runs if r["system"] == "argo-rollouts"} >= {"defaults", "qps200", "qps400"}
    assert all(r["flags"] or r["setting"] == "defaults" for r in runs if r["system"] == "argo-rollouts")
    assert any(t["name"].endswith("(ratio <= 1.0)") for t in data["targets"])
    assert all(not math.isnan(r["to_replicaset_p50"]) for r in runs)
