#!/usr/bin/env python3
"""The Gateway API in the local stack: the pinned release's standard-channel CRDs, and Traefik (built by
hack/build-binaries.sh) as the Gateway controller and data plane, run on the host against the local control plane
(process, file and cluster I/O, except the pure ``build_*`` functions).

    python3 hack/gateway.py start --dir D --kubeconfig K [--namespace N] [--name G]   # prints one JSON line
    python3 hack/gateway.py stop --dir D
    python3 hack/gateway.py install-crds --kubeconfig K
    python3 hack/gateway.py uninstall-crds --kubeconfig K

`install_crds` applies ``config/crd/standard/*.yaml`` of ``sigs.k8s.io/gateway-api@GATEWAY_API_VERSION`` (from the
Go module cache: ``go mod download``; no release asset, nothing from the internet but the module proxy) server-side
(``httproutes.yaml`` is 344 KB, over the client-side last-applied limit) and waits until every CRD is Established;
`uninstall_crds` deletes them and waits until they are gone (what an operator test of "no Gateway API" needs).

What `start` does, in order:

1. installs the CRDs (idempotent);
2. starts Traefik (``KUBECONFIG`` set: its kubernetesgateway provider builds an out-of-cluster client from it; the
   kubeconfig is the cluster's admin, so Traefik's RBAC is moot) with two entry points, both on 127.0.0.1: ``web``
   (the Gateway's listener, a free port) and ``traefik`` (ping, the API and Prometheus metrics), a JSON access log
   and its own log in D; no version check and no usage report (nothing leaves the machine);
3. waits for /ping, then applies a Namespace, a GatewayClass (``controllerName: traefik.io/gateway-controller``) and
   a Gateway with one listener ``http`` (HTTP, the web entry point's port: Traefik binds a listener to the entry
   point whose address ends in ``:<port>``; routes from all namespaces) and waits until the Gateway is
   ``Programmed=True`` with the status address 127.0.0.1 (``--providers.kubernetesgateway.statusAddress.ip``).

`stop` deletes the Gateway and the GatewayClass while the cluster answers (a Gateway left behind would still read
Programmed with nothing serving it), then stops Traefik (SIGTERM, SIGKILL after a grace period). One Traefik per
cluster: every instance claims every GatewayClass of its controllerName.

Backends: Traefik reads a Service's ready EndpointSlice addresses (not its ClusterIP, unless
``traefik.io/service.nativelb``), and connects to them from the host. The API server refuses loopback addresses in
EndpointSlices, so backends live at private addresses inside network namespaces that the stack creates itself.
Standard library only, with hack/proc.py and hack/cluster.py (runs before any virtualenv exists).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

HACK = Path(__file__).resolve().parent
if str(HACK) not in sys.path:  # hack/ holds scripts, not a package: siblings import by name (see hack/proc.py)
    sys.path.insert(0, str(HACK))
import cluster  # noqa: E402
import proc  # noqa: E402

CONTROLLER_NAME = "traefik.io/gateway-controller"  # Traefik's provider (pkg/provider/kubernetes/gateway)
GATEWAY_CLASS = "traefik"
NAMESPACE = "shipyard-gateway"
GATEWAY = "shipyard"
LISTENER = "http"
ADDRESS = "127.0.0.1"
FIELD_MANAGER = "shipyard-gateway"
STATE_FILE = "gateway.json"
TRAEFIK_LOG = "traefik.log"
ACCESS_LOG = "access.log"
GROUP = "gateway.networking.k8s.io"
# The standard channel of v1.4.1; Traefik 3.6 watches all of them (ReferenceGrant as v1beta1, BackendTLSPolicy v1).
CRDS = tuple(f"{plural}.{GROUP}" for plural in (
    "gatewayclasses", "gateways", "httproutes", "grpcroutes", "referencegrants", "backendtlspolicies"))


def log(msg: str) -> None:
    print(f"[gateway] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Gateway:
    """A running gateway: what `start` returns and ``D/gateway.json`` records."""

    namespace: str
    name: str
    gateway_class: str
    listener: str  # the Gateway's listener name (an HTTPRoute's parentRefs[].sectionName)
    address: str  # 127.0.0.1: the listener and Traefik's own endpoints
    port: int  # the listener's port = Traefik's web entry point
    admin_port: int  # Traefik's traefik entry point: /ping, /api/..., /metrics
    pid: int
    kubeconfig: str
    log: str
    access_log: str  # JSON lines, one per request (RouterName, ServiceName, ServiceURL, DownstreamStatus, ...)
    timings: dict[str, float]

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.address}:{self.admin_port}"

    @property
    def metrics_url(self) -> str:
        return f"{self.admin_url}/metrics"

    @property
    def parent_ref(self) -> dict[str, Any]:
        """The parentRef an HTTPRoute or GRPCRoute attaches with."""
        return {"group": GROUP, "kind": "Gateway", "namespace": self.namespace, "name": self.name,
                "sectionName": self.listener}

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "url": self.url, "admin_url": self.admin_url,
                "metrics_url": self.metrics_url}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Gateway:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def traefik_version() -> str:
    return str(cluster.read_versions()["TRAEFIK_VERSION"])


def gateway_api_version() -> str:
    return str(cluster.read_versions()["GATEWAY_API_VERSION"])


def binary() -> Path:
    """The Traefik hack/build-binaries.sh builds (``SHIPYARD_TRAEFIK`` overrides); RuntimeError when not built."""
    return cluster.built_binary("TRAEFIK_VERSION", "traefik", "traefik", "SHIPYARD_TRAEFIK",
                                "github.com/traefik/traefik/v3")


def kubectl_binary() -> str:
    """The kubectl built at the cluster's version (a machine's own may be too far from the API server)."""
    pinned = cluster.binaries()["kubectl"]
    return str(pinned) if pinned.exists() else "kubectl"


def kubectl(kubeconfig: Path, *args: str, input: str | None = None, check: bool = True, timeout: float = 60) -> str:
    out = subprocess.run([kubectl_binary(), f"--kubeconfig={kubeconfig}", *args], input=input, capture_output=True,
                         text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def crd_dir() -> Path:
    """``config/crd/standard`` of the pinned sigs.k8s.io/gateway-api release, from the Go module cache."""
    out = subprocess.run(
        ["go", "mod", "download", "-json", f"sigs.k8s.io/gateway-api@{gateway_api_version()}"],
        check=True, capture_output=True, text=True, env=dict(os.environ, GOFLAGS="-mod=mod"),
        cwd=str(cluster.cache_dir()),
    )
    return Path(json.loads(out.stdout)["Dir"]) / "config" / "crd" / "standard"


def crd_status(kubeconfig: Path) -> dict[str, bool]:
    """{CRD name: Established} for the Gateway API CRDs present in the cluster."""
    template = "{range .items[*]}{.metadata.name}={.status.conditions[?(@.type=='Established')].status}{'\\n'}{end}"
    out = kubectl(kubeconfig, "get", "crd", "-o", f"jsonpath={template}", check=False)
    status = {}
    for line in out.splitlines():
        name, _, value = line.partition("=")
        if name.endswith(f".{GROUP}"):
            status[name] = value == "True"
    return status


def poll(what: str, check: Callable[[], bool], timeout: float, pid: int | None = None,
         log_file: Path | None = None) -> None:
    """Polls `check` until it holds; raises TimeoutError, or RuntimeError with the log's tail when `pid` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid is not None and not proc.alive(pid):
            tail = log_file.read_text(errors="replace")[-3000:] if log_file and log_file.exists() else ""
            raise RuntimeError(f"Traefik exited while waiting for {what}:\n{tail}")
        if check():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready within {timeout:.0f} s")


