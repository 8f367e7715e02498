"""Benchmark of the inference server's wire formats: REST JSON vs REST binary tensor data vs gRPC, one run.

Not a test. One `shipyard-runtime serve --grpc-port 0` process serves a tiny image model (3x224x224 FP32 in: a
global average pool and a linear layer, so the model costs next to nothing and the protocol is what is measured).
For each protocol the same input tensor is sent by `--concurrency` client threads with keep-alive connections
for `--duration` seconds (after a short warm-up): REST with the tensor as JSON `data`; REST with the binary tensor
data extension (raw bytes after the JSON header, the output asked for as bytes too); gRPC ModelInfer with
`raw_input_contents`. Request bodies are built once; the clients read each answer whole and check its status
(the first answer of each protocol is checked against the in-process model's output). Reported per protocol:
requests/s, p50/p99 latency, and the server process's CPU seconds per request (utime + stime from /proc around the
measured window), with the ratios to JSON. It prints a table, writes bench/results/protocols.json (with the usual
`meta` block) and ends with `targets: K/N met`:
- binary REST: >= 5x the requests/s of JSON, and <= 1/5 of its server CPU per request;
- gRPC: >= 5x the requests/s of JSON, and <= 1.5x the server CPU per request of binary REST.

Usage: OMP_NUM_THREADS=1 python bench/protocols.py [--duration S] [--concurrency N] [--out FILE]
The model's factory (`protocols:build_pool_linear`) lives in this file; the server gets this folder on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from torch import nn
from tritonclient.grpc import service_pb2, service_pb2_grpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchmeta import build_meta, fetch_git_state  # noqa: E402

MODEL = "pool"
SHAPE = (1, 3, 224, 224)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class PoolLinear(nn.Module):
    """3x224x224 in, 10 logits out: a global average pool and a linear layer (microseconds of compute)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def build_pool_linear() -> nn.Module:
    return PoolLinear()


@dataclass
class Result:
    protocol: str
    requests: int
    errors: int
    seconds: float
    cpu_seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * self.cpu_seconds / self.requests if self.requests else float("inf")


def fetch_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14 and 15 of stat)


def apply_server(model_dir: Path) -> tuple[subprocess.Popen[str], int, int, list[str]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE),
                                                                                 os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "shipyard.runtime.cli", "serve", "--artifact", str(model_dir), "--host",
               "127.0.0.1", "--port", "0", "--grpc-port", "0", "--threads", "1", "--log-level", "WARNING"]
    # the listening lines are INFO: read them at INFO, then the server logs nothing per request anyway
    command[-1] = "INFO"
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    ports: dict[str, int] = {}
    ready = threading.Event()

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            log.append(line.rstrip())
            if match := re.search(r"Listened on 127\.0\.0\.1:(\d+)", line):
                ports["http"] = int(match.group(1))
            if match := re.search(r"Listened for gRPC .* on 127\.0\.0\.1:(\d+)", line):
                ports["grpc"] = int(match.group(1))
            if "Became ready" in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(180):
        process.kill()
        raise RuntimeError("the server did not become ready:\n" + "\n".join(log))
    return process, ports["http"], ports["grpc"], log


