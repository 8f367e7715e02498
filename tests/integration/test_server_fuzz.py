"""The real inference server (`shipyard-runtime serve` in its own process) under generated hostile traffic.

A seeded generator writes requests over raw sockets: malformed request lines and headers, bad or missing
Content-Length, chunked garbage, wrong methods and paths, invalid JSON, valid JSON with wrong shapes, datatypes
and huge dimensions, binary tensor data (the extension's framing, valid and with lying header lengths and sizes),
oversized and truncated bodies, pipelined mixes, slow clients sending a byte at a time,
binary junk, with valid inference requests interleaved. Meanwhile clients that stall half-way through a request
hold connections open. The server must never die, answer every client error with a 4xx (never a 5xx), keep
answering valid requests correctly, answer the stalled clients with 408 and close them, keep its memory bounded
(VmRSS), and still be live and ready at the end. Counts by status code are printed.

Needs no cluster (it is in the integration tier for its length: about 10,000 requests). SHIPYARD_SOAK=1 runs
the long variant (200,000 requests; `make soak`); SHIPYARD_FUZZ_REQUESTS sets the count.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from shipyard.runtime import models
from shipyard.runtime.artifacts import store

pytestmark = pytest.mark.integration

SEED = 20261128
SOAK = os.environ.get("SHIPYARD_SOAK") == "1"
REQUESTS = int(os.environ.get("SHIPYARD_FUZZ_REQUESTS") or (200_000 if SOAK else 10_000))
MAX_PAYLOAD = 256 * 1024  # --max-payload-bytes: 413 above
KEEP_ALIVE_S = 2.0  # --keep-alive-timeout-s: idle and stalled connections are closed after this
RSS_GROWTH_LIMIT = 64 * 1024 * 1024  # VmRSS growth allowed over the run (after warm-up)
STALLED_CLIENTS = 16
SLOW_CLIENTS = 4
READ_TIMEOUT_S = 20.0  # a response not started within this is a hang (a failure), far above any real latency
MODEL = "digits"
INFER = f"/v2/models/{MODEL}/infer".encode()


# ---------------------------------------------------------------------------------------------------------------
# The server process


@dataclass
class Served:
    process: subprocess.Popen[str]
    port: int
    log: list[str]
    module: torch.nn.Module

    def rss(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert match, status
        return int(match.group(1)) * 1024


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    torch.manual_seed(0)
    module = models.build_digits_mlp(hidden=(32, 16)).eval()
    path = tmp_path_factory.mktemp("fuzz") / MODEL
    store.save_model(module, path, name=MODEL, factory="shipyard.runtime.models:build_digits_mlp",
                         factory_kwargs={"hidden": [32, 16]},
                         inputs=[{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
                         outputs=[{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}])
    command = [sys.executable, "-m", "shipyard.runtime.cli", "serve", "--artifact", str(path), "--host", "127.0.0.1",
               "--port", "0", "--threads", "1", "--max-payload-bytes", str(MAX_PAYLOAD),
               "--keep-alive-timeout-s", str(KEEP_ALIVE_S), "--drain-propagation-s", "0"]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    port: list[int] = []
    listening = threading.Event()

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            log.append(line.rstrip())
            match = re.search(r"Listened on 127\.0\.0\.1:(\d+)", line)
            if match:
                port.append(int(match.group(1)))
                listening.set()

    threading.Thread(target=pump, daemon=True).start()
    served = Served(process, 0, log, module)
    try:
        assert listening.wait(120), "\n".join(log)
        served.port = port[0]
        _wait_ready(served)
        yield served
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def _wait_ready(served: Served) -> None:
    for _ in range(1200):
        assert served.process.poll() is None, "\n".join(served.log)
        try:
            if exchange(served.port, [b"GET /v2/health/ready HTTP/1.1\r\nhost: x\r\n\r\n"])[0].status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("the server never became ready:\n" + "\n".join(served.log))


# ---------------------------------------------------------------------------------------------------------------
# A raw HTTP/1.1 client


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def read_response(sock: socket.socket, buffer: bytearray, head_only: bool = False) -> Response | None:
    """One response from the socket (1xx interim responses skipped); None when the server closed first."""
    while True:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                if buffer:
                    raise AssertionError(f"the server closed in the middle of a response: {bytes(buffer[:200])!r}")
                return None
            buffer += chunk
        end = buffer.index(b"\r\n\r\n")
        head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
        del buffer[:end + 4]
        match = re.fullmatch(r"HTTP/1\.1 (\d{3}) .*", head[0])
        assert match, f"not an HTTP/1.1 status line: {head[0]!r}"
        status = int(match.group(1))
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
        if 100 <= status < 200:
            continue
        length = 0 if head_only else int(headers.get("content-length", "0"))
        while len(buffer) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError("the server closed in the middle of a response body")
            buffer += chunk
        body = bytes(buffer[:length])
        del buffer[:length]
        return Response(status, headers, body)


def exchange(port: int, chunks: list[bytes], responses: int = 1, pause_s: float = 0.0, head_only: bool = False,
             then_close: bool = False) -> list[Response | None]:
    """Send chunks on a new connection and read up to `responses` responses (None: closed before one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
                if pause_s:
                    time.sleep(pause_s)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (e.g. 413) and closed before it read everything: the answer is what counts
        if then_close:
            return []
        buffer = bytearray()
        out: list[Response | None] = []
        try:
            for _ in range(responses):
                response = read_response(sock, buffer, head_only)
                out.append(response)
                if response is None or response.headers.get("connection") == "close":
                    break
        except ConnectionResetError:
            out.append(None)
        return out


# ---------------------------------------------------------------------------------------------------------------
# The generator

OK, CLIENT_ERROR, NOTHING = "ok", "4xx", "nothing"  # what each response must be


@dataclass
class Probe:
    category: str
    chunks: list[bytes]
    expect: list[str]  # per response, in order; the server may close after the first client error
    check: Callable[[Response], None] | None = None  # for valid inference: the answer is right
    pause_s: float = 0.0
    head_only: bool = False
    then_close: bool = False  # the client hangs up without waiting (truncated requests)


def request(method: bytes, path: bytes, body: bytes = b"", headers: list[bytes] | None = None,
            length: bool = True, version: bytes = b"HTTP/1.1") -> bytes:
    lines = [method + b" " + path + b" " + version, b"host: fuzz", *(headers or [])]
    if length and (body or method == b"POST"):
        lines.append(b"content-length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class Fuzz:
    """Seeded: the same seed gives the same sequence of probes."""

    def __init__(self, seed: int, module: torch.nn.Module) -> None:
        self.rng = random.Random(seed)
        generator = torch.Generator().manual_seed(seed)
        self.valid: list[tuple[bytes, torch.Tensor]] = []
        for i in range(48):
            rows = 1 + i % 6
            pixels = torch.rand(rows, 64, generator=generator) * 16
            body = json.dumps({"id": f"v{i}", "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [rows, 64],
                                                          "data": pixels.reshape(-1).tolist()}]}).encode()
            with torch.inference_mode():
                self.valid.append((body, module(pixels)))
        self.makers: list[tuple[float, Callable[[], Probe]]] = [
            (20, self.valid_infer), (3, self.valid_get), (7, self.bad_request_line), (7, self.bad_headers),
            (7, self.bad_content_length), (7, self.chunked_garbage), (9, self.wrong_method_or_path),
            (9, self.invalid_json), (14, self.wrong_tensors), (3, self.oversized), (3, self.truncated),
            (4, self.binary_junk), (3, self.pipelined), (2, self.slow_valid), (1, self.expect_continue),
            (1, self.http10), (4, self.valid_binary), (10, self.wrong_binary),
        ]
        # the same valid requests in the binary tensor data extension's framing: (JSON header, tensor bytes)
        self.valid_binary_parts: list[tuple[bytes, bytes]] = []
        for i, (body, _) in enumerate(self.valid):
            item = json.loads(body)["inputs"][0]
            raw = struct.pack(f"<{len(item['data'])}f", *item["data"])
            header = {"id": f"v{i}", "inputs": [{"name": "pixels", "datatype": "FP32", "shape": item["shape"],
                                                 "parameters": {"binary_data_size": len(raw)}}]}
            self.valid_binary_parts.append((json.dumps(header).encode(), raw))

    def probe(self) -> Probe:
        makers, weights = zip(*((m, w) for w, m in self.makers), strict=True)
        maker: Callable[[], Probe] = self.rng.choices(makers, weights)[0]
        return maker()

    def junk(self, low: int, high: int, alphabet: bytes | None = None) -> bytes:
        n = self.rng.randint(low, high)
        if alphabet is None:
            return bytes(self.rng.getrandbits(8) for _ in range(n))
        return bytes(self.rng.choice(alphabet) for _ in range(n))

    def missing_path(self) -> bytes:
        """A path no endpoint has (whatever the parser makes of the rest, the answer is a 4xx)."""
        return b"/x-" + self.junk(0, 12, b"abcdefghijklmnopqrstuvwxyz0123456789-._~%")

    def checker(self, expected: torch.Tensor, request_id: str) -> Callable[[Response], None]:
        def check(response: Response) -> None:
            document = json.loads(response.body)
            assert document["id"] == request_id and document["model_name"] == MODEL, document
            (output,) = document["outputs"]
            assert output["shape"] == list(expected.shape)
            got = torch.tensor(output["data"]).reshape(expected.shape)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        return check

    def pick_valid(self) -> tuple[bytes, torch.Tensor, str]:
        i = self.rng.randrange(len(self.valid))
        return self.valid[i][0], self.valid[i][1], f"v{i}"

    # -- valid traffic
    def valid_infer(self) -> Probe:
        body, expected, rid = self.pick_valid()
        return Probe("valid-infer", [request(b"POST", INFER, body)], [OK], self.checker(expected, rid))

    def valid_get(self) -> Probe:
        path = self.rng.choice([b"/v2/health/live", b"/v2/health/ready", b"/v2", b"/v2/models/digits",
                                b"/v2/models/digits/ready", b"/metrics", b"/v2/health/live?probe=1"])
        return Probe("valid-get", [request(b"GET", path)], [OK])

    def slow_valid(self) -> Probe:
        body, expected, rid = self.pick_valid()
        wire = request(b"POST", INFER, body)
        cuts = sorted(self.rng.sample(range(1, len(wire)), self.rng.randint(2, 8)))
        chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
        return Probe("slow-valid", chunks, [OK], self.checker(expected, rid), pause_s=0.002)

    def expect_continue(self) -> Probe:
        body, expected, rid = self.pick_valid()
        head = request(b"POST", INFER, b"", [b"expect: 100-continue", b"content-length: %d" % len(body)],
                       length=False)
        return Probe("expect-continue", [head, body], [OK], self.checker(expected, rid), pause_s=0.002)

    def http10(self) -> Probe:
        return Probe("http-1.0", [request(b"GET", b"/v2/health/live", version=b"HTTP/1.0")], [OK])

    # -- the binary tensor data extension
    def binary_checker(self, expected: torch.Tensor, request_id: str,
                       binary_output: bool) -> Callable[[Response], None]:
        def check(response: Response) -> None:
            length = int(response.headers.get("inference-header-content-length", len(response.body)))
            document = json.loads(response.body[:length])
            assert document["id"] == request_id, document
            (output,) = document["outputs"]
            if binary_output:
                size = output["parameters"]["binary_data_size"]
                assert size == len(response.body) - length == expected.numel() * 4
                got = torch.tensor(struct.unpack(f"<{expected.numel()}f", response.body[length:]))
            else:
                got = torch.tensor(output["data"])
            torch.testing.assert_close(got.reshape(expected.shape), expected, rtol=1e-4, atol=1e-4)
        return check

    def valid_binary(self) -> Probe:
        i = self.rng.randrange(len(self.valid))
        header, raw = self.valid_binary_parts[i]
        binary_output = self.rng.random() < 0.5
        if binary_output:
            document = json.loads(header)
            document["parameters"] = {"binary_data_output": True}
            header = json.dumps(document).encode()
        wire = request(b"POST", INFER, header + raw, [b"inference-header-content-length: %d" % len(header)])
        return Probe("valid-binary", [wire], [OK], self.binary_checker(self.valid[i][1], f"v{i}", binary_output))

    def wrong_binary(self) -> Probe:
        header, raw = self.valid_binary_parts[self.rng.randrange(len(self.valid))]
        document = json.loads(header)
        item = document["inputs"][0]
        length: bytes = b"%d" % len(header)
        mutation = self.rng.randrange(12)
        if mutation == 0:  # the header length points past the body, into it, or is not a number
            length = self.rng.choice([b"%d" % (len(header) + len(raw) + self.rng.randint(1, 10**6)), b"-1", b"0x10",
                                      b"1e3", b"", b" ", b"99999999999999999999999999", b"%d" % (len(header) // 2)])
        elif mutation == 1:  # sizes that do not add up to the binary part
            item["parameters"]["binary_data_size"] += self.rng.choice([-4, -1, 1, 4, 10**9, 2**63, 10**40])
        elif mutation == 2:
            item["parameters"]["binary_data_size"] = self.rng.choice([-1, -(2**63), 1.5, "64", None, [], True, {}])
        elif mutation == 3:  # a dtype whose element size disagrees with the bytes
            item["datatype"] = self.rng.choice(["FP64", "FP16", "BF16", "INT8", "BOOL", "BYTES", "UINT64"])
        elif mutation == 4:
            item["shape"] = [item["shape"][0], self.rng.choice([32, 63, 65, 128, 10**12])]
        elif mutation == 5:
            item["data"] = [0.0] * 64
        elif mutation == 6:
            raw = raw[: self.rng.randrange(len(raw))]
        elif mutation == 7:
            raw = raw + self.junk(1, 64)
        elif mutation == 8:
            document["parameters"] = {"binary_data_output": self.rng.choice(["true", 1, None, [True]])}
        elif mutation == 9:
            document["outputs"] = [{"name": "logits", "parameters": self.rng.choice(
                [{"binary_data": "yes"}, {"binary_data": 1}, {"classification": 3}, [True]])}]
        elif mutation == 10:
            item["parameters"] = self.rng.choice([[], "binary", 7])
        else:  # junk where the JSON header should be
            header_junk = self.junk(1, 200)
            wire = request(b"POST", INFER, header_junk + raw,
                           [b"inference-header-content-length: %d" % len(header_junk)])
            return Probe("wrong-binary", [wire], [CLIENT_ERROR])
        header = json.dumps(document).encode()
        if mutation != 0:
            length = b"%d" % len(header)
        wire = request(b"POST", INFER, header + raw, [b"inference-header-content-length: " + length])
        return Probe("wrong-binary", [wire], [CLIENT_ERROR])

    # -- malformed HTTP
    def bad_request_line(self) -> Probe:
        path = self.missing_path()
        wire = self.rng.choice([
            self.junk(1, 200, bytes(range(33, 127))) + b"\r\n\r\n",
            b"get " + path + b" HTTP/1.1\r\n\r\n",
            b"GET  " + path + b"  HTTP/1.1\r\n\r\n",
            b"GET " + path + b" HTTP/9.9\r\n\r\n",
            b"GET " + path + b" HTX/1.1\r\n\r\n",
            b"GET " + path + b"\x00 HTTP/1.1\r\n\r\n",
            b"GET " + path + b"\r\n\r\n",
            b"GE\x7fT " + path + b" HTTP/1.1\r\n\r\n",
            b"GET " + path + b" HTTP/1.1 extra\r\n\r\n",
            b"GET http://fuzz" + path + b" HTTP/1.1\r\nhost: fuzz\r\n\r\n",
            b"GET " + b"/x" * self.rng.randint(33_000, 40_000) + b" HTTP/1.1\r\n\r\n",  # > 64 KiB: 431
            b"CONNECT fuzz:443 HTTP/1.1\r\nhost: fuzz:443\r\n\r\n",
            b" " + path + b" HTTP/1.1\r\n\r\n",
            b"\r\n\r\n\r\nGET" + path + b"HTTP/1.1\r\n\r\n",
        ])
        return Probe("bad-request-line", [wire], [CLIENT_ERROR])

    def bad_headers(self) -> Probe:
        path = self.missing_path()
        header = self.rng.choice([
            b"no-colon-here",
            b"bad name: 1",
            b"bad@name{}: 1",
            b"x-folded: a\r\n  continued",
            b"x-nul: a\x00b",
            b": empty-name",
            b"x-ctl: \x01\x02\x7f",
            b"x-big: " + b"a" * self.rng.randint(66_000, 70_000),
            b"\r\n".join(b"x-many-%d: %d" % (i, i) for i in range(self.rng.randint(100, 2000))),
            b"x-latin: \xe9\xff\xfe",
            b"host: second-host",
            b"content-type: application/json; charset=\xff",
            b"connection: upgrade\r\nupgrade: websocket",
            b"transfer-encoding: chunked\r\ntransfer-encoding: chunked",
        ])
        wire = b"GET " + path + b" HTTP/1.1\r\nhost: fuzz\r\n" + header + b"\r\n\r\n"
        return Probe("bad-headers", [wire], [CLIENT_ERROR])

    def bad_content_length(self) -> Probe:
        body = self.rng.choice([b"{}", b'{"inputs": []}', self.junk(1, 64)])
        length = self.rng.choice([b"-1", b"abc", b"1 2", b"99999999999999999999999999", b"+5", b"0x10", b"",
                                  b"%d, %d" % (len(body), len(body) + 1), b"1e3"])
        headers = [b"content-length: " + length]
        if self.rng.random() < 0.3:
            headers = [b"content-length: %d" % len(body), b"transfer-encoding: chunked"]
        if self.rng.random() < 0.2:  # no length at all: the body is read as the next (garbage) request
            headers = []
        wire = request(b"POST", INFER, body, headers, length=False)
        # Without a length the body is read as a second request: garbage, or a truncated one (not answered).
        return Probe("bad-content-length", [wire], [CLIENT_ERROR] * (1 if headers else 2))

    def chunked_garbage(self) -> Probe:
        good = self.rng.choice([b"{not json", b'{"inputs": 5}', b"[]"])
        body = self.rng.choice([
            b"zz\r\n" + good + b"\r\n0\r\n\r\n",
            b"%x\r\n" % len(good) + good + b"0\r\n\r\n",  # missing CRLF after the data
            b"ffffffffffffffffffff\r\n" + good + b"\r\n0\r\n\r\n",
            b"%x;ext=\x01\r\n" % len(good) + good + b"\r\n0\r\n\r\n",
            b"%x\r\n" % len(good) + good + b"\r\n0\r\nbad trailer\r\n\r\n",
            b"-1\r\n" + good + b"\r\n0\r\n\r\n",
            b"%x\r\n" % len(good) + good + b"\r\n0\r\n\r\n",  # well-formed chunking, bad JSON inside
            b"%X\r\n" % (MAX_PAYLOAD + 10) + b"a" * (MAX_PAYLOAD + 10) + b"\r\n0\r\n\r\n",  # over the limit: 413
        ])
        encoding = self.rng.choice([b"chunked", b"chunked", b"gzip, chunked", b"chunked, chunked", b"identity"])
        wire = request(b"POST", INFER, body, [b"transfer-encoding: " + encoding], length=False)
        return Probe("chunked-garbage", [wire], [CLIENT_ERROR])

    # -- HTTP that parses, aimed wrong
    def wrong_method_or_path(self) -> Probe:
        choice = self.rng.random()
        if choice < 0.4:
            method = self.rng.choice([b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"TRACE", b"PROPFIND", b"HEAD"])
            path = self.rng.choice([b"/v2/health/live", b"/v2/health/ready", INFER, b"/v2/models/digits", b"/v2",
                                    b"/metrics", b"/v2/models/digits/ready"])
        elif choice < 0.55:
            method, path = b"GET", INFER
        elif choice < 0.7:
            method, path = b"POST", self.rng.choice([b"/v2/health/live", b"/metrics", b"/v2/models/digits"])
        else:
            method = self.rng.choice([b"GET", b"POST"])
            path = self.rng.choice([
                b"/v2/models/other/infer", b"/v2/models/digits/versions/9/infer", b"/v2/models//infer",
                b"/v2/models/digits/infer/extra", b"/%zz", b"/v2/models/%ff%fe/ready", b"/..%2f..%2fetc/passwd",
                b"/v2/models/digits/versions//ready", b"/v2/models/" + self.junk(1, 300, b"abc%/._-") + b"/infer",
                b"*", b"/" + self.junk(1, 2000, bytes(range(33, 127)).replace(b"?", b"").replace(b"#", b"")),
                self.missing_path(),
            ])
            if path.startswith(b"/v2/models/") and path.endswith(b"/infer") and method == b"GET":
                method = b"POST"
        body = b"{}" if method == b"POST" else b""
        return Probe("wrong-method-or-path", [request(method, path, body)], [CLIENT_ERROR],
                     head_only=method == b"HEAD")

    def invalid_json(self) -> Probe:
        valid = self.pick_valid()[0]
        body = self.rng.choice([
            self.junk(1, 512),
            valid[: self.rng.randrange(1, len(valid))],
            b"{", b"[]", b"null", b"1", b'"inputs"', b"", b"{\"inputs\": NaN}", b"{\"inputs\": [Infinity]}",
            b"{\"inputs\": [1e999]}", b"[" * self.rng.randint(1000, 100_000),
            b"\xef\xbb\xbf" + valid, valid.replace(b'"pixels"', b'"pix\xffels"'),
            b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [%s]}]}'
            % b",".join([b"1" + b"0" * 40] * 64),  # a number (orjson: a float) too large for FP32
            valid + b"trailing",
            b"{'single': 'quotes'}",
        ])
        return Probe("invalid-json", [request(b"POST", INFER, body)], [CLIENT_ERROR])

    def wrong_tensors(self) -> Probe:
        rows = self.rng.randint(1, 4)
        data: Any = [self.rng.random() for _ in range(rows * 64)]
        item: dict[str, Any] = {"name": "pixels", "datatype": "FP32", "shape": [rows, 64], "data": data}
        document: dict[str, Any] = {"inputs": [item]}
        mutation = self.rng.randrange(26)
        if mutation == 0:
            item["shape"] = [rows, 63]
        elif mutation == 1:
            item["shape"] = [rows, 64, 1]
        elif mutation == 2:
            item["shape"] = [self.rng.choice([10**18, 2**63, 2**64 + 1, 10**40]), 64]
        elif mutation == 3:
            item["shape"] = [rows, self.rng.choice([10**9, 2**31, 10**30])]
        elif mutation == 4:
            item["shape"] = [-1, 64]
        elif mutation == 5:
            item["shape"] = [0, 64]
            item["data"] = []
        elif mutation == 6:
            item["shape"] = self.rng.choice(["1,64", {"0": 1}, [1.0, 64.0], [True, 64], None, [], [[1], [64]]])
        elif mutation == 7:
            item["datatype"] = self.rng.choice(["FP64", "INT8", "BYTES", "BF16", "fp32", "", "FP3", 32, None])
        elif mutation == 8:
            data[self.rng.randrange(len(data))] = self.rng.choice(["a", None, True, {}, [], [1, 2]])
        elif mutation == 9:
            del data[self.rng.randrange(len(data))]
        elif mutation == 10:
            data.append(0.5)
        elif mutation == 11:
            data[self.rng.randrange(len(data))] = self.rng.choice([1e39, -1e300, 3.5e38 * 2])
        elif mutation == 12:
            item["data"] = [data[:64]] + [data[64:70]] if rows > 1 else [[data[:32]], data[32:]]  # ragged
        elif mutation == 13:
            item["data"] = self.rng.choice([{"0": 1}, "data", 7, None])
        elif mutation == 14:
            del item[self.rng.choice(["name", "datatype", "shape", "data"])]
        elif mutation == 15:
            item["name"] = self.rng.choice(["input", "", 7, None, "PIXELS"])
        elif mutation == 16:
            document["inputs"] = [item, dict(item, name="second")]
        elif mutation == 17:
            document["inputs"] = self.rng.choice([item, [], "pixels", None, [[item]], [7]])
        elif mutation == 18:
            document["id"] = self.rng.choice([7, ["x"], {"a": 1}, True])
        elif mutation == 19:
            document["parameters"] = self.rng.choice([[], "p", 5])
        elif mutation == 20:
            document["outputs"] = self.rng.choice([{"name": "logits"}, [{"name": "nope"}], [{}], ["logits"],
                                                   [{"name": "logits"}, {"name": "logits"}], "logits"])
        elif mutation == 21:
            del document["inputs"]
            document["input"] = [item]
        elif mutation == 22:
            item["data"] = [data[:64]] * rows if rows > 1 else [[[x] for x in data]]
            item["shape"] = [rows, 65]
        elif mutation == 23:
            depth = self.rng.randint(33, 200)
            nested: Any = 1.0
            for _ in range(depth):
                nested = [nested]
            item["data"] = nested
            item["shape"] = [1, 64]
        elif mutation == 24:
            item["shape"] = [rows, 64]
            item["data"] = [self.rng.choice([True, False]) for _ in range(rows * 64)]
        else:
            item["shape"] = [2**62, 2**62]
            item["data"] = [1.0]
        body = json.dumps(document).encode()
        return Probe("wrong-tensors", [request(b"POST", INFER, body)], [CLIENT_ERROR])

    def oversized(self) -> Probe:
        size = self.rng.randint(MAX_PAYLOAD + 1, 4 * MAX_PAYLOAD)
        if self.rng.random() < 0.5:  # declared: refused before the body is read
            head = request(b"POST", INFER, b"", [b"content-length: %d" % size], length=False)
            return Probe("oversized", [head + b"[" * min(size, 1000)], [CLIENT_ERROR])
        return Probe("oversized", [request(b"POST", INFER, b"[" * size)], [CLIENT_ERROR])

    def truncated(self) -> Probe:
        body = self.pick_valid()[0]
        head = request(b"POST", INFER, b"", [b"content-length: %d" % len(body)], length=False)
        return Probe("truncated", [head + body[: self.rng.randrange(0, len(body))]], [NOTHING], then_close=True)

    def binary_junk(self) -> Probe:
        junk = self.junk(1, 4096)
        if junk[:1] in b"\r\n":
            junk = b"\x00" + junk  # leading CRLFs are skipped before a request: keep the junk complete
        return Probe("binary-junk", [junk], [CLIENT_ERROR])

    def pipelined(self) -> Probe:
        body, expected, rid = self.pick_valid()
        first = request(b"POST", INFER, body)
        second = request(b"HEAD", b"/v2/health/live")  # 405: a response to HEAD has no body
        third = request(b"GET", b"/v2/health/live")
        junk = self.rng.choice([b"GARBAGE\r\n\r\n", b"GET /x HTTP/1.1\r\nbad header\r\n\r\n"])
        return Probe("pipelined", [first + second + third + junk], [OK, CLIENT_ERROR, OK, CLIENT_ERROR],
                     check=self.checker(expected, rid))


