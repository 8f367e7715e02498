"""The Gateway API data plane of the local stack (hack/gateway.py: the pinned CRDs and Traefik), checked on a control
plane of its own with real backends: HTTPRoute weights split real traffic, a header match wins over the plain rule,
a weight change moves traffic (the delay is measured), route status is written as the operator will read it, a
backend without endpoints or with weight 0 behaves as recorded in docs/e2e.md, and a GRPCRoute carries gRPC.

Backends: the API server refuses loopback addresses in EndpointSlices, so the backends are small HTTP (and one
gRPC) servers inside a network namespace of this module's own, reached from the host over a veth pair in a private
/24 (10.214.<n>.0/24: no default route, nothing leaves the machine), behind selectorless Services with hand-written
EndpointSlices. The test reaches the gateway only on its loopback port. Teardown stops Traefik and the backends and
removes the namespace and the veth, even on failure, and checks that none is left. Figures are printed (``-s``).
"""

from __future__ import annotations

import collections
import http.client
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import stack
from tests.integration.conftest import Cluster, wait_until

pytestmark = [pytest.mark.harness, pytest.mark.timeout(900)]

NAMESPACE = "canary"
HEADER = "x-shipyard-version"
BACKEND_PORT = 8080
GRPC_PORT = 9090
SIGMAS = 4

HTTP_BACKEND = """
import http.server, sys
name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: Nagle + delayed ACK would add 40 ms each
    def do_GET(self):
        body = name.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
Server((host, port), Handler).serve_forever()
"""

GRPC_BACKEND = """
import sys
from concurrent import futures
import grpc
name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
handler = grpc.method_handlers_generic_handler(
    "shipyard.test.Who", {"Name": grpc.unary_unary_rpc_method_handler(lambda request, context: name.encode())})
server = grpc.server(futures.ThreadPoolExecutor(4))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port(f"{host}:{port}")
server.start()
server.wait_for_termination()
"""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)} failed: {out.stderr.strip()}")
    return out


