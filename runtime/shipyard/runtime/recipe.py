"""The compression config file (`shipyard-runtime compress --config FILE`): parsing and validation.

`build_config` and `assess_*` are pure: they turn the parsed JSON/YAML document into frozen dataclasses or
a list of problems, each naming the exact field (`steps[1].prune.amount: must be in (0, 1), got 1.5`).
`load_config_document` reads the file.

The document mirrors the ModelDeployment's `spec.compression` (camelCase keys) plus where to read and write:

    source: /models/digits                    # a model directory (shipyard-model.json + weights)
    output: /artifacts/digits-3f2a...         # the artifact directory to create (must not exist)
    name: digits                              # optional; default: the source manifest's name
    steps:                                    # applied in order, one key each
      - prune: {amount: 0.9, scope: global, fineTuneEpochs: 2, lr: 0.001, batchSize: 64}
      - prune: {amount: 0.5, scope: structured, norm: 2}
      - quantize: {scheme: int8-dynamic}  # or int8-weight-only, int8-embedding, fp8, int4-weight-only
      - distill: {student: pkg.mod:factory, studentKwargs: {}, temperature: 4, alpha: 0.5, epochs: 10,
                  lr: 0.001, batchSize: 64}
    evaluation: {dataset: builtin:digits, maxRelativeAccuracyLoss: 0.01, samples: 1000,
                 maxRelativeLoss: {nn_agreement: 0.05}}
    terminationLog: /dev/termination-log      # optional
    logDir: /artifacts/tensorboard/digits     # optional: TensorBoard event files of training losses
    encoding: auto                            # auto | safetensors | safetensors+zstd
    latency: {batchSizes: [1, 64], budgetSeconds: 1.0}
    compiled: {aotInductor: false, maxBatchSize: 1024, maxAutotune: false}  # also an AOTInductor package (CPU)
    seed: 0
    overwrite: false
    reuseExisting: false                      # an existing output made by the same recipe from the same source is
                                              # verified and reused (the operator sets this: its Jobs are retried)
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from shipyard import contract
from shipyard.runtime import quantize

STEP_KINDS = ("prune", "quantize", "distill")
SCHEMES = tuple(quantize.SCHEMES)
CUDA_ONLY_SCHEMES = quantize.CUDA_ONLY_SCHEMES
EMBEDDING_SCHEMES = quantize.EMBEDDING_SCHEMES
ENCODINGS = ("auto", "safetensors", "safetensors+zstd")
_FACTORY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
_BUILTIN_RE = re.compile(r"^builtin:[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class ConfigError(ValueError):
    """The config file is invalid; `problems` lists every problem with its field path."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid compression config: " + "; ".join(self.problems))


@dataclasses.dataclass(frozen=True)
class PruneStep:
    amount: float
    scope: str = "global"
    norm: int = 2
    fine_tune_epochs: int = 0
    lr: float = 1e-3
    batch_size: int = 64
    kind: str = "prune"

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"amount": self.amount, "scope": self.scope}
        if self.scope == "structured":
            params["norm"] = self.norm
        params["fineTuneEpochs"] = self.fine_tune_epochs
        if self.fine_tune_epochs:
            params.update(lr=self.lr, batchSize=self.batch_size)
        return params


@dataclasses.dataclass(frozen=True)
class QuantizeStep:
    scheme: str
    kind: str = "quantize"

    def params(self) -> dict[str, Any]:
        return {"scheme": self.scheme}


@dataclasses.dataclass(frozen=True)
class DistillStep:
    student: str
    student_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    temperature: float = 4.0
    alpha: float = 0.5
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    kind: str = "distill"

    def params(self) -> dict[str, Any]:
        return {
            "student": self.student,
            "studentKwargs": dict(self.student_kwargs),
            "temperature": self.temperature,
            "alpha": self.alpha,
            "epochs": self.epochs,
            "lr": self.lr,
            "batchSize": self.batch_size,
        }


Step = PruneStep | QuantizeStep | DistillStep


