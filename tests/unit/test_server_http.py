"""Contract tests of the inference server over real HTTP on 127.0.0.1 (server in a background thread).

Every endpoint, every bad-input case end to end (4xx, counted, never 5xx), overload and timeouts, model
failures, fault injection, readiness around loading, batched == unbatched, and metrics that move as the
requests predict.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from shipyard import contract
from shipyard.runtime import oip
from shipyard.runtime.server import settings
from tests import serverthread


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


class GatedIntegerMlp(torch.nn.Module):
    """Integer weights (exact float sums); once armed, each forward waits for the test to open the gate."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randint(-3, 4, (4, 8), generator=generator).float())
        self.w2 = torch.nn.Parameter(torch.randint(-3, 4, (8, 3), generator=generator).float())
        self.armed = False
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batch_rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed:
            self.batch_rows.append(x.shape[0])
            self.entered.set()
            if not self.gate.wait(10):
                raise RuntimeError("the test never opened the gate")
        if (x == 999).any():
            raise ValueError("the model cannot take 999")
        return torch.relu(x @ self.w1) @ self.w2


INPUTS = [Spec("x", "FP32", (-1, 4))]
OUTPUTS = [Spec("y", "FP32", (-1, 3))]


def base_config(**overrides: Any) -> settings.ServerConfig:
    config = settings.ServerConfig(
        artifact="/nonexistent/mlp",
        host="127.0.0.1",
        port=0,
        model_name="mlp",
        model_version="1.4.0",
        max_batch_size=8,
        max_delay_ms=2.0,
        drain_propagation_s=0.0,
        grace_period_s=5.0,
        threads=1,
        warmup_iterations=1,
        uvloop=False,
        batch_sizing="max",  # batches fill up to max_batch_size; measured sizing has its own tests
    )
    return replace(config, **overrides)


class Harness:
    def __init__(
        self,
        config: settings.ServerConfig,
        module: torch.nn.Module | None = None,
        loader: Callable[[str, str], Any] | None = None,
    ) -> None:
        self.module = module or GatedIntegerMlp()
        self.thread = serverthread.ServerThread(
            config, loader or (lambda path, device: Model(self.module, INPUTS, OUTPUTS))
        )

    def __enter__(self) -> Harness:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if isinstance(self.module, GatedIntegerMlp):
            self.module.gate.set()
        self.thread.stop()

    @property
    def port(self) -> int:
        return self.thread.port

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def infer(self, data: list[list[float]], path: str = "/v2/models/mlp/infer", **extra: Any) -> tuple[int, Any]:
        document = {"inputs": [{"name": "x", "shape": [len(data), 4], "datatype": "FP32", "data": data}], **extra}
        status, _, raw = self.call("POST", path, json.dumps(document).encode())
        return status, json.loads(raw)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, _, raw = self.call("GET", contract.PATH_METRICS)
        assert status == 200
        samples = {}
        for family in text_string_to_metric_families(raw.decode()):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples


@pytest.fixture
def harness() -> Iterator[Harness]:
    with Harness(base_config()) as running:
        running.thread.wait_ready()
        yield running


MODEL_LABELS = (("model", "mlp"), ("version", "1.4.0"))
HTTP_LABELS = (("model", "mlp"), ("protocol", "http"), ("version", "1.4.0"))  # sorted, as metrics() keys them


def requests_total(samples: dict[Any, float], code: int) -> float:
    return samples.get(("shipyard_requests_total", (("code", str(code)), *HTTP_LABELS)), 0.0)


def http_count(samples: dict[Any, float], method: str, path: str, status: int) -> float:
    key = ("http_request_duration_seconds_count", (("method", method), ("path", path), ("status", str(status))))
    return samples.get(key, 0.0)


# ----------------------------------------------------------------------------------------------- endpoints

