"""Getting the model the inference server serves: which form, loaded and warmed up on every device.

`plan_compiled` and `plan_warmup_batches` are pure. `fetch_model` reads the artifact (`artifacts`: safe loading,
manifest, digest) and `apply_load` sizes torch's threads and starts one `engine.DeviceWorker` per device, each of
which loads the model and warms it up; it blocks until all are ready.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shipyard.runtime import batching, oip
from shipyard.runtime.server import settings

log = logging.getLogger("shipyard.runtime.server")

Loader = Callable[[str, str], Any]  # (artifact path, device) -> a model with .module, .inputs, .outputs


def plan_compiled(mode: str, problem: str | None) -> tuple[bool, str]:
    """Whether to serve the artifact's AOTInductor package, and why (pure). `problem` is why the package cannot
    serve this configuration (`artifacts.programs.assess_compiled`), None when it can. Raises ConfigError for mode
    `on` with a problem."""
    if mode == "off":
        return False, "the eager model (--compiled off)"
    if problem is None:
        return True, "the artifact's AOTInductor package"
    if mode == "on":
        raise settings.ConfigError(f"--compiled on: {problem}")
    return False, f"the eager model ({problem})"


def fetch_model(path: str, device: str, config: settings.ServerConfig) -> Any:
    """Load an artifact with the artifacts package (safe loading, manifest, digest): its AOTInductor package when
    `config.compiled` asks for it and it fits (`plan_compiled`), else the eager model."""
    import torch

    # imported lazily: they pull in torch and the artifact formats
    from shipyard.runtime import engine
    from shipyard.runtime.artifacts import manifests, programs, store

    directory = Path(path).resolve()
    manifest = manifests.load_verified_manifest(directory)
    problem = None if config.compiled == "off" else programs.assess_compiled(
        manifest, device=device, torch_version=torch.__version__, dtype=engine.plan_dtype(config.dtype, device),
        compile_model=config.compile, max_batch_size=config.max_batch_size,
    )  # fmt: skip
    compiled, what = plan_compiled(config.compiled, problem)
    log.info("Serving %s on %s", what, device)
    return store.load_model_from_manifest(manifest, directory, device=device, compiled=compiled)


def plan_warmup_batches(max_batch_size: int, compiled: bool) -> list[int]:
    """Batch sizes to warm up with (pure): 1 and the largest; with torch.compile also 2, so that the switch to a
    dynamic batch dimension (compile specialises on the first sizes it sees) happens before traffic does."""
    sizes = {1, max_batch_size}
    if compiled:
        sizes.add(min(2, max_batch_size))
    return sorted(sizes)


@dataclass
class LoadedWorkers:
    model: Any  # the model as loaded on the first device (its declared inputs and outputs)
    workers: list[Any]  # engine.DeviceWorker, one per device, started and warmed up
    devices: list[str]
    threads: int


def apply_load(
    config: settings.ServerConfig,
    loader: Loader,
    loop: asyncio.AbstractEventLoop,
    on_done: Callable[[Any, list[batching.Job], list[Any]], None],
) -> LoadedWorkers:
    """Size torch's threads and start one worker per device; each loads the model and warms it up.

    Blocks until every worker is ready; raises the first worker's error (after stopping them all).
    """
    import torch

    from shipyard.runtime import engine

    threads, source = engine.plan_threads(config.threads, os.environ.get("OMP_NUM_THREADS"), engine.fetch_cpu_limit())
    torch.set_num_threads(threads)
    log.info("Torch uses %d intra-op thread(s), from %s", threads, source)
    devices = engine.plan_devices(config.device, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    dtypes = [engine.plan_dtype(config.dtype, device) for device in devices]
    models: dict[str, Any] = {}

    def build(device: str, dtype: str) -> Any:
        started = time.perf_counter()
        model = loader(config.artifact, device)
        problems = oip.assess_tensor_specs(model.inputs, model.outputs)
        if problems:
            raise ValueError("; ".join(problems))
        built = engine.Engine(
            model, device, dtype=dtype, compile_model=config.compile, compile_mode=config.compile_mode
        )
        built.warmup(plan_warmup_batches(config.max_batch_size, config.compile), config.warmup_iterations)
        models[device] = model
        log.info(
            "Loaded and warmed up model %s (version %s) on %s in %s in %.2f s",
            config.model_name, config.model_version, device, dtype, time.perf_counter() - started,
        )  # fmt: skip
        return built

    workers = [
        engine.DeviceWorker(device, functools.partial(build, device, dtype), loop, on_done)
        for device, dtype in zip(devices, dtypes, strict=True)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.ready.wait()
    errors = [worker.error for worker in workers if worker.error is not None]
    if errors:
        for worker in workers:
            worker.stop()
        raise errors[0]
    return LoadedWorkers(models[devices[0]], workers, devices, threads)
