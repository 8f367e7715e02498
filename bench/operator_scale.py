"""Operator scale benchmark: N ModelDeployments vs N Argo Rollouts on the same local control plane (does I/O).

For each system and each N (default 100, 500, 1000) a fresh control plane is started (hack/cluster.py, KWOK nodes
with room for every pod, the apiserver auditing only the controller's own client identity), the controller runs
as a real process, N objects with the same pod template (1 replica, no compression, no analysis) are created by
16 concurrent clients, and a watch records with monotonic timestamps when each object's Deployment appears and
when the object is Ready (ModelDeployment: condition Ready=True; Rollout: status.phase Healthy). Then the
controller is left idle for a minute and its writes are counted from the audit log.

Reported per run: create -> Deployment and create -> Ready (p50, p99), time until all Ready, the controller's peak
RSS and CPU seconds, its API requests (from the audit log) per reconcile (Shipyard's reconcile counter), and idle
writes per minute. Prints a table, writes bench/results/operator_scale.json, and ends with `targets: K/N met`.

    OMP_NUM_THREADS=1 .venv/bin/python bench/operator_scale.py [--sizes 100,500,1000] [--skip-peer] [--profile DIR]

With --profile, py-spy samples the operator for the whole run (collapsed stacks in DIR/operator-N.txt) and the
functions with the most samples (own and cumulative) are printed and written to DIR/operator-N-top.txt.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightkube
from lightkube.config.kubeconfig import KubeConfig
from lightkube.generic_resource import create_namespaced_resource

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.modules, from the checkout
from tests.modules import load_file  # noqa: E402

RESULTS = REPO / "bench" / "results"
OPERATOR_USER = "shipyard-operator"
ARGO_USER = "argo-rollouts"
IDLE_WINDOW = 60.0
NAMESPACE = "bench"
IMAGE = "registry.example/bench/model"
MD = create_namespaced_resource("shipyard.dev", "v1alpha1", "ModelDeployment", "modeldeployments")
ROLLOUT = create_namespaced_resource("argoproj.io", "v1alpha1", "Rollout", "rollouts")
DEPLOYMENT = create_namespaced_resource("apps", "v1", "Deployment", "deployments")
REPLICASET = create_namespaced_resource("apps", "v1", "ReplicaSet", "replicasets")


def load_cluster_module() -> Any:
    return load_file("shipyard_hack_cluster", REPO / "hack" / "cluster.py")


def build_pod_template(name: str) -> dict[str, Any]:
    return {
        "metadata": {"labels": {"app": name}},
        "spec": {"containers": [{"name": "server", "image": f"{IMAGE}:1.0.0",
                                 "ports": [{"name": "http", "containerPort": 8080}],
                                 "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]},
    }


def build_model_deployment(name: str) -> dict[str, Any]:
    return {"apiVersion": "shipyard.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"image": f"{IMAGE}:1.0.0", "model": {"path": "/models/bench"},
                     "serving": {"replicas": 1, "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}}}


def build_rollout(name: str) -> dict[str, Any]:
    return {"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                     "template": build_pod_template(name),
                     "strategy": {"canary": {"steps": [{"setWeight": 50}, {"pause": {"duration": "1s"}}]}}}}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


@dataclass
class Run:
    system: str
    n: int
    create_seconds: float = 0.0
    to_deployment_p50: float = float("nan")
    to_deployment_p99: float = float("nan")
    to_ready_p50: float = float("nan")
    to_ready_p99: float = float("nan")
    all_ready_seconds: float = float("nan")
    ready: int = 0
    rss_peak_mb: float = 0.0
    cpu_seconds: float = 0.0
    api_requests: int = 0
    api_writes: int = 0
    reconciles: int = 0
    requests_per_reconcile: float = float("nan")
    idle_writes_per_minute: float = float("nan")
    notes: list[str] = field(default_factory=list)


class ProcessStats:
    """Peak RSS and CPU time of a process (and its children), sampled from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rss_peak_kb = 0
        self._stop = False

    def sample(self) -> None:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.rss_peak_kb = max(self.rss_peak_kb, int(line.split()[1]))

    def cpu_seconds(self) -> float:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks = os.sysconf("SC_CLK_TCK")
            return (int(fields[11]) + int(fields[12])) / ticks
        return float("nan")

    async def run(self) -> None:
        while not self._stop:
            self.sample()
            await asyncio.sleep(0.25)

    def stop(self) -> None:
        self._stop = True


