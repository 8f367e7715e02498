"""`shipyard-runtime serve`: flags over the operator's environment, route templates, and the real command
serving a real model directory (store.save_model) end to end in a subprocess."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from shipyard import contract
from shipyard.runtime import models
from shipyard.runtime.artifacts import manifests, store
from shipyard.runtime.server import endpoints, lifecycle, loading, settings
from tests import serverthread
from tests.pickle_payloads import hostile_weights

ENV = {
    contract.ENV_ARTIFACT_PATH: "/artifacts/digits-abc",
    contract.ENV_MODEL_NAME: "digits",
    contract.ENV_MODEL_VERSION: "1.4.0",
    contract.ENV_MAX_BATCH_SIZE: "16",
    contract.ENV_MAX_DELAY_MS: "2.5",
    contract.ENV_FAULT_ERROR_RATE: "0.25",
    contract.ENV_FAULT_EXTRA_LATENCY_MS: "40",
}

CONFIGS = [
    pytest.param(
        [],
        ENV,
        {
            "artifact": "/artifacts/digits-abc",
            "model_name": "digits",
            "model_version": "1.4.0",
            "max_batch_size": 16,
            "max_delay_ms": 2.5,
            "fault_error_rate": 0.25,
            "fault_extra_latency_ms": 40.0,
            "port": 8080,
            "host": "0.0.0.0",
        },
        id="from-env",
    ),
    pytest.param(
        [
            "--artifact",
            "/m/x",
            "--model-name",
            "other",
            "--model-version",
            "9",
            "--max-batch-size",
            "4",
            "--max-delay-ms",
            "0",
            "--fault-error-rate",
            "0",
            "--fault-extra-latency-ms",
            "0",
            "--port",
            "9000",
        ],
        ENV,
        {
            "artifact": "/m/x",
            "model_name": "other",
            "model_version": "9",
            "max_batch_size": 4,
            "max_delay_ms": 0.0,
            "fault_error_rate": 0.0,
            "fault_extra_latency_ms": 0.0,
            "port": 9000,
        },
        id="flags-override-env",
    ),
    pytest.param(
        ["--artifact", "/models/resnet/"],
        {},
        {
            "model_name": "resnet",
            "model_version": "unknown",
            "max_batch_size": 32,
            "max_delay_ms": 5.0,
            "fault_error_rate": 0.0,
            "device": "auto",
            "dtype": "float32",
            "compile": False,
        },
        id="defaults",
    ),
    pytest.param(
        [
            "--artifact",
            "/m/x",
            "--device",
            "cuda:1",
            "--dtype",
            "bf16",
            "--compile",
            "--compile-mode",
            "reduce-overhead",
            "--threads",
            "2",
            "--max-queue",
            "64",
            "--max-payload-bytes",
            "2048",
            "--request-timeout-s",
            "3",
            "--drain-propagation-s",
            "7",
            "--grace-period-s",
            "45",
        ],
        {},
        {
            "device": "cuda:1",
            "dtype": "bf16",
            "compile": True,
            "compile_mode": "reduce-overhead",
            "threads": 2,
            "max_queue": 64,
            "max_payload_bytes": 2048,
            "request_timeout_s": 3.0,
            "drain_propagation_s": 7.0,
            "grace_period_s": 45.0,
        },
        id="serving-flags",
    ),
    pytest.param([], {**ENV, contract.ENV_MAX_BATCH_SIZE: " "}, {"max_batch_size": 32}, id="blank-env-is-default"),
    pytest.param([], ENV, {"compiled": "auto"}, id="compiled-package-when-it-fits-by-default"),
    pytest.param(["--compiled", "off"], ENV, {"compiled": "off"}, id="compiled-off"),
    pytest.param([], ENV, {"batch_sizing": "measured"}, id="batches-sized-by-measurement-by-default"),
    pytest.param(["--batch-sizing", "max"], ENV, {"batch_sizing": "max"}, id="batch-sizing-max"),
    pytest.param([], ENV, {"grpc_port": None}, id="grpc-off-by-default"),
    pytest.param(["--grpc-port", "8081"], ENV, {"grpc_port": 8081, "port": 8080}, id="grpc-port"),
]


@pytest.mark.parametrize(("argv", "env", "expected"), CONFIGS)
def test_build_config(argv: list[str], env: dict[str, str], expected: dict[str, Any]) -> None:
    config = settings.build_config(argv, env)
    assert {key: getattr(config, key) for key in expected} == expected


BAD_CONFIGS = [
    pytest.param([], {}, "no artifact", id="no-artifact"),
    pytest.param([], {**ENV, contract.ENV_MAX_BATCH_SIZE: "lots"}, "SHIPYARD_MAX_BATCH_SIZE", id="env-not-int"),
    pytest.param([], {**ENV, contract.ENV_MAX_BATCH_SIZE: "0"}, "max batch size", id="zero-batch"),
    pytest.param([], {**ENV, contract.ENV_MAX_DELAY_MS: "-1"}, "max delay", id="negative-delay"),
    pytest.param([], {**ENV, contract.ENV_FAULT_ERROR_RATE: "1.5"}, "within 0..1", id="rate-above-one"),
    pytest.param([], {**ENV, contract.ENV_FAULT_EXTRA_LATENCY_MS: "-5"}, "extra latency", id="negative-latency"),
    pytest.param(["--max-queue", "0"], ENV, "--max-queue", id="zero-queue"),
    pytest.param(["--grace-period-s", "0"], ENV, "--grace-period-s", id="zero-grace"),
    pytest.param(["--port", "70000"], ENV, "--port", id="bad-port"),
    pytest.param(["--grpc-port", "-1"], ENV, "--grpc-port must be within", id="bad-grpc-port"),
    pytest.param(["--grpc-port", "8080"], ENV, "--grpc-port must differ", id="grpc-port-is-the-http-port"),
    pytest.param(["--model-name", "a/b"], ENV, "model name", id="slash-in-name"),
]


@pytest.mark.parametrize(("argv", "env", "message"), BAD_CONFIGS)
def test_build_config_names_the_bad_setting(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(settings.ConfigError, match=message):
        settings.build_config(argv, env)


ROUTES = [
    pytest.param("/v2/health/live", ("/v2/health/live", "live", None, None), id="live"),
    pytest.param("/v2/health/ready/", ("/v2/health/ready", "ready", None, None), id="ready-trailing-slash"),
    pytest.param("/metrics", ("/metrics", "metrics", None, None), id="metrics"),
    pytest.param("/v2", ("/v2", "server_meta", None, None), id="server-meta"),
    pytest.param("/v2/models/digits", ("/v2/models/{name}", "model_meta", "digits", None), id="model-meta"),
    pytest.param("/v2/models/digits/ready", ("/v2/models/{name}/ready", "model_ready", "digits", None), id="ready"),
    pytest.param("/v2/models/digits/infer", ("/v2/models/{name}/infer", "infer", "digits", None), id="infer"),
    pytest.param("/v2/models/a%20b/infer", ("/v2/models/{name}/infer", "infer", "a b", None), id="escaped-name"),
    pytest.param(
        "/v2/models/d/versions/2/infer",
        ("/v2/models/{name}/versions/{version}/infer", "infer", "d", "2"),
        id="versioned-infer",
    ),
    pytest.param(
        "/v2/models/d/versions/2", ("/v2/models/{name}/versions/{version}", "model_meta", "d", "2"), id="versioned-meta"
    ),
    pytest.param("/v2/models/d/explain", ("unmatched", "unmatched", None, None), id="unknown-action"),
    pytest.param("/v2/models/", ("unmatched", "unmatched", None, None), id="no-name"),
    pytest.param("/", ("unmatched", "unmatched", None, None), id="root"),
]


@pytest.mark.parametrize(("path", "expected"), ROUTES)
def test_plan_route(path: str, expected: tuple[str, str, str | None, str | None]) -> None:
    route = endpoints.plan_route(path)
    assert (route.template, route.kind, route.model, route.version) == expected


@pytest.mark.parametrize(
    ("max_batch", "compiled", "expected"),
    [
        pytest.param(32, False, [1, 32], id="eager"),
        pytest.param(32, True, [1, 2, 32], id="compiled-sees-a-dynamic-batch"),
        pytest.param(1, True, [1], id="no-batching"),
    ],
)
def test_plan_warmup_batches(max_batch: int, compiled: bool, expected: list[int]) -> None:
    assert loading.plan_warmup_batches(max_batch, compiled) == expected


@pytest.mark.parametrize(
    ("mode", "problem", "fastest", "expected"),
    [
        pytest.param("auto", None, None, (True, "the artifact's AOTInductor package (no measurement recorded for "
                     "this device)"), id="auto-fits-no-record-serves-the-package-as-before"),
        pytest.param("auto", None, {"form": "compiled", "why": "1 vs 9 ms"},
                     (True, "the artifact's AOTInductor package (the compression Job measured it faster: 1 vs 9 ms)"),
                     id="auto-recorded-compiled"),
        pytest.param("auto", None, {"form": "eager", "why": "9 vs 1 ms"},
                     (False, "the eager model (the compression Job measured it faster: 9 vs 1 ms)"),
                     id="auto-recorded-eager"),
        pytest.param("auto", "no compiled package", {"form": "compiled", "why": "x"},
                     (False, "the eager model (no compiled package)"), id="auto-record-but-the-package-does-not-fit"),
        pytest.param("on", None, {"form": "eager", "why": "x"},
                     (True, "the artifact's AOTInductor package (--compiled on)"), id="on-over-the-record"),
        pytest.param("off", None, {"form": "compiled", "why": "x"}, (False, "the eager model (--compiled off)"),
                     id="off-over-the-record"),
        pytest.param("off", "no compiled package", None, (False, "the eager model (--compiled off)"), id="off"),
    ],
)
def test_plan_compiled(mode: str, problem: str | None, fastest: dict[str, str] | None,
                       expected: tuple[bool, str]) -> None:
    assert loading.plan_compiled(mode, problem, fastest) == expected


def test_plan_compiled_on_without_a_fitting_package_is_a_config_error() -> None:
    with pytest.raises(settings.ConfigError, match="--compiled on: compiled package computes in float32"):
        loading.plan_compiled("on", "compiled package computes in float32, not bfloat16")


PACKAGE = {"file": "model.cpu.pt2", "format": "aotinductor", "device": "cpu", "torch": "2.13.0", "maxBatchSize": 128}
FASTER = {"form": "compiled", "why": "package faster"}
SLOWER = {"form": "eager", "why": "eager not slower"}


@pytest.mark.parametrize(
    ("manifest", "server", "serves_package", "why"),
    [
        # the form the Job measured faster on the server's device kind, when the package fits
        pytest.param({"compiled": PACKAGE, "fastest": {"cpu": FASTER}}, {}, True, "measured it faster",
                     id="cpu-package-measured-faster"),
        pytest.param({"compiled": PACKAGE, "fastest": {"cpu": SLOWER}}, {}, False, "measured it faster",
                     id="cpu-eager-measured-faster"),
        pytest.param({"compiled": PACKAGE, "fastest": {"cpu": FASTER}}, {"device": "cpu:0"}, True, "measured",
                     id="device-index-is-the-kind"),
        # the package does not fit: eager whatever the record says
        pytest.param({"compiled": PACKAGE, "fastest": {"cpu": FASTER}}, {"device": "cuda:0"}, False,
                     "is for device 'cpu'", id="gpu-pod"),
        pytest.param({"compiled": PACKAGE, "fastest": {"cpu": FASTER}}, {"torch_version": "2.14.0"}, False,
                     "built by torch 2.13.0", id="other-torch"),
        pytest.param({"compiled": PACKAGE, "fastest": {"cpu": FASTER}}, {"max_batch_size": 256}, False,
                     "batches up to 128", id="max-batch-over-the-package"),
        pytest.param({"compiled": PACKAGE, "fastest": {"cpu": FASTER}}, {"max_batch_size": 128}, True,
                     "measured", id="max-batch-equal"),
        pytest.param({"compiled": PACKAGE, "fastest": {"cpu": FASTER}}, {"dtype": "bfloat16"}, False,
                     "float32, not bfloat16", id="dtype"),
        # no package (mode off, a model that could not be compiled, a CUDA Job): eager
        pytest.param({"fastest": {"cpu": {"form": "eager", "why": "export failed"}}}, {}, False,
                     "has no compiled package", id="no-package"),
        pytest.param({"fastest": {"cuda": {"form": "eager", "why": "CUDA Job"}}}, {"device": "cuda:0"}, False,
                     "has no compiled package", id="cuda-job"),
        # the pin
        pytest.param({"compiled": PACKAGE, "fastest": {"cpu": SLOWER}}, {"mode": "on"}, True, "--compiled on",
                     id="pin-on"),
        pytest.param({"compiled": PACKAGE, "fastest": {"cpu": FASTER}}, {"mode": "off"}, False, "--compiled off",
                     id="pin-off"),
        # an artifact from before the Job measured both forms: the package when it fits, as before
        pytest.param({"compiled": PACKAGE}, {}, True, "no measurement recorded", id="legacy-artifact"),
    ],
)
def test_plan_served_form(manifest: dict[str, Any], server: dict[str, Any], serves_package: bool, why: str) -> None:
    config = {"mode": "auto", "device": "cpu", "torch_version": "2.13.0", "max_batch_size": 32, **server}
    got, reason = loading.plan_served_form({"name": "digits", **manifest}, **config)
    assert got is serves_package and why in reason, reason


@pytest.mark.parametrize(("server", "message"), [
    pytest.param({"device": "cuda:0"}, "--compiled on: compiled package is for device 'cpu'", id="gpu"),
    pytest.param({"max_batch_size": 256}, "--compiled on: compiled package takes batches up to 128", id="batch"),
])
def test_plan_served_form_pinned_on_fails_where_the_package_cannot_serve(server: dict[str, Any],
                                                                        message: str) -> None:
    config = {"mode": "on", "device": "cpu", "torch_version": "2.13.0", "max_batch_size": 32, **server}
    with pytest.raises(settings.ConfigError, match=message):
        loading.plan_served_form({"name": "digits", "compiled": PACKAGE}, **config)


@pytest.mark.parametrize(("env", "flags", "expected"), [
    pytest.param({}, [], "auto", id="default-auto"),
    pytest.param({contract.ENV_COMPILED: "on"}, [], "on", id="env-pin"),
    pytest.param({contract.ENV_COMPILED: "off"}, ["--compiled", "auto"], "auto", id="flag-over-env"),
    pytest.param({contract.ENV_COMPILED: " "}, [], "auto", id="blank-env"),
])
def test_the_compiled_pin_from_flag_or_env(env: dict[str, str], flags: list[str], expected: str) -> None:
    assert settings.build_config(["--artifact", "/a", *flags], env).compiled == expected


def test_an_unknown_compiled_pin_in_the_env_is_a_config_error() -> None:
    with pytest.raises(settings.ConfigError, match="SHIPYARD_COMPILED='yes' is not one of auto, on, off"):
        settings.build_config(["--artifact", "/a"], {contract.ENV_COMPILED: "yes"})


def test_compiled_mode_must_be_known(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        settings.build_config(["--compiled", "yes"], ENV)
    assert "invalid choice: 'yes'" in capsys.readouterr().err


def _infer(port: int, pixels: list[list[float]]) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        body = json.dumps({"inputs": [{"name": "input", "shape": [len(pixels), 64], "datatype": "FP32",
                                       "data": pixels}]})
        conn.request("POST", "/v2/models/digits/infer", body=body)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("flags", "served"),
    [
        pytest.param([], "Serving the artifact's AOTInductor package (the compression Job measured it faster: "
                     "package faster than eager", id="auto-serves-the-package-the-job-measured-faster"),
        pytest.param(["--max-batch-size", "256"], "Serving the eager model (compiled package takes batches up to "
                     "128, the server's max batch size is 256) on cpu", id="auto-eager-when-batches-do-not-fit"),
        pytest.param(["--compiled", "off"], "Serving the eager model (--compiled off) on cpu", id="off"),
    ],
)
def test_serve_uses_the_compiled_package_when_it_fits(
    compiled_digits_dir: Path, caplog: pytest.LogCaptureFixture, flags: list[str], served: str
) -> None:
    config = settings.build_config(
        ["--artifact", str(compiled_digits_dir), "--host", "127.0.0.1", "--port", "0", "--threads", "1",
         "--drain-propagation-s", "0", *flags], {}
    )
    pixels = [[(i * j) % 17 / 16 for j in range(64)] for i in range(5)]
    with caplog.at_level("INFO", logger="shipyard.runtime.server"):
        thread = serverthread.ServerThread(config).start()
        try:
            thread.wait_ready(60)
            status, document = _infer(thread.port, pixels)
        finally:
            assert thread.stop() == 0
    assert served in caplog.text
    assert status == 200, document
    with torch.inference_mode():
        expected = store.load_model(compiled_digits_dir).module(torch.tensor(pixels))
    torch.testing.assert_close(torch.tensor(document["outputs"][0]["data"]).reshape(5, 10), expected,
                               atol=1e-4, rtol=1e-4)


def test_serve_compiled_on_fails_to_load_when_the_package_does_not_fit(
    compiled_digits_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = settings.build_config(["--artifact", str(compiled_digits_dir), "--host", "127.0.0.1", "--port", "0",
                                  "--compiled", "on", "--dtype", "bfloat16"], {})
    with caplog.at_level("ERROR", logger="shipyard.runtime.server"):
        thread = serverthread.ServerThread(config).start()
        thread.join(60)
    assert thread.exit_code == 1
    assert "--compiled on: compiled package computes in float32, not bfloat16" in caplog.text


def test_main_rejects_bad_settings_with_exit_code_2(capsys: pytest.CaptureFixture[str], monkeypatch: Any) -> None:
    monkeypatch.delenv(contract.ENV_ARTIFACT_PATH, raising=False)
    assert lifecycle.main([]) == 2
    assert "no artifact" in capsys.readouterr().err


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    module = models.build_digits_mlp()
    path = tmp_path_factory.mktemp("models") / "digits"
    store.save_model(
        module,
        path,
        name="digits",
        factory="shipyard.runtime.models:build_digits_mlp",
        inputs=[{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
        outputs=[{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    )
    return path


def test_serve_command_serves_a_model_directory_and_drains_on_sigterm(digits_dir: Path) -> None:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        **{contract.ENV_MODEL_VERSION: "1.4.0", contract.ENV_ARTIFACT_PATH: str(digits_dir)},
    )
    command = [
        sys.executable,
        "-m",
        "shipyard.runtime.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--drain-propagation-s",
        "0.2",
        "--threads",
        "1",
    ]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    port: list[int] = []
    listening = threading.Event()

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line.rstrip())
            match = re.search(r"Listened on 127\.0\.0\.1:(\d+)", line)
            if match:
                port.append(int(match.group(1)))
                listening.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        assert listening.wait(60), "\n".join(lines)

        def call(method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
            conn = http.client.HTTPConnection("127.0.0.1", port[0], timeout=20)
            try:
                conn.request(method, path, body=body)
                response = conn.getresponse()
                return response.status, json.loads(response.read())
            finally:
                conn.close()

        deadline = time.monotonic() + 60
        while call("GET", "/v2/health/ready")[0] != 200:
            assert time.monotonic() < deadline and process.poll() is None, "\n".join(lines)
            time.sleep(0.05)
        status, metadata = call("GET", "/v2/models/digits")
        assert status == 200 and metadata["versions"] == ["1.4.0"]
        assert metadata["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
        pixels = [[(i * j) % 17 / 16 for j in range(64)] for i in range(3)]
        body = json.dumps(
            {"inputs": [{"name": "pixels", "shape": [3, 64], "datatype": "FP32", "data": pixels}]}
        ).encode()
        status, document = call("POST", "/v2/models/digits/infer", body)
        assert status == 200, document
        loaded = store.load_model(digits_dir)
        with torch.inference_mode():
            expected = loaded.module(torch.tensor(pixels))
        torch.testing.assert_close(torch.tensor(document["outputs"][0]["data"]).reshape(3, 10), expected)
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(False, "does not exist", id="missing-directory"),
        pytest.param(True, "shipyard-model.json", id="no-manifest"),
    ],
)
def test_serve_exits_1_when_the_model_directory_is_broken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, make: bool, message: str
) -> None:
    directory = tmp_path / "broken"
    if make:
        directory.mkdir()
    config = settings.build_config(["--artifact", str(directory), "--host", "127.0.0.1", "--port", "0"], {})
    with caplog.at_level("ERROR", logger="shipyard.runtime.server"):
        thread = serverthread.ServerThread(config).start()  # the real loader: store.load_model
        thread.join(30)
    assert thread.exit_code == 1
    assert "Failed to load model broken" in caplog.text and message in caplog.text


@pytest.mark.parametrize(
    ("encoding", "via_torch_save", "message"),
    [
        pytest.param("safetensors", False, "refused to load: the file is a pickle", id="pickle-as-safetensors"),
        pytest.param("torch-state-dict", True, "refused to load: not a plain state_dict", id="torch-save-state-dict"),
    ],
)
def test_serve_refuses_an_artifact_with_pickled_weights_and_never_runs_the_payload(
    tmp_path: Path, encoding: str, via_torch_save: bool, message: str
) -> None:
    marker = tmp_path / "pwned"
    payload = hostile_weights(marker, via_torch_save=via_torch_save)
    directory = tmp_path / "evil"
    directory.mkdir()
    (directory / "weights.bin").write_bytes(payload)
    manifest = {
        "format": 1, "name": "evil", "kind": "factory", "factory": "shipyard.runtime.models:build_digits_mlp",
        "weights": "weights.bin", "encoding": encoding,
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    }  # fmt: skip
    (directory / manifests.MANIFEST_FILE).write_text(json.dumps(manifest))
    command = [sys.executable, "-m", "shipyard.runtime.cli", "serve", "--artifact", str(directory), "--host",
               "127.0.0.1", "--port", "0", "--threads", "1"]  # fmt: skip
    done = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "Failed to load model evil" in done.stderr and message in done.stderr, done.stderr
    assert not marker.exists()
