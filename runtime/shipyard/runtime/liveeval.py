"""`shipyard-runtime evaluate`: score a live Open Inference Protocol v2 endpoint with a gate dataset.

The `job` analysis provider runs it against a canary, so that a rollout checks the canary's accuracy on the real
serving path: the compression gate's datasets (`shipyard.runtime.datasets`) are sent in batches to
`POST {url}/v2/models/{model}/infer`, the answers scored with the gate's metrics (`shipyard.runtime.evaluate`),
and the outcome written as one line on stdout and in the termination log, ending with the primary metric as
`contract.build_value_field` (`[value=0.9756]`) for the analysis metric's thresholds.

Metrics per task: classification `accuracy` (+ `agreement`, the fraction of top-1 predictions equal to the
reference's, with `--reference-url`); binary `auc`, `accuracy` (+ `agreement` of the predicted class); embedding
`cosine` and `nn_agreement` against the reference's outputs (the stable version's Service: required).

Exit codes: `contract.EXIT_MEASURED` (0) scored and every `--min` holds; `contract.EXIT_FAILED` (1) scored but a
`--min` failed; 2 could not measure (bad flags, dataset, endpoint unreachable, HTTP error, malformed answer,
outputs that do not fit the dataset), with a message naming what failed.

Pure: `build_config`, `build_minimums`, `build_metric_names`, `assess_minimums`, `build_batches`,
`assess_outputs`, `evaluate_scores`, `evaluate_minimums`, `build_summary_line`. Does I/O: `fetch_model_io` and
`query_outputs` (HTTP through `shipyard.runtime.oipclient`, a thread pool of `--concurrency` workers),
`run_evaluation` (also loads the dataset) and `main` (stdout, stderr logs, the termination log).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent import futures
from typing import Any, NoReturn

import numpy as np
import torch

from shipyard import contract
from shipyard.runtime import compress, datasets, evaluate, oipclient, report

log = logging.getLogger("shipyard.runtime.liveeval")

EXIT_CANNOT_MEASURE = 2
DEFAULT_SAMPLES = 1000
DEFAULT_BATCH_SIZE = 32
DEFAULT_CONCURRENCY = 4
MAX_CONCURRENCY = 64
AGREEMENT = "agreement"  # top-1 (or predicted-class) agreement with the reference's outputs


class ConfigError(ValueError):
    """A flag or environment variable is missing or invalid."""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    url: str
    model: str
    dataset: str
    samples: int = DEFAULT_SAMPLES
    batch_size: int = DEFAULT_BATCH_SIZE
    reference_url: str | None = None
    reference_model: str | None = None  # default: `model` (the stable serves the same ModelDeployment)
    minimums: tuple[tuple[str, float], ...] = ()
    timeout_s: float = oipclient.DEFAULT_TIMEOUT_S
    termination_log: str | None = contract.TERMINATION_LOG
    concurrency: int = DEFAULT_CONCURRENCY
    retries: int = oipclient.DEFAULT_RETRIES
    max_response_bytes: int = oipclient.DEFAULT_MAX_RESPONSE_BYTES
    log_level: str = "INFO"


@dataclasses.dataclass(frozen=True)
class Outcome:
    code: int
    line: str


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=f"{contract.RUNTIME_COMMAND} {contract.EVALUATE_SUBCOMMAND}",
        description="Score a live Open Inference Protocol v2 endpoint with an evaluation dataset (the `job` "
        "analysis provider runs it against a canary). Prints one line ending with [value=<primary metric>]; "
        f"exit {contract.EXIT_MEASURED} measured, {contract.EXIT_FAILED} a --min failed, "
        f"{EXIT_CANNOT_MEASURE} could not measure.",
    )
    add = parser.add_argument
    add("--url", help=f"the candidate's base URL, e.g. http://digits-canary:8080 (env {contract.ENV_ENDPOINT})")
    add("--model", help=f"the OIP model name (env {contract.ENV_MODEL_NAME})")
    add("--dataset", required=True, metavar="REF",
        help="builtin:<name> or a loader package.module:function (as the compression's evaluation.dataset)")
    add("--samples", type=int, default=DEFAULT_SAMPLES, metavar="N",
        help="the first N evaluation samples, at most the dataset's (1000)")
    add("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="B", help="rows per request (32)")
    add("--reference-url", metavar="URL", help="the stable version's base URL: required for embedding datasets, "
        f"adds '{AGREEMENT}' for classification and binary ones (env {contract.ENV_REFERENCE_ENDPOINT})")
    add("--reference-model", metavar="MODEL", help="the reference's OIP model name (default: --model)")
    add("--min", action="append", default=[], metavar="METRIC=VALUE", dest="minimums",
        help="fail (exit 1) when METRIC is below VALUE; repeatable, e.g. --min accuracy=0.95")
    add("--timeout", type=float, default=oipclient.DEFAULT_TIMEOUT_S, metavar="SECONDS",
        help="per request: to connect, and each wait for the server (10)")
    add("--termination-log", default=contract.TERMINATION_LOG, metavar="PATH",
        help=f"where the one-line outcome goes too ({contract.TERMINATION_LOG}; '' = nowhere)")
    add("--concurrency", type=int, default=DEFAULT_CONCURRENCY, metavar="N", help="requests in flight (4)")
    add("--retries", type=int, default=oipclient.DEFAULT_RETRIES, metavar="N",
        help="retries of a request on connection errors only (refused, reset, DNS), with backoff (5)")
    add("--max-response-bytes", type=int, default=oipclient.DEFAULT_MAX_RESPONSE_BYTES, metavar="BYTES",
        help="largest response body accepted (64 MiB)")
    add("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def build_minimums(items: Sequence[str]) -> tuple[tuple[str, float], ...]:
    """`--min METRIC=VALUE` flags as (metric, value) pairs; raises ConfigError naming the bad one. Pure."""
    seen: dict[str, float] = {}
    for item in items:
        metric, sep, text = item.partition("=")
        metric = metric.strip()
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not sep or not metric or not math.isfinite(value):
            raise ConfigError(f"--min {item!r}: expected METRIC=NUMBER, e.g. accuracy=0.95")
        if metric in seen:
            raise ConfigError(f"--min {metric} is given twice")
        seen[metric] = value
    return tuple(seen.items())


def build_config(argv: Sequence[str], env: Mapping[str, str]) -> EvalConfig:
    """The evaluation settings from flags over the environment (pure); raises ConfigError."""
    args = build_parser().parse_args(list(argv))

    def pick(flag: str | None, name: str) -> str | None:
        value = flag if flag is not None else env.get(name)
        return value.strip() or None if value is not None else None

    url = pick(args.url, contract.ENV_ENDPOINT)
    model = pick(args.model, contract.ENV_MODEL_NAME)
    reference_url = pick(args.reference_url, contract.ENV_REFERENCE_ENDPOINT)
    if url is None:
        raise ConfigError(f"no endpoint: pass --url or set {contract.ENV_ENDPOINT}")
    if model is None:
        raise ConfigError(f"no model name: pass --model or set {contract.ENV_MODEL_NAME}")
    for flag, value in (("--url", url), ("--reference-url", reference_url)):
        if value is not None:
            try:
                oipclient.build_endpoint(value)
            except ValueError as error:
                raise ConfigError(f"{flag}: {error}") from None
    for flag, number, low, high in (
        ("--samples", args.samples, 1, None),
        ("--batch-size", args.batch_size, 1, None),
        ("--concurrency", args.concurrency, 1, MAX_CONCURRENCY),
        ("--retries", args.retries, 0, 100),
        ("--max-response-bytes", args.max_response_bytes, 1024, None),
    ):
        if number < low or (high is not None and number > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ConfigError(f"{flag} must be {bounds}, got {number}")
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise ConfigError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    return EvalConfig(
        url=url,
        model=model,
        dataset=args.dataset,
        samples=args.samples,
        batch_size=args.batch_size,
        reference_url=reference_url,
        reference_model=(args.reference_model or "").strip() or None,
        minimums=build_minimums(args.minimums),
        timeout_s=args.timeout,
        termination_log=args.termination_log or None,
        concurrency=args.concurrency,
        retries=args.retries,
        max_response_bytes=args.max_response_bytes,
        log_level=args.log_level,
    )


# ------------------------------------------------------------------------------------------------ pure parts


def build_metric_names(task: str, has_reference: bool) -> tuple[str, ...]:
    """The metrics `evaluate` reports for a task, the primary one first. Pure."""
    if task == "embedding":
        return ("cosine", "nn_agreement")
    names = ("accuracy",) if task == "classification" else ("auc", "accuracy")
    return (*names, AGREEMENT) if has_reference else names


def assess_minimums(minimums: Sequence[tuple[str, float]], task: str, has_reference: bool) -> list[str]:
    """Problems with the `--min` metrics for this task (empty = all measurable) and with the reference. Pure."""
    problems = []
    if task == "embedding" and not has_reference:
        problems.append(
            f"embedding datasets compare the candidate's outputs with the reference's: pass --reference-url "
            f"(or set {contract.ENV_REFERENCE_ENDPOINT})"
        )
    names = build_metric_names(task, True)
    for metric, _ in minimums:
        if metric not in names:
            problems.append(f"--min {metric}: not a metric of {task} datasets (metrics: {', '.join(names)})")
        elif metric == AGREEMENT and not has_reference:
            problems.append(f"--min {metric}: needs --reference-url (agreement with the reference's predictions)")
    return problems


def build_batches(inputs: Sequence[torch.Tensor], batch_size: int) -> list[list[np.ndarray]]:
    """The dataset's input tensors cut into requests of `batch_size` rows, as numpy arrays (bfloat16 travels as
    float32, as OIP's BF16 does over JSON). Pure."""
    arrays = [(t.float() if t.dtype == torch.bfloat16 else t).detach().cpu().numpy() for t in inputs]
    total = int(arrays[0].shape[0])
    return [[a[start : start + batch_size] for a in arrays] for start in range(0, total, batch_size)]


