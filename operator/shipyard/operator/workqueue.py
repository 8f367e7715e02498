"""A deduplicating, delayed work queue for level-triggered reconciliation (asyncio; no Kubernetes I/O).

Keys (``namespace/name``) are added by watch events and by the reconciler itself (``requeue after N s``).
A key is processed by at most one worker at a time; adding a key that is being processed marks it dirty, so
it is processed once more afterwards (no lost updates, no parallel reconciles of one object). Adding a key
already waiting keeps the earliest due time. This mirrors client-go's rate-limited work queue, sized for an
operator that owns thousands of objects with a handful of workers.

Idle workers wait each on its own future: adding a key that is due wakes one of them (the one waiting longest), a
worker that takes a key while more are due wakes the next, and only one idle worker (the timekeeper) sleeps until the
earliest delayed key is due. A shared event with a timeout in every worker would wake every idle worker (128 by
default) on each add and each timer, of which one finds work.

One addition: a key added as `urgent` (a spec the operator has not acted on yet: a new object, a changed image)
is due now and goes before every other due key, in the order such keys arrived. A burst of status-driven wakes
(hundreds of Deployments becoming available) then does not delay acting on what a user just applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

Reconcile = Callable[[str], Awaitable[float | None]]


class Workqueue:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._due: dict[str, float] = {}  # key -> due time of its pending entry
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._processing: set[str] = set()
        self._dirty: dict[str, float] = {}  # added while processing: due time to use afterwards
        self._urgent: set[str] = set()  # pending keys that go first
        self._urgent_order: deque[str] = deque()
        self._dirty_urgent: set[str] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()  # idle workers, longest waiting first
        self._timekeeper: asyncio.Future[None] | None = None  # the idle worker sleeping until the heap's first is due
        self._closed = False

    def __len__(self) -> int:
        return len(self._due)

    def add(self, key: str, after: float = 0.0, urgent: bool = False) -> None:
        """Adds `key`, due in `after` seconds; an urgent key is due now and goes before the others."""
        due = self._clock() + (0.0 if urgent else max(0.0, after))
        if key in self._processing:
            self._dirty[key] = min(due, self._dirty.get(key, due))
            if urgent:
                self._dirty_urgent.add(key)
            return
        if urgent:
            if key not in self._urgent:
                self._urgent.add(key)
                self._urgent_order.append(key)
            self._due[key] = min(due, self._due.get(key, due))
            self._wake_one()
            return
        current = self._due.get(key)
        if current is not None and current <= due:
            return
        self._due[key] = due
        heapq.heappush(self._heap, (due, next(self._seq), key))
        if self._heap[0][2] == key:  # due now, or earlier than what the timekeeper sleeps for
            self._wake_timekeeper()

    def forget(self, key: str) -> None:
        """Drops a pending entry (the object was deleted); a running reconcile finishes normally."""
        self._due.pop(key, None)
        self._dirty.pop(key, None)
        self._dirty_urgent.discard(key)
        self._urgent.discard(key)  # its place in _urgent_order is skipped when reached

    def close(self) -> None:
        self._closed = True
        while self._waiters:
            self._wake_one()
        self._wake_timekeeper()

    def _wake_one(self) -> None:
        """Wakes the idle worker waiting longest, else the timekeeper (none idle: a busy worker looks before it waits
        again)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._wake_timekeeper(fallback=False)

    def _wake_timekeeper(self, fallback: bool = True) -> None:
        """Wakes the timekeeper (the earliest due time changed); with none, any idle worker, which becomes it."""
        if self._timekeeper is not None and not self._timekeeper.done():
            self._timekeeper.set_result(None)
        elif fallback:
            self._wake_one()

    def _take(self, key: str) -> str:
        del self._due[key]
        self._urgent.discard(key)
        self._processing.add(key)
        if self._urgent or (self._heap and (self._heap[0][0] <= self._clock() or self._timekeeper is None)):
            self._wake_one()  # more is due (the next idle worker takes it), or a delayed key needs a timekeeper
        return key

    async def _next(self) -> str | None:
        while not self._closed:
            while self._urgent_order:
                key = self._urgent_order.popleft()
                if key in self._urgent and key in self._due:
                    return self._take(key)
            now = self._clock()
            while self._heap:
                due, _, key = self._heap[0]
                if self._due.get(key) != due or key in self._urgent:  # superseded, forgotten or gone first
                    heapq.heappop(self._heap)
                    continue
                if due > now:
                    break
                heapq.heappop(self._heap)
                return self._take(key)
            waiter = asyncio.get_running_loop().create_future()
            timed = bool(self._heap) and (self._timekeeper is None or self._timekeeper.done())
            if timed:
                self._timekeeper = waiter
            else:
                self._waiters.append(waiter)
            try:
                async with asyncio.timeout(self._heap[0][0] - now if timed else None):
                    await waiter
            except TimeoutError:
                pass
            finally:
                if self._timekeeper is waiter:
                    self._timekeeper = None
                if not waiter.done():  # timed out or cancelled
                    waiter.cancel()
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
        return None

    def _done(self, key: str, requeue_after: float | None) -> None:
        self._processing.discard(key)
        dirty_due = self._dirty.pop(key, None)
        if dirty_due is not None:
            urgent = key in self._dirty_urgent
            self._dirty_urgent.discard(key)
            self.add(key, max(0.0, dirty_due - self._clock()), urgent=urgent)
        if requeue_after is not None:
            self.add(key, requeue_after)

    async def run(self, reconcile: Reconcile, workers: int = 4, error_backoff: float = 5.0) -> None:
        """Runs `workers` loops until close(); a reconcile returns seconds until its next visit, or None."""

        async def worker() -> None:
            while True:
                key = await self._next()
                if key is None:
                    return
                requeue: float | None
                try:
                    requeue = await reconcile(key)
                except asyncio.CancelledError:
                    self._processing.discard(key)
                    raise
                except Exception:
                    logger.exception("Reconcile of %s failed; retrying in %.0f s", key, error_backoff)
                    requeue = error_backoff
                self._done(key, requeue)

        await asyncio.gather(*(worker() for _ in range(workers)))
