"""The GPU gauges of the inference server without a GPU: device readings in, exported samples out.

`metrics.build_gpu_families` is pure (readings -> metric families); `engine.fetch_gpu_stats` takes a stand-in for
`torch.cuda`, so the path "NVML missing (nvidia-ml-py not installed) -> no utilisation sample, memory still there"
runs here too. Samples are read back from the server's Prometheus text exposition, under the contract's names.
"""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shipyard import contract
from shipyard.runtime import engine, metrics

MODEL, VERSION = "digits", "1.2.0"
GPU_METRICS = (contract.METRIC_GPU_MEMORY_ALLOCATED, contract.METRIC_GPU_MEMORY_RESERVED,
               contract.METRIC_GPU_UTILIZATION)
ALLOCATED, RESERVED, UTILIZATION = GPU_METRICS


def gpu_samples(server: metrics.ServerMetrics) -> dict[tuple[str, str], float]:
    """(metric name, device) -> value of every GPU sample in the exposition; model and version labels checked."""
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(server.build_exposition().decode()):
        for sample in family.samples:
            if sample.name in GPU_METRICS:
                assert sample.labels == {contract.LABEL_MODEL: MODEL, contract.LABEL_VERSION: VERSION,
                                         contract.LABEL_DEVICE: sample.labels[contract.LABEL_DEVICE]}
                key = (sample.name, sample.labels[contract.LABEL_DEVICE])
                assert key not in out, f"duplicate sample {key}"
                out[key] = sample.value
    return out


GiB = 1 << 30
CASES = [
    pytest.param([], {}, id="no-gpu"),
    pytest.param(
        [engine.GpuStats("cuda:0", 3 * GiB, 4 * GiB, 0.25)],
        {(ALLOCATED, "cuda:0"): 3 * GiB, (RESERVED, "cuda:0"): 4 * GiB, (UTILIZATION, "cuda:0"): 0.25},
        id="one-gpu",
    ),
    pytest.param(
        [engine.GpuStats("cuda:0", 1024, 2048, 0.0), engine.GpuStats("cuda:1", 0, 0, 1.0)],
        {(ALLOCATED, "cuda:0"): 1024, (RESERVED, "cuda:0"): 2048, (UTILIZATION, "cuda:0"): 0.0,
         (ALLOCATED, "cuda:1"): 0, (RESERVED, "cuda:1"): 0, (UTILIZATION, "cuda:1"): 1.0},
        id="two-gpus-idle-is-a-real-zero",
    ),
    pytest.param(
        [engine.GpuStats("cuda:0", 1024, 2048, None)],
        {(ALLOCATED, "cuda:0"): 1024, (RESERVED, "cuda:0"): 2048},
        id="utilisation-unknown-no-sample-memory-still-there",
    ),
    pytest.param(
        [engine.GpuStats("cuda:0", 10, 20, None), engine.GpuStats("cuda:1", 30, 40, 0.5)],
        {(ALLOCATED, "cuda:0"): 10, (RESERVED, "cuda:0"): 20,
         (ALLOCATED, "cuda:1"): 30, (RESERVED, "cuda:1"): 40, (UTILIZATION, "cuda:1"): 0.5},
        id="utilisation-unknown-on-one-device-only",
    ),
]


@pytest.mark.parametrize(("readings", "expected"), CASES)
def test_exported_gpu_samples(readings: list[engine.GpuStats], expected: dict[tuple[str, str], float]) -> None:
    server = metrics.ServerMetrics(MODEL, VERSION)
    server.register_gpu(lambda: readings)
    assert gpu_samples(server) == expected


@pytest.mark.parametrize(("readings", "expected"), CASES)
def test_build_gpu_families_is_pure(readings: list[engine.GpuStats],
                                    expected: dict[tuple[str, str], float]) -> None:
    families = metrics.build_gpu_families(MODEL, VERSION, readings)
    assert [f.name for f in families] == list(GPU_METRICS)
    assert all(f.type == "gauge" for f in families)
    got = {(s.name, s.labels[contract.LABEL_DEVICE]): s.value for f in families for s in f.samples}
    assert got == expected