def assess_outputs(
    task: str, outputs: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor | None
) -> list[str]:
    """Why the candidate's (and reference's) outputs cannot be scored for the task (empty = they can). Pure."""
    shape = list(outputs.shape)
    problems = []
    if task == "classification":
        if outputs.dim() != 2:
            problems.append(f"outputs of shape {shape} are not [N, classes] logits")
        elif labels is not None and labels.numel() and outputs.shape[1] <= int(labels.max()):
            top = int(labels.max())
            problems.append(f"outputs of shape {shape} have {shape[1]} classes, the labels go up to {top}")
    elif task == "binary" and outputs.numel() != outputs.shape[0]:
        problems.append(f"outputs of shape {shape} are not one logit per sample")
    elif task == "embedding" and outputs.dim() != 2:
        problems.append(f"outputs of shape {shape} are not [N, D] vectors")
    if reference is not None and reference.shape != outputs.shape:
        problems.append(f"the reference's outputs of shape {list(reference.shape)} differ from the candidate's {shape}")
    return problems


def evaluate_scores(
    task: str, outputs: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor | None
) -> dict[str, float]:
    """The task's metrics (evaluate.evaluate_metrics), plus `agreement` with the reference for labelled tasks.
    Pure."""
    scores = evaluate.evaluate_metrics(task, outputs, labels, reference)
    if reference is not None and task == "classification":
        scores[AGREEMENT] = evaluate.evaluate_accuracy(outputs, reference.argmax(dim=-1))
    elif reference is not None and task == "binary":
        same = (outputs.reshape(-1) > 0) == (reference.reshape(-1) > 0)
        scores[AGREEMENT] = float(same.to(torch.float64).mean())
    return scores


