"""End-to-end tests of `shipyard-runtime compress` on a tiny digits model: accept, reject, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from shipyard.runtime import artifacts, cli, compress
from shipyard.runtime.artifacts import manifests, programs, store
from tests.modules import load_file
from tests.pickle_payloads import hostile_weights

ROOT = Path(__file__).resolve().parents[2]
FAST_LATENCY = {"batchSizes": [1, 8], "budgetSeconds": 0.02}
EAGER_ONLY = {"mode": "off"}


def _examples() -> object:
    return load_file("build_models", ROOT / "examples/models/build_models.py")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> object:
    """Tiny models gain nothing from threads, and on a shared machine OpenMP threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "digits"
    _examples().build_digits(path, hidden=(32, 16), epochs=30)
    return path


def _run(tmp_path: Path, source: Path, steps: list, *, tolerance: float = 0.01, **extra: object) -> tuple[int, Path]:
    config = {
        "source": str(source),
        "output": str(tmp_path / "artifacts" / "digits-1"),
        "steps": steps,
        "evaluation": {"dataset": "builtin:digits", "maxRelativeAccuracyLoss": tolerance},
        "terminationLog": str(tmp_path / "termination-log"),
        "latency": FAST_LATENCY,
        "compiled": EAGER_ONLY,  # the package (the default) is built once per session: conftest's compiled_digits_dir
        **extra,
    }
    (tmp_path / "compression.json").write_text(json.dumps(config))
    return cli.main(["compress", "--config", str(tmp_path / "compression.json")]), tmp_path / "artifacts" / "digits-1"


def _termination(tmp_path: Path) -> str:
    return (tmp_path / "termination-log").read_text()


def test_the_default_builds_the_package_measures_both_forms_and_records_the_faster(compiled_digits_dir: Path) -> None:
    """compiled.mode auto (the default): the artifact carries the package (in its digest), gated like the eager
    model; both forms are timed with the source in the same rounds, the faster is recorded in the manifest (what the
    server reads) and the report, and the summary line gives the served form's latency; the compile is timed apart."""
    report = json.loads((compiled_digits_dir / "report.json").read_text())
    manifest = manifests.load_verified_manifest(compiled_digits_dir)
    assert report["status"] == "accepted" and report["digest"] == manifest["digest"]
    compiled = report["compiled"]
    assert compiled["file"] == manifest["compiled"]["file"] and compiled["file"] in manifest["files"]
    assert manifest["compiled"]["maxBatchSize"] == 128 and manifest["compiled"]["torch"] == torch.__version__
    assert manifest["compiled"]["maxAutotune"] is False  # never by default: minutes on a cold compile cache
    assert compiled["bytes"] == (compiled_digits_dir / compiled["file"]).stat().st_size > 0
    assert abs(compiled["metrics"]["accuracy"] - report["accuracy"]["after"]) < 0.01 and compiled["kept"] is True
    assert set(compiled["latency"]) == set(compiled["speedupP50"]) == {"batch1", "batch8"}
    assert report["weightsBytes"]["after"] == (compiled_digits_dir / manifest["weights"]).stat().st_size
    # the choice: recorded in the manifest (covered by the digest) and in the report, with both forms' figures
    served, fastest = report["served"], manifest["fastest"]["cpu"]
    assert served["device"] == "cpu" and served["form"] == fastest["form"] == report["latency"]["form"]
    assert fastest["p50Ms"]["compiled"]["batch1"] == compiled["latency"]["batch1"]["p50_ms"]
    assert served["latency"][served["form"]] == report["latency"]["after"]
    assert set(served["latency"]) == {"eager", "compiled"}
    assert served["form"] == programs.build_fastest_form(
        {int(k.removeprefix("batch")): v for k, v in fastest["p50Ms"]["eager"].items()},
        {int(k.removeprefix("batch")): v for k, v in fastest["p50Ms"]["compiled"].items()})["form"]
    # torchao's int8 in eager mode is slower than the package on this MLP by far
    assert served["form"] == "compiled", served["why"]
    assert report["durations"]["compile"] > 0 and compiled["compileSeconds"] == report["durations"]["compile"]
    line = compress.report.build_summary_line(report)
    after = report["latency"]["after"]["batch1"]["p50_ms"]
    assert f"-> {after:.3f} ms" in line and "served AOTInductor package, eager " in line


