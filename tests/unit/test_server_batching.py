"""Dynamic batching: the pure planners and the Batcher's behaviour on an event loop with fake workers."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from shipyard.runtime import batching, oip


def job(rows: int = 1, key: tuple[Any, ...] = ((3,),), tag: str = "") -> batching.Job:
    request = oip.InferRequest([np.zeros((rows, 3), np.float32)], rows, key, tag or None, None)
    return batching.Job(request, context=tag)


PLAN_BATCH = [
    pytest.param([], 8, (0, 0), id="empty"),
    pytest.param([1], 8, (1, 1), id="one"),
    pytest.param([1, 1, 1], 8, (3, 3), id="all-fit"),
    pytest.param([1] * 10, 8, (8, 8), id="capped-by-max-batch"),
    pytest.param([3, 4, 2], 8, (2, 7), id="rows-not-requests"),
    pytest.param([12, 1], 8, (1, 12), id="oversized-head-runs-alone"),
    pytest.param([2, 12, 1], 8, (1, 2), id="oversized-later-waits"),
]


@pytest.mark.parametrize(("rows", "max_batch", "expected"), PLAN_BATCH)
def test_plan_batch_takes_fifo_jobs_up_to_max_rows(rows: list[int], max_batch: int, expected: Any) -> None:
    assert batching.plan_batch([job(r) for r in rows], max_batch) == expected


def test_plan_batch_stops_at_a_different_shape() -> None:
    queue = [job(1, ((3,),)), job(1, ((3,),)), job(1, ((5,),)), job(1, ((3,),))]
    assert batching.plan_batch(queue, 8) == (2, 2)


@pytest.mark.parametrize(("max_batch", "expected"), [
    pytest.param(1, [1], id="1"), pytest.param(2, [1, 2], id="2"), pytest.param(32, [1, 2, 4, 8, 16, 32], id="32"),
    pytest.param(48, [1, 2, 4, 8, 16, 32, 48], id="not-a-power-of-two"),
])  # fmt: skip
def test_plan_sizing_batches(max_batch: int, expected: list[int]) -> None:
    assert batching.plan_sizing_batches(max_batch) == expected


# rows/s as measured by the serving benchmark's in-process loop (bench/results/serving.json) and made-up edge cases
PLAN_BATCH_LIMIT = [
    pytest.param({1: 470, 8: 1037, 16: 791, 32: 717}, 32, 8, id="compute-bound-cnn:-8-rows-beat-32"),
    pytest.param({1: 24987, 8: 180374, 16: 278263, 32: 465988}, 32, 32, id="overhead-bound-mlp:-the-max"),
    pytest.param({4: 1000, 8: 1015}, 32, 4, id="a-smaller-size-within-2%-wins"),
    pytest.param({4: 1000, 8: 1030}, 32, 8, id="3%-faster-is-faster"),
    pytest.param({8: 1037, 64: 5000}, 32, 8, id="sizes-above-the-max-are-ignored"),
    pytest.param({}, 32, 32, id="not-timed:-the-max"),
    pytest.param({8: 0.0}, 16, 16, id="no-usable-timing"),
]


@pytest.mark.parametrize(("rows_per_s", "max_batch", "expected"), PLAN_BATCH_LIMIT)
def test_plan_batch_limit_fills_batches_up_to_the_fastest_size(
    rows_per_s: dict[int, float], max_batch: int, expected: int
) -> None:
    seconds = {size: (size / rate if rate else 0.0) for size, rate in rows_per_s.items()}
    assert batching.plan_batch_limit(seconds, max_batch) == expected


PLAN_DISPATCH = [
    # rows, oldest wait, arrived idle, last full, max batch, max delay -> wait
    pytest.param(1, 0.0, True, True, 8, 0.005, 0.0, id="empty-queue-never-waits"),
    pytest.param(1, 0.0, True, False, 8, 0.005, 0.0, id="idle-light-load"),
    pytest.param(3, 0.001, False, False, 8, 0.005, 0.0, id="coalesced-backlog-goes-now"),
    pytest.param(8, 0.0, False, True, 8, 0.005, 0.0, id="full-batch-goes-now"),
    pytest.param(3, 0.001, False, True, 8, 0.005, 0.004, id="saturated-partial-waits-rest-of-delay"),
    pytest.param(3, 0.009, False, True, 8, 0.005, 0.0, id="saturated-but-delay-spent"),
    pytest.param(3, 0.001, False, True, 8, 0.0, 0.0, id="zero-delay-never-waits"),
]


@pytest.mark.parametrize(("rows", "waited", "idle", "full", "max_batch", "delay", "expected"), PLAN_DISPATCH)
def test_plan_dispatch(
    rows: int, waited: float, idle: bool, full: bool, max_batch: int, delay: float, expected: float
) -> None:
    assert batching.plan_dispatch(rows, waited, idle, full, max_batch, delay) == pytest.approx(expected)


class FakeWorker:
    """Records batches; the test decides when each finishes."""

    def __init__(self) -> None:
        self.batches: list[list[batching.Job]] = []
        self.stopped = False

    def submit(self, jobs: list[batching.Job]) -> None:
        self.batches.append(jobs)

    def stop(self) -> None:
        self.stopped = True


def make_batcher(
    loop: asyncio.AbstractEventLoop, workers: list[FakeWorker], **kwargs: Any
) -> tuple[batching.Batcher, list[tuple[Any, Any]], list[int]]:
    results: list[tuple[Any, Any]] = []
    sizes: list[int] = []
    options: dict[str, Any] = {"max_batch": 4, "max_delay_s": 0.05, "max_queue": 6}
    options.update(kwargs)
    batcher = batching.Batcher(
        loop,
        workers,
        on_result=lambda j, r: results.append((j.context, r)),
        on_batch_started=lambda jobs, rows, now: sizes.append(rows),
        **options,
    )
    return batcher, results, sizes


async def test_idle_worker_gets_a_request_in_the_same_loop_iteration_without_waiting() -> None:
    worker = FakeWorker()
    batcher, _, _ = make_batcher(asyncio.get_running_loop(), [worker], max_delay_s=10.0)
    batcher.submit(job(tag="a"))
    batcher.submit(job(tag="b"))  # read in the same iteration: joins the batch
    await asyncio.sleep(0)
    assert [[j.context for j in b] for b in worker.batches] == [["a", "b"]]


async def test_requests_arriving_while_busy_are_coalesced_when_the_worker_frees() -> None:
    worker = FakeWorker()
    batcher, results, sizes = make_batcher(asyncio.get_running_loop(), [worker], max_delay_s=10.0)
    batcher.submit(job(tag="a"))
    await asyncio.sleep(0)
    for tag in "bcdef":
        batcher.submit(job(tag=tag))
    await asyncio.sleep(0.01)
    assert len(worker.batches) == 1  # busy: nothing more dispatched
    first = worker.batches[0]
    batcher.on_batch_done(worker, first, [["out-a"]])
    # The previous batch (1 row) was not full, so the backlog goes at once, capped at max_batch.
    assert [[j.context for j in b] for b in worker.batches[1:]] == [["b", "c", "d", "e"]]
    assert results == [("a", ["out-a"])]
    assert sizes == [1, 4]


async def test_after_a_full_batch_a_partial_one_waits_at_most_max_delay() -> None:
    loop = asyncio.get_running_loop()
    worker = FakeWorker()
    batcher, _, _ = make_batcher(loop, [worker], max_delay_s=0.05)
    for tag in "abcd":
        batcher.submit(job(tag=tag))
    await asyncio.sleep(0)
    assert len(worker.batches[0]) == 4  # full
    batcher.submit(job(tag="e"))
    started = loop.time()
    batcher.on_batch_done(worker, worker.batches[0], [None] * 4)
    assert len(worker.batches) == 1  # saturated and partial: waits to fill
    while len(worker.batches) == 1 and loop.time() - started < 1.0:
        await asyncio.sleep(0.005)
    waited = loop.time() - started
    assert [j.context for j in worker.batches[1]] == ["e"]
    assert 0.03 <= waited < 0.5


async def test_queue_full_is_rejected_at_once() -> None:
    worker = FakeWorker()
    batcher, _, _ = make_batcher(asyncio.get_running_loop(), [worker], max_queue=2)
    batcher.submit(job(tag="a"))
    batcher.submit(job(tag="b"))
    with pytest.raises(oip.Overloaded, match="queue is full"):
        batcher.submit(job(tag="c"))
    await asyncio.sleep(0)
    batcher.submit(job(tag="c"))  # the dispatch emptied the queue


async def test_cancelled_jobs_leave_the_queue_and_running_results_are_dropped() -> None:
    worker = FakeWorker()
    batcher, results, _ = make_batcher(asyncio.get_running_loop(), [worker])
    a, b, c = job(tag="a"), job(tag="b"), job(tag="c")
    batcher.submit(a)
    await asyncio.sleep(0)
    batcher.submit(b)
    batcher.submit(c)
    batcher.cancel(b)  # queued
    batcher.cancel(a)  # running
    assert batcher.queued == 1
    batcher.on_batch_done(worker, [a], [["out-a"]])
    assert results == []
    assert [j.context for j in worker.batches[1]] == ["c"]


async def test_one_batch_per_idle_worker() -> None:
    workers = [FakeWorker(), FakeWorker()]
    batcher, _, _ = make_batcher(asyncio.get_running_loop(), workers, max_batch=2)
    for tag in "abcde":
        batcher.submit(job(tag=tag))
    await asyncio.sleep(0)
    assert sorted(len(w.batches) for w in workers) == [1, 1]
    assert batcher.queued == 1
    batcher.stop()
    assert all(w.stopped for w in workers)


async def test_different_shapes_are_not_mixed() -> None:
    worker = FakeWorker()
    batcher, _, _ = make_batcher(asyncio.get_running_loop(), [worker])
    batcher.submit(job(tag="a", key=((3,),)))
    batcher.submit(job(tag="b", key=((5,),)))
    await asyncio.sleep(0)
    batcher.on_batch_done(worker, worker.batches[0], [None])
    assert [[j.context for j in b] for b in worker.batches] == [["a"], ["b"]]


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"max_batch": 0}, id="max-batch"),
        pytest.param({"max_queue": 0}, id="max-queue"),
        pytest.param({"max_delay_s": -1.0}, id="max-delay"),
    ],
)
async def test_invalid_settings_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        make_batcher(asyncio.get_running_loop(), [], **options)
