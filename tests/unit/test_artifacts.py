"""Unit tests of the model directory format: round trips, digests, refusal of pickles, atomic writes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from shipyard.runtime import artifacts, models, quantize
from shipyard.runtime.artifacts import manifests, programs, store
from tests.pickle_payloads import TouchesFileWhenUnpickled, hostile_weights

DIGITS_IO = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
}
FACTORY = "shipyard.runtime.models:build_digits_mlp"
COMPILED = {"file": "model.cpu.pt2", "format": "aotinductor", "device": "cpu", "torch": torch.__version__,
            "maxBatchSize": 128}
SMALL = {"hidden": [32, 16]}


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.build_digits_mlp(hidden=(32, 16)).eval()


def _save(module: torch.nn.Module, path: Path, **kwargs: object) -> dict:
    return store.save_model(
        module, path, name="digits", factory=FACTORY, factory_kwargs=SMALL, **DIGITS_IO, **kwargs
    )


def _shrunk() -> torch.nn.Module:
    model = _mlp()
    model[0] = torch.nn.Linear(64, 7)
    model[2] = torch.nn.Linear(7, 16)
    return model.eval()


def _int8(scheme: str) -> tuple[torch.nn.Module, list]:
    model = _mlp()
    return model, [quantize.apply_quantization(model, scheme)]


@pytest.mark.parametrize(
    ("build", "encoding"),
    [
        pytest.param(lambda: (_mlp(), []), "safetensors", id="fp32"),
        pytest.param(lambda: (_mlp(), []), "safetensors+zstd", id="fp32-zstd"),
        pytest.param(lambda: (_shrunk(), []), "safetensors", id="structurally-pruned"),
        pytest.param(lambda: _int8("int8-dynamic"), "safetensors+zstd", id="int8-dynamic"),
        pytest.param(lambda: _int8("int8-weight-only"), "safetensors", id="int8-weight-only"),
    ],
)
def test_round_trip_gives_identical_outputs(tmp_path: Path, build, encoding: str) -> None:
    built = build()
    module, records = built
    manifest = _save(module, tmp_path / "model", encoding=encoding, quantization=records)
    loaded = store.load_model(tmp_path / "model")
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), module(x))
    assert loaded.digest == manifest["digest"] == manifests.build_digest(manifest)
    assert [s.name for s in loaded.inputs] == ["input"]
    assert loaded.outputs[0] == manifests.TensorSpec("logits", "FP32", (-1, 10))
    assert not loaded.module.training


def test_int8_weights_are_stored_as_int8_bytes(tmp_path: Path) -> None:
    model, records = _int8("int8-dynamic")
    manifest = _save(model, tmp_path / "q", quantization=records)
    fp32 = _save(_mlp(), tmp_path / "f")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / manifest["weights"]), "pt") as handle:
        assert handle.get_slice("0.weight::qdata").get_dtype() == "I8"
    loaded = store.load_model(tmp_path / "q")
    assert torch.equal(loaded.module[0].weight.qdata, model[0].weight.qdata)
    # Tiny layers: the safetensors header and per-row scales weigh in, so less than the 4x of big layers.
    assert store.build_weights_bytes(manifest) < store.build_weights_bytes(fp32) / 2.5


def test_embedding_quantization_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.build_recsys_two_tower(num_users=50, num_items=40, dim=16, hidden=8).eval()
    records = [quantize.apply_quantization(model, "int8-embedding"), quantize.apply_quantization(model, "int8-dynamic")]
    io = {
        "inputs": [
            {"name": "user_ids", "datatype": "INT64", "shape": [-1]},
            {"name": "item_ids", "datatype": "INT64", "shape": [-1]},
        ],
        "outputs": [{"name": "score", "datatype": "FP32", "shape": [-1, 1]}],
    }
    store.save_model(
        model,
        tmp_path / "rec",
        name="rec",
        factory="shipyard.runtime.models:build_recsys_two_tower",
        factory_kwargs={"num_users": 50, "num_items": 40, "dim": 16, "hidden": 8},
        quantization=records,
        **io,
    )
    loaded = store.load_model(tmp_path / "rec")
    users, items = torch.randint(0, 50, (6,)), torch.randint(0, 40, (6,))
    with torch.no_grad():
        assert torch.equal(loaded.module(users, items), model(users, items))
    assert type(loaded.module.user_embedding.weight).__name__ == "IntxUnpackedToInt8Tensor"


def test_digest_is_content_addressed(tmp_path: Path) -> None:
    first = _save(_mlp(seed=1), tmp_path / "a")
    again = _save(_mlp(seed=1), tmp_path / "b")
    other = _save(_mlp(seed=2), tmp_path / "c")
    assert first["digest"] == again["digest"] != other["digest"]


def _flip_weight_byte(directory: Path) -> None:
    manifest = json.loads((directory / manifests.MANIFEST_FILE).read_text())
    weights = directory / manifest["weights"]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))


def _edit_manifest(directory: Path, **changes: object) -> None:
    path = directory / manifests.MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        pytest.param(_flip_weight_byte, "digest mismatch: weights.safetensors has sha256:", id="weights-modified"),
        pytest.param(
            lambda d: _edit_manifest(d, name="other"), "digest mismatch: the manifest records", id="manifest-modified"
        ),
        pytest.param(
            lambda d: (d / "weights.safetensors").unlink(),
            "weights.safetensors listed in the manifest is missing",
            id="weights-missing",
        ),
        pytest.param(
            lambda d: (d / manifests.MANIFEST_FILE).unlink(), "shipyard-model.json is missing", id="manifest-missing"
        ),
        pytest.param(
            lambda d: _edit_manifest(d, kind="onnx"), "kind: must be one of factory, export", id="unknown-kind"
        ),
        pytest.param(
            lambda d: _edit_manifest(d, weights="../etc/passwd"), "weights: must be a file name", id="path-escape"
        ),
    ],
)
def test_tampered_or_broken_directory_is_refused(tmp_path: Path, tamper, message: str) -> None:
    _save(_mlp(), tmp_path / "model")
    tamper(tmp_path / "model")
    with pytest.raises(artifacts.ArtifactError, match=message.replace("(", r"\(")):
        store.load_model(tmp_path / "model")


def test_expected_digest_is_enforced(tmp_path: Path) -> None:
    manifest = _save(_mlp(), tmp_path / "model")
    assert store.load_model(tmp_path / "model", expected_digest=manifest["digest"]).digest == manifest["digest"]
    with pytest.raises(artifacts.ArtifactError, match="digest mismatch: expected sha256:00"):
        store.load_model(tmp_path / "model", expected_digest="sha256:" + "0" * 64)


def _source_dir(directory: Path, weights_name: str, encoding: str, payload: bytes) -> None:
    directory.mkdir()
    (directory / weights_name).write_bytes(payload)
    manifest = {
        "format": 1,
        "name": "digits",
        "kind": "factory",
        "factory": FACTORY,
        "factory_kwargs": SMALL,
        "weights": weights_name,
        "encoding": encoding,
        **DIGITS_IO,
    }
    (directory / manifests.MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("encoding", "via_torch_save", "message"),
    [
        pytest.param(
            "torch-state-dict", True, "refused to load: not a plain state_dict", id="torch-save-as-state-dict"
        ),
        pytest.param(
            "torch-state-dict", False, "refused to load: not a plain state_dict", id="raw-pickle-as-state-dict"
        ),
        pytest.param("safetensors", True, "refused to load: the file is a pickle", id="torch-save-as-safetensors"),
        pytest.param("safetensors", False, "refused to load: the file is a pickle", id="raw-pickle-as-safetensors"),
    ],
)
def test_malicious_pickle_is_refused_and_never_executed(
    tmp_path: Path, encoding: str, via_torch_save: bool, message: str
) -> None:
    marker = tmp_path / "pwned"
    payload = hostile_weights(marker, via_torch_save=via_torch_save)
    _source_dir(tmp_path / "model", "weights.bin", encoding, payload)
    with pytest.raises(artifacts.ArtifactError, match=message):
        store.load_model(tmp_path / "model")
    assert not marker.exists()


def test_plain_source_directory_loads_without_digest(tmp_path: Path) -> None:
    model = _mlp()
    from safetensors.torch import save

    _source_dir(tmp_path / "src", "model.safetensors", "safetensors", save(model.state_dict()))
    loaded = store.load_model(tmp_path / "src")
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), model(x))
    assert loaded.digest.startswith("sha256:") and loaded.manifest["files"]["model.safetensors"]["bytes"] > 0


def test_plain_state_dict_from_torch_save_loads(tmp_path: Path) -> None:
    import io

    model = _mlp()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    _source_dir(tmp_path / "src", "model.pt", "torch-state-dict", buffer.getvalue())
    loaded = store.load_model(tmp_path / "src")
    assert torch.equal(loaded.module[0].weight, model[0].weight)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        pytest.param({"0.weight": torch.zeros(32, 64)}, "tensor '0.bias' is missing", id="missing-tensor"),
        pytest.param({"junk": torch.zeros(1)}, "is missing", id="wrong-names"),
        pytest.param("extra", "stored tensors are not in the model, e.g. 'extra.weight'", id="unexpected-tensor"),
        pytest.param("shape", "tensor '0.weight' has shape (32, 63)", id="wrong-shape"),
    ],
)
def test_weights_not_matching_the_factory_are_refused(tmp_path: Path, weights, message: str) -> None:
    from safetensors.torch import save

    state = dict(_mlp().state_dict())
    if weights == "extra":
        state["extra.weight"] = torch.zeros(2)
    elif weights == "shape":
        state["0.weight"] = torch.zeros(32, 63)
    else:
        state = weights
    _source_dir(tmp_path / "src", "model.safetensors", "safetensors", save(state))
    with pytest.raises(artifacts.ArtifactError, match=message.replace("(", r"\(").replace(")", r"\)")):
        store.load_model(tmp_path / "src")


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        pytest.param({"format": 2}, "format: must be 1, got 2", id="format"),
        pytest.param({"name": ""}, "name: must be a non-empty string", id="name"),
        pytest.param({"factory": "no_colon"}, "factory: must be 'package.module:function'", id="factory"),
        pytest.param({"encoding": "gzip"}, "encoding: must be one of", id="encoding"),
        pytest.param({"inputs": []}, "inputs: must be a non-empty list", id="inputs-empty"),
        pytest.param({"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [-1]}]}, "inputs[0].datatype", id="dtype"),
        pytest.param({"outputs": [{"name": "y", "datatype": "FP32", "shape": [0]}]}, "outputs[0].shape", id="shape"),
        pytest.param({"quantization": [{"scheme": "int3", "modules": []}]}, "quantization[0].scheme", id="scheme"),
        pytest.param({"structure": {"fc": {"type": "GRU"}}}, "structure['fc'].type", id="structure"),
        pytest.param({"digest": "md5:abc"}, "digest: must be 'sha256:<hex>'", id="digest"),
    ],
)
def test_assess_manifest_names_the_field(change: dict, problem: str) -> None:
    manifest = {
        "format": 1,
        "name": "m",
        "kind": "factory",
        "factory": FACTORY,
        "weights": "w.safetensors",
        **DIGITS_IO,
        "files": {"w.safetensors": {"sha256": "00", "bytes": 1}},
    }
    assert manifests.assess_manifest(manifest) == []
    manifest.update(change)
    assert any(problem in p for p in manifests.assess_manifest(manifest)), manifests.assess_manifest(manifest)


def test_failed_save_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(artifacts.ArtifactError, match="cannot be imported"):
        store.save_model(_mlp(), tmp_path / "out", name="x", factory="no.such.module:f", **DIGITS_IO)
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError), store.stage_directory(tmp_path / "out") as staging:
        (staging / "half-written").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_existing_output_is_not_overwritten_by_default(tmp_path: Path) -> None:
    _save(_mlp(), tmp_path / "model")
    with pytest.raises(artifacts.ArtifactError, match="already exists"):
        _save(_mlp(seed=3), tmp_path / "model")
    replaced = _save(_mlp(seed=3), tmp_path / "model", overwrite=True)
    assert store.load_model(tmp_path / "model").digest == replaced["digest"]
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_export_kind_round_trip_and_pickle_check(tmp_path: Path) -> None:
    model = _mlp()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (torch.randn(2, 64),), dynamic_shapes=({0: batch},))
    manifest = store.save_exported_model(program, tmp_path / "exp", name="digits", **DIGITS_IO)
    loaded = store.load_model(tmp_path / "exp")
    x = torch.randn(7, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), model(x))
    assert loaded.digest == manifest["digest"]
    # An archive carrying a pickle that weights_only rejects is refused before torch.export.load runs.
    import zipfile

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(tmp_path / "exp" / "program.pt2") as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("sample_inputs/model.pt"):
                import io

                buffer = io.BytesIO()
                torch.save(TouchesFileWhenUnpickled(marker), buffer)
                data = buffer.getvalue()
            dst.writestr(item, data)
    with pytest.raises(artifacts.ArtifactError, match="refused: .*sample_inputs/model.pt is a pickle"):
        programs.load_exported_module(evil)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        pytest.param(None, "has no compiled package", id="absent"),
        pytest.param(
            {"device": "cuda", "torch": torch.__version__, "file": "m.pt2"}, "is for device 'cuda'", id="device"
        ),
        pytest.param(
            {"device": "cpu", "torch": "1.0.0", "file": "m.pt2"}, "was built by torch 1.0.0", id="torch-version"
        ),
    ],
)
def test_compiled_package_is_only_loaded_when_it_fits(tmp_path: Path, entry: dict | None, message: str) -> None:
    manifest = {"name": "digits", "compiled": entry}
    with pytest.raises(artifacts.ArtifactError, match=message):
        programs.load_compiled_module(manifest, tmp_path)


@pytest.mark.parametrize(
    ("entry", "config", "problem"),
    [
        pytest.param(COMPILED, {}, None, id="fits"),
        pytest.param(COMPILED, {"device": "cpu:0"}, None, id="cpu-with-index"),
        pytest.param(COMPILED, {"max_batch_size": 128}, None, id="max-batch-equal"),
        pytest.param(None, {}, "model 'digits' has no compiled package", id="absent"),
        pytest.param({}, {}, "has no compiled package", id="empty"),
        pytest.param(COMPILED, {"device": "cuda:0"}, "is for device 'cpu', not 'cuda:0'", id="device"),
        pytest.param({**COMPILED, "torch": "1.0.0"}, {}, "was built by torch 1.0.0, this is torch", id="torch"),
        pytest.param(COMPILED, {"dtype": "bfloat16"}, "computes in float32, not bfloat16", id="dtype"),
        pytest.param(COMPILED, {"compile_model": True}, "--compile asks for torch.compile", id="torch-compile"),
        pytest.param(COMPILED, {"max_batch_size": 129}, "batches up to 128, the server's max batch size is 129",
                     id="max-batch-over"),
    ],
)
def test_assess_compiled(entry: dict | None, config: dict, problem: str | None) -> None:
    manifest = {"name": "digits", "compiled": entry}
    got = programs.assess_compiled(manifest, **{"device": "cpu", "torch_version": torch.__version__, **config})
    assert got == problem if problem is None else (got is not None and problem in got)


def test_compiled_package_round_trip(compiled_digits_dir: Path, tmp_path: Path) -> None:
    """An int8 model with its AOTInductor package: both loads give the same outputs, the package is digested."""
    manifest = manifests.load_verified_manifest(compiled_digits_dir)
    assert manifest["compiled"]["file"] in manifest["files"] and manifest["compiled"]["maxBatchSize"] == 128
    assert store.build_compiled_bytes(manifest) > 0
    eager = store.load_model(compiled_digits_dir)
    compiled = store.load_model(compiled_digits_dir, compiled=True)
    assert isinstance(compiled.module, programs.CompiledModule)
    assert compiled.digest == eager.digest
    x = torch.randn(9, 64)
    with torch.no_grad():
        assert torch.allclose(compiled.module(x), eager.module(x), atol=1e-4)
        assert torch.allclose(compiled.module(x.t().contiguous().t()), eager.module(x), atol=1e-4)  # strides
        with pytest.raises(ValueError, match="takes 1 input tensor"):
            compiled.module(x, x)
    shutil.copytree(compiled_digits_dir, tmp_path / "model")
    _flip_weight_byte(tmp_path / "model")  # the eager weights changed: even the compiled load must refuse
    with pytest.raises(artifacts.ArtifactError, match="digest mismatch"):
        store.load_model(tmp_path / "model", compiled=True)


@pytest.mark.parametrize(
    ("eager", "compiled", "form", "ratio", "why"),
    [
        pytest.param({1: 0.63, 64: 0.83}, {1: 0.009, 64: 0.077}, "compiled", 0.0364, "package faster than eager",
                     id="package-faster-at-both"),
        pytest.param({1: 10.0, 64: 100.0}, {1: 2.0, 64: 110.0}, "compiled", 0.469, "batch 64 110 vs 100 ms",
                     id="much-faster-at-1-a-little-slower-at-64"),
        pytest.param({1: 1.0, 64: 10.0}, {1: 1.2, 64: 9.0}, "eager", 1.04, "eager not slower",
                     id="a-little-faster-at-64-slower-at-1"),
        pytest.param({1: 1.0}, {1: 1.0}, "eager", 1.0, "eager not slower", id="tie-keeps-eager"),
        pytest.param({1: 1.0, 64: 10.0}, {1: 0.5}, "compiled", 0.5, "batch 1 0.5 vs 1 ms",
                     id="only-common-batch-sizes-count"),
        pytest.param({1: 1.0}, {64: 0.5}, "eager", None, "no batch size measured for both forms", id="no-overlap"),
        pytest.param({1: 1.0}, None, "eager", None, "could not export", id="no-package"),
    ],
)
def test_build_fastest_form(eager: dict[int, float], compiled: dict[int, float] | None, form: str,
                            ratio: float | None, why: str) -> None:
    got = programs.build_fastest_form(eager, compiled, unavailable="could not export")
    assert got["form"] == form and why in got["why"]
    assert got.get("ratio") == (None if ratio is None else pytest.approx(ratio, rel=1e-2))
    assert got["p50Ms"]["eager"] == {f"batch{b}": v for b, v in sorted(eager.items())}
    json.dumps(got)  # JSON keys are strings: the digest of a manifest holding it is stable across a reload


@pytest.mark.parametrize(
    ("fastest", "compiled", "problem"),
    [
        pytest.param({"cpu": {"form": "compiled", "why": "x"}}, COMPILED, None, id="compiled-with-package"),
        pytest.param({"cpu": {"form": "eager", "why": "x"}}, None, None, id="eager-without-package"),
        pytest.param({"cpu": {"form": "compiled", "why": "x"}}, None, "the model has no compiled package",
                     id="compiled-without-package"),
        pytest.param({"cpu": {"form": "fast"}}, None, "must be {form: eager | compiled", id="unknown-form"),
        pytest.param(["cpu"], None, "fastest: must be an object", id="not-an-object"),
    ],
)
def test_assess_manifest_checks_the_fastest_record(fastest: object, compiled: dict | None,
                                                   problem: str | None) -> None:
    manifest = {"format": 1, "name": "digits", "kind": "factory", "factory": FACTORY, "weights": "w.safetensors",
                **DIGITS_IO, "fastest": fastest, **({"compiled": COMPILED} if compiled else {})}
    problems = [p for p in manifests.assess_manifest(manifest) if p.startswith("fastest")]
    assert problems == [] if problem is None else (len(problems) == 1 and problem in problems[0]), problems


def test_the_fastest_record_and_dropping_the_package(compiled_digits_dir: Path, tmp_path: Path) -> None:
    """The Job's record is covered by the digest; dropping the package removes its file, its `files` entry and a
    record naming it, and the directory still verifies."""
    model = tmp_path / "model"
    shutil.copytree(compiled_digits_dir, model)
    manifest = manifests.load_verified_manifest(model)
    assert manifest["fastest"]["cpu"]["form"] in ("eager", "compiled")
    recorded = store.record_fastest(model, manifest, "cpu:0", {"form": "compiled", "why": "measured"})
    assert manifests.load_verified_manifest(model)["fastest"]["cpu"] == {"form": "compiled", "why": "measured"}
    assert recorded["digest"] != manifest["digest"]
    dropped = store.remove_compiled_package(model, recorded)
    assert "compiled" not in dropped and "fastest" not in dropped and programs.COMPILED_FILE not in dropped["files"]
    assert not (model / programs.COMPILED_FILE).exists()
    assert manifests.load_verified_manifest(model)["digest"] == dropped["digest"]
    with pytest.raises(artifacts.ArtifactError, match="has no compiled package"):
        store.load_model(model, compiled=True)
    assert store.load_model(model).digest == dropped["digest"]
