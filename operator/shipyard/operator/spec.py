"""The ModelDeployment's spec: the one definition of its fields, from which the CRD is generated. Pure, no I/O.

Each field is declared once here (type, bounds, enum, pattern, default, description as its docstring, CEL rules);
``shipyard.operator.crd`` generates ``crds/modeldeployments.shipyard.dev.yaml`` and the chart's copy from these
types, and CI fails when the committed files differ (``python -m shipyard.operator.crd check``). The compression
recipe is ``shipyard.contract.recipe`` (shared with the runtime); each metric provider's fragment is defined by
its module in ``shipyard.operator.providers``.

The operator relies on admission: the API server applied the defaults and checked bounds, enums, patterns and the
CEL rules. Parsing (``parse_model_deployment``) builds the typed view with the same models (it re-applies the same
defaults and types, it does not re-implement them) and adds only what the API server cannot check: the image
reference's version (``docker_image``'s parser of the distribution grammar) and the order of compression steps.
Any problem raises one ``SpecError`` whose message starts with the field's path (``spec.rollout.steps[1].weight:
...``); the planner turns it into ``Stalled`` naming the field.

Versions: the image tag is the version; an image pinned by digest only has the version ``sha256-<first 12 hex
digits of the digest>``; a downloaded model (s3://, https://, oci://) adds ``-m<8 hex>`` of its URI and digest.
Manual controls are annotations (``ANNOTATION_*``), parsed into ``ManualControls``; the operator never writes spec.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal, TypeAlias

import durationpy
from docker_image import reference as image_reference
from pydantic import BeforeValidator, Field, WithJsonSchema

from shipyard import contract
from shipyard.contract import quantity, recipe, schema
from shipyard.operator import autoscaling as autoscaling_mod
from shipyard.operator import disruption, podtemplate, runtimes
from shipyard.operator import traffic as traffic_mod
from shipyard.operator.providers import builtin as builtin_provider
from shipyard.operator.providers import job as job_provider
from shipyard.operator.providers import prometheus as prometheus_provider
from shipyard.operator.providers import scrape as scrape_provider
from shipyard.operator.providers import web as web_provider

GPU_RESOURCE: Final = "nvidia.com/gpu"

ANNOTATION_PROMOTE: Final = "shipyard.dev/promote"  # value: the candidate version to promote now
ANNOTATION_ABORT: Final = "shipyard.dev/abort"  # value: the candidate version whose rollout to abort
ANNOTATION_RETRY: Final = "shipyard.dev/retry"  # value: any token; each new value retries the failed version once
ANNOTATION_ROLLBACK_TO: Final = "shipyard.dev/rollback-to"  # value: a version kept in status.history

DURATION_PATTERN: Final = r"^([0-9]+([.][0-9]+)?(ms|s|m|h))+$"
IMAGE_PATTERN: Final = (
    r"^([a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?([.][a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?)*(:[0-9]{1,5})?/)?"
    r"[a-z0-9]+(([.]|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+(([.]|_|__|-+)[a-z0-9]+)*)*"
    r"(:[A-Za-z0-9_][-A-Za-z0-9_.]{0,127})?(@sha256:[a-f0-9]{64})?$")
URI_PATTERN: Final = (r"^((pvc|s3|gs)://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/[^ ]*)?|https://[^ /]+(/[^ ]*)?"
                      r"|oci://[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?(:[0-9]{1,5})?/[a-z0-9][^ @:]*"
                      r"(:[A-Za-z0-9_][-A-Za-z0-9_.]{0,127})?(@sha256:[a-f0-9]{64})?)$")
REMOTE_SCHEMES: Final = ("s3", "https", "oci")  # the sources fetched over the network (shipyard-runtime fetch)
DIGEST_PATTERN: Final = r"^sha256:[a-f0-9]{64}$"
DNS_LABEL_PATTERN: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
LABEL_KEY_PATTERN: Final = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                            r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE_PATTERN: Final = r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$"
NO_CREDENTIALS_RULE: Final = "!self.matches('^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@')"
MAX_RESOURCE_NAME: Final = 317  # a qualified name: DNS-subdomain prefix (253) / name (63)


class SpecError(ValueError):
    """An invalid ModelDeployment: ``field`` is the path of the offending field, ``problem`` says what is wrong."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


# ---------------------------------------------------------------------------------------------------------------
# Field types


def _duration_rule(bound: str, message: str) -> schema.Cel:
    return schema.Cel(f"!self.matches('{DURATION_PATTERN}') || {bound}", message)


Duration = Annotated[str, Field(max_length=32, pattern=DURATION_PATTERN)]


def parse_duration(text: str) -> float:
    """Seconds of a duration such as ``30s``, ``5m``, ``1h30m``, ``250ms``, ``1.5h`` (Go's syntax, as the API
    server's ``duration()``); ValueError when it is not one."""
    return float(durationpy.from_str(text).total_seconds())


def _quantity_text(value: object) -> object:
    """The API server stores integer quantities as numbers; the typed view keeps every quantity as its text."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity_text),
    Field(max_length=quantity.MAX_LENGTH, pattern=quantity.PATTERN),
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}], "pattern": quantity.PATTERN,
                    "x-kubernetes-int-or-string": True, "maxLength": quantity.MAX_LENGTH}),
]
ResourceList = Annotated[dict[str, Quantity], Field(json_schema_extra=schema.k8s(
    max_properties=16, validations=[schema.Cel(f"self.all(k, size(k) <= {MAX_RESOURCE_NAME})",
                                               f"resource names must be at most {MAX_RESOURCE_NAME} characters")]))]


def _address_field(description_of: str) -> Any:
    return Field(max_length=512, pattern=r"^https?://[^ /]+(/[^ ]*)?$", json_schema_extra=schema.k8s(validations=[
        schema.Cel(NO_CREDENTIALS_RULE, f"{description_of} must not carry credentials (user:password@host): "
                                        "addresses appear in status and Events", reason="FieldValueForbidden")]))


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


@functools.lru_cache(maxsize=4096)
def parse_image(image: str, field: str = "spec.image") -> ImageReference:
    """Splits an image reference (the distribution grammar); it must carry a tag or a digest."""
    try:
        parsed = image_reference.Reference.parse(image)
    except Exception as exc:  # the library raises its own error classes, all meaning "not a reference"
        raise SpecError(field, f"{image!r} is not a valid image reference ([registry[:port]/]repository[:tag]"
                               f"[@sha256:digest], repository in lower case): {exc}") from None
    tag, digest = parsed["tag"], parsed["digest"]
    if tag is None and digest is None:
        raise SpecError(field, f"{image!r} must carry a tag (repository:1.4.0) or a digest (@sha256:...): the tag "
                               "is the version, and a registry port is not a tag")
    return ImageReference(reference=image, repository=str(parsed["name"]), tag=tag, digest=digest)


def image_version(image: str) -> str:
    """The version of an image: its tag, else ``sha256-`` and the first 12 hex digits of its digest."""
    return parse_image(image).version


def _only_with(field: str, schemes: tuple[str, ...], text: str) -> schema.Constraint:
    """``field`` of spec.model may only be set with a URI of one of ``schemes``."""
    listed = " or ".join(f"{s}://" for s in schemes)
    cel = " || ".join(f"self.uri.startsWith('{s}://')" for s in schemes)
    return schema.Constraint(
        schema.Cel(f"!has(self.{field}) || (has(self.uri) && ({cel}))",
                   f"spec.model.{field} is only allowed with a {listed} uri: {text}", field_path=f".{field}",
                   reason="FieldValueForbidden"),
        lambda d: None if d.get(field) is None or str(d.get("uri") or "").split("://", 1)[0] in schemes else
        f"@{field}: only allowed with a {listed} uri: {text}")


class ModelCredentials(schema.ApiModel):
    """How the pods that download the model (the fetch step of the inference pods, the compression Job) authenticate.
    The operator never reads the Secret: it only names it in those pods."""

    __constraints__ = (schema.at_least_one("secretName", "serviceAccountName", what="spec.model.credentials"),)

    secret_name: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)] | None = None
    """A Secret in the model's namespace. s3://: its keys become the download step's environment (AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, optionally AWS_SESSION_TOKEN); oci://: a kubernetes.io/dockerconfigjson Secret (key
    .dockerconfigjson), the registry's credentials. Only the download step sees it, never the model server."""
    service_account_name: Annotated[str, Field(min_length=1, max_length=253,
                                               pattern=DNS_SUBDOMAIN_PATTERN)] | None = None
    """A ServiceAccount of the model's namespace that the pods which download run as, with its token mounted: workload
    identity (EKS IRSA or Pod Identity, GKE Workload Identity through the S3 interoperability API)."""


