"""The compression benchmark's bookkeeping (bench/compression.py): result metadata and target counting, pure."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "compression.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_compression", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_compression"] = module
    spec.loader.exec_module(module)
    return module


META_ARGS: dict[str, Any] = {
    "python": "3.11.13", "torch_version": "2.13.0+cpu", "platform_name": "Linux-6.8-x86_64-with-glibc2.36",
    "load_before": (0.123, 0.5, 1.0), "load_after": (1.987, 0.75, 1.0), "started": 1_700_000_000.0,
    "finished": 1_700_000_123.0,
}


@pytest.mark.parametrize(("head", "status", "dirty", "files"), [
    pytest.param("a" * 40, "", False, [], id="clean"),
    pytest.param("a" * 40, " M bench/compression.py\n", True, ["bench/compression.py"], id="dirty"),
    pytest.param(None, None, None, [], id="no-git"),
])
def test_meta_records_the_code_the_interpreter_and_the_conditions(
    bench: ModuleType, head: str | None, status: str | None, dirty: bool | None, files: list[str]
) -> None:
    meta = bench.build_meta(head, status, **META_ARGS)
    assert (meta["gitCommit"], meta["gitDirty"], meta["gitDirtyFiles"]) == (head, dirty, files)
    assert (meta["python"], meta["torch"], meta["platform"]) == ("3.11.13", "2.13.0+cpu",
                                                                 "Linux-6.8-x86_64-with-glibc2.36")
    assert meta["loadBefore"] == [0.12, 0.5, 1.0] and meta["loadAfter"] == [1.99, 0.75, 1.0]
    assert (meta["startedAt"], meta["finishedAt"]) == ("2023-11-14T22:13:20+00:00", "2023-11-14T22:15:23+00:00")


def test_fetch_git_state(bench: ModuleType, tmp_path: Path) -> None:
    head, status = bench.fetch_git_state()
    assert head is not None and len(head) == 40 and status is not None
    assert bench.fetch_git_state(tmp_path) == (None, None)
