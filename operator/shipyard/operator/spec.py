"""Parses a ModelDeployment's body into frozen dataclasses, with the CRD's defaults applied.

Pure: no I/O, no Kopf, no Kubernetes client, no clock, no torch. The API server rejects most invalid input at
admission (crds/modeldeployments.shipyard.dev.yaml); this module checks it again, because the operator may read
objects stored before a rule or a default existed, and it checks what the schema cannot express. Any problem
raises one ``SpecError`` whose message starts with the field's path (``spec.rollout.steps[1].weight: ...``).

Defaults mirror the CRD's; a test compares them. Unknown fields are ignored (the API server prunes them).

Versions: the image tag is the version; an image pinned by digest only has the version ``sha256-<first 12 hex
digits of the digest>`` (see ``image_version``). Manual controls are annotations (``ANNOTATION_*``), parsed into
``ManualControls``; the operator never writes spec.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, Final, Literal, TypeAlias, TypeVar, cast

GPU_RESOURCE: Final = "nvidia.com/gpu"

ANNOTATION_PROMOTE: Final = "shipyard.dev/promote"  # value: the candidate version to promote now
ANNOTATION_ABORT: Final = "shipyard.dev/abort"  # value: the candidate version whose rollout to abort
ANNOTATION_RETRY: Final = "shipyard.dev/retry"  # value: any token; each new value retries the failed version once
ANNOTATION_ROLLBACK_TO: Final = "shipyard.dev/rollback-to"  # value: a version kept in status.history

# Defaults, as in the CRD.
DEFAULT_PRUNE_SCOPE: Final = "global"
DEFAULT_STRUCTURED_NORM: Final = 2
DEFAULT_FINE_TUNE_EPOCHS: Final = 0
DEFAULT_TEMPERATURE: Final = 4.0
DEFAULT_ALPHA: Final = 0.5
DEFAULT_DISTILL_EPOCHS: Final = 10
DEFAULT_LR: Final = 0.001
DEFAULT_BATCH_SIZE: Final = 64
DEFAULT_MAX_RELATIVE_ACCURACY_LOSS: Final = 0.01
DEFAULT_EVALUATION_SAMPLES: Final = 1000
DEFAULT_BACKOFF_LIMIT: Final = 1
DEFAULT_ACTIVE_DEADLINE_SECONDS: Final = 3600
DEFAULT_COMPILED_MAX_BATCH_SIZE: Final = 1024
DEFAULT_REPLICAS: Final = 1
DEFAULT_MAX_BATCH_SIZE: Final = 32
DEFAULT_MAX_DELAY_MS: Final = 5
DEFAULT_SERVICE_PORT: Final = 8080
DEFAULT_STARTUP_TIMEOUT_SECONDS: Final = 900
DEFAULT_INTERVAL: Final = "30s"
DEFAULT_INITIAL_DELAY: Final = "0s"
DEFAULT_FAILURE_LIMIT: Final = 1
DEFAULT_CONSECUTIVE_ERROR_LIMIT: Final = 4
DEFAULT_MIN_SAMPLES: Final = 1
DEFAULT_NO_DATA: Final = "Inconclusive"
DEFAULT_SCRAPE_AGGREGATION: Final = "sum"
DEFAULT_ROLLBACK_POLICY: Final = "Automatic"
DEFAULT_REVISION_HISTORY_LIMIT: Final = 10
DEFAULT_RETRY: Final = 0

# Bounds, as in the CRD.
MAX_PAUSE_SECONDS: Final = 168 * 3600.0  # a rollout step's pause (hold longer with manual: true)
MAX_INITIAL_DELAY_SECONDS: Final = 24 * 3600.0
MAX_QUANTITY_LENGTH: Final = 64
MAX_LABEL_KEY_LENGTH: Final = 317  # a qualified name: DNS-subdomain prefix (253) / name (63)
MAX_SCRAPE_LABEL_NAME_LENGTH: Final = 256

PruneScope: TypeAlias = Literal["global", "structured"]
QuantizeScheme: TypeAlias = Literal["int8-dynamic", "int8-weight-only", "int8-embedding", "fp8", "int4-weight-only"]
BuiltinMetric: TypeAlias = Literal["errorRate", "latencyP99"]
ScrapeAggregation: TypeAlias = Literal["sum", "avg", "max", "min"]
NoDataPolicy: TypeAlias = Literal["Fail", "Inconclusive", "Ignore"]
RollbackPolicy: TypeAlias = Literal["Automatic", "Manual"]
ProviderKind: TypeAlias = Literal["builtin", "prometheus", "scrape"]
StepKind: TypeAlias = Literal["prune", "quantize", "distill"]
_E = TypeVar("_E", bound=str)

PRUNE_SCOPES: Final[tuple[PruneScope, ...]] = ("global", "structured")
QUANTIZE_SCHEMES: Final[tuple[QuantizeScheme, ...]] = (
    "int8-dynamic", "int8-weight-only", "int8-embedding", "fp8", "int4-weight-only",
)
CUDA_ONLY_SCHEMES: Final[frozenset[QuantizeScheme]] = frozenset({"fp8", "int4-weight-only"})
BUILTIN_METRICS: Final[tuple[BuiltinMetric, ...]] = ("errorRate", "latencyP99")
SCRAPE_AGGREGATIONS: Final[tuple[ScrapeAggregation, ...]] = ("sum", "avg", "max", "min")
NO_DATA_POLICIES: Final[tuple[NoDataPolicy, ...]] = ("Fail", "Inconclusive", "Ignore")
ROLLBACK_POLICIES: Final[tuple[RollbackPolicy, ...]] = ("Automatic", "Manual")

# Patterns, the same as the CRD's.
_DOMAIN_COMPONENT = r"[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[.]|_|__|-+)[a-z0-9]+)*"
_IMAGE_RE: Final = re.compile(
    rf"(?P<repository>(?:{_DOMAIN_COMPONENT}(?:[.]{_DOMAIN_COMPONENT})*(?::[0-9]{{1,5}})?/)?"
    rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    r"(?::(?P<tag>[A-Za-z0-9_][-A-Za-z0-9_.]{0,127}))?"
    r"(?:@(?P<digest>sha256:[a-f0-9]{64}))?"
)
_DURATION_RE: Final = re.compile(r"(?:[0-9]+(?:[.][0-9]+)?(?:ms|s|m|h))+")
_DURATION_PART_RE: Final = re.compile(r"([0-9]+(?:[.][0-9]+)?)(ms|s|m|h)")
_DURATION_UNITS: Final[Mapping[str, float]] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_URI_RE: Final = re.compile(
    r"(?:(?:pvc|s3|gs)://[a-z0-9](?:[-a-z0-9.]*[a-z0-9])?(?:/[^ ]*)?|https://[^ /]+(?:/[^ ]*)?)"
)
_MODEL_NAME_RE: Final = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?")
_FACTORY_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:[.][A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")
_DATASET_RE: Final = re.compile(rf"builtin:[a-z0-9](?:[-a-z0-9]*[a-z0-9])?|{_FACTORY_RE.pattern}")
_DNS_LABEL_RE: Final = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN_RE: Final = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:[.][a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*")
_HTTP_URL_RE: Final = re.compile(r"https?://[^ /]+(?:/[^ ]*)?")
_CREDENTIALS_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@")  # scheme://user:password@host
_LABEL_KEY_RE: Final = re.compile(
    r"(?:[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:[.][a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
)
_LABEL_VALUE_RE: Final = re.compile(r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_PROM_NAME_RE: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_QUANTITY_RE: Final = re.compile(
    r"[+-]?(?:[0-9]+(?:[.][0-9]*)?|[.][0-9]+)(?:[KMGTPE]i|[numkMGTPE]|[eE][+-]?(?:[0-9]+(?:[.][0-9]*)?|[.][0-9]+))?"
)


class SpecError(ValueError):
    """An invalid ModelDeployment: ``field`` is the path of the offending field, ``problem`` says what is wrong."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


