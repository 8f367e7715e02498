"""Serving runtimes (spec.serving.runtime) and gRPC (spec.serving.grpc): the pod templates and Services each renders,
the metric mapping to PromQL and to scrape arithmetic, the refusals, and that specs without either render exactly
what they rendered before these fields existed.

The live part (a runtime's /metrics over HTTP, the noData policy) goes through aiohttp to a local server, as
test_providers.py does; the planner's part through the simulated cluster (tests/plansim.py).
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web as aiohttp_web

from shipyard import contract
from shipyard.operator import analysis, objects, planning, providers, runtimes
from shipyard.operator import spec as spec_mod
from shipyard.operator.providers import builtin, scrape
from tests.plansim import ANALYSIS, STEPS, T0, Sim, md

REPO = Path(__file__).resolve().parents[2]
ART = "/artifacts/ml/digits/0123456789abcdef0123"


def body(serving: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "shipyard.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "digits", "namespace": "ml", "uid": "uid-1", "generation": 1},
            "spec": {"image": "registry.example/acme/digits:1.1.0", "model": {"path": "/models/digits"},
                     "serving": serving or {}, **spec}}


def parse(b: dict[str, Any]) -> spec_mod.ModelDeployment:
    return spec_mod.parse_model_deployment(b)


def deployment(b: dict[str, Any], artifact: str | None = None) -> dict[str, Any]:
    m = parse(b)
    dep: dict[str, Any] = objects.build_deployment(objects.build_meta(b), m, m.spec.version, m.spec.image, 2, artifact)
    return dep


def container(b: dict[str, Any], artifact: str | None = None) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment(b, artifact)["spec"]["template"]["spec"]["containers"]
    (c,) = containers
    return c


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c["env"]}


def probe_of(c: dict[str, Any], kind: str) -> dict[str, Any]:
    return {k: v for k, v in c[f"{kind}Probe"].items() if k not in ("periodSeconds", "failureThreshold")}


# --- specs without runtime or grpc render what they always rendered -------------------------------------------

def _example(name: str) -> dict[str, Any]:
    b: dict[str, Any] = yaml.safe_load((REPO / "examples" / name).read_text())
    b["metadata"].update(namespace="ml", uid="uid-1", generation=1)
    return b


# spec-hash of the Deployment, the model's Service and the version's Service, as the operator before
# spec.serving.runtime/grpc rendered them (commit 8dc362a): a change here restarts every existing model's pods.
@pytest.mark.parametrize(("make", "artifact", "hashes"), [
    pytest.param(lambda: _example("digits.yaml"), ART, ("9eb1d96b0f904672", "2153524e68d29622", "570fe7ac48e6a21f"),
                 id="digits-compressed"),
    pytest.param(lambda: _example("digits.yaml"), None, ("7f1cdfeb4ac381e2", "2153524e68d29622", "570fe7ac48e6a21f"),
                 id="digits-source"),
    pytest.param(lambda: {**body(), "metadata": {"name": "enc", "namespace": "ml", "uid": "uid-1", "generation": 1},
                          "spec": {"image": "r.example/enc:2.0.0", "model": {"uri": "pvc://models/enc/v2"},
                                   "serving": {"replicas": 2, "resources": {"limits": {"nvidia.com/gpu": 1}},
                                               "nodeSelector": {"gpu": "a100"}}}},
                 None, ("8984263abdb2c6cc", "eadce242e45fae72", "e96711a15467e140"), id="pvc-source-gpu"),
    pytest.param(lambda: {**body(), "metadata": {"name": "m", "namespace": "ml", "uid": "uid-1", "generation": 1},
                          "spec": {"image": "r.example/m:1", "model": {"path": "/models/m"}}},
                 None, ("8257af69bdcd4db6", "291ee0da25e3c915", "afc4fd9c98d4c813"), id="minimal"),
])
def test_existing_specs_render_the_identical_objects(make: Any, artifact: str | None,
                                                      hashes: tuple[str, str, str]) -> None:
    b = make()
    m = parse(b)
    meta = objects.build_meta(b)
    dep = objects.build_deployment(meta, m, m.spec.version, m.spec.image, 3, artifact)
    ports = objects.build_service_ports(m.spec.serving)
    svc = objects.build_service(meta, m.spec.serving.port, ports)
    vsvc = objects.build_version_service(meta, m.spec.version, m.spec.serving.port, ports)
    assert (objects.spec_hash_of(dep), objects.spec_hash_of(svc), objects.spec_hash_of(vsvc)) == hashes


# --- pod templates of each preset and of a custom runtime ----------------------------------------------------

PRESET_TEMPLATES = [
    pytest.param({"preset": "torchserve"}, {
        "command": None, "args": None,
        "ports": {"http": 8080, "grpc": 7070, "metrics": 8082},
        "readiness": {"httpGet": {"path": "/ping", "port": "http"}},
        "liveness": {"httpGet": {"path": "/ping", "port": "http"}},
        "env": {"TS_METRICS_MODE": "prometheus", contract.ENV_MODEL_PATH: "/models/digits",
                contract.ENV_HTTP_PORT: "8080", contract.ENV_GRPC_PORT: "7070", contract.ENV_METRICS_PORT: "8082"},
    }, id="torchserve"),
    pytest.param({"preset": "triton"}, {
        "command": ["tritonserver"],
        "args": ["--model-repository=$(SHIPYARD_MODEL_PATH)", "--http-port=$(SHIPYARD_HTTP_PORT)",
                 "--grpc-port=$(SHIPYARD_GRPC_PORT)", "--metrics-port=$(SHIPYARD_METRICS_PORT)"],
        "ports": {"http": 8000, "grpc": 8001, "metrics": 8002},
        "readiness": {"httpGet": {"path": "/v2/health/ready", "port": "http"}},
        "liveness": {"httpGet": {"path": "/v2/health/live", "port": "http"}},
        "env": {contract.ENV_MODEL_PATH: "/models/digits", contract.ENV_HTTP_PORT: "8000",
                contract.ENV_GRPC_PORT: "8001", contract.ENV_METRICS_PORT: "8002"},
    }, id="triton"),
    pytest.param({"preset": "vllm"}, {
        "command": None,
        "args": ["--model", "$(SHIPYARD_MODEL_PATH)", "--served-model-name", "$(SHIPYARD_MODEL_NAME)",
                 "--port", "$(SHIPYARD_HTTP_PORT)"],
        "ports": {"http": 8000},  # metrics on the http port: no port of their own
        "readiness": {"httpGet": {"path": "/health", "port": "http"}},
        "liveness": {"httpGet": {"path": "/health", "port": "http"}},
        "env": {contract.ENV_MODEL_PATH: "/models/digits", contract.ENV_HTTP_PORT: "8000",
                contract.ENV_METRICS_PORT: "8000"},
    }, id="vllm"),
    pytest.param({"preset": "vllm", "args": ["--model", "/m", "--port", "9000"], "ports": {"http": 9000},
                  "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}], "probes": {"startup": {"path": "/v1/models"}}}, {
        "command": None, "args": ["--model", "/m", "--port", "9000"],
        "ports": {"http": 9000},
        "readiness": {"httpGet": {"path": "/health", "port": "http"}},
        "liveness": {"httpGet": {"path": "/health", "port": "http"}},
        "startup": {"httpGet": {"path": "/v1/models", "port": "http"}},
        "env": {contract.ENV_MODEL_PATH: "/models/digits", contract.ENV_HTTP_PORT: "9000",
                contract.ENV_METRICS_PORT: "9000", "HF_HUB_OFFLINE": "1"},
    }, id="vllm-overridden"),
    pytest.param({"command": ["/serve"], "ports": {"http": 5000, "grpc": 5001, "metrics": 9100},
                  "probes": {"readiness": {"path": "/ready", "port": "metrics"}, "liveness": {"port": "grpc"}}}, {
        "command": ["/serve"], "args": None,
        "ports": {"http": 5000, "grpc": 5001, "metrics": 9100},
        "readiness": {"httpGet": {"path": "/ready", "port": "metrics"}},
        "liveness": {"grpc": {"port": 5001}},
        "startup": {"grpc": {"port": 5001}},  # the startup probe defaults to the liveness probe
        "env": {contract.ENV_MODEL_PATH: "/models/digits", contract.ENV_HTTP_PORT: "5000",
                contract.ENV_GRPC_PORT: "5001", contract.ENV_METRICS_PORT: "9100"},
    }, id="custom"),
    pytest.param({"ports": {"grpc": 5001}}, {
        "command": None, "args": None,
        "ports": {"grpc": 5001},
        "readiness": {"tcpSocket": {"port": "grpc"}},  # no probe given: a TCP check of the serving port
        "liveness": {"tcpSocket": {"port": "grpc"}},
        "env": {contract.ENV_MODEL_PATH: "/models/digits", contract.ENV_GRPC_PORT: "5001"},
    }, id="custom-grpc-only-no-probes"),
]


@pytest.mark.parametrize(("runtime", "expected"), PRESET_TEMPLATES)
def test_runtime_container(runtime: dict[str, Any], expected: dict[str, Any]) -> None:
    b = body({"runtime": runtime}, rollout={"startupTimeoutSeconds": 300})
    c = container(b)
    assert c.get("command") == expected["command"] and c.get("args") == expected["args"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == expected["ports"]
    assert probe_of(c, "readiness") == expected["readiness"]
    assert probe_of(c, "liveness") == expected["liveness"]
    assert probe_of(c, "startup") == expected.get("startup", expected["liveness"])
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] == 300  # startupTimeout
    assert env_of(c) == {contract.ENV_MODEL_NAME: "digits", contract.ENV_MODEL_VERSION: "1.1.0", **expected["env"]}
    assert c["image"] == "registry.example/acme/digits:1.1.0"
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    pod = deployment(b)["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


@pytest.mark.parametrize(("serving", "model", "compression", "artifact", "mount", "env_path"), [
    pytest.param({"runtime": {"preset": "torchserve"}}, {"path": "/home/model-server/model-store"}, None, None,
                 None, "/home/model-server/model-store", id="model-in-the-image-not-mounted"),
    pytest.param({"runtime": {"preset": "triton"}}, {"uri": "pvc://models/triton/repo"}, None, None,
                 {"name": "model-source", "mountPath": "/models", "readOnly": True, "subPath": "triton/repo"},
                 "/models", id="pvc-at-the-presets-mount"),
    pytest.param({"runtime": {"preset": "vllm", "modelMountPath": "/llm"}}, {"uri": "pvc://models"}, None, None,
                 {"name": "model-source", "mountPath": "/llm", "readOnly": True}, "/llm", id="whole-claim-own-path"),
    pytest.param({"runtime": {"ports": {"http": 8080}}}, {"path": "/models/digits"},
                 {"steps": [{"quantize": {"scheme": "int8-dynamic"}}], "evaluation": {"dataset": "builtin:digits"},
                  "artifacts": {"pvc": "shipyard-artifacts"}}, ART,
                 {"name": "artifacts", "mountPath": "/model", "readOnly": True,
                  "subPath": "ml/digits/0123456789abcdef0123"}, "/model", id="artifact-dir-at-the-default-mount"),
])
def test_runtime_model_mount(serving: dict[str, Any], model: dict[str, Any], compression: dict[str, Any] | None,
                             artifact: str | None, mount: dict[str, Any] | None, env_path: str) -> None:
    b = body(serving, **({"compression": compression} if compression else {}))
    b["spec"]["model"] = model
    c = container(b, artifact)
    mounts = [v for v in c["volumeMounts"] if v["name"] != objects.TMP_VOLUME]
    assert mounts == ([mount] if mount else [])
    assert env_of(c)[contract.ENV_MODEL_PATH] == env_path


def test_batching_does_not_reach_a_runtime() -> None:
    c = container(body({"runtime": {"preset": "vllm"}, "batching": {"maxBatchSize": 8}}))
    assert contract.ENV_MAX_BATCH_SIZE not in env_of(c) and contract.ENV_MAX_DELAY_MS not in env_of(c)


# --- gRPC of Shipyard's own server -----------------------------------------------------------------------------

@pytest.mark.parametrize(("grpc", "command_tail", "ports", "probe"), [
    pytest.param({}, ["--grpc-port", "9000"], {"http": 8080, "grpc": 9000},
                 {"httpGet": {"path": contract.PATH_READY, "port": "http"}}, id="http-and-grpc"),
    pytest.param({"http": False}, ["--grpc-port", "9000", *contract.SERVE_HTTP_OFF_ARGS], {"grpc": 9000},
                 {"grpc": {"port": 9000}}, id="grpc-only-native-grpc-probes"),
])
def test_grpc_of_the_shipyard_server(grpc: dict[str, Any], command_tail: list[str], ports: dict[str, int],
                                     probe: dict[str, Any]) -> None:
    c = container(body({"grpc": grpc}))
    assert c["command"] == [contract.RUNTIME_COMMAND, contract.SERVE_SUBCOMMAND, "--port", "8080", *command_tail]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == ports
    assert probe_of(c, "readiness") == probe
    if "grpc" in probe:
        assert probe_of(c, "liveness") == probe_of(c, "startup") == probe


# --- Services ---------------------------------------------------------------------------------------------------

GRPC_SERVICE_PORT = {"name": "grpc", "targetPort": "grpc", "protocol": "TCP", "appProtocol": "kubernetes.io/h2c"}
HTTP_SERVICE_PORT = {"name": "http", "targetPort": "http", "protocol": "TCP"}


@pytest.mark.parametrize(("serving", "expected"), [
    pytest.param({}, [{**HTTP_SERVICE_PORT, "port": 8080}], id="shipyard"),
    pytest.param({"port": 80, "grpc": {"port": 81}}, [{**HTTP_SERVICE_PORT, "port": 80},
                                                       {**GRPC_SERVICE_PORT, "port": 81}], id="shipyard-grpc"),
    pytest.param({"grpc": {"http": False}}, [{**GRPC_SERVICE_PORT, "port": 9000}], id="shipyard-grpc-only"),
    pytest.param({"runtime": {"preset": "triton"}}, [{**HTTP_SERVICE_PORT, "port": 8080},
                                                     {**GRPC_SERVICE_PORT, "port": 8001}], id="triton"),
    pytest.param({"runtime": {"preset": "vllm"}, "port": 8000}, [{**HTTP_SERVICE_PORT, "port": 8000}], id="vllm"),
    pytest.param({"runtime": {"ports": {"grpc": 5001}}}, [{**GRPC_SERVICE_PORT, "port": 5001}], id="custom-grpc"),
])
def test_service_ports(serving: dict[str, Any], expected: list[dict[str, Any]]) -> None:
    b = body(serving)
    m = parse(b)
    meta = objects.build_meta(b)
    ports = objects.build_service_ports(m.spec.serving)
    assert ports == expected
    assert objects.build_service(meta, m.spec.serving.port, ports)["spec"]["ports"] == expected
    assert objects.build_version_service(meta, "1.1.0", m.spec.serving.port, ports)["spec"]["ports"] == expected


def test_the_planner_applies_the_runtime_and_its_service() -> None:
    sim = Sim(md("1.0.0", serving={"replicas": 2, "runtime": {"preset": "triton"}})).settle()
    assert sim.status["phase"] == "Healthy"
    plan = planning.plan_reconcile(sim.body, sim.observed(), sim.now)
    assert plan.apply == ()  # settled: the stored hashes are those of the runtime's Deployment and Service
    first = next(p for p in sim.plans if any(o["kind"] == "Service" for o in p.apply))
    service = next(o for o in first.apply if o["kind"] == "Service")
    assert [p["name"] for p in service["spec"]["ports"]] == ["http", "grpc"]


# --- refusals -----------------------------------------------------------------------------------------------------

def _metric(builtin_name: str) -> dict[str, Any]:
    return {"analysis": {"metrics": [{"name": "m", "builtin": builtin_name, "max": 1}]}}


COMPRESSION = {"steps": [{"quantize": {"scheme": "int8-dynamic"}}], "evaluation": {"dataset": "builtin:digits"},
               "artifacts": {"pvc": "a"}}

REFUSALS = [
    pytest.param({"runtime": {"preset": "torchserve"}}, {"rollout": _metric("latencyP99")},
                 "spec.rollout.analysis.metrics[0].builtin",
                 "latencyP99 is not available with runtime preset torchserve: TorchServe exports its inference "
                 "latency as a counter", id="torchserve-latency"),
    pytest.param({"runtime": {"preset": "triton"}}, {"rollout": _metric("latencyP99")},
                 "spec.rollout.analysis.metrics[0].builtin", "not available with runtime preset triton",
                 id="triton-latency"),
    pytest.param({"runtime": {"preset": "torchserve"}}, {"rollout": _metric("ttftP99")},
                 "spec.rollout.analysis.metrics[0].builtin", "it is not an LLM server", id="torchserve-ttft"),
    pytest.param({}, {"rollout": _metric("tpotP99")}, "spec.rollout.analysis.metrics[0].builtin",
                 "Shipyard's own server has no token timings", id="shipyard-tpot"),
    pytest.param({"runtime": {"ports": {"http": 80}}}, {"rollout": _metric("errorRate")},
                 "spec.rollout.analysis.metrics[0].builtin", "set spec.serving.runtime.metrics.errorRate",
                 id="custom-unmapped-error-rate"),
    pytest.param({"runtime": {"preset": "vllm"}}, {"compression": COMPRESSION}, "spec.compression",
                 "cannot be served by runtime preset vllm", id="compression-with-a-preset"),
    pytest.param({"runtime": {"preset": "vllm"}, "grpc": {}}, {}, "spec.serving.grpc",
                 "a runtime declares its gRPC port in spec.serving.runtime.ports.grpc", id="grpc-with-a-runtime"),
    pytest.param({"grpc": {"http": False}}, {"rollout": _metric("errorRate")},
                 "spec.rollout.analysis.metrics[0].builtin", "the pods have no HTTP /metrics", id="grpc-only-builtin"),
    pytest.param({"runtime": {"metrics": {"latencyP99": {"histogram": "x", "unit": "hours"}}, "ports": {"http": 1}}},
                 {}, "spec.serving.runtime.metrics.latencyP99.unit", "Input should be", id="bad-unit"),
    pytest.param({"runtime": {"ports": {"grpc": 5001}, "probes": {"readiness": {"path": "/ready"}}}}, {},
                 "spec.serving.runtime.probes.readiness.port", "the runtime has no http port", id="probe-port-absent"),
    pytest.param({"runtime": {"ports": {"grpc": 5001}, "metrics": {"errorRate": {
        "errors": [{"metric": "e"}], "total": [{"metric": "t"}]}}}}, {"rollout": _metric("errorRate")},
                 "spec.rollout.analysis.metrics[0].builtin", "set spec.serving.runtime.ports.metrics",
                 id="grpc-only-runtime-without-a-metrics-port"),
    pytest.param({"runtime": {"preset": "triton"}, "port": 8001}, {}, "spec.serving.port",
                 "8001 is also the runtime's gRPC port", id="service-port-clash-with-the-presets-grpc"),
]


@pytest.mark.parametrize(("serving", "spec", "field", "problem"), REFUSALS)
def test_refusals_name_the_field(serving: dict[str, Any], spec: dict[str, Any], field: str, problem: str) -> None:
    with pytest.raises(spec_mod.SpecError) as err:
        parse(body(serving, **spec))
    assert err.value.field == field
    assert problem in err.value.problem


@pytest.mark.parametrize(("serving", "spec"), [
    pytest.param({"runtime": {"preset": "vllm"}}, {"rollout": _metric("tpotP99")}, id="vllm-tpot"),
    pytest.param({"runtime": {"preset": "torchserve", "metrics": {"latencyP99": {"histogram": "h"}}}},
                 {"rollout": _metric("latencyP99")}, id="torchserve-with-an-own-histogram"),
    pytest.param({"runtime": {"ports": {"http": 80}, "metrics": {"errorRate": {
        "errors": [{"metric": "e"}], "total": [{"metric": "t"}]}}}}, {"rollout": _metric("errorRate")},
                 id="custom-mapped"),
    pytest.param({"runtime": {"ports": {"http": 80}}}, {"compression": COMPRESSION}, id="compression-custom"),
    pytest.param({"grpc": {"http": False}}, {"rollout": {"analysis": {"metrics": [
        {"name": "m", "prometheus": {"query": "up"}, "max": 1}]}}}, id="grpc-only-prometheus-metric"),
])
def test_accepted_combinations(serving: dict[str, Any], spec: dict[str, Any]) -> None:
    parse(body(serving, **spec))


def test_a_refused_spec_stalls_naming_the_field_and_keeps_what_is_stored() -> None:
    sim = Sim(md("1.0.0")).settle()
    stored = copy.deepcopy(sim.status)
    sim.set_spec(image="registry.example/acme/digits-model:1.1.0", serving={"replicas": 4, "runtime": {
        "preset": "torchserve"}}, rollout={"analysis": {"metrics": [{"name": "p99", "builtin": "latencyP99",
                                                                     "max": 1}]}})
    sim.step()
    assert sim.condition("Stalled") == ("True", "InvalidSpec")
    assert sim.status["message"].startswith("spec.rollout.analysis.metrics[0].builtin: latencyP99 is not available "
                                            "with runtime preset torchserve")
    assert sim.status["stableVersion"] == stored["stableVersion"] and sim.status["history"] == stored["history"]
    assert sim.replicas() == {"1.0.0": 4}


# --- the metric mapping: PromQL and scrape arithmetic -------------------------------------------------------

POD = "digits-1-1-0-[a-z0-9]+-[a-z0-9]+"


@pytest.mark.parametrize(("builtin_name", "preset", "query"), [
    pytest.param("errorRate", "torchserve",
                 f'((sum(rate(Requests5XX{{namespace="ml",pod=~"{POD}"}}[60s])) or vector(0))) / '
                 f'((sum(rate(ts_inference_requests_total{{namespace="ml",pod=~"{POD}"}}[60s])) or vector(0)))',
                 id="torchserve-error-rate"),
    pytest.param("errorRate", "triton",
                 f'((sum(rate(nv_inference_request_failure{{namespace="ml",pod=~"{POD}"}}[60s])) or vector(0))) / '
                 f'((sum(rate(nv_inference_request_success{{namespace="ml",pod=~"{POD}"}}[60s])) or vector(0)) + '
                 f'(sum(rate(nv_inference_request_failure{{namespace="ml",pod=~"{POD}"}}[60s])) or vector(0)))',
                 id="triton-error-rate"),
    pytest.param("errorRate", "vllm",
                 f'((sum(rate(http_requests_total{{namespace="ml",pod=~"{POD}",handler=~"/v1/.*",status=~"5xx"}}'
                 f'[60s])) or vector(0))) / ((sum(rate(http_requests_total{{namespace="ml",pod=~"{POD}",'
                 f'handler=~"/v1/.*"}}[60s])) or vector(0)))', id="vllm-error-rate"),
    pytest.param("ttftP99", "vllm",
                 f'histogram_quantile(0.99, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket'
                 f'{{namespace="ml",pod=~"{POD}"}}[60s])))', id="vllm-ttft"),
    pytest.param("tpotP99", "vllm",
                 f'histogram_quantile(0.99, sum by (le) (rate(vllm:inter_token_latency_seconds_bucket'
                 f'{{namespace="ml",pod=~"{POD}"}}[60s])))', id="vllm-tpot"),
])
def test_preset_mapping_to_promql(builtin_name: builtin.Builtin, preset: runtimes.Preset, query: str) -> None:
    mapping = runtimes.PRESET_SPECS[preset].metrics.mapping(builtin_name)
    assert mapping is not None
    assert builtin.build_mapped_query(builtin_name, mapping, "ml", "digits-1-1-0", "60s") == query


@pytest.mark.parametrize(("unit", "suffix"), [("seconds", ""), ("milliseconds", " / 1000"),
                                              ("microseconds", " / 1000000")])
def test_quantile_units_convert_to_seconds_in_promql(unit: str, suffix: str) -> None:
    mapping = runtimes.QuantileMapping(histogram="h", unit=unit, labels={"route": "/infer"})  # type: ignore[arg-type]
    assert builtin.build_mapped_query("latencyP99", mapping, "ml", "m-1", "60s", namespace_label=None) == (
        'histogram_quantile(0.99, sum by (le) (rate(h_bucket{pod=~"m-1-[a-z0-9]+-[a-z0-9]+",route=~"/infer"}[60s])))'
        + suffix)


@pytest.mark.parametrize(("deployment", "pod", "matches"), [
    ("digits-1-1-0", "digits-1-1-0-7d9f8b6c4-x2k9p", True),
    ("digits-1-1-0", "digits-1-1-0-rc1-7d9f8b6c4-x2k9p", False),  # another version extending the name
    ("digits-1-1-0", "digits-1-1-0-7d9f8b6c4", False),
    ("d" * 50, "d" * 50 + "-7d9f-x", True),  # cut to 58 characters by Kubernetes
])
def test_pod_regex_selects_one_deployments_pods(deployment: str, pod: str, matches: bool) -> None:
    import re
    assert (re.fullmatch(runtimes.build_pod_regex(deployment), pod) is not None) == matches


def key(name: str, **labels: str) -> scrape.SeriesKey:
    return scrape.build_series_key(name, labels)


def buckets(name: str, counts: dict[str, float], **labels: str) -> dict[scrape.SeriesKey, float]:
    return {key(f"{name}_bucket", le=le, **labels): v for le, v in counts.items()}


@pytest.mark.parametrize(("preset", "builtin_name", "increase", "expected"), [
    pytest.param("triton", "errorRate", {key("nv_inference_request_success", model="m"): 90.0,
                                         key("nv_inference_request_failure", model="m"): 10.0}, 0.1,
                 id="triton-failures-over-both"),
    pytest.param("triton", "errorRate", {key("nv_inference_request_success_total", model="m"): 3.0,
                                         key("nv_inference_request_failure_total", model="m"): 1.0}, 0.25,
                 id="triton-as-the-text-parser-names-counters"),
    pytest.param("triton", "errorRate", {}, None, id="triton-no-requests-no-data"),
    pytest.param("torchserve", "errorRate", {key("Requests5XX", Level="Host"): 2.0,
                                             key("ts_inference_requests_total", model_name="m"): 50.0}, 0.04,
                 id="torchserve"),
    pytest.param("torchserve", "errorRate", {key("ts_inference_requests_total", model_name="m"): 50.0}, 0.0,
                 id="torchserve-no-5xx-series-is-zero"),
    pytest.param("vllm", "errorRate", {key("http_requests_total", handler="/v1/completions", status="2xx"): 18.0,
                                       key("http_requests_total", handler="/v1/completions", status="5xx"): 2.0,
                                       key("http_requests_total", handler="/health", status="2xx"): 500.0}, 0.1,
                 id="vllm-probes-not-counted"),
    pytest.param("vllm", "ttftP99", buckets("vllm:time_to_first_token_seconds",
                                            {"0.1": 50.0, "0.5": 100.0, "+Inf": 100.0}), 0.492, id="vllm-ttft"),
    pytest.param("vllm", "latencyP99", {}, None, id="vllm-no-observations-no-data"),
])
def test_mapping_from_scraped_increases(preset: runtimes.Preset, builtin_name: str,
                                        increase: dict[scrape.SeriesKey, float], expected: float | None) -> None:
    mapping = runtimes.PRESET_SPECS[preset].metrics.mapping(builtin_name)
    assert mapping is not None
    value = builtin.build_mapped_value(mapping, increase)
    assert value == pytest.approx(expected) if expected is not None else value is None


def test_a_histogram_in_microseconds_is_read_in_seconds() -> None:
    mapping = runtimes.QuantileMapping(histogram="lat_us", unit="microseconds")
    value = builtin.build_mapped_value(mapping, buckets("lat_us", {"1000": 0.0, "2000": 100.0, "+Inf": 100.0}))
    assert value == pytest.approx(0.00199)


# --- measuring a runtime's pods: its metrics port and path, and no data ------------------------------------

TRITON_METRICS = """# TYPE nv_inference_request_success counter
nv_inference_request_success{model="digits",version="1"} %d
# TYPE nv_inference_request_failure counter
nv_inference_request_failure{model="digits",version="1"} %d
"""


def _measure(runtime: dict[str, Any], pages: list[str], no_data: str = "Inconclusive"
             ) -> tuple[list[analysis.Sample], list[str]]:
    """Measures errorRate of the candidate ``len(pages)`` times against a server answering each page in turn at the
    runtime's metrics path; returns the samples and the paths requested."""
    b = body({"runtime": runtime}, rollout={"analysis": {"noData": no_data, "failureLimit": 0, "metrics": [
        {"name": "errors", "builtin": "errorRate", "max": 0.05}]}})
    m = parse(b)
    resolved = runtimes.resolve_runtime(m.spec.serving.runtime)  # type: ignore[arg-type]
    assert m.spec.rollout.analysis is not None
    seen: list[str] = []

    async def run() -> list[analysis.Sample]:
        async def page(request: aiohttp_web.Request) -> aiohttp_web.Response:
            seen.append(request.path)
            return aiohttp_web.Response(text=pages[min(len(seen), len(pages)) - 1])

        app = aiohttp_web.Application()
        app.router.add_get(resolved.metrics_path, page)
        runner = aiohttp_web.AppRunner(app)
        await runner.setup()
        site = aiohttp_web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        clock = [0.0]
        registry = providers.Providers(clock=lambda: clock[0])
        try:
            out = []
            for _ in pages:
                result = await registry.query_measurements(
                    m.spec.rollout.analysis, namespace="ml", name="digits", model="digits",  # type: ignore[arg-type]
                    candidate_version="1.1.0", stable_version="1.0.0", candidate_targets=[f"127.0.0.1:{port}"],
                    runtime=resolved)
                out.append(result["errors"].candidate)
                clock[0] += 15
            return out
        finally:
            await registry.close()
            await runner.cleanup()

    return asyncio.run(run()), seen