def evaluate_minimums(scores: Mapping[str, float], minimums: Sequence[tuple[str, float]]) -> list[str]:
    """Each `--min` that does not hold, as `metric value < minimum` (NaN never holds). Pure."""
    return [
        f"{metric} {_number(scores[metric])} < {minimum:g}"
        for metric, minimum in minimums
        if not scores[metric] >= minimum
    ]


def _number(value: float) -> str:
    return f"{value:.4f}"


def build_summary_line(
    *,
    dataset: str,
    url: str,
    reference_url: str | None,
    scores: Mapping[str, float],
    primary: str,
    samples: int,
    latencies_s: Sequence[float],
    retries: int = 0,
    failures: Sequence[str] = (),
) -> str:
    """The one-line outcome: what was scored where, the metrics, the request figures, the failed minimums, and
    `[value=<primary metric>]` last, never cut (the termination message stays under Kubernetes' 4 KiB). Pure."""
    against = f" against {reference_url}" if reference_url else ""
    metrics = ", ".join(f"{name} {_number(value)}" for name, value in scores.items())
    p50 = statistics.median(latencies_s) * 1e3 if latencies_s else math.nan
    extra = f", {retries} connection retr{'ies' if retries != 1 else 'y'}" if retries else ""
    line = (
        f"Evaluated {dataset} at {url}{against}: {metrics} on {samples} samples "
        f"({len(latencies_s)} requests, p50 {p50:.1f} ms{extra})"
    )
    if failures:
        line += f"; below the minimum: {', '.join(failures)}"
    return build_capped_line(line, contract.build_value_field(scores[primary]))


