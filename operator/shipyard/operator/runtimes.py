"""Serving runtimes other than Shipyard's own server: the ``spec.serving.runtime`` fragment, its presets, and how each
builtin metric is computed from a runtime's own Prometheus metrics. Pure, no I/O.

``spec.serving.runtime`` absent is Shipyard's server (``shipyard-runtime serve``), whose pod template is unchanged.
Set, the inference container is the runtime's: a ``preset`` (torchserve, triton, vllm) fills in ports, probes, where
the model is mounted, environment and the metric mapping, and any explicit field overrides the preset's
(``resolve_runtime``). The metric mapping (``RuntimeMetrics``) says, per builtin, which counters or which histogram
of the runtime give it; a builtin the resolved mapping lacks is refused (``assess_builtin``), at admission by the CEL
rules ``build_builtin_rules`` renders from the same preset table, and again when the spec is parsed.

Runtimes do not label their metrics with Shipyard's model and version: a version's values are read from that
version's pods only (scraped directly, or in Prometheus selected by ``pod=~"<its Deployment>-<hash>-<suffix>"`` and
the namespace, ``build_pod_regex``).

Metric names of the presets come from each project's documentation (cited at each preset).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal, TypeAlias

from pydantic import Field

from shipyard import contract
from shipyard.contract import schema

Preset: TypeAlias = Literal["torchserve", "triton", "vllm"]
PRESETS: Final[tuple[Preset, ...]] = ("torchserve", "triton", "vllm")
# The builtins a runtime may map (Shipyard's own server exports errorRate and latencyP99 only).
MAPPED_BUILTINS: Final = ("errorRate", "latencyP99", "ttftP99", "tpotP99")
SHIPYARD_BUILTINS: Final = ("errorRate", "latencyP99", "predictionAgreement")
DEFAULT_MODEL_MOUNT: Final = "/model"
PROMETHEUS_NAME_PATTERN: Final = r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"
LABEL_NAME_PATTERN: Final = r"^[a-zA-Z_][a-zA-Z0-9_]*$"
ENV_NAME_PATTERN: Final = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
PATH_PATTERN: Final = r"^/[^ ]*$"
UNIT_SECONDS: Final[Mapping[str, float]] = {"seconds": 1.0, "milliseconds": 1e-3, "microseconds": 1e-6}
PortName: TypeAlias = Literal["http", "grpc", "metrics"]


# ---------------------------------------------------------------------------------------------------------------
# The spec fragment


class Counter(schema.ApiModel):
    """A counter of the runtime, as its samples are named on /metrics (and in PromQL)."""

    metric: Annotated[str, Field(max_length=256, pattern=PROMETHEUS_NAME_PATTERN)]
    """Sample name, e.g. nv_inference_request_failure or http_requests_total."""
    labels: Annotated[dict[str, Annotated[str, Field(max_length=256)]], Field(json_schema_extra=schema.k8s(
        max_properties=8, validations=[schema.Cel(f"self.all(k, k.matches('{LABEL_NAME_PATTERN}'))",
                                                  "counter label names must be Prometheus label names")]))] = Field(
        default_factory=dict)
    """Label matchers, each a regular expression the label's value must match in full (PromQL =~), e.g.
    {status: 5xx} or {code: '5..'}."""


class ErrorRateMapping(schema.ApiModel):
    """errorRate = increase of the errors counters / increase of the total counters over the interval (no total: no
    data)."""

    errors: Annotated[tuple[Counter, ...], Field(min_length=1, max_length=4, json_schema_extra=schema.k8s(
        list_type="atomic"))]
    """Counters of failed requests, summed."""
    total: Annotated[tuple[Counter, ...], Field(min_length=1, max_length=4, json_schema_extra=schema.k8s(
        list_type="atomic"))]
    """Counters of all requests, summed (list both success and failure counters where the runtime has no total)."""


class QuantileMapping(schema.ApiModel):
    """A quantile (the 99th percentile) of a Prometheus histogram of the runtime, in seconds."""

    histogram: Annotated[str, Field(max_length=256, pattern=PROMETHEUS_NAME_PATTERN)]
    """Histogram name without the _bucket suffix, e.g. vllm:e2e_request_latency_seconds. Counters of cumulative
    durations (no buckets) cannot give a quantile."""
    unit: Literal["seconds", "milliseconds", "microseconds"] = "seconds"
    """Unit of the histogram's bucket bounds; the value is converted to seconds. Default seconds."""
    labels: Annotated[dict[str, Annotated[str, Field(max_length=256)]], Field(json_schema_extra=schema.k8s(
        max_properties=8, validations=[schema.Cel(f"self.all(k, k.matches('{LABEL_NAME_PATTERN}'))",
                                                  "histogram label names must be Prometheus label names")]))] = Field(
        default_factory=dict)
    """Label matchers (regular expressions, matched in full) on the buckets."""


