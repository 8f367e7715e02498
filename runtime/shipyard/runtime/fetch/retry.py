"""Retries with exponential backoff and jitter, the overall deadline, and cancellation.

Attempt n (0-based) that failed with a retryable error waits `d/2 + u * d/2` seconds, `d = min(cap, base * 2**n)`,
`u` uniform in [0, 1) ("equal jitter": never less than half the step, so that fetchers restarted together spread
out without retrying at once). With the defaults (base 0.5 s, cap 20 s, 5 retries) the waits are 0.25-0.5, 0.5-1,
1-2, 2-4 and 4-8 s: a source that comes back within ~8 s is caught. `build_backoff_delays` is pure.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from shipyard.runtime.fetch.errors import FetchError, Interrupted

log = logging.getLogger("shipyard.runtime.fetch")

BASE_S = 0.5
CAP_S = 20.0
T = TypeVar("T")


def build_backoff_delays(retries: int, base: float = BASE_S, cap: float = CAP_S,
                         jitter: Sequence[float] | None = None) -> list[float]:
    """The waits before retries 1..`retries`; `jitter[i]` in [0, 1) (random when None). Pure given `jitter`."""
    delays = []
    for attempt in range(max(0, retries)):
        step = min(cap, base * 2 ** attempt)
        u = jitter[attempt] if jitter is not None else random.random()
        delays.append(step / 2 + step / 2 * u)
    return delays


class Deadline:
    """The overall deadline of a fetch (`--deadline`), and its cancellation (SIGTERM)."""

    def __init__(self, seconds: float, cancel: threading.Event | None = None) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds if seconds > 0 else float("inf")
        self.cancel = cancel or threading.Event()

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def check(self, display: str) -> None:
        """Raises Interrupted when cancelled, FetchError when the deadline has passed."""
        if self.cancel.is_set():
            raise Interrupted(f"interrupted while fetching {display}")
        if time.monotonic() > self.end:
            raise FetchError(f"deadline of {self.seconds:g} s exceeded fetching {display} (--deadline)")

    def socket_timeout(self, timeout: float) -> float:
        """The timeout of one socket wait: `timeout`, or less when the deadline is nearer (at least 0.1 s)."""
        return max(0.1, min(timeout, self.remaining()))

    def sleep(self, seconds: float, display: str) -> None:
        """Waits (or less, when the deadline comes first); raises as `check` does."""
        self.check(display)
        wait = min(seconds, max(0.0, self.remaining()))
        if self.cancel.wait(wait):
            raise Interrupted(f"interrupted while fetching {display}")
        self.check(display)


def run_with_retries(action: Callable[[int], T], *, retries: int, deadline: Deadline, display: str,
                     what: str = "", delays: Sequence[float] | None = None) -> T:
    """Calls `action(attempt)` until it returns; retryable FetchErrors are tried again after the backoff, up to
    `retries` times and within the deadline; the last error is raised."""
    waits = list(delays) if delays is not None else build_backoff_delays(retries)
    attempt = 0
    while True:
        deadline.check(display)
        try:
            return action(attempt)
        except FetchError as error:
            if not error.retryable or attempt >= len(waits):
                if error.retryable and attempt:
                    error.message = f"{error.message} (after {attempt + 1} attempts)"
                raise
            wait = waits[attempt]
            if deadline.remaining() < wait:
                raise FetchError(f"{error.message}; no time left to retry within the deadline of "
                                 f"{deadline.seconds:g} s (--deadline)") from error
            log.warning("Attempt %d/%d%s failed: %s; retrying in %.1f s", attempt + 1, len(waits) + 1,
                        f" ({what})" if what else "", error.message, wait)
            deadline.sleep(wait, display)
            attempt += 1
