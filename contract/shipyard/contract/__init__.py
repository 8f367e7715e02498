"""The contract between the operator and the runtime images: command lines, environment, ports, metric names.

Pure constants and pure builders, no I/O. Both images install this package (``shipyard-contract``: pydantic only,
never Kopf, lightkube, aiohttp or torch), so that the operator's pod templates and the runtime's CLIs cannot drift
apart. ``shipyard.contract.recipe`` holds the compression recipe types, ``shipyard.contract.schema`` the typed-API
machinery they and the ModelDeployment are built on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Runtime CLI (console script of the runtime image).
RUNTIME_COMMAND = "shipyard-runtime"
COMPRESS_SUBCOMMAND = "compress"
SERVE_SUBCOMMAND = "serve"
EVALUATE_SUBCOMMAND = "evaluate"  # scores a live OIP endpoint with a gate dataset (the `job` analysis provider)
FETCH_SUBCOMMAND = "fetch"  # downloads a model (s3://, https://) before it is loaded: init containers, compression

# Environment the operator sets on inference pods and compression Jobs.
ENV_MODEL_NAME = "SHIPYARD_MODEL_NAME"  # the ModelDeployment's name, used as the OIP model name
ENV_MODEL_VERSION = "SHIPYARD_MODEL_VERSION"  # the image tag (or digest) = the version
ENV_ARTIFACT_PATH = "SHIPYARD_ARTIFACT_PATH"  # directory of the model artifact to serve
ENV_MAX_BATCH_SIZE = "SHIPYARD_MAX_BATCH_SIZE"
# On the container of a runtime other than Shipyard's (spec.serving.runtime): the model's directory and its ports,
# for its command and args to reference as $(NAME).
ENV_MODEL_PATH = "SHIPYARD_MODEL_PATH"
ENV_HTTP_PORT = "SHIPYARD_HTTP_PORT"
ENV_GRPC_PORT = "SHIPYARD_GRPC_PORT"
ENV_METRICS_PORT = "SHIPYARD_METRICS_PORT"
ENV_MAX_DELAY_MS = "SHIPYARD_MAX_DELAY_MS"
# The served form (spec.compression.compiled.mode: auto | on | off), set on inference pods of a compressed artifact;
# `serve --compiled` overrides it. An env var, not a flag, so that an older runtime image ignores it.
ENV_COMPILED = "SHIPYARD_COMPILED"
ENV_HTTP = "SHIPYARD_HTTP"  # "off": serve gRPC only (needs a gRPC port); unset or "on": REST on the serving port
ENV_FAULT_ERROR_RATE = "SHIPYARD_FAULT_ERROR_RATE"  # fault injection, off by default (0)
ENV_FAULT_EXTRA_LATENCY_MS = "SHIPYARD_FAULT_EXTRA_LATENCY_MS"
# Shadow traffic (docs/shadow.md), set on the *stable's* pods while a rollout's shadow step runs: the stable's server
# also sends a sample of the inference requests it answered to the candidate and compares the two answers.
ENV_SHADOW_URL = "SHIPYARD_SHADOW_URL"  # the candidate's base URL (its own Service): http://digits-1-1-0.ns:8080
ENV_SHADOW_VERSION = "SHIPYARD_SHADOW_VERSION"  # the candidate's version: the `candidate` label of the shadow metrics
ENV_SHADOW_PERCENT = "SHIPYARD_SHADOW_PERCENT"  # share of answered (200) inference requests copied, 0..100
ENV_SHADOW_COMPARE = "SHIPYARD_SHADOW_COMPARE"  # top1 | cosine | maxabs (SHADOW_COMPARES)
ENV_SHADOW_TOLERANCE = "SHIPYARD_SHADOW_TOLERANCE"  # maxabs: a row agrees when its max |difference| <= this
ENV_SHADOW_MAX_INFLIGHT = "SHIPYARD_SHADOW_MAX_INFLIGHT"  # copies in flight; over it a copy is dropped (counted)
# bytes of requests and answers held by copies in flight; over it a copy is dropped (counted)
ENV_SHADOW_MAX_INFLIGHT_BYTES = "SHIPYARD_SHADOW_MAX_INFLIGHT_BYTES"
ENV_SHADOW_TIMEOUT_MS = "SHIPYARD_SHADOW_TIMEOUT_MS"  # a copy not answered within this is dropped (outcome timeout)
# The same settings from a JSON file the server polls while it runs (about once a second), so that shadowing can be
# switched on, off or to another candidate without restarting the stable's pods: the operator mounts a ConfigMap
# (<model>-shadow) into every pod of Shipyard's server and sets this variable. A missing or empty file (or {}) is off.
ENV_SHADOW_CONFIG = "SHIPYARD_SHADOW_CONFIG"
SHADOW_CONFIG_KEY = "shadow.json"  # the ConfigMap's key, the file's name in the mounted directory
SHADOW_CONFIG_MOUNT = "/etc/shipyard/shadow"  # where the operator mounts the ConfigMap
# The file's keys and the environment variables they stand for (the file holds one JSON object of these keys).
SHADOW_FILE_KEYS = {"url": ENV_SHADOW_URL, "version": ENV_SHADOW_VERSION, "percent": ENV_SHADOW_PERCENT,
                    "compare": ENV_SHADOW_COMPARE, "tolerance": ENV_SHADOW_TOLERANCE,
                    "maxInflight": ENV_SHADOW_MAX_INFLIGHT, "maxInflightBytes": ENV_SHADOW_MAX_INFLIGHT_BYTES,
                    "timeoutMs": ENV_SHADOW_TIMEOUT_MS}
SHADOW_COMPARES = ("top1", "cosine", "maxabs")
# maxabs and cosine: a row agrees when its max |difference| <= tolerance, or its cosine similarity >= 1 - tolerance
SHADOW_DEFAULT_TOLERANCE = {"top1": 0.0, "cosine": 0.01, "maxabs": 1e-3}
SHADOW_DEFAULT_MAX_INFLIGHT = 64
SHADOW_DEFAULT_MAX_INFLIGHT_BYTES = 64 * 1024 * 1024
SHADOW_DEFAULT_TIMEOUT_MS = 1000.0
# Environment of analysis Jobs (the `job` metric provider): where the candidate serves, and the stable to compare.
ENV_ENDPOINT = "SHIPYARD_ENDPOINT"  # base URL of the candidate's own Service, e.g. http://digits-1-1-0.ns.svc:8080
ENV_REFERENCE_ENDPOINT = "SHIPYARD_REFERENCE_ENDPOINT"  # base URL of the stable's Service (absent: no stable)
ENV_STABLE_VERSION = "SHIPYARD_STABLE_VERSION"
ENV_METRIC_NAME = "SHIPYARD_METRIC_NAME"  # the analysis metric the Job measures

# Exit codes of an analysis Job (and of `shipyard-runtime evaluate`): 0 = measured (the value, if any, is judged by
# the metric's thresholds), 1 = the check itself failed, anything else = it could not measure (an Error).
EXIT_MEASURED = 0
EXIT_FAILED = 1

# Serving.
SERVING_PORT = 8080
SERVING_PORT_NAME = "http"
GRPC_PORT = 9000  # `serve --grpc-port` on inference pods with spec.serving.grpc
GRPC_PORT_NAME = "grpc"
METRICS_PORT_NAME = "metrics"  # a runtime's metrics port, where it is not its http port
GRPC_APP_PROTOCOL = "kubernetes.io/h2c"  # a Service port's appProtocol for gRPC (HTTP/2 without TLS)
SERVE_GRPC_PORT_FLAG = "--grpc-port"
# `serve` without its HTTP front end (gRPC only; probes then use grpc.health.v1): the server's --http flag (or ENV_HTTP)
SERVE_HTTP_OFF_ARGS = ("--http", "off")
PATH_LIVE = "/v2/health/live"
PATH_READY = "/v2/health/ready"
PATH_METRICS = "/metrics"

# Compression Job.
TERMINATION_LOG = "/dev/termination-log"
ARTIFACTS_MOUNT = "/artifacts"
COMPRESSION_CONFIG_MOUNT = "/etc/shipyard"
COMPRESSION_CONFIG_FILE = "compression.json"
REPORT_FILE = "report.json"  # written next to the artifact inside its directory
# The compression Job's one-line summary (its termination message) ends with these as `[key=value ...]`; the
# operator copies them into status.artifacts[].
SUMMARY_FIELDS: dict[str, type] = {
    "sourceBytes": int, "compressedBytes": int, "sourceAccuracy": float, "compressedAccuracy": float,
    "relativeAccuracyLoss": float, "sourceLatencyMs": float, "compressedLatencyMs": float, "digest": str,
}

# `shipyard-runtime fetch` (docs/model-sources.md): each flag --NAME also from SHIPYARD_FETCH_<NAME> (upper case, `-`
# as `_`); the termination message path from ENV_TERMINATION_LOG (else TERMINATION_LOG, when it is writable).
FETCH_ENV_PREFIX = "SHIPYARD_FETCH_"
ENV_TERMINATION_LOG = "SHIPYARD_TERMINATION_LOG"
# The fetch's one-line summary (its termination message) ends with these as `[key=value ...]`, like the compression
# Job's: `bytes` of the model, `files`, `seconds` of the whole fetch, `downloadedBytes` (0 on a cache hit), `digest`,
# `cacheHit`. A failed fetch's message is one line without them.
FETCH_SUMMARY_FIELDS: dict[str, type] = {
    "bytes": int, "files": int, "seconds": float, "downloadedBytes": int, "digest": str, "cacheHit": bool,
}

# Metric names the runtime exports and the operator's analysis reads.
METRIC_REQUESTS_TOTAL = "shipyard_requests_total"  # labels: model, version, code, protocol
METRIC_REQUEST_DURATION = "shipyard_request_duration_seconds"  # histogram; labels: model, version, protocol
METRIC_BATCH_SIZE = "shipyard_batch_size"  # histogram
METRIC_QUEUE_DURATION = "shipyard_queue_duration_seconds"  # histogram
METRIC_INFLIGHT = "shipyard_inflight_requests"  # gauge
METRIC_QUEUE_DEPTH = "shipyard_queue_depth"  # gauge: requests waiting for a batch
METRIC_CPU_SECONDS = "shipyard_cpu_seconds_total"  # counter: CPU time of the server process (user + system)
METRIC_MODEL_READY = "shipyard_model_ready"  # gauge 0/1
METRIC_HTTP_DURATION = "http_request_duration_seconds"  # labels: method, path (route template), status
# GPU gauges, one series per CUDA device in use (absent on CPU); labels: model, version, device ("cuda:0").
METRIC_GPU_MEMORY_ALLOCATED = "shipyard_gpu_memory_allocated_bytes"  # held by tensors
METRIC_GPU_MEMORY_RESERVED = "shipyard_gpu_memory_reserved_bytes"  # reserved by torch's caching allocator
METRIC_GPU_UTILIZATION = "shipyard_gpu_utilization_ratio"  # 0..1; only with NVML (nvidia-ml-py, extra `gpu`)
# Shadow traffic, exported by the stable's pods (labels model, version: the stable's; candidate: the candidate's
# version, from ENV_SHADOW_VERSION). predictionAgreement = increase(agreeing rows) / increase(rows) of one candidate.
METRIC_SHADOW_REQUESTS = "shipyard_shadow_requests_total"  # counter; labels + outcome (SHADOW_OUTCOMES)
METRIC_SHADOW_ROWS = "shipyard_shadow_rows_total"  # counter: rows (batch rows) of compared answers; labels + compare
METRIC_SHADOW_AGREEING_ROWS = "shipyard_shadow_agreeing_rows_total"  # counter: those rows that agreed
METRIC_SHADOW_SIMILARITY = "shipyard_shadow_similarity"  # histogram per row: cosine similarity (compare=cosine)
METRIC_SHADOW_DIFFERENCE = "shipyard_shadow_max_abs_difference"  # histogram per row: max |difference| (maxabs)
METRIC_SHADOW_INFLIGHT = "shipyard_shadow_inflight_requests"  # gauge: copies sent and not yet answered
LABEL_OUTCOME = "outcome"
LABEL_CANDIDATE = "candidate"
LABEL_COMPARE = "compare"
# compared: both answers compared; dropped: not sent, MAX_INFLIGHT copies were in flight; timeout: no answer within
# TIMEOUT_MS; error: the candidate could not be reached, answered an error, or its answer does not fit the stable's
SHADOW_OUTCOMES = ("compared", "dropped", "timeout", "error")
# The activator (scale from zero: it holds requests while a model has no pod; shipyard-activator).
METRIC_ACTIVATOR_PENDING = "shipyard_activator_pending_requests"  # gauge: requests held; labels: model
METRIC_ACTIVATOR_REQUESTS = "shipyard_activator_requests_total"  # counter; labels: model, outcome
METRIC_ACTIVATOR_HOLD = "shipyard_activator_hold_seconds"  # histogram: arrival -> forwarded; labels: model
ACTIVATOR_HEADER = "x-shipyard-activator"  # on every answer of an activator: its pod name
ACTIVATOR_HOP_HEADER = "x-shipyard-activator-hop"  # on requests an activator forwards (loop protection)
ACTIVATOR_METRICS_PORT = 9091  # the activator's /metrics and /healthz (its serving port proxies every path)
LABEL_MODEL = "model"
LABEL_VERSION = "version"
LABEL_CODE = "code"
LABEL_DEVICE = "device"
LABEL_PROTOCOL = "protocol"  # on shipyard_requests_total and shipyard_request_duration_seconds: http | grpc
PROTOCOL_HTTP = "http"
PROTOCOL_GRPC = "grpc"
PROTOCOL_OPENAI = "openai"  # the OpenAI-compatible endpoints (POST /v1/embeddings), HTTP on the serving port


def build_summary_fields(values: Mapping[str, object]) -> str:
    """`[key=value ...]` of the SUMMARY_FIELDS present (None left out), in their order."""
    return "[" + " ".join(f"{k}={values[k]}" for k in SUMMARY_FIELDS if values.get(k) is not None) + "]"


def parse_summary_fields(message: str) -> dict[str, Any]:
    """The SUMMARY_FIELDS found in a termination message (best effort: a bad value is left out)."""
    out: dict[str, Any] = {}
    for token in message.replace(",", " ").replace(";", " ").replace("[", " ").replace("]", " ").split():
        key, sep, value = token.partition("=")
        if sep and key in SUMMARY_FIELDS:
            try:
                out[key] = SUMMARY_FIELDS[key](value)
            except ValueError:
                continue
    return out


def build_fetch_summary_fields(values: Mapping[str, object]) -> str:
    """`[key=value ...]` of the FETCH_SUMMARY_FIELDS present (None left out), in their order; booleans as
    `true`/`false`."""
    def text(value: object) -> str:
        return ("true" if value else "false") if isinstance(value, bool) else str(value)

    return "[" + " ".join(f"{k}={text(values[k])}" for k in FETCH_SUMMARY_FIELDS if values.get(k) is not None) + "]"


def parse_fetch_summary_fields(message: str) -> dict[str, Any]:
    """The FETCH_SUMMARY_FIELDS found in a fetch's termination message (best effort: a bad value is left out)."""
    out: dict[str, Any] = {}
    for token in message.replace("[", " ").replace("]", " ").split():
        key, sep, value = token.partition("=")
        if not sep or key not in FETCH_SUMMARY_FIELDS:
            continue
        kind = FETCH_SUMMARY_FIELDS[key]
        if kind is bool:
            if value in ("true", "false"):
                out[key] = value == "true"
            continue
        try:
            out[key] = kind(value)
        except ValueError:
            continue
    return out