# ---------------------------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class ImageReference:
    """A container image reference split into its parts. ``version`` is the tag, else ``sha256-<12 hex>``."""

    reference: str
    repository: str  # [registry[:port]/]path, without tag or digest
    tag: str | None
    digest: str | None  # "sha256:<64 hex>"

    @property
    def version(self) -> str:
        if self.tag is not None:
            return self.tag
        assert self.digest is not None  # parse_image requires a tag or a digest
        return "sha256-" + self.digest.removeprefix("sha256:")[:12]


@dataclass(frozen=True)
class ModelSource:
    """Where the source model is: exactly one of ``path`` (inside the image) and ``uri``."""

    path: str | None = None
    uri: str | None = None
    name: str | None = None  # the OIP model name; None = the ModelDeployment's name

    @property
    def uri_scheme(self) -> str | None:
        """``pvc``, ``s3``, ``gs`` or ``https`` for a URI source; None for a path."""
        return None if self.uri is None else self.uri.split("://", 1)[0]

    @property
    def pvc(self) -> tuple[str, str] | None:
        """(claim, path inside the claim starting with '/') of a ``pvc://<claim>/<path>`` source, else None."""
        if self.uri_scheme != "pvc":
            return None
        assert self.uri is not None
        claim, _, rest = self.uri.removeprefix("pvc://").partition("/")
        return claim, "/" + rest.strip("/")


@dataclass(frozen=True)
class Prune:
    kind: ClassVar[StepKind] = "prune"
    amount: float  # in (0, 1)
    scope: PruneScope = "global"
    norm: int | None = None  # 1 or 2 for structured (default 2); None for global
    fine_tune_epochs: int = DEFAULT_FINE_TUNE_EPOCHS


@dataclass(frozen=True)
class Quantize:
    kind: ClassVar[StepKind] = "quantize"
    scheme: QuantizeScheme

    @property
    def needs_cuda(self) -> bool:
        return self.scheme in CUDA_ONLY_SCHEMES


@dataclass(frozen=True)
class Distill:
    kind: ClassVar[StepKind] = "distill"
    student: str  # module:function
    temperature: float = DEFAULT_TEMPERATURE
    alpha: float = DEFAULT_ALPHA
    epochs: int = DEFAULT_DISTILL_EPOCHS
    lr: float = DEFAULT_LR
    batch_size: int = DEFAULT_BATCH_SIZE


CompressionStep: TypeAlias = Prune | Quantize | Distill


@dataclass(frozen=True)
class Evaluation:
    dataset: str  # builtin:<name> or module:function
    max_relative_accuracy_loss: float = DEFAULT_MAX_RELATIVE_ACCURACY_LOSS
    samples: int = DEFAULT_EVALUATION_SAMPLES


@dataclass(frozen=True)
class Resources:
    """Container resources; quantities kept as the strings the API server stores (integers become strings)."""

    requests: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    limits: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def gpus(self) -> int:
        """Whole GPUs per container (``nvidia.com/gpu`` limit), 0 when none."""
        return int(self.limits.get(GPU_RESOURCE, "0"))

    def as_k8s(self) -> dict[str, dict[str, str]]:
        """The ``resources`` of a container spec (only the non-empty parts)."""
        out: dict[str, dict[str, str]] = {}
        if self.requests:
            out["requests"] = dict(self.requests)
        if self.limits:
            out["limits"] = dict(self.limits)
        return out


@dataclass(frozen=True)
class Compiled:
    """An AOTInductor package built next to the compressed weights (served on CPU pods when it fits)."""
    aot_inductor: bool = False
    max_batch_size: int = DEFAULT_COMPILED_MAX_BATCH_SIZE
    max_autotune: bool = False