@pytest.mark.timeout(30)
def test_a_runtimes_pods_are_scraped_at_its_metrics_path() -> None:
    samples, seen = _measure({"preset": "triton", "metricsPath": "/prom"},
                             [TRITON_METRICS % (90, 10), TRITON_METRICS % (180, 30)])
    assert seen == ["/prom", "/prom"]
    assert samples[0].value == pytest.approx(0.1)  # first scrape: since the pods started
    assert samples[1].value == pytest.approx(20 / 110)  # the increase over the interval
    assert "nv_inference_request_failure" in samples[1].query and samples[1].error is None


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("policy", "phase"), [("Inconclusive", analysis.Phase.INCONCLUSIVE),
                                               ("Fail", analysis.Phase.FAILED),
                                               ("Ignore", analysis.Phase.RUNNING)])
def test_a_runtime_without_the_metrics_gives_no_data_and_no_data_decides(policy: str, phase: str) -> None:
    samples, _ = _measure({"preset": "torchserve"}, ["# metrics_mode log: nothing here\n"], no_data=policy)
    assert samples[0].value is None and samples[0].error is None  # no data, not an error
    m = parse(body({"runtime": {"preset": "torchserve"}}, rollout={"analysis": {
        "noData": policy, "failureLimit": 0, "metrics": [{"name": "errors", "builtin": "errorRate", "max": 0.05}]}}))
    assert m.spec.rollout.analysis is not None
    status = analysis.build_analysis_status(
        None, m.spec.rollout.analysis, "1.1.0", {"errors": analysis.Measurement(candidate=samples[0])}, T0, T0)
    assert status["phase"] == phase


