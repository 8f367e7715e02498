"""The OIP REST client of `shipyard-runtime evaluate`: URLs, request and response encoding (checked against the
server's own parser and encoder), and its behaviour on the wire against a scripted HTTP server: size caps,
timeouts, retries for connection errors only, stale keep-alive connections."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pytest

from shipyard.runtime import oip, oipclient

# ------------------------------------------------------------------------------------------------ endpoints


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param("http://digits-1-1-0.ns.svc:8080", ("http", "digits-1-1-0.ns.svc", 8080, ""), id="service"),
        pytest.param("http://127.0.0.1:8080/", ("http", "127.0.0.1", 8080, ""), id="trailing-slash"),
        pytest.param("https://models.example.com", ("https", "models.example.com", 443, ""), id="https-port"),
        pytest.param("http://gw.local/ns/digits", ("http", "gw.local", 80, "/ns/digits"), id="path-prefix"),
        pytest.param("http://[::1]:9000", ("http", "::1", 9000, ""), id="ipv6"),
    ],
)
def test_build_endpoint(url: str, expected: tuple[str, str, int, str]) -> None:
    endpoint = oipclient.build_endpoint(url)
    assert (endpoint.scheme, endpoint.host, endpoint.port, endpoint.base_path) == expected
    assert endpoint.model_path("digits", "/infer") == f"{expected[3]}/v2/models/digits/infer"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param("digits:8080", "must start with http:// or https://", id="no-scheme"),
        pytest.param("ftp://host", "must start with http:// or https://", id="ftp"),
        pytest.param("http://", "has no host", id="no-host"),
        pytest.param("http://host:notaport", "is not a valid URL", id="bad-port"),
        pytest.param("http://admin:s3cret@host:8080", "credentials in the URL are not supported", id="credentials"),
        pytest.param("http://host:8080?token=s3cret", "must not carry a query", id="query"),
    ],
)
def test_build_endpoint_refuses_and_never_echoes_credentials(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        oipclient.build_endpoint(url)
    assert "s3cret" not in str(caught.value)


def test_model_names_are_quoted_into_the_path() -> None:
    assert oipclient.build_endpoint("http://h").model_path("a b/c") == "/v2/models/a%20b%2Fc"


@pytest.mark.parametrize(
    ("attempt", "seconds"),
    [pytest.param(0, 0.2, id="first"), pytest.param(2, 0.8, id="doubles"), pytest.param(9, 2.0, id="capped")],
)
def test_plan_backoff(attempt: int, seconds: float) -> None:
    assert oipclient.plan_backoff(attempt) == pytest.approx(seconds)


# ----------------------------------------------------------------------------------------- metadata specs

DIGITS_METADATA = {
    "name": "digits",
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
}


def test_build_tensor_specs_of_the_servers_metadata() -> None:
    spec = oip.build_model_metadata("digits", "1", [Spec("input", "FP32", (-1, 64))], [Spec("y", "FP16", (-1, 3))])
    assert oipclient.build_tensor_specs(spec, "inputs") == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert oipclient.build_tensor_specs(spec, "outputs") == [{"name": "y", "datatype": "FP16", "shape": [-1, 3]}]


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        pytest.param({}, "declares no inputs", id="no-inputs"),
        pytest.param({"inputs": []}, "declares no inputs", id="empty-inputs"),
        pytest.param({"inputs": [{"datatype": "FP32", "shape": [1]}]}, "without a string 'name'", id="no-name"),
        pytest.param({"inputs": [{"name": "t", "datatype": "BYTES", "shape": [-1]}]}, "numbers only", id="bytes"),
        pytest.param({"inputs": [{"name": "t", "datatype": "FP32", "shape": "-1,64"}]}, "not a list", id="shape"),
        pytest.param({"inputs": [{"name": "t", "datatype": "FP32", "shape": []}]}, "not a list", id="rank-0"),
    ],
)
def test_build_tensor_specs_names_what_is_wrong(metadata: dict[str, Any], message: str) -> None:
    with pytest.raises(oipclient.EndpointError, match=message):
        oipclient.build_tensor_specs(metadata, "inputs")


# --------------------------------------------------------------------------------- requests and responses


@dataclass(frozen=True)
class Spec:
    name: str
    datatype: str
    shape: tuple[int, ...]


@pytest.mark.parametrize(
    ("specs", "arrays"),
    [
        pytest.param([Spec("input", "FP32", (-1, 64))], [np.linspace(0, 1, 3 * 64, dtype=np.float32).reshape(3, 64)],
                     id="fp32"),
        pytest.param([Spec("ids", "INT64", (-1, -1)), Spec("mask", "INT64", (-1, -1))],
                     [np.arange(10, dtype=np.int64).reshape(2, 5), np.ones((2, 5), dtype=np.int64)], id="two-int64"),
        pytest.param([Spec("x", "FP16", (-1, 2))], [np.array([[0.5, -1.25]], dtype=np.float16)], id="fp16"),
        pytest.param([Spec("f", "BOOL", (-1,))], [np.array([True, False])], id="bool"),
        pytest.param([Spec("x", "FP32", (-1, 2))], [np.arange(8, dtype=np.float32).reshape(2, 4)[:, ::2]],
                     id="non-contiguous"),
    ],
)
def test_build_infer_body_is_what_the_server_parses(specs: list[Spec], arrays: list[np.ndarray]) -> None:
    """The request the client builds is accepted by the server's own parser, exactly (no float rounding)."""
    dicts = [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]
    body = oipclient.build_infer_body(dicts, arrays, "out")
    parsed = oip.build_infer_request(body, specs, [Spec("out", "FP32", (-1,))])
    assert parsed.output_indices == [0]
    for got, want in zip(parsed.arrays, arrays, strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype


@pytest.mark.parametrize(
    ("datatype", "array"),
    [
        pytest.param("FP32", np.array([[0.1, -2.5e-8, 3.4e38]], dtype=np.float32), id="fp32-exact"),
        pytest.param("FP16", np.array([[0.1, 65504.0, -0.0]], dtype=np.float16), id="fp16"),
        pytest.param("INT64", np.array([[2**40, -7, 0]], dtype=np.int64), id="int64"),
    ],
)
def test_build_output_array_reads_what_the_server_encodes(datatype: str, array: np.ndarray) -> None:
    outputs = [Spec("other", "FP32", (-1, 3)), Spec("y", datatype, (-1, 3))]
    body = oip.build_infer_response("m", "1", None, outputs, [array.astype(np.float32), array], [1, 0])
    got = oipclient.build_output_array(body, {"name": "y", "datatype": datatype, "shape": [-1, 3]}, rows=1)
    np.testing.assert_array_equal(got, array)
    assert got.dtype == array.dtype


def _response(**item: Any) -> bytes:
    output = {"name": "logits", "datatype": "FP32", "shape": [2, 3], "data": [0, 1, 2, 3, 4, 5]} | item
    return orjson.dumps({"model_name": "m", "outputs": [output]})


LOGITS = {"name": "logits", "datatype": "FP32", "shape": [-1, 3]}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"<html>oops</html>", "not JSON", id="html"),
        pytest.param(b"[1, 2]", "no 'outputs' list", id="array"),
        pytest.param(b'{"outputs": {"logits": []}}', "no 'outputs' list", id="outputs-object"),
        pytest.param(_response(name="probs"), "no output 'logits' \\(outputs: \\['probs'\\]\\)", id="other-output"),
        pytest.param(_response(datatype="BYTES"), "not a numeric tensor", id="bytes"),
        pytest.param(_response(shape="2x3"), "'shape' must be a list", id="shape-string"),
        pytest.param(_response(shape=[2, 4], data=list(range(8))), "does not match the declared \\[-1, 3\\]",
                     id="wrong-width"),
        pytest.param(_response(shape=[6], data=list(range(6))), "does not match the declared", id="wrong-rank"),
        pytest.param(_response(shape=[3, 3], data=list(range(9))), "3 rows for a request of 2", id="wrong-rows"),
        pytest.param(_response(data=[0, 1, 2]), "3 data elements do not fill shape \\[2, 3\\]", id="short-data"),
        pytest.param(_response(data=[[0, 1], [2]]), "not a regular array", id="ragged"),
        pytest.param(_response(data=["a", "b", "c", "d", "e", "f"]), "is not numeric", id="strings"),
        pytest.param(_response(data=None), "'data' must be a list", id="no-data"),
    ],
)
def test_build_output_array_names_what_is_malformed(body: bytes, message: str) -> None:
    with pytest.raises(oipclient.EndpointError, match=message):
        oipclient.build_output_array(body, LOGITS, rows=2)


