"""The compression recipe: the one definition of ``spec.compression``'s steps, gate and compiled form. Pure.

The operator embeds these types in the ModelDeployment (``shipyard.operator.spec``: the CRD is generated from them)
and writes them into the compression Job's config file; the runtime reads that file with the same types
(``shipyard.runtime.recipe``). A field added here appears in the CRD, the operator and the runtime at once.

``build_recipe_document`` is what the artifact's content address hashes: every field with its default made explicit
(so writing a default out changes nothing), except fields added after artifacts existed, which count only when set
(``__key_when_set__``), so that the keys of existing artifacts stay the same.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Final, Literal, TypeAlias

from pydantic import Field

from shipyard.contract import schema

QuantizeScheme: TypeAlias = Literal["int8-dynamic", "int8-weight-only", "int8-embedding", "fp8", "int4-weight-only"]
QUANTIZE_SCHEMES: Final[tuple[QuantizeScheme, ...]] = (
    "int8-dynamic", "int8-weight-only", "int8-embedding", "fp8", "int4-weight-only")
CUDA_ONLY_SCHEMES: Final[frozenset[str]] = frozenset({"fp8", "int4-weight-only"})
EMBEDDING_SCHEMES: Final[frozenset[str]] = frozenset({"int8-embedding"})
STEP_KINDS: Final = ("prune", "quantize", "distill")
FACTORY_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_]*([.][A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
DATASET_PATTERN: Final = (r"^(builtin:[a-z0-9]([-a-z0-9]*[a-z0-9])?|"
                          r"[A-Za-z_][A-Za-z0-9_]*([.][A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*)$")
DEFAULT_STRUCTURED_NORM: Final = 2

LearningRate = Annotated[float, Field(gt=0, le=10)]
BatchSize = Annotated[int, Field(ge=1, le=65536)]


class _KeyedModel(schema.ApiModel):
    """A recipe part: ``__key_when_set__`` names the fields (Python names) that count in the artifact key only when
    they differ from their default (added after artifacts existed)."""

    __key_when_set__: ClassVar[frozenset[str]] = frozenset()

    def build_key_document(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            default = info.get_default(call_default_factory=True)
            if value is None or (name in self.__key_when_set__ and value == default):
                continue
            out[info.alias or name] = value.build_key_document() if isinstance(value, _KeyedModel) else (
                dict(value) if isinstance(value, dict) else value)
        return out


class Prune(_KeyedModel):
    """Pruning of weights."""

    __constraints__ = (schema.requires("norm", "scope", "structured", what="prune.norm"),)
    __key_when_set__ = frozenset({"lr", "batch_size"})

    amount: Annotated[float, Field(gt=0, lt=1)]
    """Fraction of weights (global) or channels (structured) to remove, in (0, 1)."""
    scope: Literal["global", "structured"] = "global"
    """global = L1 unstructured over all layers (sparse weights, encoded compactly); structured = Ln-norm pruning of
    whole channels that physically shrinks layers. Default global."""
    norm: Literal[1, 2] | None = None
    """Norm ranking channels for structured pruning (1 or 2; default 2). Only with scope structured."""
    fine_tune_epochs: Annotated[int, Field(ge=0, le=100)] = 0
    """Epochs of fine-tuning after pruning (0 = none). Default 0."""
    lr: LearningRate = 0.001
    """Learning rate of the fine-tuning. Default 0.001."""
    batch_size: BatchSize = 64
    """Batch size of the fine-tuning. Default 64."""

    @property
    def structured_norm(self) -> int:
        """The norm structured pruning ranks channels by (``norm``, default 2)."""
        return self.norm or DEFAULT_STRUCTURED_NORM


class Quantize(_KeyedModel):
    """Quantization with torchao."""

    scheme: QuantizeScheme
    """int8-dynamic (int8 activations and weights), int8-weight-only, int8-embedding (embedding tables) run on CPU;
    fp8 and int4-weight-only need a CUDA GPU."""

    @property
    def needs_cuda(self) -> bool:
        return self.scheme in CUDA_ONLY_SCHEMES


class Distill(_KeyedModel):
    """Knowledge distillation from the current model (teacher) into a smaller student."""

    __key_when_set__ = frozenset({"student_kwargs"})

    student: Annotated[str, Field(max_length=256, pattern=FACTORY_PATTERN)]
    """Factory of the student nn.Module, as module:function importable in the image."""
    student_kwargs: Annotated[dict[str, Any], Field(json_schema_extra=schema.k8s(preserve_unknown=True))] = Field(
        default_factory=dict)
    """Keyword arguments of the student factory. Default none."""
    temperature: Annotated[float, Field(gt=0, le=100)] = 4.0
    """Softmax temperature T of the KL term (scaled by T^2), > 0. Default 4."""
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.5
    """Weight of the KL (teacher) term; 1 - alpha weighs the cross-entropy on labels. Default 0.5."""
    epochs: Annotated[int, Field(ge=1, le=1000)] = 10
    """Training epochs. Default 10."""
    lr: LearningRate = 0.001
    """Learning rate. Default 0.001."""
    batch_size: BatchSize = 64
    """Training batch size. Default 64."""


CompressionAction: TypeAlias = Prune | Quantize | Distill


class CompressionStep(_KeyedModel):
    """One compression step; exactly one of prune, quantize and distill."""

    __constraints__ = schema.one_of(*STEP_KINDS, what="each spec.compression.steps item")

    prune: Prune | None = None
    """Pruning of weights."""
    quantize: Quantize | None = None
    """Quantization with torchao."""
    distill: Distill | None = None
    """Knowledge distillation from the current model (teacher) into a smaller student."""

    @property
    def action(self) -> CompressionAction:
        """The step's one action."""
        action = self.prune or self.quantize or self.distill
        assert action is not None  # the one_of constraint
        return action

    @property
    def kind(self) -> str:
        return "prune" if self.prune else "quantize" if self.quantize else "distill"