class RuntimeMetrics(schema.ApiModel):
    """How the builtin metrics are computed from the runtime's own Prometheus metrics; each field overrides the
    preset's. A builtin neither the preset nor this maps is refused in spec.rollout.analysis."""

    error_rate: ErrorRateMapping | None = None
    """errorRate: errors / total of the given counters."""
    latency_p99: QuantileMapping | None = None
    """latencyP99: p99 of the request duration histogram, seconds."""
    ttft_p99: QuantileMapping | None = None
    """ttftP99 (LLM servers): p99 of the time to first token histogram, seconds."""
    tpot_p99: QuantileMapping | None = None
    """tpotP99 (LLM servers): p99 of the time per output token (inter-token latency) histogram, seconds."""

    def mapping(self, builtin: str) -> ErrorRateMapping | QuantileMapping | None:
        return {"errorRate": self.error_rate, "latencyP99": self.latency_p99, "ttftP99": self.ttft_p99,
                "tpotP99": self.tpot_p99}.get(builtin)


class RuntimePorts(schema.ApiModel):
    """Container ports of the runtime, by role; each overrides the preset's. The Service exposes http (at
    spec.serving.port) and grpc (at the same number)."""

    http: Annotated[int, Field(ge=1, le=65535)] | None = None
    """HTTP inference port (container port name http)."""
    grpc: Annotated[int, Field(ge=1, le=65535)] | None = None
    """gRPC inference port (container port name grpc, Service appProtocol kubernetes.io/h2c)."""
    metrics: Annotated[int, Field(ge=1, le=65535)] | None = None
    """Port of the Prometheus metrics (container port name metrics when it differs from http); default the http
    port."""


class Probe(schema.ApiModel):
    """A probe of the runtime's container: an HTTP GET of path on a named port, or a gRPC health check (port grpc,
    no path)."""

    __cel__ = (
        schema.Cel("has(self.path) != (has(self.port) && self.port == 'grpc')",
                   "a runtime probe sets a path (HTTP GET), unless its port is grpc (a gRPC health check, no path)",
                   field_path=".path"),)

    path: Annotated[str, Field(max_length=256, pattern=PATH_PATTERN)] | None = None
    """HTTP path, e.g. /ping."""
    port: PortName = "http"
    """The named port probed: http (default), metrics, or grpc (grpc.health.v1 check)."""


class Probes(schema.ApiModel):
    """Probes of the runtime's container; each overrides the preset's. Without any, a TCP check of the serving
    port."""

    readiness: Probe | None = None
    """Readiness: the pod receives traffic (and counts as ready for the rollout) while it passes."""
    liveness: Probe | None = None
    """Liveness; default the readiness probe."""
    startup: Probe | None = None
    """Startup, retried for spec.rollout.startupTimeoutSeconds; default the liveness probe."""


class EnvVar(schema.ApiModel):
    """An environment variable of the runtime's container (plain text; never credentials)."""

    name: Annotated[str, Field(min_length=1, max_length=256, pattern=ENV_NAME_PATTERN)]
    """Variable name."""
    value: Annotated[str, Field(max_length=4096)] = ""
    """Value; $(VAR) references to earlier variables are expanded by Kubernetes."""


Arguments = Annotated[tuple[Annotated[str, Field(max_length=4096)], ...], Field(
    max_length=64, json_schema_extra=schema.k8s(list_type="atomic"))]