class Netns:
    """A network namespace of this test's own with a veth pair to the host: the host side 10.214.<n>.1/24, the
    namespace side holding the backends' addresses. `close` stops the processes started in it, deletes the
    namespace and the host's veth end (deleting a namespace whose processes still run leaves the veth behind)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.subnet = self.pick_subnet()
        self.name = f"shipyard-gw-{os.getpid()}-{self.subnet}"
        self.host_if, self.ns_if = f"sygw{self.subnet}h", f"sygw{self.subnet}n"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.addresses: list[str] = []

    @staticmethod
    def pick_subnet() -> int:
        used = ip("-4", "addr").stdout + ip("-4", "route").stdout + ip("link").stdout
        for i in range(200):
            n = (os.getpid() + i) % 200 + 20
            if f"10.214.{n}." not in used and f"sygw{n}h" not in used:
                return n
        raise AssertionError("no free 10.214.<n>.0/24 on this machine")

    def address(self, host: int) -> str:
        return f"10.214.{self.subnet}.{host}"

    def create(self, hosts: tuple[int, ...]) -> None:
        ip("netns", "add", self.name)
        ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if, "netns", self.name)
        ip("addr", "add", f"{self.address(1)}/24", "dev", self.host_if)
        ip("link", "set", self.host_if, "up")
        for host in hosts:
            ip("-n", self.name, "addr", "add", f"{self.address(host)}/24", "dev", self.ns_if)
            self.addresses.append(self.address(host))
        ip("-n", self.name, "link", "set", self.ns_if, "up")
        ip("-n", self.name, "link", "set", "lo", "up")

    def spawn(self, script: str, *args: str) -> None:
        path = self.workdir / f"backend-{len(self.processes)}.py"
        path.write_text(script)
        log = self.workdir / f"backend-{len(self.processes)}.log"
        self.processes.append(stack.proc.spawn(["ip", "netns", "exec", self.name, sys.executable, str(path), *args],
                                               log))

    def close(self) -> list[str]:
        """Stops everything, returns what is left (empty when clean)."""
        for process in self.processes:
            stack.proc.stop(process, 5)
        ip("netns", "del", self.name, check=False)
        ip("link", "del", self.host_if, check=False)
        left = [f"process {p.pid}" for p in self.processes if stack.proc.alive(p.pid)]
        if self.name in ip("netns", "list").stdout:
            left.append(f"netns {self.name}")
        if ip("link", "show", self.host_if, check=False).returncode == 0:
            left.append(f"link {self.host_if}")
        return left


def tcp_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


@dataclass
class Env:
    cluster: Cluster
    gateway: Any  # hack/gateway.py's Gateway
    netns: Netns
    figures: dict[str, Any] = field(default_factory=dict)


def build_service(name: str, port_name: str = "http", app_protocol: str | None = None) -> dict[str, Any]:
    port: dict[str, Any] = {"name": port_name, "port": 80, "targetPort": BACKEND_PORT, "protocol": "TCP"}
    if app_protocol:
        port["appProtocol"] = app_protocol
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"ports": [port]}}  # no selector: the EndpointSlice below is the only source of endpoints


def build_endpoint_slice(service: str, address: str, port: int, ready: bool = True,
                         port_name: str = "http") -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service}-1", "namespace": NAMESPACE,
                         "labels": {"kubernetes.io/service-name": service,
                                    "endpointslice.kubernetes.io/managed-by": "shipyard-tests"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [address], "conditions": {"ready": ready}}],
            "ports": [{"name": port_name, "port": port, "protocol": "TCP"}]}


def build_route(name: str, parent: dict[str, Any], weights: dict[str, int],
                header_rule: str | None = None) -> dict[str, Any]:
    """An HTTPRoute over PathPrefix / with `weights` ({service: weight}); with `header_rule`, a second rule (listed
    after the plain one: it must win by specificity, not order) sending ``x-shipyard-version: <it>`` to that
    service alone."""
    refs = [{"name": svc, "port": 80, "weight": w} for svc, w in weights.items()]
    rules: list[dict[str, Any]] = [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}], "backendRefs": refs}]
    if header_rule:
        rules.append({"matches": [{"path": {"type": "PathPrefix", "value": "/"},
                                   "headers": [{"name": HEADER, "value": header_rule}]}],
                      "backendRefs": [{"name": header_rule, "port": 80}]})
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"parentRefs": [parent], "rules": rules}}


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("network namespaces need root and iproute2 (apt-get install -y iproute2)")
    gateway_mod = stack.load_hack_module("gateway")
    cluster_mod = stack.load_hack_module("cluster")
    base = Path(tempfile.mkdtemp(prefix="shipyard-gateway-"))
    figures: dict[str, Any] = {}
    netns = Netns(base)
    ok = False
    left: list[str] = []
    gateway = None
    try:
        mark = time.monotonic()
        state = cluster_mod.up(base / "cluster")
        figures["cluster_up_s"] = time.monotonic() - mark
        netns.create((2, 3))  # .2: backend a (and the gRPC backend), .3: backend b
        a, b = netns.addresses
        netns.spawn(HTTP_BACKEND, "a", a, str(BACKEND_PORT))
        netns.spawn(HTTP_BACKEND, "b", b, str(BACKEND_PORT))
        netns.spawn(GRPC_BACKEND, "grpc-a", a, str(GRPC_PORT))
        wait_until(lambda: all(tcp_open(h, p) for h, p in ((a, BACKEND_PORT), (b, BACKEND_PORT), (a, GRPC_PORT))),
                   30, message="the backends listening in the network namespace")
        cluster = Cluster(kubeconfig=str(state.kubeconfig))
        gateway = gateway_mod.start(base / "gateway", state.kubeconfig)
        figures.update({f"gateway_{k}_s": v for k, v in gateway.timings.items()})
        cluster.kubectl("create", "namespace", NAMESPACE)
        for svc, address in (("a", a), ("b", b)):
            cluster.apply(build_service(svc))
            cluster.apply(build_endpoint_slice(svc, address, BACKEND_PORT))
        yield Env(cluster=cluster, gateway=gateway, netns=netns, figures=figures)
        ok = True
    finally:
        gateway_mod.stop(base / "gateway")
        pid = gateway.pid if gateway is not None else None
        cluster_mod.down(base / "cluster")
        left = netns.close()
        if pid is not None and stack.proc.alive(pid):
            left.append(f"traefik {pid}")
        print(f"\n[gateway] figures: {json.dumps(figures, default=str)}")
        if ok and not left:
            shutil.rmtree(base, ignore_errors=True)
    assert not left, f"left behind after teardown: {left} (logs in {base})"


class Client:
    """Requests through the gateway's loopback port on one keep-alive connection (reopened after an error)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def get(self, headers: dict[str, str] | None = None) -> tuple[int, str]:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                self.conn.request("GET", "/", headers=headers or {})
                response = self.conn.getresponse()
                body = response.read().decode(errors="replace")
                return response.status, body if response.status == 200 else str(response.status)
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def count(self, n: int, headers: dict[str, str] | None = None) -> collections.Counter[str]:
        return collections.Counter(self.get(headers)[1] for _ in range(n))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def admin_json(env: Env, path: str) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", env.gateway.admin_port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return json.loads(response.read()) if response.status == 200 else None
    finally:
        conn.close()