def test_the_scrape_url_carries_the_metrics_path() -> None:
    assert scrape.build_scrape_url("10.0.0.1:8002", "/prom") == "http://10.0.0.1:8002/prom"
    assert scrape.build_scrape_url("10.0.0.1:8080") == "http://10.0.0.1:8080/metrics"
    with pytest.raises(ValueError, match="not an absolute path"):
        scrape.build_scrape_url("10.0.0.1:8080", "metrics?x=1")


# --- startup timeout with a runtime ----------------------------------------------------------------------------

def test_a_runtime_never_ready_times_out_and_rolls_back() -> None:
    runtime = {"preset": "vllm"}
    sim = Sim(md("1.0.0", serving={"replicas": 4, "runtime": runtime},
                 rollout={"steps": STEPS, "startupTimeoutSeconds": 30, "analysis": {
                     **ANALYSIS, "metrics": [{"name": "ttft", "builtin": "ttftP99", "max": 0.5}]}})).settle()
    assert sim.status["phase"] == "Healthy"
    sim.set_spec(image="registry.example/acme/digits-model:1.1.0")
    sim.broken.add("1.1.0")
    sim.run(lambda s: s.status.get("phase") == "RolledBack").step()  # scaled down once the Service switched
    assert sim.condition("Stalled") == ("True", "StartupTimeout")
    assert sim.replicas() == {"1.0.0": 4, "1.1.0": 0}
    assert sim.history()[-1] == ("1.1.0", "RolledBack")
