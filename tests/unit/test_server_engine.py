"""The compute side: device/precision/thread planning (pure) and the CPU engine running batches of jobs."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from shipyard.runtime import batching, engine, oip


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


PLAN_DEVICES = [
    pytest.param("auto", 0, ["cpu"], id="auto-no-gpu"),
    pytest.param("auto", 2, ["cuda:0", "cuda:1"], id="auto-one-worker-per-gpu"),
    pytest.param("cpu", 4, ["cpu"], id="cpu-forced"),
    pytest.param("cuda", 1, ["cuda:0"], id="cuda"),
    pytest.param("cuda:1", 2, ["cuda:1"], id="cuda-index"),
    pytest.param("cuda:1,0,1", 2, ["cuda:1", "cuda:0"], id="cuda-list-dedup"),
    pytest.param(" CUDA ", 3, ["cuda:0", "cuda:1", "cuda:2"], id="case-and-space"),
]


@pytest.mark.parametrize(("requested", "count", "expected"), PLAN_DEVICES)
def test_plan_devices(requested: str, count: int, expected: list[str]) -> None:
    assert engine.plan_devices(requested, count) == expected


@pytest.mark.parametrize(
    ("requested", "count", "message"),
    [
        pytest.param("cuda", 0, "no CUDA device", id="cuda-without-gpu"),
        pytest.param("cuda:2", 2, "not visible", id="index-out-of-range"),
        pytest.param("cuda:x", 2, "expected cuda:N", id="bad-index"),
        pytest.param("tpu", 0, "invalid device", id="unknown"),
    ],
)
def test_plan_devices_refuses_what_cannot_be_met(requested: str, count: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        engine.plan_devices(requested, count)


PLAN_DTYPE = [
    pytest.param("float32", "cpu", "float32", id="fp32-cpu"),
    pytest.param("fp16", "cuda:0", "float16", id="fp16-gpu"),
    pytest.param("half", "cuda:1", "float16", id="half-alias"),
    pytest.param("bf16", "cpu", "bfloat16", id="bf16-cpu"),
    pytest.param("BFloat16", "cuda:0", "bfloat16", id="bf16-gpu"),
]


@pytest.mark.parametrize(("requested", "device", "expected"), PLAN_DTYPE)
def test_plan_dtype(requested: str, device: str, expected: str) -> None:
    assert engine.plan_dtype(requested, device) == expected


@pytest.mark.parametrize(
    ("requested", "device", "message"),
    [
        pytest.param("fp16", "cpu", "only supported on CUDA", id="fp16-cpu"),
        pytest.param("int4", "cpu", "invalid", id="bad"),
    ],
)
def test_plan_dtype_refuses(requested: str, device: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        engine.plan_dtype(requested, device)


CPU_THREADS = [
    pytest.param("max 100000", None, None, 8, 8, id="v2-unlimited"),
    pytest.param("150000 100000", None, None, 8, 2, id="v2-1.5-cpus-rounds-up"),
    pytest.param("50000 100000", None, None, 8, 1, id="v2-half-cpu"),
    pytest.param("400000 100000", None, None, 2, 2, id="v2-capped-by-affinity"),
    pytest.param("200000 100000", None, None, 16, 2, id="v2-two-cpus"),
    pytest.param(None, 300000, 100000, 8, 3, id="v1-quota"),
    pytest.param(None, -1, 100000, 4, 4, id="v1-unlimited"),
    pytest.param("garbage", None, None, 3, 3, id="unparseable"),
    pytest.param(None, None, None, 0, 1, id="at-least-one"),
]


@pytest.mark.parametrize(("cpu_max", "quota", "period", "affinity", "expected"), CPU_THREADS)
def test_build_cpu_threads(
    cpu_max: str | None, quota: int | None, period: int | None, affinity: int, expected: int
) -> None:
    assert engine.build_cpu_threads(cpu_max, quota, period, affinity) == expected


def test_fetch_cpu_limit_reads_cgroup_v2(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert engine.fetch_cpu_limit(str(tmp_path)) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert engine.fetch_cpu_limit(str(tmp_path)) == len(os.sched_getaffinity(0))


def test_build_warmup_shapes_fills_free_dims() -> None:
    specs = [Spec("ids", "INT64", (-1, -1)), Spec("x", "FP32", (-1, 3, 4))]
    assert engine.build_warmup_shapes(specs, [1, 16], free_dim=8) == [
        [(1, 8), (1, 3, 4)],
        [(16, 8), (16, 3, 4)],
    ]


OUTPUTS = [Spec("a", "FP32", (-1,)), Spec("b", "FP32", (-1,))]
T = torch.zeros(2)
BUILD_OUTPUTS = [
    pytest.param((T, T), None, id="tuple"),
    pytest.param([T, T], None, id="list"),
    pytest.param({"b": T, "a": T, "extra": T}, None, id="mapping-by-name"),
    pytest.param(T, "returned 1 output", id="too-few"),
    pytest.param((T, T, T), "returned 3 output", id="too-many"),
    pytest.param({"a": T}, "did not return output", id="mapping-missing"),
    pytest.param("text", "not tensors", id="not-tensor"),
    pytest.param((T, 3), "not a tensor", id="tuple-with-non-tensor"),
]


@pytest.mark.parametrize(("result", "error"), BUILD_OUTPUTS)
def test_build_output_tensors(result: Any, error: str | None) -> None:
    if error is None:
        assert len(engine.build_output_tensors(result, OUTPUTS)) == 2
    else:
        with pytest.raises(oip.ModelFailure, match=error):
            engine.build_output_tensors(result, OUTPUTS)


class IntegerMlp(torch.nn.Module):
    """Integer weights and inputs: every sum is exact in float32, so any batching mix-up shows bit for bit."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randint(-3, 4, (6, 16), generator=generator).float())
        self.w2 = torch.nn.Parameter(torch.randint(-3, 4, (16, 4), generator=generator).float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.relu(x @ self.w1)
        logits = hidden @ self.w2
        return logits, logits.argmax(dim=1)


INT_MODEL_SPECS = ([Spec("x", "FP32", (-1, 6))], [Spec("logits", "FP32", (-1, 4)), Spec("label", "INT64", (-1,))])


def make_jobs(rows: list[int], seed: int = 0) -> list[batching.Job]:
    generator = np.random.default_rng(seed)
    jobs = []
    for n in rows:
        array = generator.integers(-5, 6, size=(n, 6)).astype(np.float32)
        jobs.append(batching.Job(oip.InferRequest([array], n, ((6,),), None, None)))
    return jobs


def test_batched_results_are_identical_to_unbatched() -> None:
    built = engine.Engine(Model(IntegerMlp(), *INT_MODEL_SPECS), "cpu")
    jobs = make_jobs([1, 3, 1, 2, 5])
    batched = engine.run_jobs(built, jobs)
    for job, result in zip(jobs, batched, strict=True):
        (alone,) = engine.run_jobs(built, [job])
        assert result[0].shape == (job.request.rows, 4)
        np.testing.assert_array_equal(result[0], alone[0])
        np.testing.assert_array_equal(result[1], alone[1])
        assert result[1].dtype == np.int64


class PoisonOnNegative(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x < 0).any():
            raise RuntimeError("negative input")
        return x * 2


def test_a_failing_request_does_not_fail_its_batch_neighbours() -> None:
    specs = ([Spec("x", "FP32", (-1, 2))], [Spec("y", "FP32", (-1, 2))])
    built = engine.Engine(Model(PoisonOnNegative(), *specs), "cpu")
    arrays = [np.array([[1, 2]], np.float32), np.array([[-1, 2]], np.float32), np.array([[3, 4]], np.float32)]
    jobs = [batching.Job(oip.InferRequest([a], 1, ((2,),), None, None)) for a in arrays]
    results = engine.run_jobs(built, jobs)
    assert results[0][0].tolist() == [[2, 4]]
    assert isinstance(results[1], oip.ModelFailure) and "negative input" in str(results[1])
    assert results[2][0].tolist() == [[6, 8]]


def test_cancelled_jobs_are_not_run() -> None:
    built = engine.Engine(Model(IntegerMlp(), *INT_MODEL_SPECS), "cpu")
    jobs = make_jobs([1, 1])
    jobs[0].state = batching.CANCELLED
    results = engine.run_jobs(built, jobs)
    assert results[0] is None and results[1][0].shape == (1, 4)


class WrongBatch(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=0, keepdim=True)


def test_output_without_the_batch_dimension_is_a_model_failure() -> None:
    specs = ([Spec("x", "FP32", (-1, 2))], [Spec("y", "FP32", (-1, 2))])
    built = engine.Engine(Model(WrongBatch(), *specs), "cpu")
    request = oip.InferRequest([np.ones((3, 2), np.float32)], 3, ((2,),), None, None)
    (result,) = engine.run_jobs(built, [batching.Job(request)])
    assert isinstance(result, oip.ModelFailure) and "batch dimension" in str(result)


def test_bfloat16_on_cpu_converts_inputs_and_returns_declared_fp32() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 3)
    reference = linear(torch.ones(2, 4)).detach().numpy()
    specs = ([Spec("x", "FP32", (-1, 4))], [Spec("y", "FP32", (-1, 3))])
    built = engine.Engine(Model(linear, *specs), "cpu", dtype="bfloat16")
    (output,) = built.run([np.ones((2, 4), np.float32)])
    assert output.dtype == np.float32
    np.testing.assert_allclose(output, reference, rtol=0.05, atol=0.05)