class S3Options(schema.ApiModel):
    """Where an s3:// model's store is, for S3-compatible stores (MinIO, Ceph RGW, SeaweedFS, GCS interoperability);
    AWS itself needs at most the region."""

    endpoint: Annotated[str, Field(max_length=512, pattern=r"^https?://[^ /@]+/?$")] | None = None
    """Endpoint URL of the store, e.g. https://minio.storage.svc:9000 (AWS_ENDPOINT_URL_S3); absent: AWS."""
    region: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9-]+$")] | None = None
    """Region of the bucket (AWS_REGION), e.g. eu-west-1."""
    addressing: Literal["auto", "path", "virtual"] | None = None
    """path (https://endpoint/bucket/key: MinIO, Ceph, most S3-compatible stores), virtual (https://bucket.endpoint/key)
    or auto (virtual on AWS). Default: path with an endpoint, else auto."""


class CABundle(schema.ApiModel):
    """PEM certificates of the CAs trusted for an https:// model, an S3 endpoint or an OCI registry with a private CA
    (they replace the system's trust store for the download)."""

    config_map_name: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]
    """A ConfigMap in the model's namespace holding the bundle."""
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")] = "ca.crt"
    """The ConfigMap's key holding the PEM bundle. Default ca.crt."""


OutputKind: TypeAlias = Literal["classes", "embedding", "tensor"]
OUTPUT_COMPARE: Final[Mapping[str, str]] = {"classes": "top1", "embedding": "cosine", "tensor": "maxabs"}


class ModelOutput(schema.ApiModel):
    """What the model's answers are, so that a shadow step can compare the candidate's answer to a request with the
    stable's (docs/shadow.md). Required with a shadow step."""

    __constraints__ = (
        schema.requires("minCosineSimilarity", "kind", "embedding", what="spec.model.output.minCosineSimilarity"),
        schema.requires("maxAbsDifference", "kind", "tensor", what="spec.model.output.maxAbsDifference"),
    )

    kind: OutputKind
    """classes: logits or scores of a classifier; a row agrees when its top-1 class is the same (one value per row: the
    same sign). embedding: a row agrees when the cosine similarity is at least minCosineSimilarity. tensor: any other
    output; a row agrees when the largest absolute difference is at most maxAbsDifference."""
    min_cosine_similarity: Annotated[float, Field(ge=-1, le=1)] | None = None
    """embedding only: the least cosine similarity of two agreeing rows. Default 0.99."""
    max_abs_difference: Annotated[float, Field(ge=0)] | None = None
    """tensor only: the largest absolute difference between two agreeing rows. Default 0.001."""

    @property
    def compare(self) -> str:
        """The runtime's comparison (``contract.SHADOW_COMPARES``): top1, cosine or maxabs."""
        return OUTPUT_COMPARE[self.kind]

    @property
    def tolerance(self) -> float:
        """The runtime's tolerance: cosine 1 - minCosineSimilarity, maxabs maxAbsDifference, top1 0."""
        compare = self.compare
        if compare == "cosine" and self.min_cosine_similarity is not None:
            return 1.0 - self.min_cosine_similarity
        if compare == "maxabs" and self.max_abs_difference is not None:
            return self.max_abs_difference
        return float(contract.SHADOW_DEFAULT_TOLERANCE[compare])