class Runtime(schema.ApiModel):
    """A serving runtime other than Shipyard's own server (absent: shipyard-runtime serve). A preset fills in every
    field below; an explicit field overrides the preset's. Its container gets SHIPYARD_MODEL_NAME,
    SHIPYARD_MODEL_VERSION, SHIPYARD_MODEL_PATH (the model's directory) and SHIPYARD_HTTP_PORT, SHIPYARD_GRPC_PORT,
    SHIPYARD_METRICS_PORT (when set), which command and args may reference as $(NAME)."""

    __cel__ = (
        schema.Cel("has(self.preset) || (has(self.ports) && (has(self.ports.http) || has(self.ports.grpc)))",
                   "spec.serving.runtime without a preset must set ports.http or ports.grpc (where it serves)",
                   field_path=".ports", reason="FieldValueRequired"),)

    preset: Preset | None = None
    """torchserve (inference 8080, gRPC 7070, metrics 8082, /ping; the image's own entrypoint and
    config.properties, which must set metrics_mode=prometheus and bind the metrics address to 0.0.0.0), triton
    (tritonserver, 8000, gRPC 8001, metrics 8002, /v2/health/ready) or vllm (the image's OpenAI server, 8000,
    /health, /metrics). See docs/runtimes.md."""
    command: Arguments = ()
    """Entrypoint of the container; default the preset's, else the image's."""
    args: Arguments = ()
    """Arguments of the entrypoint; default the preset's, else the image's."""
    env: Annotated[tuple[EnvVar, ...], Field(max_length=64, json_schema_extra=schema.k8s(
        list_type="map", list_map_keys=["name"]))] = ()
    """Environment variables, added to (and overriding by name) the preset's."""
    ports: RuntimePorts | None = None
    """Container ports by role (http, grpc, metrics)."""
    metrics_path: Annotated[str, Field(max_length=256, pattern=PATH_PATTERN)] | None = None
    """Path of the Prometheus metrics on the metrics port; default the preset's, else /metrics."""
    probes: Probes | None = None
    """Readiness, liveness and startup probes."""
    model_mount_path: Annotated[str, Field(min_length=2, max_length=1024, pattern="^/")] | None = None
    """Where a mounted model (a pvc:// source, or a compressed artifact) appears in the container; default the
    preset's, else /model. A model inside the image (spec.model.path) is not mounted: SHIPYARD_MODEL_PATH is that
    path."""
    metrics: RuntimeMetrics | None = None
    """How the builtin metrics are computed from the runtime's own metrics; each field overrides the preset's."""


# ---------------------------------------------------------------------------------------------------------------
# Presets


@dataclass(frozen=True)
class PresetSpec:
    """What a preset fills in. ``missing`` says, per builtin it cannot give, why (shown when the spec asks for it)."""

    ports: Mapping[PortName, int]
    probes: Mapping[str, Probe]
    metrics: RuntimeMetrics
    model_mount_path: str
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    metrics_path: str = contract.PATH_METRICS
    missing: Mapping[str, str] = field(default_factory=dict)


def _counter(metric: str, **labels: str) -> Counter:
    return Counter(metric=metric, labels=labels)


_NOT_LLM: Final = "it is not an LLM server (no token timings)"