def test_warmup_runs_every_batch_size() -> None:
    seen: list[int] = []

    class Recorder(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.shape[0])
            return x

    specs = ([Spec("x", "FP32", (-1, 2))], [Spec("y", "FP32", (-1, 2))])
    engine.Engine(Model(Recorder(), *specs), "cpu").warmup([1, 8], iterations=2)
    assert seen == [1, 1, 8, 8]


def test_time_batches_times_every_size_in_interleaved_rounds() -> None:
    seen: list[int] = []

    class Recorder(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.shape[0])
            return x

    specs = ([Spec("x", "FP32", (-1, 2))], [Spec("y", "FP32", (-1, 2))])
    timings = engine.Engine(Model(Recorder(), *specs), "cpu").time_batches([1, 4], rounds=3)
    assert seen == [1, 4] + [1, 4] * 3  # once untimed, then interleaved rounds
    assert set(timings) == {1, 4} and all(spent > 0 for spent in timings.values())


def test_time_batches_keeps_two_rounds_past_its_budget() -> None:
    seen: list[int] = []

    class Slow(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.shape[0])
            time.sleep(0.01)
            return x

    specs = ([Spec("x", "FP32", (-1, 2))], [Spec("y", "FP32", (-1, 2))])
    engine.Engine(Model(Slow(), *specs), "cpu").time_batches([1, 2], rounds=10, budget_s=0.001)
    assert seen == [1, 2] + [1, 2] * 2