def build_value_field(value: float) -> str:
    """``[value=<number>]``: the measured value an analysis Job reports at the end of its termination message."""
    return f"[value={value!r}]"


def parse_value_field(message: str) -> float | None:
    """The last ``value=<number>`` in a termination message; None when there is none or it is not a number."""
    found: float | None = None
    for token in message.replace("[", " ").replace("]", " ").split():
        key, sep, text = token.partition("=")
        if sep and key == "value":
            try:
                found = float(text)
            except ValueError:
                continue
    return found


def build_prediction_agreement(increase: Mapping[tuple[str, tuple[tuple[str, str], ...]], float],
                               labels: Mapping[str, str] | None = None) -> float | None:
    """The builtin ``predictionAgreement`` from scraped counters: the increase of
    ``shipyard_shadow_agreeing_rows_total`` over that of ``shipyard_shadow_rows_total`` (series whose labels include
    ``labels``, e.g. the model and the candidate); None when no row was compared (no data). ``increase`` maps
    (sample name, sorted label pairs) to the increase over the window, as the operator's scrape provider keys it."""
    rows = agreeing = 0.0
    wanted = labels or {}
    for (name, pairs), value in increase.items():
        if name not in (METRIC_SHADOW_ROWS, METRIC_SHADOW_AGREEING_ROWS):
            continue
        found = dict(pairs)
        if any(found.get(key) != want for key, want in wanted.items()):
            continue
        if name == METRIC_SHADOW_ROWS:
            rows += value
        else:
            agreeing += value
    return min(1.0, agreeing / rows) if rows > 0 else None
