#!/usr/bin/env python3
"""Start and stop KEDA (operator + metrics adapter, built by ``hack/build-binaries.sh keda``) as host processes
against the local control plane (process, file and cluster I/O).

    python3 hack/keda.py start --dir D --kubeconfig K    # prints the adapter's URL once the metrics API answers
    python3 hack/keda.py stop --dir D

What `start` does, in order:

1. applies KEDA's CRDs from the module zip (``config/crd``, a kustomization; server-side: ``keda.sh_scaledjobs.yaml``
   is 667 KB, over the client-side last-applied limit) and waits for them to be Established;
2. writes one CA and one certificate (``certs/{ca.crt,tls.crt,tls.key}``, openssl), as KEDA's own cert rotation would
   put in the ``kedaorg-certs`` Secret: the adapter serves the external metrics API with it (SAN
   ``keda-metrics-apiserver.keda.svc``, the name the aggregator checks), the operator serves its gRPC metrics service
   with it (SAN 127.0.0.1) and the adapter presents it as the gRPC client (mutual TLS). No cert rotation: the
   operator's ``--enable-cert-rotation`` would write Secret-backed certificates for Service names only;
3. starts the operator (``KEDA_CLUSTER_OBJECT_NAMESPACE``, ``WATCH_NAMESPACE=""``, every port on 127.0.0.1) and waits
   for its /readyz;
4. starts the adapter (an aggregated API server on 127.0.0.1; its delegated authentication reads the front-proxy CA
   that hack/cluster.py configures from kube-system/extension-apiserver-authentication);
5. registers it: an ExternalName Service (``externalName: 127.0.0.1``: the cluster routes no ClusterIP, and the
   API server refuses loopback addresses in Endpoints) and the APIService ``v1beta1.external.metrics.k8s.io``
   whose port is the adapter's; the aggregator resolves an ExternalName Service to ``https://<externalName>:<port>``
   and verifies the serving certificate as ``<service>.<namespace>.svc`` against the APIService's caBundle;
6. waits until the APIService is Available and ``/apis/external.metrics.k8s.io/v1beta1`` answers.

Both processes use the cluster's admin kubeconfig (KEDA's RBAC from ``config/rbac`` is not applied). The adapter's
own /metrics listener (``--port``) binds every interface: KEDA builds its address as ``:<port>`` with no flag for the
host; it gets a free port and nothing connects to it. `stop` deletes the APIService first (a registered but dead
aggregated API breaks discovery, and with it namespace deletion), then stops the adapter and the operator.
Standard library only, with hack/proc.py and hack/cluster.py (runs before any virtualenv exists).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HACK = Path(__file__).resolve().parent
if str(HACK) not in sys.path:  # hack/ holds scripts, not a package: siblings import by name (see hack/proc.py)
    sys.path.insert(0, str(HACK))
import cluster  # noqa: E402
import proc  # noqa: E402

NAMESPACE = "keda"
APISERVICE = "v1beta1.external.metrics.k8s.io"
ADAPTER_SERVICE = "keda-metrics-apiserver"
OPERATOR_SERVICE = "keda-operator"
FIELD_MANAGER = "shipyard-keda"
CRDS = ("scaledobjects.keda.sh", "scaledjobs.keda.sh", "triggerauthentications.keda.sh",
        "clustertriggerauthentications.keda.sh", "cloudeventsources.eventing.keda.sh",
        "clustercloudeventsources.eventing.keda.sh")
STOP_ORDER = ("keda-adapter", "keda-operator")


def log(msg: str) -> None:
    print(f"[keda] {msg}", file=sys.stderr, flush=True)


def version() -> str:
    return str(cluster.read_versions()["KEDA_VERSION"])


def binaries() -> dict[str, Path]:
    bin_dir = cluster.cache_dir() / "bin" / f"keda-{version()}"
    return {"keda-operator": bin_dir / "keda-operator", "keda-adapter": bin_dir / "keda-adapter"}


def build_binaries() -> dict[str, Path]:
    """Builds KEDA when it is missing (hack/build-binaries.sh keda; a no-op when cached)."""
    bins = binaries()
    if not all(p.exists() and Path(f"{p}.ok").exists() for p in bins.values()):
        log(f"Building KEDA {version()} from its Go module (first run on this machine: long)")
        started = time.monotonic()
        subprocess.run(["bash", str(HACK / "build-binaries.sh"), "keda"], check=True)
        log(f"Built KEDA in {time.monotonic() - started:.0f} s")
    return bins


def module_dir() -> Path:
    """The release's module directory (its config/crd), from the Go module cache."""
    out = subprocess.run(
        ["go", "mod", "download", "-json", f"github.com/kedacore/keda/v2@{version()}"],
        check=True, capture_output=True, text=True, env=dict(os.environ, GOFLAGS="-mod=mod"),
        cwd=str(cluster.cache_dir()),
    )
    return Path(json.loads(out.stdout)["Dir"])


