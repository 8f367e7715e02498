"""Suite-wide rules (tests/rules.py): no skip in any tier passes unless tests/skips.yaml lists it with its reason, and
the gpu marker (skipped without a declared GPU, failing with one that does not work). Suite-wide fixtures: the
stack's S3-compatible server (tests/s3server.py), for any tier that fetches models from s3:// buckets, and its OCI
registry (tests/registry.py), for oci:// repositories."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.rules import pytest_addoption, pytest_configure, pytest_runtest_setup  # noqa: F401 - the hooks

if TYPE_CHECKING:
    from tests.registry import Registry
    from tests.s3server import S3Server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One versitygw for the whole run (hack/s3.py), started on first use, stopped at the end of the session and
    checked gone. Shared: use bucket and key names of the test's own, and count downloads as differences. Fails,
    never skips, where versitygw is not built (the message names ``bash hack/build-binaries.sh``)."""
    from tests import stack
    from tests.s3server import start_s3

    state_dir = tmp_path_factory.mktemp("s3")
    server: S3Server | None = None
    problem = ""
    try:
        server = start_s3(state_dir)
    except RuntimeError as e:
        problem = str(e)
    if server is None:  # outside the except: the failure reads without a chained traceback
        pytest.fail(f"the S3 server did not start: {problem}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()
    assert not stack.proc.alive(server.pid), f"versitygw (pid {server.pid}) outlived its stop"


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One anonymous registry (hack/registry.py: distribution, TLS with its own CA) for the whole run, started on first
    use, stopped at the end of the session and checked gone. Shared: use repository names of the test's own, and
    count pulls as differences. Fails, never skips, where the registry or oras is not built (the message names
    ``bash hack/build-binaries.sh``)."""
    from tests import stack
    from tests.registry import oras_binary, start_registry

    state_dir = tmp_path_factory.mktemp("registry")
    registry: Registry | None = None
    problem = ""
    try:
        oras_binary()
        registry = start_registry(state_dir)
    except RuntimeError as e:
        problem = str(e)
    if registry is None:  # outside the except: the failure reads without a chained traceback
        pytest.fail(f"the OCI registry did not start: {problem}", pytrace=False)
    try:
        yield registry
    finally:
        registry.stop()
    assert not stack.proc.alive(registry.pid), f"the registry (pid {registry.pid}) outlived its stop"
