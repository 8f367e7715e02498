"""Unit tests of the ModelDeployment's types (shipyard.operator.spec): the typed view of an object, its defaults
(the same as the CRD's, which is generated from these types), what the operator checks itself (image references,
step order, quantities), errors naming their field, the recipe that addresses artifacts, the examples, and the
generated CRD (every field described and bounded, every rule with a message, no drift from the committed file).

What only the API server checks (CEL rules, integer vs string types) is not re-checked by the operator: those cases
are in tests/integration/test_crd_admission.py and the hostile-spec generator. No I/O besides reading files.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from shipyard.contract import recipe
from shipyard.operator import crd, spec
from shipyard.operator.providers import prometheus, scrape
from shipyard.operator.spec import URI_PATTERN
from tests import examples

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "modeldeployments.shipyard.dev.yaml"
EXAMPLES = examples.PATHS
DIGEST = "sha256:" + "0123456789abcdef" * 4
DELETE = object()


def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_PATH.read_text())
    (version,) = crd["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def minimal() -> dict[str, Any]:
    return {
        "apiVersion": "shipyard.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "digits", "namespace": "ml", "generation": 3, "uid": "u-1"},
        "spec": {"image": "registry.example/shipyard/digits-model:1.0.0", "model": {"path": "/models/digits"}},
    }


def full() -> dict[str, Any]:
    """Every section present, with non-default values where a default exists."""
    body = minimal()
    body["spec"].update({
        "model": {"uri": "pvc://models/digits/1.0.0", "name": "digits-v"},
        "compression": {
            "steps": [
                {"prune": {"amount": 0.5, "scope": "structured", "norm": 1, "fineTuneEpochs": 3}},
                {"distill": {"student": "models.small:build", "temperature": 2.0, "alpha": 0.7, "epochs": 5,
                             "lr": 0.01, "batchSize": 32}},
                {"quantize": {"scheme": "int4-weight-only"}},
            ],
            "evaluation": {"dataset": "my_pkg.data:load", "maxRelativeAccuracyLoss": 0.05, "samples": 200},
            "artifacts": {"pvc": "artifacts"},
            "compiled": {"aotInductor": True, "maxBatchSize": 128, "maxAutotune": True},
            "resources": {"requests": {"cpu": 2, "nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": 1}},
            "backoffLimit": 3,
            "activeDeadlineSeconds": 600,
        },
        "serving": {
            "replicas": 4,
            "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"nvidia.com/gpu": 2}},
            "batching": {"maxBatchSize": 64, "maxDelayMs": 2},
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                            {"key": "k", "operator": "Equal", "value": "v", "effect": "NoExecute",
                             "tolerationSeconds": 30}],
            "port": 80,
        },
        "rollout": {
            "steps": [{"weight": 10, "pause": "1m30s"}, {"weight": 50, "manual": True}, {"weight": 100}],
            "startupTimeoutSeconds": 120,
            "maxSurgeGPUs": 0,
            "analysis": {
                "interval": "15s",
                "initialDelay": "10s",
                "failureLimit": 2,
                "consecutiveErrorLimit": 3,
                "minSamples": 2,
                "noData": "Fail",
                "prometheus": {"address": "http://prometheus.monitoring:9090"},
                "metrics": [
                    {"name": "error-rate", "builtin": "errorRate", "max": 0.01, "maxRelativeToStable": 0.5},
                    {"name": "p99", "prometheus": {"query": 'q{version="{{version}}"}',
                                                   "address": "https://prom.example"}, "max": 0.25,
                     "maxRelativeToStable": 0.2},
                    {"name": "inflight", "scrape": {"metric": "shipyard_inflight_requests", "labels": {"model": "d"},
                                                    "aggregation": "max", "rate": True}, "min": 0, "max": 100},
                ],
            },
        },
        "rollback": {"policy": "Manual"},
        "revisionHistoryLimit": 3,
        "retry": 2,
    })
    return body


BASES: dict[str, Callable[[], dict[str, Any]]] = {"min": minimal, "full": full}
_TOKEN = re.compile(r'\.?([A-Za-z0-9_]+)|\[(\d+)\]|\["([^"]+)"\]')


def mutate(body: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    """Sets (or, with DELETE, removes) the value at a path like spec.rollout.steps[0].weight or x["a.b/c"]."""
    keys: list[str | int] = [int(i) if i else (k or q) for k, i, q in _TOKEN.findall(path)]
    node: Any = body
    for key in keys[:-1]:
        if isinstance(key, str) and key not in node:
            node[key] = {}
        node = node[key]
    if value is DELETE:
        del node[keys[-1]]
    elif isinstance(node, list) and keys[-1] == len(node):
        node.append(value)
    else:
        node[keys[-1]] = value
    return body


def apply_crd_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Applies the schema's defaults the way the API server does (recursively, also inside defaulted objects)."""
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                apply_crd_defaults(sub, value[key])
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            apply_crd_defaults(schema["items"], item)
    return value


def parse(body: dict[str, Any]) -> spec.ModelDeployment:
    return spec.parse_model_deployment(body)


# ---------------------------------------------------------------------------------------------------------------
# Images and versions

VALID_IMAGES = [
    pytest.param("digits:1.0.0", "digits", "1.0.0", None, "1.0.0", id="bare-repository"),
    pytest.param("registry.example/acme/digits-model:1.4.0", "registry.example/acme/digits-model", "1.4.0", None,
                 "1.4.0", id="registry-and-path"),
    pytest.param("host:5000/img:2", "host:5000/img", "2", None, "2", id="registry-port-and-tag"),
    pytest.param("localhost:5000/a/b_c__d-e:v1_rc.2-x", "localhost:5000/a/b_c__d-e", "v1_rc.2-x", None, "v1_rc.2-x",
                 id="separators-and-tag-chars"),
    pytest.param(f"registry.example/acme/digits@{DIGEST}", "registry.example/acme/digits", None, DIGEST,
                 "sha256-0123456789ab", id="digest-only"),
    pytest.param(f"host:5000/img@{DIGEST}", "host:5000/img", None, DIGEST, "sha256-0123456789ab",
                 id="registry-port-and-digest"),
    pytest.param(f"img:1.2@{DIGEST}", "img", "1.2", DIGEST, "1.2", id="tag-and-digest-tag-wins"),
    pytest.param("img:" + "a" * 128, "img", "a" * 128, None, "a" * 128, id="tag-128-characters"),
]


@pytest.mark.parametrize(("image", "repository", "tag", "digest", "version"), VALID_IMAGES)
def test_parse_image_splits_reference(image: str, repository: str, tag: str | None, digest: str | None,
                                      version: str) -> None:
    ref = spec.parse_image(image)
    assert (ref.reference, ref.repository, ref.tag, ref.digest, ref.version) == (image, repository, tag, digest,
                                                                                 version)
    assert spec.image_version(image) == version


INVALID_IMAGES = [
    pytest.param("registry.example/acme/digits", "must carry a tag", id="no-tag"),
    pytest.param("host:5000/img", "must carry a tag", id="registry-port-is-not-a-tag"),
    pytest.param("img:", "not a valid image reference", id="empty-tag"),
    pytest.param("registry.example/Acme/digits:1", "not a valid image reference", id="upper-case-repository"),
    pytest.param("img:1.0 ", "not a valid image reference", id="trailing-space"),
    pytest.param("img:-1", "not a valid image reference", id="tag-starting-with-dash"),
    pytest.param("img:" + "a" * 129, "not a valid image reference", id="tag-129-characters"),
    pytest.param("img@sha256:abc", "not a valid image reference", id="short-digest"),
    pytest.param("img@md5:" + "a" * 32, "not a valid image reference", id="other-digest-algorithm"),
    pytest.param("r.example/" + "a" * 510 + ":1", "not a valid image reference", id="longer-than-512"),
    pytest.param("", "not a valid image reference", id="empty"),
]


@pytest.mark.parametrize(("image", "problem"), INVALID_IMAGES)
def test_parse_image_rejects(image: str, problem: str) -> None:
    with pytest.raises(spec.SpecError) as err:
        spec.parse_image(image)
    assert err.value.field == "spec.image"
    assert problem in err.value.problem