def kubectl(kubeconfig: Path, *args: str, input: str | None = None, check: bool = True) -> str:
    out = subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", *args], input=input, capture_output=True,
                         text=True, timeout=60)
    if check and out.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def build_pki(certs: Path) -> None:
    """KEDA's CA and its one certificate (server and client), as the files KEDA reads from its cert dir."""
    certs.mkdir(parents=True, exist_ok=True)
    cluster.openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key", cwd=certs)
    cluster.openssl("req", "-x509", "-new", "-key", "ca.key", "-out", "ca.crt", "-days", "3650",
                    "-subj", "/O=KEDAORG/CN=shipyard-keda-ca", cwd=certs)
    names = [f"DNS:{s}.{NAMESPACE}.svc{d}" for s in (ADAPTER_SERVICE, OPERATOR_SERVICE) for d in ("", ".cluster.local")]
    (certs / "tls.ext").write_text(f"subjectAltName={','.join([*names, 'DNS:localhost', 'IP:127.0.0.1'])}\n"
                                   "extendedKeyUsage=serverAuth,clientAuth\n")
    cluster.openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "tls.key", cwd=certs)
    cluster.openssl("req", "-new", "-key", "tls.key", "-out", "tls.csr", "-subj", "/O=KEDAORG/CN=keda", cwd=certs)
    cluster.openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                    "-out", "tls.crt", "-days", "3650", "-extfile", "tls.ext", cwd=certs)


def build_registration(adapter_port: int, ca_pem: bytes) -> list[dict[str, object]]:
    """The Namespace, the ExternalName Service and the APIService that route the external metrics API to the adapter
    on 127.0.0.1:<adapter_port> (pure)."""
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": ADAPTER_SERVICE, "namespace": NAMESPACE},
         "spec": {"type": "ExternalName", "externalName": "127.0.0.1"}},
        {"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService", "metadata": {"name": APISERVICE},
         "spec": {"group": "external.metrics.k8s.io", "version": "v1beta1", "groupPriorityMinimum": 100,
                  "versionPriority": 100, "caBundle": base64.b64encode(ca_pem).decode(),
                  "service": {"name": ADAPTER_SERVICE, "namespace": NAMESPACE, "port": adapter_port}}},
    ]


def build_env(kubeconfig: Path) -> dict[str, str]:
    return dict(os.environ, KUBECONFIG=str(kubeconfig), KEDA_CLUSTER_OBJECT_NAMESPACE=NAMESPACE,
                POD_NAMESPACE=NAMESPACE, WATCH_NAMESPACE="")


def build_operator_argv(binary: Path, certs: Path, ports: dict[str, int]) -> list[str]:
    return [str(binary), f"--cert-dir={certs}", "--leader-elect=false",
            f"--metrics-bind-address=127.0.0.1:{ports['operator-metrics']}",
            f"--health-probe-bind-address=127.0.0.1:{ports['operator-health']}",
            f"--metrics-service-bind-address=127.0.0.1:{ports['operator-grpc']}",
            "--zap-log-level=info", "--zap-encoder=console", "--zap-time-encoding=rfc3339"]


def build_adapter_argv(binary: Path, certs: Path, kubeconfig: Path, ports: dict[str, int]) -> list[str]:
    return [str(binary), "--bind-address=127.0.0.1", f"--secure-port={ports['adapter']}",
            f"--cert-dir={certs}", f"--tls-cert-file={certs / 'tls.crt'}",
            f"--tls-private-key-file={certs / 'tls.key'}",
            f"--client-ca-file={certs / 'ca.crt'}",
            f"--lister-kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            f"--metrics-service-address=127.0.0.1:{ports['operator-grpc']}",
            f"--port={ports['adapter-metrics']}", "--zap-log-level=info", "--zap-encoder=console"]


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def apiservice_available(kubeconfig: Path) -> bool:
    out = kubectl(kubeconfig, "get", "apiservice", APISERVICE, "-o",
                  "jsonpath={.status.conditions[?(@.type=='Available')].status}", check=False)
    return out == "True"


def metrics_api_answers(kubeconfig: Path) -> bool:
    out = subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", "get", "--raw",
                          "/apis/external.metrics.k8s.io/v1beta1"], capture_output=True, text=True, timeout=30)
    return out.returncode == 0 and '"groupVersion"' in out.stdout


def crds_established(kubeconfig: Path) -> bool:
    template = "{range .items[*]}{.metadata.name}={.status.conditions[?(@.type=='Established')].status}{'\\n'}{end}"
    out = kubectl(kubeconfig, "get", "crd", "-o", f"jsonpath={template}", check=False)
    ready = {line.split("=")[0] for line in out.splitlines() if line.endswith("=True")}
    return all(c in ready for c in CRDS)


