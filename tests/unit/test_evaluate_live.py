"""`shipyard-runtime evaluate` against the real inference server (`shipyard.runtime.server`, real HTTP on
127.0.0.1) serving digits models built here: a compressed artifact scores what its compression report says, a
model serving wrong answers fails `--min`, agreement and embedding metrics against a reference server, every way
of not being able to measure (exit 2 with a message naming it), a server that is still starting, and the command
line end to end (one line on stdout and in the termination log, the exit code, no traceback).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from shipyard import contract
from shipyard.runtime import cli, datasets, evaluate, liveeval
from shipyard.runtime.artifacts import store as artifacts
from shipyard.runtime.server import settings as server
from tests import serverthread
from tests.modules import load_file

ROOT = Path(__file__).resolve().parents[2]
EVAL_SAMPLES = 450  # builtin:digits' evaluation split

LOADERS = '''
import dataclasses

from shipyard.runtime import datasets


def digits_vectors():
    """The digits as an embedding set: the outputs are compared with the reference's, not with labels."""
    digits = datasets.load_digits()
    return datasets.Dataset("digits-vectors", "embedding", (), None, digits.eval_inputs, None)


def digits_shifted_labels():
    """Labels 10..19: a 10-class model's outputs cannot score them."""
    digits = datasets.load_digits()
    return dataclasses.replace(digits, name="digits-shifted", eval_labels=digits.eval_labels + 10)
