"""The serving benchmark's bookkeeping (bench/serving.py): targets are counted from the figures, not asserted."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.modules import load_file

BENCH = Path(__file__).resolve().parents[2] / "bench" / "serving.py"


@pytest.fixture(scope="module")
def serving() -> ModuleType:
    return load_file("bench_serving", BENCH)


def run(serving: ModuleType, server: str, rps: float, p99: float, errors: int = 0, conc: int = 16, rnd: int = 0) -> Any:
    return serving.Run("mlp", server, conc, rps, p99 / 2, p99 * 0.8, p99, p99 * 2, int(rps * 10), errors, 10.0, rnd)


def limits(serving: ModuleType) -> list[Any]:
    return [serving.Limit("mlp", 0, {1: 1000.0, 8: 4000.0}, {1: 1000.0, 8: 4000.0})]


CASES = [
    pytest.param([("shipyard", 3000, 5), ("litserve", 1000, 9), ("torchserve", 1900, 9)], [True, True], id="met-1.58x"),
    pytest.param(
        [("shipyard", 2800, 5), ("litserve", 1000, 9), ("torchserve", 1900, 9)], [False, True], id="1.47x-short"
    ),
    pytest.param(
        [("shipyard", 3000, 10), ("litserve", 1000, 9), ("torchserve", 1900, 9)], [False, True], id="p99-worse"
    ),
    pytest.param(
        [("shipyard", 3000, 5), ("litserve", 1000, 9), ("litserve-b1", 1200, 9)], [False, True], id="one-peer"
    ),
    pytest.param([("shipyard", 3000, 5, 3), ("litserve", 10, 9), ("torchserve", 10, 9)], [False, False], id="errors"),
    pytest.param([("litserve", 10, 9), ("torchserve", 10, 9)], [False, False], id="not-measured"),
    pytest.param(
        [("shipyard", 2700, 5), ("litserve", 1000, 9), ("torchserve", 1700, 9)], [True, False], id="67%-of-limit"
    ),
]


@pytest.mark.parametrize(("rows", "expected"), CASES)
def test_targets_are_counted_from_the_figures(
    serving: ModuleType, rows: list[tuple[Any, ...]], expected: list[bool]
) -> None:
    runs = [run(serving, *row) for row in rows]
    targets = serving.evaluate_targets(runs, runs, limits(serving), {}, ["mlp"])
    assert [t["met"] for t in targets] == expected


def test_best_round_is_the_fastest_per_server_and_level(serving: ModuleType) -> None:
    runs = [
        run(serving, "shipyard", 100, 5, rnd=0),
        run(serving, "shipyard", 300, 7, rnd=1),
        run(serving, "litserve", 50, 9, rnd=1),
        run(serving, "litserve", 40, 8, rnd=0),
        run(serving, "shipyard", 90, 5, conc=1, rnd=0),
    ]
    best = serving.build_best_runs(runs)
    assert [(r.server, r.concurrency, r.round) for r in best] == [
        ("shipyard", 1, 0),
        ("shipyard", 16, 1),
        ("litserve", 16, 1),
    ]
    table = serving.build_table(best, [serving.Limit("mlp", 1, {8: 4000.0}, {8: 4000.0})])
    assert "6.00" in table  # shipyard 300 req/s vs the best peer's 50 at c=16
    assert "7.5%" in table  # 300 of the 4000 rows/s limit (the fastest loop measured)


@pytest.mark.parametrize(
    ("quiet_rps", "met"),
    [pytest.param(600, False, id="60%-in-the-quiet-round"), pytest.param(720, True, id="72%-in-the-quiet-round")],
)
def test_the_limit_fraction_is_paired_and_taken_from_the_fastest_loop(
    serving: ModuleType, quiet_rps: float, met: bool
) -> None:
    runs = [run(serving, "shipyard", quiet_rps, 5, rnd=0), run(serving, "shipyard", 300, 5, rnd=1)]
    limits = [
        serving.Limit("mlp", 0, {8: 1000.0}, {8: 1000.0}),  # the loop's fastest (least disturbed) round
        serving.Limit("mlp", 1, {8: 400.0}, {8: 1000.0}),  # a disturbed round: 75% would flatter the server
    ]
    cpu = {("mlp", "shipyard", 16, 0): 12.0}  # 10 s of requests in 12 CPU-seconds
    (_, fraction) = serving.evaluate_targets(runs, runs, limits, cpu, ["mlp"])
    assert fraction["met"] is met and fraction["round"] == 0
    assert fraction["fraction"] == pytest.approx(quiet_rps / 1000)
    assert fraction["fraction_per_cpu_second"] == pytest.approx(quiet_rps * 10 / 12 / 1000)
    assert [r["fraction"] for r in fraction["rounds"]] == [pytest.approx(quiet_rps / 1000), pytest.approx(0.75)]


def test_reevaluate_keeps_the_meta_block(serving: ModuleType, tmp_path: Path) -> None:
    runs = [run(serving, "shipyard", 3000, 5), run(serving, "litserve", 1000, 9)]
    meta = serving.build_meta("b" * 40, "", python="3.11.13", torch_version="2.13.0+cpu", platform_name="Linux",
                              load_before=(0.1,), load_after=(0.2,), started=1_700_000_000.0, finished=1_700_000_060.0)
    document = {"meta": meta, "conditions": {"models": {"mlp": {}}}, "limits": [
        {"model": "mlp", "round": 0, "wall": {"8": 4000.0}, "cpu": {"8": 4000.0}}],
        "runs": [{**serving.asdict(r), "server_cpu_s": 1.0} for r in runs]}
    path = tmp_path / "serving.json"
    path.write_text(serving.json.dumps(document))
    assert serving.main(["reevaluate", str(path)]) == 0
    result = serving.json.loads(path.read_text())
    assert result["meta"] == meta and result["targets_total"] == 2