def backend_name(traefik_service: str) -> str:
    """The Service of a Traefik service name (``canary-a-http-80@kubernetesgateway`` -> ``a``)."""
    return traefik_service.split("@")[0].removeprefix(f"{NAMESPACE}-").rsplit("-http", 1)[0]


def applied_weights(env: Env, route: str) -> list[dict[str, int]]:
    """The weights of each rule of the route as Traefik runs them now (the runtime configuration its API shows), by
    backend Service name."""
    found = []
    for svc in admin_json(env, "/api/http/services?per_page=1000") or []:
        if svc.get("provider") == "kubernetesgateway" and svc.get("weighted") \
                and svc["name"].startswith(f"httproute-{NAMESPACE}-{route}-"):
            found.append({backend_name(s["name"]): s.get("weight", 1) for s in svc["weighted"]["services"]})
    return found


def apply_route(env: Env, route: dict[str, Any]) -> None:
    """Applies the route and waits until Traefik runs its first rule's weights."""
    env.cluster.apply(route)
    weights = {r["name"]: r["weight"] for r in route["spec"]["rules"][0]["backendRefs"]}
    wait_until(lambda: weights in applied_weights(env, route["metadata"]["name"]), 30,
               message=f"Traefik running route {route['metadata']['name']} with weights {weights}")


def route_parent_conditions(env: Env, kind: str, name: str) -> tuple[int, dict[str, dict[str, Any]]]:
    route = env.cluster.get(kind, name, NAMESPACE)
    assert route is not None
    parents = (route.get("status") or {}).get("parents") or []
    conditions = {c["type"]: c for p in parents for c in p.get("conditions") or []}
    return int(route["metadata"]["generation"]), conditions


def binomial_bound(n: int, p: float) -> float:
    return SIGMAS * math.sqrt(n * p * (1 - p))