# ---------------------------------------------------------------------------------------------------------------
# Running probes


@dataclass
class Tally:
    by_status: Counter[str] = field(default_factory=Counter)
    by_category: Counter[str] = field(default_factory=Counter)
    seconds: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(message)


def run_probe(port: int, probe: Probe, tally: Tally) -> None:
    started = time.perf_counter()
    try:
        _run_probe(port, probe, tally)
    finally:
        tally.seconds[probe.category] += time.perf_counter() - started


def _run_probe(port: int, probe: Probe, tally: Tally) -> None:
    tally.by_category[probe.category] += 1
    if probe.then_close:
        exchange(port, probe.chunks, pause_s=probe.pause_s, then_close=True)
        tally.by_status["(client hung up)"] += 1
        return
    head_only = probe.head_only
    if probe.category == "pipelined":  # read the HEAD answer's head only
        responses = _exchange_pipelined(port, probe)
    else:
        responses = exchange(port, probe.chunks, len(probe.expect), probe.pause_s, head_only)
    if not responses or responses[0] is None:
        tally.by_status["(no response)"] += 1
        tally.fail(f"{probe.category}: no response to {probe.chunks[0][:120]!r}")
        return
    for i, response in enumerate(responses):
        if response is None:
            break  # the server closed after a client error: later requests on the connection are not answered
        tally.by_status[str(response.status)] += 1
        want = probe.expect[i]
        if response.status >= 500:
            tally.fail(f"{probe.category}: {response.status} {response.body[:200]!r} for {probe.chunks[0][:160]!r}")
        elif want == OK and response.status != 200:
            tally.fail(f"{probe.category}: {response.status} {response.body[:200]!r} for a valid request")
        elif want == CLIENT_ERROR and not 400 <= response.status < 500:
            tally.fail(f"{probe.category}: {response.status} for a client error {probe.chunks[0][:160]!r}")
        elif want == OK and probe.check is not None and i == 0:
            try:
                probe.check(response)
            except AssertionError as error:
                tally.fail(f"{probe.category}: wrong answer: {error}")
        if want == CLIENT_ERROR and response.headers.get("connection") == "close":
            break


