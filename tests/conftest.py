"""Suite-wide rules (tests/rules.py): no skip in any tier passes unless tests/skips.yaml lists it with its reason, and
the gpu marker (skipped without a declared GPU, failing with one that does not work)."""

from __future__ import annotations

from tests.rules import pytest_addoption, pytest_configure, pytest_runtest_setup  # noqa: F401 - the hooks