def install_crds(kubeconfig: Path, timeout: float = 60.0) -> list[str]:
    """Applies the pinned release's standard-channel CRDs server-side and waits until all are Established.
    Returns their names."""
    kubectl(Path(kubeconfig), "apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "--force-conflicts",
            "-f", str(crd_dir()), timeout=max(60.0, timeout))
    poll("the Gateway API CRDs", lambda: all(crd_status(Path(kubeconfig)).get(c) for c in CRDS), timeout)
    return list(CRDS)


def uninstall_crds(kubeconfig: Path, timeout: float = 60.0) -> None:
    """Deletes the Gateway API CRDs (and with them every Gateway API object) and waits until they are gone."""
    present = sorted(crd_status(Path(kubeconfig)))
    if present:
        kubectl(Path(kubeconfig), "delete", "crd", *present, "--ignore-not-found", "--wait=false")
    poll("the Gateway API CRDs' deletion", lambda: not crd_status(Path(kubeconfig)), timeout)


def build_argv(binary: Path, port: int, admin_port: int, state_dir: Path, log_level: str = "INFO") -> list[str]:
    """Traefik's command line (pure): every listener on 127.0.0.1, the kubernetesgateway provider, nothing that
    calls out (no version check, no usage report, no dashboard: the module zip has no web UI anyway)."""
    return [
        str(binary),
        "--global.checkNewVersion=false",
        "--global.sendAnonymousUsage=false",
        f"--entryPoints.web.address={ADDRESS}:{port}",
        f"--entryPoints.traefik.address={ADDRESS}:{admin_port}",
        "--entryPoints.web.transport.lifeCycle.graceTimeOut=2s",
        "--ping=true",
        "--ping.entryPoint=traefik",
        "--api=true",
        "--api.insecure=true",
        "--api.dashboard=false",
        "--metrics.prometheus=true",
        "--metrics.prometheus.entryPoint=traefik",
        "--metrics.prometheus.addServicesLabels=true",
        "--metrics.prometheus.addRoutersLabels=true",
        "--providers.kubernetesgateway=true",
        f"--providers.kubernetesgateway.statusAddress.ip={ADDRESS}",
        f"--log.level={log_level}",
        "--log.noColor=true",
        "--accessLog=true",
        f"--accessLog.filePath={state_dir / ACCESS_LOG}",
        "--accessLog.format=json",
    ]