ONE_ROW = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).encode()
ENDPOINTS = [
    pytest.param("GET", "/v2/health/live", None, 200, {"live": True}, id="live"),
    pytest.param("GET", "/v2/health/ready", None, 200, {"ready": True}, id="ready"),
    pytest.param("GET", "/v2", None, 200, {"name": "shipyard"}, id="server-metadata"),
    pytest.param("GET", "/v2/models/mlp", None, 200, {"name": "mlp", "versions": ["1.4.0"]}, id="model-metadata"),
    pytest.param("GET", "/v2/models/mlp/versions/1.4.0", None, 200, {"name": "mlp"}, id="model-metadata-version"),
    pytest.param("GET", "/v2/models/mlp/ready", None, 200, {"name": "mlp", "ready": True}, id="model-ready"),
    pytest.param("GET", "/v2/models/mlp/versions/1.4.0/ready", None, 200, {"ready": True}, id="model-ready-version"),
    pytest.param("POST", "/v2/models/mlp/infer", ONE_ROW, 200, {"model_version": "1.4.0"}, id="infer"),
    pytest.param("POST", "/v2/models/mlp/versions/1.4.0/infer", ONE_ROW, 200, {"model_name": "mlp"}, id="infer-ver"),
    pytest.param("POST", "/v2/models/mlp/infer?trace=1", ONE_ROW, 200, {"model_name": "mlp"}, id="infer-query"),
    pytest.param("GET", "/v2/models/other", None, 404, {}, id="unknown-model-metadata"),
    pytest.param("GET", "/v2/models/other/ready", None, 404, {}, id="unknown-model-ready"),
    pytest.param("POST", "/v2/models/other/infer", ONE_ROW, 404, {}, id="unknown-model-infer"),
    pytest.param("POST", "/v2/models/mlp/versions/9.9/infer", ONE_ROW, 404, {}, id="unknown-version-infer"),
    pytest.param("GET", "/v2/models/mlp/versions/9.9", None, 404, {}, id="unknown-version-metadata"),
    pytest.param("GET", "/v3/anything", None, 404, {}, id="unknown-route"),
    pytest.param("GET", "/v2/models/mlp/infer", None, 405, {}, id="infer-with-get"),
    pytest.param("POST", "/v2/health/ready", b"{}", 405, {}, id="ready-with-post"),
    pytest.param("DELETE", "/v2/models/mlp", None, 405, {}, id="delete-model"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "subset"), ENDPOINTS)
def test_endpoint_contract(
    harness: Harness, method: str, path: str, body: bytes | None, status: int, subset: dict[str, Any]
) -> None:
    got, headers, raw = harness.call(method, path, body)
    assert got == status
    assert headers["content-type"] == "application/json"
    document = json.loads(raw)
    if status >= 400:
        assert isinstance(document["error"], str) and document["error"]
    assert subset.items() <= document.items()
    if status == 405:
        assert headers["allow"] in {"GET", "POST"}


def test_model_metadata_describes_tensors(harness: Harness) -> None:
    _, _, raw = harness.call("GET", "/v2/models/mlp")
    assert json.loads(raw) == {
        "name": "mlp",
        "versions": ["1.4.0"],
        "platform": "pytorch",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
    }


def test_infer_returns_the_model_output(harness: Harness) -> None:
    x = [[1.0, -2.0, 3.0, 0.5], [0.0, 1.0, 1.0, 1.0]]
    status, document = harness.infer(x, id="req-7")
    assert status == 200
    expected = harness.module(torch.tensor(x)).detach()
    (output,) = document["outputs"]
    assert document["id"] == "req-7"
    assert output["name"] == "y" and output["datatype"] == "FP32" and output["shape"] == [2, 3]
    assert output["data"] == expected.reshape(-1).tolist()


