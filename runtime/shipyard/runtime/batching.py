"""Dynamic batching: the queue of inference jobs and the decision of when to hand a batch to a device worker.

No I/O and no torch: the `Batcher` runs on the server's event loop and talks to workers through `submit`
(hand over a batch) and `on_batch_done` (called back on the loop when a worker has finished). The decisions
are the pure functions `plan_batch`, `plan_dispatch` and, once at start-up, `plan_batch_limit`.

Policy (what `plan_dispatch` encodes):
- a job that arrives while a worker is idle and the queue is empty is dispatched at the end of the current
  event-loop iteration, never held back to wait for a batch to fill (requests read in the same iteration
  join it);
- when a worker becomes free, what queued up while it was busy is coalesced into the next batch at once;
- only right after a full batch (the server is saturated) may a partial batch wait to fill, and then for at
  most `max_delay` counted from its oldest job's arrival.

A batch holds at most `max_batch` rows. The server sets it to the batch size at which the model computed the most
rows per second when measured at start-up (`plan_batch_limit`), within the configured max batch size: on a CPU a
compute-bound model often runs faster per row at 8 than at 32 rows (caches), and a backlog then goes out as several
batches of the faster size.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from shipyard.runtime import oip

QUEUED, RUNNING, DONE, CANCELLED = 0, 1, 2, 3


class Job:
    """One inference request travelling through the queue; `context` belongs to whoever submitted it."""

    __slots__ = ("request", "context", "state", "enqueued_at", "arrived_idle")

    def __init__(self, request: oip.InferRequest, context: Any = None) -> None:
        self.request = request
        self.context = context
        self.state = QUEUED
        self.enqueued_at = 0.0
        self.arrived_idle = False


class Worker(Protocol):
    """A device worker: runs batches one at a time and reports back through the batcher's loop."""

    def submit(self, jobs: list[Job]) -> None: ...

    def stop(self) -> None: ...


# A worker's answer per job: the job's output arrays (declared order), an exception, or None when the job
# was cancelled before the worker ran it.
JobResult = Any


def plan_batch(queue: Sequence[Job], max_batch: int) -> tuple[int, int]:
    """How many jobs to take from the head of the queue, and how many rows they hold.

    Takes consecutive jobs whose non-batch shapes equal the head's while their rows fit `max_batch`; the
    head is always taken (a request larger than `max_batch` runs alone). FIFO: nothing overtakes the head.
    """
    if not queue:
        return 0, 0
    head = queue[0].request
    rows = head.rows
    count = 1
    key = head.key
    for job in itertools.islice(queue, 1, None):
        request = job.request
        if request.key != key or rows + request.rows > max_batch:
            break
        rows += request.rows
        count += 1
    return count, rows


SIZING_TIE = 0.02  # a smaller batch size within 2% of the best rows/s wins: as fast, and sooner answered


def plan_sizing_batches(max_batch: int) -> list[int]:
    """Batch sizes to time at start-up (pure): the powers of two below `max_batch`, and `max_batch`."""
    sizes = []
    size = 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch]


def plan_batch_limit(seconds: Mapping[int, float], max_batch: int) -> int:
    """The most rows a batch should hold (pure), from timed forward passes (batch size -> seconds per pass).

    The size with the most rows per second among those within `max_batch`; a smaller size within SIZING_TIE of
    the best wins (the same throughput, answered sooner). `max_batch` when nothing usable was timed.
    """
    rates = {size: size / spent for size, spent in seconds.items() if 1 <= size <= max_batch and spent > 0}
    if not rates:
        return max_batch
    best = max(rates.values())
    return min(size for size, rate in rates.items() if rate >= best * (1 - SIZING_TIE))


def plan_dispatch(
    rows: int,
    oldest_wait_s: float,
    arrived_idle: bool,
    last_batch_full: bool,
    max_batch: int,
    max_delay_s: float,
) -> float:
    """Seconds to wait before dispatching the planned batch (0 = now).

    - a full batch goes now;
    - a batch whose oldest job found an idle worker and an empty queue goes now (no waiting on an empty
      queue);
    - unless the previous batch was full (saturation), what is queued goes now (coalesced);
    - otherwise the batch may wait to fill until its oldest job has waited `max_delay_s`.
    """
    if rows >= max_batch or arrived_idle or not last_batch_full:
        return 0.0
    return max(0.0, max_delay_s - oldest_wait_s)


class Batcher:
    """The queue in front of the device workers; lives on one asyncio event loop (not thread-safe)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        workers: Sequence[Worker],
        *,
        max_batch: int,
        max_delay_s: float,
        max_queue: int,
        on_result: Callable[[Job, JobResult], None],
        on_batch_started: Callable[[list[Job], int, float], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_delay_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_delay_s >= 0")
        self._loop = loop
        self._workers = list(workers)
        self._idle: list[Worker] = list(workers)
        self._queue: deque[Job] = deque()
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._on_result = on_result
        self._on_batch_started = on_batch_started
        self._clock = clock
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._last_full = False
        self.running = 0  # batches handed to workers and not yet reported back

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, job: Job) -> None:
        """Queue a job; raises oip.Overloaded at once when the queue is full."""
        queue = self._queue
        if len(queue) >= self.max_queue:
            raise oip.Overloaded(f"the inference queue is full ({self.max_queue} requests)")
        job.arrived_idle = not queue and bool(self._idle)
        job.enqueued_at = self._clock()
        job.state = QUEUED
        queue.append(job)
        if self._idle and not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._dispatch)

    def cancel(self, job: Job) -> None:
        """Drop a job (timed out): removed if still queued; a running job's result is discarded."""
        if job.state == QUEUED:
            with contextlib.suppress(ValueError):
                self._queue.remove(job)
        job.state = CANCELLED

    def _dispatch(self) -> None:
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queue = self._queue
        while self._idle and queue:
            count, rows = plan_batch(queue, self.max_batch)
            head = queue[0]
            now = self._clock()
            wait = plan_dispatch(
                rows,
                now - head.enqueued_at,
                head.arrived_idle,
                self._last_full,
                self.max_batch,
                self.max_delay_s,
            )
            if wait > 0:
                self._timer = self._loop.call_later(wait, self._dispatch)
                return
            jobs = [queue.popleft() for _ in range(count)]
            for job in jobs:
                job.state = RUNNING
            self._last_full = rows >= self.max_batch
            worker = self._idle.pop()
            self.running += 1
            if self._on_batch_started is not None:
                self._on_batch_started(jobs, rows, now)
            worker.submit(jobs)

    def on_batch_done(self, worker: Worker, jobs: list[Job], results: list[JobResult]) -> None:
        """Called on the loop by a worker: start the next batch, then deliver this one's results."""
        self.running -= 1
        self._idle.append(worker)
        if self._queue:
            self._dispatch()
        on_result = self._on_result
        for job, result in zip(jobs, results, strict=True):
            if job.state == CANCELLED:
                continue
            job.state = DONE
            on_result(job, result)

    def fail_queued(self, error: BaseException) -> None:
        """Answer every queued job with `error` (used when the server gives up at the end of a drain)."""
        while self._queue:
            job = self._queue.popleft()
            job.state = DONE
            self._on_result(job, error)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for worker in self._workers:
            worker.stop()