def _exchange_pipelined(port: int, probe: Probe) -> list[Response | None]:
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S) as sock:
        sock.sendall(probe.chunks[0])
        buffer = bytearray()
        return [read_response(sock, buffer, head_only=i == 1) for i in range(len(probe.expect))]


class Stalled:
    """Clients that stop half-way through a request: the server must answer 408 (or close) on its own."""

    PARTS = [b"GET /v2/hea", b"GET /v2/health/live HTTP/1.1\r\nhost: f", b"POST " + INFER + b" HTTP/1.1\r\n",
             b"POST " + INFER + b" HTTP/1.1\r\ncontent-length: 100\r\n\r\n{\"inputs\"",
             b"POST " + INFER + b" HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n10\r\nabc"]

    def __init__(self, port: int, count: int) -> None:
        self.sockets = []
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S + 10 * KEEP_ALIVE_S)
            sock.sendall(self.PARTS[i % len(self.PARTS)])
            self.sockets.append(sock)

    def outcomes(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for sock in self.sockets:
            with sock:
                try:
                    response = read_response(sock, bytearray())
                except ConnectionResetError:
                    response = None
                out["closed" if response is None else str(response.status)] += 1
        return out


def slow_client(port: int, stop: threading.Event, body: bytes, answered: list[int]) -> None:
    """A keep-alive client that sends each valid request a few bytes at a time, for as long as the run lasts."""
    wire = request(b"POST", INFER, body)
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S) as sock:
        buffer = bytearray()
        while not stop.is_set():
            for i in range(0, len(wire), 97):
                sock.sendall(wire[i:i + 97])
                time.sleep(0.001)
            response = read_response(sock, buffer)
            answered.append(0 if response is None else response.status)
            if response is None:
                return