def test_the_readings_are_fetched_at_every_scrape() -> None:
    reading = [engine.GpuStats("cuda:0", 1, 2, 0.1)]
    server = metrics.ServerMetrics(MODEL, VERSION)
    server.register_gpu(lambda: reading)
    assert gpu_samples(server)[(ALLOCATED, "cuda:0")] == 1
    reading[0] = engine.GpuStats("cuda:0", 5, 6, 0.9)
    assert gpu_samples(server) == {(ALLOCATED, "cuda:0"): 5, (RESERVED, "cuda:0"): 6, (UTILIZATION, "cuda:0"): 0.9}


def test_a_server_without_gpus_exports_no_gpu_family() -> None:
    """The server registers the GPU collector only for CUDA devices; a CPU server's exposition never names them."""
    text = metrics.ServerMetrics(MODEL, VERSION).build_exposition().decode()
    assert not any(name in text for name in GPU_METRICS)


class FakeCuda:
    """`torch.cuda`'s three readers; `utilization` raises what torch raises without pynvml when `nvml` is False."""

    def __init__(self, allocated: dict[int, int], reserved: dict[int, int], percent: dict[int, int],
                 nvml: bool = True) -> None:
        self.allocated, self.reserved, self.percent, self.nvml = allocated, reserved, percent, nvml

    def memory_allocated(self, index: int) -> int:
        return self.allocated[index]

    def memory_reserved(self, index: int) -> int:
        return self.reserved[index]

    def utilization(self, index: int) -> int:
        if not self.nvml:
            raise ModuleNotFoundError("pynvml does not seem to be installed or it can't be imported.")
        return self.percent[index]


@pytest.mark.parametrize(("devices", "cuda", "expected"), [
    pytest.param(["cpu"], FakeCuda({}, {}, {}), [], id="cpu-only"),
    pytest.param(["cuda"], FakeCuda({0: 7}, {0: 8}, {0: 40}), [engine.GpuStats("cuda", 7, 8, 0.4)],
                 id="bare-cuda-is-device-0"),
    pytest.param(["cuda:0", "cuda:1"], FakeCuda({0: 1, 1: 3}, {0: 2, 1: 4}, {0: 0, 1: 100}),
                 [engine.GpuStats("cuda:0", 1, 2, 0.0), engine.GpuStats("cuda:1", 3, 4, 1.0)], id="two-gpus"),
    pytest.param(["cuda:1"], FakeCuda({1: 5}, {1: 6}, {}, nvml=False), [engine.GpuStats("cuda:1", 5, 6, None)],
                 id="pynvml-absent"),
])
def test_fetch_gpu_stats(devices: list[str], cuda: Any, expected: list[engine.GpuStats]) -> None:
    assert engine.fetch_gpu_stats(devices, cuda) == expected


def test_pynvml_absent_end_to_end_memory_gauges_stay() -> None:
    cuda = FakeCuda({0: 100, 1: 300}, {0: 200, 1: 400}, {}, nvml=False)
    server = metrics.ServerMetrics(MODEL, VERSION)
    server.register_gpu(lambda: engine.fetch_gpu_stats(["cuda:0", "cuda:1"], cuda))
    assert gpu_samples(server) == {(ALLOCATED, "cuda:0"): 100, (RESERVED, "cuda:0"): 200,
                                   (ALLOCATED, "cuda:1"): 300, (RESERVED, "cuda:1"): 400}


def test_gpu_metric_names_live_in_the_contract() -> None:
    """The dashboard and the rules test read names from operator/contract.py: the runtime defines none of its own."""
    assert set(GPU_METRICS) == {"shipyard_gpu_memory_allocated_bytes", "shipyard_gpu_memory_reserved_bytes",
                                "shipyard_gpu_utilization_ratio"}
    source = metrics.__file__
    with open(source) as f:
        assert '"shipyard_gpu_' not in f.read()
