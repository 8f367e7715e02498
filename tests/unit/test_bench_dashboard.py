"""bench/README.md's dashboard figures are the ones bench/results/dashboard.json holds (bench/dashboard.py
--write-docs writes them; this fails when either changed without the other). No I/O besides reading files."""

from __future__ import annotations

import json
from pathlib import Path

from tests.modules import load_file

REPO = Path(__file__).resolve().parents[2]


def test_the_readme_table_is_generated_from_the_results() -> None:
    bench = load_file("shipyard_bench_dashboard", REPO / "bench" / "dashboard.py")
    data = json.loads((REPO / "bench" / "results" / "dashboard.json").read_text())
    readme = (REPO / "bench" / "README.md").read_text()
    table = readme.split(bench.DOCS_BEGIN, 1)[1].split(bench.DOCS_END, 1)[0].strip()
    assert table == bench.build_markdown(data)
    assert data["result"]["n"] == 1000 and all(t["met"] for t in data["targets"]), data["targets"]
