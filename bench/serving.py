"""Benchmark of the inference server against peers from PyPI, on one machine, side by side in one run.

Not a test. For each model (a small MLP: overhead-bound; a CNN on 3x32x32: compute-bound) it measures:
- the in-process batched forward loop (no HTTP, no JSON) at several batch sizes: the physical limit;
- `shipyard-runtime serve` and each peer (LitServe, TorchServe) serving the same weights from the same
  model directory, driven by the same load generator (wrk with a Lua POST script, one thread) with the same
  OIP v2 JSON body, at several concurrency levels.
The server (with every process it starts) is pinned to one set of cores and wrk to another (taskset);
every server runs with 1 torch thread (OMP_NUM_THREADS=1 and torch.set_num_threads(1)), max batch 32 and a
5 ms batch delay where it batches. Each server's first answer is checked against the in-process model's
output before it is measured.

It prints a table, writes bench/results/serving.json (with a `meta` block: git commit and dirty flag, Python,
torch, platform, load average before and after, start and end time), and its last line is `targets: K/N met`, counted
from the measured figures:
- per model, at the headline concurrency: shipyard's req/s >= 1.5x the best peer's, with a p99 no worse;
- per model: shipyard's best req/s over the levels >= 70% of the in-process limit (best batch size).

Needs: wrk (Debian package `wrk`; installed with apt-get when missing and running as root), the `bench`
extra (`pip install --group bench`: LitServe, TorchServe, torch-model-archiver) and a Java runtime
for TorchServe (`apt-get install -y openjdk-17-jre-headless`). A peer that cannot run is reported as
skipped, and the targets that need it count as not met.

Usage: python bench/serving.py [--quick] [--duration S] [--levels 1,16,64] [--models mlp,cnn]
       [--servers shipyard,litserve,torchserve] [--out bench/results/serving.json]
The same file also holds the peers' server entry points (`peer-litserve`, TorchServe's handler) and the
in-process loop (`limit`), run as subprocesses; and the CNN's factory (`serving:build_cifar_cnn`), which
the model directory references, so every server process gets this folder on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))  # the benchmarks' shared helpers
from benchmeta import build_meta, fetch_git_state  # noqa: E402

DEFAULT_OUT = BENCH_DIR / "results" / "serving.json"
MAX_BATCH = 32
DELAY_MS = 5.0
THREADS = 1
HEADLINE_CONCURRENCY = 16
PEER_FACTOR = 1.5
LIMIT_FRACTION = 0.70
# Server variants: (kind, max batch size). Peers run with and without their batching: the best variant at
# each level is "the best peer", so no peer is judged by a configuration that does not suit the load.
SERVERS = {
    "shipyard": ("shipyard", MAX_BATCH),
    "litserve": ("litserve", MAX_BATCH),
    "litserve-b1": ("litserve", 1),
    "torchserve": ("torchserve", MAX_BATCH),
    "torchserve-b1": ("torchserve", 1),
}
PEERS = tuple(name for name in SERVERS if name != "shipyard")


# ------------------------------------------------------------------------------------------------ models


class CifarCNN(nn.Module):
    """A VGG-style CNN for 3x32x32 images: five 3x3 conv+BN+ReLU layers, three max-pools, two linear layers."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        w = width
        self.features = nn.Sequential(
            *block(3, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * 16, 256), nn.ReLU(), nn.Linear(256, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_cifar_cnn(width: int = 32, num_classes: int = 10) -> nn.Module:
    return CifarCNN(width=width, num_classes=num_classes)


@dataclass(frozen=True)
class BenchModel:
    name: str
    factory: str
    shape: tuple[int, ...]  # one row, without the batch dimension
    kind: str  # what its figures mean


MODELS = {
    "mlp": BenchModel("mlp", "shipyard.runtime.models:build_digits_mlp", (64,), "overhead-bound (64-300-100-10 MLP)"),
    "cnn": BenchModel("cnn", "serving:build_cifar_cnn", (3, 32, 32), "compute-bound (5-conv CNN, 3x32x32)"),
}


def apply_model_directory(model: BenchModel, root: Path) -> Path:
    """Save the model (seeded weights, eval-mode BN statistics) as a Shipyard model directory."""
    from shipyard.runtime.artifacts import store

    sys.path.insert(0, str(BENCH_DIR))
    module_name, function = model.factory.split(":")
    torch.manual_seed(0)
    module = getattr(importlib.import_module(module_name), function)()
    for buffer_name, buffer in module.named_buffers():
        if buffer_name.endswith("running_var"):
            buffer.uniform_(0.5, 1.5)
        elif buffer_name.endswith("running_mean"):
            buffer.uniform_(-0.1, 0.1)
    path = root / model.name
    store.save_model(
        module.eval(),
        path,
        name=model.name,
        factory=model.factory,
        inputs=[{"name": "input", "datatype": "FP32", "shape": [-1, *model.shape]}],
        outputs=[{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
        overwrite=True,
    )
    return path


def build_payload(model: BenchModel) -> tuple[bytes, list[float]]:
    """The one request body every server gets (OIP v2 JSON, one row), and its flat data."""
    generator = torch.Generator().manual_seed(1)
    data = [round(v, 4) for v in torch.rand(model.shape, generator=generator).reshape(-1).tolist()]
    document = {"inputs": [{"name": "input", "shape": [1, *model.shape], "datatype": "FP32", "data": data}]}
    return json.dumps(document).encode(), data


# ------------------------------------------------------------------------------------------ peer servers

LITSERVE_PATH = "/v2/models/{name}/infer"
LITSERVE_FLAG = "SHIPYARD_BENCH_LITSERVE"  # set in LitServe's processes only: the class below needs litserve

if os.environ.get(LITSERVE_FLAG):
    import litserve as ls
    import numpy as np

    class LitOipAPI(ls.LitAPI):  # type: ignore[misc]
        """LitServe API over the model directory: OIP JSON in and out, LitServe's batching."""

        def __init__(self, artifact: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.artifact = artifact
            self.name = Path(artifact).name

        def setup(self, device: str) -> None:
            from shipyard.runtime.artifacts import store

            torch.set_num_threads(THREADS)
            self.model = store.load_model(self.artifact).module

        # No annotations on these two: LitServe reads them to build its FastAPI endpoint, and the postponed
        # (string) annotations of this module would turn the body into a query parameter.
        def decode_request(self, request):  # type: ignore[no-untyped-def]
            item = request["inputs"][0]
            return np.asarray(item["data"], dtype=np.float32).reshape(item["shape"])

        def batch(self, inputs: list[Any]) -> Any:
            return np.concatenate(inputs)

        def predict(self, x: Any) -> Any:
            with torch.inference_mode():
                return self.model(torch.from_numpy(x)).numpy()

        def unbatch(self, output: Any) -> list[Any]:
            return [output[i : i + 1] for i in range(output.shape[0])]

        def encode_response(self, output):  # type: ignore[no-untyped-def]
            data = output.reshape(-1).tolist()
            tensor = {"name": "logits", "datatype": "FP32", "shape": list(output.shape), "data": data}
            return {"model_name": self.name, "outputs": [tensor]}


def run_peer_litserve(argv: list[str]) -> int:
    """LitServe serving the model directory with its native batching (same OIP JSON in and out)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifact", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH)
    parser.add_argument("--delay-ms", type=float, default=DELAY_MS)
    parser.add_argument("--fast-queue", action="store_true")
    args = parser.parse_args(argv)
    import litserve as ls

    path = LITSERVE_PATH.format(name=Path(args.artifact).name)
    api = LitOipAPI(args.artifact, max_batch_size=args.max_batch, batch_timeout=args.delay_ms / 1000, api_path=path)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=60, fast_queue=args.fast_queue)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False, log_level="warning")
    return 0


TORCHSERVE_HANDLER = '''
"""TorchServe handler for the benchmark: the model directory's module, OIP JSON in and out, batched."""
import json
import os

import numpy as np
import torch

_model = None
_name = None


def handle(data, context):
    global _model, _name
    if _model is None:
        from shipyard.runtime.artifacts import store

        torch.set_num_threads(1)
        model_dir = context.system_properties.get("model_dir")
        with open(os.path.join(model_dir, "artifact_path.txt")) as f:
            path = f.read().strip()
        _model = store.load_model(path).module
        _name = os.path.basename(path)
    if data is None:
        return None
    arrays = []
    for row in data:
        body = row.get("body") if row.get("body") is not None else row.get("data")
        if isinstance(body, (bytes, bytearray)):
            body = json.loads(body)
        item = body["inputs"][0]
        arrays.append(np.asarray(item["data"], dtype=np.float32).reshape(item["shape"]))
    with torch.inference_mode():
        output = _model(torch.from_numpy(np.concatenate(arrays))).numpy()
    answers, start = [], 0
    for array in arrays:
        part = output[start : start + array.shape[0]]
        start += array.shape[0]
        answers.append(json.dumps({"model_name": _name, "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": list(part.shape), "data": part.reshape(-1).tolist()}]}))
    return answers
'''


# TorchServe logs every request (access log, per-request metrics) at INFO by default; the benchmark turns that
# off so that the peer is measured at its best, as a production deployment would configure it.
TORCHSERVE_LOG4J = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT"><PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/></Console>
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="off"/>
    <Logger name="MODEL_LOG" level="warn"/>
    <Logger name="MODEL_METRICS" level="off"/>
    <Logger name="TS_METRICS" level="off"/>
    <Logger name="org.pytorch.serve" level="warn"/>
    <Root level="warn"><AppenderRef ref="STDOUT"/></Root>
  </Loggers>
</Configuration>
"""


def apply_torchserve_store(model_dir: Path, work: Path, port: int, batch: int) -> tuple[Path, Path]:
    """Archive the handler (which loads the model directory) and write TorchServe's config."""
    name = model_dir.name
    source = work / f"ts-src-{name}-b{batch}"
    store = work / f"ts-store-{name}-b{batch}"
    source.mkdir(parents=True, exist_ok=True)
    store.mkdir(parents=True, exist_ok=True)
    (source / "handler.py").write_text(TORCHSERVE_HANDLER)
    (source / "artifact_path.txt").write_text(str(model_dir))
    archiver = shutil.which("torch-model-archiver") or str(Path(sys.executable).parent / "torch-model-archiver")
    subprocess.run(
        [archiver, "--model-name", name, "--version", "1.0", "--handler", str(source / "handler.py"),
         "--extra-files", str(source / "artifact_path.txt"), "--export-path", str(store), "--force"],
        check=True, capture_output=True,
    )  # fmt: skip
    models = {
        name: {
            "1.0": {
                "defaultVersion": True,
                "marName": f"{name}.mar",
                "minWorkers": 1,
                "maxWorkers": 1,
                "batchSize": batch,
                "maxBatchDelay": int(DELAY_MS),
                "responseTimeout": 120,
            }
        }
    }
    config = work / f"ts-{name}-b{batch}.properties"
    log_config = work / "ts-log4j2.xml"
    log_config.write_text(TORCHSERVE_LOG4J)
    config.write_text(
        "\n".join([
            f"inference_address=http://127.0.0.1:{port}",
            f"management_address=http://127.0.0.1:{port + 1}",
            f"metrics_address=http://127.0.0.1:{port + 2}",
            f"model_store={store}",
            f"load_models={name}.mar",
            "default_workers_per_model=1",
            "disable_token_authorization=true",
            "install_py_dep_per_model=false",
            "job_queue_size=1000",
            f"vmargs=-Xmx1g -XX:+UseContainerSupport -Dlog4j.configurationFile=file://{log_config}",
            "disable_system_metrics=true",
            f"models={json.dumps(models)}",
        ]) + "\n"
    )  # fmt: skip
    return store, config


# ---------------------------------------------------------------------------------------- in-process loop


def run_limit(argv: list[str]) -> int:
    """The in-process batched forward loop: rows/s at each batch size (prints JSON)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifact", required=True)
    parser.add_argument("--batch-sizes", default="1,8,16,32")
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    from shipyard.runtime.artifacts import store

    torch.set_num_threads(THREADS)
    loaded = store.load_model(args.artifact)
    shape = tuple(loaded.inputs[0].shape[1:])
    wall: dict[int, float] = {}
    cpu: dict[int, float] = {}
    with torch.inference_mode():
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            x = torch.rand(batch, *shape)
            for _ in range(5):
                loaded.module(x)
            count, started, cpu_started = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - started < args.seconds:
                loaded.module(x)
                count += 1
            wall[batch] = batch * count / (time.perf_counter() - started)
            cpu[batch] = batch * count / max(1e-9, time.process_time() - cpu_started)
    print(json.dumps({"wall": wall, "cpu": cpu}))
    return 0


# ------------------------------------------------------------------------------------------- harness


@dataclass
class Run:
    model: str
    server: str
    concurrency: int
    rps: float  # successful responses per second
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    requests: int
    errors: int  # non-2xx + socket errors + timeouts
    seconds: float
    round: int = 0


@dataclass
class Served:
    server: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    extra: dict[str, Any] = field(default_factory=dict)


def fetch_free_port(count: int = 1) -> int:
    """A port p such that p..p+count-1 were free a moment ago."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + count > 65535:
            continue
        ok = True
        for extra in range(1, count):
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + extra))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no free port")


def build_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH", "")]))
    return env


def apply_server(server: str, model_dir: Path, work: Path, cores: str) -> Served:
    """Start one server pinned to `cores`; returns once its process is up (not yet ready)."""
    name = model_dir.name
    log = work / f"{server}-{name}.log"
    env = build_env()
    pin = ["taskset", "-c", cores]
    kind, batch = SERVERS[server]
    if kind == "shipyard":
        port = fetch_free_port()
        command = [*pin, sys.executable, "-m", "shipyard.runtime.cli", "serve", "--artifact", str(model_dir),
                   "--host", "127.0.0.1", "--port", str(port), "--threads", str(THREADS),
                   "--max-batch-size", str(MAX_BATCH), "--max-delay-ms", str(DELAY_MS),
                   "--drain-propagation-s", "0", "--log-level", "WARNING"]  # fmt: skip
        url = f"http://127.0.0.1:{port}/v2/models/{name}/infer"
    elif kind == "litserve":
        port = fetch_free_port()
        command = [*pin, sys.executable, str(Path(__file__).resolve()), "peer-litserve", "--artifact", str(model_dir),
                   "--port", str(port), "--max-batch", str(batch)]  # fmt: skip
        url = f"http://127.0.0.1:{port}{LITSERVE_PATH.format(name=name)}"
        env[LITSERVE_FLAG] = "1"
    elif kind == "torchserve":
        port = fetch_free_port(3)
        store, config = apply_torchserve_store(model_dir, work, port, batch)
        torchserve = shutil.which("torchserve") or str(Path(sys.executable).parent / "torchserve")
        command = [*pin, torchserve, "--start", "--foreground", "--ncs", "--disable-token-auth",
                   "--model-store", str(store), "--ts-config", str(config)]  # fmt: skip
        env["LOG_LOCATION"] = str(work / "ts-logs")
        env["METRICS_LOCATION"] = str(work / "ts-logs")
        # TorchServe refuses to start while its pid file (in the temp folder) names a live server: one each.
        temp = work / f"ts-tmp-{server}-{port}"
        temp.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = env["TEMP"] = env["TMP"] = str(temp)
        url = f"http://127.0.0.1:{port}/predictions/{name}"
    else:
        raise ValueError(f"unknown server {server}")
    handle = log.open("wb")
    process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=work,
                               start_new_session=True)  # fmt: skip
    return Served(server, url, process, log)


def apply_stop(served: Served) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(served.process.pid, signal.SIGTERM)
    try:
        served.process.wait(20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(served.process.pid, signal.SIGKILL)
        served.process.wait(10)
    time.sleep(0.5)  # let the ports and the CPU settle before the next server


def query_post(url: str, body: bytes, timeout: float = 30) -> tuple[int, bytes]:
    without_scheme = url.split("://", 1)[1]
    hostport, _, path = without_scheme.partition("/")
    host, _, port = hostport.partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", "/" + path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def fetch_ready(served: Served, body: bytes, reference: list[float], timeout: float = 180) -> None:
    """Wait until the server answers the payload, and check the answer against the in-process output."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if served.process.poll() is not None:
            raise RuntimeError(f"{served.server} exited: {served.log.read_text(errors='replace')[-2000:]}")
        try:
            status, raw = query_post(served.url, body, timeout=30)
        except OSError as error:
            last = str(error)
            time.sleep(0.25)
            continue
        if status == 200:
            data = json.loads(raw)["outputs"][0]["data"]
            worst = max(abs(a - b) for a, b in zip(data, reference, strict=True))
            if worst > 1e-3:
                raise RuntimeError(f"{served.server} answered differently from the model (max diff {worst})")
            return
        last = f"HTTP {status}: {raw[:200]!r}"
        time.sleep(0.25)
    raise TimeoutError(f"{served.server} not ready: {last}")


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open("{body}", "rb"))
wrk.body = f:read("*a")
f:close()
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def query_wrk(url: str, script: Path, concurrency: int, seconds: float, cores: str) -> dict[str, Any]:
    command = ["taskset", "-c", cores, "wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "10s",
               "-s", str(script), url]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    for line in result.stdout.splitlines():
        if line.startswith("WRKJSON "):
            return json.loads(line[len("WRKJSON ") :])
    raise RuntimeError(f"wrk printed no summary: {result.stdout}\n{result.stderr}")


def build_run(model: str, server: str, concurrency: int, raw: dict[str, Any], round_: int = 0) -> Run:
    seconds = raw["duration_us"] / 1e6
    errors = raw["status"] + raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    ok = max(0, raw["requests"] - raw["status"])
    return Run(model, server, concurrency, ok / seconds, raw["p50_us"] / 1e3, raw["p90_us"] / 1e3,
               raw["p99_us"] / 1e3, raw["max_us"] / 1e3, raw["requests"], errors, seconds, round_)  # fmt: skip


def build_best_runs(runs: list[Run]) -> list[Run]:
    """Per (model, server, concurrency), the round with the highest throughput (the same rule for every server:
    on a shared machine, the least disturbed round), in a stable order."""
    best: dict[tuple[str, str, int], Run] = {}
    for run in runs:
        key = (run.model, run.server, run.concurrency)
        if key not in best or run.rps > best[key].rps:
            best[key] = run
    order = {name: i for i, name in enumerate(SERVERS)}
    return sorted(best.values(), key=lambda r: (r.model, r.concurrency, order.get(r.server, 99)))


# -------------------------------------------------------------------------------------------- targets


@dataclass
class Limit:
    """The in-process loop measured right before shipyard's run of the same round (paired, same conditions)."""

    model: str
    round: int
    wall: dict[int, float]  # rows/s by batch size
    cpu: dict[int, float]  # rows per CPU-second by batch size

    @property
    def best(self) -> float:
        return max(self.wall.values(), default=0.0)


def evaluate_targets(
    best_runs: list[Run],
    runs: list[Run],
    limits: list[Limit],
    cpu: dict[tuple[str, str, int, int], float],
    models: list[str],
) -> list[dict[str, Any]]:
    """The targets, each with the measured figures it was decided on (pure).

    Peer ratio: on the best round of each server. Fraction of the in-process limit: per round, shipyard's best
    level against the loop measured just before it in that round; the round whose loop ran fastest counts (the
    least disturbed measurement of the limit, so a limit depressed by a busy moment cannot flatter the server).
    Also reported, not counted: the same fraction per CPU-second (server requests per CPU-second of all its
    processes, against the loop's rows per CPU-second), which a shared machine disturbs less.
    """  # fmt: skip
    targets = []
    for model in models:
        head = next((r for r in best_runs if r.model == model and r.server == "shipyard"
                     and r.concurrency == HEADLINE_CONCURRENCY), None)  # fmt: skip
        peers = [
            r for r in best_runs if r.model == model and r.server in PEERS and r.concurrency == HEADLINE_CONCURRENCY
        ]
        kinds = sorted({SERVERS[r.server][0] for r in peers})
        best = max(peers, key=lambda r: r.rps, default=None)
        met = bool(
            head and best and len(kinds) >= 2 and head.errors == 0
            and head.rps >= PEER_FACTOR * best.rps and head.p99_ms <= best.p99_ms
        )  # fmt: skip
        targets.append({
            "model": model,
            "target": f">= {PEER_FACTOR}x the best peer's req/s at c={HEADLINE_CONCURRENCY}, with a p99 no worse",
            "shipyard_rps": head.rps if head else None,
            "shipyard_p99_ms": head.p99_ms if head else None,
            "best_peer": best.server if best else None,
            "best_peer_rps": best.rps if best else None,
            "best_peer_p99_ms": best.p99_ms if best else None,
            "ratio": (head.rps / best.rps) if head and best and best.rps else None,
            "peers_measured": kinds,
            "met": met,
        })  # fmt: skip
        rounds = []
        for limit in (x for x in limits if x.model == model):
            ours = [r for r in runs if r.model == model and r.server == "shipyard" and r.round == limit.round]
            top = max(ours, key=lambda r: r.rps, default=None)
            if top is None or not limit.best:
                continue
            used = cpu.get((model, "shipyard", top.concurrency, top.round), 0.0)
            per_cpu = (top.rps * top.seconds / used) if used else None
            rounds.append({
                "round": limit.round,
                "shipyard_rps": top.rps,
                "at_concurrency": top.concurrency,
                "errors": top.errors,
                "limit_rows_per_s": limit.best,
                "fraction": top.rps / limit.best,
                "fraction_per_cpu_second": (per_cpu / max(limit.cpu.values())) if per_cpu else None,
            })  # fmt: skip
        chosen = max(rounds, key=lambda r: r["limit_rows_per_s"], default=None)
        targets.append({
            "model": model,
            "target": f">= {LIMIT_FRACTION:.0%} of the in-process batched forward limit (best batch size)",
            **({k: v for k, v in chosen.items() if k != "errors"} if chosen else {}),
            "rounds": rounds,
            "met": bool(chosen and chosen["fraction"] >= LIMIT_FRACTION and chosen["errors"] == 0),
        })  # fmt: skip
    return targets


def build_table(runs: list[Run], limits: list[Limit]) -> str:
    header = (
        f"{'model':<5} {'server':<13} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
        f"{'errors':>6} {'x best peer':>11} {'% limit':>8}"
    )
    lines = [header, "-" * len(header)]
    for run in runs:
        peers = [r for r in runs if r.model == run.model and r.concurrency == run.concurrency and r.server in PEERS]
        best = max((r.rps for r in peers), default=0.0)
        ratio = f"{run.rps / best:.2f}" if run.server == "shipyard" and best else ""
        fastest = max((x.best for x in limits if x.model == run.model), default=0.0)  # the least disturbed loop
        share = f"{run.rps / fastest:.1%}" if run.server == "shipyard" and fastest else ""
        lines.append(
            f"{run.model:<5} {run.server:<13} {run.concurrency:>4} {run.rps:>8.0f} {run.p50_ms:>8.2f} "
            f"{run.p90_ms:>8.2f} {run.p99_ms:>8.2f} {run.errors:>6} {ratio:>11} {share:>8}"
        )
    for limit in limits:
        figures = ", ".join(f"b{b}: {v:.0f}" for b, v in sorted(limit.wall.items()))
        lines.append(f"{limit.model:<5} in-process limit (round {limit.round + 1}), rows/s at batch size: {figures}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- checks


def apply_tools(servers: list[str]) -> tuple[list[str], dict[str, str]]:
    """Make sure wrk is there (apt-get when root); return the runnable servers and why others are skipped."""
    if shutil.which("wrk") is None:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            subprocess.run(["apt-get", "install", "-y", "wrk"], check=False, capture_output=True)
            if shutil.which("wrk") is None:
                subprocess.run(["apt-get", "update"], check=False, capture_output=True)
                subprocess.run(["apt-get", "install", "-y", "wrk"], check=False, capture_output=True)
            if shutil.which("wrk") is not None:
                print("Installed wrk with apt-get", file=sys.stderr)
        if shutil.which("wrk") is None:
            raise SystemExit("wrk is required: apt-get install -y wrk")
    if shutil.which("taskset") is None:
        raise SystemExit("taskset is required (util-linux)")
    skipped: dict[str, str] = {}
    runnable = []
    for server in servers:
        kind = SERVERS[server][0]
        if kind == "litserve" and importlib.util.find_spec("litserve") is None:
            skipped[server] = "litserve is not installed: pip install --group bench"
        elif kind == "torchserve" and importlib.util.find_spec("ts") is None:
            skipped[server] = "torchserve is not installed: pip install --group bench"
        elif kind == "torchserve" and shutil.which("java") is None:
            skipped[server] = "TorchServe needs Java: apt-get install -y openjdk-17-jre-headless"
        else:
            runnable.append(server)
    return runnable, skipped


def fetch_versions() -> dict[str, str]:
    versions = {}
    for package in ("torch", "litserve", "torchserve", "uvloop", "httptools", "orjson"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        versions["wrk"] = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0][:60]
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        versions["java"] = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.split("\n")[0]
    return versions


# --------------------------------------------------------------------------------------------- main


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="shipyard-bench-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def fetch_group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of a process group."""
    ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            rest = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(rest[2]) == pgid:
            ticks += int(rest[11]) + int(rest[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def fetch_limit(model_name: str, model_dir: Path, round_: int, cores: str, quick: bool) -> Limit:
    """Run the in-process loop (`limit`) pinned like the servers."""
    out = subprocess.run(
        ["taskset", "-c", cores, sys.executable, str(Path(__file__).resolve()), "limit", "--artifact", str(model_dir),
         "--seconds", "1" if quick else "3"],
        capture_output=True, text=True, env=build_env(), check=True,
    )  # fmt: skip
    raw = json.loads(out.stdout.strip().splitlines()[-1])
    limit = Limit(model_name, round_, {int(k): v for k, v in raw["wall"].items()},
                  {int(k): v for k, v in raw["cpu"].items()})  # fmt: skip
    print(f"Measured the in-process limit of {model_name}: {limit.wall}", file=sys.stderr)
    return limit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round, 3 s per level, levels 1 and 16 (smoke run)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over every server (best round is reported)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per concurrency level")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring")
    parser.add_argument("--levels", default="1,16,64")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--server-cores", default="0")
    parser.add_argument("--client-cores", default="1")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, model directories)")
    return parser


def run_bench(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup, args.levels = 1, 3.0, 1.0, "1,16"
    levels = [int(c) for c in args.levels.split(",")]
    models = [m for m in args.models.split(",") if m]
    servers, skipped = apply_tools([s for s in args.servers.split(",") if s])
    for server, why in skipped.items():
        print(f"Skipped {server}: {why}", file=sys.stderr)
    runs: list[Run] = []
    cpu: dict[tuple[str, str, int, int], float] = {}
    limits: list[Limit] = []
    failures: dict[str, str] = {}
    started = time.time()
    load_before = os.getloadavg()
    git_head, git_status = fetch_git_state()  # the code as it was when the run started
    with workdir(args.keep) as work:
        for model_name in models:
            model = MODELS[model_name]
            model_dir = apply_model_directory(model, work)
            body, data = build_payload(model)
            body_path = work / f"{model_name}.json"
            body_path.write_bytes(body)
            script = work / f"{model_name}.lua"
            script.write_text(WRK_SCRIPT.format(body=body_path))
            from shipyard.runtime.artifacts import store

            with torch.inference_mode():
                reference = store.load_model(model_dir).module(torch.tensor(data).reshape(1, *model.shape))
            reference_list = reference.reshape(-1).tolist()

            for round_ in range(args.rounds):
                if "shipyard" not in servers:
                    limits.append(fetch_limit(model_name, model_dir, round_, args.server_cores, args.quick))
                order = servers[round_ % len(servers) :] + servers[: round_ % len(servers)]  # rotate per round
                for server in order:
                    if server == "shipyard":  # paired with shipyard's run: same moment, same conditions
                        limits.append(fetch_limit(model_name, model_dir, round_, args.server_cores, args.quick))
                    served = apply_server(server, model_dir, work, args.server_cores)
                    try:
                        fetch_ready(served, body, reference_list)
                        query_wrk(served.url, script, HEADLINE_CONCURRENCY, args.warmup, args.client_cores)
                        for concurrency in levels:
                            before = fetch_group_cpu(served.process.pid)
                            raw = query_wrk(served.url, script, concurrency, args.duration, args.client_cores)
                            run = build_run(model_name, server, concurrency, raw, round_)
                            cpu[(model_name, server, concurrency, round_)] = (
                                fetch_group_cpu(served.process.pid) - before
                            )
                            runs.append(run)
                            print(
                                f"Measured {model_name} on {server} at c={concurrency} (round {round_ + 1}): "
                                f"{run.rps:.0f} req/s, p50 {run.p50_ms:.2f} ms, p99 {run.p99_ms:.2f} ms, "
                                f"{run.errors} errors",
                                file=sys.stderr,
                            )
                    except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as error:
                        failures[f"{model_name}/{server}/round{round_ + 1}"] = str(error)[-500:]
                        print(f"Failed {server} on {model_name}: {error}", file=sys.stderr)
                    finally:
                        apply_stop(served)
    best_runs = build_best_runs(runs)
    targets = evaluate_targets(best_runs, runs, limits, cpu, models)
    met = sum(1 for t in targets if t["met"])
    cpu_info = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), "unknown",
    )  # fmt: skip
    load_after = os.getloadavg()
    result = {
        "benchmark": "serving",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "meta": build_meta(
            git_head, git_status, python=platform.python_version(), torch_version=torch.__version__,
            platform_name=platform.platform(), load_before=load_before, load_after=load_after, started=started,
            finished=time.time(),
        ),  # fmt: skip
        "conditions": {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_info}, {platform.platform()}",
            "server_cores": args.server_cores,
            "client_cores": args.client_cores,
            "torch_threads": THREADS,
            "max_batch_size": MAX_BATCH,
            "batch_delay_ms": DELAY_MS,
            "servers": {name: {"kind": kind, "max_batch": batch} for name, (kind, batch) in SERVERS.items()},
            "load_generator": "wrk -t1, Lua POST script, the same OIP JSON body for every server, --timeout 10s",
            "rounds": args.rounds,
            "selection": "per server and level, the round with the highest req/s (all rounds are in `runs`); "
            "the in-process loop is measured right before shipyard in each round and compared within it",
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "levels": levels,
            "headline_concurrency": HEADLINE_CONCURRENCY,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "versions": fetch_versions(),
            "models": {m: asdict(MODELS[m]) for m in models},
        },
        "skipped": skipped,
        "failures": failures,
        "limits": [asdict(limit) for limit in limits],
        "best_runs": [asdict(r) for r in best_runs],
        "runs": [
            {**asdict(r), "server_cpu_s": round(cpu.get((r.model, r.server, r.concurrency, r.round), 0.0), 2)}
            for r in runs
        ],
        "targets": targets,
        "targets_met": met,
        "targets_total": len(targets),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(build_table(best_runs, limits))
    for target in targets:
        figures = {
            k: (round(v, 3) if isinstance(v, float) else v) for k, v in target.items() if k not in {"target", "rounds"}
        }
        print(f"{'MET ' if target['met'] else 'MISS'} {target['model']}: {target['target']} {json.dumps(figures)}")
    print(f"wrote {out}")
    print(f"targets: {met}/{len(targets)} met")
    return 0


def run_reevaluate(argv: list[str]) -> int:
    """Recount the targets and print the table from a saved result file (the same pure functions)."""
    path = Path(argv[0]) if argv else DEFAULT_OUT
    result = json.loads(path.read_text())
    fields = {f for f in Run.__dataclass_fields__}
    runs = [Run(**{k: v for k, v in r.items() if k in fields}) for r in result["runs"]]
    cpu = {(r["model"], r["server"], r["concurrency"], r["round"]): r.get("server_cpu_s", 0.0) for r in result["runs"]}
    limits = [Limit(x["model"], x["round"], {int(k): v for k, v in x["wall"].items()},
                    {int(k): v for k, v in x["cpu"].items()}) for x in result["limits"]]  # fmt: skip
    models = list(result["conditions"]["models"])
    best_runs = build_best_runs(runs)
    targets = evaluate_targets(best_runs, runs, limits, cpu, models)
    met = sum(1 for t in targets if t["met"])
    result.update(best_runs=[asdict(r) for r in best_runs], targets=targets, targets_met=met)
    result["targets_total"] = len(targets)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(build_table(best_runs, limits))
    for target in targets:
        figures = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in target.items()
                   if k not in {"target", "rounds"}}  # fmt: skip
        print(f"{'MET ' if target['met'] else 'MISS'} {target['model']}: {target['target']} {json.dumps(figures)}")
    print(f"wrote {path}")
    print(f"targets: {met}/{len(targets)} met")
    return 0


def main(argv: list[str]) -> int:
    if argv and argv[0] == "reevaluate":
        return run_reevaluate(argv[1:])
    if argv and argv[0] == "peer-litserve":
        return run_peer_litserve(argv[1:])
    if argv and argv[0] == "limit":
        return run_limit(argv[1:])
    return run_bench(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
