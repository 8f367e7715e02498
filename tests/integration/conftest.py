"""Session fixtures for the integration tier: one real control plane (hack/cluster.py) for the whole session.

The cluster is started once, the CRDs from crds/ are installed, and everything is stopped at the end
(operator runners first, then the control plane), leaving no processes or ports behind.
Set SHIPYARD_TEST_KUBECONFIG to run against an already running cluster instead (it is not stopped).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kopf.testing import KopfRunner

from tests.browser import Browser, DashboardProcess, launch_chromium
from tests.modules import load_file

REPO = Path(__file__).resolve().parents[2]


def _load_cluster_module() -> Any:
    return load_file("shipyard_hack_cluster", REPO / "hack" / "cluster.py")


@dataclass
class Cluster:
    kubeconfig: str

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(["kubectl", f"--kubeconfig={self.kubeconfig}", *args], input=input,
                             capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
        return out

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        args = ["get", kind, name, "-o", "json"]
        if namespace:
            args += ["-n", namespace]
        out = self.kubectl(*args, check=False)
        if out.returncode != 0:
            if "NotFound" in out.stderr or "not found" in out.stderr:
                return None
            raise AssertionError(out.stderr)
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def apply(self, manifest: dict[str, Any] | str, namespace: str | None = None,
              check: bool = True) -> subprocess.CompletedProcess[str]:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        args = ["apply", "--server-side", "--field-manager=shipyard-tests", "-f", "-"]
        if namespace:
            args += ["-n", namespace]
        return self.kubectl(*args, input=text, check=check)


def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.25, message: str = "") -> Any:
    """Polls predicate() until it returns something truthy; returns it, or fails the test with message."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {message or predicate}; last={last!r}")


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    external = os.environ.get("SHIPYARD_TEST_KUBECONFIG")
    if external:
        c = Cluster(kubeconfig=external)
        install_crds(c)
        yield c
        return
    mod = _load_cluster_module()
    state_dir = Path(tempfile.mkdtemp(prefix="shipyard-test-cluster-"))
    state = mod.up(state_dir)
    c = Cluster(kubeconfig=str(state.kubeconfig))
    try:
        install_crds(c)
        yield c
    finally:
        mod.down(state_dir)


def install_crds(c: Cluster) -> None:
    crds = sorted((REPO / "crds").glob("*.yaml"))
    for f in crds:
        c.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=shipyard-tests", "-f", str(f))
    for f in crds:
        # `kubectl wait` errs ("conditions accessor error") while a just-created CRD has no conditions yet.
        deadline = time.monotonic() + 60
        while c.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(f),
                        check=False).returncode != 0:
            if time.monotonic() > deadline:
                c.kubectl("wait", "--for=condition=Established", "--timeout=1s", "-f", str(f))  # raises, with output
            time.sleep(0.2)


@pytest.fixture(scope="module")
def operator(cluster: Cluster) -> Iterator[KopfRunner]:
    """One operator (KopfRunner, in-process) per test module; stopped, and checked for a clean exit, before the
    control plane stops. Tracebacks in its log fail the module."""
    os.environ["KUBECONFIG"] = cluster.kubeconfig
    runner = KopfRunner(["run", "--standalone", "--all-namespaces", "-m", "shipyard.operator.handlers"],
                        timeout=60)
    with runner:
        yield runner
    assert runner.exit_code == 0, runner.output
    assert runner.exception is None, runner.output
    assert "Traceback" not in runner.output, runner.output


def create_artifacts_volume(cluster: Cluster, namespace: str, name: str = "shipyard-artifacts") -> None:
    """A PVC bound to its own local PV (the fake nodes have no provisioner): what a compression Job mounts."""
    pv = f"{namespace}-{name}"
    cluster.apply({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
                   "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
                            "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                            "hostPath": {"path": f"/tmp/shipyard-test-artifacts/{pv}"},
                            "claimRef": {"namespace": namespace, "name": name}}})
    cluster.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
                   "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": pv,
                            "resources": {"requests": {"storage": "1Gi"}}}}, namespace)


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    cluster.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class OperatorProcess:
    """`shipyard-operator` as a real local process with the given kubeconfig and flags; its log is kept for
    assertions. `env` replaces the process environment (default: this one)."""

    def __init__(self, kubeconfig: str | Path, log: Path, *args: str, env: Mapping[str, str] | None = None) -> None:
        self.liveness = free_port()
        self.log = log
        self.handle = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shipyard.operator.main", "--kubeconfig", str(kubeconfig), "--metrics-port", "0",
             "--liveness", f"http://127.0.0.1:{self.liveness}/healthz", *args],
            stdout=self.handle, stderr=subprocess.STDOUT, cwd=REPO, env=None if env is None else dict(env))

    def live(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.handle.close()
        return self.log.read_text()


@pytest.fixture
def prometheus(cluster: Cluster, namespace: str) -> Iterator[Any]:
    """A fake Prometheus (test_operator_rollout.FakePrometheus) whose address the test namespace allows."""
    from tests.integration.test_operator_rollout import FakePrometheus

    fake = FakePrometheus()
    # The specs name this address: the namespace's administrator allows it (docs/security.md).
    cluster.kubectl("annotate", "namespace", namespace, f"shipyard.dev/allowed-prometheus-addresses={fake.address}")
    yield fake
    fake.close()


# --- the dashboard in a browser (tests/integration/test_dashboard*.py) ----------------------------------------------

@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Debian's Chromium, headless, one per test module (tests/browser.py)."""
    from playwright.sync_api import sync_playwright  # a dev dependency, only for the dashboard's tests

    with sync_playwright() as p:
        browser = launch_chromium(p)
        yield browser
        browser.close()


@pytest.fixture
def browser(chromium: Any, dashboards: Callable[..., DashboardProcess],
            tmp_path: Path) -> Iterator[Browser]:
    """Closed before the dashboards stop (it depends on them), so no page sees its server go away."""
    shots = Path(os.environ.get("SHIPYARD_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    state = Browser(chromium.new_context(), shots)
    yield state
    state.context.close()
    unexpected = [e for e in state.errors if not any(x in e for x in state.expected)]
    assert unexpected == []  # no CSP violation, no script error, no failed request on any page


@pytest.fixture
def dashboards(cluster: Cluster, tmp_path: Path) -> Iterator[Callable[..., DashboardProcess]]:
    started: list[DashboardProcess] = []

    def start(*args: str, kubeconfig: str | None = None) -> DashboardProcess:
        d = DashboardProcess(kubeconfig or cluster.kubeconfig, tmp_path / f"dashboard-{len(started)}.log", *args)
        started.append(d)
        return d

    yield start
    for d in started:
        log = d.stop()
        assert "Traceback" not in log, log
        assert d.returncode == 0, log
