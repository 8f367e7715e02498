#!/usr/bin/env python3
"""A real local Kubernetes control plane on 127.0.0.1, built from pinned Go modules (does process and file I/O).

    python3 hack/cluster.py up      # build (once per machine) and start; prints the KUBECONFIG and PATH exports
    python3 hack/cluster.py env     # print the export lines of the running cluster
    python3 hack/cluster.py status  # one line per component
    python3 hack/cluster.py down    # stop everything and remove the state directory
    python3 hack/cluster.py restart etcd kube-apiserver   # stop and start components (same data, ports, certs)

Components: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and the KWOK controller, run as
plain processes (no containers). KWOK manages the fake nodes (annotation ``kwok.x-k8s.io/node=fake``):
``kwok-cpu-0`` and ``kwok-gpu-0`` (8 ``nvidia.com/gpu``), with stages that make pods Running/Ready and
Job pods Succeeded (plus the project's own test stages in ``hack/kwok/``). Nodes without the annotation are left
alone (the e2e node agent runs its own).

State (PKI, logs, kubeconfig, pids) lives in ``$SHIPYARD_CLUSTER_DIR`` (default ``<repo>/.cluster``).
Only the Python standard library (and hack/proc.py, the stack's one process lifecycle), openssl and kubectl are
used, so this runs before any virtualenv exists. The
kubectl is the one built at the cluster's version (``kubernetes-<version>/kubectl`` in the cache): `up` puts its
directory first on this process' PATH (so tests and their children use it) and prints the same export for a shell.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

HACK = Path(__file__).resolve().parent
if str(HACK) not in sys.path:  # hack/ holds scripts, not a package: siblings import by name (see hack/proc.py)
    sys.path.insert(0, str(HACK))
import proc  # noqa: E402

REPO = HACK.parent
VERSIONS_FILE = HACK / "versions.env"
NODE_ANNOTATION = "kwok.x-k8s.io/node"
SERVICE_CIDR = "10.96.0.0/16"  # virtual: no kube-proxy, nothing ever connects to these addresses
FAKE_POD_CIDR = "127.1.0.0/16"
FAKE_NODE_IP = "127.2.0.1"
KWOK_STAGES = (
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-complete.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
)


def log(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


def read_versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("SHIPYARD_CACHE", Path.home() / ".cache" / "shipyard"))


def built_binary(version_key: str, component: str, name: str, override_env: str, what: str) -> Path:
    """A server that hack/build-binaries.sh builds into the cache (``<cache>/bin/<component>-<version>/<name>``, with
    its ``.ok`` marker), or the file ``override_env`` names. Raises RuntimeError naming the build command (and
    ``what``, the module it is built from) when it is not there."""
    version = read_versions()[version_key]
    override = os.environ.get(override_env)
    path = Path(override) if override else cache_dir() / "bin" / f"{component}-{version}" / name
    if not (path.exists() and (override or Path(f"{path}.ok").exists())):
        raise RuntimeError(f"{path} not found: build it with `bash hack/build-binaries.sh` ({what} {version}, from its "
                           "Go module)")
    return path


def default_state_dir() -> Path:
    return Path(os.environ.get("SHIPYARD_CLUSTER_DIR", REPO / ".cluster"))


def binaries() -> dict[str, Path]:
    v = read_versions()
    bin_dir = cache_dir() / "bin"
    kube = bin_dir / f"kubernetes-{v['KUBE_VERSION']}"
    return {
        "etcd": bin_dir / f"etcd-{v['ETCD_VERSION']}" / "etcd",
        "kube-apiserver": kube / "kube-apiserver",
        "kube-controller-manager": kube / "kube-controller-manager",
        "kube-scheduler": kube / "kube-scheduler",
        "kubectl": kube / "kubectl",
        "kwok": bin_dir / f"kwok-{v['KWOK_VERSION']}" / "kwok",
        "helm": bin_dir / f"helm-{v['HELM_VERSION']}" / "helm",
    }


def build_binaries() -> dict[str, Path]:
    """Builds what is missing (a no-op when every pinned binary is cached)."""
    bins = binaries()
    if not all(p.exists() and Path(f"{p}.ok").exists() for p in bins.values()):
        log("Building the control-plane binaries from pinned Go modules (first run on this machine)")
        started = time.monotonic()
        subprocess.run(["bash", str(HACK / "build-binaries.sh")], check=True)
        log(f"Built the binaries in {time.monotonic() - started:.0f} s")
    return bins


def use_pinned_kubectl() -> Path:
    """Puts the kubectl built at the cluster's version first on this process' PATH (inherited by children):
    a machine's own kubectl may be more than the one supported minor away from the API server. Returns its dir."""
    kubectl_dir = binaries()["kubectl"].parent
    path = os.environ.get("PATH", "")
    entries = path.split(os.pathsep) if path else []
    if entries[:1] != [str(kubectl_dir)]:
        os.environ["PATH"] = os.pathsep.join([str(kubectl_dir), *[e for e in entries if e != str(kubectl_dir)]])
    return kubectl_dir