def test_port_only_reference_is_a_repository_with_a_tag() -> None:
    # As in Docker: without a "/", "localhost:5000" is the repository "localhost" with the tag "5000".
    assert spec.parse_image("localhost:5000").tag == "5000"


# ---------------------------------------------------------------------------------------------------------------
# Durations

VALID_DURATIONS = [
    pytest.param("0s", 0.0, id="zero"),
    pytest.param("30s", 30.0, id="seconds"),
    pytest.param("5m", 300.0, id="minutes"),
    pytest.param("1h", 3600.0, id="hours"),
    pytest.param("250ms", 0.25, id="milliseconds"),
    pytest.param("1h30m", 5400.0, id="compound"),
    pytest.param("1.5h", 5400.0, id="fraction"),
    pytest.param("1m1m", 120.0, id="repeated-unit-adds"),
]


@pytest.mark.parametrize(("text", "seconds"), VALID_DURATIONS)
def test_parse_duration(text: str, seconds: float) -> None:
    assert spec.parse_duration(text) == pytest.approx(seconds)


INVALID_DURATIONS = [
    pytest.param("5 minutes", id="words"),
    pytest.param("30", id="no-unit"),
    pytest.param("", id="empty"),
    pytest.param("1x", id="unknown-unit"),
]


@pytest.mark.parametrize("text", INVALID_DURATIONS)
def test_parse_duration_rejects(text: str) -> None:
    # The schema's pattern keeps these out of stored objects; the parser (durationpy, Go's syntax) refuses them too.
    with pytest.raises(ValueError):
        spec.parse_duration(text)


@given(st.integers(0, 99), st.integers(0, 99), st.integers(0, 99), st.integers(0, 999))
def test_parse_duration_sums_parts(h: int, m: int, s: int, ms: int) -> None:
    assert spec.parse_duration(f"{h}h{m}m{s}s{ms}ms") == pytest.approx(h * 3600 + m * 60 + s + ms / 1000)


# ---------------------------------------------------------------------------------------------------------------
# Defaults: the parser's are the CRD's


@pytest.mark.parametrize("make", [
    pytest.param(minimal, id="minimal"),
    pytest.param(full, id="full"),
    pytest.param(lambda: mutate(mutate(minimal(), "spec.rollout.analysis.metrics",
                                       [{"name": "e", "builtin": "errorRate", "max": 0.1},
                                        {"name": "s", "scrape": {"metric": "m"}, "max": 1}]),
                                "spec.compression", {"steps": [{"prune": {"amount": 0.5}},
                                                               {"prune": {"amount": 0.5, "scope": "structured"}},
                                                               {"distill": {"student": "a:b"}},
                                                               {"quantize": {"scheme": "int8-weight-only"}}],
                                                     "evaluation": {"dataset": "builtin:digits"},
                                                     "artifacts": {"pvc": "a"}}),
                 id="every-defaulted-field-absent"),
    *[pytest.param(lambda p=p: examples.load_model_deployment(p), id=f"example-{p.stem}") for p in EXAMPLES],
])
def test_parser_defaults_equal_crd_defaults(make: Callable[[], dict[str, Any]]) -> None:
    body = make()
    defaulted = apply_crd_defaults(crd_schema(), copy.deepcopy(body))
    assert defaulted != body  # the case leaves some defaulted field out
    assert parse(body) == parse(defaulted)


def test_minimal_spec_gets_documented_defaults() -> None:
    s = parse(minimal()).spec
    assert s.compression is None
    assert s.serving == spec.Serving(replicas=1, resources=spec.ServingResources(),
                                     batching=spec.Batching(max_batch_size=32, max_delay_ms=5), node_selector={},
                                     tolerations=(), port=8080)
    assert s.rollout == spec.Rollout(steps=(), startup_timeout_seconds=900, max_surge_gpus=None, analysis=None)
    assert s.rollout.effective_steps == (spec.RolloutStep(weight=100, pause=None, manual=False),)
    assert (s.rollback.policy, s.revision_history_limit, s.retry) == ("Automatic", 10, 0)


def test_analysis_defaults() -> None:
    body = mutate(minimal(), "spec.rollout.analysis.metrics", [{"name": "e", "builtin": "errorRate", "max": 0.1}])
    analysis = parse(body).spec.rollout.analysis
    assert analysis is not None
    assert (analysis.interval_seconds, analysis.initial_delay_seconds, analysis.failure_limit,
            analysis.consecutive_error_limit, analysis.min_samples, analysis.no_data,
            analysis.prometheus_address) == (30.0, 0.0, 1, 4, 1, "Inconclusive", None)
    assert analysis.detection_bound_seconds == 60.0


# ---------------------------------------------------------------------------------------------------------------
# The full spec parses into the expected objects


def test_full_spec_parses() -> None:
    md = parse(full())
    assert (md.name, md.namespace, md.generation, md.uid) == ("digits", "ml", 3, "u-1")
    assert md.served_model_name == "digits-v"
    s = md.spec
    assert s.version == "1.0.0"
    assert s.model == spec.ModelSource(path=None, uri="pvc://models/digits/1.0.0", name="digits-v")
    assert s.model.uri_scheme == "pvc"
    assert s.compression == spec.Compression(
        steps=[recipe.CompressionStep(prune=recipe.Prune(amount=0.5, scope="structured", norm=1,
                                                         fine_tune_epochs=3)),
               recipe.CompressionStep(distill=recipe.Distill(student="models.small:build", temperature=2.0,
                                                             alpha=0.7, epochs=5, lr=0.01, batch_size=32)),
               recipe.CompressionStep(quantize=recipe.Quantize(scheme="int4-weight-only"))],
        evaluation=recipe.Evaluation(dataset="my_pkg.data:load", max_relative_accuracy_loss=0.05, samples=200),
        artifacts=spec.ArtifactStore(pvc="artifacts"),
        compiled=recipe.Compiled(aot_inductor=True, max_batch_size=128, max_autotune=True),
        resources=spec.CompressionResources(requests={"cpu": "2", "nvidia.com/gpu": "1"},
                                            limits={"nvidia.com/gpu": "1"}),
        backoff_limit=3,
        active_deadline_seconds=600,
    )
    assert s.compression.artifacts_pvc == "artifacts"
    assert s.compression.needs_cuda
    assert [step.kind for step in s.compression.steps] == ["prune", "distill", "quantize"]
    assert s.serving.resources.gpus == 2
    assert s.serving.resources.as_k8s() == {"requests": {"cpu": "500m", "memory": "1Gi"},
                                            "limits": {"nvidia.com/gpu": "2"}}
    assert [t.as_k8s() for t in s.serving.tolerations] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "k", "operator": "Equal", "value": "v", "effect": "NoExecute", "tolerationSeconds": 30}]
    assert (s.serving.replicas, s.serving.batching, dict(s.serving.node_selector), s.serving.port) == (
        4, spec.Batching(max_batch_size=64, max_delay_ms=2), {"pool": "gpu"}, 80)
    assert s.rollout.steps == (spec.RolloutStep(weight=10, pause="1m30s"), spec.RolloutStep(weight=50, manual=True),
                               spec.RolloutStep(weight=100))
    assert [step.pause_seconds for step in s.rollout.steps] == [90.0, None, None]
    assert s.rollout.effective_steps == s.rollout.steps
    assert (s.rollout.startup_timeout_seconds, s.rollout.max_surge_gpus) == (120, 0)
    a = s.rollout.analysis
    assert a is not None
    assert (a.interval_seconds, a.initial_delay_seconds, a.failure_limit, a.consecutive_error_limit, a.min_samples,
            a.no_data, a.prometheus_address) == (15.0, 10.0, 2, 3, 2, "Fail", "http://prometheus.monitoring:9090")
    assert a.detection_bound_seconds == 10.0 + 3 * 15.0
    error_rate, p99, inflight = a.metrics
    assert error_rate == spec.Metric(name="error-rate", builtin="errorRate", max=0.01, max_relative_to_stable=0.5)
    assert p99.provider == prometheus.Query(query='q{version="{{version}}"}', address="https://prom.example")
    assert inflight == spec.Metric(name="inflight", scrape=scrape.Scrape(
        metric="shipyard_inflight_requests", labels={"model": "d"}, aggregation="max", rate=True), max=100.0, min=0.0)
    assert [m.provider_key for m in a.metrics] == ["builtin", "prometheus", "scrape"]
    assert [m.compares_with_stable for m in a.metrics] == [True, True, False]
    assert [a.address_for(m) for m in a.metrics] == ["http://prometheus.monitoring:9090", "https://prom.example",
                                                     "http://prometheus.monitoring:9090"]
    assert (s.rollback.policy, s.revision_history_limit, s.retry) == ("Manual", 3, 2)