def build_capped_line(text: str, tail: str = "") -> str:
    """`text` on one line, cut so that `text tail` fits the termination message (bytes, not characters). Pure."""
    limit = report.TERMINATION_LINE_LIMIT - (len(tail.encode()) + 1 if tail else 0)
    line = report.build_one_line(text, limit)
    while len(line.encode()) > limit:  # non-ASCII text: characters are more than one byte each
        line = line[: max(0, len(line) - (len(line.encode()) - limit) - 3)] + "..."
    return f"{line} {tail}" if tail else line


# ------------------------------------------------------------------------------------------------------- I/O


@dataclasses.dataclass(frozen=True)
class ModelIO:
    inputs: list[dict[str, Any]]
    output: dict[str, Any]  # the first declared output: the one the model's forward returns


def build_tensor_metadata(metadata: Mapping[str, Any]) -> Mapping[str, Any]:
    """The metadata without BYTES inputs: a model that takes text lists its text input beside the token-id inputs
    (`textinput`), and the gate datasets feed the token ids. Pure."""
    inputs = metadata.get("inputs")
    if not isinstance(inputs, list):
        return metadata
    kept = [spec for spec in inputs if not (isinstance(spec, dict) and spec.get("datatype") == "BYTES")]
    return {**metadata, "inputs": kept} if kept else metadata


def fetch_model_io(client: oipclient.OipClient, model: str, dataset: datasets.Dataset) -> ModelIO:
    """The model's declared inputs and first output, checked against the dataset's input tensors."""
    metadata = build_tensor_metadata(client.fetch_metadata(model))
    inputs = oipclient.build_tensor_specs(metadata, "inputs")
    outputs = oipclient.build_tensor_specs(metadata, "outputs")
    problems = datasets.assess_inputs(dataclasses.replace(dataset, train_inputs=()), inputs)
    if problems:
        raise oipclient.EndpointError(
            f"dataset {dataset.name!r} does not fit the inputs of model {model!r} at {client.endpoint.display}: "
            + "; ".join(problems)
        )
    log.info("Fetched the metadata of model %s at %s: inputs %s, output %s", model, client.endpoint.display,
             [spec["name"] for spec in inputs], outputs[0]["name"])
    return ModelIO(inputs, outputs[0])


def query_outputs(
    executor: futures.Executor,
    client: oipclient.OipClient,
    model: str,
    io: ModelIO,
    batches: Sequence[Sequence[np.ndarray]],
) -> list[futures.Future[tuple[np.ndarray, float]]]:
    """Submit one inference request per batch; each future gives (output array, seconds the request took)."""

    def one(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, float]:
        body = oipclient.build_infer_body(io.inputs, arrays, io.output["name"])
        started = time.perf_counter()
        answer = client.query_infer(model, body)
        elapsed = time.perf_counter() - started
        return oipclient.build_output_array(answer, io.output, int(arrays[0].shape[0])), elapsed

    return [executor.submit(one, arrays) for arrays in batches]


def _gather(pending: Sequence[futures.Future[tuple[np.ndarray, float]]]) -> tuple[torch.Tensor, list[float]]:
    done, _ = futures.wait(pending, return_when=futures.FIRST_EXCEPTION)
    for future in pending:  # the first failure in request order, not in completion order
        error = future.exception() if future in done else None
        if error is not None:
            raise error
    results = [future.result() for future in pending]
    outputs = torch.from_numpy(np.concatenate([array for array, _ in results])).float()
    return outputs, [elapsed for _, elapsed in results]


def run_evaluation(config: EvalConfig) -> Outcome:
    """Load the dataset, score the endpoint (and the reference), judge the minimums; never raises for expected
    failures (they are exit 2 outcomes naming what failed)."""
    display = config.url
    try:
        display = oipclient.build_endpoint(config.url).display
        started = time.perf_counter()
        dataset = datasets.load_dataset(config.dataset, samples=config.samples)
        log.info("Loaded dataset %s (%s, %d evaluation samples) in %.2fs", dataset.name, dataset.task,
                 dataset.eval_size, time.perf_counter() - started)
        has_reference = config.reference_url is not None
        problems = assess_minimums(config.minimums, dataset.task, has_reference)
        if problems:
            raise ConfigError("; ".join(problems))
        return _score(config, dataset)
    except (ConfigError, datasets.DatasetError, oipclient.EndpointError) as error:
        return Outcome(EXIT_CANNOT_MEASURE, build_capped_line(f"Could not evaluate {config.dataset} at {display}: "
                                                              f"{error}"))


