"""Shadow traffic end to end over real HTTP on 127.0.0.1: a stable server (the real `Server`, in a background
thread) copies the requests it answered to a candidate server and compares the answers. The candidate agrees, or
disagrees on every tenth input, answers 2 s late, is down, or answers another shape; the client always gets the
stable's answer, at once, and every copy is counted by its outcome in the stable's /metrics."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from shipyard import contract
from shipyard.runtime import models, shadowplan
from shipyard.runtime.artifacts import store
from shipyard.runtime.server import settings
from tests import serverproc, serverthread

CLASSES = 10


@dataclass(frozen=True)
class Spec:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass
class Model:
    module: torch.nn.Module
    inputs: list[Spec]
    outputs: list[Spec]


class Classifier(torch.nn.Module):
    """Logits peaking at class x[0] mod 10; `flip_every` > 0: inputs whose x[1] is a multiple of it get the next
    class instead (a candidate that disagrees on a known share of inputs). `width` changes the output's shape."""

    def __init__(self, flip_every: int = 0, width: int = CLASSES) -> None:
        super().__init__()
        self.flip_every = flip_every
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = torch.remainder(x[:, 0], CLASSES)
        if self.flip_every:
            flip = torch.remainder(x[:, 1], self.flip_every) == 0
            label = torch.where(flip, torch.remainder(label + 1, CLASSES), label)
        classes = torch.arange(self.width, dtype=x.dtype)
        return -((classes[None, :] - label[:, None]) ** 2)


INPUTS = [Spec("x", "FP32", (-1, 4))]


def config(**overrides: Any) -> settings.ServerConfig:
    base = settings.ServerConfig(
        artifact="/nonexistent/clf", host="127.0.0.1", port=0, model_name="clf", model_version="1.0.0",
        max_batch_size=8, max_delay_ms=1.0, drain_propagation_s=0.0, grace_period_s=5.0, threads=1,
        warmup_iterations=1, uvloop=False, batch_sizing="max")
    return replace(base, **overrides)


@contextlib.contextmanager
def serving(server_config: settings.ServerConfig, module: torch.nn.Module) -> Iterator[serverthread.ServerThread]:
    width = getattr(module, "width", CLASSES)
    thread = serverthread.ServerThread(
        server_config, lambda path, device: Model(module, INPUTS, [Spec("y", "FP32", (-1, width))]))
    thread.start()
    try:
        thread.wait_ready()
        yield thread
    finally:
        thread.stop()


def shadow_env(port: int, **extra: str) -> dict[str, str]:
    return {contract.ENV_SHADOW_URL: f"http://127.0.0.1:{port}", contract.ENV_SHADOW_COMPARE: "top1",
            contract.ENV_SHADOW_VERSION: "1.1.0", **extra}


def stable_config(env: dict[str, str]) -> settings.ServerConfig:
    return config(shadow=shadowplan.build_shadow_config(env))