BEHAVIOURS = [
    pytest.param("spec.compression", {"steps": [{"prune": {"amount": 0.3, "scope": "structured"}}],
                                      "evaluation": {"dataset": "builtin:digits"}, "artifacts": {"pvc": "a"}},
                 lambda md: md.spec.compression.steps[0].prune.structured_norm, 2,
                 id="structured-prune-norm-defaults-to-2"),
    pytest.param("spec.compression", {"steps": [{"prune": {"amount": 0.3}}],
                                      "evaluation": {"dataset": "builtin:digits"}, "artifacts": {"pvc": "a"}},
                 lambda md: md.spec.compression.steps[0].prune.norm, None, id="global-prune-has-no-norm"),
    pytest.param("spec.compression", {"steps": [{"quantize": {"scheme": "int8-dynamic"}}],
                                      "evaluation": {"dataset": "builtin:digits"}, "artifacts": {"pvc": "a"}},
                 lambda md: md.spec.compression.needs_cuda, False, id="int8-needs-no-cuda"),
    pytest.param("spec.image", f"r.example/img@{DIGEST}", lambda md: md.spec.version, "sha256-0123456789ab",
                 id="digest-version"),
    pytest.param("spec.model", {"uri": "s3://bucket/key"}, lambda md: md.spec.model.uri_scheme, "s3",
                 id="uri-scheme"),
    pytest.param("spec.model", {"path": "/m"}, lambda md: (md.spec.model.uri_scheme, md.served_model_name),
                 (None, "digits"), id="path-source-served-under-object-name"),
    pytest.param("spec.rollout.analysis", {"metrics": [{"name": "p", "prometheus": {"query": "up"}, "max": 1}]},
                 lambda md: md.spec.rollout.analysis.address_for(md.spec.rollout.analysis.metrics[0]), None,
                 id="no-prometheus-address-anywhere"),
    pytest.param("spec.serving.resources.limits", {"nvidia.com/gpu": "4"}, lambda md: md.spec.serving.resources.gpus,
                 4, id="gpu-as-string"),
    pytest.param("spec.serving.resources", {"limits": {"memory": 1024}},
                 lambda md: (dict(md.spec.serving.resources.limits), md.spec.serving.resources.gpus),
                 ({"memory": "1024"}, 0), id="integer-quantity-as-string-no-gpu"),
    pytest.param("spec.serving.tolerations", [{"operator": "Exists"}],
                 lambda md: [t.as_k8s() for t in md.spec.serving.tolerations], [{"operator": "Exists"}],
                 id="toleration-of-everything"),
    pytest.param("metadata.annotations", {spec.ANNOTATION_PROMOTE: "1.0.0", spec.ANNOTATION_ABORT: " 1.0.0 ",
                                          spec.ANNOTATION_RETRY: "", spec.ANNOTATION_ROLLBACK_TO: 7,
                                          "other": "x"},
                 lambda md: md.controls, spec.ManualControls(promote="1.0.0", abort="1.0.0"),
                 id="controls-stripped-blank-and-non-string-absent"),
    pytest.param("metadata.annotations", {spec.ANNOTATION_RETRY: "2", spec.ANNOTATION_ROLLBACK_TO: "0.9.0"},
                 lambda md: (md.controls.retry, md.controls.rollback_to), ("2", "0.9.0"), id="controls-retry"),
    pytest.param("metadata", {"name": "x"}, lambda md: (md.namespace, md.generation, md.uid, md.controls),
                 (None, 0, None, spec.ManualControls()), id="bare-metadata"),
    pytest.param("spec.rollout.steps", [{"weight": 20, "pause": "0s"}],
                 lambda md: md.spec.rollout.steps[0].pause_seconds, 0.0, id="zero-pause-is-not-absent"),
]


@pytest.mark.parametrize(("path", "value", "get", "expected"), BEHAVIOURS)
def test_parsed_values(path: str, value: object, get: Callable[[spec.ModelDeployment], object],
                       expected: object) -> None:
    assert get(parse(mutate(minimal(), path, value))) == expected


# ---------------------------------------------------------------------------------------------------------------
# Every error names its field

