"""A bounded load generator for the e2e tier: OIP v2 inference requests to a Service through the node agent's proxy.

Does network I/O (127.0.0.0/8 only). Each request opens its own TCP connection (``Connection: close``), as a client
behind kube-proxy would see every new connection balanced afresh, and records its client port so that the proxy's
connection log (``conntrack.jsonl``) tells which pod answered it, failed requests included. Requests are sent at a
fixed rate with at most ``concurrency`` in flight; the run stops at ``stop``, after ``max_seconds`` or after
``max_requests``, whichever comes first. `attribute` (pure) then tells each result's pod and version from that log.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import ipaddress
import json
import threading
import time
from collections.abc import Sequence
from typing import Any

CONNECT_TIMEOUT_S = 5.0
RESPONSE_TIMEOUT_S = 15.0
MAX_REQUESTS = 20_000  # a LoadGenerator's default bound


@dataclasses.dataclass
class Result:
    started: float  # time.time()
    finished: float
    status: int  # 0: no HTTP response (connection refused, reset, timeout)
    version: str | None  # model_version of a 200 response
    error: str | None  # why it failed (status >= 500, or no response), None when it succeeded
    client_port: int
    correct: bool | None  # prediction == label (200 responses)

    @property
    def failed(self) -> bool:
        return self.error is not None


def build_request(model: str, rows: Sequence[Sequence[float]]) -> bytes:
    """The OIP v2 infer body for a batch of 64-pixel rows (pure)."""
    data = [float(v) for row in rows for v in row]
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [len(rows), len(rows[0])],
                                   "data": data}]}).encode()


def parse_predictions(body: dict[str, Any]) -> list[int]:
    """Argmax per row of the ``logits`` output (pure)."""
    output = body["outputs"][0]
    rows, classes = output["shape"]
    data = output["data"]
    return [max(range(classes), key=lambda k, r=r: data[r * classes + k]) for r in range(rows)]


async def send(port: int, path: str, body: bytes, host: str = "127.0.0.1",
               headers: Sequence[tuple[str, str]] = ()) -> tuple[int, bytes, int]:
    """One POST on a fresh connection (with ``headers`` besides the usual ones); returns (status, body, client port).
    Raises OSError/TimeoutError."""
    assert ipaddress.ip_address(host).is_loopback
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
    client_port = writer.get_extra_info("sockname")[1]
    try:
        extra = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers)
        writer.write(b"POST %s HTTP/1.1\r\nhost: %s:%d\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                     b"%sconnection: close\r\n\r\n" % (path.encode(), host.encode(), port, len(body), extra) + body)
        await writer.drain()
        head, payload = await asyncio.wait_for(read_response(reader), RESPONSE_TIMEOUT_S)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()
    if not head.startswith(b"HTTP/1."):
        raise ConnectionError(f"no HTTP response ({len(head)} bytes)")
    return int(head.split(b" ", 2)[1]), payload, client_port


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(head, body) of one HTTP/1.1 response: the body by its Content-Length, else up to the connection's end (a
    server may keep the connection open despite ``connection: close``, as TorchServe does)."""
    try:
        head = (await reader.readuntil(b"\r\n\r\n"))[:-4]
    except asyncio.IncompleteReadError as error:
        return error.partial, b""
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            return head, await reader.readexactly(int(value.strip()))
    return head, await reader.read(-1)