# ---------------------------------------------------------------------------------------------------------------
# The test


def test_server_survives_generated_hostile_traffic(served: Served) -> None:
    fuzz = Fuzz(SEED, served.module)
    for _ in range(200):  # warm-up: allocator pools, caches, metrics series
        run_probe(served.port, fuzz.valid_infer(), Tally())
    rss_before = served.rss()
    stalled = Stalled(served.port, STALLED_CLIENTS)
    stop = threading.Event()
    slow_answers: list[int] = []
    slow = [threading.Thread(target=slow_client, args=(served.port, stop, fuzz.valid[i][0], slow_answers),
                             daemon=True) for i in range(SLOW_CLIENTS)]
    for thread in slow:
        thread.start()
    tally = Tally()
    started = time.monotonic()
    try:
        for n in range(REQUESTS):
            run_probe(served.port, fuzz.probe(), tally)
            if n % 1000 == 0:
                assert served.process.poll() is None, "the server died:\n" + "\n".join(served.log[-50:])
    finally:
        stop.set()
        for thread in slow:
            thread.join(READ_TIMEOUT_S)
    elapsed = time.monotonic() - started
    stalled_outcomes = stalled.outcomes()
    rss_after = served.rss()
    live = exchange(served.port, [request(b"GET", b"/v2/health/live")])[0]
    ready = exchange(served.port, [request(b"GET", b"/v2/health/ready")])[0]
    print(f"\n{REQUESTS} generated requests (seed {SEED}) in {elapsed:.1f} s; by category:",
          dict(sorted(tally.by_category.items())))
    print("responses by status:", dict(sorted(tally.by_status.items())))
    print("seconds by category:", {k: round(v, 2) for k, v in sorted(tally.seconds.items())})
    print(f"stalled clients: {dict(stalled_outcomes)}; slow clients answered {len(slow_answers)} requests")
    print(f"VmRSS {rss_before / 2**20:.1f} MiB -> {rss_after / 2**20:.1f} MiB "
          f"(growth {(rss_after - rss_before) / 2**20:+.1f} MiB, bound {RSS_GROWTH_LIMIT / 2**20:.0f} MiB)")
    assert served.process.poll() is None, "the server died:\n" + "\n".join(served.log[-50:])
    assert tally.failures == [], "\n".join(tally.failures)
    assert not any(status.startswith("5") for status in tally.by_status), tally.by_status
    assert tally.by_category["valid-infer"] > REQUESTS // 10 and tally.by_status["200"] > REQUESTS // 10
    assert set(slow_answers) == {200} and len(slow_answers) >= SLOW_CLIENTS
    assert set(stalled_outcomes) <= {"408", "closed"} and stalled_outcomes["408"] > 0, stalled_outcomes
    assert rss_after - rss_before < RSS_GROWTH_LIMIT
    assert live is not None and live.status == 200 and ready is not None and ready.status == 200
    assert not [line for line in served.log if "Traceback" in line or " ERROR " in line], "\n".join(served.log)


def test_generator_is_reproducible(served: Served) -> None:
    first, second = Fuzz(SEED, served.module), Fuzz(SEED, served.module)
    assert [first.probe().chunks for _ in range(300)] == [second.probe().chunks for _ in range(300)]