@dataclass(frozen=True)
class Compression:
    steps: tuple[CompressionStep, ...]
    evaluation: Evaluation
    artifacts_pvc: str
    compiled: Compiled = field(default_factory=Compiled)
    resources: Resources = field(default_factory=Resources)
    backoff_limit: int = DEFAULT_BACKOFF_LIMIT
    active_deadline_seconds: int = DEFAULT_ACTIVE_DEADLINE_SECONDS

    @property
    def needs_cuda(self) -> bool:
        return any(isinstance(s, Quantize) and s.needs_cuda for s in self.steps)


@dataclass(frozen=True)
class Batching:
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_delay_ms: int = DEFAULT_MAX_DELAY_MS


@dataclass(frozen=True)
class Toleration:
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None

    def as_k8s(self) -> dict[str, object]:
        """The toleration as in a pod spec (camelCase, unset fields left out)."""
        out: dict[str, object] = {}
        for name, value in (("key", self.key), ("operator", self.operator), ("value", self.value),
                            ("effect", self.effect), ("tolerationSeconds", self.toleration_seconds)):
            if value is not None:
                out[name] = value
        return out


@dataclass(frozen=True)
class Serving:
    replicas: int = DEFAULT_REPLICAS
    resources: Resources = field(default_factory=Resources)
    batching: Batching = field(default_factory=Batching)
    node_selector: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    tolerations: tuple[Toleration, ...] = ()
    port: int = DEFAULT_SERVICE_PORT  # the Service's port; pods listen on contract.SERVING_PORT


@dataclass(frozen=True)
class RolloutStep:
    weight: int  # percent of serving.replicas given to the candidate, 1..100
    pause_seconds: float | None = None  # None = no pause
    manual: bool = False  # hold until the promote annotation names the candidate


@dataclass(frozen=True)
class BuiltinProvider:
    metric: BuiltinMetric
    kind: ClassVar[ProviderKind] = "builtin"


@dataclass(frozen=True)
class PrometheusProvider:
    query: str  # template: {{namespace}}, {{name}}, {{version}}, {{stableVersion}}
    address: str | None = None  # None = the analysis' address, else the operator's configuration
    kind: ClassVar[ProviderKind] = "prometheus"


@dataclass(frozen=True)
class ScrapeProvider:
    metric: str
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    aggregation: ScrapeAggregation = "sum"
    rate: bool = False
    kind: ClassVar[ProviderKind] = "scrape"


MetricProvider: TypeAlias = BuiltinProvider | PrometheusProvider | ScrapeProvider


@dataclass(frozen=True)
class Metric:
    """One analysed metric: a provider and at least one threshold.

    A measurement fails when value > ``max``, value < ``min``, or (comparing with the stable, measured the same
    way for the stable version) candidate > stable x (1 + ``max_relative_to_stable``).
    """

    name: str
    provider: MetricProvider
    max: float | None = None
    min: float | None = None
    max_relative_to_stable: float | None = None

    @property
    def compares_with_stable(self) -> bool:
        return self.max_relative_to_stable is not None


@dataclass(frozen=True)
class Analysis:
    metrics: tuple[Metric, ...]
    interval_seconds: float = 30.0
    initial_delay_seconds: float = 0.0
    failure_limit: int = DEFAULT_FAILURE_LIMIT
    consecutive_error_limit: int = DEFAULT_CONSECUTIVE_ERROR_LIMIT
    min_samples: int = DEFAULT_MIN_SAMPLES
    no_data: NoDataPolicy = "Inconclusive"
    prometheus_address: str | None = None

    @property
    def detection_bound_seconds(self) -> float:
        """Worst-case time from a failing candidate to a failed analysis: initialDelay + (failureLimit+1) x interval."""
        return self.initial_delay_seconds + (self.failure_limit + 1) * self.interval_seconds

    def address_for(self, metric: Metric) -> str | None:
        """The Prometheus address a prometheus-provider metric uses (None = the operator's configuration)."""
        if isinstance(metric.provider, PrometheusProvider) and metric.provider.address is not None:
            return metric.provider.address
        return self.prometheus_address


@dataclass(frozen=True)
class Rollout:
    steps: tuple[RolloutStep, ...] = ()
    startup_timeout_seconds: int = DEFAULT_STARTUP_TIMEOUT_SECONDS
    max_surge_gpus: int | None = None  # None = no limit; 0 = replace in place
    analysis: Analysis | None = None

    @property
    def effective_steps(self) -> tuple[RolloutStep, ...]:
        """The steps, or a single step of weight 100 without pause when none are given."""
        return self.steps or (RolloutStep(weight=100),)


@dataclass(frozen=True)
class Rollback:
    policy: RollbackPolicy = "Automatic"


@dataclass(frozen=True)
class ModelDeploymentSpec:
    image: str
    image_ref: ImageReference
    model: ModelSource
    compression: Compression | None = None
    serving: Serving = field(default_factory=Serving)
    rollout: Rollout = field(default_factory=Rollout)
    rollback: Rollback = field(default_factory=Rollback)
    revision_history_limit: int = DEFAULT_REVISION_HISTORY_LIMIT
    retry: int = DEFAULT_RETRY

    @property
    def version(self) -> str:
        return self.image_ref.version


@dataclass(frozen=True)
class ManualControls:
    """The manual-control annotations, None when absent (values are stripped; empty counts as absent)."""

    promote: str | None = None
    abort: str | None = None
    retry: str | None = None
    rollback_to: str | None = None


@dataclass(frozen=True)
class ModelDeployment:
    name: str
    namespace: str | None
    generation: int
    uid: str | None
    spec: ModelDeploymentSpec
    controls: ManualControls = field(default_factory=ManualControls)

    @property
    def served_model_name(self) -> str:
        """The model name on the Open Inference Protocol: spec.model.name, else the object's name."""
        return self.spec.model.name or self.name


