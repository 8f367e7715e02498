"""hack/gateway.py's pure parts: Traefik's command line (every listener on 127.0.0.1, nothing that calls out),
its environment (KUBECONFIG wins: no in-cluster variable, no TRAEFIK_* read as static configuration), the GatewayClass
and Gateway it programs, and the recorded Gateway's round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.modules import load_file

GW = load_file("shipyard_hack_gateway_unit", Path(__file__).parents[2] / "hack" / "gateway.py")


def flags(argv: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in argv[1:])


def test_every_listener_is_on_loopback_and_nothing_calls_out(tmp_path: Path) -> None:
    argv = GW.build_argv(Path("/bin/traefik"), 8000, 8001, tmp_path)
    assert argv[0] == "/bin/traefik"
    f = flags(argv)
    addresses = {k: v for k, v in f.items() if k.lower().endswith(".address")}
    assert addresses == {"entryPoints.web.address": "127.0.0.1:8000", "entryPoints.traefik.address": "127.0.0.1:8001"}
    assert f["global.checkNewVersion"] == f["global.sendAnonymousUsage"] == "false"
    assert f["ping.entryPoint"] == f["metrics.prometheus.entryPoint"] == "traefik"
    assert f["api.insecure"] == "true" and f["api.dashboard"] == "false"
    assert f["providers.kubernetesgateway"] == "true"
    assert f["providers.kubernetesgateway.statusAddress.ip"] == "127.0.0.1"
    assert f["accessLog.filePath"] == str(tmp_path / "access.log") and f["accessLog.format"] == "json"


def test_env_points_at_the_kubeconfig_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setenv("TRAEFIK_ENTRYPOINTS_WEB_ADDRESS", ":80")
    env = GW.build_env(Path("/k/kubeconfig"))
    assert env["KUBECONFIG"] == "/k/kubeconfig"
    assert not {"KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "TRAEFIK_ENTRYPOINTS_WEB_ADDRESS"} & set(env)


def test_gateway_objects() -> None:
    namespace, gateway_class, gateway = GW.build_objects("ns", "gw", 8000)
    assert namespace == {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns"}}
    assert gateway_class["spec"] == {"controllerName": "traefik.io/gateway-controller"}
    assert gateway["metadata"] == {"name": "gw", "namespace": "ns"}
    assert gateway["spec"]["gatewayClassName"] == gateway_class["metadata"]["name"] == "traefik"
    assert gateway["spec"]["listeners"] == [{"name": "http", "protocol": "HTTP", "port": 8000,
                                             "allowedRoutes": {"namespaces": {"from": "All"}}}]


def test_recorded_gateway_round_trip() -> None:
    info = GW.Gateway(namespace="ns", name="gw", gateway_class="traefik", listener="http", address="127.0.0.1",
                      port=8000, admin_port=8001, pid=42, kubeconfig="/k", log="/d/traefik.log",
                      access_log="/d/access.log", timings={"total": 1.0})
    data = info.to_json()
    assert data["url"] == "http://127.0.0.1:8000" and data["metrics_url"] == "http://127.0.0.1:8001/metrics"
    assert GW.Gateway.from_json(data) == info
    assert info.parent_ref == {"group": "gateway.networking.k8s.io", "kind": "Gateway", "namespace": "ns",
                               "name": "gw", "sectionName": "http"}