PRESET_SPECS: Final[Mapping[Preset, PresetSpec]] = {
    # TorchServe 0.12, metrics_mode=prometheus: https://pytorch.org/serve/metrics.html and
    # https://pytorch.org/serve/metrics_api.html (Requests2XX/4XX/5XX counters, ts_inference_requests_total,
    # ts_inference_latency_microseconds: a counter of cumulative microseconds, not a histogram). Requests5XX counts
    # every API's 5xx of the frontend; ts_inference_requests_total only inference requests (not the /ping probes).
    "torchserve": PresetSpec(
        ports={"http": 8080, "grpc": 7070, "metrics": 8082},
        probes={"readiness": Probe(path="/ping"), "liveness": Probe(path="/ping")},
        metrics=RuntimeMetrics(error_rate=ErrorRateMapping(errors=(_counter("Requests5XX"),),
                                                           total=(_counter("ts_inference_requests_total"),))),
        model_mount_path="/home/model-server/model-store",
        env=(("TS_METRICS_MODE", "prometheus"),),
        missing={"latencyP99": "TorchServe exports its inference latency as a counter of cumulative microseconds "
                               "(ts_inference_latency_microseconds), not a histogram, so it has no percentile; judge "
                               "the mean latency with a prometheus metric (rate of ts_inference_latency_microseconds "
                               "/ rate of ts_inference_requests_total) or map a histogram your handler exports in "
                               "spec.serving.runtime.metrics.latencyP99",
                 "ttftP99": _NOT_LLM, "tpotP99": _NOT_LLM},
    ),
    # Triton Inference Server: https://docs.nvidia.com/deeplearning/triton-inference-server/user-guide/docs/
    # user_guide/metrics.html (nv_inference_request_success / nv_inference_request_failure counters; request
    # durations are cumulative microsecond counters, nv_inference_request_duration_us, and summaries only with
    # --metrics-config summary_latencies=true: no histogram of the request duration).
    "triton": PresetSpec(
        ports={"http": 8000, "grpc": 8001, "metrics": 8002},
        probes={"readiness": Probe(path="/v2/health/ready"), "liveness": Probe(path="/v2/health/live")},
        metrics=RuntimeMetrics(error_rate=ErrorRateMapping(
            errors=(_counter("nv_inference_request_failure"),),
            total=(_counter("nv_inference_request_success"), _counter("nv_inference_request_failure")))),
        model_mount_path="/models",
        command=("tritonserver",),
        args=("--model-repository=$(SHIPYARD_MODEL_PATH)", "--http-port=$(SHIPYARD_HTTP_PORT)",
              "--grpc-port=$(SHIPYARD_GRPC_PORT)", "--metrics-port=$(SHIPYARD_METRICS_PORT)"),
        missing={"latencyP99": "Triton exports request durations as cumulative microsecond counters "
                               "(nv_inference_request_duration_us), not histograms; judge the mean with a prometheus "
                               "metric or map a histogram in spec.serving.runtime.metrics.latencyP99",
                 "ttftP99": "Triton has no time-to-first-token histogram of the request for every model",
                 "tpotP99": "Triton has no time-per-output-token histogram"},
    ),
    # vLLM's OpenAI-compatible server: https://docs.vllm.ai/en/latest/design/metrics/ (histograms
    # vllm:e2e_request_latency_seconds, vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds, which
    # supersedes vllm:time_per_output_token_seconds; HTTP counters http_requests_total{handler,method,status} with
    # status grouped as 2xx/4xx/5xx, from prometheus_fastapi_instrumentator). The API handlers only (/v1/...), so
    # that the /health probes do not dilute the error rate.
    "vllm": PresetSpec(
        ports={"http": 8000},
        probes={"readiness": Probe(path="/health"), "liveness": Probe(path="/health")},
        metrics=RuntimeMetrics(
            error_rate=ErrorRateMapping(errors=(_counter("http_requests_total", handler="/v1/.*", status="5xx"),),
                                        total=(_counter("http_requests_total", handler="/v1/.*"),)),
            latency_p99=QuantileMapping(histogram="vllm:e2e_request_latency_seconds"),
            ttft_p99=QuantileMapping(histogram="vllm:time_to_first_token_seconds"),
            tpot_p99=QuantileMapping(histogram="vllm:inter_token_latency_seconds")),
        model_mount_path="/model",
        args=("--model", "$(SHIPYARD_MODEL_PATH)", "--served-model-name", "$(SHIPYARD_MODEL_NAME)",
              "--port", "$(SHIPYARD_HTTP_PORT)"),
        missing={},
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# Resolution


@dataclass(frozen=True)
class ResolvedRuntime:
    """A runtime with its preset applied: what the pod template and the metric providers use."""

    preset: Preset | None
    command: tuple[str, ...]
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    ports: Mapping[PortName, int]  # http and/or grpc, and metrics (defaults to http)
    metrics_path: str
    probes: Mapping[str, Probe]  # readiness, liveness, startup (absent: a TCP check)
    model_mount_path: str
    metrics: RuntimeMetrics

    @property
    def serving_port_name(self) -> PortName:
        return "http" if "http" in self.ports else "grpc"


def _overlay(base: Mapping[Any, Any], override: object | None, names: tuple[str, ...]) -> dict[Any, Any]:
    """``base`` with each of ``names`` that ``override`` sets (not None) replaced by its value. Pure."""
    out = dict(base)
    for name in names:
        value = getattr(override, name, None)
        if value is not None:
            out[name] = value
    return out


def resolve_runtime(runtime: Runtime) -> ResolvedRuntime:
    """The runtime with its preset's values under every field it leaves unset. Pure."""
    preset = PRESET_SPECS[runtime.preset] if runtime.preset is not None else None
    ports: dict[PortName, int] = _overlay(preset.ports if preset else {}, runtime.ports, ("http", "grpc", "metrics"))
    if "metrics" not in ports and "http" in ports:
        ports["metrics"] = ports["http"]
    probes: dict[str, Probe] = _overlay(preset.probes if preset else {}, runtime.probes,
                                        ("readiness", "liveness", "startup"))
    if "readiness" in probes:
        probes.setdefault("liveness", probes["readiness"])
    if "liveness" in probes:
        probes.setdefault("startup", probes["liveness"])
    env = dict(preset.env) if preset else {}
    env.update((e.name, e.value) for e in runtime.env)
    mapped = preset.metrics if preset else RuntimeMetrics()
    if runtime.metrics is not None:
        mapped = mapped.model_copy(update={k: v for k, v in runtime.metrics if v is not None})
    return ResolvedRuntime(
        preset=runtime.preset,
        command=runtime.command or (preset.command if preset else ()),
        args=runtime.args or (preset.args if preset else ()),
        env=tuple(env.items()),
        ports=ports,
        metrics_path=runtime.metrics_path or (preset.metrics_path if preset else contract.PATH_METRICS),
        probes=probes,
        model_mount_path=runtime.model_mount_path or (preset.model_mount_path if preset else DEFAULT_MODEL_MOUNT),
        metrics=mapped,
    )


def assess_builtin(builtin: str, runtime: Runtime | None) -> str | None:
    """Why ``builtin`` cannot be measured with this runtime (None: it can). Pure; admission renders the same
    decision to CEL (``build_builtin_rules``)."""
    if builtin == "predictionAgreement" and runtime is not None:
        return ("predictionAgreement is measured by Shipyard's own server, which copies requests to the candidate "
                "(a shadow step): remove spec.serving.runtime")
    if runtime is None:
        if builtin in SHIPYARD_BUILTINS:
            return None
        return (f"{builtin} needs a runtime that exports it (spec.serving.runtime with preset vllm, or its "
                f"metrics.{builtin} mapping): Shipyard's own server has no token timings")
    if runtime.metrics is not None and runtime.metrics.mapping(builtin) is not None:
        return None
    if runtime.preset is None:
        return (f"{builtin} is not mapped for this runtime: set spec.serving.runtime.metrics.{builtin} (how to "
                "compute it from the runtime's metrics) or use a preset that maps it")
    spec = PRESET_SPECS[runtime.preset]
    if spec.metrics.mapping(builtin) is not None:
        return None
    why = spec.missing.get(builtin, "the preset does not map it")
    return (f"{builtin} is not available with runtime preset {runtime.preset}: {why}; or set "
            f"spec.serving.runtime.metrics.{builtin}")


def _presets_mapping(builtin: str) -> list[str]:
    return [p for p in PRESETS if PRESET_SPECS[p].metrics.mapping(builtin) is not None]


def build_builtin_rules() -> tuple[schema.Cel, ...]:
    """CEL rules (on the ModelDeployment's spec) refusing builtins the runtime cannot give: one per builtin, the
    same decision as ``assess_builtin``."""
    rules: list[schema.Cel] = []
    for builtin in MAPPED_BUILTINS:
        uses = (f"has(self.rollout.analysis) && self.rollout.analysis.metrics.exists(m, has(m.builtin) && "
                f"m.builtin == '{builtin}')")
        mapped = f"(has(self.serving.runtime.metrics) && has(self.serving.runtime.metrics.{builtin}))"
        presets = _presets_mapping(builtin)
        by_preset = (f"(has(self.serving.runtime.preset) && self.serving.runtime.preset in "
                     f"[{', '.join(repr(p) for p in presets)}])") if presets else "false"
        shipyard = "true" if builtin in SHIPYARD_BUILTINS else "false"
        rule = (f"!({uses}) || (!has(self.serving) || !has(self.serving.runtime) ? {shipyard} : "
                f"({mapped} || {by_preset}))")
        lacking = [p for p in PRESETS if p not in presets]
        where = (f"Shipyard's own server and the presets {', '.join(lacking)} do not export it"
                 if builtin not in SHIPYARD_BUILTINS else f"the presets {', '.join(lacking)} do not export it")
        rules.append(schema.Cel(
            rule, f"spec.rollout.analysis.metrics: builtin {builtin} is not available with this runtime ({where}); "
                  f"set spec.serving.runtime.metrics.{builtin} or use a preset that maps it (docs/runtimes.md)",
            field_path=".rollout.analysis.metrics", reason="FieldValueInvalid"))
    return tuple(rules)


# ---------------------------------------------------------------------------------------------------------------
# Selecting a version's pods in Prometheus

_POD_NAME_PREFIX_MAX: Final = 58  # Kubernetes cuts a generateName longer than this before adding 5 characters


def build_pod_regex(deployment: str) -> str:
    """A PromQL regular expression (fully anchored) matching the pod names of ``deployment``'s pods only.

    Pods are ``<deployment>-<pod-template-hash>-<5 characters>``; a version whose name extends another's
    (``m-1-0`` and ``m-1-0-rc1``) has one more dash-separated part, which this does not match. Where the generated
    prefix is longer than Kubernetes keeps (58 characters), the pod name is the prefix cut there plus 5 characters.
    Deployment names are DNS labels (``naming``): nothing in them needs escaping.
    """
    if len(deployment) + 1 + 10 + 1 <= _POD_NAME_PREFIX_MAX:
        return deployment + "-[a-z0-9]+-[a-z0-9]+"
    return (deployment + "-")[:_POD_NAME_PREFIX_MAX] + "[-a-z0-9]*"