def test_metrics_endpoint_is_prometheus_text(harness: Harness) -> None:
    status, headers, raw = harness.call("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(raw.decode())}
    expected = {
        "shipyard_requests",
        "shipyard_request_duration_seconds",
        "shipyard_batch_size",
        "shipyard_queue_duration_seconds",
        "shipyard_inflight_requests",
        "shipyard_model_ready",
        "http_request_duration_seconds",
    }
    assert expected <= names


def test_keep_alive_and_pipelined_requests_are_answered_in_order(harness: Harness) -> None:
    bodies = [
        json.dumps(
            {"id": f"r{i}", "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [i, i, i, i]}]}
        ).encode()
        for i in range(5)
    ]
    wire = (
        b"".join(
            b"POST /v2/models/mlp/infer HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n%s" % (len(b), b)
            for b in bodies
        )
        + b"GET /v2/health/live HTTP/1.1\r\nhost: t\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as sock:
        sock.sendall(wire)
        reader = sock.makefile("rb")
        ids = []
        for _ in range(6):
            status_line = reader.readline()
            assert status_line.startswith(b"HTTP/1.1 200 ")
            headers = {}
            while (line := reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.lower()] = value.strip()
            document = json.loads(reader.read(int(headers["content-length"])))
            ids.append(document.get("id", "live"))
    assert ids == ["r0", "r1", "r2", "r3", "r4", "live"]


def test_idle_keep_alive_connections_are_closed_after_the_timeout() -> None:
    with Harness(base_config(keep_alive_timeout_s=0.3)) as running:
        running.thread.wait_ready()
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: t\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            started = time.monotonic()
            assert sock.recv(65536) == b""  # closed by the server
            assert 0.2 <= time.monotonic() - started < 3.0


# ---------------------------------------------------------------------------------------------- bad input

BAD_INFER = [
    pytest.param(b"{oops", "malformed JSON", id="malformed-json"),
    pytest.param(
        b'{"inputs": [{"name": "x", "shape": [1, 5], "datatype": "FP32", "data": [1,2,3,4,5]}]}',
        "does not match",
        id="wrong-shape",
    ),
    pytest.param(
        b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT64", "data": [1,2,3,4]}]}',
        "datatype",
        id="wrong-datatype",
    ),
    pytest.param(
        b'{"inputs": [{"name": "z", "shape": [1, 4], "datatype": "FP32", "data": [1,2,3,4]}]}',
        "missing",
        id="wrong-input-name",
    ),
    pytest.param(
        b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1,2,3]}]}',
        "do not fill",
        id="wrong-count",
    ),
    pytest.param(
        b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ["a","b","c","d"]}]}',
        "not valid FP32",
        id="wrong-data-kind",
    ),
    pytest.param(b'{"inputs": []}', "non-empty", id="no-inputs"),
]


@pytest.mark.parametrize(("body", "message"), BAD_INFER)
def test_bad_input_is_a_counted_400_and_the_server_keeps_serving(harness: Harness, body: bytes, message: str) -> None:
    before = harness.metrics()
    status, _, raw = harness.call("POST", "/v2/models/mlp/infer", body)
    assert status == 400 and message in json.loads(raw)["error"]
    after = harness.metrics()
    assert requests_total(after, 400) == requests_total(before, 400) + 1
    assert (
        http_count(after, "POST", "/v2/models/{name}/infer", 400)
        == http_count(before, "POST", "/v2/models/{name}/infer", 400) + 1
    )
    assert not any(key[0] == "shipyard_requests_total" and dict(key[1])["code"].startswith("5") and value
                   for key, value in after.items())  # the 5xx series exist from the start, at 0
    assert harness.infer([[1, 2, 3, 4]])[0] == 200


# The binary tensor data extension: raw tensor bytes after a JSON header whose length the
# Inference-Header-Content-Length header gives (bodies framed by hand here, as the spec describes them).

X_ROW = struct.pack("<4f", 1.0, -2.0, 3.0, 0.5)


def binary_body(document: dict[str, Any], *chunks: bytes) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(document).encode()
    return header + b"".join(chunks), {"inference-header-content-length": str(len(header)),
                                       "content-type": "application/octet-stream"}


def x_binary(rows: int = 1, size: int | None = None) -> dict[str, Any]:
    return {"name": "x", "shape": [rows, 4], "datatype": "FP32",
            "parameters": {"binary_data_size": 16 * rows if size is None else size}}


