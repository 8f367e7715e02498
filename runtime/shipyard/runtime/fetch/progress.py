"""Progress in the log: one line every ~2 s while bytes arrive (done, total, rate), and the final summary.

The rate is in MB/s (10^6 bytes per second), sizes in binary units (KiB, MiB, GiB). `build_*` are pure.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("shipyard.runtime.fetch")

INTERVAL_S = 2.0


def build_bytes_text(size: float) -> str:
    """Human-readable size: B, KiB, MiB, GiB. Pure."""
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"


MIN_RATE_BYTES_PER_S = 1024  # the low-speed limit of a transfer


class LowSpeedWindow:
    """A low-speed limit, as curl's: fewer than MIN_RATE_BYTES_PER_S over a window of ``seconds`` is a stalled
    transfer (a slowloris server trickling bytes never trips a read timeout)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.monotonic()
        self.bytes = 0

    def add(self, count: int) -> str | None:
        """Counts ``count`` bytes; at the end of a window, what was too slow about it (None: fast enough)."""
        self.bytes += count
        now = time.monotonic()
        elapsed = now - self.start
        if elapsed < self.seconds:
            return None
        slow = self.bytes < MIN_RATE_BYTES_PER_S * elapsed
        detail = f"slow server: {self.bytes} bytes in the last {elapsed:.0f} s"
        self.start, self.bytes = now, 0
        return detail if slow else None


def build_rate_text(size: float, seconds: float) -> str:
    """`87.3 MB/s`. Pure."""
    return f"{size / max(seconds, 1e-9) / 1e6:.1f} MB/s"


def build_progress_line(display: str, done: int, total: int | None, window_bytes: int, window_s: float) -> str:
    """`Fetching s3://b/k: 512.0 MiB / 1.00 GiB (50%), 85.3 MB/s`. Pure."""
    if total:
        amount = f"{build_bytes_text(done)} / {build_bytes_text(total)} ({100 * done / total:.0f}%)"
    else:
        amount = build_bytes_text(done)
    return f"Fetching {display}: {amount}, {build_rate_text(window_bytes, window_s)}"


class Progress:
    """Counts bytes from any thread; a thread of its own logs a line every INTERVAL_S while running."""

    def __init__(self, display: str, total: int | None = None, interval: float = INTERVAL_S) -> None:
        self.display = display
        self.total = total
        self.interval = interval
        self.done = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = time.monotonic()

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n

    def rewind(self, n: int) -> None:
        """Bytes that will be fetched again (a restarted download)."""
        with self._lock:
            self.done -= n

    def start(self) -> Progress:
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="fetch-progress", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        last_done, last_t = self.done, time.monotonic()
        while not self._stop.wait(self.interval):
            now, done = time.monotonic(), self.done
            log.info("%s", build_progress_line(self.display, done, self.total, done - last_done, now - last_t))
            last_done, last_t = done, now