class ModelSource(schema.ApiModel):
    """Where the source model is: a path inside the image, a PersistentVolumeClaim, or fetched from object storage
    (s3://), a web server (https://) or an OCI registry (oci://) by a download step before it is compressed or
    served. See docs/model-sources.md."""

    __constraints__ = (
        schema.at_least_one("path", "uri", what="spec.model"),
        schema.Constraint(schema.Cel("!(has(self.path) && has(self.uri)) || self.uri.startsWith('oci://')",
                                     "spec.model must set only one of path and uri (both only for an oci:// image: "
                                     "path is then the model's directory inside it)", reason="FieldValueForbidden"),
                          lambda d: "must set only one of path and uri (both only for an oci:// image: path is then "
                                    "the model's directory inside it)"
                          if d.get("path") and d.get("uri") and not str(d["uri"]).startswith("oci://") else None),
        _only_with("digest", REMOTE_SCHEMES, "a model in the image or on a volume has no download to verify"),
        _only_with("credentials", ("s3", "oci"), "https:// takes no credentials (use a presigned URL, or s3://)"),
        _only_with("s3", ("s3",), "endpoint, region and addressing of an S3 store"),
        _only_with("caBundle", REMOTE_SCHEMES, "the CAs of a download"),
        _only_with("mount", ("oci",), "an image volume mounts an OCI image or artifact"),
    )

    path: Annotated[str, Field(min_length=2, max_length=1024, pattern="^/")] | None = None
    """Absolute path of the model directory inside the image, e.g. /models/digits. With an oci:// uri naming an image
    (not an artifact): the model's directory inside that image."""
    uri: Annotated[str, Field(max_length=2048, pattern=URI_PATTERN, json_schema_extra=schema.k8s(validations=[
        schema.Cel(NO_CREDENTIALS_RULE, "spec.model.uri must not carry credentials (user:password@host): it is "
                   "shown in status and Events; name a Secret in spec.model.credentials", reason="FieldValueForbidden")
    ]))] | None = None
    """URI of the model: pvc://<claim>/<path> (a PersistentVolumeClaim in the same namespace, mounted read-only);
    s3://<bucket>/<key> (one object) or s3://<bucket>/<prefix>/ (a directory model); https://<host>/<path> (a file, or
    a tar, tar.gz or zip archive, extracted); oci://<registry>/<repository>:<tag> or @sha256:<digest> (an artifact
    pushed with ORAS, or an image holding the model). A new URI is a new version (see spec.model.digest). gs:// is
    reserved: use s3:// with endpoint https://storage.googleapis.com (GCS's S3 interoperability)."""
    digest: Annotated[str, Field(max_length=71, pattern=DIGEST_PATTERN)] | None = None
    """sha256:<64 hex> of the downloaded content (a file's bytes, a directory's listing as `shipyard-runtime fetch
    --print-digest` computes it, an OCI manifest's digest), verified after every download: a mismatch fails the download
    and nothing is loaded. It keys the node cache and the compressed artifact, and changing it is a new version."""
    credentials: ModelCredentials | None = None
    s3: S3Options | None = None
    ca_bundle: CABundle | None = None
    mount: Literal["download", "imageVolume"] | None = None
    """oci:// only. download (default): a download step fetches the model into the pod (any cluster, node cache,
    digest checked); imageVolume: the kubelet mounts the image or artifact read-only as an image volume
    (volumes[].image, Kubernetes 1.33+ with the ImageVolume feature; no compression, spec.model.path is the
    directory inside it)."""
    name: Annotated[str, Field(max_length=63, pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")] | None = None
    """Model name served on the Open Inference Protocol (/v2/models/{name}); defaults to the ModelDeployment's
    name."""
    output: ModelOutput | None = None
    """What the model's answers are (classes, embedding or tensor), for a shadow step's comparison of the candidate's
    answers with the stable's. Required with a shadow step (spec.rollout.steps[].shadow)."""

    @property
    def uri_scheme(self) -> str | None:
        """``pvc``, ``s3``, ``gs``, ``https`` or ``oci`` for a URI source; None for a path."""
        return None if self.uri is None else self.uri.split("://", 1)[0]

    @property
    def remote(self) -> bool:
        """Whether the model is downloaded (s3://, https://, oci://) rather than in the image or on a volume."""
        return self.uri_scheme in REMOTE_SCHEMES

    @property
    def image_volume(self) -> bool:
        """An oci:// model mounted as an image volume by the kubelet (no download step)."""
        return self.uri_scheme == "oci" and self.mount == "imageVolume"

    @property
    def source_id(self) -> str | None:
        """What identifies a downloaded model's content for versions and artifacts: the first 8 hex digits of the
        sha256 of its URI and digest (None for a model in the image or on a volume)."""
        if not self.remote:
            return None
        text = f"{self.uri}\n{self.digest or ''}"
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    @property
    def pvc(self) -> tuple[str, str] | None:
        """(claim, path inside the claim starting with '/') of a ``pvc://<claim>/<path>`` source, else None."""
        if self.uri is None or self.uri_scheme != "pvc":
            return None
        claim, _, rest = self.uri.removeprefix("pvc://").partition("/")
        return claim, "/" + rest.strip("/")


def _gpu_rules(path: str) -> tuple[schema.Cel, ...]:
    return (
        schema.Cel("!has(self.limits) || !('nvidia.com/gpu' in self.limits) || "
                   "string(self.limits['nvidia.com/gpu']).matches('^[0-9]+$')",
                   f"{path}.limits nvidia.com/gpu must be a whole number of GPUs", field_path=".limits"),
        schema.Cel("!has(self.requests) || !('nvidia.com/gpu' in self.requests) || (has(self.limits) && "
                   "'nvidia.com/gpu' in self.limits && string(self.requests['nvidia.com/gpu']) == "
                   "string(self.limits['nvidia.com/gpu']))",
                   f"{path} nvidia.com/gpu must be set in limits, and requests must equal limits",
                   field_path=".limits"),
    )


class Resources(schema.ApiModel):
    """Compute resources of a container, as in a pod spec (quantities kept as the text the API server stores)."""

    requests: ResourceList = Field(default_factory=dict)
    """Minimum resources, by resource name (cpu, memory, nvidia.com/gpu, ...)."""
    limits: ResourceList = Field(default_factory=dict)
    """Maximum resources, by resource name; GPUs (nvidia.com/gpu) are whole numbers set here."""

    @property
    def gpus(self) -> int:
        """Whole GPUs per container (``nvidia.com/gpu`` limit), 0 when none."""
        return int(quantity.parse_quantity(self.limits.get(GPU_RESOURCE, "0")))

    @property
    def cpu_limit_cores(self) -> float | None:
        """The CPU limit in cores (``500m`` -> 0.5, ``1k`` -> 1000), None when there is none."""
        cpu = self.limits.get("cpu")
        return None if cpu is None else quantity.build_cpu_cores(cpu)

    @property
    def cpu_request_cores(self) -> float | None:
        """The CPU request in cores, else the limit (Kubernetes' default request), None when neither is set."""
        cpu = self.requests.get("cpu") or self.limits.get("cpu")
        return None if cpu is None else quantity.build_cpu_cores(cpu)

    def as_k8s(self) -> dict[str, dict[str, str]]:
        """The ``resources`` of a container spec (only the non-empty parts)."""
        out: dict[str, dict[str, str]] = {}
        if self.requests:
            out["requests"] = dict(self.requests)
        if self.limits:
            out["limits"] = dict(self.limits)
        return out


class CompressionResources(Resources):
    """Compute resources of the compression Job's container (e.g. nvidia.com/gpu for fp8/int4)."""

    __cel__ = _gpu_rules("spec.compression.resources")


class ServingResources(Resources):
    """Compute resources of each inference container."""

    __cel__ = _gpu_rules("spec.serving.resources")


class ArtifactStore(schema.ApiModel):
    """Where compressed artifacts are stored (shared by the Job and the serving pods)."""

    pvc: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]
    """Name of a PersistentVolumeClaim in the same namespace (ReadWriteMany for several nodes)."""


class Compression(schema.ApiModel):
    """Compression of the model in a Kubernetes Job before it is served, gated on measured accuracy; the result is a
    content-addressed artifact (a new version or recipe makes a new artifact, an existing one is reused). Absent:
    the source model is served as is."""

    steps: recipe.Steps
    """Compression steps applied in order; each sets exactly one of prune, quantize, distill."""
    evaluation: recipe.Evaluation
    """The accuracy gate; the Job fails (and nothing is rolled out) when the loss exceeds the tolerance."""
    artifacts: ArtifactStore
    """Where compressed artifacts are stored (shared by the Job and the serving pods)."""
    compiled: recipe.Compiled = Field(default_factory=recipe.Compiled)
    resources: CompressionResources = Field(default_factory=CompressionResources)
    """Compute resources of the compression Job's container (e.g. nvidia.com/gpu for fp8/int4)."""
    backoff_limit: Annotated[int, Field(ge=0, le=10)] = 1
    """Retries of the compression Job's pod before the Job fails. Default 1."""
    active_deadline_seconds: Annotated[int, Field(ge=60, le=604800)] = 3600
    """Wall-clock limit of the compression Job, in seconds. Default 3600."""
    pod_template: podtemplate.CompressionPodTemplate | None = None

    @property
    def artifacts_pvc(self) -> str:
        return self.artifacts.pvc

    @property
    def needs_cuda(self) -> bool:
        return any(s.quantize is not None and s.quantize.needs_cuda for s in self.steps)

    def build_recipe(self) -> dict[str, Any]:
        """The recipe as the artifact key hashes it (``recipe.build_recipe_document``)."""
        return recipe.build_recipe_document(list(self.steps), self.evaluation, self.compiled)


class Batching(schema.ApiModel):
    """Dynamic batching of inference requests in each pod."""

    max_batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    """Largest batch handed to the model. Default 32."""
    max_delay_ms: Annotated[int, Field(ge=0, le=10000)] = 5
    """Longest wait, in milliseconds, for a batch to fill (never waited on an empty queue). Default 5."""


Toleration = podtemplate.Toleration  # defined with the pod template types (spec.serving.podTemplate)


class Grpc(schema.ApiModel):
    """gRPC (Open Inference Protocol v2) of Shipyard's own server: the pods serve it on container port 9000 (name
    grpc), the model's Service and the per-version Services expose it at port (appProtocol kubernetes.io/h2c)."""

    port: Annotated[int, Field(ge=1, le=65535)] = 9000
    """Port of the Services for gRPC. Default 9000."""
    http: bool = True
    """Keep the HTTP front end. false: gRPC only (probes are Kubernetes' gRPC probes, grpc.health.v1), and the pods
    have no HTTP /metrics, so builtin and scrape metrics are refused. Default true."""


class Serving(schema.ApiModel):
    """The inference pods of every version."""

    __constraints__ = (podtemplate.SERVER_NOT_WITH_RUNTIME,)
    __cel__ = (
        schema.Cel("!has(self.autoscaling) || !has(self.replicas) || self.replicas <= self.autoscaling.maxReplicas",
                   "spec.serving.replicas must not exceed spec.serving.autoscaling.maxReplicas: with autoscaling the "
                   "scaler sets replicas (leave it out of the manifest, or within the bounds)", field_path=".replicas"),
        schema.Cel("!has(self.autoscaling) || !has(self.autoscaling.metric) || self.autoscaling.metric != 'cpu' || "
                   "has(self.resources) && (has(self.resources.requests) && 'cpu' in self.resources.requests || "
                   "has(self.resources.limits) && 'cpu' in self.resources.limits)",
                   "spec.serving.autoscaling.metric cpu is a percentage of each pod's CPU request: set "
                   "spec.serving.resources requests.cpu (or limits.cpu)", field_path=".autoscaling.metric",
                   reason="FieldValueRequired"),
        schema.Cel("!has(self.grpc) || !has(self.runtime)",
                   "spec.serving.grpc turns on Shipyard's server's gRPC; a runtime declares its gRPC port in "
                   "spec.serving.runtime.ports.grpc", field_path=".grpc", reason="FieldValueForbidden"),
        schema.Cel("!has(self.grpc) || (has(self.grpc.http) && !self.grpc.http) || !has(self.grpc.port) || "
                   "self.port != self.grpc.port",
                   "spec.serving.grpc.port must differ from spec.serving.port (both are ports of the Services)",
                   field_path=".grpc.port"),
        schema.Cel("!has(self.runtime) || !has(self.runtime.ports) || !has(self.runtime.ports.grpc) || "
                   "!has(self.runtime.ports.http) || self.runtime.ports.grpc != self.runtime.ports.http",
                   "spec.serving.runtime.ports.grpc must differ from ports.http", field_path=".runtime.ports.grpc"),
    )

    replicas: Annotated[int, Field(ge=0, le=1000)] = 1
    """Replicas of the stable version at rest; canary steps split them by weight. Default 1."""
    resources: ServingResources = Field(default_factory=ServingResources)
    """Compute resources of each inference container."""
    batching: Batching = Field(default_factory=Batching, json_schema_extra=schema.k8s(default={}))
    """Dynamic batching of inference requests in each pod."""
    node_selector: Annotated[dict[str, Annotated[str, Field(max_length=63)]], Field(
        json_schema_extra=schema.k8s(max_properties=32, validations=[
            schema.Cel(f"self.all(k, size(k) <= {MAX_RESOURCE_NAME})",
                       f"spec.serving.nodeSelector label keys must be at most {MAX_RESOURCE_NAME} characters"),
            schema.Cel(f"self.all(k, k.matches('{LABEL_KEY_PATTERN}'))",
                       "spec.serving.nodeSelector keys must be label keys: [prefix/]name, the name of alphanumerics, "
                       "'-', '_' and '.' (at most 63), beginning and ending with an alphanumeric"),
            schema.Cel(f"self.all(k, self[k].matches('{LABEL_VALUE_PATTERN}'))",
                       "spec.serving.nodeSelector values must be label values: empty, or alphanumerics, '-', '_' and "
                       "'.', beginning and ending with an alphanumeric")]))] = Field(default_factory=dict)
    """Node labels the inference pods must match."""
    tolerations: Annotated[tuple[Toleration, ...], Field(max_length=32, json_schema_extra=schema.k8s(
        list_type="atomic"))] = ()
    """Tolerations of the inference pods (e.g. for tainted GPU nodes), as in a pod spec."""
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    """Port of the model's Service for HTTP (Shipyard's server listens on 8080, a runtime on its ports.http; port
    name http). Default 8080."""
    grpc: Grpc | None = None
    """gRPC of Shipyard's own server (absent: HTTP only). A runtime's gRPC is its ports.grpc instead."""
    runtime: runtimes.Runtime | None = None
    """The serving runtime when it is not Shipyard's own server: a preset (torchserve, triton, vllm) and/or an
    explicit container (command, args, env, ports, probes, modelMountPath, metrics mapping). Absent: shipyard-runtime
    serve, whose pods are as before. Batching applies to Shipyard's server only (configure the runtime's own)."""
    server: podtemplate.Server | None = None
    pod_template: podtemplate.ServingPodTemplate | None = None
    disruption_budget: disruption.DisruptionBudget | None = None
    autoscaling: autoscaling_mod.Autoscaling | None = None

    @property
    def effective_replicas(self) -> int:
        """The replicas to run now: ``replicas`` (which a scaler writes through the scale subresource), within the
        autoscaling bounds when there are any."""
        return autoscaling_mod.plan_replicas(self.replicas, self.autoscaling)


class ShadowStep(schema.ApiModel):
    """A shadow step: the candidate runs beside the stable and takes no client traffic; the stable's server copies
    percent % of the requests it answered to the candidate and compares the two answers (spec.model.output), which the
    builtin metric predictionAgreement judges. It ends when the analysis passed and, as set, minRequests copies were
    compared and duration passed since the candidate was Ready (with both: whichever comes last). See
    docs/shadow.md."""

    __constraints__ = (schema.at_least_one("minRequests", "duration", what="spec.rollout.steps[].shadow"),)

    percent: Annotated[int, Field(ge=1, le=100)]
    """Share of the requests the stable answered that are copied to the candidate, 1-100. The candidate runs
    ceil(replicas x percent / 100) pods (at least one): the same share of the load."""
    min_requests: Annotated[int, Field(ge=1, le=1000000000)] | None = None
    """Compared copies (requests whose two answers were compared, summed over the stable's pods) needed before the step
    may end."""
    duration: Annotated[Duration, Field(json_schema_extra=schema.k8s(validations=[_duration_rule(
        "duration(self) <= duration('168h')", "a shadow step's duration must be at most 168h")]))] | None = None
    """Time the step lasts at least, from the candidate's pods being Ready, e.g. 10m; at most 168h."""

    @property
    def duration_seconds(self) -> float | None:
        return None if self.duration is None else parse_duration(self.duration)


class RolloutStep(schema.ApiModel):
    """One canary step: a weighted step (weight), or a shadow step (shadow), which may only be the first."""

    __constraints__ = (
        *schema.one_of("weight", "shadow", what="each spec.rollout.steps item"),
        schema.Constraint(
            schema.Cel("!has(self.shadow) || (!has(self.pause) && !self.manual)",
                       "a shadow step sets neither pause nor manual: it lasts its minRequests and/or duration",
                       field_path=".shadow", reason="FieldValueForbidden"),
            lambda d: "@shadow: sets neither pause nor manual: it lasts its minRequests and/or duration"
            if d.get("shadow") is not None and (d.get("pause") is not None or d.get("manual")) else None),
    )
    __cel__ = (schema.Cel("!(self.manual && has(self.pause))", "a rollout step sets either pause or manual, not both",
                          field_path=".pause", reason="FieldValueForbidden"),)

    weight: Annotated[int, Field(ge=1, le=100)] | None = None
    """Percentage of spec.serving.replicas given to the candidate (rounded up, at least one pod); the stable keeps
    the rest. Absent in a shadow step."""
    shadow: ShadowStep | None = None
    """A shadow step instead of a weighted one: the candidate gets copies of live requests and no client traffic.
    Only as the first step."""
    pause: Annotated[Duration, Field(json_schema_extra=schema.k8s(validations=[_duration_rule(
        "duration(self) <= duration('168h')", "a rollout step pause must be at most 168h (hold longer with manual "
                                              "true)")]))] | None = None
    """Time to hold this step (while analysis runs), e.g. 30s, 5m, 1h30m; at most 168h (7 days: hold longer with
    manual true). Absent = no pause."""
    manual: bool = False
    """Hold this step until promoted with the shipyard.dev/promote annotation. Default false."""

    @property
    def pause_seconds(self) -> float | None:
        return None if self.pause is None else parse_duration(self.pause)

    @property
    def is_shadow(self) -> bool:
        """A shadow step (``weight`` is then None)."""
        return self.shadow is not None


PROVIDER_KEYS: Final = ("builtin", "prometheus", "scrape", "web", "job")  # a metric's provider fields, in order


class Metric(schema.ApiModel):
    """One metric: exactly one provider (builtin, prometheus, scrape, web or job) and a threshold (max, min,
    maxRelativeToStable; a job metric may have none: its exit code is the verdict)."""

    __constraints__ = (
        *schema.one_of(*PROVIDER_KEYS, what="each spec.rollout.analysis.metrics item"),
        schema.Constraint(
            schema.Cel("has(self.max) || has(self.min) || has(self.maxRelativeToStable) || has(self.job)",
                       "each spec.rollout.analysis.metrics item must set a threshold (max, min or "
                       "maxRelativeToStable), unless it is a job metric (its exit code is the verdict)",
                       reason="FieldValueRequired"),
            lambda d: None if any(d.get(k) is not None for k in ("max", "min", "maxRelativeToStable", "job")) else
            "must set a threshold (max, min or maxRelativeToStable), unless it is a job metric"),
        schema.not_above("min", "max", what="spec.rollout.analysis.metrics"),
        schema.Constraint(
            schema.Cel("!has(self.builtin) || self.builtin != 'predictionAgreement' || has(self.min)",
                       "builtin predictionAgreement is judged with min (the least share of agreeing answers, e.g. "
                       "0.99)", field_path=".min", reason="FieldValueRequired"),
            lambda d: "@min: builtin predictionAgreement is judged with min (the least share of agreeing answers, "
                      "e.g. 0.99)" if d.get("builtin") == "predictionAgreement" and d.get("min") is None else None),
        schema.Constraint(
            schema.Cel("!has(self.builtin) || self.builtin != 'predictionAgreement' || "
                       "(!has(self.max) && !has(self.maxRelativeToStable))",
                       "builtin predictionAgreement compares the candidate with the stable already: it takes min only, "
                       "not max or maxRelativeToStable", field_path=".maxRelativeToStable",
                       reason="FieldValueForbidden"),
            lambda d: "@maxRelativeToStable: builtin predictionAgreement compares the candidate with the stable "
                      "already: it takes min only, not max or maxRelativeToStable"
            if d.get("builtin") == "predictionAgreement" and (d.get("max") is not None
                                                             or d.get("maxRelativeToStable") is not None) else None),
    )
    __cel__ = (
        schema.Cel("!has(self.maxRelativeToStable) || !has(self.prometheus) || "
                   "self.prometheus.query.contains('{{version}}')",
                   "a prometheus query compared with the stable (maxRelativeToStable) must contain {{version}}",
                   field_path=".prometheus.query"),
        schema.Cel("!has(self.maxRelativeToStable) || !has(self.job)",
                   "a job metric cannot be compared with the stable (maxRelativeToStable): the Job measures the "
                   "candidate; give it the stable's endpoint instead (SHIPYARD_REFERENCE_ENDPOINT)",
                   field_path=".maxRelativeToStable", reason="FieldValueForbidden"),
    )

    name: Annotated[str, Field(max_length=63, pattern=DNS_LABEL_PATTERN)]
    """Name of the metric (a DNS label), unique in the analysis."""
    builtin: builtin_provider.Builtin | None = None
    """A built-in metric of the runtime's own metrics: errorRate (fraction of failed requests), latencyP99 (99th
    percentile request duration, seconds), and for LLM servers ttftP99 (time to first token) and tpotP99 (time per
    output token), measured for the candidate and the stable; read from Prometheus when one is configured, else
    scraped from the pods' metrics. Shipyard's server gives errorRate and latencyP99; another runtime those its
    metric mapping (spec.serving.runtime.metrics or its preset's) has."""
    prometheus: prometheus_provider.Query | None = None
    """A PromQL query returning one number."""
    scrape: scrape_provider.Scrape | None = None
    """A metric read directly from the candidate pods' /metrics (no Prometheus needed)."""
    web: web_provider.Web | None = None
    """An HTTP(S) endpoint answering JSON; the value is picked with a JSONPath."""
    job: job_provider.Job | None = None
    """A Kubernetes Job run against the candidate; its exit code is the verdict, its termination message may carry
    a value."""
    max: float | None = None
    """The measurement fails when the value is above max."""
    min: float | None = None
    """The measurement fails when the value is below min."""
    max_relative_to_stable: Annotated[float, Field(ge=0, le=1000)] | None = None
    """The measurement fails when candidate > stable x (1 + maxRelativeToStable), the same metric measured for the
    stable version (e.g. 0.1 = at most 10% worse)."""

    @property
    def compares_with_stable(self) -> bool:
        return self.max_relative_to_stable is not None

    @property
    def provider_key(self) -> str:
        """The provider's field name (``builtin``, ``prometheus``, ``scrape``, ``web`` or ``job``)."""
        for key in PROVIDER_KEYS:
            if getattr(self, key) is not None:
                return key
        raise AssertionError("a metric has exactly one provider (admission)")

    @property
    def provider(self) -> object:
        """The provider's fragment of this metric (its spec)."""
        return getattr(self, self.provider_key)


class PrometheusDefault(schema.ApiModel):
    """Default Prometheus for the metrics of this analysis (else the operator's configuration)."""

    address: Annotated[str, _address_field("a Prometheus address")]
    """Base URL of the Prometheus HTTP API, e.g. http://prometheus.monitoring:9090."""


NoDataPolicy: TypeAlias = Literal["Fail", "Inconclusive", "Ignore"]


class Analysis(schema.ApiModel):
    """Health analysis of the candidate while it rolls out. Every interval each metric is measured and judged
    Successful, Failed, Inconclusive or Error; more than failureLimit failures, or more than consecutiveErrorLimit
    consecutive errors, fail the rollout. Worst-case detection time: initialDelay + (failureLimit + 1) x interval
    (plus, per measurement, a job metric's activeDeadlineSeconds). Absent: no analysis (only startup is checked)."""

    interval: Annotated[Duration, Field(json_schema_extra=schema.k8s(validations=[_duration_rule(
        "(duration(self) >= duration('1s') && duration(self) <= duration('1h'))",
        "spec.rollout.analysis.interval must be between 1s and 1h")]))] = "30s"
    """Time between measurements, e.g. 15s; between 1s and 1h. Default 30s."""
    initial_delay: Annotated[Duration, Field(json_schema_extra=schema.k8s(validations=[_duration_rule(
        "duration(self) <= duration('24h')", "spec.rollout.analysis.initialDelay must be at most 24h")]))] = "0s"
    """Time to wait after the candidate is Ready before the first measurement; at most 24h. Default 0s."""
    failure_limit: Annotated[int, Field(ge=0, le=100)] = 1
    """Failed measurements tolerated; one more fails the analysis. Default 1."""
    consecutive_error_limit: Annotated[int, Field(ge=0, le=100)] = 4
    """Consecutive Error measurements (provider down, bad response) tolerated; one more fails the analysis.
    Default 4."""
    min_samples: Annotated[int, Field(ge=1, le=1000)] = 1
    """Successful measurements of every metric needed before a step may complete. Default 1."""
    no_data: NoDataPolicy = "Inconclusive"
    """Verdict of a measurement with no data (e.g. no traffic yet): Fail counts a failure, Inconclusive holds the
    rollout at its step (no promotion, no rollback), Ignore skips the measurement. Default Inconclusive."""
    prometheus: PrometheusDefault | None = None
    """Default Prometheus for the metrics of this analysis (else the operator's configuration)."""
    metrics: Annotated[tuple[Metric, ...], Field(min_length=1, max_length=16, json_schema_extra=schema.k8s(
        list_type="map", list_map_keys=["name"]))]
    """Metrics judged at every interval; names are unique."""

    @property
    def interval_seconds(self) -> float:
        return parse_duration(self.interval)

    @property
    def initial_delay_seconds(self) -> float:
        return parse_duration(self.initial_delay)

    @property
    def prometheus_address(self) -> str | None:
        return None if self.prometheus is None else self.prometheus.address

    @property
    def detection_bound_seconds(self) -> float:
        """Worst-case time from a failing candidate to a failed analysis: initialDelay + (failureLimit + 1) x the
        longest measurement period, which is the interval, plus a job metric's activeDeadlineSeconds (its next
        measurement starts an interval after its Job finished, at most the deadline after it started)."""
        period = self.interval_seconds + max((m.job.active_deadline_seconds for m in self.metrics if m.job), default=0)
        return self.initial_delay_seconds + (self.failure_limit + 1) * period

    def address_for(self, metric: Metric) -> str | None:
        """The Prometheus address a prometheus-provider metric uses (None = the operator's configuration)."""
        if metric.prometheus is not None and metric.prometheus.address is not None:
            return metric.prometheus.address
        return self.prometheus_address


RolloutStrategy: TypeAlias = Literal["canary", "blueGreen"]
BLUE_GREEN_SCALE_DOWN_DELAY = 30  # seconds the previous version stays warm after a blue-green switch by default


class BlueGreen(schema.ApiModel):
    """Blue-green settings (spec.rollout.strategy blueGreen)."""

    __cel__ = (schema.Cel(
        "!has(self.postPromotionAnalysis) || !self.postPromotionAnalysis.metrics.exists(m, has(m.builtin) && "
        "m.builtin == 'predictionAgreement')",
        "spec.rollout.blueGreen.postPromotionAnalysis cannot use builtin predictionAgreement: it needs a shadow step "
        "(canary)", field_path=".postPromotionAnalysis", reason="FieldValueForbidden"),)

    auto_promotion: bool = True
    """Switch the active Service to the new version as soon as its pods are all Ready and its pre-promotion
    analysis (spec.rollout.analysis) succeeded. false: wait for shipyard.dev/promote=<version>. Default true."""
    post_promotion_analysis: Analysis | None = None
    """Analysis of the new version after the switch, while the previous version stays fully scaled up: a failure
    switches the active Service back at once (no cold start). The previous version is scaled down only after this
    analysis succeeded and spec.rollout.scaleDownDelaySeconds passed."""


class Rollout(schema.ApiModel):
    """Progressive rollout of a new version: canary (by replica weight) or blue-green."""

    __constraints__ = (schema.requires("blueGreen", "strategy", "blueGreen", what="spec.rollout.blueGreen"),)
    __cel__ = (schema.Cel(
        "!has(self.strategy) || self.strategy != 'blueGreen' || !has(self.steps) || size(self.steps) == 0",
        "spec.rollout.steps are canary steps: blue-green (spec.rollout.strategy blueGreen) has none, it switches all "
        "traffic at once", field_path=".steps", reason="FieldValueForbidden"),)

    strategy: RolloutStrategy = "canary"
    """canary: the candidate takes traffic step by step (spec.rollout.steps). blueGreen: the candidate is scaled to
    spec.serving.replicas behind the preview Service (<name>-preview) while the stable keeps all traffic, analysed
    (spec.rollout.analysis), then the model's Service switches to it at once; spec.rollout.blueGreen holds the
    post-promotion analysis. Default canary."""
    blue_green: BlueGreen | None = None

    steps: Annotated[tuple[RolloutStep, ...], Field(max_length=20, json_schema_extra=schema.k8s(
        list_type="atomic", validations=[schema.Cel(
            "self.all(s, !has(s.weight) || self.exists_one(t, has(t.weight) && t.weight == s.weight)) && "
            "self.filter(s, has(s.weight)).map(s, s.weight).isSorted()",
            "spec.rollout.steps weights must be strictly increasing"), schema.Cel(
            "self.all(s, !has(s.shadow)) || (has(self[0].shadow) && size(self.filter(s, has(s.shadow))) == 1)",
            "spec.rollout.steps: a shadow step must be the first step, and there is at most one (the candidate is "
            "compared before any client gets its answers)", reason="FieldValueForbidden")]))] = ()
    """Canary steps in order: optionally a shadow step first, then weighted steps, weights strictly increasing and at
    most 100; after the last step the candidate is promoted. Absent or empty: a single step of weight 100 without
    pause."""
    startup_timeout_seconds: Annotated[int, Field(ge=10, le=86400)] = 900
    """Time for a candidate's pods to become Ready (image pull, model load, warm-up); past it the rollout fails like
    a failed analysis. Default 900."""
    max_surge_gpus: Annotated[int, Field(ge=0, le=4096)] | None = Field(default=None, alias="maxSurgeGPUs")
    """Most GPUs the candidate may use above the stable's allocation during a rollout. Absent: no limit. 0: replace
    in place (the stable shrinks as the candidate grows), for when no spare GPU exists."""
    analysis: Analysis | None = None
    traffic: traffic_mod.Traffic | None = None
    """How the candidate gets its share: absent or replicas, by Ready pods behind the model's Service (a step's
    weight is rounded to whole pods); gatewayAPI, exact weights in the named HTTPRoute (and GRPCRoute) rules, the
    candidate's pods sized for its share (docs/traffic.md)."""
    scale_down_delay_seconds: Annotated[int, Field(ge=0, le=86400)] | None = None
    """The rollback window: how long the previous stable keeps its pods Ready (and out of traffic: the model's Service
    selects the stable version only) after a promotion. shipyard.dev/rollback-to that version inside the window
    switches back at once, with no cold start; outside it, the kept version is scaled up first and traffic moves
    only when it is Ready. A new rollout ends the window. With spec.rollout.maxSurgeGPUs the window keeps at most the
    pods the surge budget allows. Default 0 for canary, 30 for blueGreen."""

    @property
    def effective_scale_down_delay(self) -> int:
        if self.scale_down_delay_seconds is not None:
            return self.scale_down_delay_seconds
        return BLUE_GREEN_SCALE_DOWN_DELAY if self.strategy == "blueGreen" else 0

    @property
    def post_promotion_analysis(self) -> Analysis | None:
        return self.blue_green.post_promotion_analysis if self.blue_green is not None else None

    @property
    def gateway_api(self) -> traffic_mod.GatewayAPI | None:
        """The Gateway API routes of spec.rollout.traffic, None for replicas traffic."""
        return self.traffic.gateway_api if self.traffic is not None else None

    @property
    def effective_steps(self) -> tuple[RolloutStep, ...]:
        """The steps, or a single step of weight 100 without pause when none are given."""
        return self.steps or (RolloutStep(weight=100),)

    @property
    def shadow_step(self) -> ShadowStep | None:
        """The shadow step's settings (it is the first step), None without one."""
        return self.steps[0].shadow if self.steps and self.steps[0].shadow is not None else None


RollbackPolicy: TypeAlias = Literal["Automatic", "Manual"]


class Rollback(schema.ApiModel):
    """What happens when a candidate fails."""

    policy: RollbackPolicy = "Automatic"
    """Automatic: a failed analysis or startup scales the candidate to 0 and the stable back up (phase RolledBack);
    the failed version is not retried until the spec changes. Manual: the rollout pauses instead, for the
    shipyard.dev/promote or shipyard.dev/abort annotation. Default Automatic."""


_HAS_SHADOW_STEP: Final = "has(self.rollout) && has(self.rollout.steps) && self.rollout.steps.exists(s, has(s.shadow))"
_USES_AGREEMENT: Final = ("has(self.rollout) && has(self.rollout.analysis) && self.rollout.analysis.metrics.exists(m, "
                          "has(m.builtin) && m.builtin == 'predictionAgreement')")
SHADOW_RULES: Final = (
    schema.Cel(f"!({_HAS_SHADOW_STEP}) || !has(self.serving) || !has(self.serving.runtime)",
               "a shadow step (spec.rollout.steps[0].shadow) needs Shipyard's own server, which copies the requests "
               "and compares the answers: remove spec.serving.runtime, or the shadow step",
               field_path=".serving.runtime", reason="FieldValueForbidden"),
    schema.Cel(f"!({_HAS_SHADOW_STEP}) || has(self.model.output)",
               "a shadow step (spec.rollout.steps[0].shadow) needs spec.model.output (classes, embedding or tensor): "
               "how the candidate's answers are compared with the stable's", field_path=".model.output",
               reason="FieldValueRequired"),
    schema.Cel(f"!({_HAS_SHADOW_STEP}) || !has(self.serving) || !has(self.serving.grpc) || "
               "!has(self.serving.grpc.http) || self.serving.grpc.http",
               "a shadow step (spec.rollout.steps[0].shadow) copies requests to the candidate's HTTP endpoint: keep "
               "spec.serving.grpc.http", field_path=".serving.grpc.http", reason="FieldValueForbidden"),
    schema.Cel(f"!({_HAS_SHADOW_STEP}) || ({_USES_AGREEMENT})",
               "a shadow step (spec.rollout.steps[0].shadow) is judged by the builtin metric predictionAgreement: add "
               "it to spec.rollout.analysis.metrics (e.g. {name: agreement, builtin: predictionAgreement, min: 0.99})",
               field_path=".rollout.analysis", reason="FieldValueRequired"),
    schema.Cel(f"!({_USES_AGREEMENT}) || ({_HAS_SHADOW_STEP})",
               "builtin predictionAgreement measures a shadow step: add one (spec.rollout.steps[0].shadow), or remove "
               "the metric", field_path=".rollout.analysis.metrics", reason="FieldValueInvalid"),
)


class ModelDeploymentSpec(schema.ApiModel):
    """Desired state of the ModelDeployment."""

    __constraints__ = (podtemplate.CUDA_ARTIFACT_NEEDS_GPU_PODS, schema.Constraint(
        schema.Cel("!has(self.compression) || !has(self.model.mount) || self.model.mount != 'imageVolume'",
                   "spec.compression reads the model in a Job: an image volume (spec.model.mount imageVolume) is only "
                   "mounted into the inference pods; use mount download", field_path=".compression",
                   reason="FieldValueForbidden"),
        lambda d: "@compression: reads the model in a Job: an image volume (spec.model.mount imageVolume) is only "
                  "mounted into the inference pods; use mount download"
        if d.get("compression") is not None and d["model"].mount == "imageVolume" else None))
    __cel__ = (schema.Cel(
        "!has(self.compression) || !has(self.compression.compiled) || !has(self.compression.compiled.aotInductor) || "
        "!self.compression.compiled.aotInductor || !has(self.serving) || !has(self.serving.batching) || "
        "!has(self.serving.batching.maxBatchSize) || self.serving.batching.maxBatchSize <= "
        "(has(self.compression.compiled.maxBatchSize) ? self.compression.compiled.maxBatchSize : 1024)",
        "spec.serving.batching.maxBatchSize must not exceed spec.compression.compiled.maxBatchSize, the largest batch "
        "the compiled package accepts", field_path=".serving.batching.maxBatchSize"), schema.Cel(
        "!has(self.compression) || !has(self.compression.compiled) || !has(self.compression.compiled.mode) || "
        "self.compression.compiled.mode != 'on' || !has(self.serving) || !has(self.serving.batching) || "
        "!has(self.serving.batching.maxBatchSize) || self.serving.batching.maxBatchSize <= "
        "(has(self.compression.compiled.maxBatchSize) ? self.compression.compiled.maxBatchSize : 1024)",
        "spec.serving.batching.maxBatchSize must not exceed spec.compression.compiled.maxBatchSize with "
        "compiled.mode on: the pods must serve the compiled package", field_path=".serving.batching.maxBatchSize"),
        schema.Cel(
        "!has(self.compression) || !has(self.compression.compiled) || !has(self.compression.compiled.mode) || "
        "self.compression.compiled.mode != 'on' || !has(self.serving) || !has(self.serving.resources) || "
        "!has(self.serving.resources.limits) || !('nvidia.com/gpu' in self.serving.resources.limits)",
        "spec.compression.compiled.mode on serves the AOTInductor package, which is CPU code: GPU inference pods "
        "(spec.serving.resources nvidia.com/gpu) cannot serve it; use mode auto", field_path=".compression.compiled"),
        schema.Cel(
        "!has(self.compression) || !has(self.compression.compiled) || !has(self.compression.compiled.mode) || "
        "self.compression.compiled.mode != 'on' || !self.compression.steps.exists(s, has(s.quantize) && "
        "s.quantize.scheme in ['fp8', 'int4-weight-only'])",
        "spec.compression.compiled.mode on needs a CPU package, and fp8 and int4-weight-only quantize for CUDA; use "
        "mode auto", field_path=".compression.compiled"),
        schema.Cel(
        "!has(self.compression) || !has(self.serving) || !has(self.serving.runtime) || "
        "!has(self.serving.runtime.preset)",
        "spec.compression makes an artifact in Shipyard's format, which the torchserve, triton and vllm presets "
        "cannot load (they read their own formats): remove spec.compression, or serve the artifact with Shipyard's "
        "server or a runtime without a preset built to load it", field_path=".compression",
        reason="FieldValueForbidden"),
        schema.Cel(
        "!has(self.serving) || !has(self.serving.grpc) || !has(self.serving.grpc.http) || self.serving.grpc.http || "
        "!has(self.rollout) || !has(self.rollout.analysis) || "
        "!self.rollout.analysis.metrics.exists(m, has(m.builtin) || has(m.scrape))",
        "spec.serving.grpc.http false leaves the pods without HTTP, where their /metrics is served: builtin and "
        "scrape metrics cannot be measured; keep http, or use prometheus, web or job metrics",
        field_path=".rollout.analysis.metrics", reason="FieldValueForbidden"),
        *SHADOW_RULES,
        *runtimes.build_builtin_rules())

    image: Annotated[str, Field(min_length=1, max_length=512, json_schema_extra=schema.k8s(validations=[
        schema.Cel(f"self.matches('{IMAGE_PATTERN}')",
                   "spec.image must be a valid image reference: [registry[:port]/]repository[:tag][@sha256:digest], "
                   "repository in lower case"),
        schema.Cel("self.matches(':[A-Za-z0-9_][-A-Za-z0-9_.]{0,127}$') || self.matches('@sha256:[a-f0-9]{64}$')",
                   "spec.image must carry a tag (repository:1.4.0) or a digest (@sha256:...): the tag is the "
                   "version, and a registry port is not a tag")]))]
    """Container image of the model's runtime. Its tag is the version (e.g. registry.example/acme/digits-model:1.4.0
    is version 1.4.0); an image pinned by digest only has version sha256-<first 12 hex digits>. A registry port
    (host:5000/img) is not a tag: the reference must end in :<tag> or @sha256:<digest>. Changing the image starts a
    new rollout."""
    model: ModelSource
    """Where the source model is: a path inside the image, or a URI. Exactly one of path and uri."""
    compression: Compression | None = None
    serving: Serving = Field(default_factory=Serving, json_schema_extra=schema.k8s(default={}))
    """The inference pods of every version."""
    rollout: Rollout = Field(default_factory=Rollout, json_schema_extra=schema.k8s(default={}))
    """Progressive rollout of a new version: canary by replica weight, or blue-green."""
    rollback: Rollback = Field(default_factory=Rollback, json_schema_extra=schema.k8s(default={}))
    """What happens when a candidate fails."""
    revision_history_limit: Annotated[int, Field(ge=0, le=100)] = 10
    """Earlier versions kept as Deployments scaled to 0, for shipyard.dev/rollback-to: such a version is scaled up
    first and takes traffic once Ready (a cold start; within spec.rollout.scaleDownDelaySeconds of a promotion the
    previous stable is still warm and the switch is immediate). Default 10."""
    retry: Annotated[int, Field(ge=0, json_schema_extra=schema.k8s(format="int64"))] = 0
    """Retry counter: a failed or rolled-back version is not retried while the spec is unchanged (so a GitOps tool
    re-applying the manifest causes no loop); raising retry retries it once. kubectl users can instead set the
    annotation shipyard.dev/retry to a new value. Default 0."""

    @property
    def image_ref(self) -> ImageReference:
        return parse_image(self.image)

    @property
    def version(self) -> str:
        """The image's tag; for a downloaded model (s3://, https://, oci://) followed by ``-m`` and the source's id,
        so that a new URI or digest is a new version, rolled out as one (1.4.0-m3f2a9c01)."""
        source = self.model.source_id
        return self.image_ref.version if source is None else f"{self.image_ref.version}-m{source}"


# ---------------------------------------------------------------------------------------------------------------
# The object


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


def parse_controls(annotations: Mapping[str, object]) -> ManualControls:
    """The manual controls from an object's annotations (non-string or blank values count as absent)."""

    def get(key: str) -> str | None:
        value = annotations.get(key)
        return (value.strip() or None) if isinstance(value, str) else None

    return ManualControls(promote=get(ANNOTATION_PROMOTE), abort=get(ANNOTATION_ABORT),
                          retry=get(ANNOTATION_RETRY), rollback_to=get(ANNOTATION_ROLLBACK_TO))


def parse_spec(body: Mapping[str, object], path: str = "spec") -> ModelDeploymentSpec:
    """``spec`` of a ModelDeployment as its typed view, with the checks the API server cannot make."""
    try:
        spec = schema.parse(ModelDeploymentSpec, body, prefix=path)
    except schema.ApiError as exc:
        field, _, problem = exc.problems[0].partition(": ")
        raise SpecError(field, problem) from None
    parse_image(spec.image, f"{path}.image")
    _check_runtime(spec, path)
    _check_shadow(spec, path)
    pod_problem = podtemplate.assess_spec(spec, path)
    if pod_problem is not None:
        raise SpecError(*pod_problem)
    if spec.compression is not None:
        problems = recipe.assess_step_order(list(spec.compression.steps), f"{path}.compression.steps")
        if problems:
            field, _, problem = problems[0].partition(": ")
            raise SpecError(field, problem)
    for where, resources in ((f"{path}.serving.resources", spec.serving.resources),
                             (f"{path}.compression.resources", spec.compression.resources
                              if spec.compression else None)):
        for kind, values in (("limits", resources.limits if resources else {}),
                             ("requests", resources.requests if resources else {})):
            for name, value in values.items():
                try:
                    quantity.parse_quantity(value)
                except ValueError as exc:
                    raise SpecError(f"{where}.{kind}.{name}", str(exc)) from None
    return spec


def _check_shadow(spec: ModelDeploymentSpec, path: str) -> None:
    """The shadow step's rules admission checks in CEL (``SHADOW_RULES``, the steps' order), again with the offending
    field's path (one SpecError)."""
    steps = spec.rollout.steps
    shadows = [i for i, step in enumerate(steps) if step.is_shadow]
    analysis = spec.rollout.analysis
    agreement = [i for i, m in enumerate(analysis.metrics if analysis else ())
                 if m.builtin == builtin_provider.PREDICTION_AGREEMENT]
    if shadows and shadows != [0]:
        raise SpecError(f"{path}.rollout.steps[{shadows[-1] if shadows[0] == 0 else shadows[0]}].shadow",
                        "a shadow step must be the first step, and there is at most one")
    if shadows:
        if spec.serving.runtime is not None:
            raise SpecError(f"{path}.serving.runtime", "a shadow step needs Shipyard's own server (it copies the "
                                                       "requests and compares the answers): remove the runtime")
        if spec.model.output is None:
            raise SpecError(f"{path}.model.output", "required with a shadow step: classes, embedding or tensor")
        if spec.serving.grpc is not None and not spec.serving.grpc.http:
            raise SpecError(f"{path}.serving.grpc.http", "a shadow step copies requests to the candidate's HTTP "
                                                         "endpoint: keep it true")
        if not agreement:
            raise SpecError(f"{path}.rollout.analysis", "a shadow step is judged by the builtin metric "
                                                        "predictionAgreement: add it to the analysis' metrics")
    elif agreement:
        raise SpecError(f"{path}.rollout.analysis.metrics[{agreement[0]}].builtin",
                        "predictionAgreement measures a shadow step (spec.rollout.steps[0].shadow): add one")
    post = spec.rollout.post_promotion_analysis
    for i, metric in enumerate(post.metrics if post else ()):
        if metric.builtin == builtin_provider.PREDICTION_AGREEMENT:
            raise SpecError(f"{path}.rollout.blueGreen.postPromotionAnalysis.metrics[{i}].builtin",
                            "predictionAgreement needs a shadow step (canary)")


def _check_runtime(spec: ModelDeploymentSpec, path: str) -> None:
    """The runtime rules admission checks in CEL, again with the offending field's path (one SpecError)."""
    runtime = spec.serving.runtime
    if runtime is not None and runtime.preset is not None and spec.compression is not None:
        raise SpecError(f"{path}.compression", f"cannot be served by runtime preset {runtime.preset}: compression "
                                               "makes an artifact in Shipyard's format, and the preset loads its own")
    if spec.serving.grpc is not None and runtime is not None:
        raise SpecError(f"{path}.serving.grpc", "turns on Shipyard's server's gRPC; a runtime declares its gRPC port "
                                                "in spec.serving.runtime.ports.grpc")
    resolved = runtimes.resolve_runtime(runtime) if runtime is not None else None
    if resolved is not None:
        ports = resolved.ports
        if "http" in ports and ports.get("grpc") == spec.serving.port:
            raise SpecError(f"{path}.serving.port", f"{spec.serving.port} is also the runtime's gRPC port, which the "
                                                    "Services expose at the same number: choose another")
        for kind, probe in resolved.probes.items():
            if probe.port not in ports:
                raise SpecError(f"{path}.serving.runtime.probes.{kind}.port",
                                f"the runtime has no {probe.port} port (spec.serving.runtime.ports)")
    analysis = spec.rollout.analysis
    if analysis is None:
        return
    for i, metric in enumerate(analysis.metrics):
        where = f"{path}.rollout.analysis.metrics[{i}]"
        if spec.serving.grpc is not None and not spec.serving.grpc.http and (metric.builtin or metric.scrape):
            raise SpecError(f"{where}.{metric.provider_key}", "cannot be measured with spec.serving.grpc.http false: "
                                                              "the pods have no HTTP /metrics")
        if metric.builtin is not None:
            problem = runtimes.assess_builtin(metric.builtin, runtime)
            if problem is not None:
                raise SpecError(f"{where}.builtin", problem)
        if (metric.builtin or metric.scrape) and resolved is not None and "metrics" not in resolved.ports:
            raise SpecError(f"{where}.{metric.provider_key}", "the runtime has no HTTP port to read its metrics from: "
                                                              "set spec.serving.runtime.ports.metrics")


def parse_model_deployment(body: Mapping[str, Any]) -> ModelDeployment:
    """A whole ModelDeployment object (metadata, spec, manual-control annotations) as its typed view."""
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, Mapping) or not isinstance(metadata.get("name"), str):
        raise SpecError("metadata.name", "must be set")
    raw_generation = metadata.get("generation")
    generation = raw_generation if isinstance(raw_generation, int) else 0
    uid = metadata.get("uid") if isinstance(metadata.get("uid"), str) else None
    raw_spec = body.get("spec")
    if raw_spec is None:
        raise SpecError("spec", "must be set")
    if not isinstance(raw_spec, Mapping):
        raise SpecError("spec", f"must be an object, got {type(raw_spec).__name__}")
    spec = parse_spec(raw_spec)
    annotations = metadata.get("annotations") or {}
    return ModelDeployment(name=metadata["name"], namespace=metadata.get("namespace"), generation=generation,
                           uid=uid, spec=spec, controls=parse_controls(annotations if isinstance(annotations, Mapping)
                                                                         else {}))