ERRORS = [
    # metadata and top level
    ("min", "metadata.name", DELETE, 'metadata.name',
     'must be set', 'no-name'),
    ("min", "spec", DELETE, 'spec',
     'must be set', 'no-spec'),
    ("min", "spec", "x", 'spec',
     'must be an object, got str', 'spec-not-object'),
    ("min", "spec.revisionHistoryLimit", 101, 'spec.revisionHistoryLimit',
     'Input should be less than or equal to 100, got 101', 'history-over-100'),
    ("min", "spec.revisionHistoryLimit", -1, 'spec.revisionHistoryLimit',
     'Input should be greater than or equal to 0, got -1', 'history-negative'),
    ("min", "spec.retry", -1, 'spec.retry',
     'Input should be greater than or equal to 0, got -1', 'retry-negative'),
    ("min", "spec.rollback.policy", "Sometimes", 'spec.rollback.policy',
     "Input should be 'Automatic' or 'Manual', got 'Sometimes'", 'rollback-policy'),
    ("min", "spec.rollback", "Automatic", 'spec.rollback',
     "Input should be a valid dictionary or instance of Rollback, got 'Automatic'", 'rollback-not-object'),
    # image
    ("min", "spec.image", DELETE, 'spec.image',
     'Field required', 'no-image'),
    ("min", "spec.image", "registry.example/digits", 'spec.image',
     "'registry.example/digits' must carry a tag (repository:1.4.0) or a digest (@sha256:...): t"
     'he tag is the version, and a registry port is not a tag', 'image-no-tag'),
    ("min", "spec.image", "registry.example:5000/digits", 'spec.image',
     "'registry.example:5000/digits' must carry a tag (repository:1.4.0) or a digest (@sha256:.."
     '.): the tag is the version, and a registry port is not a tag', 'image-port-no-tag'),
    ("min", "spec.image", "Digits:1", 'spec.image',
     "'Digits:1' is not a valid image reference ([registry[:port]/]repository[:tag][@sha256:dige"
     'st], repository in lower case): repository name must be lowercase', 'image-invalid'),
    ("min", "spec.image", 1, 'spec.image',
     'Input should be a valid string, got 1', 'image-not-string'),
    # model
    ("min", "spec.model", DELETE, 'spec.model',
     'Field required', 'no-model'),
    ("min", "spec.model", {}, 'spec.model',
     'must set path or uri', 'model-empty'),
    ("min", "spec.model.uri", "pvc://m/x", 'spec.model',
     'must set only one of path and uri', 'model-path-and-uri'),
    ("min", "spec.model.path", "models/digits", 'spec.model.path',
     "String should match pattern '^/', got 'models/digits'", 'model-relative-path'),
    ("min", "spec.model.path", "/", 'spec.model.path',
     "String should have at least 2 characters, got '/'", 'model-root-path'),
    ("min", "spec.model.path", "/" + "a" * 1024, 'spec.model.path',
     "String should have at most 1024 characters, got '/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
     'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa...', 'model-path-too-long'),
    ("min", "spec.model", {"uri": "ftp://host/m"}, 'spec.model.uri',
     f"String should match pattern '{URI_PATTERN}', got 'ftp://host/m'", 'model-uri-scheme'),
    ("min", "spec.model", {"uri": "pvc://Claim/m"}, 'spec.model.uri',
     f"String should match pattern '{URI_PATTERN}', got 'pvc://Claim/m'", 'model-uri-bad-claim'),
    ("min", "spec.model.name", "-x", 'spec.model.name',
     "String should match pattern '^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$', got '-x'", 'model-name'),
    # compression
    ("full", "spec.compression", [], 'spec.compression',
     'Input should be a valid dictionary or instance of Compression', 'compression-not-object'),
    ("full", "spec.compression.steps", [], 'spec.compression.steps',
     'List should have at least 1 item after validation, not 0', 'steps-empty'),
    ("full", "spec.compression.steps", DELETE, 'spec.compression.steps',
     'Field required', 'steps-absent'),
    ("full", "spec.compression.steps", [{"quantize": {"scheme": "fp8"}}] * 9, 'spec.compression.steps',
     'List should have at most 8 items after validation, not 9', 'steps-too-many'),
    ("full", "spec.compression.steps", {"prune": {}}, 'spec.compression.steps',
     'Input should be a valid list', 'steps-not-list'),
    ("full", "spec.compression.steps[0]", "prune", 'spec.compression.steps[0]',
     "Input should be a valid dictionary or instance of CompressionStep, got 'prune'", 'step-not-object'),
    ("full", "spec.compression.steps[3]", {}, 'spec.compression.steps[3]',
     'must set one of prune, quantize, distill', 'step-empty'),
    ("full", "spec.compression.steps[2].prune", {"amount": 0.5}, 'spec.compression.steps[2]',
     'must set only one of prune, quantize, distill, got prune, quantize', 'step-two-kinds'),
    ("full", "spec.compression.steps[0].prune", 0.5, 'spec.compression.steps[0].prune',
     'Input should be a valid dictionary or instance of Prune, got 0.5', 'prune-not-object'),
    ("full", "spec.compression.steps[0].prune.amount", 1.0, 'spec.compression.steps[0].prune.amount',
     'Input should be less than 1, got 1.0', 'prune-amount-1'),
    ("full", "spec.compression.steps[0].prune.amount", 0, 'spec.compression.steps[0].prune.amount',
     'Input should be greater than 0, got 0', 'prune-amount-0'),
    ("full", "spec.compression.steps[0].prune.amount", DELETE, 'spec.compression.steps[0].prune.amount',
     'Field required', 'prune-amount-absent'),
    ("full", "spec.compression.steps[0].prune.amount", "90%", 'spec.compression.steps[0].prune.amount',
     "Input should be a valid number, unable to parse string as a number, got '90%'", 'prune-amount-string'),
    ("full", "spec.compression.steps[0].prune.amount", math.nan, 'spec.compression.steps[0].prune.amount',
     'Input should be less than 1, got nan', 'prune-amount-nan'),
    ("full", "spec.compression.steps[0].prune.scope", "local", 'spec.compression.steps[0].prune.scope',
     "Input should be 'global' or 'structured', got 'local'", 'prune-scope'),
    ("full", "spec.compression.steps[0].prune.scope", "global", 'spec.compression.steps[0].prune.norm',
     'only allowed with scope structured', 'prune-norm-global'),
    ("full", "spec.compression.steps[0].prune.norm", 3, 'spec.compression.steps[0].prune.norm',
     'Input should be 1 or 2, got 3', 'prune-norm-3'),
    ("full", "spec.compression.steps[0].prune.fineTuneEpochs", -1, 'spec.compression.steps[0].prune.fineTuneEpochs',
     'Input should be greater than or equal to 0, got -1', 'prune-epochs'),
    ("full", "spec.compression.steps[2].quantize.scheme", "int3", 'spec.compression.steps[2].quantize.scheme',
     "Input should be 'int8-dynamic', 'int8-weight-only', 'int8-embedding', 'fp8' or 'int4-weigh"
     "t-only', got 'int3'", 'quantize-scheme'),
    ("full", "spec.compression.steps[2].quantize", {}, 'spec.compression.steps[2].quantize.scheme',
     'Field required', 'quantize-scheme-absent'),
    ("full", "spec.compression.steps[1].distill.student", "models.small", 'spec.compression.steps[1].distill.student',
     "String should match pattern '^[A-Za-z_][A-Za-z0-9_]*([.][A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_]"
     "[A-Za-z0-9_]*$', got 'models.small'", 'distill-student'),
    ("full", "spec.compression.steps[1].distill.student", DELETE, 'spec.compression.steps[1].distill.student',
     'Field required', 'distill-student-absent'),
    ("full", "spec.compression.steps[1].distill.temperature", 0, 'spec.compression.steps[1].distill.temperature',
     'Input should be greater than 0, got 0', 'distill-temperature'),
    ("full", "spec.compression.steps[1].distill.alpha", 1.5, 'spec.compression.steps[1].distill.alpha',
     'Input should be less than or equal to 1, got 1.5', 'distill-alpha'),
    ("full", "spec.compression.steps[1].distill.epochs", 0, 'spec.compression.steps[1].distill.epochs',
     'Input should be greater than or equal to 1, got 0', 'distill-epochs'),
    ("full", "spec.compression.steps[1].distill.lr", 0, 'spec.compression.steps[1].distill.lr',
     'Input should be greater than 0, got 0', 'distill-lr'),
    ("full", "spec.compression.steps[1].distill.batchSize", 0, 'spec.compression.steps[1].distill.batchSize',
     'Input should be greater than or equal to 1, got 0', 'distill-batch-size'),
    ("full", "spec.compression.evaluation", DELETE, 'spec.compression.evaluation',
     'Field required', 'no-evaluation'),
    ("full", "spec.compression.evaluation.dataset", "digits", 'spec.compression.evaluation.dataset',
     "String should match pattern '^(builtin:[a-z0-9]([-a-z0-9]*[a-z0-9])?|[A-Za-z_][A-Za-z0-9_]"
     "*([.][A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*)$', got 'digits'", 'evaluation-dataset'),
    ("full", "spec.compression.evaluation.maxRelativeAccuracyLoss", 1.5,
      'spec.compression.evaluation.maxRelativeAccuracyLoss',
     'Input should be less than or equal to 1, got 1.5', 'evaluation-loss-over-1'),
    ("full", "spec.compression.evaluation.maxRelativeAccuracyLoss", -0.1,
      'spec.compression.evaluation.maxRelativeAccuracyLoss',
     'Input should be greater than or equal to 0, got -0.1', 'evaluation-loss-negative'),
    ("full", "spec.compression.evaluation.samples", 0, 'spec.compression.evaluation.samples',
     'Input should be greater than or equal to 1, got 0', 'evaluation-samples'),
    ("full", "spec.compression.artifacts", DELETE, 'spec.compression.artifacts',
     'Field required', 'no-artifacts'),
    ("full", "spec.compression.artifacts", {}, 'spec.compression.artifacts.pvc',
     'Field required', 'no-artifacts-pvc'),
    ("full", "spec.compression.artifacts.pvc", "My_PVC", 'spec.compression.artifacts.pvc',
     "String should match pattern '^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9]"
     ")?)*$', got 'My_PVC'", 'artifacts-pvc-name'),
    ("full", "spec.compression.backoffLimit", 11, 'spec.compression.backoffLimit',
     'Input should be less than or equal to 10, got 11', 'backoff-limit'),
    ("full", "spec.compression.compiled", True, 'spec.compression.compiled',
     'Input should be a valid dictionary or instance of Compiled, got True', 'compiled-bool'),
    ("full", "spec.compression.compiled.maxBatchSize", 1, 'spec.compression.compiled.maxBatchSize',
     'Input should be greater than or equal to 2, got 1', 'compiled-max-batch-1'),
    ("full", "spec.compression.compiled.mode", "yes", 'spec.compression.compiled.mode',
     "Input should be 'auto', 'on' or 'off', got 'yes'", 'compiled-mode-unknown'),
    ("full", "spec.compression.compiled.mode", "off", 'spec.compression.compiled.aotInductor',
     'cannot be true with mode off (aotInductor: true asks for the package, mode off for none)',
     'compiled-aot-inductor-with-mode-off'),
    ("full", "spec.compression.activeDeadlineSeconds", 59, 'spec.compression.activeDeadlineSeconds',
     'Input should be greater than or equal to 60, got 59', 'active-deadline'),
    # serving resources
    ("full", "spec.serving.resources", ["cpu"], 'spec.serving.resources',
     'Input should be a valid dictionary or instance of ServingResources', 'resources-not-object'),
    ("full", "spec.serving.resources.limits", "2", 'spec.serving.resources.limits',
     "Input should be a valid dictionary, got '2'", 'limits-not-object'),
    ("full", 'spec.serving.resources.limits["nvidia.com/gpu"]', 1.0, 'spec.serving.resources.limits.nvidia.com/gpu',
     'Input should be a valid string, got 1.0', 'gpu-float'),
    ("full", 'spec.serving.resources.limits["nvidia.com/gpu"]', True, 'spec.serving.resources.limits.nvidia.com/gpu',
     'Input should be a valid string, got True', 'gpu-bool'),
    ("full", "spec.serving.resources.requests.memory", "lots", 'spec.serving.resources.requests.memory',
     "String should match pattern '^(\\+|-)?(([0-9]+(\\.[0-9]*)?)|(\\.[0-9]+))(([KMGTPE]i)|[numkMGT"
     "PE]|([eE](\\+|-)?(([0-9]+(\\.[0-9]*)?)|(\\.[0-9]+))))?$', got 'lots'", 'memory-not-quantity'),
    ("full", "spec.serving.resources.limits.memory", "1" * 65, 'spec.serving.resources.limits.memory',
     "Value should have at most 64 items after validation, not 65, got '111111111111111111111111"
     "11111111111111111111111111111111111111111'", 'quantity-too-long'),
    # serving
    ("full", "spec.serving", 3, 'spec.serving',
     'Input should be a valid dictionary or instance of Serving, got 3', 'serving-not-object'),
    ("full", "spec.serving.replicas", -1, 'spec.serving.replicas',
     'Input should be greater than or equal to 0, got -1', 'replicas-negative'),
    ("full", "spec.serving.replicas", 1001, 'spec.serving.replicas',
     'Input should be less than or equal to 1000, got 1001', 'replicas-over-1000'),
    ("full", "spec.serving.batching.maxBatchSize", 0, 'spec.serving.batching.maxBatchSize',
     'Input should be greater than or equal to 1, got 0', 'max-batch-size'),
    ("full", "spec.serving.batching.maxDelayMs", 10001, 'spec.serving.batching.maxDelayMs',
     'Input should be less than or equal to 10000, got 10001', 'max-delay'),
    ("full", "spec.serving.nodeSelector.pool", 1, 'spec.serving.nodeSelector.pool',
     'Input should be a valid string, got 1', 'node-selector-value'),
    ("full", "spec.serving.nodeSelector.pool", "v" * 64, 'spec.serving.nodeSelector.pool',
     "String should have at most 63 characters, got 'vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv"
     "vvvvvvvvvvvvvvvvvvvvv'", 'node-selector-value-too-long'),
    ("full", "spec.serving.port", 0, 'spec.serving.port',
     'Input should be greater than or equal to 1, got 0', 'port-0'),
    ("full", "spec.serving.port", 65536, 'spec.serving.port',
     'Input should be less than or equal to 65535, got 65536', 'port-too-high'),
    ("full", "spec.serving.tolerations", {"key": "k"}, 'spec.serving.tolerations',
     'Input should be a valid tuple', 'tolerations-not-list'),
    ("full", "spec.serving.tolerations[0].operator", "In", 'spec.serving.tolerations[0].operator',
     "Input should be 'Exists' or 'Equal', got 'In'", 'toleration-operator'),
    ("full", "spec.serving.tolerations[0].effect", "Evict", 'spec.serving.tolerations[0].effect',
     "Input should be 'NoSchedule', 'PreferNoSchedule' or 'NoExecute', got 'Evict'", 'toleration-effect'),
    ("full", "spec.serving.tolerations[1].key", 5, 'spec.serving.tolerations[1].key',
     'Input should be a valid string, got 5', 'toleration-key'),
    # rollout
    ("full", "spec.rollout.steps[1].weight", 101, 'spec.rollout.steps[1].weight',
     'Input should be less than or equal to 100, got 101', 'weight-over-100'),
    ("full", "spec.rollout.steps[0].weight", 0, 'spec.rollout.steps[0].weight',
     'Input should be greater than or equal to 1, got 0', 'weight-0'),
    ("full", "spec.rollout.steps[0].weight", DELETE, 'spec.rollout.steps[0]',
     'must set one of weight, shadow', 'weight-absent'),
    ("full", "spec.rollout.steps[0].weight", 12.5, 'spec.rollout.steps[0].weight',
     'Input should be a valid integer, got a number with a fractional part, got 12.5', 'weight-fraction'),
    ("full", "spec.rollout.steps[0].pause", "5 minutes", 'spec.rollout.steps[0].pause',
     "String should match pattern '^([0-9]+([.][0-9]+)?(ms|s|m|h))+$', got '5 minutes'", 'pause-words'),
    ("full", "spec.rollout.steps[0].pause", 60, 'spec.rollout.steps[0].pause',
     'Input should be a valid string, got 60', 'pause-integer'),
    # a pause or delay of thousands of years overflowed the planner's datetime arithmetic: bounded like the CRD
    ("full", "spec.rollout.steps", [{"weight": w} for w in range(1, 22)], 'spec.rollout.steps',
     'Tuple should have at most 20 items after validation, not 21', 'steps-over-20'),
    ("full", "spec.rollout.steps[0]", 10, 'spec.rollout.steps[0]',
     'Input should be a valid dictionary or instance of RolloutStep, got 10', 'rollout-step-not-object'),
    ("full", "spec.rollout.startupTimeoutSeconds", 5, 'spec.rollout.startupTimeoutSeconds',
     'Input should be greater than or equal to 10, got 5', 'startup-timeout'),
    ("full", "spec.rollout.maxSurgeGPUs", -1, 'spec.rollout.maxSurgeGPUs',
     'Input should be greater than or equal to 0, got -1', 'max-surge-gpus'),
    # analysis
    ("full", "spec.rollout.analysis.interval", "soon", 'spec.rollout.analysis.interval',
     "String should match pattern '^([0-9]+([.][0-9]+)?(ms|s|m|h))+$', got 'soon'", 'interval-words'),
    ("full", "spec.rollout.analysis.initialDelay", "1 minute", 'spec.rollout.analysis.initialDelay',
     "String should match pattern '^([0-9]+([.][0-9]+)?(ms|s|m|h))+$', got '1 minute'", 'initial-delay'),
    ("full", "spec.rollout.analysis.failureLimit", -1, 'spec.rollout.analysis.failureLimit',
     'Input should be greater than or equal to 0, got -1', 'failure-limit'),
    ("full", "spec.rollout.analysis.consecutiveErrorLimit", 101, 'spec.rollout.analysis.consecutiveErrorLimit',
     'Input should be less than or equal to 100, got 101', 'consecutive-error-limit'),
    ("full", "spec.rollout.analysis.minSamples", 0, 'spec.rollout.analysis.minSamples',
     'Input should be greater than or equal to 1, got 0', 'min-samples'),
    ("full", "spec.rollout.analysis.noData", "Pass", 'spec.rollout.analysis.noData',
     "Input should be 'Fail', 'Inconclusive' or 'Ignore', got 'Pass'", 'no-data'),
    ("full", "spec.rollout.analysis.prometheus", {}, 'spec.rollout.analysis.prometheus.address',
     'Field required', 'prometheus-no-address'),
    ("full", "spec.rollout.analysis.prometheus.address", "prometheus:9090", 'spec.rollout.analysis.prometheus.address',
     "String should match pattern '^https?://[^ /]+(/[^ ]*)?$', got 'prometheus:9090'", 'prometheus-address-no-scheme'),
    ("full", "spec.rollout.analysis.metrics", [], 'spec.rollout.analysis.metrics',
     'Tuple should have at least 1 item after validation, not 0', 'metrics-empty'),
    ("full", "spec.rollout.analysis.metrics", DELETE, 'spec.rollout.analysis.metrics',
     'Field required', 'metrics-absent'),
    ("full", "spec.rollout.analysis.metrics[0].name", "Error_Rate", 'spec.rollout.analysis.metrics[0].name',
     "String should match pattern '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$', got 'Error_Rate'", 'metric-name'),
    ("full", "spec.rollout.analysis.metrics[0].name", DELETE, 'spec.rollout.analysis.metrics[0].name',
     'Field required', 'metric-name-absent'),
    ("full", "spec.rollout.analysis.metrics[0].builtin", DELETE, 'spec.rollout.analysis.metrics[0]',
     'must set one of builtin, prometheus, scrape, web, job', 'metric-no-provider'),
    ("full", "spec.rollout.analysis.metrics[0].scrape", {"metric": "m"}, 'spec.rollout.analysis.metrics[0]',
     'must set only one of builtin, prometheus, scrape, web, job, got builtin, scrape', 'metric-two-providers'),
    ("full", "spec.rollout.analysis.metrics[0].builtin", "successRate", 'spec.rollout.analysis.metrics[0].builtin',
     "Input should be 'errorRate', 'latencyP99', 'ttftP99', 'tpotP99' or 'predictionAgreement', got 'successRate'",
     'metric-builtin'),
    ("full", "spec.rollout.analysis.metrics[1].prometheus", {}, 'spec.rollout.analysis.metrics[1].prometheus.query',
     'Field required', 'prometheus-no-query'),
    ("full", "spec.rollout.analysis.prometheus", {}, 'spec.rollout.analysis.prometheus.address',
     'Field required', 'prometheus-address-unset'),
    ("full", "spec.rollout.analysis.metrics[1].prometheus.address", "ftp://p",
      'spec.rollout.analysis.metrics[1].prometheus.address',
     "String should match pattern '^https?://[^ /]+(/[^ ]*)?$', got 'ftp://p'", 'prometheus-metric-address'),
    ("full", "spec.rollout.analysis.metrics[2].scrape", {}, 'spec.rollout.analysis.metrics[2].scrape.metric',
     'Field required', 'scrape-no-metric'),
    ("full", "spec.rollout.analysis.metrics[2].scrape.metric", "bad-name",
      'spec.rollout.analysis.metrics[2].scrape.metric',
     "String should match pattern '^[a-zA-Z_:][a-zA-Z0-9_:]*$', got 'bad-name'", 'scrape-metric-name'),
    ("full", "spec.rollout.analysis.metrics[2].scrape.labels.model", 1,
      'spec.rollout.analysis.metrics[2].scrape.labels.model',
     'Input should be a valid string, got 1', 'scrape-label'),
    ("full", "spec.rollout.analysis.metrics[2].scrape.labels.model", "m" * 257,
      'spec.rollout.analysis.metrics[2].scrape.labels.model',
     "String should have at most 256 characters, got 'mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm"
     'mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm...', 'scrape-label-too-long'),
    ("full", "spec.rollout.analysis.metrics[2].scrape.aggregation", "median",
      'spec.rollout.analysis.metrics[2].scrape.aggregation',
     "Input should be 'sum', 'avg', 'max' or 'min', got 'median'", 'scrape-aggregation'),
    ("full", "spec.rollout.analysis.metrics[2]", {"name": "x", "scrape": {"metric": "m"}},
      'spec.rollout.analysis.metrics[2]',
     'must set a threshold (max, min or maxRelativeToStable), unless it is a job metric', 'metric-no-threshold'),
    ("full", "spec.rollout.analysis.metrics[2].min", 101, 'spec.rollout.analysis.metrics[2].min',
     'must not exceed max (101 > 100)', 'metric-min-over-max'),
    ("full", "spec.rollout.analysis.metrics[0].maxRelativeToStable", -0.1,
      'spec.rollout.analysis.metrics[0].maxRelativeToStable',
     'Input should be greater than or equal to 0, got -0.1', 'relative-negative'),
    ("full", "spec.rollout.analysis.metrics[0]", "errorRate", 'spec.rollout.analysis.metrics[0]',
     "Input should be a valid dictionary or instance of Metric, got 'errorRate'", 'metric-not-object'),
]


