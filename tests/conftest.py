"""Suite-wide rules: integration and e2e tests never skip silently (a skipped tier is a failed run)."""

from __future__ import annotations

import pytest

_SKIPPED_REAL_TIER: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and ("integration" in report.keywords or "e2e" in report.keywords):
        _SKIPPED_REAL_TIER.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _SKIPPED_REAL_TIER and exitstatus == 0:
        print(f"\nFAILED: {len(_SKIPPED_REAL_TIER)} integration/e2e test(s) were skipped: "
              + ", ".join(_SKIPPED_REAL_TIER[:5]))
        session.exitstatus = 1