def test_build_output_array_accepts_nested_data() -> None:
    got = oipclient.build_output_array(_response(data=[[0, 1, 2], [3, 4, 5]]), LOGITS, rows=2)
    np.testing.assert_array_equal(got, np.arange(6, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize(
    ("body", "excerpt"),
    [
        pytest.param(b'{"error": "unknown model \'x\'"}', "unknown model 'x'", id="oip-error"),
        pytest.param(b"<h1>502 Bad\n  Gateway</h1>", "<h1>502 Bad Gateway</h1>", id="proxy-page"),
        pytest.param(b"x" * 5000, "x" * 197 + "...", id="long"),
        pytest.param(b"\xff\xfe", "\ufffd\ufffd", id="not-utf8"),
    ],
)
def test_build_error_excerpt(body: bytes, excerpt: str) -> None:
    assert oipclient.build_error_excerpt(body) == excerpt


# ---------------------------------------------------------------------------------- on the wire (a stub)


class Scripted(http.server.BaseHTTPRequestHandler):
    """Answers by path: /v2/models/<behaviour>/infer."""

    protocol_version = "HTTP/1.1"
    requests: list[str] = []

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("content-length", 0)))
        behaviour = self.path.split("/")[3]
        type(self).requests.append(behaviour)
        if behaviour == "slow":
            time.sleep(1.0)
        if behaviour == "huge-declared":
            self._send(200, b"x" * 4096)
        elif behaviour == "huge-unannounced":  # no length: the body ends when the connection closes
            self.send_response(200)
            self.send_header("connection", "close")
            self.end_headers()
            self.wfile.write(b"x" * 4096)
            self.close_connection = True
        elif behaviour == "error":
            self._send(500, b'{"error": "injected fault (fault injection is on)"}')
        elif behaviour == "hangs-up":  # closes idle keep-alive connections without saying so
            self._send(200, b"{}")
            self.close_connection = True
        else:
            self._send(200, b'{"outputs": []}')

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def stub() -> Iterator[oipclient.Endpoint]:
    Scripted.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield oipclient.build_endpoint(f"http://127.0.0.1:{server.server_address[1]}")
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("behaviour", "timeout_s", "message"),
    [
        pytest.param("huge-declared", 10.0, "response of 4096 bytes exceeds the limit of 1024", id="content-length"),
        pytest.param("huge-unannounced", 10.0, "response exceeds the limit of 1024 bytes", id="no-length"),
        pytest.param("slow", 0.2, "no answer within 0.2 s", id="timeout"),
        pytest.param("error", 10.0, "HTTP 500: injected fault \\(fault injection is on\\)", id="http-500"),
    ],
)
def test_answers_are_capped_and_never_retried(
    stub: oipclient.Endpoint, behaviour: str, timeout_s: float, message: str
) -> None:
    sleeps: list[float] = []
    client = oipclient.OipClient(stub, timeout_s=timeout_s, retries=3, max_response_bytes=1024, sleep=sleeps.append)
    with pytest.raises(oipclient.EndpointError, match=message) as caught:
        client.query_infer(behaviour, b"{}")
    client.close()
    assert str(caught.value).startswith(f"inference at {stub.display}: ")
    assert Scripted.requests == [behaviour] and sleeps == [] and client.connection_retries == 0