def print_exports(state: State) -> None:
    print(f"export KUBECONFIG={state.kubeconfig}")
    print(f'export PATH="{binaries()["kubectl"].parent}:$PATH"  # kubectl {read_versions()["KUBE_VERSION"]}')


def kwok_module_dir() -> Path:
    version = read_versions()["KWOK_VERSION"]
    env = dict(os.environ, GOFLAGS="-mod=mod")
    out = subprocess.run(
        ["go", "mod", "download", "-json", f"sigs.k8s.io/kwok@{version}"],
        check=True, capture_output=True, text=True, env=env, cwd=str(cache_dir()),
    )
    return Path(json.loads(out.stdout)["Dir"])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class State:
    dir: str
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    started_at: float = 0.0
    argv: dict[str, list[str]] = field(default_factory=dict)  # each component's command line, to start it again

    @property
    def path(self) -> Path:
        return Path(self.dir)

    @property
    def kubeconfig(self) -> Path:
        return self.path / "kubeconfig"

    def save(self) -> None:
        (self.path / "cluster.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, state_dir: Path) -> State | None:
        f = state_dir / "cluster.json"
        if not f.exists():
            return None
        return cls(**json.loads(f.read_text()))


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], check=True, cwd=str(cwd), capture_output=True)


def build_pki(pki: Path) -> None:
    """A CA, the apiserver's serving certificate, an admin client certificate, the service-account keys and the
    aggregation layer's front-proxy CA and client certificate."""
    pki.mkdir(parents=True, exist_ok=True)
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key", cwd=pki)
    openssl("req", "-x509", "-new", "-key", "ca.key", "-out", "ca.crt", "-days", "3650",
            "-subj", "/CN=shipyard-local-ca", cwd=pki)
    (pki / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
        "extendedKeyUsage=serverAuth\n"
    )
    (pki / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, subj, ext in (
        ("apiserver", "/CN=kube-apiserver", "server.ext"),
        ("admin", "/O=system:masters/CN=shipyard-admin", "client.ext"),
    ):
        openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=pki)
        openssl("req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr", "-subj", subj, cwd=pki)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "3650", "-extfile", ext, cwd=pki)
    openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    build_front_proxy_pki(pki)


FRONT_PROXY_CLIENT = "front-proxy-client"


def build_front_proxy_pki(pki: Path) -> None:
    """The aggregation layer's own CA (as kubeadm's front-proxy-ca) and the client certificate the apiserver presents
    when it proxies a request to an aggregated API server (KEDA's metrics adapter): that server trusts the
    X-Remote-User/Group headers only from a certificate this CA signed with the allowed name."""
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "front-proxy-ca.key", cwd=pki)
    openssl("req", "-x509", "-new", "-key", "front-proxy-ca.key", "-out", "front-proxy-ca.crt", "-days", "3650",
            "-subj", "/CN=shipyard-front-proxy-ca", cwd=pki)
    name = FRONT_PROXY_CLIENT
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=pki)
    openssl("req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=pki)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "front-proxy-ca.crt", "-CAkey", "front-proxy-ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "3650", "-extfile", "client.ext", cwd=pki)