def test_binary_request_and_response_round_trip(harness: Harness) -> None:
    body, headers = binary_body(
        {"id": "b7", "inputs": [x_binary(2)], "outputs": [{"name": "y", "parameters": {"binary_data": True}}]},
        X_ROW, X_ROW,
    )
    status, response_headers, raw = harness.call("POST", "/v2/models/mlp/infer", body, headers)
    assert status == 200, raw
    assert response_headers["content-type"] == "application/octet-stream"
    header_length = int(response_headers["inference-header-content-length"])
    document = json.loads(raw[:header_length])
    assert document["id"] == "b7"
    assert document["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [2, 3],
                                    "parameters": {"binary_data_size": 24}}]
    expected = harness.module(torch.tensor(struct.unpack("<8f", X_ROW * 2)).reshape(2, 4)).detach()
    assert list(struct.unpack("<6f", raw[header_length:])) == expected.reshape(-1).tolist()


def test_binary_input_with_json_output_and_json_input_with_binary_output(harness: Harness) -> None:
    body, headers = binary_body({"inputs": [x_binary()]}, X_ROW)
    status, response_headers, raw = harness.call("POST", "/v2/models/mlp/infer", body, headers)
    assert status == 200 and "inference-header-content-length" not in response_headers
    json_answer = json.loads(raw)["outputs"][0]["data"]
    document = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, -2.0, 3.0, 0.5]}],
                "parameters": {"binary_data_output": True}}
    status, response_headers, raw = harness.call("POST", "/v2/models/mlp/infer", json.dumps(document).encode())
    header_length = int(response_headers["inference-header-content-length"])
    assert status == 200 and list(struct.unpack("<3f", raw[header_length:])) == json_answer


BAD_BINARY_INFER = [
    pytest.param(*binary_body({"inputs": [x_binary()]}, X_ROW + b"\0"), "add up to", id="body-longer-than-sizes"),
    pytest.param(*binary_body({"inputs": [x_binary()]}, X_ROW[:10]), "runs past the end", id="body-shorter"),
    pytest.param(*binary_body({"inputs": [x_binary(size=-16)]}, X_ROW), "non-negative integer", id="negative-size"),
    pytest.param(*binary_body({"inputs": [x_binary(size=2**62)]}, X_ROW), "runs past the end", id="huge-size"),
    pytest.param(*binary_body({"inputs": [x_binary(size=8)]}, X_ROW[:8]), "does not match shape", id="dtype-size"),
    pytest.param(X_ROW, {"inference-header-content-length": "-3"}, "non-negative decimal", id="negative-header"),
    pytest.param(X_ROW, {"inference-header-content-length": "1000"}, "exceeds the body", id="header-past-body"),
    pytest.param(b"nope" + X_ROW, {"inference-header-content-length": "4"}, "not valid JSON", id="header-not-json"),
    pytest.param(json.dumps({"inputs": [x_binary()]}).encode() + X_ROW, {},
                 "needs the Inference-Header-Content-Length header", id="sizes-without-header"),
]


@pytest.mark.parametrize(("body", "headers", "message"), BAD_BINARY_INFER)
def test_bad_binary_input_is_a_counted_400_and_the_server_keeps_serving(
    harness: Harness, body: bytes, headers: dict[str, str], message: str
) -> None:
    before = harness.metrics()
    status, _, raw = harness.call("POST", "/v2/models/mlp/infer", body, headers)
    assert status == 400 and message in json.loads(raw)["error"], raw
    after = harness.metrics()
    assert requests_total(after, 400) == requests_total(before, 400) + 1
    assert harness.infer([[1, 2, 3, 4]])[0] == 200


def test_server_metadata_lists_the_binary_tensor_data_extension(harness: Harness) -> None:
    _, _, raw = harness.call("GET", "/v2")
    assert json.loads(raw)["extensions"] == ["binary_tensor_data"]


