"""Admission of serving runtimes (spec.serving.runtime) and gRPC (spec.serving.grpc) by the real API server: each
preset's example is accepted, and the combinations docs/runtimes.md refuses are rejected with a message naming the
field. The same refusals are checked by the parser in tests/unit/test_runtimes.py; no operator runs here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from shipyard.operator import spec as spec_mod

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def base(serving: dict[str, Any] | None = None, metrics: list[str] | None = None,
         **spec: Any) -> dict[str, Any]:
    """The digits example without compression, with ``serving`` merged in and one builtin metric per name."""
    body: dict[str, Any] = yaml.safe_load((REPO / "examples" / "digits.yaml").read_text())
    body["metadata"]["name"] = "rt"
    del body["spec"]["compression"]
    body["spec"]["serving"].update(serving or {})
    body["spec"]["rollout"]["analysis"]["metrics"] = [
        {"name": name.lower(), "builtin": name, "max": 1} for name in (metrics or ["errorRate"])]
    body["spec"].update(spec)
    return body


def apply(cluster: Any, namespace: str, body: dict[str, Any]) -> Any:
    return cluster.kubectl("apply", "--server-side", "--validate=strict", "--field-manager=shipyard-tests",
                           "-n", namespace, "-f", "-", input=json.dumps(body), check=False)


ACCEPTED = [
    pytest.param(base({"runtime": {"preset": "torchserve"}}), id="torchserve-error-rate"),
    pytest.param(base({"runtime": {"preset": "triton"}, "port": 8000}), id="triton-error-rate"),
    pytest.param(base({"runtime": {"preset": "vllm"}}, ["errorRate", "latencyP99", "ttftP99", "tpotP99"]),
                 id="vllm-every-builtin"),
    pytest.param(base({"runtime": {
        "command": ["/opt/server"], "args": ["--model-dir", "$(SHIPYARD_MODEL_PATH)"],
        "env": [{"name": "LOG_LEVEL", "value": "info"}], "ports": {"http": 5000, "grpc": 5001, "metrics": 9100},
        "metricsPath": "/prom", "modelMountPath": "/srv/model",
        "probes": {"readiness": {"path": "/ready"}, "liveness": {"port": "grpc"}},
        "metrics": {"errorRate": {"errors": [{"metric": "requests_total", "labels": {"code": "5.."}}],
                                  "total": [{"metric": "requests_total"}]},
                    "latencyP99": {"histogram": "request_ms", "unit": "milliseconds"}}}},
        ["errorRate", "latencyP99"]), id="custom-mapped"),
    pytest.param(base({"runtime": {"preset": "torchserve", "metrics": {"latencyP99": {"histogram": "handler_s"}}}},
                      ["latencyP99"]), id="torchserve-with-its-own-histogram"),
    pytest.param(base({"grpc": {"port": 9000}}, ["errorRate", "latencyP99"]), id="shipyard-grpc"),
    pytest.param({**base({"grpc": {"http": False}}), "spec": {**base({"grpc": {"http": False}})["spec"], "rollout": {
        "analysis": {"metrics": [{"name": "q", "prometheus": {"query": "up"}, "max": 1}]}}}},
        id="shipyard-grpc-only-prometheus-metric"),
]


@pytest.mark.parametrize("body", ACCEPTED)
def test_runtime_spec_is_accepted(cluster: Any, namespace: str, body: dict[str, Any]) -> None:
    out = apply(cluster, namespace, body)
    assert out.returncode == 0, out.stderr
    stored = cluster.get("modeldeployment", "rt", namespace)
    assert stored is not None
    parsed = spec_mod.parse_model_deployment(stored)  # the operator accepts what admission stored, defaults and all
    assert (parsed.spec.serving.runtime is None) == ("runtime" not in body["spec"]["serving"])
    cluster.kubectl("delete", "modeldeployment", "rt", "-n", namespace, "--wait=true")


def test_the_torchserve_example_keeps_its_runtime(cluster: Any, namespace: str) -> None:
    path = REPO / "examples" / "torchserve.yaml"
    out = cluster.kubectl("apply", "--server-side", "--validate=strict", "-n", namespace, "-f", str(path),
                          check=False)
    assert out.returncode == 0, out.stderr
    stored = cluster.get("modeldeployment", "digits-torchserve", namespace)
    assert stored is not None and stored["spec"]["serving"]["runtime"] == {"preset": "torchserve"}


COMPRESSION = {"steps": [{"quantize": {"scheme": "int8-dynamic"}}], "evaluation": {"dataset": "builtin:digits"},
               "artifacts": {"pvc": "shipyard-artifacts"}}

REFUSED = [
    pytest.param(base({"runtime": {"preset": "torchserve"}}, ["latencyP99"]), "spec.rollout.analysis.metrics",
                 "builtin latencyP99 is not available with this runtime", id="torchserve-latency"),
    pytest.param(base({"runtime": {"preset": "triton"}}, ["latencyP99"]), "spec.rollout.analysis.metrics",
                 "the presets torchserve, triton do not export it", id="triton-latency"),
    pytest.param(base({}, ["ttftP99"]), "spec.rollout.analysis.metrics",
                 "builtin ttftP99 is not available with this runtime (Shipyard's own server", id="shipyard-ttft"),
    pytest.param(base({"runtime": {"preset": "torchserve"}}, ["tpotP99"]), "spec.rollout.analysis.metrics",
                 "builtin tpotP99 is not available", id="torchserve-tpot"),
    pytest.param(base({"runtime": {"ports": {"http": 5000}}}), "spec.rollout.analysis.metrics",
                 "builtin errorRate is not available with this runtime", id="custom-unmapped"),
    pytest.param(base({"runtime": {"command": ["/serve"]}}), "spec.serving.runtime.ports",
                 "spec.serving.runtime without a preset must set ports.http or ports.grpc", id="custom-no-port"),
    pytest.param(base({"runtime": {"preset": "vllm"}}, compression=COMPRESSION), "spec.compression",
                 "spec.compression makes an artifact in Shipyard's format", id="compression-with-a-preset"),
    pytest.param(base({"runtime": {"preset": "triton"}, "grpc": {}}), "spec.serving.grpc",
                 "spec.serving.grpc turns on Shipyard's server's gRPC", id="grpc-with-a-runtime"),
    pytest.param(base({"grpc": {"http": False}}), "spec.rollout.analysis.metrics",
                 "spec.serving.grpc.http false leaves the pods without HTTP", id="grpc-only-builtin"),
    pytest.param(base({"grpc": {"port": 8080}}), "spec.serving.grpc.port",
                 "spec.serving.grpc.port must differ from spec.serving.port", id="grpc-port-clash"),
    pytest.param(base({"runtime": {"preset": "vllm", "probes": {"readiness": {"port": "http"}}}}),
                 "spec.serving.runtime.probes.readiness.path", "a runtime probe sets a path", id="probe-no-path"),
    pytest.param(base({"runtime": {"preset": "vllm", "probes": {"liveness": {"port": "grpc", "path": "/x"}}}}),
                 "spec.serving.runtime.probes.liveness.path", "unless its port is grpc", id="grpc-probe-with-path"),
    pytest.param(base({"runtime": {"preset": "vllm", "metrics": {"ttftP99": {"histogram": "t", "unit": "hours"}}}}),
                 "spec.serving.runtime.metrics.ttftP99.unit", "Unsupported value", id="bad-unit"),
    pytest.param(base({"runtime": {"preset": "kserve"}}), "spec.serving.runtime.preset", "Unsupported value",
                 id="unknown-preset"),
    pytest.param(base({"runtime": {"preset": "vllm", "ports": {"http": 8000, "grpc": 8000}}}),
                 "spec.serving.runtime.ports.grpc", "must differ from ports.http", id="runtime-port-clash"),
]


@pytest.mark.parametrize(("body", "field", "message"), REFUSED)
def test_runtime_spec_is_refused(cluster: Any, namespace: str, body: dict[str, Any], field: str,
                                 message: str) -> None:
    out = apply(cluster, namespace, body)
    assert out.returncode != 0, "accepted"
    assert f"{field}:" in out.stderr, out.stderr
    assert message in out.stderr, out.stderr
    assert cluster.get("modeldeployment", "rt", namespace) is None