@pytest.mark.parametrize(("base", "path", "value", "field", "problem"),
                         [pytest.param(*case[:5], id=case[5]) for case in ERRORS])
def test_errors_name_the_field(base: str, path: str, value: object, field: str, problem: str) -> None:
    body = mutate(BASES[base](), path, value)
    with pytest.raises(spec.SpecError) as err:
        parse(body)
    assert err.value.field == field
    assert problem in err.value.problem
    assert str(err.value) == f"{field}: {err.value.problem}"
    assert isinstance(err.value, ValueError)
    assert "s3cret" not in str(err.value)  # a refused credential is never echoed (the message reaches status)


def test_error_ids_are_unique() -> None:
    ids = [case[5] for case in ERRORS]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------------------------------------------------------
# Recipes (the content of the artifact key)


def _compression(body: dict[str, Any]) -> spec.Compression:
    compression = parse(body).spec.compression
    assert compression is not None
    return compression


def test_recipe_makes_defaults_explicit() -> None:
    implicit = mutate(minimal(), "spec.compression", {"steps": [{"prune": {"amount": 0.9}},
                                                                {"quantize": {"scheme": "int8-dynamic"}}],
                                                      "evaluation": {"dataset": "builtin:digits"},
                                                      "artifacts": {"pvc": "a"}})
    explicit = apply_crd_defaults(crd_schema(), copy.deepcopy(implicit))
    assert _compression(implicit).build_recipe() == _compression(explicit).build_recipe() == {
        "steps": [{"prune": {"amount": 0.9, "scope": "global", "fineTuneEpochs": 0}},
                  {"quantize": {"scheme": "int8-dynamic"}}],
        "evaluation": {"dataset": "builtin:digits", "maxRelativeAccuracyLoss": 0.01, "samples": 1000},
    }