def test_oversized_payload_is_413_before_the_body_is_read() -> None:
    with Harness(base_config(max_payload_bytes=4096)) as running:
        running.thread.wait_ready()
        big = json.dumps(
            {"inputs": [{"name": "x", "shape": [2000, 4], "datatype": "FP32", "data": [0.5] * 8000}]}
        ).encode()
        status, headers, raw = running.call("POST", "/v2/models/mlp/infer", big)
        assert status == 413 and "exceeds" in json.loads(raw)["error"] and headers["connection"] == "close"
        # Chunked upload without a length: cut off once it passes the limit.
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        conn.request(
            "POST", "/v2/models/mlp/infer", body=iter([big[:3000], big[3000:6000], big[6000:]]), encode_chunked=True
        )
        response = conn.getresponse()
        assert response.status == 413
        conn.close()
        samples = running.metrics()
        assert http_count(samples, "POST", "/v2/models/{name}/infer", 413) == 2
        assert requests_total(samples, 413) == 2
        assert running.infer([[1, 2, 3, 4]])[0] == 200


def test_oversized_headers_are_431(harness: Harness) -> None:
    status, _, raw = harness.call("GET", "/v2/health/live", headers={"x-big": "a" * 70000})
    assert status == 431 and json.loads(raw)["error"]


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(b"NOT HTTP AT ALL\r\n\r\n", id="garbage"),
        pytest.param(b"POST /v2/models/mlp/infer HTTP/1.1\r\ncontent-length: zz\r\n\r\n", id="bad-length"),
    ],
)
def test_malformed_http_is_400_and_does_not_crash_the_server(harness: Harness, wire: bytes) -> None:
    with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as sock:
        sock.sendall(wire)
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 400 ")
    assert harness.call("GET", "/v2/health/live")[0] == 200


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


# Found by tests/integration/test_server_fuzz.py: each of these broke the connection's framing or logged a bug.


def test_a_response_to_head_has_no_body_and_the_next_pipelined_response_parses(harness: Harness) -> None:
    with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as sock:
        sock.sendall(b"HEAD /v2/health/live HTTP/1.1\r\nhost: t\r\n\r\n"
                     b"GET /v2/health/live HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        wire = _read_all(sock)
    first, _, rest = wire.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 405 ") and b"content-length: " in first  # the length GET would have
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n") and rest.endswith(b'{"live":true}')


def test_a_request_stalled_half_way_is_answered_408_and_closed() -> None:
    with Harness(base_config(keep_alive_timeout_s=0.3)) as running:
        running.thread.wait_ready()
        for partial in (b"GET /v2/hea", b"POST /v2/models/mlp/infer HTTP/1.1\r\ncontent-length: 50\r\n\r\n{"):
            with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
                sock.sendall(partial)
                wire = _read_all(sock)  # returns once the server closes
            assert wire.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b"not received in time" in wire
        assert running.infer([[1, 2, 3, 4]])[0] == 200


def test_body_bytes_after_a_413_are_dropped_without_a_second_answer(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("ERROR", logger="shipyard.runtime.httpproto"), \
            Harness(base_config(max_payload_bytes=4096)) as running:
        running.thread.wait_ready()
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
            sock.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\ncontent-length: 100000\r\n\r\n")
            for _ in range(20):
                sock.sendall(b"[" * 1000)
            wire = _read_all(sock)
        assert wire.startswith(b"HTTP/1.1 413 ") and wire.count(b"HTTP/1.1") == 1, wire
        assert running.infer([[1, 2, 3, 4]])[0] == 200
    assert "Failed to handle a request" not in caplog.text


# --------------------------------------------------------------------------------- overload, timeouts, 5xx


def test_full_queue_is_rejected_fast_with_503() -> None:
    with Harness(base_config(max_batch_size=1, max_queue=2)) as running:
        running.thread.wait_ready()
        module = running.module
        assert isinstance(module, GatedIntegerMlp)
        module.armed = True
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(running.infer, [[1, 1, 1, 1]])
            assert module.entered.wait(5)
            queued = [pool.submit(running.infer, [[2, 2, 2, 2]]) for _ in range(2)]
            deadline = time.monotonic() + 5
            while running.thread.app.batcher.queued < 2 and time.monotonic() < deadline:  # type: ignore[union-attr]
                time.sleep(0.005)
            started = time.monotonic()
            body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [3, 3, 3, 3]}]})
            status, headers, raw = running.call("POST", "/v2/models/mlp/infer", body.encode())
            elapsed = time.monotonic() - started
            assert status == 503 and "queue is full" in json.loads(raw)["error"]
            assert headers["retry-after"] == "1"
            assert elapsed < 1.0
            module.gate.set()
            assert first.result()[0] == 200 and [f.result()[0] for f in queued] == [200, 200]
        assert requests_total(running.metrics(), 503) == 1