def aggregation_flags(pki: Path) -> list[str]:
    """kube-apiserver flags of the aggregation layer (pure): the request-header authentication an aggregated API
    server reads back from the kube-system/extension-apiserver-authentication ConfigMap, and the client certificate
    the aggregator proxies with. An APIService's backend is reached through its Service: this cluster routes no
    ClusterIP, so a server on the host is named by an ExternalName Service (see hack/keda.py)."""
    return [
        f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
        f"--requestheader-allowed-names={FRONT_PROXY_CLIENT}",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-username-headers=X-Remote-User",
        f"--proxy-client-cert-file={pki / f'{FRONT_PROXY_CLIENT}.crt'}",
        f"--proxy-client-key-file={pki / f'{FRONT_PROXY_CLIENT}.key'}",
    ]


def build_client_cert(pki: Path, user: str, group: str = "system:masters") -> None:
    """A client certificate for `user` (in `group`), signed by the cluster CA: a distinct identity whose requests
    the audit log can tell apart (benchmarks count one client's API calls)."""
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{user}.key", cwd=pki)
    openssl("req", "-new", "-key", f"{user}.key", "-out", f"{user}.csr", "-subj", f"/O={group}/CN={user}", cwd=pki)
    openssl("x509", "-req", "-in", f"{user}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{user}.crt", "-days", "3650", "-extfile", "client.ext", cwd=pki)


def write_kubeconfig(path: Path, pki: Path, port: int, user: str = "admin") -> None:
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters:
- name: shipyard-local
  cluster:
    server: https://127.0.0.1:{port}
    certificate-authority: {pki / 'ca.crt'}
users:
- name: shipyard-admin
  user:
    client-certificate: {pki / f'{user}.crt'}
    client-key: {pki / f'{user}.key'}
contexts:
- name: shipyard-local
  context: {{cluster: shipyard-local, user: shipyard-admin}}
current-context: shipyard-local
"""
    )


def spawn(state: State, name: str, argv: list[str]) -> None:
    logs = state.path / "logs"
    logs.mkdir(exist_ok=True)
    state.pids[name] = proc.spawn(argv, logs / f"{name}.log").pid
    state.argv[name] = list(argv)
    state.save()


def wait_for(what: str, check: object, timeout: float, state: State, name: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive(state.pids[name]):
            tail = (state.path / "logs" / f"{name}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{name} exited while starting:\n{tail}")
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} was not ready within {timeout:.0f} s (see {state.path / 'logs' / name}.log)")


def https_ok(port: int, pki: Path, path: str) -> bool:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=ctx, timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


def kubectl(state: State, *args: str, input: str | None = None, check: bool = True) -> str:
    out = subprocess.run(["kubectl", f"--kubeconfig={state.kubeconfig}", *args], input=input,
                         capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def build_node(name: str, cpu: str, memory: str, gpus: int, pods: int = 110) -> dict[str, object]:
    capacity: dict[str, str] = {"cpu": cpu, "memory": memory, "pods": str(pods)}
    if gpus:
        capacity["nvidia.com/gpu"] = str(gpus)
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
        "node.kubernetes.io/instance-type": "gpu-8x" if gpus else "cpu",
    }
    if gpus:
        labels["nvidia.com/gpu.present"] = "true"
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "annotations": {NODE_ANNOTATION: "fake"}, "labels": labels},
        "spec": {},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


DEFAULT_NODES = (
    build_node("kwok-cpu-0", cpu="32", memory="128Gi", gpus=0),
    build_node("kwok-gpu-0", cpu="64", memory="512Gi", gpus=8),
)


def write_audit_policy(path: Path, users: tuple[str, ...]) -> None:
    """Metadata-level audit of every request made by `users`, nothing else (small logs, exact request counts)."""
    names = ", ".join(json.dumps(u) for u in users)
    path.write_text(f"""apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  users: [{names}]