def count_audit(path: Path, user: str, since: float = 0.0, until: float = float("inf")) -> tuple[int, int]:
    """(requests, writes) of `user` in the audit log between two wall-clock times."""
    requests = writes = 0
    if not path.exists():
        return 0, 0
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("user", {}).get("username") != user:
            continue
        stamp = event.get("stageTimestamp") or event.get("requestReceivedTimestamp") or ""
        match = re.match(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d(?:\.\d+)?)Z", stamp)
        if match:
            y, mo, d, h, mi, sec = match.groups()
            t = time.mktime((int(y), int(mo), int(d), int(h), int(mi), 0, 0, 0, 0)) - time.timezone + float(sec)
            if not since <= t <= until:
                continue
        requests += 1
        if event.get("verb") in ("create", "update", "patch", "delete", "deletecollection"):
            writes += 1
    return requests, writes


async def create_all(client: lightkube.AsyncClient, resource: Any, bodies: list[dict[str, Any]],
                     created: dict[str, float], concurrency: int = 16) -> None:
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)

    async def worker() -> None:
        while not queue.empty():
            body = queue.get_nowait()
            created[body["metadata"]["name"]] = time.monotonic()
            await client.create(resource(body))

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def watch_until(client: lightkube.AsyncClient, resource: Any, record: Callable[[dict[str, Any]], str | None],
                      seen: dict[str, float], expected: int, timeout: float) -> None:
    """Records the first time `record(obj)` names an object; returns when `expected` are recorded or on timeout."""
    async def loop() -> None:
        while len(seen) < expected:
            try:
                async for _, obj in client.watch(resource, namespace=NAMESPACE):
                    body = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
                    name = record(body)
                    if name and name not in seen:
                        seen[name] = time.monotonic()
                    if len(seen) >= expected:
                        return
            except (lightkube.ApiError, OSError):
                await asyncio.sleep(0.2)

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(loop(), timeout)


def md_ready(body: dict[str, Any]) -> str | None:
    for c in (body.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready" and c.get("status") == "True":
            return str(body["metadata"]["name"])
    return None


def rollout_ready(body: dict[str, Any]) -> str | None:
    status = body.get("status") or {}
    if status.get("phase") == "Healthy" and status.get("availableReplicas", 0) >= 1:
        return str(body["metadata"]["name"])
    return None


def deployment_owner(body: dict[str, Any]) -> str | None:
    for ref in body["metadata"].get("ownerReferences") or []:
        if ref.get("kind") in ("ModelDeployment", "Rollout"):
            return str(ref["name"])
    return None


def scrape_counter(port: int, name: str) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return float("nan")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


async def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the controller exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def argo_module_dir() -> Path:
    """The Argo Rollouts module (for its CRD manifests), from the Go module cache."""
    version = os.environ.get("ARGO_ROLLOUTS_VERSION", "v1.10.1")
    out = subprocess.run(["go", "mod", "download", "-json", f"github.com/argoproj/argo-rollouts@{version}"],
                         capture_output=True, text=True, check=True, env={**os.environ, "GOFLAGS": "-mod=mod"},
                         cwd=tempfile.gettempdir())
    return Path(json.loads(out.stdout)["Dir"])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def summarize_profile(collapsed: Path, top: int = 25) -> str:
    """The functions with the most py-spy samples in a collapsed-stack file: own (leaf) and cumulative."""
    own: dict[str, int] = {}
    cumulative: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            cumulative[frame] = cumulative.get(frame, 0) + count
    lines = [f"{total} samples"]
    for title, table in (("own", own), ("cumulative", cumulative)):
        lines.append(f"--- {title}")
        for frame, count in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"{100.0 * count / max(1, total):5.1f}%  {frame}")
    return "\n".join(lines)