RECIPE_CHANGES = [
    pytest.param("spec.compression.steps[0].prune.amount", 0.6, True, id="amount-changes-recipe"),
    pytest.param("spec.compression.evaluation.samples", 10, True, id="samples-change-recipe"),
    pytest.param("spec.compression.steps[1].distill.lr", 0.1, True, id="distill-lr-changes-recipe"),
    pytest.param("spec.compression.artifacts.pvc", "other", False, id="pvc-does-not"),
    pytest.param("spec.compression.backoffLimit", 5, False, id="backoff-does-not"),
    pytest.param("spec.compression.resources", {}, False, id="resources-do-not"),
    pytest.param("spec.compression.compiled.maxBatchSize", 256, True, id="compiled-max-batch-changes-recipe"),
    pytest.param("spec.compression.compiled", {"aotInductor": False}, True, id="compiled-off-changes-recipe"),
    pytest.param("spec.compression.compiled", DELETE, True, id="compiled-absent-changes-recipe"),
    pytest.param("spec.compression.compiled.mode", "auto", False, id="compiled-mode-auto-does-not"),
    pytest.param("spec.compression.compiled.mode", "on", True, id="compiled-mode-on-changes-recipe"),
]


@pytest.mark.parametrize(("compiled", "key"), [
    # Nothing set (mode auto, the default): no compiled document, so that artifacts made before these fields keep
    # their keys (the image in the key decides which runtime compresses: docs/operator.md).
    pytest.param(DELETE, None, id="absent"),
    pytest.param({}, None, id="empty"),
    pytest.param({"mode": "auto"}, None, id="auto-written-out"),
    pytest.param({"aotInductor": False, "mode": "auto", "maxBatchSize": 1024, "maxAutotune": False}, None,
                 id="all-defaults-written-out"),
    # aotInductor true hashes as it did before mode existed.
    pytest.param({"aotInductor": True}, {"aotInductor": True, "maxBatchSize": 1024, "maxAutotune": False},
                 id="aot-inductor-as-before"),
    pytest.param({"aotInductor": True, "mode": "auto", "maxBatchSize": 128, "maxAutotune": True},
                 {"aotInductor": True, "maxBatchSize": 128, "maxAutotune": True}, id="aot-inductor-settings"),
    # Settings that change what auto builds count now (auto builds the package with them).
    pytest.param({"aotInductor": False, "maxBatchSize": 64, "maxAutotune": True},
                 {"aotInductor": False, "maxBatchSize": 64, "maxAutotune": True}, id="auto-with-settings"),
    pytest.param({"mode": "on"}, {"mode": "on", "aotInductor": False, "maxBatchSize": 1024, "maxAutotune": False},
                 id="on"),
    pytest.param({"mode": "off"}, {"mode": "off", "aotInductor": False, "maxBatchSize": 1024, "maxAutotune": False},
                 id="off"),
])
def test_the_compiled_document_in_the_artifact_key(compiled: object, key: dict[str, Any] | None) -> None:
    body = mutate(full(), "spec.compression.compiled", compiled)
    body = mutate(body, "spec.compression.steps[2].quantize.scheme", "int8-dynamic")
    assert _compression(body).build_recipe().get("compiled") == key


