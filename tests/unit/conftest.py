"""Fixtures shared by unit-test modules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def compiled_digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An artifact made by `shipyard-runtime compress` with the default `compiled.mode` (auto): a small digits MLP
    (64-32-16-10) int8-quantized, with its AOTInductor package for batches 1..128 (gated like the eager model) and
    the form the Job measured faster (`fastest`). Built once per session: AOTInductor compiles C++ (15-50 s on 2
    cores). Read-only for tests: copy it before changing it."""
    import torch

    from shipyard.runtime import cli
    from tests.modules import load_file

    work = tmp_path_factory.mktemp("compiled")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load_file("build_models", ROOT / "examples/models/build_models.py").build_digits(
            work / "source", hidden=(32, 16), epochs=30)
        config = {
            "source": str(work / "source"),
            "output": str(work / "artifacts" / "digits"),
            "steps": [{"quantize": {"scheme": "int8-dynamic"}}],
            "evaluation": {"dataset": "builtin:digits", "maxRelativeAccuracyLoss": 0.02},
            "terminationLog": str(work / "termination-log"),
            "latency": {"batchSizes": [1, 8], "budgetSeconds": 0.02},
            "compiled": {"maxBatchSize": 128},
        }
        (work / "compression.json").write_text(json.dumps(config))
        code = cli.main(["compress", "--config", str(work / "compression.json")])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, (work / "termination-log").read_text()
    return work / "artifacts" / "digits"
