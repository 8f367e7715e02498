"""The compute side of the server: device and precision planning, torch thread sizing, and one inference
worker thread per device that runs batches of validated requests through the model.

Pure planners: `plan_devices`, `plan_dtype`, `build_cpu_threads`, `build_warmup_shapes`,
`build_output_tensors`. I/O: `fetch_cpu_limit` (cgroup files, CPU affinity), `fetch_gpu_stats` (CUDA
driver), and `Engine`/`DeviceWorker`, which move tensors between host and device and run the model.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from shipyard.runtime import batching, oip
from shipyard.runtime.textinput import build_padded_batch

log = logging.getLogger("shipyard.runtime.engine")

DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# OIP datatype -> torch dtype of the tensor the model receives/returns (BF16 travels as float32 in numpy).
TORCH_BY_DATATYPE: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "UINT16": torch.uint16,
    "UINT32": torch.uint32,
    "UINT64": torch.uint64,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "FP32": torch.float32,
    "FP64": torch.float64,
    "BF16": torch.bfloat16,
}
_FLOAT_DATATYPES = frozenset({"FP16", "FP32", "FP64", "BF16"})


class ServableModel(Protocol):
    """What the server needs of a loaded model (artifacts.store.LoadedModel satisfies it)."""

    @property
    def module(self) -> torch.nn.Module: ...

    @property
    def inputs(self) -> Sequence[oip.TensorSpecLike]: ...

    @property
    def outputs(self) -> Sequence[oip.TensorSpecLike]: ...


# ------------------------------------------------------------------------------------------- planning


def plan_devices(requested: str, cuda_count: int) -> list[str]:
    """The devices to serve on: one worker each.

    "auto": every visible GPU, else the CPU; "cpu"; "cuda": every visible GPU (error without one);
    "cuda:N": that GPU. Raises ValueError with the reason when the request cannot be met.
    """
    value = requested.strip().lower()
    if value == "auto":
        return [f"cuda:{i}" for i in range(cuda_count)] or ["cpu"]
    if value == "cpu":
        return ["cpu"]
    if value == "cuda":
        if cuda_count == 0:
            raise ValueError("--device cuda was requested but no CUDA device is visible")
        return [f"cuda:{i}" for i in range(cuda_count)]
    if value.startswith("cuda:"):
        indices = value[5:].split(",")
        devices = []
        for index in indices:
            if not index.isdigit():
                raise ValueError(f"invalid device {requested!r}: expected cuda:N")
            if int(index) >= cuda_count:
                raise ValueError(f"device {requested!r} is not visible ({cuda_count} CUDA device(s))")
            devices.append(f"cuda:{int(index)}")
        return list(dict.fromkeys(devices))
    raise ValueError(f"invalid device {requested!r}: expected auto, cpu, cuda or cuda:N[,M]")


def plan_dtype(requested: str, device: str) -> str:
    """The compute precision for a device: float32 unless float16/bfloat16 is configured.

    Half precision is a GPU feature here: float16 on a CPU is refused (slow, and most CPU kernels lack it);
    bfloat16 is allowed on both.
    """
    canonical = DTYPE_ALIASES.get(requested.strip().lower())
    if canonical is None:
        raise ValueError(f"invalid dtype {requested!r}: expected one of {sorted(DTYPE_ALIASES)}")
    if canonical == "float16" and not device.startswith("cuda"):
        raise ValueError("float16 is only supported on CUDA devices; use bfloat16 or float32 on the CPU")
    return canonical


def build_cpu_threads(cpu_max: str | None, cfs_quota_us: int | None, cfs_period_us: int | None, affinity: int) -> int:
    """Torch intra-op threads from the container's CPU limit.

    cgroup v2 `cpu.max` ("QUOTA PERIOD" or "max PERIOD") or cgroup v1 quota/period, rounded up, capped by the
    CPUs this process may run on (affinity), at least 1.
    """
    limit: float | None = None
    if cpu_max:
        parts = cpu_max.split()
        if len(parts) == 2 and parts[0] != "max":
            try:
                quota, period = int(parts[0]), int(parts[1])
                if quota > 0 and period > 0:
                    limit = quota / period
            except ValueError:
                limit = None
    elif cfs_quota_us is not None and cfs_period_us and cfs_quota_us > 0:
        limit = cfs_quota_us / cfs_period_us
    threads = max(1, affinity)
    if limit is not None:
        threads = min(threads, max(1, math.ceil(limit - 1e-9)))
    return threads


def plan_threads(flag: int | None, omp_num_threads: str | None, cpu_limit: int) -> tuple[int, str]:
    """Torch intra-op threads and where the number came from: `--threads`, else a positive integer
    OMP_NUM_THREADS from the pod's env (what a torch user sets; torch reads it at import, and the server must not
    override it), else the CPU limit (`fetch_cpu_limit`). An unusable OMP_NUM_THREADS is ignored, and said so."""
    if flag is not None:
        return flag, "--threads"
    raw = (omp_num_threads or "").strip()
    if raw:
        if raw.isdigit() and int(raw) >= 1:
            return int(raw), "OMP_NUM_THREADS"
        return cpu_limit, f"the CPU limit (OMP_NUM_THREADS={omp_num_threads!r} is not a positive integer: ignored)"
    return cpu_limit, "the CPU limit"


def build_warmup_shapes(
    specs: Sequence[oip.TensorSpecLike], batch_sizes: Sequence[int], free_dim: int = 8
) -> list[list[tuple[int, ...]]]:
    """Concrete warm-up input shapes: per batch size, one per input (-1 non-batch dims -> free_dim)."""
    shapes = []
    for rows in batch_sizes:
        shapes.append([(rows, *(free_dim if d == -1 else d for d in list(spec.shape)[1:])) for spec in specs])
    return shapes


def build_output_tensors(result: Any, outputs: Sequence[oip.TensorSpecLike]) -> list[torch.Tensor]:
    """The model's return value as a list of tensors in declared output order.

    Accepts a tensor (one output), a tuple/list (declared order) or a mapping (by output name). Raises
    oip.ModelFailure when it does not match the declared outputs.
    """
    if isinstance(result, torch.Tensor):
        tensors = [result]
    elif isinstance(result, list | tuple):
        tensors = list(result)
    elif isinstance(result, Mapping):
        missing = [spec.name for spec in outputs if spec.name not in result]
        if missing:
            raise oip.ModelFailure(f"the model did not return output(s) {missing}")
        tensors = [result[spec.name] for spec in outputs]
    else:
        raise oip.ModelFailure(f"the model returned {type(result).__name__}, not tensors")
    if len(tensors) != len(outputs):
        raise oip.ModelFailure(f"the model returned {len(tensors)} output(s), it declares {len(outputs)}")
    for tensor, spec in zip(tensors, outputs, strict=True):
        if not isinstance(tensor, torch.Tensor):
            raise oip.ModelFailure(f"output {spec.name!r} is {type(tensor).__name__}, not a tensor")
    return tensors


# ------------------------------------------------------------------------------------------------ I/O


def fetch_cpu_limit(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Read the CPU limit (cgroup v2 or v1) and the affinity mask; return the torch thread count."""
    root = Path(cgroup_root)

    def read(*names: str) -> str | None:
        for name in names:
            try:
                return (root / name).read_text().strip()
            except OSError:
                continue
        return None

    cpu_max = read("cpu.max")
    quota = read("cpu/cpu.cfs_quota_us", "cpu,cpuacct/cpu.cfs_quota_us", "cpu.cfs_quota_us")
    period = read("cpu/cpu.cfs_period_us", "cpu,cpuacct/cpu.cfs_period_us", "cpu.cfs_period_us")
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 1
    return build_cpu_threads(
        cpu_max,
        int(quota) if quota and quota.lstrip("-").isdigit() else None,
        int(period) if period and period.isdigit() else None,
        affinity,
    )