def test_fetch_gpu_stats_is_empty_on_cpu() -> None:
    assert engine.fetch_gpu_stats(["cpu"]) == []


@pytest.mark.parametrize(("flag", "omp", "limit", "expected", "source"), [
    pytest.param(3, "2", 4, 3, "--threads", id="flag-wins"),
    pytest.param(None, "2", 4, 2, "OMP_NUM_THREADS", id="omp-env"),
    pytest.param(None, " 6 ", 4, 6, "OMP_NUM_THREADS", id="omp-env-above-the-limit-is-the-user's-choice"),
    pytest.param(None, None, 4, 4, "the CPU limit", id="cpu-limit"),
    pytest.param(None, "", 4, 4, "the CPU limit", id="empty-omp"),
    pytest.param(None, "0", 4, 4, "the CPU limit (OMP_NUM_THREADS='0' is not a positive integer: ignored)", id="zero"),
    pytest.param(None, "two", 1, 1, "the CPU limit (OMP_NUM_THREADS='two' is not a positive integer: ignored)",
                 id="not-a-number"),
    pytest.param(None, "4,2", 2, 2, "the CPU limit (OMP_NUM_THREADS='4,2' is not a positive integer: ignored)",
                 id="nested-list"),
])
def test_plan_threads(flag: int | None, omp: str | None, limit: int, expected: int, source: str) -> None:
    assert engine.plan_threads(flag, omp, limit) == (expected, source)