# ---------------------------------------------------------------------------------------------------------------
# Public helpers


def parse_duration(text: object, field: str = "duration") -> float:
    """Seconds in a duration such as ``30s``, ``5m``, ``1h30m``, ``250ms``, ``1.5h`` (units ms, s, m, h)."""
    if not isinstance(text, str):
        raise SpecError(field, f"must be a duration string such as 30s, 5m or 1h30m, got {text!r}")
    if not _DURATION_RE.fullmatch(text):
        raise SpecError(field, f"{text!r} is not a duration; use e.g. 30s, 5m, 1h30m or 250ms")
    seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART_RE.findall(text))
    if not math.isfinite(seconds):
        raise SpecError(field, f"{text!r} is too long")
    return seconds


def parse_image(image: object, field: str = "spec.image") -> ImageReference:
    """Splits an image reference; it must carry a tag or a digest (a registry port is not a tag)."""
    if not isinstance(image, str) or not image:
        raise SpecError(field, f"must be a non-empty image reference, got {image!r}")
    match = _IMAGE_RE.fullmatch(image)
    if match is None or len(image) > 512:
        raise SpecError(field, f"{image!r} is not a valid image reference "
                               "([registry[:port]/]repository[:tag][@sha256:digest], repository in lower case)")
    tag, digest = match.group("tag"), match.group("digest")
    if tag is None and digest is None:
        raise SpecError(field, f"{image!r} must carry a tag (repository:1.4.0) or a digest (@sha256:...): "
                               "the tag is the version, and a registry port is not a tag")
    return ImageReference(reference=image, repository=match.group("repository"), tag=tag, digest=digest)


def image_version(image: str) -> str:
    """The version of an image: its tag, else ``sha256-`` and the first 12 hex digits of its digest."""
    return parse_image(image).version


def parse_model_deployment(body: Mapping[str, object]) -> ModelDeployment:
    """Parses a whole ModelDeployment object (metadata, spec, manual-control annotations)."""
    metadata = _obj(body, "metadata", "") or {}
    name = _req_str(metadata, "name", "metadata")
    namespace = _opt_str(metadata, "namespace", "metadata")
    generation = _int(metadata, "generation", "metadata", default=0, lo=0)
    uid = _opt_str(metadata, "uid", "metadata")
    annotations = _obj(metadata, "annotations", "metadata") or {}
    spec = _obj(body, "spec", "")
    if spec is None:
        raise SpecError("spec", "must be set")
    return ModelDeployment(name=name, namespace=namespace, generation=generation, uid=uid,
                           spec=parse_spec(spec), controls=parse_controls(annotations))


def parse_controls(annotations: Mapping[str, object]) -> ManualControls:
    """The manual controls from an object's annotations (non-string or blank values count as absent)."""

    def get(key: str) -> str | None:
        value = annotations.get(key)
        return (value.strip() or None) if isinstance(value, str) else None

    return ManualControls(promote=get(ANNOTATION_PROMOTE), abort=get(ANNOTATION_ABORT),
                          retry=get(ANNOTATION_RETRY), rollback_to=get(ANNOTATION_ROLLBACK_TO))


def parse_spec(spec: Mapping[str, object], path: str = "spec") -> ModelDeploymentSpec:
    """Parses ``spec`` of a ModelDeployment, applying the CRD's defaults."""
    image = _req_str(spec, "image", path)
    image_ref = parse_image(image, f"{path}.image")
    model = _parse_model(_req_obj(spec, "model", path), f"{path}.model")
    compression_body = _obj(spec, "compression", path)
    compression = None if compression_body is None else _parse_compression(compression_body, f"{path}.compression")
    serving = _parse_serving(_obj(spec, "serving", path) or {}, f"{path}.serving")
    if compression is not None and compression.compiled.aot_inductor and \
            serving.batching.max_batch_size > compression.compiled.max_batch_size:
        raise SpecError(f"{path}.serving.batching.maxBatchSize",
                        f"must not exceed {path}.compression.compiled.maxBatchSize "
                        f"({compression.compiled.max_batch_size}), the largest batch the compiled package accepts; "
                        f"got {serving.batching.max_batch_size}")
    return ModelDeploymentSpec(
        image=image,
        image_ref=image_ref,
        model=model,
        compression=compression,
        serving=serving,
        rollout=_parse_rollout(_obj(spec, "rollout", path) or {}, f"{path}.rollout"),
        rollback=Rollback(policy=_enum(_obj(spec, "rollback", path) or {}, "policy", f"{path}.rollback",
                                       ROLLBACK_POLICIES, DEFAULT_ROLLBACK_POLICY)),
        revision_history_limit=_int(spec, "revisionHistoryLimit", path, default=DEFAULT_REVISION_HISTORY_LIMIT,
                                    lo=0, hi=100),
        retry=_int(spec, "retry", path, default=DEFAULT_RETRY, lo=0),
    )


def build_recipe(compression: Compression) -> dict[str, object]:
    """The compression recipe with every default made explicit (camelCase, as in the CRD), JSON-serialisable.

    What changes the artifact and nothing else (not the PVC, resources or Job limits), so that hashing it with
    the source image gives a content address that does not change when a user writes a default out.
    """
    steps: list[dict[str, object]] = []
    for step in compression.steps:
        if isinstance(step, Prune):
            prune: dict[str, object] = {"amount": step.amount, "scope": step.scope,
                                        "fineTuneEpochs": step.fine_tune_epochs}
            if step.norm is not None:
                prune["norm"] = step.norm
            steps.append({"prune": prune})
        elif isinstance(step, Quantize):
            steps.append({"quantize": {"scheme": step.scheme}})
        else:
            steps.append({"distill": {"student": step.student, "temperature": step.temperature,
                                      "alpha": step.alpha, "epochs": step.epochs, "lr": step.lr,
                                      "batchSize": step.batch_size}})
    evaluation = compression.evaluation
    recipe: dict[str, object] = {"steps": steps, "evaluation": {
        "dataset": evaluation.dataset, "maxRelativeAccuracyLoss": evaluation.max_relative_accuracy_loss,
        "samples": evaluation.samples}}
    compiled = compression.compiled
    if compiled.aot_inductor:  # absent when off, so that the keys of artifacts made before the field stay the same
        recipe["compiled"] = {"aotInductor": True, "maxBatchSize": compiled.max_batch_size,
                              "maxAutotune": compiled.max_autotune}
    return recipe