@pytest.mark.parametrize(("path", "value", "changes"), RECIPE_CHANGES)
def test_recipe_changes_only_with_the_artifact(path: str, value: object, changes: bool) -> None:
    before = _compression(full()).build_recipe()
    after = _compression(mutate(full(), path, value)).build_recipe()
    assert (before != after) is changes


def test_recipe_of_full_spec() -> None:
    assert _compression(full()).build_recipe()["steps"] == [
        {"prune": {"amount": 0.5, "scope": "structured", "fineTuneEpochs": 3, "norm": 1}},
        {"distill": {"student": "models.small:build", "temperature": 2.0, "alpha": 0.7, "epochs": 5, "lr": 0.01,
                     "batchSize": 32}},
        {"quantize": {"scheme": "int4-weight-only"}},
    ]


# ---------------------------------------------------------------------------------------------------------------
# Examples and the CRD file


def test_the_examples_are_all_checked() -> None:
    assert [p.name for p in EXAMPLES] == ["digits-blue-green.yaml", "digits-gateway.yaml", "digits-s3.yaml",
                                          "digits.yaml", "recommender.yaml", "sentence-encoder-oci.yaml",
                                          "sentence-encoder.yaml", "torchserve.yaml"]


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem) for p in EXAMPLES])
def test_example_passes_schema_and_parser(path: Path) -> None:
    body = examples.load_model_deployment(path)
    jsonschema.Draft4Validator(crd_schema()).validate(body)
    md = parse(body)
    assert md.spec.image.startswith("registry.example/shipyard/")
    if md.spec.model.remote:  # the runtime image and a model downloaded into the pod: the source is in the version
        assert md.spec.model.path is None and re.fullmatch(r"0\.1\.0-m[0-9a-f]{8}", md.spec.version)
        return
    assert md.spec.version == "1.0.0"
    # Shipyard's server reads /models/<name> of the example images; another runtime its own place (its model store)
    in_image = "/models/" if md.spec.serving.runtime is None else "/"
    assert md.spec.model.path is not None and md.spec.model.path.startswith(in_image)


WITH_ROUTES = [p for p in EXAMPLES if examples.load_others(p)]


def test_the_examples_with_other_objects_are_checked() -> None:
    assert [p.name for p in WITH_ROUTES] == ["digits-gateway.yaml"]


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem) for p in WITH_ROUTES])
def test_example_route_is_the_one_the_model_manages(path: Path) -> None:
    """An example's other objects are the HTTPRoute its gatewayAPI traffic names: one rule to the model's Service at
    its port (the rule Shipyard manages), attached to the Gateway of `make demo` (hack/gateway.py's defaults)."""
    md = parse(examples.load_model_deployment(path))
    gw = md.spec.rollout.gateway_api
    assert gw is not None
    (route,) = examples.load_others(path)
    assert (route["apiVersion"], route["kind"]) == ("gateway.networking.k8s.io/v1", "HTTPRoute")
    assert route["metadata"] == {"name": gw.http_route}
    assert route["spec"]["parentRefs"] == [{"name": "shipyard", "namespace": "shipyard-gateway", "sectionName": "http"}]
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"name": md.name, "port": md.spec.serving.port}]


@pytest.mark.parametrize(("path", "value"), [
    pytest.param("spec.image", DELETE, id="no-image"),
    pytest.param("spec.rollout.steps[0].weight", 101, id="weight-over-100"),
    pytest.param("spec.compression.steps[0].prune.amount", 1.0, id="prune-amount-1"),
    pytest.param("spec.rollback.policy", "Sometimes", id="rollback-policy"),
    pytest.param("spec.rollout.analysis.interval", "soon", id="interval-words"),
])
def test_offline_schema_rejects(path: str, value: object) -> None:
    # The CEL rules are checked only by the API server (tests/integration/test_crd_admission.py).
    body = mutate(yaml.safe_load((REPO / "examples" / "digits.yaml").read_text()), path, value)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(crd_schema()).validate(body)


