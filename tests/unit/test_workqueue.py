"""The reconcile work queue: dedupe, delays, one worker per key, dirty re-runs, error backoff."""

from __future__ import annotations

import asyncio

import pytest

from shipyard.operator.workqueue import Workqueue


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("adds", "expected_due"),
    [
        pytest.param([("a", 0.0)], {"a": 100.0}, id="immediate"),
        pytest.param([("a", 5.0), ("a", 1.0)], {"a": 101.0}, id="earlier-wins"),
        pytest.param([("a", 1.0), ("a", 5.0)], {"a": 101.0}, id="later-ignored"),
        pytest.param([("a", 1.0), ("b", 2.0)], {"a": 101.0, "b": 102.0}, id="independent-keys"),
        pytest.param([("a", -3.0)], {"a": 100.0}, id="negative-delay-is-now"),
    ],
)
def test_add_keeps_the_earliest_due_time(adds: list[tuple[str, float]], expected_due: dict[str, float]) -> None:
    q = Workqueue(clock=FakeClock())
    for key, after in adds:
        q.add(key, after)
    assert q._due == expected_due
    assert len(q) == len(expected_due)


async def test_each_key_is_reconciled_once_per_burst_and_never_in_parallel() -> None:
    q = Workqueue()
    running: set[str] = set()
    calls: list[str] = []
    overlap = False

    async def reconcile(key: str) -> float | None:
        nonlocal overlap
        overlap = overlap or key in running
        running.add(key)
        calls.append(key)
        await asyncio.sleep(0.02)
        running.discard(key)
        return None

    for _ in range(10):
        q.add("ns/a")
    q.add("ns/b")
    task = asyncio.create_task(q.run(reconcile, workers=4))
    await asyncio.sleep(0.005)
    q.add("ns/a")  # arrives while ns/a is being processed: marks it dirty -> exactly one more pass
    await asyncio.sleep(0.1)
    q.close()
    await task
    assert not overlap
    assert sorted(calls) == ["ns/a", "ns/a", "ns/b"]


async def test_requeue_after_and_error_backoff() -> None:
    q = Workqueue()
    calls: list[str] = []

    async def reconcile(key: str) -> float | None:
        calls.append(key)
        if key == "ns/fails" and calls.count(key) == 1:
            raise RuntimeError("boom")
        if key == "ns/again" and calls.count(key) < 3:
            return 0.01
        return None

    q.add("ns/fails")
    q.add("ns/again")
    task = asyncio.create_task(q.run(reconcile, workers=2, error_backoff=0.02))
    await asyncio.sleep(0.2)
    q.close()
    await task
    assert calls.count("ns/again") == 3
    assert calls.count("ns/fails") == 2


async def test_forget_drops_a_pending_key() -> None:
    q = Workqueue()
    calls: list[str] = []

    async def reconcile(key: str) -> float | None:
        calls.append(key)
        return None

    q.add("ns/gone", 0.05)
    q.add("ns/kept", 0.05)
    q.forget("ns/gone")
    task = asyncio.create_task(q.run(reconcile, workers=1))
    await asyncio.sleep(0.15)
    q.close()
    await task
    assert calls == ["ns/kept"]


@pytest.mark.parametrize(
    ("adds", "order"),
    [
        pytest.param([("a", False), ("b", True)], ["b", "a"], id="urgent-first"),
        pytest.param([("a", True), ("b", True), ("c", False)], ["a", "b", "c"], id="urgent-in-arrival-order"),
        pytest.param([("a", False), ("a", True), ("b", False)], ["a", "b"], id="pending-key-made-urgent-once"),
        pytest.param([("a", True), ("a", True), ("b", True)], ["a", "b"], id="urgent-deduplicated"),
        pytest.param([("a", False), ("b", False)], ["a", "b"], id="normal-fifo"),
    ],
)
async def test_urgent_keys_go_before_other_due_keys(adds: list[tuple[str, bool]], order: list[str]) -> None:
    q = Workqueue(clock=FakeClock())
    for key, urgent in adds:
        q.add(key, urgent=urgent)
    taken = []
    for _ in order:
        key = await q._next()
        assert key is not None
        taken.append(key)
        q._done(key, None)
    assert taken == order and len(q) == 0


async def test_an_urgent_add_while_processing_comes_back_first() -> None:
    q = Workqueue(clock=FakeClock())
    q.add("a")
    assert await q._next() == "a"
    q.add("b")
    q.add("a", urgent=True)  # a new spec arrived while "a" was being reconciled
    q._done("a", None)
    assert await q._next() == "a"


async def test_a_forgotten_urgent_key_is_skipped() -> None:
    q = Workqueue(clock=FakeClock())
    q.add("a", urgent=True)
    q.add("b")
    q.forget("a")
    assert await q._next() == "b"
    assert len(q) == 0


# ---------------------------------------------------------------------------------------------------------------
# Waking idle workers: one per due key, one timekeeper for the delayed ones


async def idle_queue(workers: int) -> tuple[Workqueue, list[str], asyncio.Task[None]]:
    q = Workqueue()
    calls: list[str] = []

    async def reconcile(key: str) -> float | None:
        calls.append(key)
        return None

    task = asyncio.create_task(q.run(reconcile, workers=workers))
    for _ in range(5):
        await asyncio.sleep(0)
    return q, calls, task


async def test_an_add_wakes_one_idle_worker_not_all() -> None:
    q, calls, task = await idle_queue(16)
    waiting = list(q._waiters)
    assert len(waiting) == 16 and q._timekeeper is None
    q.add("ns/a")
    assert sum(w.done() for w in waiting) == 1
    for _ in range(5):
        await asyncio.sleep(0)
    assert calls == ["ns/a"] and len(q._waiters) == 16
    q.close()
    await task


async def test_only_the_timekeeper_sleeps_on_a_delayed_key() -> None:
    q, calls, task = await idle_queue(16)
    q.add("ns/later", 30.0)
    for _ in range(5):
        await asyncio.sleep(0)
    assert q._timekeeper is not None and not q._timekeeper.done()
    assert len(q._waiters) == 15 and not any(w.done() for w in q._waiters)
    q.close()
    await task
    assert calls == []


async def test_an_earlier_delayed_key_wakes_the_timekeeper() -> None:
    """The timekeeper sleeps for the 30 s key; a key due in 20 ms must not wait for it."""
    q = Workqueue()
    done = asyncio.Event()

    async def reconcile(key: str) -> float | None:
        if key == "ns/soon":
            done.set()
        return None

    task = asyncio.create_task(q.run(reconcile, workers=8))
    q.add("ns/late", 30.0)
    await asyncio.sleep(0.01)
    q.add("ns/soon", 0.02)
    await asyncio.wait_for(done.wait(), 10.0)
    assert "ns/late" in q._due
    q.close()
    await task


async def test_a_burst_of_due_keys_is_spread_over_the_workers() -> None:
    """Each taken key wakes the next idle worker while more are due: 8 slow reconciles of distinct keys overlap."""
    q = Workqueue()
    running = peak = 0

    async def reconcile(key: str) -> float | None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        return None

    task = asyncio.create_task(q.run(reconcile, workers=8))
    await asyncio.sleep(0)
    for i in range(8):
        q.add(f"ns/k{i}", 0.01)  # delayed: the timekeeper takes the first, then wakes the others
    await asyncio.sleep(0.2)
    q.close()
    await task
    assert peak == 8