def build_env(kubeconfig: Path) -> dict[str, str]:
    """Traefik's environment: KUBECONFIG, and no in-cluster variables (they would win over KUBECONFIG)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT") and not k.startswith("TRAEFIK_")}
    env["KUBECONFIG"] = str(kubeconfig)
    return env


def build_objects(namespace: str, name: str, port: int, gateway_class: str = GATEWAY_CLASS) -> list[dict[str, Any]]:
    """The Namespace, the GatewayClass and the Gateway (one HTTP listener on `port`, routes from all namespaces;
    pure)."""
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        {"apiVersion": f"{GROUP}/v1", "kind": "GatewayClass", "metadata": {"name": gateway_class},
         "spec": {"controllerName": CONTROLLER_NAME}},
        {"apiVersion": f"{GROUP}/v1", "kind": "Gateway", "metadata": {"name": name, "namespace": namespace},
         "spec": {"gatewayClassName": gateway_class, "listeners": [
             {"name": LISTENER, "protocol": "HTTP", "port": port,
              "allowedRoutes": {"namespaces": {"from": "All"}}}]}},
    ]


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return dict(c)
    return None


def get(kubeconfig: Path, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
    args = ["get", kind, name, "-o", "json", "--ignore-not-found"]
    if namespace:
        args += ["-n", namespace]
    out = kubectl(kubeconfig, *args, check=False)
    return json.loads(out) if out.strip() else None


def gateway_programmed(kubeconfig: Path, namespace: str, name: str) -> bool:
    gw = get(kubeconfig, "gateway", name, namespace)
    programmed = condition(gw, "Programmed")
    addresses = [a.get("value") for a in ((gw or {}).get("status") or {}).get("addresses") or []]
    return (gw is not None and programmed is not None and programmed.get("status") == "True"
            and programmed.get("observedGeneration") == gw["metadata"]["generation"] and ADDRESS in addresses)


def http_ok(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never through a proxy
    try:
        with opener.open(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start(state_dir: Path, kubeconfig: Path, namespace: str = NAMESPACE, name: str = GATEWAY,
          gateway_class: str = GATEWAY_CLASS, timeout: float = 90.0, log_level: str = "INFO") -> Gateway:
    """Installs the CRDs, starts Traefik and programs one Gateway `namespace`/`name` on a free port of 127.0.0.1.
    Raises (after stopping what it started) with Traefik's log tail when it exits or a step times out."""
    traefik = binary()
    state_dir = Path(state_dir).resolve()
    kubeconfig = Path(kubeconfig).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    mark = started = time.monotonic()
    install_crds(kubeconfig)
    timings["crds"] = time.monotonic() - mark
    port = admin_port = cluster.free_port()
    while admin_port == port:
        admin_port = cluster.free_port()
    log_file = state_dir / TRAEFIK_LOG
    mark = time.monotonic()
    argv = build_argv(traefik, port, admin_port, state_dir, log_level)
    popen = proc.spawn(argv, log_file, env=build_env(kubeconfig),
                       header=f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n")
    info = Gateway(namespace=namespace, name=name, gateway_class=gateway_class, listener=LISTENER, address=ADDRESS,
                   port=port, admin_port=admin_port, pid=popen.pid, kubeconfig=str(kubeconfig), log=str(log_file),
                   access_log=str(state_dir / ACCESS_LOG), timings=timings)
    (state_dir / STATE_FILE).write_text(json.dumps(info.to_json(), indent=2) + "\n")
    try:
        poll("Traefik's /ping", lambda: http_ok(f"{info.admin_url}/ping"), timeout, popen.pid, log_file)
        timings["traefik"] = time.monotonic() - mark
        mark = time.monotonic()
        for obj in build_objects(namespace, name, port, gateway_class):
            kubectl(kubeconfig, "apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "--force-conflicts",
                    "-f", "-", input=json.dumps(obj))
        poll(f"Gateway {namespace}/{name} Programmed", lambda: gateway_programmed(kubeconfig, namespace, name),
             timeout, popen.pid, log_file)
        timings["programmed"] = time.monotonic() - mark
    except BaseException:
        log(f"Start failed; Traefik's log is {log_file}")
        stop(state_dir)
        raise
    timings["total"] = time.monotonic() - started
    (state_dir / STATE_FILE).write_text(json.dumps(info.to_json(), indent=2) + "\n")
    log(f"Started Traefik {traefik_version()} in {timings['total']:.1f} s: Gateway {namespace}/{name} at {info.url}, "
        f"admin {info.admin_url}")
    return info


def stop(state_dir: Path, timeout: float = 15.0) -> None:
    """Deletes the Gateway and GatewayClass (when the cluster still answers), then stops Traefik (proc.stop:
    SIGTERM, SIGKILL after `timeout`, waited for until gone). A no-op without a recorded gateway."""
    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        return
    info = Gateway.from_json(json.loads(path.read_text()))
    kubeconfig = Path(info.kubeconfig)
    kubectl(kubeconfig, "delete", "gateway", info.name, "-n", info.namespace, "--ignore-not-found", "--wait=false",
            "--request-timeout=10s", check=False, timeout=20)
    kubectl(kubeconfig, "delete", "gatewayclass", info.gateway_class, "--ignore-not-found", "--wait=false",
            "--request-timeout=10s", check=False, timeout=20)
    proc.stop(info.pid, timeout)
    path.unlink()
    log("Stopped Traefik")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["start", "stop", "install-crds", "uninstall-crds"])
    parser.add_argument("--dir", type=Path, help="state directory (logs, access log, pid)")
    parser.add_argument("--kubeconfig", type=Path, help="the cluster's admin kubeconfig")
    parser.add_argument("--namespace", default=NAMESPACE, help="start: the Gateway's namespace")
    parser.add_argument("--name", default=GATEWAY, help="start: the Gateway's name")
    args = parser.parse_args(argv)
    if args.command in ("install-crds", "uninstall-crds"):
        if args.kubeconfig is None:
            parser.error(f"{args.command} needs --kubeconfig")
        if args.command == "install-crds":
            print("\n".join(install_crds(args.kubeconfig)))
        else:
            uninstall_crds(args.kubeconfig)
        return 0
    if args.dir is None:
        parser.error(f"{args.command} needs --dir")
    if args.command == "start":
        if args.kubeconfig is None:
            parser.error("start needs --kubeconfig")
        try:
            info = start(args.dir, args.kubeconfig, args.namespace, args.name)
        except (RuntimeError, TimeoutError) as e:
            log(str(e))
            return 1
        print(json.dumps(info.to_json()), flush=True)
        return 0
    stop(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