def test_request_timeout_is_504_and_the_late_result_is_dropped() -> None:
    with Harness(base_config(request_timeout_s=0.3)) as running:
        running.thread.wait_ready()
        module = running.module
        assert isinstance(module, GatedIntegerMlp)
        module.armed = True
        started = time.monotonic()
        status, document = running.infer([[1, 1, 1, 1]])
        elapsed = time.monotonic() - started
        assert status == 504 and "0.3 s" in document["error"]
        assert 0.25 <= elapsed < 2.0
        module.armed = False
        module.gate.set()
        assert running.infer([[1, 1, 1, 1]])[0] == 200
        samples = running.metrics()
        assert requests_total(samples, 504) == 1
        assert samples[("shipyard_inflight_requests", MODEL_LABELS)] == 0


def test_model_failure_is_a_counted_500_with_a_message(harness: Harness) -> None:
    status, document = harness.infer([[999, 0, 0, 0]])
    assert status == 500 and "cannot take 999" in document["error"]
    assert requests_total(harness.metrics(), 500) == 1
    assert harness.infer([[1, 0, 0, 0]])[0] == 200


@pytest.mark.parametrize(
    ("target", "message"),
    [
        pytest.param("build_infer_request", "internal server error: RuntimeError", id="parse-bug"),
        pytest.param("build_infer_response", "could not encode the outputs", id="encode-bug"),
    ],
)
def test_a_bug_in_the_server_is_a_500_and_the_server_goes_on(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, target: str, message: str
) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    with monkeypatch.context() as patch:
        patch.setattr(oip, target, boom)
        status, document = harness.infer([[1, 2, 3, 4]])
    assert status == 500 and message in document["error"]
    assert harness.infer([[1, 2, 3, 4]])[0] == 200
    samples = harness.metrics()
    assert requests_total(samples, 500) == 1
    assert samples[("shipyard_inflight_requests", MODEL_LABELS)] == 0


# ------------------------------------------------------------------------------------------ fault injection

FAULTS = [
    pytest.param(1.0, 0.0, 20, 20, id="all-fail"),
    pytest.param(0.0, 0.0, 20, 0, id="off-by-default"),
    pytest.param(0.5, 0.0, 200, None, id="half-fail"),
]


@pytest.mark.parametrize(("rate", "latency_ms", "count", "expected_failures"), FAULTS)
def test_fault_injection_fails_the_configured_fraction(
    rate: float, latency_ms: float, count: int, expected_failures: int | None
) -> None:
    config = base_config(fault_error_rate=rate, fault_extra_latency_ms=latency_ms, fault_seed=7)
    with Harness(config) as running:
        running.thread.wait_ready()
        statuses = [running.infer([[1, 2, 3, 4]]) for _ in range(count)]
        failures = [doc for status, doc in statuses if status == 500]
        assert all("injected fault" in doc["error"] for doc in failures)
        assert all(status in {200, 500} for status, _ in statuses)
        if expected_failures is None:
            assert 0.35 * count <= len(failures) <= 0.65 * count
        else:
            assert len(failures) == expected_failures
        assert requests_total(running.metrics(), 500) == len(failures)
        assert running.call("GET", "/v2/health/ready")[0] == 200  # health is not faulted


def test_fault_extra_latency_delays_inference_responses_only() -> None:
    with Harness(base_config(fault_extra_latency_ms=250)) as running:
        running.thread.wait_ready()
        started = time.monotonic()
        assert running.infer([[1, 2, 3, 4]])[0] == 200
        assert time.monotonic() - started >= 0.25
        started = time.monotonic()
        assert running.call("GET", "/v2/health/live")[0] == 200
        assert time.monotonic() - started < 0.2
        samples = running.metrics()
        assert samples[("shipyard_request_duration_seconds_sum", HTTP_LABELS)] >= 0.25


# ------------------------------------------------------------------------------------------ readiness