def _schema_nodes(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for key, sub in node.get("properties", {}).items():
        out += _schema_nodes(sub, f"{path}.{key}")
    if "items" in node:
        out += _schema_nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += _schema_nodes(node["additionalProperties"], f"{path}{{}}")
    return out


def test_crd_names_and_columns() -> None:
    crd = yaml.safe_load(CRD_PATH.read_text())
    assert crd["metadata"]["name"] == "modeldeployments.shipyard.dev"
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["shortNames"] == ["md", "mds"]
    (version,) = crd["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"], version["subresources"]) == (
        "v1alpha1", True, True, {"status": {}, "scale": {"specReplicasPath": ".spec.serving.replicas",
                                                         "statusReplicasPath": ".status.replicas.current",
                                                         "labelSelectorPath": ".status.selector"}})
    columns = [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority", 0) == 0]
    assert columns == ["Phase", "Stable", "Candidate", "Ready", "Desired", "Current", "Age"]


def test_every_schema_field_is_described_and_every_rule_has_a_message() -> None:
    nodes = _schema_nodes(crd_schema())
    undescribed = [p for p, n in nodes if "description" not in n and not p.endswith(("[]", "{}"))
                   and p not in ("", ".metadata")]
    assert undescribed == []
    rules = [(p, r) for p, n in nodes for r in n.get("x-kubernetes-validations", [])]
    assert len(rules) >= 15
    assert [p for p, r in rules if not r.get("message")] == []


def test_crd_bounds_every_string_and_list_of_spec() -> None:
    # Bounds keep the CEL cost estimate within the API server's budget.
    nodes = [(p, n) for p, n in _schema_nodes(crd_schema()["properties"]["spec"], "spec")]
    unbounded = [p for p, n in nodes
                 if ((n.get("type") == "string" or n.get("x-kubernetes-int-or-string")) and "maxLength" not in n
                     and "enum" not in n)
                 or (n.get("type") == "array" and "maxItems" not in n)
                 or (n.get("type") == "object" and "additionalProperties" in n and "maxProperties" not in n)]
    assert unbounded == []


def test_largest_durations_are_accepted() -> None:
    body = mutate(mutate(full(), "spec.rollout.steps[0].pause", "168h"), "spec.rollout.analysis.initialDelay", "24h")
    rollout = parse(body).spec.rollout
    assert rollout.steps[0].pause_seconds == 168 * 3600
    assert rollout.analysis is not None and rollout.analysis.initial_delay_seconds == 24 * 3600


# ---------------------------------------------------------------------------------------------------------------
# The CRD is generated from the types


def test_committed_crd_is_what_the_types_generate() -> None:
    assert CRD_PATH.read_text() == crd.build_crd_text(), "crds/ is stale: run `make crd`"


def test_docs_field_reference_is_what_the_types_generate() -> None:
    text = (REPO / "docs" / "crd.md").read_text()
    shown = text[text.index(crd.REFERENCE_BEGIN) + len(crd.REFERENCE_BEGIN):text.index(crd.REFERENCE_END)]
    assert shown == crd.build_reference(), "docs/crd.md's reference is stale: run `make crd`"
    assert "| `rollout.analysis.metrics[].job.template` |" in shown and "| `image` |" in shown


def test_crd_check_fails_on_a_hand_edit(tmp_path: Path) -> None:
    """`python -m shipyard.operator.crd --check` (run by make test) refuses a CRD edited by hand."""
    (tmp_path / "crds").mkdir()
    (tmp_path / "hack").mkdir()
    (tmp_path / "hack" / "sync-chart.py").write_text("import sys; sys.exit(0)\n")
    edited = crd.build_crd_text().replace("maximum: 1000\n", "maximum: 5000\n", 1)
    assert edited != crd.build_crd_text()
    (tmp_path / "crds" / crd.FILE_NAME).write_text(edited)
    assert crd.main(["--check", "--repo", str(tmp_path)]) == 1
    (tmp_path / "crds" / crd.FILE_NAME).write_text(crd.build_crd_text())
    assert crd.main(["--check", "--repo", str(tmp_path)]) == 0


def test_every_provider_is_a_metric_field_and_a_status_value() -> None:
    nodes = dict(_schema_nodes(crd_schema()))
    metric = nodes[".spec.properties"] if False else crd_schema()["properties"]["spec"]["properties"]["rollout"][
        "properties"]["analysis"]["properties"]["metrics"]["items"]
    assert set(spec.PROVIDER_KEYS) <= set(metric["properties"])
    status_provider = crd_schema()["properties"]["status"]["properties"]["analysis"]["properties"]["metrics"][
        "items"]["properties"]["provider"]
    assert status_provider["enum"] == list(spec.PROVIDER_KEYS)
    one_of = [r["rule"] for r in metric["x-kubernetes-validations"] if "<= 1" in r["rule"]]
    assert one_of == [" + ".join(f"(has(self.{k}) ? 1 : 0)" for k in spec.PROVIDER_KEYS) + " <= 1"]


# ---------------------------------------------------------------------------------------------------------------
# The shadow step (spec.rollout.steps[0].shadow) and spec.model.output

AGREEMENT_METRIC = {"name": "agreement", "builtin": "predictionAgreement", "min": 0.99}


def shadow_body(**changes: object) -> dict[str, Any]:
    body = minimal()
    body["spec"]["model"]["output"] = {"kind": "classes"}
    body["spec"]["rollout"] = {"steps": [{"shadow": {"percent": 10, "minRequests": 200}}, {"weight": 50}],
                               "analysis": {"metrics": [dict(AGREEMENT_METRIC)]}}
    for path, value in changes.items():
        body = mutate(body, path, value)
    return body


def test_a_shadow_step_parses_with_its_helpers() -> None:
    parsed = parse(shadow_body()).spec
    shadow, weighted = parsed.rollout.steps
    assert shadow.is_shadow and shadow.weight is None and shadow.shadow is not None
    assert (shadow.shadow.percent, shadow.shadow.min_requests, shadow.shadow.duration) == (10, 200, None)
    assert not weighted.is_shadow and weighted.weight == 50
    assert parsed.rollout.shadow_step == shadow.shadow
    assert parse(minimal()).spec.rollout.shadow_step is None


@pytest.mark.parametrize(("output", "compare", "tolerance"), [
    pytest.param({"kind": "classes"}, "top1", 0.0, id="classes"),
    pytest.param({"kind": "embedding"}, "cosine", 0.01, id="embedding-default"),
    pytest.param({"kind": "embedding", "minCosineSimilarity": 0.9}, "cosine", 0.1, id="embedding"),
    pytest.param({"kind": "tensor"}, "maxabs", 0.001, id="tensor-default"),
    pytest.param({"kind": "tensor", "maxAbsDifference": 0.25}, "maxabs", 0.25, id="tensor"),
])
def test_model_output_is_the_runtimes_comparison(output: dict[str, Any], compare: str, tolerance: float) -> None:
    parsed = parse(shadow_body(**{"spec.model.output": output})).spec.model.output
    assert parsed is not None
    assert (parsed.compare, parsed.tolerance) == (compare, pytest.approx(tolerance))


SHADOW_ERRORS = [
    ({"spec.rollout.steps[0].shadow.minRequests": DELETE}, "spec.rollout.steps[0].shadow",
     "must set minRequests or duration", "neither-requests-nor-duration"),
    ({"spec.rollout.steps[0].shadow.percent": 0}, "spec.rollout.steps[0].shadow.percent",
     "greater than or equal to 1", "percent-0"),
    ({"spec.rollout.steps[0].shadow.percent": 101}, "spec.rollout.steps[0].shadow.percent",
     "less than or equal to 100", "percent-101"),
    ({"spec.rollout.steps[0].shadow.minRequests": 0}, "spec.rollout.steps[0].shadow.minRequests",
     "greater than or equal to 1", "min-requests-0"),
    ({"spec.rollout.steps[0].shadow.duration": "soon"}, "spec.rollout.steps[0].shadow.duration",
     "should match pattern", "duration-not-a-duration"),
    ({"spec.rollout.steps[0].weight": 10}, "spec.rollout.steps[0]", "must set only one of weight, shadow, got "
     "weight, shadow", "weight-and-shadow"),
    ({"spec.rollout.steps[0].pause": "30s"}, "spec.rollout.steps[0].shadow", "sets neither pause nor manual",
     "shadow-with-pause"),
    ({"spec.rollout.steps[0].manual": True}, "spec.rollout.steps[0].shadow", "sets neither pause nor manual",
     "shadow-with-manual"),
    ({"spec.rollout.steps": [{"weight": 10}, {"shadow": {"percent": 10, "duration": "1m"}}]},
     "spec.rollout.steps[1].shadow", "must be the first step", "shadow-second"),
    ({"spec.rollout.steps": [{"shadow": {"percent": 10, "duration": "1m"}}, {"shadow": {"percent": 5,
                                                                                         "duration": "1m"}}]},
     "spec.rollout.steps[1].shadow", "at most one", "two-shadow-steps"),
    ({"spec.model.output": DELETE}, "spec.model.output", "required with a shadow step", "no-output"),
    ({"spec.model.output": {"kind": "classes", "minCosineSimilarity": 0.9}},
     "spec.model.output.minCosineSimilarity", "only allowed with kind embedding", "similarity-not-embedding"),
    ({"spec.model.output": {"kind": "embedding", "maxAbsDifference": 0.1}},
     "spec.model.output.maxAbsDifference", "only allowed with kind tensor", "difference-not-tensor"),
    ({"spec.model.output": {"kind": "logits"}}, "spec.model.output.kind", "Input should be 'classes'", "kind"),
    ({"spec.serving.runtime": {"preset": "triton"}}, "spec.rollout.analysis.metrics[0].builtin",
     "measured by Shipyard's own server", "with-a-runtime"),
    ({"spec.serving.grpc": {"http": False}}, "spec.rollout.analysis.metrics[0].builtin",
     "cannot be measured with spec.serving.grpc.http false", "grpc-only"),
    ({"spec.rollout.analysis.metrics": [{"name": "e", "builtin": "errorRate", "max": 0.1}]}, "spec.rollout.analysis",
     "judged by the builtin metric predictionAgreement", "no-agreement-metric"),
    ({"spec.rollout.steps": [{"weight": 50}]}, "spec.rollout.analysis.metrics[0].builtin",
     "measures a shadow step", "agreement-without-shadow"),
    ({"spec.rollout.analysis.metrics[0].max": 1.0}, "spec.rollout.analysis.metrics[0].maxRelativeToStable",
     "takes min only", "agreement-with-max"),
    ({"spec.rollout.analysis.metrics[0].min": DELETE, "spec.rollout.analysis.metrics[0].maxRelativeToStable": 0.1},
     "spec.rollout.analysis.metrics[0].min",
     "judged with min", "agreement-without-min"),
]


@pytest.mark.parametrize(("changes", "field", "problem"),
                         [pytest.param(*case[:3], id=case[3]) for case in SHADOW_ERRORS])
def test_shadow_errors_name_the_field(changes: dict[str, object], field: str, problem: str) -> None:
    with pytest.raises(spec.SpecError) as err:
        parse(shadow_body(**changes))
    assert (err.value.field, problem in err.value.problem) == (field, True), str(err.value)


def test_a_shadow_step_without_the_grpc_http_front_end_names_it_when_no_builtin_reads_http() -> None:
    body = shadow_body(**{"spec.serving.grpc": {"http": False}})
    with pytest.raises(spec.SpecError) as err:
        spec._check_shadow(spec.ModelDeploymentSpec.model_validate(body["spec"]), "spec")
    assert err.value.field == "spec.serving.grpc.http"
