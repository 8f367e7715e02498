"""Debian's Chromium, headless, driven by Playwright (no browser download), and the dashboard as a real process:
shared by tests/integration/test_dashboard.py and bench/dashboard.py.

Chromium runs with the flags that keep it off the network (no background connections, no component updates, no
sync), in a fresh profile; the dashboard is the `kubectl-shipyard` console script of this virtualenv, started and
stopped by hack/proc.py like the stack's other processes.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import stack

CHROMIUM = os.environ.get("SHIPYARD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage")


def launch_chromium(playwright: Any) -> Any:
    """A headless Chromium (Debian's) for a Playwright sync API instance."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=list(CHROMIUM_ARGS), headless=True)


@dataclass
class Browser:
    """One browser context per test; every console error and page error it saw, for the test's end."""

    context: Any
    shots: Path
    errors: list[str] = field(default_factory=list)
    expected: tuple[str, ...] = ()  # errors a test provokes on purpose (a refused request's 403)

    def page(self, width: int = 1280, height: int = 900) -> Any:
        page = self.context.new_page()
        page.set_viewport_size({"width": width, "height": height})
        page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        page.on("response", lambda r: self.errors.append(f"{r.status} for {r.request.method} {r.url}")
                if r.status >= 400 else None)
        return page

    def shoot(self, page: Any, name: str) -> None:
        page.screenshot(path=str(self.shots / name), full_page=True)


class DashboardProcess:
    """`kubectl-shipyard dashboard --port 0 ...` as a process (hack/proc.py: its own session, output to `log`);
    `url` once it serves; `stop()` ends it and returns its log."""

    def __init__(self, kubeconfig: str, log: Path, *args: str) -> None:
        script = Path(sys.executable).parent / "kubectl-shipyard"
        self.log = log
        self.proc = stack.proc.spawn([str(script), "--kubeconfig", kubeconfig, "dashboard", "--port", "0", *args], log)
        self.returncode: int | None = None
        self.url = self.wait_for_url()

    def wait_for_url(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"on (http://\S+/) ", self.log.read_text(errors="replace"))
            if found:
                return found.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"the dashboard did not start: {self.stop()}")

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def stop(self) -> str:
        self.returncode = stack.proc.stop(self.proc, timeout=15)
        return self.log.read_text(errors="replace")


def rss_mib(pid: int) -> float:
    """Resident set size of a process, MiB (/proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def words(texts: Sequence[str]) -> list[str]:
    """Whitespace-normalised texts (rendered text comparisons)."""
    return [" ".join(t.split()) for t in texts]
