"""Getting the model the inference server serves: which form, loaded and warmed up on every device.

`plan_served_form`, `plan_compiled` and `plan_warmup_batches` are pure. `fetch_model` reads the artifact
(`artifacts`: safe loading, manifest, digest) and `apply_load` sizes torch's threads and starts one
`engine.DeviceWorker` per device, each of which loads the model, warms it up and (with `--batch-sizing measured`)
times it at batch sizes up to the max batch size; it blocks until all are ready and returns the batch size to fill
up to (`batching.plan_batch_limit`).

The served form: the compression Job records, per device kind, whether the eager model or its AOTInductor package
was faster where it ran (the manifest's `fastest`); `--compiled auto` (the default, or `SHIPYARD_COMPILED`, which
the operator sets only to pin `on` or `off` from spec.compression.compiled.mode) serves that form when the package
fits this server (its device kind, torch version, float32, the max batch size), else the eager model, and logs why.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shipyard.runtime import batching, oip
from shipyard.runtime.server import settings

log = logging.getLogger("shipyard.runtime.server")

Loader = Callable[[str, str], Any]  # (artifact path, device) -> a model with .module, .inputs, .outputs


def plan_compiled(mode: str, problem: str | None, fastest: Mapping[str, Any] | None = None) -> tuple[bool, str]:
    """Whether to serve the artifact's AOTInductor package, and why (pure).

    `problem` is why the package cannot serve this configuration (`artifacts.programs.assess_compiled`), None when
    it can; `fastest` the compression Job's record for this device kind (the manifest's `fastest[device]`: the form
    it measured faster, and why), None when there is none. auto serves the recorded form when the package fits (an
    artifact without a record, made before the Job measured both forms, serves the package when it fits, as it did);
    on requires the package (ConfigError when it does not fit); off serves the eager model."""
    if mode == "off":
        return False, "the eager model (--compiled off)"
    if mode == "on":
        if problem is not None:
            raise settings.ConfigError(f"--compiled on: {problem}")
        return True, "the artifact's AOTInductor package (--compiled on)"
    if problem is not None:
        return False, f"the eager model ({problem})"
    if fastest is None:
        return True, "the artifact's AOTInductor package (no measurement recorded for this device)"
    if fastest.get("form") == "compiled":
        why = fastest.get("why")
        return True, f"the artifact's AOTInductor package (the compression Job measured it faster: {why})"
    return False, f"the eager model (the compression Job measured it faster: {fastest.get('why')})"


def plan_served_form(
    manifest: Mapping[str, Any],
    *,
    mode: str,
    device: str,
    torch_version: str,
    dtype: str = "float32",
    compile_model: bool = False,
    max_batch_size: int = 1,
) -> tuple[bool, str]:
    """Which form of an artifact this server serves, and why (pure): the package when the pin asks for it
    (`mode` on) or, with auto, when the Job measured it faster on this device kind and it fits the device, the torch
    version, the dtype and the max batch size; else the eager model. Raises ConfigError for mode on when the package
    cannot serve here."""
    from shipyard.runtime.artifacts import programs  # no torch import: pure

    problem = None if mode == "off" else programs.assess_compiled(
        manifest, device=device, torch_version=torch_version, dtype=dtype, compile_model=compile_model,
        max_batch_size=max_batch_size,
    )  # fmt: skip
    fastest = (manifest.get("fastest") or {}).get(device.split(":")[0])
    return plan_compiled(mode, problem, fastest)


def fetch_model(path: str, device: str, config: settings.ServerConfig) -> Any:
    """Load an artifact with the artifacts package (safe loading, manifest, digest): its AOTInductor package or the
    eager model, as `plan_served_form` decides."""
    import torch

    # imported lazily: they pull in torch and the artifact formats
    from shipyard.runtime import engine
    from shipyard.runtime.artifacts import manifests, store

    directory = Path(path).resolve()
    manifest = manifests.load_verified_manifest(directory)
    compiled, what = plan_served_form(
        manifest, mode=config.compiled, device=device, torch_version=torch.__version__,
        dtype=engine.plan_dtype(config.dtype, device), compile_model=config.compile,
        max_batch_size=config.max_batch_size,
    )  # fmt: skip
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
    batch_limit: int = 0  # rows a batch is filled up to (<= max batch size); 0 = the max batch size
    timings: dict[int, float] = field(default_factory=dict)  # first device: seconds per forward pass by batch size
    text: Any = None  # textinput.TextInput when the manifest declares a tokenizer (text in), else None


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
    timings: dict[str, dict[int, float]] = {}

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
        if config.batch_sizing == "measured":
            timings[device] = built.time_batches(batching.plan_sizing_batches(config.max_batch_size))
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
    from shipyard.runtime import textinput

    try:
        text = textinput.load_text_input(models[devices[0]])
    except BaseException:
        for worker in workers:
            worker.stop()
        raise
    if text is not None:
        log.info("Loaded tokenizer %s: input %r (BYTES) feeds %s, up to %d tokens a text", text.spec.file, text.name,
                 list(text.spec.fed_inputs), text.spec.max_length)
    first = timings.get(devices[0], {})
    limit = batching.plan_batch_limit(first, config.max_batch_size)
    if first:
        figures = ", ".join(f"{size}: {size / spent:.0f}" for size, spent in sorted(first.items()))
        log.info("Timed the model on %s at batch sizes up to %d (rows/s: %s); batches fill up to %d rows",
                 devices[0], config.max_batch_size, figures, limit)  # fmt: skip
    return LoadedWorkers(models[devices[0]], workers, devices, threads, limit, first, text)