def test_gateway_is_programmed_and_listens_on_loopback_only(env: Env) -> None:
    gw = env.cluster.get("gateway", env.gateway.name, env.gateway.namespace)
    assert gw is not None
    conditions = {c["type"]: c for c in gw["status"]["conditions"]}
    assert conditions["Accepted"]["status"] == conditions["Programmed"]["status"] == "True", conditions
    assert [a["value"] for a in gw["status"]["addresses"]] == ["127.0.0.1"]
    [listener] = gw["status"]["listeners"]
    assert listener["name"] == "http"
    assert {c["type"]: c["status"] for c in listener["conditions"]}["Programmed"] == "True"
    gc = env.cluster.get("gatewayclass", env.gateway.gateway_class)
    assert gc is not None and {c["type"]: c["status"] for c in gc["status"]["conditions"]}["Accepted"] == "True"

    out = subprocess.run(["ss", "-Htlnup"], capture_output=True, text=True, check=True).stdout
    bound = [line.split()[4] for line in out.splitlines() if f"pid={env.gateway.pid}," in line]
    assert sorted(bound) == sorted([f"127.0.0.1:{env.gateway.port}", f"127.0.0.1:{env.gateway.admin_port}"]), out

    conn = http.client.HTTPConnection("127.0.0.1", env.gateway.admin_port, timeout=5)
    conn.request("GET", "/ping")
    assert conn.getresponse().read() == b"OK"
    conn.request("GET", "/metrics")
    metrics = conn.getresponse().read().decode()
    conn.close()
    assert "# TYPE traefik_config_reloads_total counter" in metrics
    assert admin_json(env, "/api/version")["Version"] == "v3.6.12"


@pytest.mark.parametrize("weights", [(95, 5), (50, 50)], ids=["95-5", "50-50"])
def test_weights_split_real_traffic_within_a_binomial_bound(env: Env, weights: tuple[int, int]) -> None:
    name = f"split-{weights[0]}"
    apply_route(env, build_route(name, env.gateway.parent_ref, {"a": weights[0], "b": weights[1]}))
    client = Client(env.gateway.port)
    n = 2000
    try:
        counts = client.count(n)
    finally:
        client.close()
        env.cluster.kubectl("delete", "httproute", name, "-n", NAMESPACE)
    p = weights[1] / sum(weights)
    env.figures[f"split_{weights[0]}_{weights[1]}"] = dict(counts)
    assert set(counts) == {"a", "b"}, counts
    assert abs(counts["b"] - n * p) <= binomial_bound(n, p), (counts, n * p, binomial_bound(n, p))


def test_header_match_rule_wins_over_the_plain_rule(env: Env) -> None:
    apply_route(env, build_route("header", env.gateway.parent_ref, {"a": 50, "b": 50}, header_rule="b"))
    client = Client(env.gateway.port)
    try:
        matched = client.count(500, {HEADER: "b"})
        other = client.count(500, {HEADER: "a"})
        plain = client.count(500)
    finally:
        client.close()
        env.cluster.kubectl("delete", "httproute", "header", "-n", NAMESPACE)
    env.figures["header_match"] = {"b": dict(matched), "a": dict(other), "none": dict(plain)}

    def routed() -> list[dict[str, Any]]:  # the access log: one JSON line per request, written after the response
        logged = [json.loads(line) for line in Path(env.gateway.access_log).read_text().splitlines()]
        return [e for e in logged if f"httproute-{NAMESPACE}-header-" in e.get("RouterName", "")]

    entries = wait_until(lambda: len(routed()) >= 1500 and routed(), 10, message="1,500 lines in the access log")
    assert {e["DownstreamStatus"] for e in entries} == {200}, entries[-3:]
    assert {e["entryPointName"] for e in entries} == {"web"}
    assert matched == {"b": 500}
    assert set(other) == set(plain) == {"a", "b"}, (other, plain)