# ---------------------------------------------------------------------------------------------------------------
# Sections


def _parse_model(body: Mapping[str, object], path: str) -> ModelSource:
    model_path = _opt_str(body, "path", path, max_length=1024)
    uri = _opt_url(body, "uri", path, pattern=_URI_RE, max_length=2048,
                   hint="a pvc://, s3://, gs:// or https:// URI")
    name = _opt_str(body, "name", path, pattern=_MODEL_NAME_RE, max_length=63, hint="a model name")
    if model_path is None and uri is None:
        raise SpecError(path, "must set path or uri")
    if model_path is not None and uri is not None:
        raise SpecError(path, "must set only one of path and uri")
    if model_path is not None and (not model_path.startswith("/") or len(model_path) < 2):
        raise SpecError(f"{path}.path", f"must be an absolute path inside the image, got {model_path!r}")
    return ModelSource(path=model_path, uri=uri, name=name)


def _parse_compression(body: Mapping[str, object], path: str) -> Compression:
    raw_steps = _list(body, "steps", path, max_items=8)
    if not raw_steps:
        raise SpecError(f"{path}.steps", "must list at least one step")
    steps = tuple(_parse_compression_step(_as_obj(s, f"{path}.steps[{i}]"), f"{path}.steps[{i}]")
                  for i, s in enumerate(raw_steps))
    evaluation_body = _req_obj(body, "evaluation", path)
    evaluation_path = f"{path}.evaluation"
    evaluation = Evaluation(
        dataset=_req_str(evaluation_body, "dataset", evaluation_path, pattern=_DATASET_RE, max_length=256,
                         hint="builtin:<name> or module:function"),
        max_relative_accuracy_loss=_num(evaluation_body, "maxRelativeAccuracyLoss", evaluation_path,
                                        default=DEFAULT_MAX_RELATIVE_ACCURACY_LOSS, lo=0.0, hi=1.0),
        samples=_int(evaluation_body, "samples", evaluation_path, default=DEFAULT_EVALUATION_SAMPLES,
                     lo=1, hi=1_000_000),
    )
    artifacts = _req_obj(body, "artifacts", path)
    pvc = _req_str(artifacts, "pvc", f"{path}.artifacts", pattern=_DNS_SUBDOMAIN_RE, max_length=253,
                   hint="a PersistentVolumeClaim name")
    compiled_body = _obj(body, "compiled", path) or {}
    compiled_path = f"{path}.compiled"
    compiled = Compiled(
        aot_inductor=_bool(compiled_body, "aotInductor", compiled_path, default=False),
        max_batch_size=_int(compiled_body, "maxBatchSize", compiled_path, default=DEFAULT_COMPILED_MAX_BATCH_SIZE,
                            lo=2, hi=65536),
        max_autotune=_bool(compiled_body, "maxAutotune", compiled_path, default=False),
    )
    return Compression(
        steps=steps,
        evaluation=evaluation,
        artifacts_pvc=pvc,
        compiled=compiled,
        resources=_parse_resources(_obj(body, "resources", path) or {}, f"{path}.resources"),
        backoff_limit=_int(body, "backoffLimit", path, default=DEFAULT_BACKOFF_LIMIT, lo=0, hi=10),
        active_deadline_seconds=_int(body, "activeDeadlineSeconds", path, default=DEFAULT_ACTIVE_DEADLINE_SECONDS,
                                     lo=60, hi=604_800),
    )


def _parse_compression_step(body: Mapping[str, object], path: str) -> CompressionStep:
    kinds = [k for k in ("prune", "quantize", "distill") if body.get(k) is not None]
    if not kinds:
        raise SpecError(path, "must set one of prune, quantize, distill")
    if len(kinds) > 1:
        raise SpecError(path, f"must set only one of prune, quantize, distill, got {', '.join(kinds)}")
    kind = kinds[0]
    step_path = f"{path}.{kind}"
    step = _req_obj(body, kind, path)
    if kind == "prune":
        scope = _enum(step, "scope", step_path, PRUNE_SCOPES, DEFAULT_PRUNE_SCOPE)
        norm = _opt_int(step, "norm", step_path)
        if norm is not None and scope != "structured":
            raise SpecError(f"{step_path}.norm", "is only allowed with scope structured")
        if norm is not None and norm not in (1, 2):
            raise SpecError(f"{step_path}.norm", f"must be 1 or 2, got {norm}")
        if scope == "structured" and norm is None:
            norm = DEFAULT_STRUCTURED_NORM
        return Prune(
            amount=_req_num(step, "amount", step_path, lo=0.0, hi=1.0, lo_open=True, hi_open=True),
            scope=scope,
            norm=norm,
            fine_tune_epochs=_int(step, "fineTuneEpochs", step_path, default=DEFAULT_FINE_TUNE_EPOCHS, lo=0, hi=100),
        )
    if kind == "quantize":
        return Quantize(scheme=_enum(step, "scheme", step_path, QUANTIZE_SCHEMES, None))
    return Distill(
        student=_req_str(step, "student", step_path, pattern=_FACTORY_RE, max_length=256, hint="module:function"),
        temperature=_num(step, "temperature", step_path, default=DEFAULT_TEMPERATURE, lo=0.0, hi=100.0,
                         lo_open=True),
        alpha=_num(step, "alpha", step_path, default=DEFAULT_ALPHA, lo=0.0, hi=1.0),
        epochs=_int(step, "epochs", step_path, default=DEFAULT_DISTILL_EPOCHS, lo=1, hi=1000),
        lr=_num(step, "lr", step_path, default=DEFAULT_LR, lo=0.0, hi=10.0, lo_open=True),
        batch_size=_int(step, "batchSize", step_path, default=DEFAULT_BATCH_SIZE, lo=1, hi=65536),
    )