def wait_for(what: str, check: object, timeout: float, pids: dict[str, int], logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, pid in pids.items():
            if not proc.alive(pid):
                tail = (logs / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited while waiting for {what}:\n{tail}")
        if check():  # type: ignore[operator]
            return
        time.sleep(0.3)
    raise TimeoutError(f"{what} not ready within {timeout:.0f} s (logs in {logs})")


def apply_crds(kubeconfig: Path, timeout: float = 60.0) -> None:
    kubectl(kubeconfig, "apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-k",
            str(module_dir() / "config" / "crd"))
    wait_for("KEDA's CRDs", lambda: crds_established(kubeconfig), timeout, {}, Path("."))


def start(state_dir: Path, kubeconfig: Path, timeout: float = 120.0) -> dict[str, object]:
    """Starts KEDA against the cluster of `kubeconfig`; returns the recorded state (pids, ports, timings in s).
    Raises (after stopping what it started) with a log's tail when a process exits or a step times out."""
    bins = build_binaries()
    state_dir = state_dir.resolve()
    kubeconfig = kubeconfig.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    logs = state_dir / "logs"
    logs.mkdir(exist_ok=True)
    timings: dict[str, float] = {}
    mark = started = time.monotonic()
    apply_crds(kubeconfig)
    timings["crds"] = time.monotonic() - mark
    certs = state_dir / "certs"
    build_pki(certs)
    names = ("operator-metrics", "operator-health", "operator-grpc", "adapter", "adapter-metrics")
    ports: dict[str, int] = {}
    while len(set(ports.values())) != len(names):
        ports = {n: cluster.free_port() for n in names}
    state: dict[str, object] = {"kubeconfig": str(kubeconfig), "ports": ports, "pids": {}, "timings": timings}
    pids: dict[str, int] = {}

    def save() -> None:
        state["pids"] = pids
        (state_dir / "keda.json").write_text(json.dumps(state, indent=2) + "\n")

    env = build_env(kubeconfig)
    try:
        kubectl(kubeconfig, "apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", "-",
                input=json.dumps(build_registration(ports["adapter"], (certs / "ca.crt").read_bytes())[0]))
        mark = time.monotonic()
        pids["keda-operator"] = proc.spawn(build_operator_argv(bins["keda-operator"], certs, ports),
                                           logs / "keda-operator.log", env=env).pid
        save()
        wait_for("the KEDA operator", lambda: http_ok(f"http://127.0.0.1:{ports['operator-health']}/readyz"),
                 timeout, pids, logs)
        timings["operator"] = time.monotonic() - mark
        mark = time.monotonic()
        pids["keda-adapter"] = proc.spawn(build_adapter_argv(bins["keda-adapter"], certs, kubeconfig, ports),
                                          logs / "keda-adapter.log", env=env).pid
        save()
        wait_for("the KEDA adapter", lambda: cluster.port_open(ports["adapter"]), timeout, pids, logs)
        timings["adapter"] = time.monotonic() - mark
        mark = time.monotonic()
        for obj in build_registration(ports["adapter"], (certs / "ca.crt").read_bytes())[1:]:
            kubectl(kubeconfig, "apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "--force-conflicts",
                    "-f", "-", input=json.dumps(obj))
        wait_for(f"APIService {APISERVICE}", lambda: apiservice_available(kubeconfig) and metrics_api_answers(
            kubeconfig), timeout, pids, logs)
        timings["apiservice"] = time.monotonic() - mark
    except BaseException:
        log(f"Start failed; logs are in {logs}")
        stop(state_dir)
        raise
    timings["total"] = time.monotonic() - started
    save()
    log(f"Started KEDA {version()} in {timings['total']:.1f} s (adapter https://127.0.0.1:{ports['adapter']}, "
        f"operator gRPC 127.0.0.1:{ports['operator-grpc']})")
    return state


def stop(state_dir: Path, timeout: float = 15.0) -> None:
    """Deletes the APIService (when the cluster still answers), then stops the adapter and the operator (proc.stop:
    SIGTERM, SIGKILL after `timeout`, waited for until gone)."""
    info = state_dir / "keda.json"
    if not info.exists():
        return
    state = json.loads(info.read_text())
    kubectl(Path(state["kubeconfig"]), "delete", "apiservice", APISERVICE, "--ignore-not-found", "--wait=false",
            "--request-timeout=10s", check=False)
    pids: dict[str, int] = state["pids"]
    for name in [n for n in STOP_ORDER if n in pids]:
        proc.stop(pids[name], timeout)
    info.unlink()
    log("Stopped KEDA")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["start", "stop", "build"])
    parser.add_argument("--dir", type=Path, help="state directory (certs, logs, pids)")
    parser.add_argument("--kubeconfig", type=Path, help="start: the cluster's admin kubeconfig")
    args = parser.parse_args(argv)
    if args.command == "build":
        for name, path in build_binaries().items():
            print(f"{name}\t{path}")
        return 0
    if args.dir is None:
        parser.error(f"{args.command} needs --dir")
    if args.command == "start":
        if args.kubeconfig is None:
            parser.error("start needs --kubeconfig")
        state = start(args.dir, args.kubeconfig)
        print(f"https://127.0.0.1:{state['ports']['adapter']}")  # type: ignore[index]
        return 0
    stop(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
