"""Faults on a real control plane of this module's own (hack/cluster.py: it restarts etcd and the apiserver and
installs Kopf's peering CRDs, which must not disturb the session's cluster):

- the operator, a real process, SIGKILLed in each phase of a rollout and restarted: it converges, with no duplicate
  Jobs or Deployments and the exact history;
- etcd and the kube-apiserver restarted mid-rollout under a running operator: it recovers its watches and finishes;
- Prometheus refusing connections, then answering 503, mid-analysis: the analysis holds (Inconclusive), with no
  rollback and no flapping of phase or conditions, and promotes once Prometheus answers again;
- two operator replicas with Kopf peering: only the active one writes; killed, the standby takes over and finishes;
- a blue-green switch interrupted by kill -9 (at the Service write, and during the post-promotion analysis): the
  restarted operator completes it.

Each test prints what it measured (``-s`` shows it): the figures in docs/operator.md come from here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from tests.integration.conftest import (
    REPO,
    Cluster,
    _load_cluster_module,
    create_artifacts_volume,
    install_crds,
    wait_until,
)
from tests.integration.test_operator_rollout import COMPRESSION, analysis, events, model, names, replicas, wait_status

pytestmark = pytest.mark.integration
CLUSTER = _load_cluster_module()
PEERING = "shipyard"
ACTIONS = ("Applied ", "Scaled ", "Deleted ", "Moved ")  # the operator's log lines for its writes


# --- the phase to kill in, recognised from the status (pure) -------------------------------------------------------

def assess_kill_point(status: Mapping[str, Any]) -> str | None:
    """Which phase of a rollout `status` shows: compressing, step-<i> (a ready canary step), analysing (measured at
    least once, no verdict yet), rolling-back (the failure decided), or None."""
    phase = status.get("phase")
    if phase == "Compressing":
        return "compressing"
    if phase == "RolledBack":
        return "rolling-back"
    if phase not in ("Progressing", "Paused") or not status.get("candidateVersion") or not status.get("stepReadyAt"):
        return None
    run = status.get("analysis") or {}
    if run.get("phase") == "Running" and any(m.get("lastMeasuredAt") for m in run.get("metrics") or []):
        return "analysing"
    return f"step-{status.get('currentStepIndex')}"


@pytest.mark.parametrize(("status", "point"), [
    pytest.param({"phase": "Compressing"}, "compressing", id="compressing"),
    pytest.param({"phase": "Progressing", "candidateVersion": "1.1.0", "currentStepIndex": 0}, None,
                 id="step-not-ready"),
    pytest.param({"phase": "Progressing", "candidateVersion": "1.1.0", "currentStepIndex": 1,
                  "stepReadyAt": "2026-01-01T00:00:00Z"}, "step-1", id="step-1-ready"),
    pytest.param({"phase": "Progressing", "candidateVersion": "1.1.0", "currentStepIndex": 0,
                  "stepReadyAt": "2026-01-01T00:00:00Z",
                  "analysis": {"phase": "Running", "metrics": [{"lastMeasuredAt": "2026-01-01T00:00:01Z"}]}},
                 "analysing", id="analysing"),
    pytest.param({"phase": "Progressing", "candidateVersion": "1.1.0", "currentStepIndex": 0,
                  "stepReadyAt": "2026-01-01T00:00:00Z", "analysis": {"phase": "Pending", "metrics": [{}]}},
                 "step-0", id="analysis-not-measured-yet"),
    pytest.param({"phase": "RolledBack", "stableVersion": "1.0.0"}, "rolling-back", id="rolled-back"),
    pytest.param({"phase": "Healthy", "stableVersion": "1.0.0"}, None, id="healthy"),
])
def test_kill_points_are_recognised_from_the_status(status: dict[str, Any], point: str | None) -> None:
    assert assess_kill_point(status) == point


# --- fixtures and helpers ------------------------------------------------------------------------------------------

@dataclass
class FaultCluster:
    cluster: Cluster
    state_dir: Path
    logs: Path


@pytest.fixture(scope="module")
def faults() -> Iterator[FaultCluster]:
    state_dir = Path(tempfile.mkdtemp(prefix="shipyard-faults-cluster-"))
    state = CLUSTER.up(state_dir)
    c = Cluster(kubeconfig=str(state.kubeconfig))
    try:
        # (kubectl wait fails at once on a CRD whose status has no conditions yet: retry on a fresh apiserver.)
        wait_until(lambda: _installed(c), 60, interval=1,
                   message="the CRDs installed")
        install_peering_crds(c)
        yield FaultCluster(c, state_dir, Path(tempfile.mkdtemp(prefix="shipyard-faults-logs-")))
    finally:
        CLUSTER.down(state_dir)


def _installed(c: Cluster) -> bool:
    try:
        install_crds(c)
    except AssertionError as e:
        if "accessor error" in str(e):
            return False
        raise
    return True


def install_peering_crds(c: Cluster) -> None:
    """Kopf's peering CRDs exactly as the chart renders them (peering on)."""
    helm = str(CLUSTER.binaries()["helm"])
    env = dict(os.environ, HELM_CACHE_HOME="/tmp/shipyard-helm/cache", HELM_CONFIG_HOME="/tmp/shipyard-helm/config",
               HELM_DATA_HOME="/tmp/shipyard-helm/data")
    out = subprocess.run([helm, "template", "sy", str(REPO / "charts" / "shipyard"), "--set", "peering.enabled=true"],
                         capture_output=True, text=True, env=env, check=True, timeout=60).stdout
    crds = [d for d in yaml.safe_load_all(out) if d and d.get("kind") == "CustomResourceDefinition"
            and d["spec"]["group"] == "kopf.dev"]
    assert {d["metadata"]["name"] for d in crds} == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    for crd in crds:
        c.apply(crd)
        wait_until(lambda n=crd["metadata"]["name"]: "True" in c.kubectl(
            "get", "crd", n, "-o", "jsonpath={.status.conditions[?(@.type=='Established')].status}").stdout, 60,
                   message=f"{crd['metadata']['name']} established")