def call(port: int, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def infer_body(i: int, rows: int = 1) -> bytes:
    data = [[float(i + r), float(i + r), 0.0, 0.0] for r in range(rows)]
    return json.dumps({"inputs": [{"name": "x", "shape": [rows, 4], "datatype": "FP32", "data": data}]}).encode()


def send(port: int, count: int, path: str = "/v2/models/clf/infer") -> list[tuple[int, float, int]]:
    """`count` requests one after another on one keep-alive connection: (status, seconds, predicted class)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    results = []
    try:
        for i in range(count):
            started = time.perf_counter()
            conn.request("POST", path, body=infer_body(i), headers={"content-type": "application/json"})
            response = conn.getresponse()
            raw = response.read()
            elapsed = time.perf_counter() - started
            logits = json.loads(raw)["outputs"][0]["data"] if response.status == 200 else [0]
            results.append((response.status, elapsed, max(range(len(logits)), key=logits.__getitem__)))
    finally:
        conn.close()
    return results


def shadow_counts(port: int) -> dict[str, float]:
    status, _, raw = call(port, "GET", contract.PATH_METRICS)
    assert status == 200
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(raw.decode()):
        for sample in family.samples:
            if sample.name == contract.METRIC_SHADOW_REQUESTS:
                assert sample.labels[contract.LABEL_CANDIDATE] == "1.1.0"
                assert sample.labels[contract.LABEL_VERSION] == "1.0.0"
                counts[sample.labels[contract.LABEL_OUTCOME]] = sample.value
            elif sample.name in (contract.METRIC_SHADOW_ROWS, contract.METRIC_SHADOW_AGREEING_ROWS,
                                 contract.METRIC_SHADOW_INFLIGHT):
                counts[sample.name] = sample.value
    return counts


def settled(port: int, expected: int, timeout: float = 10.0) -> dict[str, float]:
    """The shadow counters once `expected` copies have an outcome (dropped included) and none is in flight."""
    deadline = time.monotonic() + timeout
    while True:
        counts = shadow_counts(port)
        outcomes = sum(counts.get(outcome, 0) for outcome in contract.SHADOW_OUTCOMES)
        if (outcomes >= expected and counts.get(contract.METRIC_SHADOW_INFLIGHT) == 0) or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_without_shadow_settings_the_server_exports_no_shadow_metrics_and_answers_as_before() -> None:
    with serving(config(), Classifier()) as stable:
        assert stable.app.shadow is None
        assert "_send" not in vars(stable.app)  # the answering path is the class's own
        assert [r[0] for r in send(stable.port, 5)] == [200] * 5
        assert "shipyard_shadow" not in call(stable.port, "GET", contract.PATH_METRICS)[2].decode()


@pytest.mark.parametrize("flip_every, agreement", [
    pytest.param(0, 1.0, id="good-candidate"),
    pytest.param(10, 0.9, id="candidate-wrong-on-every-tenth-input"),
])
def test_agreement_of_a_candidate_on_live_requests(flip_every: int, agreement: float) -> None:
    with serving(config(model_version="1.1.0"), Classifier(flip_every)) as candidate, \
            serving(stable_config(shadow_env(candidate.port)), Classifier()) as stable:
        results = send(stable.port, 200)
        assert [status for status, _, _ in results] == [200] * 200
        assert [label for _, _, label in results] == [i % CLASSES for i in range(200)]  # always the stable's answer
        counts = settled(stable.port, 200)
    assert counts["compared"] == 200 and counts["error"] == counts["timeout"] == counts["dropped"] == 0
    assert counts[contract.METRIC_SHADOW_ROWS] == 200
    assert counts[contract.METRIC_SHADOW_AGREEING_ROWS] / 200 == agreement


def test_a_slow_candidate_never_slows_the_client_and_its_copies_time_out_or_are_dropped() -> None:
    env = shadow_env(0, **{contract.ENV_SHADOW_TIMEOUT_MS: "2000", contract.ENV_SHADOW_MAX_INFLIGHT: "4"})
    with serving(config(model_version="1.1.0", fault_extra_latency_ms=4000.0), Classifier()) as candidate, \
            serving(stable_config({**env, contract.ENV_SHADOW_URL: f"http://127.0.0.1:{candidate.port}"}),
                    Classifier()) as stable:
        results = send(stable.port, 40)
        counts = settled(stable.port, 40)
    assert [status for status, _, _ in results] == [200] * 40
    # The candidate answers 4 s late: a client that waited for it, or for the shadow timeout (2 s), would show it
    # (the stable alone answers in milliseconds; the bound is the timeout, far above a loaded machine's noise).
    assert max(seconds for _, seconds, _ in results) < 2.0
    assert counts["timeout"] >= 4 and counts["dropped"] >= 1 and counts["compared"] == counts["error"] == 0
    assert counts["timeout"] + counts["dropped"] == 40


def test_a_candidate_that_is_down_is_counted_as_errors_and_the_client_sees_nothing() -> None:
    with serving(stable_config(shadow_env(free_port())), Classifier()) as stable:
        results = send(stable.port, 20)
        counts = settled(stable.port, 20)
    assert [(status, label) for status, _, label in results] == [(200, i % CLASSES) for i in range(20)]
    assert counts["error"] == 20 and counts["compared"] == 0
    assert counts[contract.METRIC_SHADOW_ROWS] == 0


def test_a_candidate_answering_another_shape_is_an_error_not_a_disagreement() -> None:
    with serving(config(model_version="1.1.0"), Classifier(width=CLASSES + 1)) as candidate, \
            serving(stable_config(shadow_env(candidate.port)), Classifier()) as stable:
        send(stable.port, 10)
        counts = settled(stable.port, 10)
    assert counts["error"] == 10 and counts["compared"] == 0


def test_only_the_sampled_share_of_answered_requests_is_copied() -> None:
    with serving(config(model_version="1.1.0"), Classifier()) as candidate, \
            serving(stable_config(shadow_env(candidate.port, **{contract.ENV_SHADOW_PERCENT: "10"})),
                    Classifier()) as stable:
        send(stable.port, 95)
        assert call(stable.port, "POST", "/v2/models/clf/infer", b"{")[0] == 400  # not answered: not counted
        send(stable.port, 5)
        counts = settled(stable.port, 10)
    assert counts["compared"] == 10
    assert counts[contract.METRIC_SHADOW_ROWS] == 10


def test_versioned_binary_and_batched_requests_are_compared() -> None:
    with serving(config(model_version="1.1.0"), Classifier(flip_every=2)) as candidate, \
            serving(stable_config(shadow_env(candidate.port)), Classifier()) as stable:
        # the stable's versioned path; the candidate is asked on its unversioned one
        assert send(stable.port, 1, "/v2/models/clf/versions/1.0.0/infer")[0][0] == 200
        header = json.dumps({"inputs": [{"name": "x", "shape": [4, 4], "datatype": "FP32",
                                         "parameters": {"binary_data_size": 64}}],
                             "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
        rows = torch.tensor([[1, 1, 0, 0], [2, 2, 0, 0], [3, 3, 0, 0], [5, 5, 0, 0]], dtype=torch.float32)
        status, headers, _ = call(stable.port, "POST", "/v2/models/clf/infer", header + rows.numpy().tobytes(),
                                  {"inference-header-content-length": str(len(header)),
                                   "content-type": "application/octet-stream"})
        assert status == 200 and "inference-header-content-length" in headers
        status, _, _ = call(stable.port, "POST", "/v2/models/clf/infer", infer_body(4, rows=4))
        assert status == 200
        counts = settled(stable.port, 3)
    assert counts["compared"] == 3 and counts["error"] == 0
    # rows: 1 (x=0: even, flipped), 4 binary (x=1, 2, 3, 5: only 2 flipped), 4 batched (x=4..7: 4 and 6 flipped)
    assert counts[contract.METRIC_SHADOW_ROWS] == 9
    assert counts[contract.METRIC_SHADOW_AGREEING_ROWS] == 0 + 3 + 2


def test_a_pooled_connection_the_candidate_closed_while_idle_is_replaced_not_counted_as_an_error() -> None:
    with serving(config(model_version="1.1.0", keep_alive_timeout_s=0.2), Classifier()) as candidate, \
            serving(stable_config(shadow_env(candidate.port)), Classifier()) as stable:
        send(stable.port, 3)
        settled(stable.port, 3)
        time.sleep(0.6)  # the candidate closes the idle connection
        send(stable.port, 3)
        counts = settled(stable.port, 6)
    assert counts["compared"] == 6 and counts["error"] == 0


def test_grpc_requests_are_copied_to_the_candidates_rest_endpoint_and_compared() -> None:
    import numpy as np
    import tritonclient.grpc as grpcclient

    with serving(config(model_version="1.1.0"), Classifier(flip_every=2)) as candidate, \
            serving(replace(stable_config(shadow_env(candidate.port)), grpc_port=0), Classifier()) as stable:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{stable.server.grpc_port}")
        try:
            for i in range(4):
                tensor = grpcclient.InferInput("x", [2, 4], "FP32")
                tensor.set_data_from_numpy(np.array([[i, i, 0, 0], [i + 1, i + 1, 0, 0]], dtype=np.float32))
                answer = client.infer("clf", [tensor], outputs=[grpcclient.InferRequestedOutput("y")])
                assert answer.as_numpy("y").argmax(axis=1).tolist() == [i % CLASSES, (i + 1) % CLASSES]
        finally:
            client.close()
        counts = settled(stable.port, 4)
    assert counts["compared"] == 4 and counts["error"] == 0
    assert counts[contract.METRIC_SHADOW_ROWS] == 8
    assert counts[contract.METRIC_SHADOW_AGREEING_ROWS] == 4  # the odd x of each pair


def test_copies_over_the_byte_bound_are_dropped_and_the_client_still_answered() -> None:
    body_and_answer = len(infer_body(0)) + 150  # a request's body and the stable's answer are a few hundred bytes
    env = shadow_env(0, **{contract.ENV_SHADOW_MAX_INFLIGHT_BYTES: str(body_and_answer // 2)})
    with serving(config(model_version="1.1.0"), Classifier()) as candidate, \
            serving(stable_config({**env, contract.ENV_SHADOW_URL: f"http://127.0.0.1:{candidate.port}"}),
                    Classifier()) as stable:
        assert [status for status, _, _ in send(stable.port, 5)] == [200] * 5
        counts = settled(stable.port, 5)
    assert counts["dropped"] == 5 and counts["compared"] == 0


def test_a_candidate_that_answers_garbage_or_hangs_up_is_counted_as_errors() -> None:
    """A raw TCP server on 127.0.0.1 that answers the first copy with a line that is not HTTP and closes the second
    connection at once: both are errors, the client is answered."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    def serve() -> None:
        for reply in (b"SSH-2.0-nope\r\n\r\n", b""):
            conn, _ = listener.accept()
            conn.recv(65536)
            conn.sendall(reply)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with serving(stable_config(shadow_env(port)), Classifier()) as stable:
            assert [status for status, _, _ in send(stable.port, 2)] == [200, 200]
            counts = settled(stable.port, 2)
    finally:
        listener.close()
    assert counts["error"] == 2 and counts["compared"] == 0


def test_shipyard_runtime_serve_processes_configured_by_the_environment(tmp_path: Path) -> None:
    """`shipyard-runtime serve` as two processes: the stable configured by SHIPYARD_SHADOW_* alone; the candidate
    fails about half of its requests (fault injection): those copies are errors, the rest compared and agreeing,
    and the stable's clients are answered every time."""
    torch.manual_seed(0)
    artifact = tmp_path / "digits"
    store.save_model(models.build_digits_mlp(), artifact, name="digits",
                     factory="shipyard.runtime.models:build_digits_mlp",
                     inputs=[{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
                     outputs=[{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}])
    args = ["--artifact", str(artifact), "--host", "127.0.0.1", "--port", "0", "--grpc-port", "0", "--threads", "1",
            "--drain-propagation-s", "0"]
    candidate = serverproc.start_server([*args, "--fault-seed", "7"], {
        contract.ENV_MODEL_VERSION: "1.1.0", contract.ENV_FAULT_ERROR_RATE: "0.5"})
    stable: serverproc.ServerProcess | None = None
    try:
        assert candidate.listening.wait(60), candidate.output()
        stable = serverproc.start_server(args, {
            contract.ENV_MODEL_VERSION: "1.0.0", contract.ENV_SHADOW_VERSION: "1.1.0",
            contract.ENV_SHADOW_URL: f"http://127.0.0.1:{candidate.ports['http']}",
            contract.ENV_SHADOW_COMPARE: "top1"})
        assert candidate.ready.wait(120) and stable.ready.wait(120), stable.output()
        port = stable.ports["http"]
        pixels = [[(i * j) % 17 / 16 for j in range(64)] for i in range(40)]
        for row in pixels:
            body = json.dumps({"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32",
                                           "data": [row]}]}).encode()
            assert call(port, "POST", "/v2/models/digits/infer", body)[0] == 200
        counts = settled(port, 40, timeout=30)
    finally:
        for server in (stable, candidate):
            if server is not None:
                server.stop()
    assert "Shadowed 100% of answered inference requests" in stable.output()
    assert counts["compared"] + counts["error"] == 40 and 5 <= counts["error"] <= 35
    assert counts[contract.METRIC_SHADOW_ROWS] == counts["compared"] == counts[contract.METRIC_SHADOW_AGREEING_ROWS]


# --- settings from a file polled while serving (SHIPYARD_SHADOW_CONFIG) ----------------------------------------

@pytest.mark.parametrize("text, expected", [
    pytest.param("", None, id="empty-is-off"),
    pytest.param("  \n", None, id="whitespace-is-off"),
    pytest.param("{}", None, id="no-url-is-off"),
    pytest.param('{"url": "http://c:8080", "percent": 0}', None, id="percent-0-is-off"),
    pytest.param('{"url": "http://digits-1-1-0.ml:8080", "version": "1.1.0", "percent": 25, "compare": "cosine", '
                 '"tolerance": 0.02, "maxInflight": 8, "maxInflightBytes": 1024, "timeoutMs": 500}',
                 {"host": "digits-1-1-0.ml", "port": 8080, "percent": 25.0, "compare": "cosine", "tolerance": 0.02,
                  "max_inflight": 8, "max_inflight_bytes": 1024, "timeout_s": 0.5, "candidate": "1.1.0"},
                 id="every-key"),
    pytest.param('{"url": "http://c", "percent": "10", "version": null}',
                 {"port": 80, "percent": 10.0, "candidate": "unknown", "compare": "maxabs"}, id="strings-and-null"),
])
def test_the_shadow_settings_file(text: str, expected: dict[str, Any] | None) -> None:
    config = shadowplan.build_shadow_file_config(text)
    if expected is None:
        assert config is None
    else:
        assert config is not None
        assert {key: getattr(config, key) for key in expected} == expected


@pytest.mark.parametrize("text, problem", [
    pytest.param("{", "not JSON", id="not-json"),
    pytest.param("[1]", "must be a JSON object, got list", id="not-an-object"),
    pytest.param('{"url": "http://c", "percnt": 5}', "unknown key 'percnt' (known: url, version, percent", id="typo"),
    pytest.param('{"url": "http://c", "percent": 150}', "percent=150 must be within 0..100", id="percent"),
    pytest.param('{"url": "http://c", "percent": "lots"}', "percent='lots' is not a number", id="percent-text"),
    pytest.param('{"url": "https://c"}', "url='https://c': must be http://", id="tls"),
    pytest.param('{"url": "http://c", "compare": "l2"}', "compare='l2' is not one of top1, cosine, maxabs",
                 id="compare"),
    pytest.param('{"url": "http://c", "timeoutMs": true}', "timeoutMs must be a string or a number", id="bool"),
])
def test_an_invalid_shadow_settings_file_names_the_key(text: str, problem: str) -> None:
    with pytest.raises(shadowplan.ShadowConfigError, match=re.escape(problem)):
        shadowplan.build_shadow_file_config(text)


def test_shadow_settings_file_and_fixed_url_together_are_refused() -> None:
    with pytest.raises(settings.ConfigError, match="SHIPYARD_SHADOW_URL .* and SHIPYARD_SHADOW_CONFIG"):
        settings._pick_shadow_file({contract.ENV_SHADOW_CONFIG: "/x", contract.ENV_SHADOW_URL: "http://c"})


def write_like_kubelet(directory: Path, text: str | None, generation: list[int]) -> None:
    """A ConfigMap volume as the kubelet updates it: the key is a link into ``..data``, itself a link to a timestamped
    directory, swapped atomically (rename); None: the file is gone (optional ConfigMap deleted)."""
    generation[0] += 1
    data = directory / f"..gen_{generation[0]}"
    data.mkdir()
    if text is not None:
        (data / contract.SHADOW_CONFIG_KEY).write_text(text)
    link = directory / "..data_tmp"
    link.symlink_to(data.name)
    link.rename(directory / "..data")
    key = directory / contract.SHADOW_CONFIG_KEY
    if not key.is_symlink():
        key.symlink_to(f"..data/{contract.SHADOW_CONFIG_KEY}")


def candidate_counts(port: int, candidate: str) -> dict[str, float] | None:
    """The stable's shadow counters for one candidate; None when it exports none for it."""
    status, _, raw = call(port, "GET", contract.PATH_METRICS)
    assert status == 200
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(raw.decode()):
        for sample in family.samples:
            if sample.labels.get(contract.LABEL_CANDIDATE) != candidate:
                continue
            if sample.name == contract.METRIC_SHADOW_REQUESTS:
                counts[sample.labels[contract.LABEL_OUTCOME]] = sample.value
            elif sample.name in (contract.METRIC_SHADOW_ROWS, contract.METRIC_SHADOW_AGREEING_ROWS):
                counts[sample.name] = sample.value
    return counts or None


def wait_for(check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_shadowing_switches_with_the_settings_file_without_a_restart_or_a_failed_client_request(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Off (no file) -> candidate A -> candidate B -> invalid (logged, off) -> empty (off) -> A again (counted from
    zero), while a client sends requests without pause: every one answered 200 with the stable's answer."""
    caplog.set_level(logging.INFO, logger="shipyard.runtime.server")
    directory = tmp_path / "shadow"
    directory.mkdir()
    generation = [0]
    path = str(directory / contract.SHADOW_CONFIG_KEY)
    with serving(config(model_version="1.1.0"), Classifier()) as good, \
            serving(config(model_version="1.2.0"), Classifier(flip_every=2)) as bad, \
            serving(config(shadow_file=path), Classifier()) as stable:
        assert stable.app.shadow is None
        results: list[tuple[int, float, int]] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                results.extend(send(stable.port, 10))

        thread = threading.Thread(target=client)
        thread.start()
        try:
            time.sleep(0.3)
            assert candidate_counts(stable.port, "1.1.0") is None  # no file: off

            def settings_for(port: int, version: str) -> str:
                return json.dumps({"url": f"http://127.0.0.1:{port}", "version": version, "compare": "top1"})

            write_like_kubelet(directory, settings_for(good.port, "1.1.0"), generation)
            a = wait_for(lambda: (c := candidate_counts(stable.port, "1.1.0")) and c["compared"] >= 200 and c)
            assert a and a["error"] == 0 and a[contract.METRIC_SHADOW_AGREEING_ROWS] == a[contract.METRIC_SHADOW_ROWS]

            write_like_kubelet(directory, settings_for(bad.port, "1.2.0"), generation)
            b = wait_for(lambda: (c := candidate_counts(stable.port, "1.2.0")) and c["compared"] >= 20 and c)
            assert b and b[contract.METRIC_SHADOW_AGREEING_ROWS] < b[contract.METRIC_SHADOW_ROWS]
            assert candidate_counts(stable.port, "1.1.0") is None  # the previous candidate's series are gone

            write_like_kubelet(directory, '{"url": "http://127.0.0.1:1", "percent": 101}', generation)
            assert wait_for(lambda: stable.app.shadow is None)
            assert wait_for(lambda: "percent=101 must be within 0..100; shadowing is off" in caplog.text)
            assert candidate_counts(stable.port, "1.2.0") is None

            write_like_kubelet(directory, settings_for(good.port, "1.1.0"), generation)
            assert wait_for(lambda: stable.app.shadow is not None)
            write_like_kubelet(directory, "", generation)
            assert wait_for(lambda: stable.app.shadow is None)

            write_like_kubelet(directory, None, generation)  # the key removed: off
            time.sleep(1.5)
            assert stable.app.shadow is None
            write_like_kubelet(directory, settings_for(good.port, "1.1.0"), generation)
            again = wait_for(lambda: (c := candidate_counts(stable.port, "1.1.0")) and c["compared"] >= 1 and c)
            assert again and again["compared"] < a["compared"]  # a new shadow period: counted from zero
        finally:
            stop.set()
            thread.join()
    assert len(results) >= 100
    assert {status for status, _, _ in results} == {200}
    assert [label for _, _, label in results] == [i % CLASSES for i in range(10)] * (len(results) // 10)
    assert "Stopped shadowing to http://127.0.0.1:" in caplog.text


def test_the_candidates_own_pods_never_shadow_to_themselves(tmp_path: Path) -> None:
    """Every server of a model reads the same settings file (one ConfigMap): the candidate's own server finds its
    version named there and copies nothing (else it would copy the copies it answers to itself, and count its own
    agreement with itself)."""
    directory = tmp_path / "shadow"
    directory.mkdir()
    generation = [0]
    path = str(directory / contract.SHADOW_CONFIG_KEY)
    with serving(config(model_version="1.1.0", shadow_file=path), Classifier()) as candidate:
        settings_text = json.dumps({"url": f"http://127.0.0.1:{candidate.port}", "version": "1.1.0",
                                    "percent": 100, "compare": "top1"})
        write_like_kubelet(directory, settings_text, generation)
        time.sleep(2.5)  # two polls of the file
        results = send(candidate.port, 20)
        time.sleep(0.5)
        assert all(status == 200 for status, _, _ in results)
        assert candidate_counts(candidate.port, "1.1.0") is None  # no shadow series: nothing copied