'''


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a shared machine OpenMP threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loaders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("loaders")
    (directory / "evalsets.py").write_text(LOADERS)
    sys.path.insert(0, str(directory))
    yield directory
    sys.path.remove(str(directory))
    sys.modules.pop("evalsets", None)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "digits"
    load_file("build_models", ROOT / "examples/models/build_models.py").build_digits(path, hidden=(32, 16), epochs=30)
    return path


@pytest.fixture(scope="module")
def compressed(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`shipyard-runtime compress` (int8 dynamic quantization) of the source: an artifact with its report."""
    work = tmp_path_factory.mktemp("compress")
    config = {
        "source": str(source),
        "output": str(work / "artifacts" / "digits-int8"),
        "steps": [{"quantize": {"scheme": "int8-dynamic"}}],
        "evaluation": {"dataset": "builtin:digits", "maxRelativeAccuracyLoss": 0.05},
        "terminationLog": str(work / "termination-log"),
        "latency": {"batchSizes": [1], "budgetSeconds": 0.02},
        "compiled": {"mode": "off"},  # scoring is under test, not the served form (compiling takes 15-50 s)
    }
    (work / "compression.json").write_text(json.dumps(config))
    code = cli.main(["compress", "--config", str(work / "compression.json")])
    assert code == 0, (work / "termination-log").read_text()
    return work / "artifacts" / "digits-int8"


@pytest.fixture(scope="module")
def degraded(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The source with its output units rotated by one: well-formed logits, wrong answers."""
    loaded = artifacts.load_model(source)
    last = loaded.module[-1]
    with torch.no_grad():
        last.weight.copy_(last.weight.roll(1, dims=0))
        last.bias.copy_(last.bias.roll(1, dims=0))
    manifest = loaded.manifest
    path = tmp_path_factory.mktemp("models") / "digits-degraded"
    artifacts.save_model(loaded.module, path, name="digits", factory=manifest["factory"],
                         factory_kwargs=manifest["factory_kwargs"], inputs=manifest["inputs"],
                         outputs=manifest["outputs"])
    return path


@contextlib.contextmanager
def serving(artifact: Path, *flags: str, port: int = 0) -> Iterator[str]:
    """The real server (artifacts.load_model, batching, OIP over HTTP) for `artifact` as model `digits`."""
    config = server.build_config(
        ["--artifact", str(artifact), "--host", "127.0.0.1", "--port", str(port), "--model-name", "digits",
         "--threads", "1", "--compiled", "off", "--drain-propagation-s", "0", "--grace-period-s", "5", *flags], {}
    )
    thread = serverthread.ServerThread(config).start()
    try:
        thread.wait_ready(60)
        yield f"http://127.0.0.1:{thread.port}"
    finally:
        thread.stop()


@pytest.fixture(scope="module")
def servers(source: Path, compressed: Path, degraded: Path) -> Iterator[dict[str, str]]:
    with contextlib.ExitStack() as stack:
        yield {
            "source": stack.enter_context(serving(source)),
            "compressed": stack.enter_context(serving(compressed)),
            "degraded": stack.enter_context(serving(degraded)),
            "faulty": stack.enter_context(serving(source, "--fault-error-rate", "1")),
            "slow": stack.enter_context(serving(source, "--fault-extra-latency-ms", "1500")),
        }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _config(url: str, **overrides: Any) -> liveeval.EvalConfig:
    return liveeval.EvalConfig(**{"url": url, "model": "digits", "dataset": "builtin:digits", "retries": 1,
                                  "termination_log": None, **overrides})


# ---------------------------------------------------------------------------------------------- measured


def test_a_compressed_artifact_scores_what_its_compression_report_says(
    servers: dict[str, str], compressed: Path
) -> None:
    outcome = liveeval.run_evaluation(_config(servers["compressed"], minimums=(("accuracy", 0.9),)))
    assert outcome.code == contract.EXIT_MEASURED, outcome.line
    pattern = (rf"Evaluated digits at {re.escape(servers['compressed'])}: accuracy (0\.\d{{4}}) on {EVAL_SAMPLES} "
               rf"samples \(15 requests, p50 \d+\.\d ms\) \[value=(.+)\]")
    match = re.fullmatch(pattern, outcome.line)
    assert match, outcome.line
    value = contract.parse_value_field(outcome.line)
    reported = json.loads((compressed / contract.REPORT_FILE).read_text())["accuracy"]["after"]
    assert value is not None and abs(value - reported) <= 1 / EVAL_SAMPLES  # same samples; at most one flips
    assert match.group(1) == f"{value:.4f}"


@pytest.mark.parametrize(
    ("samples", "batch_size", "concurrency", "requests"),
    [
        pytest.param(200, 7, 3, 29, id="200-samples-batches-of-7"),
        pytest.param(1000, 64, 1, 8, id="all-samples-one-at-a-time"),
        pytest.param(5, 32, 4, 1, id="one-request"),
    ],
)
def test_scores_exactly_what_the_model_computes_in_process(
    servers: dict[str, str], source: Path, samples: int, batch_size: int, concurrency: int, requests: int
) -> None:
    config = _config(servers["source"], samples=samples, batch_size=batch_size, concurrency=concurrency)
    outcome = liveeval.run_evaluation(config)
    assert outcome.code == contract.EXIT_MEASURED, outcome.line
    digits = datasets.load_digits()
    count = min(samples, EVAL_SAMPLES)
    outputs = evaluate.query_outputs(artifacts.load_model(source).module, [digits.eval_inputs[0][:count]])
    assert contract.parse_value_field(outcome.line) == evaluate.evaluate_accuracy(outputs, digits.eval_labels[:count])
    assert f" on {count} samples ({requests} requests, " in outcome.line


def test_a_model_serving_wrong_answers_fails_the_minimum(servers: dict[str, str]) -> None:
    outcome = liveeval.run_evaluation(_config(servers["degraded"], minimums=(("accuracy", 0.9),)))
    assert outcome.code == contract.EXIT_FAILED, outcome.line
    value = contract.parse_value_field(outcome.line)
    assert value is not None and value < 0.2
    assert f"; below the minimum: accuracy {value:.4f} < 0.9 [value=" in outcome.line


@pytest.mark.parametrize(
    ("candidate", "minimums", "code", "agreement"),
    [
        pytest.param("compressed", (("agreement", 0.95),), contract.EXIT_MEASURED, (0.95, 1.0), id="int8-agrees"),
        pytest.param("degraded", (("agreement", 0.95),), contract.EXIT_FAILED, (0.0, 0.2), id="wrong-disagrees"),
    ],
)
def test_classification_reports_agreement_with_the_reference(
    servers: dict[str, str], candidate: str, minimums: tuple[tuple[str, float], ...], code: int,
    agreement: tuple[float, float],
) -> None:
    config = _config(servers[candidate], reference_url=servers["source"], minimums=minimums)
    outcome = liveeval.run_evaluation(config)
    assert outcome.code == code, outcome.line
    match = re.search(r": accuracy (\S+), agreement (\S+) on 450 samples", outcome.line)
    assert match, outcome.line
    assert agreement[0] <= float(match.group(2)) <= agreement[1]
    assert f" against {servers['source']}: " in outcome.line
    assert contract.parse_value_field(outcome.line) == pytest.approx(float(match.group(1)), abs=5e-5)  # accuracy


@pytest.mark.parametrize(
    ("candidate", "code", "cosine"),
    [
        pytest.param("source", contract.EXIT_MEASURED, (0.99999, 1.00001), id="same-model"),
        pytest.param("compressed", contract.EXIT_MEASURED, (0.99, 1.00001), id="int8"),
        pytest.param("degraded", contract.EXIT_FAILED, (-1.0, 0.9), id="wrong-answers"),
    ],
)
def test_an_embedding_dataset_is_scored_against_the_reference(
    servers: dict[str, str], loaders: Path, candidate: str, code: int, cosine: tuple[float, float]
) -> None:
    config = _config(servers[candidate], dataset="evalsets:digits_vectors", reference_url=servers["source"],
                     minimums=(("cosine", 0.99),))
    outcome = liveeval.run_evaluation(config)
    assert outcome.code == code, outcome.line
    value = contract.parse_value_field(outcome.line)
    assert value is not None and cosine[0] <= value <= cosine[1]
    assert re.search(r": cosine \S+, nn_agreement \S+ on 450 samples", outcome.line), outcome.line


# ------------------------------------------------------------------------------------------ not measured

NOT_MEASURED = [
    pytest.param("unreachable", {}, "could not connect to http://127.0.0.1:{port}: ConnectionRefusedError: "
                 "Connection refused (2 attempts)", id="unreachable"),
    pytest.param("source", {"reference_url": "unreachable"}, "could not connect to http://127.0.0.1:{port}",
                 id="reference-unreachable"),
    pytest.param("source", {"model": "mnist"}, "model metadata at {url}: HTTP 404: unknown model 'mnist'; this server "
                 "serves 'digits'", id="unknown-model"),
    pytest.param("faulty", {}, "inference at {url}: HTTP 500: injected fault (fault injection is on)",
                 id="http-500"),
    pytest.param("slow", {"timeout_s": 0.3}, "inference at {url}: no answer within 0.3 s", id="timeout"),
    pytest.param("source", {"max_response_bytes": 1024}, "inference at {url}: the response of ", id="too-large"),
    pytest.param("source", {"dataset": "builtin:sentence-fidelity", "reference_url": "source"},
                 "dataset 'sentence-fidelity' does not fit the inputs of model 'digits' at {url}: eval_inputs: 2 "
                 "tensor(s) for the model's 1 input(s) (input)",
                 id="dataset-does-not-fit-the-inputs"),
    pytest.param("source", {"dataset": "evalsets:digits_shifted_labels"}, "the outputs of model 'digits' do not fit "
                 "the classification dataset 'digits-shifted': outputs of shape [450, 10] have 10 classes, the labels "
                 "go up to 19", id="outputs-do-not-fit-the-labels"),
    pytest.param("source", {"dataset": "evalsets:digits_vectors"}, "embedding datasets compare the candidate's "
                 "outputs with the reference's: pass --reference-url", id="embedding-without-reference"),
    pytest.param("source", {"minimums": (("auc", 0.9),)}, "--min auc: not a metric of classification datasets "
                 "(metrics: accuracy, agreement)", id="metric-of-another-task"),
    pytest.param("source", {"dataset": "evalsets:nothing"}, "dataset loader 'evalsets:nothing' cannot be imported",
                 id="loader-missing"),
]


@pytest.mark.parametrize(("target", "overrides", "message"), NOT_MEASURED)
def test_what_cannot_be_measured_exits_2_naming_it(
    servers: dict[str, str], loaders: Path, target: str, overrides: dict[str, Any], message: str
) -> None:
    port = _free_port()
    urls = {**servers, "unreachable": f"http://127.0.0.1:{port}"}
    overrides = {k: urls[v] if k == "reference_url" else v for k, v in overrides.items()}
    outcome = liveeval.run_evaluation(_config(urls[target], **overrides))
    assert outcome.code == 2
    dataset = overrides.get("dataset", "builtin:digits")
    assert outcome.line.startswith(f"Could not evaluate {dataset} at {urls[target]}: ")
    assert message.format(port=port, url=urls[target]) in outcome.line
    assert contract.parse_value_field(outcome.line) is None and "\n" not in outcome.line


def test_a_server_that_is_still_starting_is_waited_for(compressed: Path) -> None:
    port = _free_port()
    started: list[str] = []
    stop = threading.Event()

    def start_late() -> None:
        time.sleep(0.7)  # the evaluation's attempts at 0, 0.2 and 0.6 s are refused; the one at 1.4 s connects
        with serving(compressed, port=port) as url:
            started.append(url)
            stop.wait(60)

    thread = threading.Thread(target=start_late, daemon=True)
    thread.start()
    try:
        outcome = liveeval.run_evaluation(_config(f"http://127.0.0.1:{port}", retries=6))
    finally:
        stop.set()
        thread.join(30)
    assert started and outcome.code == contract.EXIT_MEASURED, outcome.line
    assert re.search(r"p50 \d+\.\d ms, [1-6] connection retr(y|ies)\)", outcome.line), outcome.line


# ------------------------------------------------------------------------------------------ command line


def test_main_prints_one_line_and_writes_the_termination_log(
    servers: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "termination-log"
    code = cli.main(["evaluate", "--url", servers["source"], "--model", "digits", "--dataset", "builtin:digits",
                     "--min", "accuracy=0.9", "--termination-log", str(log)])
    out = capsys.readouterr().out
    assert code == contract.EXIT_MEASURED, out
    assert out.count("\n") == 1 and out.startswith("Evaluated digits at ")
    assert log.read_text() == out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--dataset", "builtin:digits"], "Could not evaluate: no endpoint: pass --url or set "
                     "SHIPYARD_ENDPOINT", id="no-url"),
        pytest.param(["--url", "http://a:b@h", "--model", "m", "--dataset", "d"], "Could not evaluate: --url: "
                     "http://h: credentials in the URL are not supported", id="credentials"),
    ],
)
def test_main_reports_bad_settings_in_the_termination_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str],
    message: str,
) -> None:
    monkeypatch.delenv(contract.ENV_ENDPOINT, raising=False)
    log = tmp_path / "termination-log"
    assert liveeval.main([*argv, "--termination-log", str(log)]) == 2
    assert capsys.readouterr().out == f"{message}\n" == log.read_text()


def test_main_turns_an_unexpected_error_into_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(config: liveeval.EvalConfig) -> liveeval.Outcome:
        raise RuntimeError("shape mismatch in a user's loader")

    monkeypatch.setattr(liveeval, "run_evaluation", broken)
    log = tmp_path / "termination-log"
    code = liveeval.main(["--url", "http://h", "--model", "m", "--dataset", "d", "--termination-log", str(log)])
    line = "Could not evaluate d: unexpected RuntimeError: shape mismatch in a user's loader\n"
    assert code == 2 and capsys.readouterr().out == line == log.read_text()
    assert "Traceback" in caplog.text  # for whoever debugs it, in the log, not in the outcome


def test_usage_lists_the_subcommand_and_its_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.SUBCOMMANDS[contract.EVALUATE_SUBCOMMAND][0] == "shipyard.runtime.liveeval"
    assert cli.main(["--help"]) == 0
    assert "  evaluate   Score a live OIP v2 endpoint" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        cli.main(["evaluate", "--help"])
    assert exited.value.code == 0
    usage = capsys.readouterr().out
    for flag in ("--url", "--model", "--dataset", "--samples", "--batch-size", "--reference-url", "--min",
                 "--timeout", "--termination-log", "--concurrency", "SHIPYARD_ENDPOINT", "SHIPYARD_MODEL_NAME",
                 "SHIPYARD_REFERENCE_ENDPOINT"):
        assert flag in usage


@pytest.mark.parametrize(
    ("target", "extra", "code"),
    [
        pytest.param("degraded", ["--min", "accuracy=0.9"], contract.EXIT_FAILED, id="wrong-answers-exit-1"),
        pytest.param("unreachable", ["--retries", "0"], 2, id="unreachable-exit-2"),
    ],
)
def test_the_command_in_its_own_process(
    servers: dict[str, str], tmp_path: Path, target: str, extra: list[str], code: int
) -> None:
    """As a Job runs it: endpoint and model from the environment, one line out, the exit code, no traceback."""
    url = servers.get(target, f"http://127.0.0.1:{_free_port()}")
    log = tmp_path / "termination-log"
    env = {**os.environ, contract.ENV_ENDPOINT: url, contract.ENV_MODEL_NAME: "digits", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "contract"), str(ROOT / "runtime"), str(ROOT)])}
    result = subprocess.run(
        [sys.executable, "-m", "shipyard.runtime.cli", "evaluate", "--dataset", "builtin:digits",
         "--termination-log", str(log), *extra],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == code, result.stderr
    assert result.stdout.count("\n") == 1 and result.stdout == log.read_text()
    assert "Traceback" not in result.stderr
    assert (contract.parse_value_field(result.stdout) is None) == (code == 2)
    assert result.stdout.startswith(f"Evaluated digits at {url}" if code != 2 else f"Could not evaluate builtin:digits "
                                    f"at {url}: could not connect")