def new_namespace(c: Cluster, prometheus: str | None = None) -> str:
    """A fresh namespace; the specs in it may name `prometheus` (its administrator allows it: docs/security.md)."""
    name = f"f-{uuid.uuid4().hex[:10]}"
    c.kubectl("create", "namespace", name)
    if prometheus:
        c.kubectl("annotate", "namespace", name, f"shipyard.dev/allowed-prometheus-addresses={prometheus}")
    wait_until(lambda: c.get("serviceaccount", "default", name), 30, message="the default service account")
    return name


class Operator:
    """`python -m shipyard.operator.main` as a real process, its log in a file."""

    def __init__(self, c: Cluster, log: Path, *args: str) -> None:
        self.log = log
        self.handle = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shipyard.operator.main", "--kubeconfig", c.kubeconfig, "--metrics-port", "0",
             "--liveness", "", *args],
            stdout=self.handle, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "KUBECONFIG": c.kubeconfig})

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.handle.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.kill()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def actions(self) -> list[str]:
        return [line for line in self.text().splitlines() if any(a in line for a in ACTIONS)]


HOLD = "shipyard.dev/test-hold"


def candidate_pods(c: Cluster, ns: str, version: str = "1.1.0", terminating: bool = False) -> list[Any]:
    """Names of the pods of `version` (or, with `terminating`, whether each is being deleted)."""
    items = json.loads(c.kubectl("get", "pods", "-n", ns, "-l", f"shipyard.dev/version={version}", "-o",
                                 "json").stdout)["items"]
    if terminating:
        return [bool(p["metadata"].get("deletionTimestamp")) for p in items]
    return [p["metadata"]["name"] for p in items]


def history(md: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(h["version"], h["outcome"]) for h in md["status"]["history"]]


def healthy(version: str) -> Callable[[dict[str, Any]], bool]:
    return lambda md: (md.get("status") or {}).get("stableVersion") == version and \
        md["status"].get("phase") == "Healthy" and not md["status"].get("candidateVersion")