def _parse_resources(body: Mapping[str, object], path: str) -> Resources:
    parts: dict[str, dict[str, str]] = {}
    for part in ("requests", "limits"):
        quantities: dict[str, str] = {}
        for name, value in (_obj(body, part, path) or {}).items():
            field_path = f"{path}.{part}.{name}"
            if len(str(name)) > MAX_LABEL_KEY_LENGTH:
                raise SpecError(f"{path}.{part}", f"resource names must be at most {MAX_LABEL_KEY_LENGTH} characters")
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise SpecError(field_path, f"must be a quantity (an integer or a string such as 500m), got {value!r}")
            text = str(value)
            if len(text) > MAX_QUANTITY_LENGTH:
                raise SpecError(field_path, f"must be at most {MAX_QUANTITY_LENGTH} characters, got {len(text)}")
            if not _QUANTITY_RE.fullmatch(text):
                raise SpecError(field_path, f"{text!r} is not a quantity (e.g. 2, 500m, 1Gi)")
            quantities[name] = text
        parts[part] = quantities
    requests, limits = parts["requests"], parts["limits"]
    gpu = limits.get(GPU_RESOURCE)
    if gpu is not None and not gpu.isdigit():
        raise SpecError(f"{path}.limits.{GPU_RESOURCE}", f"must be a whole number of GPUs, got {gpu!r}")
    requested = requests.get(GPU_RESOURCE)
    if requested is not None and gpu is None:
        raise SpecError(f"{path}.limits.{GPU_RESOURCE}", "must be set when requests sets it (GPUs are set in limits)")
    if requested is not None and requested != gpu:
        raise SpecError(f"{path}.requests.{GPU_RESOURCE}", f"must equal limits ({gpu}), got {requested!r}")
    return Resources(requests=MappingProxyType(requests), limits=MappingProxyType(limits))


def _parse_serving(body: Mapping[str, object], path: str) -> Serving:
    batching = _obj(body, "batching", path) or {}
    batching_path = f"{path}.batching"
    tolerations = tuple(_parse_toleration(_as_obj(t, f"{path}.tolerations[{i}]"), f"{path}.tolerations[{i}]")
                        for i, t in enumerate(_list(body, "tolerations", path, max_items=32)))
    return Serving(
        replicas=_int(body, "replicas", path, default=DEFAULT_REPLICAS, lo=0, hi=1000),
        resources=_parse_resources(_obj(body, "resources", path) or {}, f"{path}.resources"),
        batching=Batching(
            max_batch_size=_int(batching, "maxBatchSize", batching_path, default=DEFAULT_MAX_BATCH_SIZE,
                                lo=1, hi=4096),
            max_delay_ms=_int(batching, "maxDelayMs", batching_path, default=DEFAULT_MAX_DELAY_MS, lo=0, hi=10000),
        ),
        node_selector=MappingProxyType(_label_map(body, "nodeSelector", path)),
        tolerations=tolerations,
        port=_int(body, "port", path, default=DEFAULT_SERVICE_PORT, lo=1, hi=65535),
    )


def _parse_toleration(body: Mapping[str, object], path: str) -> Toleration:
    operator = cast(Literal["Exists", "Equal"] | None, _opt_enum(body, "operator", path, ("Exists", "Equal")))
    value = _opt_str(body, "value", path)
    if operator == "Exists" and value:
        raise SpecError(f"{path}.value", "must not be set with operator Exists")
    effect = _opt_enum(body, "effect", path, ("NoSchedule", "PreferNoSchedule", "NoExecute"))
    return Toleration(key=_opt_str(body, "key", path), operator=operator, value=value,
                      effect=cast(Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None, effect),
                      toleration_seconds=_opt_int(body, "tolerationSeconds", path))


def _parse_rollout(body: Mapping[str, object], path: str) -> Rollout:
    steps: list[RolloutStep] = []
    for i, raw in enumerate(_list(body, "steps", path, max_items=20)):
        step_path = f"{path}.steps[{i}]"
        step = _as_obj(raw, step_path)
        pause = step.get("pause")
        manual = _bool(step, "manual", step_path, default=False)
        if manual and pause is not None:
            raise SpecError(f"{step_path}.pause", "must not be set together with manual: true")
        steps.append(RolloutStep(
            weight=_req_int(step, "weight", step_path, lo=1, hi=100),
            pause_seconds=None if pause is None else _bounded_duration(pause, f"{step_path}.pause", MAX_PAUSE_SECONDS,
                                                                       "(hold longer with manual: true)"),
            manual=manual,
        ))
    weights = [s.weight for s in steps]
    if any(b <= a for a, b in zip(weights, weights[1:], strict=False)):
        raise SpecError(f"{path}.steps", f"weights must be strictly increasing, got {weights}")
    analysis_body = _obj(body, "analysis", path)
    return Rollout(
        steps=tuple(steps),
        startup_timeout_seconds=_int(body, "startupTimeoutSeconds", path, default=DEFAULT_STARTUP_TIMEOUT_SECONDS,
                                     lo=10, hi=86400),
        max_surge_gpus=_opt_int(body, "maxSurgeGPUs", path, lo=0, hi=4096),
        analysis=None if analysis_body is None else _parse_analysis(analysis_body, f"{path}.analysis"),
    )


