"""The suite's rules for a test run, as a pytest plugin (tests/conftest.py installs its hooks; no I/O but reading
the allow-list and, in a run that declares a GPU, one CUDA operation):

1. **No skip passes silently.** A test skipped in any tier, at run time (``pytest.skip``, ``skipif``, ``xfail``) or
   at collection time (a module's ``pytest.skip(allow_module_level=True)``, ``pytest.importorskip``), fails the
   session unless the allow-list (tests/skips.yaml; the ini option ``shipyard_skips`` names another) lists it with
   the reason it may skip: a node id (``path::test[param]``), a test without its parameters (all of them) or a
   module path. Allowed skips are printed with their reason in the summary, the others with "FAILED".
2. **The gpu marker.** A test marked ``gpu`` is skipped, an allowed skip with reason NO_GPU, when the run does not
   declare a GPU; a run that declares one (``SHIPYARD_GPU=1``) checks once that torch sees CUDA and that a CUDA
   operation works, and every gpu test errors, not skips, when that fails; a gpu test that skips itself in such a
   run fails the session whatever the allow-list says.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

GPU_ENV = "SHIPYARD_GPU"
NO_GPU = f"no GPU declared (set {GPU_ENV}=1 to run the gpu tests on a machine with one)"
GPU_MARKER = f"gpu: needs a CUDA GPU; skipped (allow-listed) unless the run declares one ({GPU_ENV}=1), then fails " \
             "without"


class Skips:
    """The run's skips, allowed ones with their reason and the others (a plugin object: pytest_configure registers
    one per run)."""

    def __init__(self, allowed: dict[str, str], source: Path) -> None:
        self.allowed = allowed
        self.source = source
        self.gpu_skipped: set[str] = set()  # gpu tests skipped by rule 2 (no GPU declared)
        self.listed: dict[str, tuple[str, str]] = {}  # node id -> (allow-list reason, the skip's own message)
        self.unlisted: dict[str, str] = {}  # node id -> the skip's own message

    def reason_for(self, nodeid: str) -> str | None:
        for key in (nodeid, nodeid.split("[", 1)[0], nodeid.split("::", 1)[0]):
            if key in self.allowed:
                return self.allowed[key]
        return None

    def record(self, report: pytest.TestReport | pytest.CollectReport) -> None:
        nodeid, message = report.nodeid, _message(report)
        if nodeid in self.gpu_skipped:
            self.listed[nodeid] = (NO_GPU, message)
            return
        gpu = "gpu" in getattr(report, "keywords", {})  # a test's report has them, a collector's not
        reason = None if gpu and gpu_declared() else self.reason_for(nodeid)
        if reason is None:
            self.unlisted[nodeid] = message
        else:
            self.listed[nodeid] = (reason, message)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped:
            self.record(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:
            self.record(report)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.unlisted and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.listed and not self.unlisted:
            return
        terminalreporter.section("skips (tests/rules.py)")
        for nodeid, (reason, message) in sorted(self.listed.items()):
            said = f" (it said: {message})" if message and message != reason else ""
            terminalreporter.write_line(f"allowed skip {nodeid}: {reason}{said}")
        for nodeid, message in sorted(self.unlisted.items()):
            terminalreporter.write_line(f"FAILED: skip not in the allow-list ({self.source.name}): {nodeid}: "
                                        f"{message}", red=True)
        if self.unlisted:
            terminalreporter.write_line(f"FAILED: {len(self.unlisted)} skip(s) not allowed: list each in "
                                        f"{self.source} with its reason, or make the test run", red=True, bold=True)


SKIPS = pytest.StashKey[Skips]()


def gpu_declared() -> bool:
    return os.environ.get(GPU_ENV, "").strip().lower() not in ("", "0", "false", "no")


@functools.cache
def fetch_cuda_problem() -> str | None:
    """Why CUDA cannot run here (torch missing, no device, an operation failing); None when it works."""
    try:
        import torch
    except ImportError as error:
        return f"torch cannot be imported: {error}"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    try:
        x = torch.arange(16, dtype=torch.float32, device="cuda").reshape(4, 4)
        if float((x @ x).sum().item()) != 7680.0:
            return "a CUDA matmul returned a wrong result"
        torch.cuda.synchronize()
    except Exception as error:  # noqa: BLE001 - any failure of the device is the answer
        return f"a CUDA operation failed: {type(error).__name__}: {error}"
    return None


def load_allowed(path: Path) -> dict[str, str]:
    """The allow-list: node id -> reason (a missing file allows nothing)."""
    if not path.exists():
        return {}
    document = yaml.safe_load(path.read_text()) or {}
    if not isinstance(document, dict) or not all(isinstance(v, str) and v.strip() for v in document.values()):
        raise pytest.UsageError(f"{path}: expected a mapping of node id -> reason (a non-empty string)")
    return {str(k): " ".join(v.split()) for k, v in document.items()}


def _message(report: pytest.TestReport | pytest.CollectReport) -> str:
    wasxfail = getattr(report, "wasxfail", None)
    if wasxfail is not None:
        return f"xfail: {wasxfail}" if wasxfail else "xfail"
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("shipyard_skips", "the allow-list of skips (node id -> reason), relative to the rootdir",
                  default="tests/skips.yaml")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", GPU_MARKER)
    path = config.rootpath / str(config.getini("shipyard_skips"))
    config.stash[SKIPS] = Skips(load_allowed(path), path)
    config.pluginmanager.register(config.stash[SKIPS], "shipyard-skips")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is None:
        return
    if not gpu_declared():
        item.config.stash[SKIPS].gpu_skipped.add(item.nodeid)
        pytest.skip(NO_GPU)
    problem = fetch_cuda_problem()
    if problem:
        pytest.fail(f"{GPU_ENV} declares a GPU, but {problem}", pytrace=False)