def test_liveness_answers_while_loading_and_readiness_waits_for_warm_up() -> None:
    release = threading.Event()
    module = GatedIntegerMlp()

    def slow_loader(path: str, device: str) -> Model:
        assert release.wait(10)
        return Model(module, INPUTS, OUTPUTS)

    with Harness(base_config(), module=module, loader=slow_loader) as running:
        assert running.call("GET", "/v2/health/live")[0] == 200
        not_ready = [
            running.call("GET", "/v2/health/ready"),
            running.call("GET", "/v2/models/mlp/ready"),
            running.call("GET", "/v2/models/mlp"),
            running.call("POST", "/v2/models/mlp/infer", ONE_ROW),
        ]
        assert [status for status, _, _ in not_ready] == [503, 503, 503, 503]
        assert all("loading" in json.loads(raw)["error"] for _, _, raw in not_ready)
        assert running.metrics()[("shipyard_model_ready", MODEL_LABELS)] == 0
        release.set()
        running.thread.wait_ready()
        assert running.call("GET", "/v2/health/ready")[0] == 200
        assert running.metrics()[("shipyard_model_ready", MODEL_LABELS)] == 1


def test_a_model_that_fails_to_load_makes_the_server_exit_non_zero() -> None:
    def broken(path: str, device: str) -> Model:
        raise FileNotFoundError(path)

    thread = serverthread.ServerThread(base_config(), broken).start()
    thread.join(10)
    assert thread.exit_code == 1


def test_a_model_that_fails_warm_up_makes_the_server_exit_non_zero() -> None:
    wrong = Model(torch.nn.Linear(7, 3), INPUTS, OUTPUTS)  # declares 4 features, takes 7
    thread = serverthread.ServerThread(base_config(), lambda path, device: wrong).start()
    thread.join(10)
    assert thread.exit_code == 1


# ------------------------------------------------------------------------------------- batching over HTTP


def test_batched_results_are_identical_to_unbatched_over_http() -> None:
    with Harness(base_config(max_batch_size=16)) as running:
        running.thread.wait_ready()
        module = running.module
        assert isinstance(module, GatedIntegerMlp)
        rows = [[[i, -i, 2 * i, 1]] if i % 3 else [[i, 1, 0, -i], [1, 2, 3, i]] for i in range(10)]
        unbatched = [running.infer(x)[1]["outputs"][0]["data"] for x in rows]
        module.armed = True
        with ThreadPoolExecutor(len(rows) + 1) as pool:
            blocker = pool.submit(running.infer, [[0, 0, 0, 0]])
            assert module.entered.wait(5)
            futures = [pool.submit(running.infer, x) for x in rows]
            deadline = time.monotonic() + 5
            while running.thread.app.batcher.queued < len(rows) and time.monotonic() < deadline:  # type: ignore[union-attr]
                time.sleep(0.005)
            module.gate.set()
            batched = [f.result()[1]["outputs"][0]["data"] for f in futures]
            assert blocker.result()[0] == 200
        total_rows = sum(len(x) for x in rows)
        assert module.batch_rows == [1, total_rows]  # really one batch
        assert batched == unbatched  # bit for bit
        assert all(any(v != 0 for v in out) for out in batched)