@dataclass(frozen=True)
class GpuStats:
    device: str
    allocated_bytes: int
    reserved_bytes: int
    utilization: float | None  # 0..1, None when the driver library cannot tell


def fetch_gpu_stats(devices: Sequence[str], cuda: Any = None) -> list[GpuStats]:
    """Memory and utilisation of the CUDA devices in use (empty on CPU).

    `cuda` is `torch.cuda` unless a test passes a stand-in with `memory_allocated`, `memory_reserved` and
    `utilization` (percent). Utilisation needs NVML (the `pynvml` module of nvidia-ml-py, the `gpu` extra); without
    it, or on any driver error, the reading's utilisation is None and only the memory numbers are exported.
    """
    cuda = torch.cuda if cuda is None else cuda
    stats = []
    for device in devices:
        if not device.startswith("cuda"):
            continue
        index = torch.device(device).index or 0
        try:
            utilization: float | None = float(cuda.utilization(index)) / 100.0
        except Exception:  # pynvml (or amdsmi) missing or failing; memory numbers still come from torch
            utilization = None
        stats.append(GpuStats(device, int(cuda.memory_allocated(index)), int(cuda.memory_reserved(index)), utilization))
    return stats


class Engine:
    """A model placed on one device, in the configured precision, optionally compiled.

    `run` takes one numpy array per input (batch first) and returns one numpy array per declared output, in
    the outputs' wire datatypes. On CUDA, inputs go through pinned host memory on the engine's own stream.
    """

    def __init__(
        self,
        model: ServableModel,
        device: str,
        *,
        dtype: str = "float32",
        compile_model: bool = False,
        compile_mode: str | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.inputs = list(model.inputs)
        self.outputs = list(model.outputs)
        module = model.module.eval().to(self.device)
        compute = TORCH_DTYPES[dtype]
        if compute != torch.float32:
            module = module.to(dtype=compute)
        if compile_model:
            module = torch.compile(module, mode=compile_mode)  # type: ignore[assignment]
        self.module: Callable[..., Any] = module
        # What each input becomes on the device: half/bfloat16 for floating inputs when so configured.
        self._input_dtypes: list[torch.dtype | None] = []
        for spec in self.inputs:
            if spec.datatype in _FLOAT_DATATYPES and compute != torch.float32:
                self._input_dtypes.append(compute)
            elif spec.datatype == "BF16":
                self._input_dtypes.append(torch.bfloat16)
            else:
                self._input_dtypes.append(None)
        # What each output is converted to before it leaves: the numpy wire dtype of its datatype.
        self._output_dtypes = [
            TORCH_BY_DATATYPE["FP32" if spec.datatype == "BF16" else spec.datatype] for spec in self.outputs
        ]
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None  # type: ignore[no-untyped-call]

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        if not torch.is_inference_mode_enabled():  # the worker thread enters it once for good
            with torch.inference_mode():
                return self._run(arrays)
        return self._run(arrays)

    def _run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        rows = arrays[0].shape[0]
        if self.cuda:
            assert self.stream is not None
            with torch.cuda.stream(self.stream):
                tensors = [self._to_device(a, i) for i, a in enumerate(arrays)]
                result = self.module(*tensors)
                outputs = self._to_host(build_output_tensors(result, self.outputs), rows)
                self.stream.synchronize()
            return [tensor.numpy() for tensor in outputs]
        tensors = [self._to_cpu(a, i) for i, a in enumerate(arrays)]
        result = self.module(*tensors)
        outputs = self._to_host(build_output_tensors(result, self.outputs), rows)
        return [tensor.numpy() for tensor in outputs]

    def _to_cpu(self, array: np.ndarray, index: int) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        dtype = self._input_dtypes[index]
        return tensor if dtype is None else tensor.to(dtype)

    def _to_device(self, array: np.ndarray, index: int) -> torch.Tensor:
        host = torch.from_numpy(array).pin_memory()
        tensor = host.to(self.device, non_blocking=True)
        dtype = self._input_dtypes[index]
        return tensor if dtype is None else tensor.to(dtype)

    def _to_host(self, tensors: list[torch.Tensor], rows: int) -> list[torch.Tensor]:
        host = []
        for tensor, dtype, spec in zip(tensors, self._output_dtypes, self.outputs, strict=True):
            if tensor.ndim == 0 or tensor.shape[0] != rows:
                raise oip.ModelFailure(
                    f"output {spec.name!r} has shape {list(tensor.shape)}, expected batch dimension {rows}"
                )
            if tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            if self.cuda:
                pinned = torch.empty(tensor.shape, dtype=dtype, pin_memory=True)
                pinned.copy_(tensor, non_blocking=True)
                host.append(pinned)
            else:
                host.append(tensor.detach())
        return host

    def _zeros(self, batch_sizes: Sequence[int]) -> list[list[np.ndarray]]:
        """Inputs of zeros for each batch size (one array per declared input)."""
        batches = []
        for shapes in build_warmup_shapes(self.inputs, batch_sizes):
            dtypes = [oip.NUMPY_BY_DATATYPE[spec.datatype] for spec in self.inputs]
            batches.append([np.zeros(shape, dtype=dtype) for shape, dtype in zip(shapes, dtypes, strict=True)])
        return batches

    def warmup(self, batch_sizes: Sequence[int], iterations: int) -> None:
        """Run the model on zeros at each batch size (compiles kernels, fills allocator caches)."""
        for arrays in self._zeros(batch_sizes):
            for _ in range(max(1, iterations)):
                self.run(arrays)

    def time_batches(self, batch_sizes: Sequence[int], rounds: int = 5, budget_s: float = 3.0) -> dict[int, float]:
        """Seconds per forward pass (inputs in, outputs on the host) at each batch size: the fastest of `rounds`
        interleaved rounds (a busy moment slows every size alike, and the minimum discards it); fewer rounds, at
        least two, when they would take longer than `budget_s`. On a CPU with one torch thread, all the work is
        this thread's: its CPU time is timed, which other processes on a busy node do not inflate."""
        sized = list(zip(batch_sizes, self._zeros(batch_sizes), strict=True))
        for _, arrays in sized:  # once each: shapes not seen in warm-up
            self.run(arrays)
        clock = time.thread_time if not self.cuda and torch.get_num_threads() == 1 else time.perf_counter
        best: dict[int, float] = {}
        started = time.perf_counter()
        for round_ in range(max(1, rounds)):
            for size, arrays in sized:
                begin = clock()
                self.run(arrays)
                spent = clock() - begin
                best[size] = min(best.get(size, spent), spent)
            if round_ >= 1 and time.perf_counter() - started > budget_s:
                break
        return best


def run_jobs(engine: Engine, jobs: list[batching.Job]) -> list[batching.JobResult]:
    """Run a batch of jobs as one forward pass and split the outputs per job.

    When the batched pass fails and the batch holds several jobs, each job is retried alone so that one
    request the model cannot handle does not fail its neighbours.
    """
    live = [job for job in jobs if job.state != batching.CANCELLED]
    results: dict[int, batching.JobResult] = {}
    if live:
        pads = live[0].request.pad_values
        if len(live) == 1:
            arrays = live[0].request.arrays
        elif pads is None:
            arrays = [
                np.concatenate([job.request.arrays[i] for job in live]) for i in range(len(live[0].request.arrays))
            ]
        else:  # tokenized text: each fed input padded to the batch's longest sequence
            arrays = build_batch_arrays([job.request.arrays for job in live], pads)
        try:
            outputs = engine.run(arrays)
        except Exception as error:
            if len(live) == 1:
                results[id(live[0])] = _model_failure(error)
            else:
                for job in live:
                    results[id(job)] = run_jobs(engine, [job])[0]
        else:
            start = 0
            for job in live:
                stop = start + job.request.rows
                results[id(job)] = [output[start:stop] for output in outputs]
                start = stop
    return [results.get(id(job)) for job in jobs]


def build_batch_arrays(
    per_job: Sequence[Sequence[np.ndarray]], pad_values: Sequence[int | None]
) -> list[np.ndarray]:
    """One array per input from the jobs' arrays: concatenated on the batch axis, and for an input with a pad value
    padded on axis 1 to the longest among the jobs (tokenized text). Pure."""
    arrays = []
    for i, pad in enumerate(pad_values):
        parts = [arrays_of_job[i] for arrays_of_job in per_job]
        arrays.append(np.concatenate(parts) if pad is None else build_padded_batch(parts, pad))
    return arrays


def _model_failure(error: BaseException) -> oip.ServingError:
    if isinstance(error, oip.ServingError):
        return error
    log.warning("Model raised %s: %s", type(error).__name__, error)
    return oip.ModelFailure(f"the model failed: {type(error).__name__}: {error}")


class DeviceWorker:
    """The one inference thread of a device.

    The thread itself builds its engine (loads the model onto the device, compiles, warms up), so that
    everything device-bound (current device, streams, compiled graphs and CUDA graphs, which are per thread)
    is made where it runs; then it takes batches from its inbox and reports results to the event loop.
    """

    def __init__(
        self,
        device: str,
        build: Callable[[], Engine],
        loop: asyncio.AbstractEventLoop,
        on_done: Callable[[DeviceWorker, list[batching.Job], list[batching.JobResult]], None],
    ) -> None:
        self.device = device
        self.engine: Engine | None = None
        self.error: BaseException | None = None
        self.ready = threading.Event()  # set once the engine is built (or failed: see `error`)
        self._build = build
        self._loop = loop
        self._on_done = on_done
        self._inbox: queue.SimpleQueue[list[batching.Job] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"infer-{device}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, jobs: list[batching.Job]) -> None:
        self._inbox.put(jobs)

    def stop(self) -> None:
        self._inbox.put(None)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            if self.device.startswith("cuda"):
                torch.cuda.set_device(torch.device(self.device))
            self.engine = self._build()
        except BaseException as error:  # reported by whoever waits on `ready`
            self.error = error
            self.ready.set()
            return
        self.ready.set()
        with torch.inference_mode():
            self._serve(self.engine)

    def _serve(self, engine: Engine) -> None:
        while True:
            jobs = self._inbox.get()
            if jobs is None:
                return
            results = run_jobs(engine, jobs)
            try:
                self._loop.call_soon_threadsafe(self._on_done, self, jobs, results)
            except RuntimeError:  # the loop has closed: the server is exiting
                return