- level: None
""")


def up(state_dir: Path, nodes: tuple[dict[str, object], ...] = DEFAULT_NODES,
       audit_users: tuple[str, ...] = ()) -> State:
    """Starts the control plane. With `audit_users`, each gets a client certificate and kubeconfig
    (`<state>/kubeconfig-<user>`) and their requests are written to `<state>/audit.log`."""
    existing = State.load(state_dir)
    if existing and all(proc.alive(p) for p in existing.pids.values()) and existing.pids:
        log(f"Found a running cluster in {state_dir}")
        use_pinned_kubectl()
        return existing
    if existing:
        down(state_dir)
    bins = build_binaries()
    use_pinned_kubectl()
    stages = [kwok_module_dir() / s for s in KWOK_STAGES]
    started = time.monotonic()
    state_dir.mkdir(parents=True, exist_ok=True)
    state = State(dir=str(state_dir), started_at=time.time())
    pki = state.path / "pki"
    build_pki(pki)
    for user in audit_users:
        build_client_cert(pki, user)
    audit_flags: list[str] = []
    if audit_users:
        write_audit_policy(state.path / "audit-policy.yaml", audit_users)
        audit_flags = [f"--audit-policy-file={state.path / 'audit-policy.yaml'}",
                       f"--audit-log-path={state.path / 'audit.log'}", "--audit-log-format=json",
                       "--audit-log-mode=batch", "--audit-log-batch-max-wait=1s", "--audit-log-maxsize=0"]
    names = ("etcd-client", "etcd-peer", "apiserver", "kcm", "scheduler", "kwok")
    ports: dict[str, int] = {}
    while len(set(ports.values())) != len(names):
        ports = {n: free_port() for n in names}
    state.ports = ports
    state.save()
    try:
        etcd_data = state.path / "etcd"
        spawn(state, "etcd", [
            str(bins["etcd"]), "--name=shipyard", f"--data-dir={etcd_data}",
            f"--listen-client-urls=http://127.0.0.1:{ports['etcd-client']}",
            f"--advertise-client-urls=http://127.0.0.1:{ports['etcd-client']}",
            f"--listen-peer-urls=http://127.0.0.1:{ports['etcd-peer']}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{ports['etcd-peer']}",
            f"--initial-cluster=shipyard=http://127.0.0.1:{ports['etcd-peer']}",
            "--unsafe-no-fsync=true", "--quota-backend-bytes=4294967296", "--log-level=warn",
        ])
        wait_for("etcd", lambda: port_open(ports["etcd-client"]), 30, state, "etcd")
        spawn(state, "kube-apiserver", [
            str(bins["kube-apiserver"]),
            f"--etcd-servers=http://127.0.0.1:{ports['etcd-client']}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={ports['apiserver']}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC", "--allow-privileged=true",
            "--max-requests-inflight=0", "--max-mutating-requests-inflight=0",
            "--enable-priority-and-fairness=false",
            "--endpoint-reconciler-type=none",
            *aggregation_flags(pki),
            "--v=1",
            *audit_flags,
        ])
        wait_for("kube-apiserver", lambda: https_ok(ports["apiserver"], pki, "/readyz"), 90, state,
                 "kube-apiserver")
        write_kubeconfig(state.kubeconfig, pki, ports["apiserver"])
        for user in audit_users:
            write_kubeconfig(state.path / f"kubeconfig-{user}", pki, ports["apiserver"], user=user)
        kc = str(state.kubeconfig)
        spawn(state, "kube-controller-manager", [
            str(bins["kube-controller-manager"]), f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1", f"--secure-port={ports['kcm']}", "--leader-elect=false",
            f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
            "--use-service-account-credentials=false",
            "--concurrent-deployment-syncs=10", "--concurrent-replicaset-syncs=10",
            "--kube-api-qps=500", "--kube-api-burst=1000", "--v=1",
        ])
        spawn(state, "kube-scheduler", [
            str(bins["kube-scheduler"]), f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1", f"--secure-port={ports['scheduler']}", "--leader-elect=false",
            "--kube-api-qps=500", "--kube-api-burst=1000", "--v=1",
        ])
        spawn(state, "kwok", [
            str(bins["kwok"]), f"--kubeconfig={kc}", "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={NODE_ANNOTATION}=fake",
            f"--server-address=127.0.0.1:{ports['kwok']}", "--node-lease-duration-seconds=40",
            # Fake pods and nodes get loopback addresses: anything that tries to reach them (the operator's
            # direct scrape) is refused on this machine instead of sending traffic to a private range.
            f"--cidr={FAKE_POD_CIDR}", f"--node-ip={FAKE_NODE_IP}",
            *[f"--config={s}" for s in [*stages, *sorted((HACK / "kwok").glob("*.yaml"))]],
        ])
        for node in nodes:
            kubectl(state, "apply", "--server-side", "--field-manager=shipyard-cluster", "-f", "-",
                    input=json.dumps(node))
        # The default ServiceAccount is created by the controller-manager; pods need it.
        wait_for("the default service account", lambda: kubectl(
            state, "get", "serviceaccount", "default", "-n", "default", check=False) != "", 60, state,
                 "kube-controller-manager")
        wait_for("the fake nodes", lambda: _nodes_ready(state, nodes), 60, state, "kwok")
    except BaseException:
        log(f"Start failed; logs are in {state.path / 'logs'}")
        stop_processes(state)
        raise
    log(f"Started the control plane in {time.monotonic() - started:.1f} s "
        f"(apiserver https://127.0.0.1:{ports['apiserver']})")
    return state


def _nodes_ready(state: State, nodes: tuple[dict[str, object], ...]) -> bool:
    template = "{range .items[*]}{.metadata.name}={.status.conditions[?(@.type=='Ready')].status}{'\\n'}{end}"
    out = kubectl(state, "get", "nodes", "-o", f"jsonpath={template}", check=False)
    ready = {line.split("=")[0] for line in out.splitlines() if line.endswith("=True")}
    return all(n["metadata"]["name"] in ready for n in nodes)  # type: ignore[index]


STOP_ORDER = ("kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd")


def stop_processes(state: State, timeout: float = 10.0) -> None:
    """Stops the components in STOP_ORDER (proc.stop: SIGTERM, SIGKILL after `timeout`, each waited for until it is
    gone and, when this process started it, reaped)."""
    order = [n for n in STOP_ORDER if n in state.pids] + [n for n in state.pids if n not in STOP_ORDER]
    for name in order:
        proc.stop(state.pids[name], timeout)
    state.pids = {}


COMPONENTS = tuple(reversed(STOP_ORDER))  # start order


def _ready_check(state: State, name: str) -> object:
    """What says a started component serves again (a port, or the apiserver's /readyz); None: nothing to wait on."""
    if name == "etcd":
        return lambda: port_open(state.ports["etcd-client"])
    if name == "kube-apiserver":
        return lambda: https_ok(state.ports["apiserver"], state.path / "pki", "/readyz")
    return None


def stop_components(state_dir: Path, names: tuple[str, ...], timeout: float = 10.0) -> State:
    """Stops some components of a running cluster (SIGTERM, then SIGKILL after `timeout`), keeping their data
    (etcd's data directory), ports, certificates and command lines, so that start_components brings them back."""
    state = State.load(state_dir)
    if state is None:
        raise RuntimeError(f"no cluster in {state_dir}")
    unknown = [n for n in names if n not in state.argv]
    if unknown:
        raise ValueError(f"unknown component(s) {', '.join(unknown)} (known: {', '.join(state.argv) or 'none'}; "
                         "a cluster started before components were restartable has no command lines: down, up)")
    stopping = State(dir=state.dir, ports=state.ports, pids={n: state.pids[n] for n in names if n in state.pids})
    stop_processes(stopping, timeout)
    for name in names:
        state.pids.pop(name, None)
    state.save()
    log(f"Stopped {', '.join(names)}")
    return state


def start_components(state_dir: Path, names: tuple[str, ...], timeout: float = 90.0) -> State:
    """Starts stopped components again with their recorded command lines, in dependency order (etcd before the
    apiserver), each waited for until it serves; components still running are left alone."""
    state = State.load(state_dir)
    if state is None:
        raise RuntimeError(f"no cluster in {state_dir}")
    started = time.monotonic()
    for name in sorted(names, key=lambda n: COMPONENTS.index(n) if n in COMPONENTS else len(COMPONENTS)):
        if name not in state.argv:
            raise ValueError(f"unknown component {name!r} (known: {', '.join(state.argv)})")
        if name in state.pids and proc.alive(state.pids[name]):
            continue
        spawn(state, name, state.argv[name])
        check = _ready_check(state, name)
        if check is not None:
            wait_for(name, check, timeout, state, name)
    log(f"Started {', '.join(names)} in {time.monotonic() - started:.1f} s")
    return state


def restart_components(state_dir: Path, names: tuple[str, ...] = ("etcd", "kube-apiserver"),
                       stop_timeout: float = 10.0) -> State:
    """stop_components then start_components: e.g. etcd and the apiserver, as a control-plane upgrade does.
    (The apiserver's graceful termination takes about 10 s here; a shorter `stop_timeout` SIGKILLs it sooner.)"""
    stop_components(state_dir, names, stop_timeout)
    return start_components(state_dir, names)


def down(state_dir: Path, keep: bool = False) -> None:
    state = State.load(state_dir)
    if state is None:
        log(f"No cluster state in {state_dir}")
        return
    stop_processes(state)
    if keep:
        state.save()
    else:
        shutil.rmtree(state_dir, ignore_errors=True)
    log("Stopped the control plane")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "env", "status", "build", "stop", "start", "restart"])
    parser.add_argument("components", nargs="*", metavar="component",
                        help=f"stop/start/restart: which components ({', '.join(COMPONENTS)}); "
                             "restart defaults to etcd and kube-apiserver")
    parser.add_argument("--dir", type=Path, default=default_state_dir(), help="state directory")
    parser.add_argument("--keep", action="store_true", help="down: keep logs and state")
    args = parser.parse_args(argv)
    state_dir: Path = args.dir.resolve()
    if args.command == "build":
        for name, path in build_binaries().items():
            print(f"{name}\t{path}")
        return 0
    if args.command == "up":
        print_exports(up(state_dir))
        return 0
    if args.command == "down":
        down(state_dir, keep=args.keep)
        return 0
    if args.command in ("stop", "start", "restart"):
        components = tuple(args.components) or (("etcd", "kube-apiserver") if args.command == "restart" else ())
        if not components or set(components) - set(COMPONENTS):
            parser.error(f"{args.command}: name the components ({', '.join(COMPONENTS)})")
        {"stop": stop_components, "start": start_components, "restart": restart_components}[args.command](
            state_dir, components)
        return 0
    state = State.load(state_dir)
    if state is None:
        print(f"no cluster in {state_dir}", file=sys.stderr)
        return 1
    if args.command == "env":
        print_exports(state)
        return 0
    for name, pid in state.pids.items():
        print(f"{name}\tpid {pid}\t{'running' if proc.alive(pid) else 'stopped'}")
    return 0 if state.pids and all(proc.alive(p) for p in state.pids.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