def _fail_to_compile(*args: object, **kwargs: object) -> dict:
    raise artifacts.ArtifactError("AOTInductor compilation failed: Unsupported: data-dependent control flow")


@pytest.mark.parametrize(("mode", "accepted"), [pytest.param("auto", True, id="auto-serves-eager"),
                                                pytest.param("on", False, id="on-fails-the-job")])
def test_a_model_that_cannot_be_compiled(tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch,
                                         mode: str, accepted: bool) -> None:
    """auto: a package that cannot be built leaves the eager model, with the reason recorded and no partial file;
    on: the Job fails naming it."""
    monkeypatch.setattr(programs, "write_compiled_package", _fail_to_compile)
    code, output = _run(tmp_path, source, [{"quantize": {"scheme": "int8-dynamic"}}], tolerance=0.05,
                        compiled={"mode": mode})
    if not accepted:
        assert code == 1 and not output.exists()
        assert "compiled.mode on: AOTInductor compilation failed: Unsupported" in _termination(tmp_path)
        return
    assert code == 0, _termination(tmp_path)
    manifest = manifests.load_verified_manifest(output)
    report = json.loads((output / "report.json").read_text())
    assert "compiled" not in manifest and sorted(p.name for p in output.iterdir()) == sorted(
        [manifests.MANIFEST_FILE, manifest["weights"], "report.json"])
    assert manifest["fastest"]["cpu"]["form"] == report["served"]["form"] == "eager"
    assert "data-dependent control flow" in manifest["fastest"]["cpu"]["why"]
    assert report["compiled"] is None and report["latency"]["form"] == "eager"
    assert "served eager" in _termination(tmp_path)


