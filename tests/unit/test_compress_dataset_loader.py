"""A user dataset loader (`evaluation.dataset: package.module:function`) run through the real compression pipeline.

The loader module is written to a temporary directory on sys.path, next to the factory of a tiny MLP (4 -> 8 -> 3).
An accepted run must have evaluated on the loader's data (its sample counts and the accuracy the source model gets
on exactly those samples are in the report); a loader that fails or returns data that does not fit the model must
stop the job with one message that names the loader and the problem, before any artifact is written.
"""

from __future__ import annotations

import importlib
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from shipyard.runtime import cli, compress, datasets, recipe
from shipyard.runtime.artifacts import store
from tests.modules import load_file

LOADER_SOURCE = '''
import torch
from torch import nn

from shipyard.runtime.datasets import Dataset

EVAL, TRAIN = 37, 20


def build_model():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _split(samples, seed, features=4, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, features, generator=generator).to(dtype)
    return inputs, torch.randint(0, 3, (samples,), generator=generator)


def good():
    (train_x, train_y), (eval_x, eval_y) = _split(TRAIN, 1), _split(EVAL, 2)
    return Dataset(name="tiny", task="classification", train_inputs=(train_x,), train_labels=train_y,
                   eval_inputs=(eval_x,), eval_labels=eval_y)


def as_mapping():
    eval_x, eval_y = _split(EVAL, 3)
    return {"task": "classification", "eval_inputs": [eval_x], "eval_labels": eval_y}


def raises():
    raise RuntimeError("bucket s3://data not mounted")


def a_list():
    return [1, 2, 3]


def no_eval_inputs():
    return {"task": "classification", "eval_labels": torch.zeros(3, dtype=torch.long)}


def short_labels():
    eval_x, eval_y = _split(EVAL, 2)
    return {"task": "classification", "eval_inputs": [eval_x], "eval_labels": eval_y[:5]}


def wide():
    eval_x, eval_y = _split(EVAL, 2, features=7)
    return {"task": "classification", "eval_inputs": [eval_x], "eval_labels": eval_y}


def wide_train_split():
    dataset = good()
    train_x, train_y = _split(TRAIN, 1, features=5)
    return {"task": "classification", "train_inputs": [train_x], "train_labels": train_y,
            "eval_inputs": dataset.eval_inputs, "eval_labels": dataset.eval_labels}


def images():
    eval_x, eval_y = _split(EVAL, 2)
    return {"task": "classification", "eval_inputs": [eval_x.reshape(EVAL, 2, 2)], "eval_labels": eval_y}


def float64():
    eval_x, eval_y = _split(EVAL, 2, dtype=torch.float64)
    return {"task": "classification", "eval_inputs": [eval_x], "eval_labels": eval_y}


def two_tensors():
    eval_x, eval_y = _split(EVAL, 2)
    return {"task": "classification", "eval_inputs": [eval_x, eval_x], "eval_labels": eval_y}


def binary_task():
    eval_x, eval_y = _split(EVAL, 2)
    return {"task": "binary", "eval_inputs": [eval_x], "eval_labels": (eval_y > 0).long()}
'''
INPUTS = [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
OUTPUTS = [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]
_names = itertools.count()


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def loaders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The loader module, importable under a fresh name (no cached module from another test)."""
    name = f"shipyard_test_loaders_{next(_names)}"
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / f"{name}.py").write_text(LOADER_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    module = importlib.import_module(name)
    yield module
    sys.modules.pop(name, None)


@pytest.fixture
def source(tmp_path: Path, loaders: Any) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "models" / "tiny"
    store.save_model(loaders.build_model(), path, name="tiny", factory=f"{loaders.__name__}:build_model",
                         inputs=INPUTS, outputs=OUTPUTS)
    return path


def config_doc(tmp_path: Path, source: Path, dataset: str, **evaluation: Any) -> dict[str, Any]:
    return {
        "source": str(source),
        "output": str(tmp_path / "artifacts" / "tiny-1"),
        "steps": [{"prune": {"amount": 0.25}}],
        "evaluation": {"dataset": dataset, "maxRelativeAccuracyLoss": 1.0, **evaluation},
        "terminationLog": str(tmp_path / "termination-log"),
        "latency": {"batchSizes": [1], "budgetSeconds": 0.01},
        "compiled": {"mode": "off"},  # the loader is under test, not the package (compiling takes 15-50 s)
    }


def accuracy_on(source: Path, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.inference_mode():
        predicted = store.load_model(source).module(inputs).argmax(dim=1)
    return float((predicted == labels).float().mean())


def test_the_gate_evaluates_on_the_loaders_data(tmp_path: Path, source: Path, loaders: Any) -> None:
    ref = f"{loaders.__name__}:good"
    body = compress.run_compression(recipe.build_config(config_doc(tmp_path, source, ref)))
    assert body["status"] == "accepted"
    assert body["dataset"] == {"ref": ref, "evalSamples": 37, "trainSamples": 20, "synthetic": False}
    data = loaders.good()
    expected = accuracy_on(source, data.eval_inputs[0], data.eval_labels)
    assert body["accuracy"]["before"] == pytest.approx(expected)
    (check,) = body["gate"]["checks"]
    assert check["metric"] == "accuracy" and check["before"] == pytest.approx(expected)
    after = accuracy_on(tmp_path / "artifacts" / "tiny-1", data.eval_inputs[0], data.eval_labels)
    assert body["accuracy"]["after"] == pytest.approx(after)


def test_a_mapping_loader_and_the_samples_limit(tmp_path: Path, source: Path, loaders: Any) -> None:
    ref = f"{loaders.__name__}:as_mapping"
    body = compress.run_compression(recipe.build_config(config_doc(tmp_path, source, ref, samples=30)))
    assert body["dataset"] == {"ref": ref, "evalSamples": 30, "trainSamples": 0, "synthetic": False}
    data = loaders.as_mapping()
    expected = accuracy_on(source, data["eval_inputs"][0][:30], data["eval_labels"][:30])
    assert body["accuracy"]["before"] == pytest.approx(expected)


ERRORS = [
    pytest.param("raises", "dataset loader '{ref}' failed: RuntimeError: bucket s3://data not mounted", id="raises"),
    pytest.param("a_list", "dataset loader '{ref}' returned list, not a Dataset or a mapping", id="not-a-dataset"),
    pytest.param("no_eval_inputs", "dataset loader '{ref}': the mapping has no 'eval_inputs' field", id="no-inputs"),
    pytest.param("missing", "dataset loader '{ref}' cannot be imported", id="no-such-function"),
    pytest.param("short_labels", "dataset '{ref}': eval_labels: 5 labels for 37 samples", id="label-count"),
    pytest.param("wide", "dataset '{ref}' does not fit the inputs of source model {source}: eval_inputs[0] (input): "
                 "shape [37, 7] does not match the model's input shape [-1, 4]", id="wrong-feature-size"),
    pytest.param("wide_train_split", "dataset '{ref}' does not fit the inputs of source model {source}: "
                 "train_inputs[0] (input): shape [20, 5] does not match the model's input shape [-1, 4]",
                 id="wrong-train-shape"),
    pytest.param("images", "eval_inputs[0] (input): shape [37, 2, 2] does not match the model's input shape [-1, 4]",
                 id="wrong-rank"),
    pytest.param("float64", "dataset '{ref}' does not fit the inputs of source model {source}: eval_inputs[0] "
                 "(input): dtype float64 but the model's input is FP32 (float32)", id="wrong-dtype"),
    pytest.param("two_tensors", "eval_inputs: 2 tensor(s) for the model's 1 input(s) (input)", id="tensor-count"),
    pytest.param("binary_task", "source model: outputs of shape (37, 3) are not one logit per sample as the binary "
                 "dataset '{ref}' needs", id="outputs-do-not-fit-the-task"),
]


@pytest.mark.parametrize(("function", "message"), ERRORS)
def test_a_broken_loader_stops_the_job_naming_the_loader(
    tmp_path: Path, source: Path, loaders: Any, function: str, message: str
) -> None:
    ref = f"{loaders.__name__}:{function}"
    with pytest.raises((datasets.DatasetError, compress.CompressionError)) as caught:
        compress.run_compression(recipe.build_config(config_doc(tmp_path, source, ref)))
    text = str(caught.value)
    assert message.format(ref=ref, source=source) in text
    assert ref in text
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").iterdir())


def test_the_cli_reports_a_failing_loader_in_one_line(tmp_path: Path, source: Path, loaders: Any) -> None:
    import json

    ref = f"{loaders.__name__}:raises"
    (tmp_path / "compression.json").write_text(json.dumps(config_doc(tmp_path, source, ref)))
    assert cli.main(["compress", "--config", str(tmp_path / "compression.json")]) == compress.EXIT_FAILED
    line = (tmp_path / "termination-log").read_text()
    assert line == (f"Failed: dataset loader '{ref}' failed: RuntimeError: bucket s3://data not mounted; "
                    "no artifact written\n")


@pytest.mark.parametrize(("shapes", "problems"), [
    pytest.param([(5, 4)], [], id="fits"),
    pytest.param([(5, 4, 1)], ["eval_inputs[0] (input): shape [5, 4, 1] does not match the model's input shape "
                               "[-1, 4]"], id="extra-dim"),
    pytest.param([], ["eval_inputs: must hold at least one tensor"], id="assess-dataset-catches-empty-first"),
])
def test_assess_inputs_is_pure(shapes: list[tuple[int, ...]], problems: list[str]) -> None:
    dataset = datasets.Dataset("d", "embedding", (), None, tuple(torch.zeros(s) for s in shapes), None)
    if not shapes:
        assert datasets.assess_dataset(dataset) == problems
        return
    assert datasets.assess_inputs(dataset, INPUTS) == problems


def test_the_real_sentences_ship_with_their_licence() -> None:
    """builtin:python-docs-sentences: 640 real sentences (not generated here) with the PSF licence next to them, and
    the file is what hack/extract-sentences.py selects from the Python documentation it names."""
    lines = datasets.load_sentence_lines()
    header = [line for line in datasets.SENTENCES_FILE.read_text().splitlines() if line.startswith("#")]
    assert len(lines) == len(set(lines)) == 640
    assert "PSF License Version 2" in header[1] and "pydoc_data.topics" in header[0]
    licence = (datasets.SENTENCES_FILE.parent / "LICENSE-PSF.txt").read_text()
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in licence
    extract = load_file("extract_sentences", Path(__file__).resolve().parents[2] / "hack" / "extract-sentences.py")
    assert all(extract.PROSE.fullmatch(line) for line in lines)
    dataset = datasets.load_dataset("builtin:python-docs-sentences")
    assert (dataset.task, dataset.synthetic, dataset.eval_size, dataset.train_size) == ("embedding", False, 512, 128)
    ids, mask = dataset.eval_inputs
    assert ids.dtype == torch.int64 and ids.shape == mask.shape and ids.shape[1] <= 64