def _score(config: EvalConfig, dataset: datasets.Dataset) -> Outcome:
    def client(url: str) -> oipclient.OipClient:
        return oipclient.OipClient(oipclient.build_endpoint(url), timeout_s=config.timeout_s, retries=config.retries,
                                   max_response_bytes=config.max_response_bytes)

    candidate = client(config.url)
    reference = client(config.reference_url) if config.reference_url else None
    reference_model = config.reference_model or config.model
    batches = build_batches(dataset.eval_inputs, config.batch_size)
    executor = futures.ThreadPoolExecutor(config.concurrency, thread_name_prefix="evaluate")
    try:
        io = fetch_model_io(candidate, config.model, dataset)
        reference_io = fetch_model_io(reference, reference_model, dataset) if reference else None
        started = time.perf_counter()
        pending = query_outputs(executor, candidate, config.model, io, batches)
        reference_pending = (
            query_outputs(executor, reference, reference_model, reference_io, batches)
            if reference and reference_io else []
        )
        outputs, latencies = _gather(pending)
        reference_outputs = _gather(reference_pending)[0] if reference_pending else None
        log.info("Queried %d requests of up to %d rows at %s%s in %.2fs", len(batches), config.batch_size,
                 candidate.endpoint.display, " and the reference" if reference else "", time.perf_counter() - started)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        candidate.close()
        if reference:
            reference.close()
    problems = assess_outputs(dataset.task, outputs, dataset.eval_labels, reference_outputs)
    if problems:
        raise oipclient.EndpointError(
            f"the outputs of model {config.model!r} do not fit the {dataset.task} dataset {dataset.name!r}: "
            + "; ".join(problems)
        )
    scores = evaluate_scores(dataset.task, outputs, dataset.eval_labels, reference_outputs)
    primary = evaluate.PRIMARY_METRIC[dataset.task]
    if math.isnan(scores[primary]):
        raise oipclient.EndpointError(f"{primary} is undefined on these {dataset.eval_size} samples (one class only)")
    failures = evaluate_minimums(scores, config.minimums)
    line = build_summary_line(
        dataset=dataset.name,
        url=candidate.endpoint.display,
        reference_url=reference.endpoint.display if reference else None,
        scores=scores,
        primary=primary,
        samples=dataset.eval_size,
        latencies_s=latencies,
        retries=candidate.connection_retries + (reference.connection_retries if reference else 0),
        failures=failures,
    )
    return Outcome(contract.EXIT_FAILED if failures else contract.EXIT_MEASURED, line)


def main(argv: list[str]) -> int:
    """Entry point of `shipyard-runtime evaluate`: prints the outcome line, writes it to the termination log."""
    try:
        config = build_config(argv, os.environ)
    except ConfigError as error:
        line = build_capped_line(f"Could not evaluate: {error}")
        print(line, flush=True)
        compress.apply_termination_log(_termination_log_flag(argv), line)
        return EXIT_CANNOT_MEASURE
    logging.basicConfig(
        level=getattr(logging, config.log_level),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        outcome = run_evaluation(config)
    except Exception as error:  # a bug or an unforeseen failure: still one line and exit 2, the traceback in the log
        log.exception("Failed with an unexpected %s", type(error).__name__)
        text = f"unexpected {type(error).__name__}: {str(error).strip() or '(no message)'}"
        outcome = Outcome(EXIT_CANNOT_MEASURE, build_capped_line(f"Could not evaluate {config.dataset}: {text}"))
    levels = {contract.EXIT_MEASURED: logging.INFO, contract.EXIT_FAILED: logging.WARNING}
    log.log(levels.get(outcome.code, logging.ERROR), "%s", outcome.line)
    print(outcome.line, flush=True)
    compress.apply_termination_log(config.termination_log, outcome.line)
    return outcome.code


def _termination_log_flag(argv: Sequence[str]) -> str | None:
    """The --termination-log of a command line that did not parse (best effort), else the default."""
    for i, arg in enumerate(argv):
        if arg == "--termination-log" and i + 1 < len(argv):
            return argv[i + 1] or None
        if arg.startswith("--termination-log="):
            return arg.partition("=")[2] or None
    return contract.TERMINATION_LOG