class FlakyPrometheus:
    """Answers the Prometheus query API with `value` (0.0: a healthy candidate); `down()` closes the socket
    (connection refused), `mode = "503"` answers 503 Service Unavailable, `up()` listens again on the same port."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.value: Callable[[str], float] = lambda query: 0.0
        self.served: dict[str, int] = {"ok": 0, "503": 0}
        self.port = 0
        self.server: ThreadingHTTPServer | None = None
        self.up()
        self.address = f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                query = parse_qs(urlparse(self.path).query).get("query", [""])[0]
                outer.served[outer.mode] += 1
                if outer.mode == "503":
                    data, code = b"Service Unavailable", 503
                else:
                    result = [{"metric": {}, "value": [time.time(), str(outer.value(query))]}]
                    data = json.dumps({"status": "success",
                                       "data": {"resultType": "vector", "result": result}}).encode()
                    code = 200
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture
def flaky() -> Iterator[FlakyPrometheus]:
    fake = FlakyPrometheus()
    yield fake
    fake.down()


@dataclass
class StatusRecorder:
    """Every status change of one ModelDeployment as a watch delivers it: (phase, pausedReason, Ready, Stalled)."""

    c: Cluster
    namespace: str
    name: str
    seen: list[tuple[str, ...]] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> StatusRecorder:
        template = ('{.status.phase}|{.status.pausedReason}|{.status.conditions[?(@.type=="Ready")].status}|'
                    '{.status.conditions[?(@.type=="Stalled")].status}|{.status.analysis.phase}{"\\n"}')
        self.proc = subprocess.Popen(
            ["kubectl", f"--kubeconfig={self.c.kubeconfig}", "get", "md", self.name, "-n", self.namespace, "-w",
             "-o", f"jsonpath={template}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.seen.append(tuple(line.rstrip("\n").split("|")))

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait()

    def transitions(self, width: int = 4) -> list[tuple[str, ...]]:
        """The distinct consecutive states over the first `width` fields (phase, pausedReason, Ready, Stalled)."""
        out: list[tuple[str, ...]] = []
        for state in self.seen:
            if not out or out[-1] != state[:width]:
                out.append(state[:width])
        return out


# --- 1. kill -9 the operator in each phase -------------------------------------------------------------------------

KILL_POINTS = ("compressing", "step-0", "step-1", "analysing", "rolling-back")
STEPS = [{"weight": 25, "pause": "2s"}, {"weight": 50, "pause": "2s"}]


@pytest.fixture(scope="module")
def prometheus_for_kills() -> Iterator[FlakyPrometheus]:
    fake = FlakyPrometheus()
    fake.value = lambda query: 0.4 if 'version="1.1.0"' in query and "bad" in query else 0.0
    yield fake
    fake.down()


@pytest.fixture(scope="module")
def baselines(faults: FaultCluster, prometheus_for_kills: FlakyPrometheus) -> dict[str, str]:
    """One namespace per kill point with model `m` 1.0.0 Healthy, made by one operator for all of them at once."""
    c = faults.cluster
    spaces = {point: new_namespace(c, prometheus_for_kills.address) for point in KILL_POINTS}
    create_artifacts_volume(c, spaces["compressing"])
    op = Operator(c, faults.logs / "baselines.log", *[a for ns in spaces.values() for a in ("--namespace", ns)])
    try:
        for point, ns in spaces.items():
            c.apply(model("bad" if point == "rolling-back" else "m", "1.0.0"), ns)
        for point, ns in spaces.items():
            wait_status(c, ns, "bad" if point == "rolling-back" else "m", healthy("1.0.0"), 60,
                        message=f"{point}: 1.0.0 healthy")
    finally:
        op.stop()
    return spaces


def rollout_spec(point: str, prometheus: str) -> dict[str, Any]:
    if point == "compressing":
        return {"compression": COMPRESSION, "rollout": {"steps": STEPS}}
    if point == "analysing":
        return {"rollout": {"steps": [{"weight": 50}], "analysis": analysis(prometheus, interval="2s", minSamples=3)}}
    if point == "rolling-back":
        return {"rollout": {"steps": [{"weight": 25, "pause": "1m"}], "analysis": analysis(prometheus, interval="2s")}}
    return {"rollout": {"steps": STEPS}}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_operator_killed_in_each_phase_converges_without_duplicates(
        faults: FaultCluster, baselines: dict[str, str], prometheus_for_kills: FlakyPrometheus, point: str) -> None:
    c, ns = faults.cluster, baselines[point]
    name = "bad" if point == "rolling-back" else "m"
    log = faults.logs / f"kill-{point}.log"
    op = Operator(c, log, "--namespace", ns)
    try:
        c.apply(model(name, "1.1.0", **rollout_spec(point, prometheus_for_kills.address)), ns)
        if point == "rolling-back":  # the canary's pod stays Terminating: the kill comes while it is scaled down
            held = wait_until(lambda: candidate_pods(c, ns), 30, message="the canary pod")
            for pod in held:
                c.kubectl("patch", "pod", pod, "-n", ns, "--type=merge", "-p",
                          json.dumps({"metadata": {"finalizers": [HOLD]}}))
        at_kill = wait_status(c, ns, name, lambda md: assess_kill_point(md.get("status") or {}) == point, 60,
                              message=f"the operator in phase {point}")
        op.kill()
        children = {"jobs": names(c, "jobs", ns), "deployments": names(c, "deployments", ns),
                    "candidate pods": candidate_pods(c, ns),
                    "terminating": candidate_pods(c, ns, terminating=True)}
        restarted = time.monotonic()
        op = Operator(c, log, "--namespace", ns)
        if point == "rolling-back":
            # Killed once the rollback is decided: the Service already left the canary, whose pod is Terminating, or
            # not yet scaled down when the kill came between the switch and the next pass (traffic moves first).
            assert children["candidate pods"], children
            md = wait_status(c, ns, name, lambda m: m["status"].get("phase") == "RolledBack" and
                             replicas(c, ns) == {"1.0.0": 4, "1.1.0": 0}, 60, message="rolled back after restart")
            for pod in candidate_pods(c, ns):
                c.kubectl("patch", "pod", pod, "-n", ns, "--type=json", "-p",
                          '[{"op": "remove", "path": "/metadata/finalizers"}]')
            wait_until(lambda: not candidate_pods(c, ns), 30, message="the canary pod gone")
        else:
            md = wait_status(c, ns, name, lambda m: healthy("1.1.0")(m) and replicas(c, ns)["1.0.0"] == 0, 60,
                             message="1.1.0 healthy after restart")
        recovered = time.monotonic() - restarted
        time.sleep(1)  # a few more reconciles of the settled object: nothing may change any more
        final = c.get("md", name, ns)
    finally:
        op.kill()
    assert final is not None and history(final) == history(md) and final["status"]["phase"] == md["status"]["phase"]
    assert names(c, "deployments", ns) == [f"{name}-1-0-0", f"{name}-1-1-0"]
    assert len(names(c, "jobs", ns)) == (1 if point == "compressing" else 0)
    own_config_maps = [n for n in names(c, "configmaps", ns) if n != "kube-root-ca.crt"]
    assert len(own_config_maps) == (1 if point == "compressing" else 0), own_config_maps
    story = events(c, ns, name)
    assert story.count("RolloutStarted") == 1, story
    # Never planned against a half-listed cache (the stable taken for missing: the candidate at full size at once).
    assert "Deploying version 1.1.0" not in log.read_text(), log.read_text()[-3000:]
    if point == "rolling-back":
        assert history(md) == [("1.0.0", "Promoted"), ("1.1.0", "RolledBack")]
        assert md["status"]["stableVersion"] == "1.0.0" and md["status"]["analysis"]["phase"] == "Failed"
        assert story.count("RolledBack") <= 1, story  # an event posted after the status write may die with it
    else:
        assert history(md) == [("1.0.0", "Superseded"), ("1.1.0", "Promoted")]
        assert story.count("Promoted") == 2, story
    if point == "compressing":
        assert [a["phase"] for a in md["status"]["artifacts"]] == ["Succeeded"]
        assert story.count("Compressing") <= 1 and story.count("Compressed") == 1, story  # (posted after the write)
    if point == "analysing":
        run = md["status"]["analysis"]
        assert run["startedAt"] == at_kill["status"]["analysis"]["startedAt"]  # the run went on, not restarted
        assert run["phase"] == "Successful" and run["metrics"][0]["successes"] >= 3
    print(f"\n[faults] kill -9 in {point}: children at kill {children}; recovered {recovered:.1f} s after restart")


@pytest.mark.parametrize("when", ["at-the-service-write", "during-post-promotion-analysis"])
def test_blue_green_switch_interrupted_by_a_kill_is_completed_on_restart(
        faults: FaultCluster, flaky: FlakyPrometheus, when: str) -> None:
    """kill -9 right after the operator wrote the switched Service (its status write may or may not have followed),
    or while the post-promotion analysis runs: the restarted operator completes the switch and the promotion."""
    c = faults.cluster
    ns = new_namespace(c, flaky.address)
    log = faults.logs / f"kill-blue-green-{when}.log"
    rollout = {"strategy": "blueGreen", "scaleDownDelaySeconds": 2,
               "blueGreen": {"postPromotionAnalysis": analysis(flaky.address, interval="1s", minSamples=4)}}
    switched = f"Applied Service {ns}/bg"

    def selector() -> str | None:
        body = c.get("service", "bg", ns)
        return None if body is None else body["spec"]["selector"].get("shipyard.dev/version")

    op = Operator(c, log, "--namespace", ns)
    try:
        c.apply(model("bg", "1.0.0", rollout=rollout), ns)
        wait_status(c, ns, "bg", healthy("1.0.0"), 60, message="1.0.0 healthy")
        mark = len(op.text())
        c.apply(model("bg", "1.1.0", rollout=rollout), ns)
        if when == "at-the-service-write":
            wait_until(lambda: any(line.endswith(switched) for line in op.text()[mark:].splitlines()), 60,
                       interval=0.002, message="the switch of the model's Service")
        else:
            wait_status(c, ns, "bg", lambda m: m["status"].get("activeVersion") == "1.1.0" and
                        any(x.get("lastMeasuredAt") for x in (m["status"].get("analysis") or {}).get("metrics") or []),
                        60, message="the post-promotion analysis measuring")
        op.kill()
        at_kill = (c.get("md", "bg", ns) or {}).get("status") or {}
        at_kill_selector = selector()
        restarted = time.monotonic()
        op = Operator(c, log, "--namespace", ns)
        md = wait_status(c, ns, "bg", lambda m: healthy("1.1.0")(m) and replicas(c, ns) == {"1.0.0": 0, "1.1.0": 4},
                         90, message="1.1.0 healthy after restart, 1.0.0 scaled down after its window")
        recovered = time.monotonic() - restarted
    finally:
        op.kill()
    assert selector() == "1.1.0" and c.get("service", "bg-preview", ns) is None
    assert names(c, "deployments", ns) == ["bg-1-0-0", "bg-1-1-0"]
    assert history(md) == [("1.0.0", "Superseded"), ("1.1.0", "Promoted")]
    assert md["status"]["analysis"]["phase"] == "Successful"
    story = events(c, ns, "bg")
    assert story.count("RolloutStarted") == 1 and 1 <= story.count("Switched") <= 2, story
    assert "SwitchedBack" not in story and "RolledBack" not in story, story
    print(f"\n[faults] blue-green kill {when}: Service on {at_kill_selector}, status activeVersion "
          f"{at_kill.get('activeVersion')} at the kill; promoted {recovered:.1f} s after restart")


# --- 2. etcd and the apiserver restarted mid-rollout ---------------------------------------------------------------

def test_apiserver_and_etcd_restart_mid_rollout(faults: FaultCluster, flaky: FlakyPrometheus) -> None:
    c = faults.cluster
    ns = new_namespace(c, flaky.address)
    op = Operator(c, faults.logs / "apiserver-restart.log", "--namespace", ns)
    spec = {"rollout": {"steps": STEPS, "analysis": analysis(flaky.address)}}
    try:
        c.apply(model("m", "1.0.0", **spec), ns)
        wait_status(c, ns, "m", healthy("1.0.0"), 60, message="1.0.0 healthy")
        c.apply(model("m", "1.1.0", **spec), ns)
        wait_status(c, ns, "m", lambda md: assess_kill_point(md["status"]) in ("step-0", "analysing"), 60,
                    message="step 0 ready")
        stopped = time.monotonic()
        CLUSTER.restart_components(faults.state_dir, ("etcd", "kube-apiserver"), stop_timeout=3)
        back = time.monotonic()
        md = wait_status(c, ns, "m", lambda m: healthy("1.1.0")(m) and replicas(c, ns)["1.0.0"] == 0, 90,
                         message="1.1.0 healthy after the control-plane restart")
        done = time.monotonic()
        assert op.proc.poll() is None, "the operator exited"
    finally:
        op.kill()
    assert names(c, "deployments", ns) == ["m-1-0-0", "m-1-1-0"]
    assert history(md) == [("1.0.0", "Superseded"), ("1.1.0", "Promoted")]
    assert md["status"]["analysis"]["phase"] == "Successful"
    story = events(c, ns, "m")
    assert story.count("RolloutStarted") == 1 and story.count("Promoted") == 2, story
    print(f"\n[faults] etcd + apiserver down {back - stopped:.1f} s; rollout finished {done - back:.1f} s later")


# --- 3. Prometheus stops answering mid-analysis --------------------------------------------------------------------

def test_prometheus_outage_mid_analysis_holds_then_promotes(faults: FaultCluster, flaky: FlakyPrometheus) -> None:
    c = faults.cluster
    ns = new_namespace(c, flaky.address)
    op = Operator(c, faults.logs / "prometheus-outage.log", "--namespace", ns)
    # The last (only) step waits for a Successful analysis: 5 samples at 1 s; errors tolerated up to 30 in a row.
    spec = {"rollout": {"steps": [{"weight": 50}],
                        "analysis": analysis(flaky.address, minSamples=5, consecutiveErrorLimit=30)}}

    def metric(md: Mapping[str, Any]) -> dict[str, Any]:
        return ((md["status"].get("analysis") or {}).get("metrics") or [{}])[0]

    try:
        c.apply(model("m", "1.0.0", **spec), ns)
        wait_status(c, ns, "m", healthy("1.0.0"), 60, message="1.0.0 healthy")
        with StatusRecorder(c, ns, "m") as recorder:
            wait_until(lambda: recorder.seen, 10, message="the status watch")
            c.apply(model("m", "1.1.0", **spec), ns)
            wait_status(c, ns, "m", lambda md: metric(md).get("successes", 0) >= 1, 60, message="a first sample")
            flaky.down()  # connection refused
            refused = wait_status(c, ns, "m", lambda md: metric(md).get("errors", 0) >= 2, 30,
                                  message="two refused measurements")
            flaky.mode = "503"
            flaky.up()
            unavailable = wait_status(c, ns, "m", lambda md: metric(md).get("errors", 0) >= 4, 30,
                                      message="two 503 measurements")
            flaky.mode = "ok"
            back = time.monotonic()
            md = wait_status(c, ns, "m", lambda m: healthy("1.1.0")(m) and replicas(c, ns)["1.0.0"] == 0, 60,
                             message="promoted once Prometheus answers")
            promoted = time.monotonic() - back
            time.sleep(1)
    finally:
        op.kill()
    for during, cause in ((refused, "Cannot connect"), (unavailable, "503")):
        assert during["status"]["phase"] == "Paused" and during["status"]["pausedReason"] == "AnalysisInconclusive"
        assert during["status"]["analysis"]["phase"] == "Inconclusive", during["status"]["analysis"]
        assert metric(during)["verdict"] == "Error" and cause in metric(during)["message"], metric(during)
    assert flaky.served["503"] >= 2
    assert history(md) == [("1.0.0", "Superseded"), ("1.1.0", "Promoted")]
    assert metric(md)["successes"] >= 5 and metric(md)["failures"] == 0
    story = events(c, ns, "m")
    assert "RolledBack" not in story and story.count("AnalysisInconclusive") == 1, story
    # Every status the watch delivered, collapsed to (phase, pausedReason, Ready, Stalled): one hold, no flapping.
    assert recorder.transitions() == [
        ("Healthy", "", "True", "False"),
        ("Progressing", "", "False", "False"),
        ("Paused", "AnalysisInconclusive", "False", "False"),
        ("Progressing", "", "False", "False"),
        ("Healthy", "", "True", "False"),
    ], recorder.seen
    print(f"\n[faults] Prometheus down (refused, then 503) for {metric(unavailable)['errors']} measurements; "
          f"promoted {promoted:.1f} s after it answered again")


# --- 4. two operator replicas with peering -------------------------------------------------------------------------

def test_standby_replica_takes_over_when_the_active_one_is_killed(faults: FaultCluster) -> None:
    c = faults.cluster
    ns = new_namespace(c)
    c.apply({"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING}}, ns)
    peering = ("--namespace", ns, f"--peering={PEERING}")
    # Mandatory peering starts paused; a replica resumes when it sees no live peer of a higher priority. (Started
    # at the same instant, the standby could resume for a moment before the active one's first keep-alive.)
    active = Operator(c, faults.logs / "active.log", *peering, "--priority=100")
    standby: Operator | None = None
    try:
        wait_until(lambda: "Resuming operations after the pause" in active.text(), 30, message="the active resuming")
        standby = Operator(c, faults.logs / "standby.log", *peering, "--priority=50")
        wait_until(lambda: len((c.get("kopfpeering", PEERING, ns) or {}).get("status") or {}) == 2, 30,
                   message="both replicas in the peering object")
        c.apply(model("m", "1.0.0", rollout={"steps": STEPS}), ns)
        wait_status(c, ns, "m", healthy("1.0.0"), 60, message="1.0.0 healthy")
        c.apply(model("m", "1.1.0", rollout={"steps": STEPS}), ns)
        wait_status(c, ns, "m", lambda md: assess_kill_point(md["status"]) == "step-0", 60, message="step 0 ready")
        assert active.actions() and not standby.actions(), standby.text()[-3000:]
        assert "Resuming operations" not in standby.text()
        active.kill()
        killed = time.monotonic()
        first = wait_until(lambda: standby.actions(), 60, interval=0.1, message="the standby's first write")
        takeover = time.monotonic() - killed
        md = wait_status(c, ns, "m", lambda m: healthy("1.1.0")(m) and replicas(c, ns)["1.0.0"] == 0, 60,
                         message="1.1.0 healthy under the standby")
        finished = time.monotonic() - killed
    finally:
        active.kill()
        if standby is not None:
            standby.stop()
    assert standby is not None
    lines = standby.text().splitlines()
    resumed = next((i for i, line in enumerate(lines) if "Resuming operations after the pause" in line), None)
    assert resumed is not None and resumed < lines.index(first[0]), lines[-40:]
    assert names(c, "deployments", ns) == ["m-1-0-0", "m-1-1-0"]
    assert history(md) == [("1.0.0", "Superseded"), ("1.1.0", "Promoted")]
    story = events(c, ns, "m")
    assert story.count("RolloutStarted") == 1 and story.count("Promoted") == 2, story
    print(f"\n[faults] takeover: standby's first write {takeover:.1f} s after kill -9 of the active replica; "
          f"rollout finished {finished:.1f} s after the kill")


def test_a_replica_paused_for_a_higher_priority_one_stops_acting(faults: FaultCluster) -> None:
    """Kopf pauses a replica's watches when a peer of a higher priority appears; Shipyard's own work queue (its
    timers: step pauses, analysis intervals) must pause with them, or the paused replica keeps writing from a cache
    that no longer updates."""
    c = faults.cluster
    ns = new_namespace(c)
    c.apply({"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING}}, ns)
    peering = ("--namespace", ns, f"--peering={PEERING}")
    steps = [{"weight": 25, "pause": "6s"}, {"weight": 50, "pause": "6s"}]
    first = Operator(c, faults.logs / "first.log", *peering, "--priority=50")
    second: Operator | None = None
    try:
        wait_until(lambda: "Resuming operations after the pause" in first.text(), 30, message="the first resuming")
        c.apply(model("p", "1.0.0", rollout={"steps": steps}), ns)
        wait_status(c, ns, "p", healthy("1.0.0"), 60, message="1.0.0 healthy")
        c.apply(model("p", "1.1.0", rollout={"steps": steps}), ns)
        wait_status(c, ns, "p", lambda md: assess_kill_point(md["status"]) == "step-0", 60, message="step 0 ready")
        # The first replica now has a timer due at the end of step 0's pause.
        second = Operator(c, faults.logs / "second.log", *peering, "--priority=100")
        wait_until(lambda: "Peering paused this replica's reconciles" in first.text(), 30,
                   message="the first replica pausing its work queue")
        md = wait_status(c, ns, "p", lambda m: healthy("1.1.0")(m) and replicas(c, ns)["1.0.0"] == 0, 90,
                         message="1.1.0 healthy under the second replica")
        time.sleep(2.0)  # a late timer of the first replica would have fired by now
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert second is not None
    lines = first.text().splitlines()
    paused = next(i for i, line in enumerate(lines) if "Peering paused this replica's reconciles" in line)
    late = [line for line in lines[paused:] if any(a in line for a in ACTIONS)]
    assert not late, late
    assert second.actions(), second.text()[-3000:]
    assert history(md) == [("1.0.0", "Superseded"), ("1.1.0", "Promoted")]
