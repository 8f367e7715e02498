"""Unit tests of the compression config: defaults, one clear problem per bad field, the recipe digest, the schemes."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import pytest

from shipyard import contract
from shipyard.contract import recipe as shared
from shipyard.runtime import compress, quantize, recipe

BASE = {
    "source": "/models/digits",
    "output": "/artifacts/digits-1",
    "steps": [{"prune": {"amount": 0.9}}, {"quantize": {"scheme": "int8-dynamic"}}],
    "evaluation": {"dataset": "builtin:digits"},
}


def _with(**changes: object) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(json.dumps(BASE))
    doc.update(changes)
    return doc


def _step(kind: str, **params: object) -> shared.CompressionStep:
    return recipe.build_config(_with(steps=[{kind: params}])).steps[0]


# --- defaults ------------------------------------------------------------------------------------------------------


def test_defaults_follow_the_crd() -> None:
    config = recipe.build_config(
        _with(steps=[{"prune": {"amount": 0.5}}, {"quantize": {"scheme": "int8-weight-only"}},
                     {"distill": {"student": "pkg.mod:make"}}])
    )
    prune_step, quantize_step, distill_step = config.steps
    assert (prune_step.kind, quantize_step.kind, distill_step.kind) == ("prune", "quantize", "distill")
    prune = prune_step.prune
    assert prune is not None and prune_step.action is prune
    assert (prune.amount, prune.scope, prune.norm, prune.structured_norm, prune.fine_tune_epochs, prune.lr,
            prune.batch_size) == (0.5, "global", None, 2, 0, 1e-3, 64)
    assert quantize_step.quantize == shared.Quantize(scheme="int8-weight-only")
    distill = distill_step.distill
    assert distill is not None
    assert (distill.student, distill.student_kwargs, distill.temperature, distill.alpha, distill.epochs, distill.lr,
            distill.batch_size) == ("pkg.mod:make", {}, 4.0, 0.5, 10, 1e-3, 64)
    evaluation = config.evaluation
    assert (evaluation.dataset, evaluation.max_relative_accuracy_loss, evaluation.samples,
            evaluation.max_relative_loss) == ("builtin:digits", 0.01, 1000, {})
    assert config.termination_log == contract.TERMINATION_LOG
    assert (config.name, config.log_dir, config.encoding, config.latency.batch_sizes, config.latency.budget_seconds,
            config.seed, config.overwrite, config.reuse_existing) == (None, None, "auto", (1, 64), 1.0, 0, False, False)
    assert (config.compiled.aot_inductor, config.compiled.max_batch_size, config.compiled.max_autotune) == (
        False, 1024, False)


def test_every_field_is_read() -> None:
    config = recipe.build_config({
        "source": "/models/digits", "output": "/artifacts/x", "name": "digits",
        "steps": [{"prune": {"amount": 0.25, "scope": "structured", "norm": 1, "fineTuneEpochs": 3, "lr": 0.003,
                             "batchSize": 16}},
                  {"distill": {"student": "pkg.mod:make", "studentKwargs": {"hidden": 8}, "temperature": 2,
                               "alpha": 0.25, "epochs": 4, "lr": 0.01, "batchSize": 32}},
                  {"quantize": {"scheme": "int8-dynamic"}}],
        "evaluation": {"dataset": "pkg.data:load", "maxRelativeAccuracyLoss": 0.05, "samples": 200,
                       "maxRelativeLoss": {"nn_agreement": 0.1}},
        "terminationLog": "/tmp/termination", "logDir": "/tmp/tb", "encoding": "safetensors",
        "latency": {"batchSizes": [1, 8], "budgetSeconds": 0.5},
        "compiled": {"aotInductor": True, "maxBatchSize": 256, "maxAutotune": True},
        "seed": 7, "overwrite": True, "reuseExisting": True,
    })
    prune, distill, quant = (s.action for s in config.steps)
    assert prune == shared.Prune(amount=0.25, scope="structured", norm=1, fine_tune_epochs=3, lr=0.003, batch_size=16)
    assert distill == shared.Distill(student="pkg.mod:make", student_kwargs={"hidden": 8}, temperature=2.0, alpha=0.25,
                                     epochs=4, lr=0.01, batch_size=32)
    assert quant == shared.Quantize(scheme="int8-dynamic")
    assert config.evaluation == shared.Evaluation(dataset="pkg.data:load", max_relative_accuracy_loss=0.05,
                                                  samples=200, max_relative_loss={"nn_agreement": 0.1})
    assert (config.name, config.termination_log, config.log_dir, config.encoding, config.latency.batch_sizes,
            config.latency.budget_seconds, config.seed, config.overwrite, config.reuse_existing) == (
        "digits", "/tmp/termination", "/tmp/tb", "safetensors", (1, 8), 0.5, 7, True, True)
    assert config.compiled == shared.Compiled(aot_inductor=True, max_batch_size=256, max_autotune=True)


# --- invalid configs -------------------------------------------------------------------------------------------------

PRUNE_FIELDS = "(known: amount, batchSize, fineTuneEpochs, lr, norm, scope)"


@pytest.mark.parametrize(
    ("doc", "field", "fragments"),
    [
        # prune
        pytest.param(_with(steps=[{"prune": {"amount": 1.5}}]), "steps[0].prune.amount",
                     ["less than 1", "got 1.5"], id="amount-too-big"),
        pytest.param(_with(steps=[{"quantize": {"scheme": "int8-dynamic"}}, {"prune": {"amount": 0}}]),
                     "steps[1].prune.amount", ["greater than 0", "got 0"], id="amount-zero"),
        pytest.param(_with(steps=[{"prune": {"amount": "half"}}]), "steps[0].prune.amount",
                     ["valid number", "got 'half'"], id="amount-string"),
        pytest.param(_with(steps=[{"prune": {"amount": float("nan")}}]), "steps[0].prune.amount",
                     ["got nan"], id="amount-nan"),
        pytest.param(_with(steps=[{"prune": {}}]), "steps[0].prune.amount", ["required"], id="amount-missing"),
        pytest.param(_with(steps=[{"prune": {"amount": 0.5, "scope": "layer"}}]), "steps[0].prune.scope",
                     ["'global' or 'structured'", "got 'layer'"], id="scope"),
        pytest.param(_with(steps=[{"prune": {"amount": 0.5, "norm": 2}}]), "steps[0].prune.norm",
                     ["only allowed with scope structured"], id="norm-with-global"),
        pytest.param(_with(steps=[{"prune": {"amount": 0.5, "scope": "structured", "norm": 3}}]),
                     "steps[0].prune.norm", ["1 or 2", "got 3"], id="norm-value"),
        pytest.param(_with(steps=[{"prune": {"amount": 0.5, "fineTuneEpochs": 2.5}}]), "steps[0].prune.fineTuneEpochs",
                     ["valid integer", "got 2.5"], id="epochs-float"),
        pytest.param(_with(steps=[{"prune": {"amount": 0.5, "fineTuneEpochs": 101}}]),
                     "steps[0].prune.fineTuneEpochs", ["less than or equal to 100", "got 101"], id="epochs-range"),
        pytest.param(_with(steps=[{"prune": {"amount": 0.5, "lr": 0}}]), "steps[0].prune.lr",
                     ["greater than 0", "got 0"], id="prune-lr"),
        pytest.param(_with(steps=[{"prune": {"amount": 0.5, "batchSize": 0}}]), "steps[0].prune.batchSize",
                     ["greater than or equal to 1", "got 0"], id="prune-batch-size"),
        pytest.param(_with(steps=[{"prune": {"amount": 0.5, "amout": 1}}]), "steps[0].prune.amout",
                     ["unknown field", PRUNE_FIELDS], id="typo-field"),
        pytest.param(_with(steps=[{"prune": {"amount": 0.5, "fine_tune_epochs": 3}}]),
                     "steps[0].prune.fine_tune_epochs", ["unknown field", PRUNE_FIELDS], id="python-name"),
        pytest.param(_with(steps=[{"prune": {"amount": 0.5, "fineTuneEpochs": 1, "fine_tune_epochs": 3}}]),
                     "steps[0].prune.fine_tune_epochs", ["unknown field"], id="python-name-next-to-wire-name"),
        # the steps list and its items
        pytest.param(_with(steps=[{"sparsify": {"amount": 0.5}}]), "steps[0].sparsify",
                     ["unknown field", "(known: distill, prune, quantize)"], id="unknown-step"),
        pytest.param(_with(steps=[{"prune": {"amount": 0.5}, "quantize": {"scheme": "int8-dynamic"}}]), "steps[0]",
                     ["must set only one of prune, quantize, distill, got prune, quantize"], id="two-kinds"),
        pytest.param(_with(steps=[{}]), "steps[0]", ["must set one of prune, quantize, distill"], id="empty-step"),
        pytest.param(_with(steps=[{"prune": None}]), "steps[0]", ["must set one of prune, quantize, distill"],
                     id="null-step"),
        pytest.param(_with(steps=["prune"]), "steps[0]", ["valid dictionary", "got 'prune'"], id="step-string"),
        pytest.param(_with(steps=[]), "steps", ["at least 1 item"], id="no-steps"),
        pytest.param(_with(steps=[{"prune": {"amount": 0.5}}] * 9), "steps", ["at most 8 items"], id="nine-steps"),
        pytest.param(_with(steps={"prune": {"amount": 0.5}}), "steps", ["valid list"], id="steps-object"),
        pytest.param({k: v for k, v in BASE.items() if k != "steps"}, "steps", ["required"], id="no-steps-field"),
        pytest.param(_with(steps=[{"quantize": {"scheme": "int2"}}]), "steps[0].quantize.scheme",
                     ["'int8-dynamic', 'int8-weight-only', 'int8-embedding', 'fp8' or 'int4-weight-only'",
                      "got 'int2'"],
                     id="scheme"),
        pytest.param(_with(steps=[{"quantize": {}}]), "steps[0].quantize.scheme", ["required"], id="no-scheme"),
        pytest.param(_with(steps=[{"quantize": {"scheme": "int8-dynamic", "mode": "x"}}]), "steps[0].quantize.mode",
                     ["unknown field", "(known: scheme)"], id="quantize-unknown-field"),
        # step order
        pytest.param(_with(steps=[{"quantize": {"scheme": "int8-dynamic"}}, {"prune": {"amount": 0.5}}]),
                     "steps[1].prune", ["cannot follow the quantize step at steps[0]"], id="prune-after-quantize"),
        pytest.param(_with(steps=[{"quantize": {"scheme": "int8-dynamic"}},
                                  {"quantize": {"scheme": "int8-weight-only"}}]),
                     "steps[1].quantize", ["the linear layers were already quantized by steps[0]"],
                     id="quantize-twice"),
        pytest.param(_with(steps=[{"quantize": {"scheme": "int8-embedding"}}, {"prune": {"amount": 0.5}},
                                  {"quantize": {"scheme": "int8-embedding"}}]),
                     "steps[2].quantize", ["the embedding layers were already quantized by steps[0]"],
                     id="embedding-twice"),
        # distill
        pytest.param(_with(steps=[{"distill": {"student": "not a factory"}}]), "steps[0].distill.student",
                     ["should match pattern", "got 'not a factory'"], id="student"),
        pytest.param(_with(steps=[{"distill": {}}]), "steps[0].distill.student", ["required"], id="no-student"),
        pytest.param(_with(steps=[{"distill": {"student": "m:f", "temperature": 0}}]), "steps[0].distill.temperature",
                     ["greater than 0", "got 0"], id="temperature"),
        pytest.param(_with(steps=[{"distill": {"student": "m:f", "alpha": 1.2}}]), "steps[0].distill.alpha",
                     ["less than or equal to 1", "got 1.2"], id="alpha"),
        pytest.param(_with(steps=[{"distill": {"student": "m:f", "batchSize": 0}}]), "steps[0].distill.batchSize",
                     ["greater than or equal to 1", "got 0"], id="batch-size"),
        pytest.param(_with(steps=[{"distill": {"student": "m:f", "epochs": 0}}]), "steps[0].distill.epochs",
                     ["greater than or equal to 1", "got 0"], id="distill-epochs"),
        pytest.param(_with(steps=[{"distill": {"student": "m:f", "lr": 11}}]), "steps[0].distill.lr",
                     ["less than or equal to 10", "got 11"], id="distill-lr"),
        pytest.param(_with(steps=[{"distill": {"student": "m:f", "studentKwargs": [1]}}]),
                     "steps[0].distill.studentKwargs", ["valid dictionary"], id="student-kwargs"),
        pytest.param(_with(steps=[{"distill": {"student": "m:f", "student_kwargs": {"hidden": 8}}}]),
                     "steps[0].distill.student_kwargs", ["unknown field"], id="student-kwargs-python-name"),
        # evaluation
        pytest.param(_with(evaluation={"dataset": "digits"}), "evaluation.dataset",
                     ["should match pattern", "got 'digits'"], id="dataset"),
        pytest.param(_with(evaluation={}), "evaluation.dataset", ["required"], id="no-dataset"),
        pytest.param(_with(evaluation={"dataset": "builtin:digits", "maxRelativeAccuracyLoss": -0.1}),
                     "evaluation.maxRelativeAccuracyLoss", ["greater than or equal to 0", "got -0.1"], id="tolerance"),
        pytest.param(_with(evaluation={"dataset": "builtin:digits", "samples": 0}), "evaluation.samples",
                     ["greater than or equal to 1", "got 0"], id="samples"),
        pytest.param(_with(evaluation={"dataset": "builtin:digits", "maxRelativeLoss": {"nn_agreement": 1.5}}),
                     "evaluation.maxRelativeLoss.nn_agreement", ["less than or equal to 1", "got 1.5"],
                     id="metric-tolerance"),
        pytest.param(_with(evaluation={"dataset": "builtin:digits", "maxRelativeLoss": {"nn_agreement": "x"}}),
                     "evaluation.maxRelativeLoss.nn_agreement", ["valid number", "got 'x'"],
                     id="metric-tolerance-string"),
        pytest.param(_with(evaluation={"dataset": "builtin:digits", "maxRelativeLoss": [0.1]}),
                     "evaluation.maxRelativeLoss", ["valid dictionary"], id="metric-tolerances-list"),
        pytest.param(_with(evaluation={"dataset": "builtin:digits", "tolerance": 0.1}), "evaluation.tolerance",
                     ["unknown field", "(known: dataset, maxRelativeAccuracyLoss, maxRelativeLoss, samples)"],
                     id="evaluation-unknown-field"),
        pytest.param(_with(evaluation="builtin:digits"), "evaluation", ["valid dictionary", "got 'builtin:digits'"],
                     id="evaluation-string"),
        pytest.param({k: v for k, v in BASE.items() if k != "evaluation"}, "evaluation", ["required"],
                     id="no-evaluation"),
        # the rest of the file
        pytest.param({k: v for k, v in BASE.items() if k != "source"}, "source", ["required"], id="no-source"),
        pytest.param(_with(output=""), "output", ["at least 1 character", "got ''"], id="empty-output"),
        pytest.param(_with(output=3), "output", ["valid string", "got 3"], id="output-number"),
        pytest.param(_with(name=""), "name", ["at least 1 character", "got ''"], id="empty-name"),
        pytest.param(_with(encoding="gzip"), "encoding", ["'auto', 'safetensors' or 'safetensors+zstd'", "got 'gzip'"],
                     id="enc"),
        pytest.param(_with(latency={"batchSizes": [0]}), "latency.batchSizes[0]", ["greater than or equal to 1"],
                     id="latency"),
        pytest.param(_with(latency={"batchSizes": []}), "latency.batchSizes", ["at least 1 item"],
                     id="latency-empty"),
        pytest.param(_with(latency={"budgetSeconds": 0}), "latency.budgetSeconds", ["greater than 0", "got 0"],
                     id="latency-budget"),
        pytest.param(_with(latency={"batch": [1]}), "latency.batch", ["unknown field"], id="latency-unknown-field"),
        pytest.param(_with(compiled={"maxBatchSize": 1}), "compiled.maxBatchSize",
                     ["greater than or equal to 2", "got 1"], id="compiled-max-batch"),
        pytest.param(_with(compiled={"aotInductor": "maybe"}), "compiled.aotInductor", ["valid boolean", "got 'maybe'"],
                     id="compiled-not-a-boolean"),
        pytest.param(_with(compiled={"aot": True}), "compiled.aot",
                     ["unknown field", "(known: aotInductor, maxAutotune, maxBatchSize, mode)"],
                     id="compiled-unknown-field"),
        pytest.param(_with(seed=-1), "seed", ["greater than or equal to 0", "got -1"], id="seed"),
        pytest.param(_with(seed=1.5), "seed", ["valid integer", "got 1.5"], id="seed-float"),
        pytest.param(_with(overwrite="maybe"), "overwrite", ["valid boolean", "got 'maybe'"], id="overwrite"),
        pytest.param(_with(reuseExisting=2), "reuseExisting", ["valid boolean", "got 2"], id="reuse-existing"),
        pytest.param(_with(extra=1), "extra", ["unknown field", "terminationLog"], id="unknown-top-level"),
        pytest.param(_with(termination_log="/x"), "termination_log", ["unknown field", "terminationLog"],
                     id="top-level-python-name"),
        pytest.param(["not", "a", "mapping"], "", ["valid dictionary"], id="not-an-object"),
        pytest.param(None, "", ["valid dictionary"], id="null-document"),
    ],
)
def test_invalid_config_names_the_field(doc: object, field: str, fragments: list[str]) -> None:
    with pytest.raises(recipe.ConfigError) as raised:
        recipe.build_config(doc)
    at_field = [p for p in raised.value.problems if p.startswith(f"{field}: ")]
    assert at_field, raised.value.problems
    assert any(all(f in p for f in fragments) for p in at_field), at_field
    assert str(raised.value).startswith("invalid compression config: ")


def test_all_problems_are_reported_at_once() -> None:
    doc = _with(steps=[{"prune": {"amount": 2}}, {"quantize": {"scheme": "x"}}], encoding="gzip")
    with pytest.raises(recipe.ConfigError) as raised:
        recipe.build_config(doc)
    assert [p.split(": ", 1)[0] for p in raised.value.problems] == [
        "steps[0].prune.amount", "steps[1].quantize.scheme", "encoding"]


@pytest.mark.parametrize(
    "steps",
    [
        pytest.param([{"prune": {"amount": 0.5}}, {"quantize": {"scheme": "int8-dynamic"}}], id="prune-then-quantize"),
        pytest.param([{"quantize": {"scheme": "int8-dynamic"}}, {"quantize": {"scheme": "int8-embedding"}}],
                     id="linear-and-embedding"),
        pytest.param([{"quantize": {"scheme": "int8-embedding"}}, {"prune": {"amount": 0.5}}],
                     id="prune-after-embedding-quantize"),
        pytest.param([{"quantize": {"scheme": "int8-dynamic"}}, {"distill": {"student": "m:f"}},
                      {"prune": {"amount": 0.5}}, {"quantize": {"scheme": "int8-dynamic"}}],
                     id="distill-starts-a-fresh-model"),
    ],
)
def test_valid_step_orders(steps: list[dict[str, Any]]) -> None:
    config = recipe.build_config(_with(steps=steps))
    assert [s.kind for s in config.steps] == [next(iter(s)) for s in steps]


# --- the device ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "cuda", "expected"),
    [
        pytest.param([{"quantize": {"scheme": "fp8"}}], False, ["steps[0].quantize.scheme: 'fp8' needs a CUDA GPU"],
                     id="fp8-cpu"),
        pytest.param([{"prune": {"amount": 0.5}}, {"quantize": {"scheme": "int4-weight-only"}}], False,
                     ["steps[1].quantize.scheme: 'int4-weight-only' needs a CUDA GPU"], id="int4-cpu"),
        pytest.param([{"quantize": {"scheme": "int8-embedding"}}, {"quantize": {"scheme": "fp8"}}], False,
                     ["steps[1].quantize.scheme: 'fp8' needs a CUDA GPU"], id="embedding-then-fp8-cpu"),
        pytest.param([{"quantize": {"scheme": "fp8"}}], True, [], id="fp8-cuda"),
        pytest.param([{"quantize": {"scheme": "int8-dynamic"}}], False, [], id="int8-cpu"),
        pytest.param([{"distill": {"student": "m:f"}}], False, [], id="distill-cpu"),
    ],
)
def test_assess_device(steps: list[dict[str, Any]], cuda: bool, expected: list[str]) -> None:
    config = recipe.build_config(_with(steps=steps))  # CUDA-only schemes are valid configs; the device decides
    problems = recipe.assess_device(config.steps, cuda_available=cuda)
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start)


@pytest.mark.parametrize(("mode", "steps", "cuda", "expected"), [
    pytest.param("on", [{"quantize": {"scheme": "fp8"}}], True,
                 ["compiled.mode: on needs a CPU package, and steps[0].quantize.scheme 'fp8' quantizes for CUDA"],
                 id="on-after-fp8"),
    pytest.param("auto", [{"quantize": {"scheme": "fp8"}}], True, [], id="auto-after-fp8-serves-eager"),
    pytest.param("on", [{"quantize": {"scheme": "int8-dynamic"}}], False, [], id="on-int8"),
])
def test_assess_device_with_a_required_package(mode: str, steps: list[dict[str, Any]], cuda: bool,
                                               expected: list[str]) -> None:
    config = recipe.build_config(_with(steps=steps, compiled={"mode": mode}))
    problems = recipe.assess_device(config.steps, cuda_available=cuda, compiled=config.compiled)
    assert [p[:len(e)] for p, e in zip(problems, expected, strict=True)] == expected and len(problems) == len(expected)


@pytest.mark.parametrize(("compiled", "device", "build", "why"), [
    pytest.param({}, "cpu", True, None, id="default-auto-on-a-cpu-job-builds"),
    pytest.param({"mode": "on"}, "cpu", True, None, id="on-builds"),
    pytest.param({"aotInductor": True}, "cpu", True, None, id="aot-inductor-builds"),
    pytest.param({"mode": "off"}, "cpu", False, "compiled.mode off", id="off-never"),
    pytest.param({}, "cuda", False, "the package is CPU code", id="auto-on-a-cuda-job-keeps-eager"),
])
def test_plan_compiled_build(compiled: dict[str, Any], device: str, build: bool, why: str | None) -> None:
    got, reason = recipe.plan_compiled_build(shared.Compiled.model_validate(compiled), device)
    assert got is build and (reason is None if why is None else why in str(reason))


# --- what the report and the manifest record -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "params", "expected"),
    [
        pytest.param("prune", {"amount": 0.5}, {"amount": 0.5, "scope": "global", "fineTuneEpochs": 0},
                     id="prune-global"),
        pytest.param("prune", {"amount": 0.5, "scope": "structured"},
                     {"amount": 0.5, "scope": "structured", "norm": 2, "fineTuneEpochs": 0},
                     id="prune-structured-default-norm"),
        pytest.param("prune", {"amount": 0.5, "scope": "structured", "norm": 1, "fineTuneEpochs": 2, "lr": 0.01},
                     {"amount": 0.5, "scope": "structured", "norm": 1, "fineTuneEpochs": 2, "lr": 0.01,
                      "batchSize": 64},
                     id="prune-fine-tuned"),
        pytest.param("quantize", {"scheme": "int8-embedding"}, {"scheme": "int8-embedding"}, id="quantize"),
        pytest.param("distill", {"student": "m:f", "studentKwargs": {"hidden": 8}, "epochs": 2},
                     {"student": "m:f", "studentKwargs": {"hidden": 8}, "temperature": 4.0, "alpha": 0.5, "epochs": 2,
                      "lr": 0.001, "batchSize": 64}, id="distill"),
    ],
)
def test_step_params(kind: str, params: dict[str, Any], expected: dict[str, Any]) -> None:
    assert recipe.build_step_params(_step(kind, **params)) == expected


# --- the recipe digest ---------------------------------------------------------------------------------------------

SOURCE_DIGEST = "sha256:" + "ab" * 32

# The digests below were computed ONCE with the code before the recipe types were shared (bc327ab: the frozen
# dataclasses of runtime/recipe.py and compress.build_recipe_digest over dataclasses.asdict), from the same documents
# and SOURCE_DIGEST. They are pinned, never recomputed: an artifact compressed before the refactor has one of these in
# its report.json, and `reuseExisting` reuses it only if today's code computes the same digest.
DIGEST_CASES = [
    pytest.param(_with(), "sha256:97ad398559a23b3333a76dd4f0c7ff206de7c4e586bc87fc0b2c8b869f994141", id="base"),
    pytest.param(
        _with(output="/elsewhere", source="/models/other", terminationLog="/tmp/t", logDir="/tmp/tb",
              latency={"batchSizes": [4], "budgetSeconds": 0.1}, overwrite=True, reuseExisting=True),
        "sha256:97ad398559a23b3333a76dd4f0c7ff206de7c4e586bc87fc0b2c8b869f994141", id="where-and-timing-do-not-count"),
    pytest.param(
        _with(steps=[{"prune": {"amount": 0.9, "scope": "global", "fineTuneEpochs": 2, "lr": 0.01, "batchSize": 32}},
                     {"quantize": {"scheme": "int8-dynamic"}}]),
        "sha256:6ac5b01f7f7e2c49a7f8fe1aedfe3ab6af4f4e0a5a47f5b788a0ab99389a1693", id="prune-global-fine-tuned"),
    pytest.param(
        _with(steps=[{"prune": {"amount": 0.5, "scope": "structured", "norm": 1, "fineTuneEpochs": 1}}]),
        "sha256:866cd933b20a05449b9e40d7d9cae0036b61b02e9ed3e0f07c62712df3cfeda4", id="prune-structured-norm-1"),
    pytest.param(
        _with(steps=[{"prune": {"amount": 0.5, "scope": "structured"}}]),
        "sha256:83a2c41e124c3717a13f505f741093eccd354b977b2e487d5a960ef19619fed7", id="prune-structured-default-norm"),
    pytest.param(
        _with(steps=[{"prune": {"amount": 0.5, "scope": "structured", "norm": 2}}]),
        "sha256:83a2c41e124c3717a13f505f741093eccd354b977b2e487d5a960ef19619fed7",
        id="prune-structured-norm-2-written-out"),
    pytest.param(
        _with(steps=[{"quantize": {"scheme": "int8-weight-only"}}], encoding="safetensors"),
        "sha256:9ccc85afa440712dbafcae7ed775865453bd22f37c0a3050dffec2c192683489", id="quantize-encoding"),
    pytest.param(
        _with(steps=[{"distill": {"student": "pkg.students:mlp", "studentKwargs": {"hidden": 16, "layers": [32, 16],
                                                                                 "act": "relu"},
                                  "temperature": 2, "alpha": 0.7, "epochs": 3, "lr": 0.005, "batchSize": 128}},
                     {"quantize": {"scheme": "int8-dynamic"}}]),
        "sha256:29ff5087783279361c258dd9c9f90583d3df78d4591bbd60cfaf84cb1978e67d", id="distill-student-kwargs"),
    pytest.param(
        _with(steps=[{"distill": {"student": "pkg.students:mlp"}}]),
        "sha256:e716167b9813d061f50f679845c84a731e3e2e97bac0fc085b7e3e56738c5066", id="distill-defaults"),
    pytest.param(
        _with(steps=[{"quantize": {"scheme": "int8-embedding"}}],
              evaluation={"dataset": "builtin:sentences", "maxRelativeAccuracyLoss": 0.02, "samples": 256,
                          "maxRelativeLoss": {"nn_agreement": 0.05, "cosine": 0.1}}),
        "sha256:8f24da8ee853894dd7da09c9f243b71131377f995e797adba71c414fdb2ff70f", id="evaluation-max-relative-loss"),
    pytest.param(
        _with(steps=[{"prune": {"amount": 0.5, "lr": 1}}],
              evaluation={"dataset": "builtin:digits", "maxRelativeAccuracyLoss": 0, "maxRelativeLoss": {"acc": 1}}),
        "sha256:a81eabcd61ce16a04d3b19a0d65b95ff2cf1a04f39be84c106b3cb7dbe22dd7f", id="integral-floats"),
    pytest.param(
        _with(compiled={"aotInductor": True, "maxBatchSize": 256, "maxAutotune": True}),
        "sha256:b09edbc33342d539702f16ca04bf2ba845275a992adc84a4df02769e1d90f607", id="compiled-on"),
    pytest.param(
        _with(compiled={"aotInductor": False, "maxBatchSize": 1024, "maxAutotune": False}),
        "sha256:97ad398559a23b3333a76dd4f0c7ff206de7c4e586bc87fc0b2c8b869f994141", id="compiled-off-written-out"),
    pytest.param(
        _with(name="digits", seed=7, encoding="safetensors+zstd"),
        "sha256:1fdf0c4d3ca9575e047fbb90ccc8bc5d97edb78ceab6d37842eb4d0fa311ffea", id="name-seed-encoding"),
]


@pytest.mark.parametrize(("doc", "digest"), DIGEST_CASES)
def test_recipe_digest_is_unchanged_by_the_shared_types(doc: dict[str, Any], digest: str) -> None:
    assert compress.build_recipe_digest(recipe.build_config(doc), SOURCE_DIGEST) == digest


def test_recipe_digest_counts_the_source() -> None:
    config = recipe.build_config(_with())
    assert compress.build_recipe_digest(config, SOURCE_DIGEST) != compress.build_recipe_digest(config, "sha256:00")


# --- the schemes -----------------------------------------------------------------------------------------------------


def test_the_recipe_and_the_quantizer_know_the_same_schemes() -> None:
    assert typing.get_args(shared.QuantizeScheme) == shared.QUANTIZE_SCHEMES
    assert tuple(quantize.SCHEMES) == shared.QUANTIZE_SCHEMES  # same names, same order (error messages list them)
    assert quantize.CUDA_ONLY_SCHEMES == shared.CUDA_ONLY_SCHEMES == recipe.CUDA_ONLY_SCHEMES
    assert quantize.EMBEDDING_SCHEMES == shared.EMBEDDING_SCHEMES == recipe.EMBEDDING_SCHEMES
    assert shared.CUDA_ONLY_SCHEMES.issubset(shared.QUANTIZE_SCHEMES)
    assert shared.EMBEDDING_SCHEMES.issubset(shared.QUANTIZE_SCHEMES)


@pytest.mark.parametrize("scheme", list(quantize.SCHEMES))
def test_every_quantizer_scheme_is_a_valid_recipe(scheme: str) -> None:
    (step,) = recipe.build_config(_with(steps=[{"quantize": {"scheme": scheme}}])).steps
    assert step.quantize is not None and step.quantize.scheme == scheme
    assert step.quantize.needs_cuda is (scheme in quantize.CUDA_ONLY_SCHEMES)
    for cuda in (False, True):
        assert bool(recipe.assess_device([step], cuda_available=cuda)) is (
            quantize.assess_scheme(scheme, cuda_available=cuda) is not None)


# --- the file --------------------------------------------------------------------------------------------------------


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
        pytest.param(
            "c.yml",
            "source: /models/digits\noutput: /artifacts/x\nsteps:\n  - prune: {amount: 0.9}\n"
            "evaluation: {dataset: 'builtin:digits'}\n",
            id="yml",
        ),
    ],
)
def test_load_config_document(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / name).write_text(text)
    config = recipe.build_config(recipe.load_config_document(tmp_path / name))
    assert config.steps[0].prune == shared.Prune(amount=0.9)
    assert config.evaluation.dataset == "builtin:digits"


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        pytest.param("c.json", "{not json", "not valid JSON", id="bad-json"),
        pytest.param("c.yaml", "a: [1, 2", "not valid YAML", id="bad-yaml"),
        pytest.param("c.conf", "source: /x\n", "not valid JSON", id="yaml-without-its-suffix-is-json"),
        pytest.param("missing.json", None, "cannot be read", id="missing"),
    ],
)
def test_unreadable_config_document(tmp_path: Path, name: str, text: str | None, problem: str) -> None:
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(recipe.ConfigError) as raised:
        recipe.load_config_document(tmp_path / name)
    (only,) = raised.value.problems
    assert only.startswith(f"config file {tmp_path / name}: {problem}"), only