class Evaluation(_KeyedModel):
    """The accuracy gate; the Job fails (and nothing is rolled out) when the loss exceeds the tolerance."""

    __key_when_set__ = frozenset({"max_relative_loss"})

    dataset: Annotated[str, Field(max_length=256, pattern=DATASET_PATTERN)]
    """Evaluation dataset: builtin:<name> (e.g. builtin:digits) or a loader module:function importable in the
    image."""
    max_relative_accuracy_loss: Annotated[float, Field(ge=0, le=1)] = 0.01
    """Largest accepted relative accuracy loss, (source - compressed) / source, in [0, 1]. Default 0.01."""
    samples: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    """Number of evaluation samples (at most the dataset's size). Default 1000."""
    max_relative_loss: Annotated[dict[str, Annotated[float, Field(ge=0, le=1)]],
                                 Field(json_schema_extra=schema.k8s(max_properties=16))] = Field(default_factory=dict)
    """Per-metric tolerances of datasets that report several metrics (e.g. nn_agreement: 0.05 for the embedding
    set), each in [0, 1]; a metric not listed uses maxRelativeAccuracyLoss."""


CompiledMode: TypeAlias = Literal["auto", "on", "off"]
COMPILED_MODES: Final[tuple[CompiledMode, ...]] = ("auto", "on", "off")


def _compiled_problem(fields: Any) -> str | None:
    if fields.get("aotInductor") and fields.get("mode") == "off":
        return "@aotInductor: cannot be true with mode off (aotInductor: true asks for the package, mode off for none)"
    return None


