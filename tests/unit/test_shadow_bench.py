"""bench/shadow_bench.py's pure parts: the README section generated from the result file, and its markers."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from tests.modules import load_file

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_file("bench_shadow", ROOT / "bench" / "shadow_bench.py")


def test_bench_readme_agrees_with_the_committed_result(bench: ModuleType) -> None:
    """bench/README.md's shadow figures are generated from bench/results/shadow.json: an edit of either alone fails
    here (regenerate with `python bench/shadow_bench.py report`)."""
    readme = bench.README.read_text()
    result = json.loads(bench.RESULT.read_text())
    assert bench.apply_readme_section(readme, bench.build_readme_section(result)) == readme
    assert sum(target["met"] for target in result["targets"]) == len(result["targets"])


@pytest.mark.parametrize("text, ok", [
    pytest.param("intro\n{begin}\nold\n{end}\nrest\n", True, id="markers"),
    pytest.param("intro\n{end}\nold\n{begin}\n", False, id="reversed"),
    pytest.param("intro\n", False, id="none"),
])
def test_the_section_goes_between_the_markers(bench: ModuleType, text: str, ok: bool) -> None:
    readme = text.format(begin=bench.README_BEGIN, end=bench.README_END)
    section = f"{bench.README_BEGIN}\nnew\n{bench.README_END}"
    if not ok:
        with pytest.raises(ValueError):
            bench.apply_readme_section(readme, section)
        return
    assert bench.apply_readme_section(readme, section) == f"intro\n{section}\nrest\n"


def test_percentiles_of_the_client_latencies(bench: ModuleType) -> None:
    values = [float(v) for v in range(1, 101)]
    assert (bench.percentile(values, 0.5), bench.percentile(values, 0.99), bench.percentile([], 0.5) != 0) == (
        51.0, 99.0, True)