def test_a_connection_closed_by_the_server_while_idle_is_reopened_at_once(stub: oipclient.Endpoint) -> None:
    sleeps: list[float] = []
    client = oipclient.OipClient(stub, retries=0, sleep=sleeps.append)
    for _ in range(3):
        assert client.query_infer("hangs-up", b"{}") == b"{}"
        time.sleep(0.05)  # let the server's close arrive
    client.close()
    assert Scripted.requests == ["hangs-up"] * 3 and sleeps == [] and client.connection_retries == 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_connection_refused_is_retried_with_backoff_then_named() -> None:
    sleeps: list[float] = []
    port = _free_port()
    client = oipclient.OipClient(oipclient.build_endpoint(f"http://127.0.0.1:{port}"), retries=3, sleep=sleeps.append)
    with pytest.raises(oipclient.EndpointError) as caught:
        client.fetch_metadata("digits")
    assert str(caught.value) == (
        f"could not connect to http://127.0.0.1:{port}: ConnectionRefusedError: Connection refused (4 attempts)"
    )
    assert sleeps == pytest.approx([0.2, 0.4, 0.8]) and client.connection_retries == 3


def test_a_server_that_starts_late_is_reached_by_the_retries() -> None:
    port = _free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Scripted, bind_and_activate=False)
    server.allow_reuse_address = True
    started = threading.Event()

    def start_late() -> None:
        time.sleep(0.5)
        server.server_bind()
        server.server_activate()
        started.set()
        server.serve_forever()

    threading.Thread(target=start_late, daemon=True).start()
    client = oipclient.OipClient(oipclient.build_endpoint(f"http://127.0.0.1:{port}"), retries=5)
    try:
        assert client.query_infer("fine", b"{}") == b'{"outputs": []}'
    finally:
        client.close()
        if started.wait(5):
            server.shutdown()
        server.server_close()
    assert client.connection_retries >= 1