class Compiled(_KeyedModel):
    """The served form of the compressed model: eager PyTorch, or an AOTInductor package the compression Job builds
    next to the weights (native CPU code, float32, gated on the same evaluation as the eager model). On small models
    torchao's int8 layers are slower in eager mode than fp32, compiled they are faster; on others eager wins: the Job
    measures both forms it can build and records the faster one for its device, which the inference pods serve.
    Part of the recipe (except mode auto, the default, and the defaults of the other fields while nothing is set):
    changing it makes a new artifact. Building the package adds tens of seconds to the Job, and its memory."""

    __constraints__ = (schema.Constraint(
        schema.Cel("!has(self.aotInductor) || !self.aotInductor || !has(self.mode) || self.mode != 'off'",
                   "spec.compression.compiled.aotInductor cannot be true with mode off", field_path=".aotInductor"),
        _compiled_problem),)
    __key_when_set__ = frozenset({"mode"})

    mode: CompiledMode = "auto"
    """auto: build the package when the Job's device can (a CPU Job; not after fp8/int4, which quantize for CUDA),
    measure the eager model and the package, and serve the faster on pods of that device (others serve the eager
    model); a package that cannot be built or fails the gate leaves the eager model. on: the package is required
    (the Job fails without it) and served (a pod that cannot serve it fails to start: CPU pods only). off: the eager
    model only, no package. Default auto."""
    aot_inductor: bool = False
    """Deprecated, kept for specs written before mode: true asks for the package as mode auto does (with auto, the
    faster form is served). Default false."""
    max_batch_size: Annotated[int, Field(ge=2, le=65536)] = 1024
    """Largest batch the package accepts; a pod whose spec.serving.batching.maxBatchSize is larger serves the eager
    model (with mode on, admission refuses it). Default 1024."""
    max_autotune: bool = False
    """Let Inductor benchmark its C++ GEMM templates (e.g. AMX/VNNI int8 kernels) on the Job's node and keep the
    fastest: minutes more on a cold compile cache, tuned to that node's CPU. Default false."""

    @property
    def builds_package(self) -> bool:
        """Whether the Job tries to build the package (auto and on; off never)."""
        return self.mode != "off"

    @property
    def requires_package(self) -> bool:
        """Whether the Job fails without the package (mode on)."""
        return self.mode == "on"

    @property
    def is_default(self) -> bool:
        """Nothing set: the artifact key leaves the compiled document out (the keys made before the field existed)."""
        return self == Compiled()


Steps = Annotated[list[CompressionStep], Field(min_length=1, max_length=8,
                                               json_schema_extra=schema.k8s(list_type="atomic"))]


def build_recipe_document(steps: list[CompressionStep], evaluation: Evaluation, compiled: Compiled) -> dict[str, Any]:
    """The recipe as the artifact key hashes it (see the module docstring); JSON-serialisable. Pure."""
    document: dict[str, Any] = {"steps": [s.build_key_document() for s in steps],
                                "evaluation": evaluation.build_key_document()}
    # Absent while nothing is set (mode auto, the default, counts only when set), so that the keys of artifacts made
    # before these fields existed stay the same: the key also hashes the image, whose runtime compresses, so an
    # artifact made for (image, recipe) is what that image's runtime makes again (see docs/operator.md).
    if compiled.aot_inductor or not compiled.is_default:
        document["compiled"] = compiled.build_key_document()
    return document


def assess_step_order(steps: list[CompressionStep], prefix: str = "steps") -> list[str]:
    """Problems with the order of steps that no schema expresses (pruning quantized weights, quantizing the same
    layers twice), each naming the step. Pure."""
    problems = []
    quantized: dict[str, int] = {}  # "linear"/"embedding" -> index of the step that quantized them
    for i, step in enumerate(steps):
        if step.distill is not None:
            quantized.clear()  # a fresh student replaces the model
        elif step.prune is not None and "linear" in quantized:
            problems.append(f"{prefix}[{i}].prune: cannot follow the quantize step at {prefix}[{quantized['linear']}] "
                            "(quantized weights cannot be pruned); put prune before quantize")
        elif step.quantize is not None:
            target = "embedding" if step.quantize.scheme in EMBEDDING_SCHEMES else "linear"
            if target in quantized:
                problems.append(f"{prefix}[{i}].quantize: the {target} layers were already quantized by "
                                f"{prefix}[{quantized[target]}]")
            quantized[target] = i
    return problems
