"""bench/benchmeta.py: what every result file records about its run (both benchmark scripts use it)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.modules import load_file

BENCH = Path(__file__).resolve().parents[2] / "bench"

META_ARGS: dict[str, Any] = {
    "python": "3.11.13", "torch_version": "2.13.0+cpu", "platform_name": "Linux-6.8-x86_64-with-glibc2.36",
    "load_before": (0.123, 0.5, 1.0), "load_after": (1.987, 0.75, 1.0), "started": 1_700_000_000.0,
    "finished": 1_700_000_123.44,
}


@pytest.fixture(scope="module")
def benchmeta() -> ModuleType:
    return load_file("benchmeta", BENCH / "benchmeta.py")


@pytest.mark.parametrize(("head", "status", "dirty", "files"), [
    pytest.param("a" * 40, "", False, [], id="clean"),
    pytest.param("a" * 40, " M runtime/server.py\n?? notes.txt\n", True, ["runtime/server.py", "notes.txt"],
                 id="dirty-with-untracked"),
    pytest.param(None, None, None, [], id="no-git"),
])
def test_meta_records_the_code_the_interpreter_and_the_conditions(
    benchmeta: ModuleType, head: str | None, status: str | None, dirty: bool | None, files: list[str]
) -> None:
    meta = benchmeta.build_meta(head, status, **META_ARGS)
    assert (meta["gitCommit"], meta["gitDirty"], meta["gitDirtyFiles"]) == (head, dirty, files)
    assert (meta["python"], meta["torch"], meta["platform"]) == ("3.11.13", "2.13.0+cpu",
                                                                 "Linux-6.8-x86_64-with-glibc2.36")
    assert meta["loadBefore"] == [0.12, 0.5, 1.0] and meta["loadAfter"] == [1.99, 0.75, 1.0]
    assert (meta["startedAt"], meta["finishedAt"]) == ("2023-11-14T22:13:20Z", "2023-11-14T22:15:23Z")
    assert meta["seconds"] == 123.4


def test_fetch_git_state(benchmeta: ModuleType, tmp_path: Path) -> None:
    head, status = benchmeta.fetch_git_state()
    assert head is not None and len(head) == 40 and status is not None
    assert benchmeta.fetch_git_state(tmp_path) == (None, None)


@pytest.mark.parametrize("script", ["serving.py", "compression.py"])
def test_both_benchmarks_record_it(script: str) -> None:
    text = (BENCH / script).read_text()
    assert "from benchmeta import build_meta, fetch_git_state" in text and '"meta"' in text