@dataclasses.dataclass(frozen=True)
class Evaluation:
    dataset: str
    max_relative_accuracy_loss: float = 0.01
    samples: int = 1000
    max_relative_loss: Mapping[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Latency:
    batch_sizes: tuple[int, ...] = (1, 64)
    budget_seconds: float = 1.0


@dataclasses.dataclass(frozen=True)
class Compiled:
    aot_inductor: bool = False
    max_batch_size: int = 1024
    max_autotune: bool = False


@dataclasses.dataclass(frozen=True)
class CompressionConfig:
    source: str
    output: str
    steps: tuple[Step, ...]
    evaluation: Evaluation
    name: str | None = None
    termination_log: str = contract.TERMINATION_LOG
    log_dir: str | None = None
    encoding: str = "auto"
    latency: Latency = Latency()
    compiled: Compiled = Compiled()
    seed: int = 0
    overwrite: bool = False
    reuse_existing: bool = False


class _Fields:
    """Reads typed fields from one mapping, collecting problems under a path prefix."""

    def __init__(self, raw: Any, path: str, problems: list[str], known: Sequence[str]) -> None:
        self.raw = raw if isinstance(raw, Mapping) else {}
        self.path = path
        self.problems = problems
        if not isinstance(raw, Mapping):
            problems.append(f"{path}: must be an object, got {_describe(raw)}")
        for key in self.raw:
            if key not in known:
                problems.append(f"{self._at(str(key))}: unknown field (known: {', '.join(known)})")

    def _at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self.raw and self.raw[key] is not None

    def number(
        self,
        key: str,
        default: float | None,
        low: float,
        high: float,
        *,
        low_open: bool = False,
        high_open: bool = False,
    ) -> float:
        if not self.has(key):
            if default is None:
                self.problems.append(f"{self._at(key)}: required")
                return math.nan
            return default
        value = self.raw[key]
        interval = f"{'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.problems.append(f"{self._at(key)}: must be a number in {interval}, got {_describe(value)}")
            return math.nan
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if below or above:
            self.problems.append(f"{self._at(key)}: must be in {interval}, got {_num(value)}")
        return float(value)

    def integer(self, key: str, default: int | None, low: int, high: int) -> int:
        if not self.has(key):
            if default is None:
                self.problems.append(f"{self._at(key)}: required")
                return 0
            return default
        value = self.raw[key]
        if isinstance(value, bool) or not isinstance(value, int):
            self.problems.append(f"{self._at(key)}: must be an integer in [{low}, {high}], got {_describe(value)}")
            return 0
        if not low <= value <= high:
            self.problems.append(f"{self._at(key)}: must be in [{low}, {high}], got {value}")
        return value

    def string(
        self,
        key: str,
        default: str | None,
        *,
        choices: Sequence[str] | None = None,
        pattern: re.Pattern[str] | None = None,
        hint: str = "",
    ) -> str:
        if not self.has(key):
            if default is None:
                self.problems.append(f"{self._at(key)}: required")
                return ""
            return default
        value = self.raw[key]
        if not isinstance(value, str) or not value:
            self.problems.append(f"{self._at(key)}: must be a non-empty string, got {_describe(value)}")
            return ""
        if choices is not None and value not in choices:
            self.problems.append(f"{self._at(key)}: must be one of {', '.join(choices)}, got {value!r}")
        if pattern is not None and not pattern.match(value):
            self.problems.append(f"{self._at(key)}: must be {hint}, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        if not self.has(key):
            return default
        value = self.raw[key]
        if not isinstance(value, bool):
            self.problems.append(f"{self._at(key)}: must be true or false, got {_describe(value)}")
            return default
        return value

    def mapping(self, key: str) -> Mapping[str, Any]:
        if not self.has(key):
            return {}
        value = self.raw[key]
        if not isinstance(value, Mapping):
            self.problems.append(f"{self._at(key)}: must be an object, got {_describe(value)}")
            return {}
        return value


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (int, float)):
        return _num(value)
    return (
        type(value).__name__
        if not isinstance(value, (list, dict))
        else ("a list" if isinstance(value, list) else "an object")
    )


def _build_prune(raw: Any, path: str, problems: list[str]) -> PruneStep:
    f = _Fields(raw, path, problems, ("amount", "scope", "norm", "fineTuneEpochs", "lr", "batchSize"))
    amount = f.number("amount", None, 0.0, 1.0, low_open=True, high_open=True)
    scope = f.string("scope", "global", choices=("global", "structured"))
    if f.has("norm") and scope != "structured":
        problems.append(f"{path}.norm: only allowed with scope structured")
    norm = f.integer("norm", 2, 1, 2)
    return PruneStep(
        amount=amount,
        scope=scope,
        norm=norm,
        fine_tune_epochs=f.integer("fineTuneEpochs", 0, 0, 100),
        lr=f.number("lr", 1e-3, 0.0, 10.0, low_open=True),
        batch_size=f.integer("batchSize", 64, 1, 65536),
    )


def _build_quantize(raw: Any, path: str, problems: list[str]) -> QuantizeStep:
    f = _Fields(raw, path, problems, ("scheme",))
    return QuantizeStep(scheme=f.string("scheme", None, choices=SCHEMES))


def _build_distill(raw: Any, path: str, problems: list[str]) -> DistillStep:
    known = ("student", "studentKwargs", "temperature", "alpha", "epochs", "lr", "batchSize")
    f = _Fields(raw, path, problems, known)
    return DistillStep(
        student=f.string("student", None, pattern=_FACTORY_RE, hint="'package.module:function'"),
        student_kwargs=dict(f.mapping("studentKwargs")),
        temperature=f.number("temperature", 4.0, 0.0, 100.0, low_open=True),
        alpha=f.number("alpha", 0.5, 0.0, 1.0),
        epochs=f.integer("epochs", 10, 1, 1000),
        lr=f.number("lr", 1e-3, 0.0, 10.0, low_open=True),
        batch_size=f.integer("batchSize", 64, 1, 65536),
    )


_STEP_BUILDERS: dict[str, Callable[[Any, str, list[str]], Step]] = {
    "prune": _build_prune,
    "quantize": _build_quantize,
    "distill": _build_distill,
}


def _build_steps(raw: Any, problems: list[str]) -> tuple[Step, ...]:
    if raw is None:
        problems.append("steps: required")
        return ()
    if not isinstance(raw, list) or not raw:
        problems.append(f"steps: must be a non-empty list of steps, got {_describe(raw)}")
        return ()
    if len(raw) > 8:
        problems.append(f"steps: at most 8 steps, got {len(raw)}")
    steps: list[Step] = []
    for i, item in enumerate(raw):
        path = f"steps[{i}]"
        if not isinstance(item, Mapping) or not item:
            problems.append(f"{path}: must be an object with one of {', '.join(STEP_KINDS)}, got {_describe(item)}")
            continue
        unknown = [k for k in item if k not in STEP_KINDS]
        if unknown:
            problems.append(f"{path}: unknown step {unknown[0]!r} (known: {', '.join(STEP_KINDS)})")
            continue
        if len(item) != 1:
            problems.append(f"{path}: must set exactly one of {', '.join(STEP_KINDS)}, got {', '.join(item)}")
            continue
        kind = next(iter(item))
        steps.append(_STEP_BUILDERS[kind](item[kind] if item[kind] is not None else {}, f"{path}.{kind}", problems))
    return tuple(steps)


def assess_step_order(steps: Sequence[Step]) -> list[str]:
    """Problems with the order of steps (pruning quantized weights, quantizing twice). Pure."""
    problems = []
    quantized: dict[str, int] = {}  # "linear"/"embedding" -> index of the step that quantized them
    for i, step in enumerate(steps):
        if isinstance(step, DistillStep):
            quantized.clear()  # a fresh student replaces the model
        elif isinstance(step, PruneStep) and "linear" in quantized:
            problems.append(
                f"steps[{i}].prune: cannot follow the quantize step at steps[{quantized['linear']}] "
                "(quantized weights cannot be pruned); put prune before quantize"
            )
        elif isinstance(step, QuantizeStep):
            target = "embedding" if step.scheme in EMBEDDING_SCHEMES else "linear"
            if target in quantized:
                problems.append(
                    f"steps[{i}].quantize: the {target} layers were already quantized by steps[{quantized[target]}]"
                )
            quantized[target] = i
    return problems


def assess_device(steps: Sequence[Step], *, cuda_available: bool) -> list[str]:
    """Problems running `steps` on this machine (CUDA-only schemes without CUDA). Pure."""
    return [
        f"steps[{i}].quantize.scheme: {step.scheme!r} needs a CUDA GPU and none is available "
        "(on CPU use int8-dynamic or int8-weight-only, or give the Job an nvidia.com/gpu)"
        for i, step in enumerate(steps)
        if isinstance(step, QuantizeStep) and step.scheme in CUDA_ONLY_SCHEMES and not cuda_available
    ]


def build_config(raw: Any) -> CompressionConfig:
    """Validate a parsed config document; raises ConfigError listing every problem. Pure."""
    problems: list[str] = []
    known = (
        "source",
        "output",
        "name",
        "steps",
        "evaluation",
        "terminationLog",
        "logDir",
        "encoding",
        "latency",
        "compiled",
        "seed",
        "overwrite",
        "reuseExisting",
    )
    top = _Fields(raw, "", problems, known)
    source = top.string("source", None)
    output = top.string("output", None)
    name = top.string("name", "") or None
    steps = _build_steps(top.raw.get("steps"), problems)
    problems += assess_step_order(steps)
    if not top.has("evaluation"):
        problems.append("evaluation: required")
    ev = _Fields(
        top.raw.get("evaluation", {}),
        "evaluation",
        problems,
        ("dataset", "maxRelativeAccuracyLoss", "samples", "maxRelativeLoss"),
    )
    dataset = ev.string("dataset", None if top.has("evaluation") else "builtin:none")
    if dataset and not (_BUILTIN_RE.match(dataset) or _FACTORY_RE.match(dataset)):
        problems.append(f"evaluation.dataset: must be builtin:<name> or 'package.module:function', got {dataset!r}")
    overrides = {}
    for metric, value in ev.mapping("maxRelativeLoss").items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            problems.append(f"evaluation.maxRelativeLoss.{metric}: must be a number in [0, 1], got {_describe(value)}")
        else:
            overrides[str(metric)] = float(value)
    evaluation = Evaluation(
        dataset=dataset,
        max_relative_accuracy_loss=ev.number("maxRelativeAccuracyLoss", 0.01, 0.0, 1.0),
        samples=ev.integer("samples", 1000, 1, 1_000_000),
        max_relative_loss=overrides,
    )
    lat = _Fields(top.raw.get("latency", {}), "latency", problems, ("batchSizes", "budgetSeconds"))
    batch_sizes: tuple[int, ...] = (1, 64)
    if lat.has("batchSizes"):
        values = lat.raw["batchSizes"]
        if (
            not isinstance(values, list)
            or not values
            or not all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 4096 for b in values)
        ):
            problems.append(f"latency.batchSizes: must be a non-empty list of integers in [1, 4096], got {values!r}")
        else:
            batch_sizes = tuple(values)
    latency = Latency(
        batch_sizes=batch_sizes, budget_seconds=lat.number("budgetSeconds", 1.0, 0.0, 60.0, low_open=True)
    )
    comp = _Fields(top.raw.get("compiled", {}), "compiled", problems, ("aotInductor", "maxBatchSize", "maxAutotune"))
    compiled = Compiled(
        aot_inductor=comp.boolean("aotInductor", False),
        max_batch_size=comp.integer("maxBatchSize", 1024, 2, 65536),
        max_autotune=comp.boolean("maxAutotune", False),
    )
    log_dir = top.string("logDir", "") or None
    config = CompressionConfig(
        source=source,
        output=output,
        steps=steps,
        evaluation=evaluation,
        name=name,
        termination_log=top.string("terminationLog", contract.TERMINATION_LOG),
        log_dir=log_dir,
        encoding=top.string("encoding", "auto", choices=ENCODINGS),
        latency=latency,
        compiled=compiled,
        seed=top.integer("seed", 0, 0, 2**31 - 1),
        overwrite=top.boolean("overwrite", False),
        reuse_existing=top.boolean("reuseExisting", False),
    )
    if problems:
        raise ConfigError(problems)
    return config


def load_config_document(path: str | Path) -> Any:
    """Read a JSON or YAML config file (YAML for .yaml/.yml, JSON otherwise); raises ConfigError."""
    import yaml

    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"config file {file}: cannot be read: {exc.strerror or exc}"]) from exc
    try:
        if file.suffix in (".yaml", ".yml"):
            return yaml.safe_load(text)
        return json.loads(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(
            [f"config file {file}: not valid {'YAML' if file.suffix in ('.yaml', '.yml') else 'JSON'}: {exc}"]
        ) from exc