def _parse_analysis(body: Mapping[str, object], path: str) -> Analysis:
    interval = parse_duration(body.get("interval", DEFAULT_INTERVAL), f"{path}.interval")
    if not 1.0 <= interval <= 3600.0:
        raise SpecError(f"{path}.interval", f"must be between 1s and 1h, got {body.get('interval')!r}")
    prometheus = _obj(body, "prometheus", path)
    address = None if prometheus is None else _opt_url(prometheus, "address", f"{path}.prometheus",
                                                       pattern=_HTTP_URL_RE, max_length=512, hint="an http(s) URL")
    if prometheus is not None and address is None:
        raise SpecError(f"{path}.prometheus.address", "must be set")
    raw_metrics = _list(body, "metrics", path, max_items=16)
    if not raw_metrics:
        raise SpecError(f"{path}.metrics", "must list at least one metric")
    metrics = tuple(_parse_metric(_as_obj(m, f"{path}.metrics[{i}]"), f"{path}.metrics[{i}]")
                    for i, m in enumerate(raw_metrics))
    seen: set[str] = set()
    for i, metric in enumerate(metrics):
        if metric.name in seen:
            raise SpecError(f"{path}.metrics[{i}].name", f"duplicate metric name {metric.name!r}")
        seen.add(metric.name)
    return Analysis(
        metrics=metrics,
        interval_seconds=interval,
        initial_delay_seconds=_bounded_duration(body.get("initialDelay", DEFAULT_INITIAL_DELAY), f"{path}.initialDelay",
                                                MAX_INITIAL_DELAY_SECONDS),
        failure_limit=_int(body, "failureLimit", path, default=DEFAULT_FAILURE_LIMIT, lo=0, hi=100),
        consecutive_error_limit=_int(body, "consecutiveErrorLimit", path, default=DEFAULT_CONSECUTIVE_ERROR_LIMIT,
                                     lo=0, hi=100),
        min_samples=_int(body, "minSamples", path, default=DEFAULT_MIN_SAMPLES, lo=1, hi=1000),
        no_data=_enum(body, "noData", path, NO_DATA_POLICIES, DEFAULT_NO_DATA),
        prometheus_address=address,
    )


def _parse_metric(body: Mapping[str, object], path: str) -> Metric:
    name = _req_str(body, "name", path, pattern=_DNS_LABEL_RE, max_length=63, hint="a DNS label")
    kinds = [k for k in ("builtin", "prometheus", "scrape") if body.get(k) is not None]
    if not kinds:
        raise SpecError(path, "must set one provider (builtin, prometheus or scrape)")
    if len(kinds) > 1:
        raise SpecError(path, f"must set only one provider (builtin, prometheus or scrape), got {', '.join(kinds)}")
    provider: MetricProvider
    if kinds[0] == "builtin":
        provider = BuiltinProvider(metric=_enum(body, "builtin", path, BUILTIN_METRICS, None))
    elif kinds[0] == "prometheus":
        prom = _req_obj(body, "prometheus", path)
        prom_path = f"{path}.prometheus"
        query = _req_str(prom, "query", prom_path, max_length=4096)
        if not query.strip():
            raise SpecError(f"{prom_path}.query", "must not be blank")
        provider = PrometheusProvider(query=query, address=_opt_url(prom, "address", prom_path, pattern=_HTTP_URL_RE,
                                                                    max_length=512, hint="an http(s) URL"))
    else:
        scrape = _req_obj(body, "scrape", path)
        scrape_path = f"{path}.scrape"
        provider = ScrapeProvider(
            metric=_req_str(scrape, "metric", scrape_path, pattern=_PROM_NAME_RE, max_length=256,
                            hint="a Prometheus metric name"),
            labels=MappingProxyType(_str_map(scrape, "labels", scrape_path,
                                             max_key_length=MAX_SCRAPE_LABEL_NAME_LENGTH, max_value_length=256)),
            aggregation=_enum(scrape, "aggregation", scrape_path, SCRAPE_AGGREGATIONS, DEFAULT_SCRAPE_AGGREGATION),
            rate=_bool(scrape, "rate", scrape_path, default=False),
        )
    maximum = _opt_num(body, "max", path)
    minimum = _opt_num(body, "min", path)
    relative = _opt_num(body, "maxRelativeToStable", path, lo=0.0, hi=1000.0)
    if maximum is None and minimum is None and relative is None:
        raise SpecError(path, "must set a threshold (max, min or maxRelativeToStable)")
    if maximum is not None and minimum is not None and minimum > maximum:
        raise SpecError(f"{path}.min", f"must not exceed max ({minimum} > {maximum})")
    if relative is not None and isinstance(provider, PrometheusProvider) and "{{version}}" not in provider.query:
        raise SpecError(f"{path}.prometheus.query",
                        "must contain {{version}} when compared with the stable (maxRelativeToStable)")
    return Metric(name=name, provider=provider, max=maximum, min=minimum, max_relative_to_stable=relative)


# ---------------------------------------------------------------------------------------------------------------
# Typed access: each returns the value at body[key] or raises SpecError naming path.key


