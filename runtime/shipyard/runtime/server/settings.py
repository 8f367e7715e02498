"""The inference server's settings: command-line flags over the environment the operator sets.

Pure: `build_config` parses flags, falls back to environment variables (`shipyard.contract` names them) and
checks ranges (`assess_config`); it raises ConfigError naming the flag or variable at fault.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shipyard import contract
from shipyard.runtime import faults, shadowplan

DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_DELAY_MS = 5.0
DEFAULT_MAX_QUEUE = 512
DEFAULT_MAX_PAYLOAD_BYTES = 16 * 1024 * 1024
DEFAULT_REQUEST_TIMEOUT_S = 30.0
DEFAULT_KEEP_ALIVE_TIMEOUT_S = 75.0  # longer than common load balancers' idle timeouts (60 s)
DEFAULT_DRAIN_PROPAGATION_S = 5.0
DEFAULT_GRACE_PERIOD_S = 30.0
UNVERSIONED = "unknown"
COMPILED_MODES = ("auto", "on", "off")
BATCH_SIZING_MODES = ("measured", "max")
HTTP_MODES = ("on", "off")


@dataclass(frozen=True)
class ServerConfig:
    artifact: str
    host: str = "0.0.0.0"
    port: int = contract.SERVING_PORT
    grpc_port: int | None = None  # the gRPC front end's port (0: any free one); None: no gRPC
    http: bool = True  # False (--http off): no REST listener at all; the gRPC port alone serves (and no /metrics)
    model_name: str = ""
    model_version: str = UNVERSIONED
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_delay_ms: float = DEFAULT_MAX_DELAY_MS
    max_queue: int = DEFAULT_MAX_QUEUE
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    keep_alive_timeout_s: float = DEFAULT_KEEP_ALIVE_TIMEOUT_S
    drain_propagation_s: float = DEFAULT_DRAIN_PROPAGATION_S
    grace_period_s: float = DEFAULT_GRACE_PERIOD_S
    fault_error_rate: float = 0.0
    fault_extra_latency_ms: float = 0.0
    fault_seed: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    compile: bool = False
    compile_mode: str | None = None
    compiled: str = "auto"  # the artifact's AOTInductor package: auto (when it fits) | on (required) | off
    batch_sizing: str = "measured"  # batches up to the fastest timed size within max_batch_size | max: up to it
    threads: int | None = None  # torch intra-op threads; None = from the CPU limit
    warmup_iterations: int = 3
    log_level: str = "INFO"
    uvloop: bool = True
    shadow: shadowplan.ShadowConfig | None = None  # shadow traffic to a candidate (SHIPYARD_SHADOW_*); None: off
    # the JSON file of shadow settings polled while serving (SHIPYARD_SHADOW_CONFIG); None: only `shadow` applies
    shadow_file: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


class ConfigError(ValueError):
    """A flag or environment variable has an invalid value."""


def _env_number(env: Mapping[str, str], name: str, kind: Callable[[str], Any]) -> Any:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return kind(raw.strip())
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not a valid {kind.__name__}") from None


def _pick_compiled(flag: str | None, env: Mapping[str, str]) -> str:
    if flag is not None:
        return flag
    raw = env.get(contract.ENV_COMPILED, "").strip()
    if not raw:
        return "auto"
    if raw not in COMPILED_MODES:
        raise ConfigError(f"environment variable {contract.ENV_COMPILED}={raw!r} is not one of "
                          f"{', '.join(COMPILED_MODES)}")
    return raw


def plan_http(flag: str | None, env: Mapping[str, str]) -> bool:
    """Whether the REST front end listens: `--http` over the environment's SHIPYARD_HTTP (on | off), on by default."""
    raw = flag if flag is not None else env.get(contract.ENV_HTTP, "").strip().lower() or "on"
    if raw not in HTTP_MODES:
        raise ConfigError(f"environment variable {contract.ENV_HTTP}={raw!r} is not one of {', '.join(HTTP_MODES)}")
    return raw == "on"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{contract.RUNTIME_COMMAND} {contract.SERVE_SUBCOMMAND}",
        description="Serve a model artifact over the Open Inference Protocol v2 (REST, and gRPC with --grpc-port). "
        "Flags override the "
        "environment the operator sets.",
    )
    add = parser.add_argument
    add("--artifact", help=f"model artifact directory (env {contract.ENV_ARTIFACT_PATH})")
    add("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    add(
        "--port",
        type=int,
        default=contract.SERVING_PORT,
        help=f"listen port (default {contract.SERVING_PORT})",
    )
    add(
        "--grpc-port",
        type=int,
        help="also serve inference.GRPCInferenceService (KServe V2 / Triton gRPC) on this port (0: any free one); "
        "default: off",
    )
    add("--http", choices=HTTP_MODES, default=None,
        help=f"on (default) | off: no REST listener (and no /metrics), the --grpc-port alone serves (env "
        f"{contract.ENV_HTTP})")
    add(
        "--model-name",
        help=f"OIP model name (env {contract.ENV_MODEL_NAME}; default: the artifact folder name)",
    )
    add("--model-version", help=f"version reported in metadata and metrics (env {contract.ENV_MODEL_VERSION})")
    add("--max-batch-size", type=int, help=f"rows per batch (env {contract.ENV_MAX_BATCH_SIZE}; default 32)")
    add(
        "--max-delay-ms",
        type=float,
        help=f"longest a partial batch may wait to fill under saturation (env {contract.ENV_MAX_DELAY_MS}; default 5)",
    )
    add("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, help="queued requests before 503 (default 512)")
    add(
        "--max-payload-bytes",
        type=int,
        default=DEFAULT_MAX_PAYLOAD_BYTES,
        help="request body limit (413 above)",
    )
    add("--request-timeout-s", type=float, default=DEFAULT_REQUEST_TIMEOUT_S, help="per-request timeout (504)")
    add(
        "--keep-alive-timeout-s",
        type=float,
        default=DEFAULT_KEEP_ALIVE_TIMEOUT_S,
        help="close connections idle this long, and answer 408 to a request half-received this long (default 75)",
    )
    add(
        "--drain-propagation-s",
        type=float,
        default=DEFAULT_DRAIN_PROPAGATION_S,
        help="after SIGTERM, keep serving this long with readiness false (endpoint propagation)",
    )
    add(
        "--grace-period-s",
        type=float,
        default=DEFAULT_GRACE_PERIOD_S,
        help="exit within this long after SIGTERM (match terminationGracePeriodSeconds)",
    )
    add(
        "--fault-error-rate",
        type=float,
        help=f"fraction of requests failed with 500 (env {contract.ENV_FAULT_ERROR_RATE})",
    )
    add(
        "--fault-extra-latency-ms",
        type=float,
        help=f"latency added to every inference response (env {contract.ENV_FAULT_EXTRA_LATENCY_MS})",
    )
    add("--fault-seed", type=int, help="seed of the fault draws (reproducible runs)")
    add("--device", default="auto", help="auto | cpu | cuda | cuda:N[,M] (default auto: every GPU, else CPU)")
    add("--dtype", default="float32", help="float32 | float16 | bfloat16 (default float32)")
    add("--compile", action="store_true", help="torch.compile the model before warm-up")
    add("--compile-mode", help="torch.compile mode, e.g. reduce-overhead or max-autotune")
    add("--compiled", choices=COMPILED_MODES, default=None,
        help="the served form (env " + contract.ENV_COMPILED + "): auto (default: the form the compression Job "
        "measured faster on this device kind, the AOTInductor package only when it fits the device, torch version, "
        "dtype and max batch size; else the eager model, saying why) | on (the package; fail without it) | off "
        "(always the eager model)")
    add("--batch-sizing", choices=BATCH_SIZING_MODES, default="measured",
        help="measured (default): time the model at start-up at batch sizes 1, 2, 4, ... up to the max batch size "
        "and fill batches up to the size with the most rows per second (a backlog goes out as several such "
        "batches) | max: fill batches up to the max batch size")
    add("--threads", type=int, help="torch intra-op threads (default: OMP_NUM_THREADS when set, else the cgroup CPU "
        "limit / affinity)")
    add("--warmup-iterations", type=int, default=3, help="forward passes per warm-up batch size (default 3)")
    add("--log-level", default="INFO", help="logging level (default INFO)")
    add("--no-uvloop", dest="uvloop", action="store_false", help="use the standard asyncio event loop")
    return parser


def build_config(argv: Sequence[str], env: Mapping[str, str]) -> ServerConfig:
    """The server configuration from command-line flags over the operator's environment (pure).

    Raises ConfigError naming the flag or variable at fault.
    """
    parser = build_parser()
    args = parser.parse_args(list(argv))
    artifact = args.artifact or env.get(contract.ENV_ARTIFACT_PATH, "")
    if not artifact:
        raise ConfigError(f"no artifact: pass --artifact PATH or set {contract.ENV_ARTIFACT_PATH}")

    def pick(flag: Any, name: str, kind: Callable[[str], Any], default: Any) -> Any:
        if flag is not None:
            return flag
        value = _env_number(env, name, kind)
        return default if value is None else value

    model_name = args.model_name or env.get(contract.ENV_MODEL_NAME, "").strip() or Path(artifact).name
    model_version = args.model_version or env.get(contract.ENV_MODEL_VERSION, "").strip() or UNVERSIONED
    config = ServerConfig(
        artifact=artifact,
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port,
        http=plan_http(args.http, env),
        model_name=model_name,
        model_version=model_version,
        max_batch_size=pick(args.max_batch_size, contract.ENV_MAX_BATCH_SIZE, int, DEFAULT_MAX_BATCH_SIZE),
        max_delay_ms=pick(args.max_delay_ms, contract.ENV_MAX_DELAY_MS, float, DEFAULT_MAX_DELAY_MS),
        max_queue=args.max_queue,
        max_payload_bytes=args.max_payload_bytes,
        request_timeout_s=args.request_timeout_s,
        keep_alive_timeout_s=args.keep_alive_timeout_s,
        drain_propagation_s=args.drain_propagation_s,
        grace_period_s=args.grace_period_s,
        fault_error_rate=pick(args.fault_error_rate, contract.ENV_FAULT_ERROR_RATE, float, 0.0),
        fault_extra_latency_ms=pick(args.fault_extra_latency_ms, contract.ENV_FAULT_EXTRA_LATENCY_MS, float, 0.0),
        fault_seed=args.fault_seed,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        compile_mode=args.compile_mode,
        compiled=_pick_compiled(args.compiled, env),
        batch_sizing=args.batch_sizing,
        threads=args.threads,
        warmup_iterations=args.warmup_iterations,
        log_level=args.log_level.upper(),
        uvloop=args.uvloop,
        shadow=_pick_shadow(env),
        shadow_file=_pick_shadow_file(env),
    )
    return assess_config(config)


def _pick_shadow_file(env: Mapping[str, str]) -> str | None:
    path = env.get(contract.ENV_SHADOW_CONFIG, "").strip()
    if not path:
        return None
    if env.get(contract.ENV_SHADOW_URL, "").strip():
        raise ConfigError(f"set one of {contract.ENV_SHADOW_URL} (fixed shadow settings) and "
                          f"{contract.ENV_SHADOW_CONFIG} (a file of settings polled while serving), not both")
    return path


def _pick_shadow(env: Mapping[str, str]) -> shadowplan.ShadowConfig | None:
    try:
        return shadowplan.build_shadow_config(env)
    except shadowplan.ShadowConfigError as error:
        raise ConfigError(str(error)) from None


def assess_config(config: ServerConfig) -> ServerConfig:
    """Check value ranges; raises ConfigError naming the setting (pure)."""
    checks = [
        (1 <= config.port <= 65535 or config.port == 0, "--port must be within 0..65535"),
        (config.grpc_port is None or 0 <= config.grpc_port <= 65535, "--grpc-port must be within 0..65535"),
        (
            config.grpc_port is None or config.grpc_port == 0 or config.grpc_port != config.port,
            "--grpc-port must differ from --port",
        ),
        (config.http or config.grpc_port is not None, "--http off needs --grpc-port (nothing else would serve)"),
        (config.max_batch_size >= 1, f"max batch size must be >= 1 ({contract.ENV_MAX_BATCH_SIZE})"),
        (config.max_delay_ms >= 0, f"max delay must be >= 0 ms ({contract.ENV_MAX_DELAY_MS})"),
        (config.max_queue >= 1, "--max-queue must be >= 1"),
        (config.max_payload_bytes >= 1024, "--max-payload-bytes must be >= 1024"),
        (config.request_timeout_s > 0, "--request-timeout-s must be > 0"),
        (config.keep_alive_timeout_s > 0, "--keep-alive-timeout-s must be > 0"),
        (config.drain_propagation_s >= 0, "--drain-propagation-s must be >= 0"),
        (config.grace_period_s > 0, "--grace-period-s must be > 0"),
        (config.threads is None or config.threads >= 1, "--threads must be >= 1"),
        (config.warmup_iterations >= 0, "--warmup-iterations must be >= 0"),
        (
            bool(config.model_name) and "/" not in config.model_name,
            "the model name must be non-empty without '/'",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        faults.build_fault_config(config.fault_error_rate, config.fault_extra_latency_ms)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return config
