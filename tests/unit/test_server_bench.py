"""The serving benchmark's bookkeeping (bench/serving.py): which configurations each system runs in, how the best
of them is chosen, how ratios and targets are counted from the figures, and the README section generated from the
committed result file."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.modules import load_file

BENCH = Path(__file__).resolve().parents[2] / "bench" / "serving.py"
RESULT = BENCH.parent / "results" / "serving.json"


@pytest.fixture(scope="module")
def serving() -> ModuleType:
    return load_file("bench_serving", BENCH)


def run(serving: ModuleType, variant: str, rps: float, p99: float, errors: int = 0, conc: int = 16, rnd: int = 0,
        model: str = "mlp", placement: str = "pinned", cpu: float = 0.0) -> Any:  # fmt: skip
    system = next(s for s in ("shipyard-uvicorn", "shipyard", "litserve", "torchserve") if variant.startswith(s))
    return serving.Run(model, variant, system, conc, rps, p99 / 2, p99 * 0.8, p99, p99 * 2, int(rps * 10), errors,
                       10.0, rnd, placement, cpu)  # fmt: skip


# ------------------------------------------------------------------------------------------- configurations


def names(variants: list[Any]) -> list[tuple[str, tuple[int, ...]]]:
    return [(v.name, v.levels) for v in variants]


@pytest.mark.parametrize(("levels", "best_batch", "expected"), [
    pytest.param([1, 16, 64], 64, [
        ("torchserve-b1", (1, 16, 64)),
        ("torchserve-b8-d1", (16, 64)),
        ("torchserve-b16-d0", (16, 64)), ("torchserve-b16-d1", (16, 64)),
        ("torchserve-b32-d1", (64,)),
        ("torchserve-b64-d0", (64,)), ("torchserve-b64-d1", (64,)),
    ], id="half-and-whole-concurrency;-the-loop's-best-is-64"),
    pytest.param([1, 16, 64], 4, [
        ("torchserve-b1", (1, 16, 64)),
        ("torchserve-b4-d1", (16, 64)), ("torchserve-b8-d1", (16, 64)),
        ("torchserve-b16-d0", (16, 64)), ("torchserve-b16-d1", (16, 64)),
        ("torchserve-b32-d1", (64,)),
        ("torchserve-b64-d0", (64,)), ("torchserve-b64-d1", (64,)),
    ], id="the-loop's-best-batch-4-is-added"),
    pytest.param([1], 8, [("torchserve-b1", (1,))], id="c=1-runs-unbatched-only"),
    pytest.param([16, 1], 128, [
        ("torchserve-b1", (1, 16)), ("torchserve-b8-d1", (16,)),
        ("torchserve-b16-d0", (16,)), ("torchserve-b16-d1", (16,)),
    ], id="a-best-batch-above-every-level-is-not-run"),
    pytest.param([1, 2], None, [("torchserve-b1", (1, 2)), ("torchserve-b2-d0", (2,)), ("torchserve-b2-d1", (2,))],
                 id="no-loop-measured;-no-batch-of-one-as-half"),
])  # fmt: skip
def test_peer_configurations_never_batch_more_than_the_concurrency(
    serving: ModuleType, levels: list[int], best_batch: int | None, expected: list[tuple[str, tuple[int, ...]]]
) -> None:
    variants = serving.plan_variants(levels, 1, best_batch, ("torchserve",))
    assert names(variants) == expected
    for variant in variants:
        assert all(variant.max_batch <= level for level in variant.levels)
        assert variant.delay_ms <= 1.0
        assert variant.workers == 1 and variant.threads == 1


@pytest.mark.parametrize(("cores", "peer_workers"), [
    pytest.param(1, 1, id="pinned-to-one-core"),
    pytest.param(4, 4, id="unpinned-on-four-cores"),
])  # fmt: skip
def test_peers_get_a_worker_per_core_and_every_worker_one_torch_thread(
    serving: ModuleType, cores: int, peer_workers: int
) -> None:
    variants = serving.plan_variants([1, 16], cores, 8)
    assert {v.system for v in variants} == set(serving.SYSTEMS)
    for variant in variants:
        if variant.system in serving.OURS:  # its defaults, the same at every level
            assert (variant.name, variant.max_batch, variant.delay_ms) == (variant.system, 32, 5.0)
            assert (variant.workers, variant.threads, variant.levels) == (1, 1, (1, 16))
        else:  # one worker process per core, one torch thread each
            assert (variant.workers, variant.threads) == (peer_workers, 1)


@pytest.mark.parametrize(("round_", "rounds", "first"), [
    pytest.param(0, 2, "a", id="round-1"), pytest.param(1, 2, "c", id="round-2-starts-half-way"),
    pytest.param(2, 3, "c", id="round-3-of-3"),
])  # fmt: skip
def test_each_round_starts_elsewhere(serving: ModuleType, round_: int, rounds: int, first: str) -> None:
    variants = [serving.Variant(n, "litserve", 1, 0.0, 1, 1, (1,)) for n in "abcd"]
    order = serving.build_order(variants, round_, rounds)
    assert order[0].name == first and sorted(v.name for v in order) == list("abcd")


@pytest.mark.parametrize(("spec", "count"), [("0", 1), ("0-3", 4), ("0,2", 2), ("0-1,4-5", 4)])
def test_count_cores(serving: ModuleType, spec: str, count: int) -> None:
    assert serving.count_cores(spec) == count


def test_torchserve_properties_state_the_settings(serving: ModuleType, tmp_path: Path) -> None:
    variant = serving.Variant("torchserve-b16-d1", "torchserve", 16, 1.0, 2, 1, (16, 64))
    text = serving.build_torchserve_properties(variant, "mlp", 8080, tmp_path, tmp_path / "log4j2.xml", 2)
    lines = dict(line.split("=", 1) for line in text.splitlines())
    assert lines["number_of_netty_threads"] == lines["netty_client_threads"] == "2"
    assert lines["async_logging"] == "true" and lines["default_workers_per_model"] == "2"
    model = json.loads(lines["models"])["mlp"]["1.0"]
    assert (model["batchSize"], model["maxBatchDelay"], model["minWorkers"], model["maxWorkers"]) == (16, 1, 2, 2)


# ------------------------------------------------------------------------------------------ best and ratios


def test_best_round_is_the_fastest_per_configuration_level_and_placement(serving: ModuleType) -> None:
    runs = [
        run(serving, "shipyard", 100, 5, rnd=0),
        run(serving, "shipyard", 300, 7, rnd=1),
        run(serving, "litserve-b16-d1", 50, 9, rnd=1),
        run(serving, "litserve-b16-d1", 40, 8, rnd=0),
        run(serving, "shipyard", 90, 5, conc=1, rnd=0),
        run(serving, "shipyard", 500, 5, rnd=0, placement="unpinned"),
    ]
    best = serving.build_best_runs(runs)
    assert [(r.placement, r.variant, r.concurrency, r.round) for r in best] == [
        ("pinned", "shipyard", 1, 0),
        ("pinned", "shipyard", 16, 1),
        ("pinned", "litserve-b16-d1", 16, 1),
        ("unpinned", "shipyard", 16, 0),
    ]


def test_each_peer_counts_with_its_fastest_configuration_without_errors(serving: ModuleType) -> None:
    runs = [
        run(serving, "shipyard", 3000, 5), run(serving, "shipyard-uvicorn", 1500, 6),
        run(serving, "litserve-b1", 400, 9), run(serving, "litserve-b16-d0", 900, 12, errors=3),
        run(serving, "litserve-b16-d1", 700, 11),
        run(serving, "torchserve-b1", 600, 20), run(serving, "torchserve-b16-d0", 1000, 15),
    ]  # fmt: skip
    (row,) = serving.build_comparisons(serving.build_best_runs(runs))
    assert row.peers["litserve"].variant == "litserve-b16-d1"  # 900 req/s dropped requests: not a fair best
    assert row.peers["torchserve"].variant == "torchserve-b16-d0"
    assert row.best_peer.variant == "torchserve-b16-d0"
    assert row.ratio == pytest.approx(3.0) and row.http_layer_gain == pytest.approx(2.0)
    table = serving.build_table([row], serving.build_best_runs(runs), [])
    assert "3.00" in table and "2.00" in table and "torchserve-b16-d0" in table


def peers_at(serving: ModuleType, conc: int, ours: tuple[float, float, int], lit: float, torch_: float,
             model: str = "mlp") -> list[Any]:  # fmt: skip
    rows = [run(serving, "shipyard", ours[0], ours[1], errors=ours[2], conc=conc, model=model)]
    if lit:
        rows.append(run(serving, "litserve-b1", lit, 9, conc=conc, model=model))
    if torch_:
        rows.append(run(serving, "torchserve-b1", torch_, 9, conc=conc, model=model))
    return rows


# (shipyard rps, p99, errors), litserve rps, torchserve rps (both p99 9 ms) -> [throughput met, p99 met]
CASES = [
    pytest.param("mlp", (2000, 5, 0), 400, 1000, [True, True], id="mlp-2.0x"),
    pytest.param("mlp", (1990, 5, 0), 400, 1000, [False, True], id="mlp-1.99x-short"),
    pytest.param("cnn", (1500, 5, 0), 400, 1000, [True, True], id="cnn-1.5x"),
    pytest.param("cnn", (1490, 5, 0), 400, 1000, [False, True], id="cnn-1.49x-short"),
    pytest.param("mlp", (3000, 10, 0), 400, 1000, [True, False], id="p99-worse"),
    pytest.param("mlp", (3000, 9, 0), 400, 1000, [True, True], id="p99-equal"),
    pytest.param("mlp", (3000, 5, 2), 400, 1000, [False, False], id="shipyard-errors"),
    pytest.param("mlp", (3000, 5, 0), 400, 0, [False, False], id="one-peer-missing"),
    pytest.param("mlp", (0, 0, 0), 400, 1000, [False, False], id="shipyard-not-measured"),
]


@pytest.mark.parametrize(("model", "ours", "lit", "torch_", "expected"), CASES)
def test_throughput_and_p99_targets_at_every_level(
    serving: ModuleType, model: str, ours: tuple[float, float, int], lit: float, torch_: float, expected: list[bool]
) -> None:
    runs = []
    for conc in (1, 16, 64):
        runs += [r for r in peers_at(serving, conc, ours, lit, torch_, model) if r.rps > 0]
    runs.append(run(serving, "shipyard", 1, 1, conc=16, model=model, placement="unpinned"))  # not counted
    comparisons = serving.build_comparisons(serving.build_best_runs(runs))
    targets = serving.evaluate_targets(comparisons, runs, [], [model])
    counted = [t for t in targets if t["kind"] != "limit"]
    assert [(t["concurrency"], t["kind"]) for t in counted] == [
        (1, "throughput"), (1, "p99"), (16, "throughput"), (16, "p99"), (64, "throughput"), (64, "p99")]
    assert [t["met"] for t in counted] == expected * 3
    assert all(t["placement"] == "pinned" for t in targets)


@pytest.mark.parametrize(("model", "kinds"), [
    pytest.param("mlp", ["throughput", "p99"], id="overhead-bound:-no-limit-target"),
    pytest.param("cnn", ["throughput", "p99", "limit"], id="compute-bound:-limit-target"),
])  # fmt: skip
def test_the_limit_target_is_for_the_compute_bound_model(serving: ModuleType, model: str, kinds: list[str]) -> None:
    runs = peers_at(serving, 16, (3000, 5, 0), 400, 1000, model)
    limits = [serving.Limit(model, 0, {8: 4000.0}, {8: 4000.0})]
    targets = serving.evaluate_targets(serving.build_comparisons(runs), runs, limits, [model])
    assert [t["kind"] for t in targets] == kinds


# Shipyard's runs (req/s, server CPU-seconds over 10 s, errors) and the loop's measurements (round, wall rows/s,
# rows per CPU-second) -> (counted fraction, met)
LIMIT_CASES = [
    pytest.param([(720, 10.0, 0)], [(0, 1000, 1000)], (0.72, True), id="72%-met"),
    pytest.param([(600, 10.0, 0)], [(0, 1000, 1000)], (0.60, False), id="60%-missed"),
    pytest.param([(720, 10.0, 0)], [(0, 400, 1000), (-1, 1000, 1000)], (0.72, True),
                 id="a-loop-measured-at-a-busy-moment-does-not-flatter"),
    pytest.param([(800, 12.0, 0)], [(0, 1000, 1000)], (800 * 10 / 12 / 1000, False),
                 id="the-lower-per-cpu-second-fraction-counts"),
    pytest.param([(900, 10.0, 3), (700, 10.0, 0)], [(0, 1000, 1000)], (0.70, True), id="runs-with-errors-do-not-count"),
    pytest.param([(720, 0.0, 0)], [(-1, 1000, 0)], (0.72, True), id="no-cpu-figures:-wall-only"),
]  # fmt: skip


@pytest.mark.parametrize(("ours", "loops", "expected"), LIMIT_CASES)
def test_the_limit_fraction_is_against_the_fastest_loop_of_the_run(
    serving: ModuleType, ours: list[tuple[float, float, int]], loops: list[tuple[int, float, float]],
    expected: tuple[float, bool],
) -> None:
    runs = [run(serving, "shipyard", rps, 5, errors=errors, conc=64, rnd=i, model="cnn", cpu=cpu)
            for i, (rps, cpu, errors) in enumerate(ours)]  # fmt: skip
    limits = [serving.Limit("cnn", rnd, {8: wall, 32: wall / 2}, {8: cpu} if cpu else {}) for rnd, wall, cpu in loops]
    (target,) = [t for t in serving.evaluate_targets([], runs, limits, ["cnn"]) if t["kind"] == "limit"]
    assert (target["fraction"], target["met"]) == (pytest.approx(expected[0]), expected[1])
    assert target["limit_batch"] == 8 and target["limit_rows_per_s"] == max(wall for _, wall, _ in loops)


# ------------------------------------------------------------------------------------ the result file, README


def document(serving: ModuleType, runs: list[Any], load: float = 0.1) -> dict[str, Any]:
    meta = serving.build_meta("b" * 40, "", python="3.11.13", torch_version="2.13.0+cpu", platform_name="Linux",
                              load_before=(load,), load_after=(2.0,), started=1_700_000_000.0, finished=1_700_000_060.0)
    return {"meta": meta, "conditions": {"models": {"mlp": {}}, "machine": "x86_64, 2 cores", "rounds": 2,
                                         "unpinned_rounds": 1, "duration_s": 8.0},
            "limits": [{"model": "mlp", "round": 0, "wall": {"8": 4000.0}, "cpu": {"8": 4000.0}}],
            "runs": [serving.asdict(r) for r in runs]}  # fmt: skip


def test_reevaluate_keeps_the_meta_block(serving: ModuleType, tmp_path: Path) -> None:
    runs = peers_at(serving, 16, (3000, 5, 0), 400, 1000)
    source = document(serving, runs)
    path = tmp_path / "serving.json"
    path.write_text(json.dumps(source))
    assert serving.main(["reevaluate", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["meta"] == source["meta"] and result["targets_total"] == 2 and result["targets_met"] == 2


@pytest.mark.parametrize(("ours", "line", "mark"), [
    pytest.param(3000, "3.00x", "met", id="met"),
    pytest.param(1500, "1.50x", "**missed**", id="missed"),
])  # fmt: skip
def test_the_readme_section_is_built_from_the_figures(serving: ModuleType, ours: float, line: str, mark: str) -> None:
    runs = [*peers_at(serving, 16, (ours, 5, 0), 400, 1000), run(serving, "shipyard-uvicorn", 1000, 6)]
    section = serving.build_readme_section(document(serving, runs))
    assert section.startswith(serving.README_BEGIN) and section.endswith(serving.README_END)
    row = next(r for r in section.splitlines() if r.startswith("| mlp | 16 |"))
    assert f"{ours:.0f} (5.0)" in row and "1000 (9.0) `torchserve-b1`" in row and line in row
    assert f"{ours / 1000:.2f}x |" in row  # against the same App on uvicorn
    assert f"2x the best peer configuration's req/s at c=16: {line} (torchserve-b1), {mark}" in section
    assert "`targets: " in section


@pytest.mark.parametrize(("load", "busy"), [pytest.param(0.1, False, id="quiet"), pytest.param(3.0, True, id="busy")])
def test_the_readme_section_says_when_the_machine_was_busy(serving: ModuleType, load: float, busy: bool) -> None:
    section = serving.build_readme_section(document(serving, peers_at(serving, 16, (3000, 5, 0), 400, 1000), load))
    assert ("The machine was busy before this run started" in section) is busy


@pytest.mark.parametrize(("readme", "ok"), [
    pytest.param("intro\n{begin}\nold\n{end}\nrest\n", True, id="replaced-between-markers"),
    pytest.param("intro\nrest\n", False, id="markers-missing"),
    pytest.param("{end}\n{begin}\n", False, id="markers-reversed"),
])  # fmt: skip
def test_apply_readme_section(serving: ModuleType, readme: str, ok: bool) -> None:
    text = readme.format(begin=serving.README_BEGIN, end=serving.README_END)
    section = f"{serving.README_BEGIN}\nnew\n{serving.README_END}"
    if not ok:
        with pytest.raises(ValueError):
            serving.apply_readme_section(text, section)
        return
    assert serving.apply_readme_section(text, section) == f"intro\n{section}\nrest\n"


def test_bench_readme_agrees_with_the_committed_result(serving: ModuleType) -> None:
    """bench/README.md's serving figures are generated from bench/results/serving.json: any edit of either alone
    fails here (regenerate with `python bench/serving.py report`)."""
    result = json.loads(RESULT.read_text())
    readme = serving.README.read_text()
    assert serving.apply_readme_section(readme, serving.build_readme_section(result)) == readme
    assert result["targets_total"] == len(serving.evaluate_targets(
        serving.build_comparisons(serving.build_best_runs(serving.load_result(result)[0])),
        *serving.load_result(result), list(result["conditions"]["models"])))  # fmt: skip