def build_bodies(pixels: np.ndarray) -> dict[str, tuple[bytes, dict[str, str]]]:
    item = {"name": "x", "shape": list(pixels.shape), "datatype": "FP32"}
    json_body = json.dumps({"inputs": [{**item, "data": pixels.reshape(-1).tolist()}]}).encode()
    raw = pixels.astype("<f4").tobytes()
    header = json.dumps({"inputs": [{**item, "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    return {
        "rest-json": (json_body, {"content-type": "application/json"}),
        "rest-binary": (header + raw, {"content-type": "application/octet-stream",
                                       "inference-header-content-length": str(len(header))}),
    }


def decode_rest(protocol: str, headers: dict[str, str], body: bytes) -> np.ndarray:
    if protocol == "rest-json":
        return np.asarray(json.loads(body)["outputs"][0]["data"], dtype=np.float32)
    length = int(headers["inference-header-content-length"])
    return np.frombuffer(body[length:], dtype="<f4")


def run_protocol(protocol: str, http_port: int, grpc_port: int, bodies: dict[str, tuple[bytes, dict[str, str]]],
                 pixels: np.ndarray, expected: np.ndarray, pid: int, duration: float, concurrency: int,
                 warmup: float) -> Result:
    stop = threading.Event()
    measuring = threading.Event()
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency

    def rest_worker(index: int) -> None:
        body, headers = bodies[protocol]
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
        first = index == 0
        while not stop.is_set():
            started = time.perf_counter()
            conn.request("POST", f"/v2/models/{MODEL}/infer", body, headers)
            response = conn.getresponse()
            raw = response.read()
            elapsed = time.perf_counter() - started
            if response.status != 200:
                errors[index] += 1
            elif first:
                got = decode_rest(protocol, {k.lower(): v for k, v in response.getheaders()}, raw)
                np.testing.assert_allclose(got, expected.reshape(-1), rtol=1e-4, atol=1e-5)
                first = False
            if measuring.is_set():
                latencies[index].append(elapsed)
        conn.close()

    def grpc_worker(index: int) -> None:
        request = service_pb2.ModelInferRequest(model_name=MODEL)
        request.inputs.add(name="x", datatype="FP32", shape=list(pixels.shape))
        request.raw_input_contents.append(pixels.astype("<f4").tobytes())
        first = index == 0
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[
            ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)
        ]) as channel:
            infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    response = infer(request, timeout=60)
                except grpc.RpcError:
                    errors[index] += 1
                    continue
                elapsed = time.perf_counter() - started
                if first:
                    got = np.frombuffer(response.raw_output_contents[0], dtype="<f4")
                    np.testing.assert_allclose(got, expected.reshape(-1), rtol=1e-4, atol=1e-5)
                    first = False
                if measuring.is_set():
                    latencies[index].append(elapsed)

    target = grpc_worker if protocol == "grpc" else rest_worker
    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    time.sleep(warmup)
    cpu_before = fetch_cpu_seconds(pid)
    started = time.perf_counter()
    measuring.set()
    time.sleep(duration)
    measuring.clear()
    seconds = time.perf_counter() - started
    cpu_seconds = fetch_cpu_seconds(pid) - cpu_before
    stop.set()
    for thread in threads:
        thread.join(60)
    flat = sorted(x for per_thread in latencies for x in per_thread)
    p50 = 1000 * flat[len(flat) // 2] if flat else float("nan")
    p99 = 1000 * flat[min(len(flat) - 1, int(len(flat) * 0.99))] if flat else float("nan")
    return Result(protocol, len(flat), sum(errors), seconds, cpu_seconds, p50, p99)


def build_targets(results: dict[str, Result]) -> list[dict[str, Any]]:
    json_, binary, grpc_ = results["rest-json"], results["rest-binary"], results["grpc"]

    def ok(result: Result) -> bool:
        return result.errors == 0 and result.requests > 0

    checks = [
        ("rest-binary req/s >= 5x rest-json", binary.rps, 5 * json_.rps, ok(binary) and binary.rps >= 5 * json_.rps),
        ("rest-binary server CPU/request <= 1/5 of rest-json", binary.cpu_ms_per_request,
         json_.cpu_ms_per_request / 5, ok(binary) and binary.cpu_ms_per_request <= json_.cpu_ms_per_request / 5),
        ("grpc req/s >= 5x rest-json", grpc_.rps, 5 * json_.rps, ok(grpc_) and grpc_.rps >= 5 * json_.rps),
        ("grpc server CPU/request <= 1.5x rest-binary", grpc_.cpu_ms_per_request, 1.5 * binary.cpu_ms_per_request,
         ok(grpc_) and grpc_.cpu_ms_per_request <= 1.5 * binary.cpu_ms_per_request),
    ]
    return [{"target": name, "value": round(value, 3), "bound": round(bound, 3), "met": met}
            for name, value, bound, met in checks]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per protocol (default 8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (default 2)")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--out", default=str(HERE / "results" / "protocols.json"))
    args = parser.parse_args(argv)
    git_head, git_status = fetch_git_state()
    load_before = os.getloadavg()
    started_at = time.time()
    torch.manual_seed(0)
    module = build_pool_linear().eval()
    pixels = torch.rand(SHAPE).numpy()
    with torch.inference_mode():
        expected = module(torch.from_numpy(pixels)).numpy()
    from shipyard.runtime.artifacts import store

    with tempfile.TemporaryDirectory() as work:
        model_dir = Path(work) / MODEL
        store.save_model(module, model_dir, name=MODEL, factory="protocols:build_pool_linear", factory_kwargs={},
                         inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
                         outputs=[{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}])
        process, http_port, grpc_port, _log = apply_server(model_dir)
        try:
            bodies = build_bodies(pixels)
            results = {}
            for protocol in ("rest-json", "rest-binary", "grpc"):
                results[protocol] = run_protocol(protocol, http_port, grpc_port, bodies, pixels, expected,
                                                 process.pid, args.duration, args.concurrency, args.warmup)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    json_ = results["rest-json"]
    print(f"Input {list(SHAPE)} FP32 ({pixels.nbytes} bytes; JSON body {len(bodies['rest-json'][0])} bytes), "
          f"{args.concurrency} client threads, {args.duration:g} s per protocol, server on 1 torch thread\n")
    print(f"{'protocol':<12} {'req/s':>9} {'x JSON':>7} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/req':>11} "
          f"{'x JSON':>7} {'errors':>7}")
    for result in results.values():
        print(f"{result.protocol:<12} {result.rps:>9.1f} {result.rps / json_.rps:>7.2f} {result.p50_ms:>8.2f} "
              f"{result.p99_ms:>8.2f} {result.cpu_ms_per_request:>11.3f} "
              f"{result.cpu_ms_per_request / json_.cpu_ms_per_request:>7.3f} {result.errors:>7}")
    targets = build_targets(results)
    print()
    for target in targets:
        print(f"{'met' if target['met'] else 'MISSED':<7} {target['target']}: {target['value']} "
              f"(bound {target['bound']})")
    document = {
        "meta": build_meta(git_head, git_status, python=platform.python_version(), torch_version=torch.__version__,
                           platform_name=platform.platform(), load_before=load_before, load_after=os.getloadavg(),
                           started=started_at, finished=time.time()),
        "setup": {"shape": list(SHAPE), "datatype": "FP32", "inputBytes": pixels.nbytes,
                  "jsonBodyBytes": len(bodies["rest-json"][0]), "concurrency": args.concurrency,
                  "durationS": args.duration, "warmupS": args.warmup, "serverTorchThreads": 1,
                  "cpus": os.cpu_count()},
        "results": [{"protocol": r.protocol, "requests": r.requests, "errors": r.errors, "seconds": round(r.seconds, 3),
                     "requestsPerSecond": round(r.rps, 2), "p50Ms": round(r.p50_ms, 3), "p99Ms": round(r.p99_ms, 3),
                     "serverCpuSeconds": round(r.cpu_seconds, 3),
                     "serverCpuMsPerRequest": round(r.cpu_ms_per_request, 4)} for r in results.values()],
        "targets": targets,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    met = sum(1 for target in targets if target["met"])
    print(f"\nwrote {out}\ntargets: {met}/{len(targets)} met")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