async def run_one(cluster_mod: Any, system: str, n: int, argo_binary: Path | None, timeout: float,
                  profile_dir: Path | None = None, operator_args: tuple[str, ...] = ()) -> Run:
    run = Run(system=system, n=n)
    nodes = tuple(cluster_mod.build_node(f"kwok-bench-{i}", cpu="1000", memory="4Ti", gpus=0, pods=n + 50)
                  for i in range(2))
    user = OPERATOR_USER if system == "shipyard" else ARGO_USER
    state_dir = Path(tempfile.mkdtemp(prefix=f"shipyard-bench-{system}-{n}-"))
    state = cluster_mod.up(state_dir, nodes=nodes, audit_users=(user,))
    proc: subprocess.Popen[bytes] | None = None
    profiler: subprocess.Popen[bytes] | None = None
    try:
        admin = KubeConfig.from_file(str(state.kubeconfig))
        cluster_mod.kubectl(state, "create", "namespace", NAMESPACE)
        log = open(state_dir / f"{system}.log", "wb")  # noqa: SIM115 - handed to the child
        env = {**os.environ, "KUBECONFIG": str(state_dir / f"kubeconfig-{user}"), "OMP_NUM_THREADS": "1"}
        metrics_port, health_port = free_port(), free_port()
        if system == "shipyard":
            cluster_mod.kubectl(state, "apply", "--server-side", "-f", str(REPO / "crds"))
            resource, build, ready = MD, build_model_deployment, md_ready
            command = [sys.executable, "-m", "shipyard.operator.main", "--all-namespaces",
                       "--metrics-port", str(metrics_port), "--metrics-address", "127.0.0.1",
                       "--liveness", f"http://127.0.0.1:{health_port}/healthz", *operator_args]
            health_url = f"http://127.0.0.1:{health_port}/healthz"
        else:
            assert argo_binary is not None
            crds = argo_module_dir()
            for crd in sorted((crds / "manifests" / "crds").glob("*-crd.yaml")):
                cluster_mod.kubectl(state, "apply", "--server-side", "-f", str(crd))
            for _ in range(120):  # `kubectl wait` errs while the new CRD has no conditions yet
                if cluster_mod.kubectl(state, "get", "crd/rollouts.argoproj.io", "-o",
                                       "jsonpath={.status.conditions[?(@.type=='Established')].status}",
                                       check=False) == "True":
                    break
                time.sleep(0.5)
            resource, build, ready = ROLLOUT, build_rollout, rollout_ready
            command = [str(argo_binary), "--kubeconfig", env["KUBECONFIG"], "--leader-elect=false",
                       "--metricsPort", str(metrics_port), "--healthzPort", str(health_port), "--loglevel", "warn"]
            health_url = f"http://127.0.0.1:{health_port}/healthz"
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        if profile_dir is not None and system == "shipyard":
            profile_dir.mkdir(parents=True, exist_ok=True)
            py_spy = str(Path(sys.executable).parent / "py-spy")
            profiler = subprocess.Popen([py_spy, "record", "--pid", str(proc.pid), "--rate", "50", "--format", "raw",
                                         "--output", str(profile_dir / f"operator-{n}.txt")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stats = ProcessStats(proc.pid)
        sampler = asyncio.create_task(stats.run())
        await wait_healthy(health_url, proc)  # started and past its initial listing
        await asyncio.sleep(1.0)
        client = lightkube.AsyncClient(config=admin)
        created: dict[str, float] = {}
        deployed: dict[str, float] = {}
        readied: dict[str, float] = {}
        names = [f"m{i:05d}" for i in range(n)]
        watchers = asyncio.gather(
            watch_until(client, DEPLOYMENT if system == "shipyard" else REPLICASET, deployment_owner, deployed, n,
                        timeout),
            watch_until(client, resource, ready, readied, n, timeout),
        )
        started = time.monotonic()
        await create_all(client, resource, [build(name) for name in names], created)
        run.create_seconds = time.monotonic() - started
        await watchers
        if len(readied) < n:  # tell a slow controller from a watch that missed events
            listed = [o.to_dict() if hasattr(o, "to_dict") else dict(o)
                      async for o in client.list(resource, namespace=NAMESPACE)]
            really = sum(1 for o in listed if ready(o))
            run.notes.append(f"watch saw {len(readied)} Ready, the API lists {really} Ready")
        to_dep = [deployed[k] - created[k] for k in names if k in deployed]
        to_ready = [readied[k] - created[k] for k in names if k in readied]
        run.ready = len(to_ready)
        run.to_deployment_p50, run.to_deployment_p99 = percentile(to_dep, 50), percentile(to_dep, 99)
        run.to_ready_p50, run.to_ready_p99 = percentile(to_ready, 50), percentile(to_ready, 99)
        if len(readied) == n:
            run.all_ready_seconds = max(readied.values()) - started
        else:
            run.notes.append(f"only {len(readied)}/{n} Ready within {timeout:.0f} s")
        if system == "shipyard":
            run.reconciles = int(scrape_counter(metrics_port, "shipyard_operator_reconcile_duration_seconds_count"))
        await asyncio.sleep(10.0)  # let the last status writes and events land
        audit = state_dir / "audit.log"
        time.sleep(2.0)  # audit batch flush
        run.api_requests, run.api_writes = count_audit(audit, user)
        if run.reconciles:
            run.requests_per_reconcile = run.api_requests / run.reconciles
        idle_from = time.time()
        await asyncio.sleep(IDLE_WINDOW)
        time.sleep(2.0)
        _, idle_writes = count_audit(audit, user, since=idle_from, until=idle_from + IDLE_WINDOW)
        run.idle_writes_per_minute = idle_writes * 60.0 / IDLE_WINDOW
        stats.sample()
        run.cpu_seconds = stats.cpu_seconds()
        run.rss_peak_mb = stats.rss_peak_kb / 1024
        stats.stop()
        await sampler
        await client.close()
    finally:
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            with contextlib.suppress(subprocess.TimeoutExpired):
                profiler.wait(timeout=30)
            assert profile_dir is not None
            collapsed = profile_dir / f"operator-{n}.txt"
            if collapsed.exists():
                summary = summarize_profile(collapsed)
                (profile_dir / f"operator-{n}-top.txt").write_text(summary + "\n")
                print(summary, file=sys.stderr, flush=True)
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        cluster_mod.down(state_dir)
    return run


def fmt(v: float, digits: int = 2) -> str:
    return "-" if v != v else f"{v:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,500,1000")
    parser.add_argument("--skip-peer", action="store_true", help="do not build and run Argo Rollouts")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for all Ready per run")
    parser.add_argument("--operator-args", default="", help="extra operator flags, e.g. '--workers=32'")
    parser.add_argument("--profile", type=Path, default=None, help="sample the operator with py-spy into this folder")
    parser.add_argument("--output", type=Path, default=RESULTS / "operator_scale.json",
                        help="where to write the JSON (default bench/results/operator_scale.json)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sizes = [int(s) for s in args.sizes.split(",")]
    cluster_mod = load_cluster_module()
    cluster_mod.build_binaries()
    argo = None
    if not args.skip_peer:
        out = subprocess.run(["bash", str(REPO / "bench" / "peers" / "build-argo-rollouts.sh")], check=True,
                             capture_output=True, text=True)
        argo = Path(out.stdout.strip().splitlines()[-1])
    runs: list[Run] = []
    for n in sizes:
        for system in ("shipyard",) + (() if argo is None else ("argo-rollouts",)):
            print(f"[bench] {system} N={n} ...", file=sys.stderr, flush=True)
            runs.append(asyncio.run(run_one(cluster_mod, system, n, argo, args.timeout, args.profile,
                                                 tuple(args.operator_args.split()))))
            print(f"[bench] {asdict(runs[-1])}", file=sys.stderr, flush=True)

    header = ("system", "N", "create s", "->Dep p50", "->Dep p99", "->Ready p50", "->Ready p99", "all Ready s",
              "RSS MB", "CPU s", "API req", "req/reconcile", "idle writes/min")
    rows = [(r.system, str(r.n), fmt(r.create_seconds), fmt(r.to_deployment_p50, 3), fmt(r.to_deployment_p99, 3),
             fmt(r.to_ready_p50, 3), fmt(r.to_ready_p99, 3), fmt(r.all_ready_seconds, 1), fmt(r.rss_peak_mb, 0),
             fmt(r.cpu_seconds, 1), str(r.api_requests), fmt(r.requests_per_reconcile),
             fmt(r.idle_writes_per_minute, 1)) for r in runs]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))

    targets: list[tuple[str, bool]] = []
    by = {(r.system, r.n): r for r in runs}
    if (s := by.get(("shipyard", 1000))) is not None:
        targets.append(("1000 all Ready <= 120 s", s.all_ready_seconds <= 120))
        targets.append(("RSS <= 300 MB at 1000", s.rss_peak_mb <= 300))
    if (s := by.get(("shipyard", 100))) is not None:
        targets.append(("p99 create->Deployment <= 2 s at 100", s.to_deployment_p99 <= 2.0))
    targets.append(("0 idle writes", all(r.idle_writes_per_minute == 0 for r in runs if r.system == "shipyard")))
    ratios = []
    for n in sizes:
        s, a = by.get(("shipyard", n)), by.get(("argo-rollouts", n))
        if s and a and a.all_ready_seconds == a.all_ready_seconds:
            ratio = s.all_ready_seconds / a.all_ready_seconds
            ratios.append({"n": n, "shipyard_all_ready_s": s.all_ready_seconds,
                           "argo_all_ready_s": a.all_ready_seconds, "ratio": ratio})
            print(f"ratio N={n}: shipyard/argo-rollouts time to all available = {ratio:.2f}")
    if ratios:
        targets.append(("within 2x of Argo Rollouts at every N", all(r["ratio"] <= 2.0 for r in ratios)))
    for name, ok in targets:
        print(f"  {'met ' if ok else 'MISSED'}  {name}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {"kubernetes": cluster_mod.read_versions()["KUBE_VERSION"],
                     "argo_rollouts": os.environ.get("ARGO_ROLLOUTS_VERSION", "v1.10.1")},
        "operator_args": args.operator_args, "runs": [asdict(r) for r in runs], "ratios": ratios,
        "targets": [{"name": n, "met": ok} for n, ok in targets],
    }, indent=2, default=str))
    print(f"targets: {sum(ok for _, ok in targets)}/{len(targets)} met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
