"""Unit tests of the compression config: defaults, and one clear problem per bad field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shipyard import contract
from shipyard.runtime import recipe

BASE = {
    "source": "/models/digits",
    "output": "/artifacts/digits-1",
    "steps": [{"prune": {"amount": 0.9}}, {"quantize": {"scheme": "int8-dynamic"}}],
    "evaluation": {"dataset": "builtin:digits"},
}


def _with(**changes: object) -> dict:
    doc = json.loads(json.dumps(BASE))
    doc.update(changes)
    return doc


def test_defaults_follow_the_crd() -> None:
    config = recipe.build_config(
        _with(
            steps=[
                {"prune": {"amount": 0.5}},
                {"quantize": {"scheme": "int8-weight-only"}},
                {"distill": {"student": "pkg.mod:make"}},
            ]
        )
    )
    prune, quantize, distill = config.steps
    assert prune == recipe.PruneStep(amount=0.5, scope="global", norm=2, fine_tune_epochs=0)
    assert quantize == recipe.QuantizeStep(scheme="int8-weight-only")
    assert (distill.temperature, distill.alpha, distill.epochs, distill.lr, distill.batch_size) == (
        4.0,
        0.5,
        10,
        1e-3,
        64,
    )
    assert config.evaluation == recipe.Evaluation("builtin:digits", 0.01, 1000, {})
    assert config.termination_log == contract.TERMINATION_LOG
    assert (config.log_dir, config.encoding, config.latency.batch_sizes, config.overwrite) == (
        None,
        "auto",
        (1, 64),
        False,
    )


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        pytest.param(
            _with(steps=[{"prune": {"amount": 1.5}}]),
            "steps[0].prune.amount: must be in (0, 1), got 1.5",
            id="amount-too-big",
        ),
        pytest.param(
            _with(steps=[{"quantize": {"scheme": "int8-dynamic"}}, {"prune": {"amount": 0}}]),
            "steps[1].prune.amount: must be in (0, 1), got 0",
            id="amount-zero",
        ),
        pytest.param(
            _with(steps=[{"prune": {"amount": "half"}}]),
            "steps[0].prune.amount: must be a number in (0, 1), got 'half'",
            id="amount-string",
        ),
        pytest.param(_with(steps=[{"prune": {}}]), "steps[0].prune.amount: required", id="amount-missing"),
        pytest.param(
            _with(steps=[{"prune": {"amount": 0.5, "scope": "layer"}}]),
            "steps[0].prune.scope: must be one of global, structured, got 'layer'",
            id="scope",
        ),
        pytest.param(
            _with(steps=[{"prune": {"amount": 0.5, "norm": 2}}]),
            "steps[0].prune.norm: only allowed with scope structured",
            id="norm-with-global",
        ),
        pytest.param(
            _with(steps=[{"prune": {"amount": 0.5, "scope": "structured", "norm": 3}}]),
            "steps[0].prune.norm: must be in [1, 2], got 3",
            id="norm-value",
        ),
        pytest.param(
            _with(steps=[{"prune": {"amount": 0.5, "fineTuneEpochs": 2.5}}]),
            "steps[0].prune.fineTuneEpochs: must be an integer in [0, 100], got 2.5",
            id="epochs-float",
        ),
        pytest.param(
            _with(steps=[{"prune": {"amount": 0.5, "amout": 1}}]),
            "steps[0].prune.amout: unknown field",
            id="typo-field",
        ),
        pytest.param(
            _with(steps=[{"sparsify": {"amount": 0.5}}]),
            "steps[0]: unknown step 'sparsify' (known: prune, quantize, distill)",
            id="unknown-step",
        ),
        pytest.param(
            _with(steps=[{"prune": {"amount": 0.5}, "quantize": {"scheme": "int8-dynamic"}}]),
            "steps[0]: must set exactly one of prune, quantize, distill, got prune, quantize",
            id="two-kinds",
        ),
        pytest.param(_with(steps=[]), "steps: must be a non-empty list of steps, got a list", id="no-steps"),
        pytest.param(
            _with(steps=[{"quantize": {"scheme": "int2"}}]),
            "steps[0].quantize.scheme: must be one of int8-dynamic, int8-weight-only, int8-embedding, fp8, "
            "int4-weight-only, got 'int2'",
            id="scheme",
        ),
        pytest.param(
            _with(steps=[{"quantize": {"scheme": "int8-dynamic"}}, {"prune": {"amount": 0.5}}]),
            "steps[1].prune: cannot follow the quantize step at steps[0]",
            id="prune-after-quantize",
        ),
        pytest.param(
            _with(steps=[{"quantize": {"scheme": "int8-dynamic"}}, {"quantize": {"scheme": "int8-weight-only"}}]),
            "steps[1].quantize: the linear layers were already quantized by steps[0]",
            id="quantize-twice",
        ),
        pytest.param(
            _with(steps=[{"distill": {"student": "not a factory"}}]),
            "steps[0].distill.student: must be 'package.module:function', got 'not a factory'",
            id="student",
        ),
        pytest.param(
            _with(steps=[{"distill": {"student": "m:f", "temperature": 0}}]),
            "steps[0].distill.temperature: must be in (0, 100], got 0",
            id="temperature",
        ),
        pytest.param(
            _with(steps=[{"distill": {"student": "m:f", "alpha": 1.2}}]),
            "steps[0].distill.alpha: must be in [0, 1], got 1.2",
            id="alpha",
        ),
        pytest.param(
            _with(steps=[{"distill": {"student": "m:f", "batchSize": 0}}]),
            "steps[0].distill.batchSize: must be in [1, 65536], got 0",
            id="batch-size",
        ),
        pytest.param(
            _with(evaluation={"dataset": "digits"}),
            "evaluation.dataset: must be builtin:<name> or 'package.module:function', got 'digits'",
            id="dataset",
        ),
        pytest.param(
            _with(evaluation={"dataset": "builtin:digits", "maxRelativeAccuracyLoss": -0.1}),
            "evaluation.maxRelativeAccuracyLoss: must be in [0, 1], got -0.1",
            id="tolerance",
        ),
        pytest.param({k: v for k, v in BASE.items() if k != "evaluation"}, "evaluation: required", id="no-evaluation"),
        pytest.param({k: v for k, v in BASE.items() if k != "source"}, "source: required", id="no-source"),
        pytest.param(_with(output=""), "output: must be a non-empty string, got ''", id="empty-output"),
        pytest.param(_with(encoding="gzip"), "encoding: must be one of auto, safetensors, safetensors+zstd", id="enc"),
        pytest.param(_with(latency={"batchSizes": [0]}), "latency.batchSizes: must be a non-empty list", id="latency"),
        pytest.param(_with(extra=1), "extra: unknown field", id="unknown-top-level"),
        pytest.param(["not", "a", "mapping"], ": must be an object, got a list", id="not-an-object"),
    ],
)
def test_invalid_config_names_the_field(doc: object, problem: str) -> None:
    with pytest.raises(recipe.ConfigError) as raised:
        recipe.build_config(doc)
    assert any(problem in p for p in raised.value.problems), raised.value.problems


def test_all_problems_are_reported_at_once() -> None:
    doc = _with(steps=[{"prune": {"amount": 2}}, {"quantize": {"scheme": "x"}}], encoding="gzip")
    with pytest.raises(recipe.ConfigError) as raised:
        recipe.build_config(doc)
    assert len(raised.value.problems) == 3


@pytest.mark.parametrize(
    ("steps", "cuda", "expected"),
    [
        pytest.param(
            [recipe.QuantizeStep("fp8")], False, ["steps[0].quantize.scheme: 'fp8' needs a CUDA GPU"], id="fp8-cpu"
        ),
        pytest.param(
            [recipe.PruneStep(0.5), recipe.QuantizeStep("int4-weight-only")],
            False,
            ["steps[1].quantize.scheme: 'int4-weight-only' needs a CUDA GPU"],
            id="int4-cpu",
        ),
        pytest.param([recipe.QuantizeStep("fp8")], True, [], id="fp8-cuda"),
        pytest.param([recipe.QuantizeStep("int8-dynamic")], False, [], id="int8-cpu"),
    ],
)
def test_assess_device(steps: list, cuda: bool, expected: list[str]) -> None:
    problems = recipe.assess_device(steps, cuda_available=cuda)
    assert len(problems) == len(expected)
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        pytest.param("c.json", json.dumps(BASE), id="json"),
        pytest.param(
            "c.yaml",
            "source: /models/digits\noutput: /artifacts/x\nsteps:\n  - prune: {amount: 0.9}\n"
            "evaluation: {dataset: 'builtin:digits'}\n",
            id="yaml",
        ),
    ],
)
def test_load_config_document(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / name).write_text(text)
    config = recipe.build_config(recipe.load_config_document(tmp_path / name))
    assert config.steps[0] == recipe.PruneStep(amount=0.9)


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        pytest.param("c.json", "{not json", "not valid JSON", id="bad-json"),
        pytest.param("c.yaml", "a: [1, 2", "not valid YAML", id="bad-yaml"),
        pytest.param("missing.json", None, "cannot be read", id="missing"),
    ],
)
def test_unreadable_config_document(tmp_path: Path, name: str, text: str | None, problem: str) -> None:
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(recipe.ConfigError, match=problem):
        recipe.load_config_document(tmp_path / name)