class FasterPerRowAtTwo(torch.nn.Module):
    """Busy for 1 ms of CPU a pass of up to 2 rows, 3 ms a row beyond (2000 rows/s at 2, 333 at 8): the server times
    its one torch thread's CPU time, which a sleep would not use."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_rows.append(x.shape[0])
        done = time.thread_time() + (0.001 if x.shape[0] <= 2 else 0.003 * x.shape[0])
        while time.thread_time() < done:
            pass
        return x[:, :3] * 2


@pytest.mark.parametrize(("sizing", "limit"), [
    pytest.param("measured", 2, id="measured:-the-fastest-size-per-row"),
    pytest.param("max", 8, id="max:-up-to-the-max-batch-size"),
])  # fmt: skip
def test_batches_fill_up_to_the_size_measured_fastest_at_start_up(sizing: str, limit: int) -> None:
    module = FasterPerRowAtTwo()
    with Harness(base_config(max_batch_size=8, batch_sizing=sizing), module=module) as running:
        running.thread.wait_ready()
        assert running.thread.app.batcher is not None and running.thread.app.batcher.max_batch == limit
        timed = len(module.batch_rows)
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda i: running.infer([[i, 0, 0, 0]]), range(12)))
        assert [status for status, _ in answers] == [200] * 12
        assert [out["outputs"][0]["data"] for _, out in answers] == [[2.0 * i, 0.0, 0.0] for i in range(12)]
        assert max(module.batch_rows[timed:]) <= limit


def test_float_model_batched_matches_unbatched_within_float32_rounding() -> None:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
    with Harness(base_config(), module=mlp) as running:
        running.thread.wait_ready()
        inputs = [[[0.1 * i, -0.3, 0.7 * i, 1.5]] for i in range(24)]
        with ThreadPoolExecutor(24) as pool:
            batched = list(pool.map(lambda x: running.infer(x)[1]["outputs"][0]["data"], inputs))
        samples = running.metrics()
        assert samples[("shipyard_batch_size_count", MODEL_LABELS)] < 24  # some requests shared a batch
        for x, out in zip(inputs, batched, strict=True):
            alone = mlp(torch.tensor(x)).detach().reshape(-1)
            torch.testing.assert_close(torch.tensor(out), alone, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- metrics


def test_metrics_change_as_the_requests_predict(harness: Harness) -> None:
    before = harness.metrics()
    for _ in range(3):
        assert harness.infer([[1, 2, 3, 4], [4, 3, 2, 1]])[0] == 200
    assert harness.call("POST", "/v2/models/mlp/infer", b"{")[0] == 400
    assert harness.call("POST", "/v2/models/nope/infer", ONE_ROW)[0] == 404
    assert harness.call("GET", "/v2/health/ready")[0] == 200
    after = harness.metrics()

    def delta(name: str, labels: tuple[tuple[str, str], ...] = MODEL_LABELS) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    assert requests_total(after, 200) - requests_total(before, 200) == 3
    assert requests_total(after, 400) - requests_total(before, 400) == 1
    assert requests_total(after, 404) - requests_total(before, 404) == 1
    assert delta("shipyard_request_duration_seconds_count", HTTP_LABELS) == 5
    assert delta("shipyard_batch_size_count") == 3  # sequential: one batch each
    assert delta("shipyard_batch_size_sum") == 6  # of two rows
    assert delta("shipyard_queue_duration_seconds_count") == 3
    assert after[("shipyard_inflight_requests", MODEL_LABELS)] == 0
    assert after[("shipyard_model_ready", MODEL_LABELS)] == 1
    infer_route = "/v2/models/{name}/infer"
    assert http_count(after, "POST", infer_route, 200) - http_count(before, "POST", infer_route, 200) == 3
    assert http_count(after, "POST", infer_route, 404) - http_count(before, "POST", infer_route, 404) == 1
    assert http_count(after, "GET", "/v2/health/ready", 200) - http_count(before, "GET", "/v2/health/ready", 200) == 1
    paths = {dict(labels)["path"] for name, labels in after if name.startswith("http_request_duration")}
    assert not any("mlp" in path or "nope" in path for path in paths)  # route templates, never raw paths


def test_inflight_gauge_counts_requests_being_served() -> None:
    with Harness(base_config()) as running:
        running.thread.wait_ready()
        module = running.module
        assert isinstance(module, GatedIntegerMlp)
        module.armed = True
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(running.infer, [[1, 1, 1, 1]]) for _ in range(3)]
            deadline = time.monotonic() + 5
            inflight = 0.0
            while time.monotonic() < deadline:
                inflight = running.metrics()[("shipyard_inflight_requests", MODEL_LABELS)]
                if inflight == 3:
                    break
                time.sleep(0.01)
            assert inflight == 3
            module.gate.set()
            assert [f.result()[0] for f in futures] == [200, 200, 200]
        assert running.metrics()[("shipyard_inflight_requests", MODEL_LABELS)] == 0