class Prober(threading.Thread):
    """Requests through the gateway as fast as one connection allows, recording (monotonic time, answer)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.client = Client(port)
        self.samples: list[tuple[float, str]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.monotonic(), self.client.get()[1]))
        self.client.close()

    def since(self, t: float) -> list[tuple[float, str]]:
        return [s for s in self.samples if s[0] >= t]


def shift_weights(env: Env, prober: Prober, route: dict[str, Any], new: str, old: str) -> dict[str, float]:
    """Moves all weight from `old` to `new` and measures, from the change (kubectl apply returned): the route's
    status carrying the new generation in every condition, the first request on `new`, the last on `old`."""
    route["spec"]["rules"][0]["backendRefs"] = [{"name": new, "port": 80, "weight": 100},
                                                {"name": old, "port": 80, "weight": 0}]
    env.cluster.apply(route)
    changed = time.monotonic()
    obj = env.cluster.get("httproute", route["metadata"]["name"], NAMESPACE)
    assert obj is not None
    generation = int(obj["metadata"]["generation"])

    def status_current() -> bool:
        gen, conditions = route_parent_conditions(env, "httproute", route["metadata"]["name"])
        return gen == generation and all(c["observedGeneration"] == generation for c in conditions.values())

    wait_until(status_current, 30, interval=0.05, message=f"route status at generation {generation}")
    status_s = time.monotonic() - changed
    wait_until(lambda: sum(1 for _, ans in prober.since(changed) if ans == new) >= 300, 30, interval=0.05,
               message=f"traffic on {new}")
    time.sleep(3)  # settled, and past the providers throttle before the next change
    after = prober.since(changed)
    last_old = max((t for t, ans in after if ans == old), default=changed)
    first_new = min(t for t, ans in after if ans == new)
    tail = [ans for t, ans in after if t > last_old]
    assert set(tail) == {new}, collections.Counter(tail)
    return {"status_s": status_s, "first_new_s": first_new - changed, "last_old_s": last_old - changed,
            "rate_per_s": len(after) / (after[-1][0] - after[0][0])}


def test_weight_change_moves_traffic_and_route_status_follows(env: Env) -> None:
    """Alternating 100/0 <-> 0/100 shifts, each after the previous has settled (> Traefik's 2 s providers
    throttle); weight 0 gets not one request."""
    route = build_route("shift", env.gateway.parent_ref, {"a": 100, "b": 0})
    apply_route(env, route)
    prober = Prober(env.gateway.port)
    prober.start()
    shifts = []
    try:
        wait_until(lambda: len(prober.samples) > 200, 30, message="the prober running")
        assert {answer for _, answer in prober.samples[-100:]} == {"a"}
        for i in range(6):
            shifts.append(shift_weights(env, prober, route, *(("b", "a") if i % 2 == 0 else ("a", "b"))))
        final = prober.since(time.monotonic() - 2)
        assert {ans for _, ans in final} == {"a"} and len(final) > 100
    finally:
        prober.done.set()
        prober.join(10)
        env.cluster.kubectl("delete", "httproute", "shift", "-n", NAMESPACE)
        for key in shifts[0] if shifts else ():
            env.figures[f"shift_{key}"] = [round(s[key], 3) for s in shifts]
    assert max(s["last_old_s"] for s in shifts) < 10, shifts


def test_route_status_conditions(env: Env) -> None:
    route = build_route("status", env.gateway.parent_ref, {"a": 1, "b": 1})
    apply_route(env, route)
    generation, conditions = route_parent_conditions(env, "httproute", "status")
    try:
        obj = env.cluster.get("httproute", "status", NAMESPACE)
        assert obj is not None
        [parent] = obj["status"]["parents"]
        assert parent["controllerName"] == "traefik.io/gateway-controller"
        assert parent["parentRef"]["name"] == env.gateway.name
        assert {t: (c["status"], c["reason"], c["observedGeneration"]) for t, c in conditions.items()} == {
            "Accepted": ("True", "Accepted", generation), "ResolvedRefs": ("True", "ResolvedRefs", generation)}
    finally:
        env.cluster.kubectl("delete", "httproute", "status", "-n", NAMESPACE)


@pytest.mark.parametrize("backend,endpoints", [("empty", "none"), ("unready", "unready"), ("zero", "zero")],
                         ids=["no-endpointslice", "no-ready-endpoint", "endpointslice-without-endpoints"])
def test_backend_without_endpoints(env: Env, backend: str, endpoints: str) -> None:
    """A backend Service with no EndpointSlice, one whose only endpoint is not ready, or a slice with no endpoint
    (what the EndpointSlice controller writes for a selector matching no pod): what its share of the traffic gets,
    what the route's status says, and whether weight 0 on it leaves the other backend whole."""
    env.cluster.apply(build_service(backend))
    if endpoints != "none":
        slice_ = build_endpoint_slice(backend, env.netns.address(9), BACKEND_PORT, ready=False)
        if endpoints == "zero":
            slice_["endpoints"] = []
        env.cluster.apply(slice_)
    name = f"without-{backend}"
    client = Client(env.gateway.port)
    found: dict[str, Any] = {}
    try:
        for weights in ({"a": 50, backend: 50}, {"a": 100, backend: 0}):
            apply_route(env, build_route(name, env.gateway.parent_ref, weights))
            generation, conditions = route_parent_conditions(env, "httproute", name)
            counts = client.count(400)
            key = f"{weights['a']}-{weights[backend]}"
            found[key] = {"answers": dict(counts), "ResolvedRefs": (conditions["ResolvedRefs"]["status"],
                                                                    conditions["ResolvedRefs"]["reason"]),
                          "Accepted": conditions["Accepted"]["status"]}
    finally:
        client.close()
        env.cluster.kubectl("delete", "httproute", name, "-n", NAMESPACE)
    env.figures[f"without_endpoints_{endpoints}"] = found
    # weight 0 on the backend without endpoints: every request on a
    assert found["100-0"]["answers"] == {"a": 400}, found
    # weight 50: its share fails, the other half reaches a
    assert found["50-50"]["answers"].get("a", 0) == 200 and sum(found["50-50"]["answers"].values()) == 400, found
    assert found["50-50"]["Accepted"] == "True", found
    if endpoints == "none":  # no EndpointSlice: ResolvedRefs False whatever the weight; Traefik answers 500
        assert found["50-50"]["answers"] == {"a": 200, "500": 200}, found
        assert found["50-50"]["ResolvedRefs"] == found["100-0"]["ResolvedRefs"] == ("False", "BackendNotFound")
    else:  # a slice, but no ready endpoint: refs resolved, a load balancer with no server answers 503
        assert found["50-50"]["answers"] == {"a": 200, "503": 200}, found
        assert found["50-50"]["ResolvedRefs"] == found["100-0"]["ResolvedRefs"] == ("True", "ResolvedRefs")


