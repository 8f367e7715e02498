"""One test per example scenario: build the example's source model, run its compression config, check the gate.

The configs are the ones in examples/models/; only paths (and, for speed, sample counts and latency budgets)
are overridden here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from shipyard.runtime import cli
from shipyard.runtime.artifacts import store
from tests.modules import load_file

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "models"


def _examples() -> object:
    return load_file("build_models", EXAMPLES / "build_models.py")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> object:
    """Tiny models gain nothing from threads, and on a shared machine OpenMP threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "digits"
    _examples().build_digits(path)
    return path


@pytest.fixture(scope="module")
def minilm_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "minilm"
    manifest = _examples().build_minilm(path)
    assert store.build_weights_bytes(manifest) > 80_000_000
    return path


def _compress(tmp_path: Path, example: str, source: Path, **overrides: object) -> tuple[int, dict]:
    config = yaml.safe_load((EXAMPLES / example).read_text())
    config.update(
        source=str(source),
        output=str(tmp_path / "artifact"),
        terminationLog=str(tmp_path / "termination-log"),
        latency={"batchSizes": [1, 64], "budgetSeconds": 0.05},
        # the examples' gates are under test here; the package that mode auto builds (minutes for MiniLM on 2 cores)
        # is tested on a small model in test_compress_cli, and measured on these in bench/compression.py
        compiled={"mode": "off"},
    )
    config.update(overrides)
    config.pop("logDir", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    code = cli.main(["compress", "--config", str(tmp_path / "config.json")])
    report = json.loads((tmp_path / "artifact" / "report.json").read_text()) if code == 0 else {}
    return code, report


def test_image_scenario_digits_prune_quantize_encode(tmp_path: Path, digits_source: Path) -> None:
    code, report = _compress(tmp_path, "digits.compression.yaml", digits_source)
    assert code == 0, (tmp_path / "termination-log").read_text()
    assert report["accuracy"]["relativeLoss"] <= 0.005
    assert report["bytes"]["ratio"] >= 20  # structured + 80% sparse + int8 + zstd
    assert store.load_model(tmp_path / "artifact").manifest["encoding"] == "safetensors+zstd"


def test_image_scenario_digits_distillation(tmp_path: Path, digits_source: Path) -> None:
    code, report = _compress(tmp_path, "digits-distill.compression.yaml", digits_source)
    assert code == 0, (tmp_path / "termination-log").read_text()
    assert report["parameters"]["after"] == 64 * 32 + 32 + 32 * 10 + 10
    assert report["bytes"]["ratio"] >= 40
    assert (
        store.load_model(tmp_path / "artifact").manifest["factory"]
        == "shipyard.runtime.models:build_digits_student"
    )


@pytest.fixture
def _two_threads() -> object:
    """MiniLM is compute-bound: the one test of the module that uses both cores."""
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(1)


@pytest.mark.usefixtures("_two_threads")
def test_nlp_scenario_minilm_int8(tmp_path: Path, minilm_source: Path) -> None:
    code, report = _compress(
        tmp_path, "minilm.compression.yaml", minilm_source,
        evaluation={"dataset": "builtin:sentence-fidelity", "maxRelativeAccuracyLoss": 0.005,
                    "maxRelativeLoss": {"nn_agreement": 0.1}, "samples": 64},
        latency={"batchSizes": [1, 4], "budgetSeconds": 0.05},
    )  # fmt: skip
    assert code == 0, (tmp_path / "termination-log").read_text()
    assert report["metrics"]["after"]["cosine"] >= 0.995
    assert report["bytes"]["ratio"] >= 3.5  # embeddings included
    loaded = store.load_model(tmp_path / "artifact")
    assert type(loaded.module.bert.embeddings.word_embeddings.weight).__name__ == "IntxUnpackedToInt8Tensor"
    # the compressed MiniLM still takes text: the tokenizer file and declaration came along (under the digest)
    assert loaded.manifest["tokenizer"] == store.load_model(minilm_source).manifest["tokenizer"]
    assert "tokenizer.json" in loaded.manifest["files"]


def test_nlp_source_matches_sentence_transformers(minilm_source: Path) -> None:
    """The MiniLM wrapper (BERT + mean pooling + normalisation) reproduces the packaged sentence-transformers model."""
    from sentence_transformers import SentenceTransformer

    from shipyard.runtime import datasets, models

    ours = store.load_model(minilm_source).module
    sentences = datasets.build_synthetic_sentences(6)
    ids, mask = datasets.build_token_batch(sentences)
    with torch.no_grad():
        got = ours(ids, mask)
    reference = SentenceTransformer(str(models.query_minilm_dir()), device="cpu").encode(
        sentences, convert_to_tensor=True
    )
    assert torch.nn.functional.cosine_similarity(got, reference).min() > 0.9999
    # the server's text path (the declared tokenizer, batch padded to the longest) gives the same embeddings
    from shipyard.runtime import textinput

    text = textinput.load_text_input(store.load_model(minilm_source))
    assert text is not None and text.spec.max_length == 256
    request, _ = text.build_model_request(sentences, [])
    with torch.no_grad():
        via_text = ours(*(torch.from_numpy(array) for array in request.arrays))
    assert torch.nn.functional.cosine_similarity(via_text, reference).min() > 0.9999


def test_recommendation_scenario_two_tower_int8(tmp_path: Path) -> None:
    manifest = _examples().build_recsys(tmp_path / "recsys", epochs=2, samples=100_000)
    assert manifest["metadata"]["auc"] > 0.58  # learned something (chance is 0.5; the full example reaches ~0.7)
    code, report = _compress(tmp_path, "recsys.compression.yaml", tmp_path / "recsys")
    assert code == 0, (tmp_path / "termination-log").read_text()
    assert report["dataset"]["synthetic"] is True
    assert report["accuracy"]["metric"] == "auc" and report["accuracy"]["relativeLoss"] <= 0.01
    assert report["bytes"]["ratio"] >= 3.5