def test_a_package_that_fails_the_gate_is_dropped_with_mode_auto(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The package is a second form of the same weights; when it fails the gate (auto), it is removed and the eager
    model, which passed, is served."""

    def fake_package(directory: Path, manifest: dict, *args: object, **kwargs: object) -> dict:
        (directory / programs.COMPILED_FILE).write_bytes(b"package")
        updated = {k: v for k, v in manifest.items() if k != "digest"}
        sha, size = manifests.fetch_file_sha256(directory / programs.COMPILED_FILE)
        updated["files"] = {**manifest["files"], programs.COMPILED_FILE: {"sha256": sha, "bytes": size}}
        updated["compiled"] = {"file": programs.COMPILED_FILE, "format": "aotinductor", "device": "cpu",
                               "torch": torch.__version__, "maxBatchSize": 8, "maxAutotune": False}
        return store._finish_manifest(directory, updated)

    class Broken:
        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(x.shape[0], 10)

    real_load = store.load_model

    def load(path: object, **kwargs: object) -> object:
        if kwargs.pop("compiled", False):
            loaded = real_load(path, **kwargs)
            return store.LoadedModel(Broken(), loaded.manifest, loaded.inputs, loaded.outputs, loaded.digest,
                                     loaded.path)
        return real_load(path, **kwargs)

    monkeypatch.setattr(store, "add_compiled_package", fake_package)
    monkeypatch.setattr(store, "load_model", load)
    code, output = _run(tmp_path, source, [{"quantize": {"scheme": "int8-dynamic"}}], tolerance=0.05,
                        compiled={"mode": "auto"})
    assert code == 0, _termination(tmp_path)
    manifest = manifests.load_verified_manifest(output)
    report = json.loads((output / "report.json").read_text())
    assert "compiled" not in manifest and not (output / programs.COMPILED_FILE).exists()
    assert report["compiled"]["kept"] is False and report["served"]["form"] == "eager"
    assert "the package failed the gate: accuracy" in manifest["fastest"]["cpu"]["why"]
    assert all("(compiled)" not in c["metric"] for c in report["gate"]["checks"])


def test_mode_off_builds_no_package_and_records_no_choice(tmp_path: Path, source: Path) -> None:
    code, output = _run(tmp_path, source, [{"quantize": {"scheme": "int8-dynamic"}}], tolerance=0.05)
    assert code == 0, _termination(tmp_path)
    manifest = manifests.load_verified_manifest(output)
    report = json.loads((output / "report.json").read_text())
    assert "compiled" not in manifest and "fastest" not in manifest  # the digest stays reproducible
    assert report["served"]["form"] == "eager" and report["served"]["why"] == "compiled.mode off"
    assert "compile" not in report["durations"]


def test_accepted_artifact_with_report_digest_and_tensorboard(
    tmp_path: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    steps = [{"prune": {"amount": 0.5, "fineTuneEpochs": 2}}, {"quantize": {"scheme": "int8-dynamic"}}]
    code, output = _run(tmp_path, source, steps, tolerance=0.05, logDir=str(tmp_path / "tb"))
    assert code == 0, _termination(tmp_path)
    printed = json.loads(capsys.readouterr().out)
    stored = json.loads((output / "report.json").read_text())
    assert printed == stored and stored["status"] == "accepted"
    loaded = store.load_model(output)
    assert stored["digest"] == loaded.digest
    assert stored["bytes"]["after"] < stored["bytes"]["before"] / 3
    weights, manifest_file = output / loaded.manifest["weights"], output / manifests.MANIFEST_FILE
    assert stored["weightsBytes"] == stored["bytes"] and stored["bytes"]["after"] == weights.stat().st_size
    assert stored["artifactBytes"]["after"] == weights.stat().st_size + manifest_file.stat().st_size
    source_files = source / manifests.MANIFEST_FILE, source / manifests.load_manifest(source)["weights"]
    assert stored["artifactBytes"]["before"] == sum(f.stat().st_size for f in source_files)
    assert [s["kind"] for s in stored["steps"]] == ["prune", "quantize"]
    assert stored["steps"][0]["params"] == {
        "amount": 0.5,
        "scope": "global",
        "fineTuneEpochs": 2,
        "lr": 0.001,
        "batchSize": 64,
    }
    assert stored["steps"][0]["details"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert (
        set(stored["latency"]["before"]) == {"batch1", "batch8"} and stored["latency"]["after"]["batch8"]["p50_ms"] > 0
    )
    assert set(stored["durations"]) >= {"loadSource", "evaluateSource", "steps", "save", "evaluateResult", "total"}
    assert loaded.manifest["encoding"] == "safetensors+zstd"
    assert loaded.manifest["quantization"][0]["scheme"] == "int8-dynamic"
    line = _termination(tmp_path)
    assert line.startswith("Compressed digits: ") and loaded.digest in line and line.count("\n") == 1
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["digits-1"]


def test_gate_rejects_an_over_pruned_candidate_with_the_numbers(
    tmp_path: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, output = _run(tmp_path, source, [{"prune": {"amount": 0.98}}], tolerance=0.01)
    assert code == 1
    body = json.loads(capsys.readouterr().out)
    assert body["status"] == "rejected" and body["digest"] is None and body["output"] is None
    check = body["gate"]["checks"][0]
    assert check["metric"] == "accuracy" and not check["passed"]
    assert check["after"] < check["before"] * 0.9  # really over-pruned, not a rounding accident
    line = _termination(tmp_path)
    assert line.startswith(
        f"Rejected digits: accuracy failed the gate: accuracy {check['before']:.4f} -> {check['after']:.4f} "
        f"(relative loss {check['relativeLoss']:.2%} > tolerance 1.00%)"
    )
    assert not output.exists()
    assert list((tmp_path / "artifacts").iterdir()) == []  # no staging directory left behind


def test_structured_prune_and_distillation_chain(tmp_path: Path, source: Path) -> None:
    steps = [
        {
            "distill": {
                "student": "shipyard.runtime.models:build_digits_mlp",
                "studentKwargs": {"hidden": [24]},
                "epochs": 15,
                "lr": 0.005,
                "temperature": 4,
                "alpha": 0.7,
            }
        },
        {"prune": {"amount": 0.25, "scope": "structured", "norm": 1, "fineTuneEpochs": 3, "lr": 0.003}},
        {"quantize": {"scheme": "int8-weight-only"}},
    ]
    code, output = _run(tmp_path, source, steps, tolerance=0.05)
    assert code == 0, _termination(tmp_path)
    report = json.loads((output / "report.json").read_text())
    manifest = store.load_model(output).manifest
    assert manifest["factory_kwargs"] == {"hidden": [24]}
    assert manifest["structure"]["0"]["out_features"] == 18
    assert report["steps"][0]["details"]["losses"][-1] < report["steps"][0]["details"]["losses"][0]
    assert report["steps"][1]["details"]["layers"] == {"0": [24, 18]}
    assert report["parameters"] == {"before": 2778, "after": 64 * 18 + 18 + 18 * 10 + 10}


def _break_weights(source: Path, target: Path) -> None:
    shutil.copytree(source, target)
    manifest = json.loads((target / manifests.MANIFEST_FILE).read_text())
    (target / manifest["weights"]).unlink()


def _flip_byte(source: Path, target: Path) -> None:
    shutil.copytree(source, target)
    manifest = json.loads((target / manifests.MANIFEST_FILE).read_text())
    weights = target / manifest["weights"]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))


def _pickle_instead_of_weights(source: Path, target: Path) -> None:
    """A source directory whose manifest is fine but whose weights are a pickle that creates a file."""
    target.mkdir(parents=True)
    manifest = json.loads((source / manifests.MANIFEST_FILE).read_text())
    for key in ("files", "digest"):
        manifest.pop(key)
    (target / manifest["weights"]).write_bytes(hostile_weights(target.parent / "pwned", via_torch_save=True))
    (target / manifests.MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("prepare", "steps", "extra", "code", "message"),
    [
        pytest.param(
            None,
            [{"sparsify": {"amount": 0.5}}],
            {},
            2,
            "steps[0].sparsify: unknown field (known: distill, prune, quantize)",
            id="unknown-step",
        ),
        pytest.param(
            None,
            [{"prune": {"amount": 1.5}}],
            {},
            2,
            "steps[0].prune.amount: Input should be less than 1, got 1.5",
            id="bad-parameter",
        ),
        pytest.param(
            _break_weights,
            [{"quantize": {"scheme": "int8-dynamic"}}],
            {},
            1,
            "weights.safetensors listed in the manifest is missing",
            id="missing-weights",
        ),
        pytest.param(
            _flip_byte, [{"quantize": {"scheme": "int8-dynamic"}}], {}, 1, "digest mismatch", id="wrong-digest"
        ),
        pytest.param(
            _pickle_instead_of_weights,
            [{"quantize": {"scheme": "int8-dynamic"}}],
            {},
            1,
            "refused to load: the file is a pickle",
            id="pickled-payload",
        ),
        pytest.param(
            None,
            [{"quantize": {"scheme": "fp8"}}],
            {},
            1,
            "steps[0].quantize.scheme: 'fp8' needs a CUDA GPU",
            id="cuda-scheme-on-cpu",
        ),
        pytest.param(
            None,
            [{"quantize": {"scheme": "int4-weight-only"}}],
            {},
            1,
            "'int4-weight-only' needs a CUDA GPU",
            id="int4-on-cpu",
        ),
        pytest.param(
            None,
            [{"quantize": {"scheme": "int8-embedding"}}],
            {},
            1,
            "steps[0].quantize: quantization scheme 'int8-embedding' found no nn.Embedding layer",
            id="nothing-to-quantize",
        ),
        pytest.param(
            None,
            [{"distill": {"student": "no_such_module:build"}}],
            {},
            1,
            "steps[0].distill: distill student: factory 'no_such_module:build' cannot be imported",
            id="unknown-student",
        ),
        pytest.param(
            None,
            [{"prune": {"amount": 0.5}}],
            {"evaluation": {"dataset": "builtin:imagenet"}},
            1,
            "unknown built-in dataset 'builtin:imagenet'",
            id="unknown-dataset",
        ),
    ],
)
def test_bad_input_fails_clearly_without_artifact(
    tmp_path: Path, source: Path, prepare, steps: list, extra: dict, code: int, message: str
) -> None:
    if "CUDA" in message and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model_dir = source
    if prepare is not None:
        model_dir = tmp_path / "models" / "broken"
        prepare(source, model_dir)
    config_extra = dict(extra)
    evaluation = config_extra.pop("evaluation", None)
    got, output = _run(tmp_path, model_dir, steps, **config_extra)
    if evaluation is not None:
        config = json.loads((tmp_path / "compression.json").read_text())
        config["evaluation"] = evaluation
        (tmp_path / "compression.json").write_text(json.dumps(config))
        got = cli.main(["compress", "--config", str(tmp_path / "compression.json")])
    assert got == code
    line = _termination(tmp_path)
    assert message in line and line.startswith("Failed: ")
    assert not output.exists() and not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").iterdir())
    assert not (tmp_path / "models" / "pwned").exists()


def test_existing_output_is_not_replaced(tmp_path: Path, source: Path) -> None:
    (tmp_path / "artifacts" / "digits-1").mkdir(parents=True)
    (tmp_path / "artifacts" / "digits-1" / "keep").write_text("x")
    code, output = _run(tmp_path, source, [{"quantize": {"scheme": "int8-dynamic"}}])
    assert code == 1 and "already exists" in _termination(tmp_path)
    assert (output / "keep").read_text() == "x"


def test_an_existing_artifact_of_the_same_recipe_is_verified_and_reused(tmp_path: Path, source: Path) -> None:
    """The operator's Job for a key whose artifact is already on the volume (a re-created ModelDeployment)."""
    steps = [{"quantize": {"scheme": "int8-dynamic"}}]
    code, output = _run(tmp_path, source, steps, reuseExisting=True)
    assert code == 0
    first = json.loads((output / "report.json").read_text())
    stamps = {p.name: p.stat().st_mtime_ns for p in output.iterdir()}
    (tmp_path / "termination-log").unlink()
    code, _ = _run(tmp_path, source, steps, reuseExisting=True)
    assert code == 0 and _termination(tmp_path).startswith("Compressed digits")
    assert f"digest {first['digest']}" in _termination(tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in output.iterdir()} == stamps  # untouched, nothing recompressed


@pytest.mark.parametrize(("change", "message"), [
    pytest.param({"seed": 1}, "another recipe or source", id="other-recipe"),
    pytest.param({"break": "weights"}, "digest", id="tampered-file"),
    pytest.param({"break": "report"}, "no readable report.json", id="no-report"),
])
def test_an_existing_artifact_that_is_not_the_same_is_refused_and_kept(
    tmp_path: Path, source: Path, change: dict, message: str
) -> None:
    steps = [{"quantize": {"scheme": "int8-dynamic"}}]
    code, output = _run(tmp_path, source, steps, reuseExisting=True)
    assert code == 0
    extra = {k: v for k, v in change.items() if k != "break"}
    if change.get("break") == "weights":
        weights = next(p for p in output.iterdir() if p.name.startswith("weights"))
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif change.get("break") == "report":
        (output / "report.json").unlink()
    before = sorted(p.name for p in output.iterdir())
    code, _ = _run(tmp_path, source, steps, reuseExisting=True, **extra)
    assert code == 1 and message in _termination(tmp_path) and _termination(tmp_path).startswith("Failed: ")
    assert sorted(p.name for p in output.iterdir()) == before


def test_termination_log_is_skipped_when_its_directory_is_absent(tmp_path: Path) -> None:
    compress.apply_termination_log(str(tmp_path / "absent" / "termination-log"), "x")
    assert not (tmp_path / "absent").exists()
    compress.apply_termination_log(str(tmp_path / "termination-log"), "Compressed\nx")
    assert (tmp_path / "termination-log").read_text() == "Compressed x\n"


def test_missing_config_file_exits_2_and_uses_the_default_termination_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shipyard import contract

    monkeypatch.setattr(contract, "TERMINATION_LOG", str(tmp_path / "termination-log"))
    assert cli.main(["compress", "--config", str(tmp_path / "absent.json")]) == 2
    assert _termination(tmp_path).startswith("Failed: invalid compression config: config file ")