def test_grpcroute_carries_grpc(env: Env) -> None:
    import grpc

    env.cluster.apply(build_service("grpc-a", port_name="grpc", app_protocol="kubernetes.io/h2c"))
    env.cluster.apply(build_endpoint_slice("grpc-a", env.netns.addresses[0], GRPC_PORT, port_name="grpc"))
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
             "metadata": {"name": "grpc", "namespace": NAMESPACE},
             "spec": {"parentRefs": [env.gateway.parent_ref],
                      "rules": [{"matches": [{"method": {"service": "shipyard.test.Who"}}],
                                 "backendRefs": [{"name": "grpc-a", "port": 80}]}]}}
    env.cluster.apply(route)
    channel = grpc.insecure_channel(f"127.0.0.1:{env.gateway.port}", options=[("grpc.enable_http_proxy", 0)])
    call = channel.unary_unary("/shipyard.test.Who/Name")

    def answered() -> bytes | None:
        try:
            return call(b"", timeout=2)  # type: ignore[no-any-return]
        except grpc.RpcError:
            return None

    try:
        mark = time.monotonic()
        assert wait_until(answered, 30, message="a gRPC answer through the GRPCRoute") == b"grpc-a"
        env.figures["grpcroute_first_answer_s"] = round(time.monotonic() - mark, 3)
        assert all(call(b"", timeout=2) == b"grpc-a" for _ in range(50))
        generation, conditions = route_parent_conditions(env, "grpcroute", "grpc")
        assert {t: (c["status"], c["observedGeneration"]) for t, c in conditions.items()} == {
            "Accepted": ("True", generation), "ResolvedRefs": ("True", generation)}
    finally:
        channel.close()
        env.cluster.kubectl("delete", "grpcroute", "grpc", "-n", NAMESPACE)