class LoadGenerator:
    """Runs in a background thread with its own event loop; `results` fills as requests finish."""

    def __init__(self, port: int, model: str, samples: Sequence[Sequence[float]], labels: Sequence[int], *,
                 rate: float = 20.0, concurrency: int = 16, max_seconds: float = 300.0,
                 max_requests: int = MAX_REQUESTS, path: str | None = None,
                 headers: Sequence[tuple[str, str]] = ()) -> None:
        self.port = port
        self.model = model
        self.path = path or f"/v2/models/{model}/infer"  # another runtime's route for the same OIP JSON body
        self.samples = samples
        self.labels = labels
        self.rate = rate
        self.concurrency = concurrency
        self.max_seconds = max_seconds
        self.max_requests = max_requests
        self.headers = tuple(headers)
        self.results: list[Result] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="loadgen", daemon=True)

    def start(self) -> LoadGenerator:
        self._thread.start()
        return self

    def stop(self, timeout: float = RESPONSE_TIMEOUT_S + 5) -> list[Result]:
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the load generator did not stop"
        return list(self.results)

    async def _one(self, index: int, semaphore: asyncio.Semaphore) -> None:
        i = index % len(self.samples)
        started = time.time()
        client_port = 0
        try:
            async with semaphore:
                started = time.time()
                status, payload, client_port = await send(self.port, self.path,
                                                          build_request(self.model, [self.samples[i]]),
                                                          headers=self.headers)
        except (OSError, ConnectionError, TimeoutError, ValueError) as error:
            self.results.append(Result(started, time.time(), 0, None, f"{type(error).__name__}: {error}",
                                       client_port, None))
            return
        finished = time.time()
        if status != 200:
            text = payload.decode(errors="replace")[:200]
            self.results.append(Result(started, finished, status, None, f"HTTP {status}: {text}", client_port,
                                       None))
            return
        body = json.loads(payload)
        correct = parse_predictions(body)[0] == self.labels[i]
        self.results.append(Result(started, finished, status, str(body.get("model_version")), None, client_port,
                                   correct))

    async def _run(self) -> None:
        semaphore = asyncio.Semaphore(self.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        started = time.monotonic()
        period = 1.0 / self.rate
        for index in range(self.max_requests):
            if self._stop.is_set() or time.monotonic() - started > self.max_seconds:
                break
            task = asyncio.create_task(self._one(index, semaphore))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at = started + (index + 1) * period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if tasks:
            await asyncio.wait(tasks, timeout=RESPONSE_TIMEOUT_S + CONNECT_TIMEOUT_S)


def attribute(results: list[Result], conntrack: list[dict[str, Any]], pod_versions: dict[str, str],
              ) -> list[tuple[Result, str | None, str]]:
    """(result, pod, version) per request: the proxy's record of the same client port closest to its start
    (pure). Version from the response when there is one, else from the pod's label; '?' when unknown."""
    by_port: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for entry in conntrack:
        by_port[int(entry["clientPort"])].append(entry)
    out = []
    for result in results:
        candidates = [e for e in by_port.get(result.client_port, []) if -1.0 <= e["t"] - result.started <= 5.0]
        entry = min(candidates, key=lambda e: abs(e["t"] - result.started)) if candidates else None
        pod = entry.get("pod") if entry else None
        version = result.version or (pod_versions.get(pod, "?") if pod else "no endpoint")
        out.append((result, pod, version))
    return out


def count_by_version(attributed: list[tuple[Result, str | None, str]]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"served": 0, "failed": 0})
    for result, _, version in attributed:
        counts[version]["failed" if result.failed else "served"] += 1
    return dict(sorted(counts.items()))


def build_summary(results: Sequence[Result]) -> str:
    """One line per answering version and per kind of failure (pure)."""
    served: dict[str, int] = {}
    failures: dict[str, int] = {}
    for r in results:
        if r.failed:
            kind = (r.error or "").split(":", 1)[0] if r.status == 0 else f"HTTP {r.status}"
            failures[kind] = failures.get(kind, 0) + 1
        else:
            served[r.version or "?"] = served.get(r.version or "?", 0) + 1
    lines = [f"{len(results)} requests: " + ", ".join(f"{n} answered by {v}" for v, n in sorted(served.items()))]
    lines += [f"  failed: {n} x {kind}" for kind, n in sorted(failures.items())] or ["  failed: 0"]
    return "\n".join(lines)


def parse_header(text: str) -> tuple[str, str]:
    """'name: value' (or 'name:value') -> (name, value), for --header (pure). Raises ValueError."""
    name, sep, value = text.partition(":")
    if not sep or not name.strip() or any(c in text for c in "\r\n"):
        raise ValueError(f"{text!r} is not a header 'name: value'")
    return name.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m tests.e2e.loadgen` (pure)."""
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.loadgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True,
                        help="a local port on 127.0.0.1: the Service's (services.json) or a gateway's listener")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second (default 20)")
    parser.add_argument("--seconds", type=float, default=300.0, help="stop after this long (default 300)")
    parser.add_argument("--requests", type=int, default=None,
                        help="stop once this many requests were sent, and print when all have answered "
                             "(default: no limit but --seconds)")
    parser.add_argument("--header", type=parse_header, action="append", default=[], metavar="'NAME: VALUE'",
                        help="a header sent with every request (repeatable), e.g. 'x-shipyard-version: 1.1.0'")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.e2e.loadgen --port P`: steady load until SIGINT/SIGTERM, --seconds or --requests; prints a
    summary (the requests answered per version, the failures per kind)."""
    import signal

    from shipyard.runtime import datasets

    args = build_parser().parse_args(argv)
    data = datasets.load_digits()
    load = LoadGenerator(args.port, args.model, data.eval_inputs[0].tolist(),
                         [int(v) for v in data.eval_labels.tolist()], rate=args.rate, max_seconds=args.seconds,
                         max_requests=MAX_REQUESTS if args.requests is None else args.requests, headers=args.header)
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    load.start()
    deadline = time.monotonic() + args.seconds
    while not done.wait(0.2) and time.monotonic() < deadline and load._thread.is_alive():
        pass
    print(build_summary(load.stop()), flush=True)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