def _field(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _as_obj(value: object, path: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise SpecError(path, f"must be an object, got {value!r}")
    return cast(Mapping[str, object], value)


def _obj(body: Mapping[str, object], key: str, path: str) -> Mapping[str, object] | None:
    value = body.get(key)
    return None if value is None else _as_obj(value, _field(path, key))


def _req_obj(body: Mapping[str, object], key: str, path: str) -> Mapping[str, object]:
    value = _obj(body, key, path)
    if value is None:
        raise SpecError(_field(path, key), "must be set")
    return value


def _list(body: Mapping[str, object], key: str, path: str, max_items: int) -> Sequence[object]:
    value = body.get(key)
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise SpecError(_field(path, key), f"must be a list, got {value!r}")
    if len(value) > max_items:
        raise SpecError(_field(path, key), f"must have at most {max_items} items, got {len(value)}")
    return value


def _str_map(body: Mapping[str, object], key: str, path: str, *, max_key_length: int,
             max_value_length: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in (_obj(body, key, path) or {}).items():
        if len(str(name)) > max_key_length:
            raise SpecError(_field(path, key),
                            f"keys must be at most {max_key_length} characters, got {len(str(name))}")
        if not isinstance(value, str):
            raise SpecError(f"{_field(path, key)}.{name}", f"must be a string, got {value!r}")
        if len(value) > max_value_length:
            raise SpecError(f"{_field(path, key)}.{name}",
                            f"must be at most {max_value_length} characters, got {len(value)}")
        out[str(name)] = value
    return out


def _label_map(body: Mapping[str, object], key: str, path: str) -> dict[str, str]:
    """A map of label keys to label values (a node selector), checked as the API server checks a pod's."""
    labels = _str_map(body, key, path, max_key_length=MAX_LABEL_KEY_LENGTH, max_value_length=63)
    for name, value in labels.items():
        if not _LABEL_KEY_RE.fullmatch(name):
            raise SpecError(_field(path, key), f"keys must be label keys ([prefix/]name), got {name!r}")
        if not _LABEL_VALUE_RE.fullmatch(value):
            raise SpecError(f"{_field(path, key)}.{name}", f"must be a label value, got {value!r}")
    return labels


def _opt_url(body: Mapping[str, object], key: str, path: str, *, pattern: re.Pattern[str], max_length: int,
             hint: str) -> str | None:
    """A URL field; one carrying credentials is refused without echoing it (messages reach status and Events)."""
    value = body.get(key)
    if isinstance(value, str) and _CREDENTIALS_RE.match(value):
        raise SpecError(_field(path, key), "must not carry credentials (user:password@host)")
    return _opt_str(body, key, path, pattern=pattern, max_length=max_length, hint=hint)


def _bounded_duration(text: object, field: str, maximum: float, hint: str = "") -> float:
    seconds = parse_duration(text, field)
    if seconds > maximum:
        raise SpecError(field, f"must be at most {maximum / 3600:g}h{' ' + hint if hint else ''}, got {text!r}")
    return seconds


def _opt_str(body: Mapping[str, object], key: str, path: str, *, pattern: re.Pattern[str] | None = None,
             max_length: int | None = None, hint: str = "") -> str | None:
    value = body.get(key)
    if value is None:
        return None
    where = _field(path, key)
    if not isinstance(value, str):
        raise SpecError(where, f"must be a string, got {value!r}")
    if max_length is not None and len(value) > max_length:
        raise SpecError(where, f"must be at most {max_length} characters, got {len(value)}")
    if pattern is not None and not pattern.fullmatch(value):
        raise SpecError(where, f"{value!r} is not {hint or 'valid'}")
    return value


def _req_str(body: Mapping[str, object], key: str, path: str, *, pattern: re.Pattern[str] | None = None,
             max_length: int | None = None, hint: str = "") -> str:
    value = _opt_str(body, key, path, pattern=pattern, max_length=max_length, hint=hint)
    if value is None:
        raise SpecError(_field(path, key), "must be set")
    return value


def _bool(body: Mapping[str, object], key: str, path: str, *, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise SpecError(_field(path, key), f"must be true or false, got {value!r}")
    return value


def _check_range(where: str, value: float, lo: float | None, hi: float | None, lo_open: bool = False,
                 hi_open: bool = False) -> None:
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise SpecError(where, f"must be {'greater than' if lo_open else 'at least'} {lo:g}, got {value:g}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise SpecError(where, f"must be {'less than' if hi_open else 'at most'} {hi:g}, got {value:g}")


def _opt_int(body: Mapping[str, object], key: str, path: str, *, lo: int | None = None,
             hi: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    where = _field(path, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(where, f"must be an integer, got {value!r}")
    _check_range(where, value, lo, hi)
    return value


def _int(body: Mapping[str, object], key: str, path: str, *, default: int, lo: int | None = None,
         hi: int | None = None) -> int:
    value = _opt_int(body, key, path, lo=lo, hi=hi)
    return default if value is None else value


def _req_int(body: Mapping[str, object], key: str, path: str, *, lo: int | None = None, hi: int | None = None) -> int:
    value = _opt_int(body, key, path, lo=lo, hi=hi)
    if value is None:
        raise SpecError(_field(path, key), "must be set")
    return value


def _opt_num(body: Mapping[str, object], key: str, path: str, *, lo: float | None = None, hi: float | None = None,
             lo_open: bool = False, hi_open: bool = False) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    where = _field(path, key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpecError(where, f"must be a finite number, got {value!r}")
    _check_range(where, float(value), lo, hi, lo_open, hi_open)
    return float(value)


def _num(body: Mapping[str, object], key: str, path: str, *, default: float, lo: float | None = None,
         hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> float:
    value = _opt_num(body, key, path, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)
    return default if value is None else value


def _req_num(body: Mapping[str, object], key: str, path: str, *, lo: float | None = None, hi: float | None = None,
             lo_open: bool = False, hi_open: bool = False) -> float:
    value = _opt_num(body, key, path, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)
    if value is None:
        raise SpecError(_field(path, key), "must be set")
    return value


def _opt_enum(body: Mapping[str, object], key: str, path: str, choices: Sequence[str]) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if value not in choices:
        raise SpecError(_field(path, key), f"unsupported value {value!r}; supported: {', '.join(choices)}")
    return cast(str, value)


def _enum(body: Mapping[str, object], key: str, path: str, choices: Sequence[_E], default: _E | None) -> _E:
    """The value at body[key], one of choices; default when absent (None = required)."""
    value = _opt_enum(body, key, path, choices)
    if value is None:
        if default is None:
            raise SpecError(_field(path, key), f"must be set to one of {', '.join(choices)}")
        return default
    return cast(_E, value)
