"""Hostile ModelDeployments against the real API server and a running operator.

Invalid specs are generated over the CRD's own OpenAPI schema (hypothesis, derandomized): the schema is walked,
a field is picked, and a violation of its type, enum, bounds, pattern, length, item or property count, required
keys or unknown fields is produced, or of one of its CEL rules (every rule in the CRD has a violation here, which
a test checks), as a mutation of a valid body grown from examples/digits.yaml. Each is created, and written as an
update over a valid object, with strict field validation: it must be rejected naming the field, and nothing is
stored or changed. What the schema cannot express (the order of compression steps, which only the operator checks,
and what only the API server's own pod validation catches) is accepted at admission and must be surfaced by the
operator as
``Stalled`` with a message naming the field, while the operator keeps reconciling a valid object created after.
Oversized specs (a huge string, a list above maxItems, a body above the API server's 3 MiB limit) are refused.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kopf.testing import KopfRunner
from lightkube.config import client_adapter, kubeconfig

from tests.integration.conftest import Cluster, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((REPO / "crds" / "modeldeployments.shipyard.dev.yaml").read_text())
SCHEMA: dict[str, Any] = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
ITEM, VALUE = "[]", "{}"  # schema path tokens: an array's items, a map's values
DELETE = object()
EXAMPLES = 120  # hypothesis examples drawn over every kind of violation; distinct ones are counted
CEL_EXAMPLES = 3  # and over each CEL rule alone
MIN_DISTINCT = 30


def digits() -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples" / "digits.yaml").read_text())
    return body


def rich_digits() -> dict[str, Any]:
    """The digits example grown so that every optional field of the schema is present somewhere (still valid)."""
    body = digits()
    spec = body["spec"]
    spec["model"]["name"] = "digits"
    compression = spec["compression"]
    compression["steps"].append({"distill": {"student": "models.small:build", "temperature": 2, "alpha": 0.3,
                                             "epochs": 5, "lr": 0.01, "batchSize": 32}})
    compression["evaluation"]["samples"] = 500
    compression["resources"] = {"requests": {"cpu": "1", "nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 1}}
    compression["backoffLimit"] = 2
    compression["compiled"] = {"aotInductor": True, "maxBatchSize": 64, "maxAutotune": False}
    compression["activeDeadlineSeconds"] = 1800
    serving = spec["serving"]
    serving["resources"]["limits"]["nvidia.com/gpu"] = "1"
    serving["nodeSelector"] = {"pool": "gpu"}
    serving["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute",
                               "tolerationSeconds": 60}]
    serving["port"] = 80
    rollout = spec["rollout"]
    rollout["steps"].append({"weight": 75, "manual": True})
    rollout["maxSurgeGPUs"] = 1
    analysis = rollout["analysis"]
    analysis.update({"initialDelay": "10s", "consecutiveErrorLimit": 3, "minSamples": 2,
                     "prometheus": {"address": "http://prometheus.monitoring:9090"}})
    analysis["metrics"] += [
        {"name": "p99-prom", "prometheus": {"query": 'histogram_quantile(0.99, x{version="{{version}}"})',
                                            "address": "http://prometheus.monitoring:9090"},
         "maxRelativeToStable": 0.2},
        {"name": "inflight", "scrape": {"metric": "shipyard_inflight_requests", "labels": {"model": "digits"},
                                        "aggregation": "max", "rate": False}, "min": 0, "max": 100},
        {"name": "quality", "web": {"url": "http://quality.example/score?v={{version}}", "method": "POST",
                                    "headers": [{"name": "Accept", "value": "application/json"}],
                                    "body": '{"version": "{{version}}"}', "jsonPath": "$.score",
                                    "timeoutSeconds": 5}, "min": 0.9},
        {"name": "accuracy", "job": {"template": {"metadata": {"labels": {"team": "ml"}}, "spec": {"containers": [
            {"name": "evaluate", "image": "registry.example/shipyard/digits-model:1.0.0",
             "command": ["shipyard-runtime", "evaluate", "--dataset", "builtin:digits"]}]}},
            "activeDeadlineSeconds": 300, "backoffLimit": 1}, "min": 0.95},
    ]
    compression["steps"][0]["prune"].update({"lr": 0.01, "batchSize": 32})
    compression["steps"][-1]["distill"]["studentKwargs"] = {"hidden": 32}
    compression["evaluation"]["maxRelativeLoss"] = {"accuracy": 0.02}
    spec["retry"] = 1
    return body


# ---------------------------------------------------------------------------------------------------------------
# The schema, walked


def walk(node: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    """Every schema node of spec, with its path (property names, ITEM, VALUE)."""
    yield path, node
    for key, sub in node.get("properties", {}).items():
        if path or key == "spec":
            yield from walk(sub, (*path, key))
    if "items" in node:
        yield from walk(node["items"], (*path, ITEM))
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], (*path, VALUE))


def instances(body: Any, path: tuple[str, ...], at: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """The concrete locations in body of a schema path (the last key may be absent: it can be set)."""
    if not path:
        yield at
        return
    token, rest = path[0], path[1:]
    if token == ITEM:
        for i in range(len(body) if isinstance(body, list) else 0):
            yield from instances(body[i], rest, (*at, i))
    elif token == VALUE:
        for key in body if isinstance(body, dict) else ():
            yield from instances(body[key], rest, (*at, key))
    elif isinstance(body, dict) and (token in body or not rest):
        yield from instances(body.get(token), rest, (*at, token))


def field_name(at: tuple[str | int, ...]) -> str:
    """The field as the API server names it: spec.rollout.steps[1].weight, ...limits.nvidia.com/gpu."""
    out = ""
    for key in at:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else key)
    return out


def schema_name(path: tuple[str, ...]) -> str:
    return ".".join(path).replace(".[]", "[]").replace(".{}", "{}")


def lookup(body: Any, at: tuple[str | int, ...]) -> Any:
    for key in at:
        body = body[key]
    return body


@dataclass(frozen=True)
class Case:
    """One invalid mutation: set (or delete) the value at `at`; the error must name `field` and say `says`."""

    kind: str
    at: tuple[str | int, ...]
    value: Any
    field: str
    says: str

    def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        body = copy.deepcopy(body)
        node: Any = body
        for key in self.at[:-1]:
            node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
        if self.value is DELETE:
            del node[self.at[-1]]
        elif isinstance(node, list) and self.at[-1] == len(node):
            node.append(copy.deepcopy(self.value))
        else:
            node[self.at[-1]] = copy.deepcopy(self.value)
        return body

    @property
    def key(self) -> str:
        value = "<deleted>" if self.value is DELETE else self.value
        return json.dumps([self.kind, list(self.at), value], sort_keys=True, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------------------------
# Violations of the structural schema

TEXT = st.text(max_size=24)
JUNK = {  # values of every JSON type but the one named
    "integer": st.one_of(TEXT, st.booleans(), st.floats(allow_nan=False, allow_infinity=False)
                         .filter(lambda f: not f.is_integer()), st.lists(st.integers(), max_size=2),
                         st.dictionaries(st.sampled_from("ab"), st.integers(), max_size=1)),
    "number": st.one_of(TEXT, st.booleans(), st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.sampled_from("ab"), st.integers(), max_size=1)),
    "string": st.one_of(st.integers(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
                        st.lists(TEXT, max_size=2), st.dictionaries(st.sampled_from("ab"), TEXT, max_size=1)),
    "boolean": st.one_of(TEXT, st.integers(), st.lists(st.booleans(), max_size=2)),
    "object": st.one_of(TEXT, st.integers(), st.booleans(), st.lists(st.integers(), max_size=2)),
    "array": st.one_of(TEXT, st.integers(), st.booleans(), st.dictionaries(st.sampled_from("ab"), st.integers(),
                                                                             max_size=1)),
    "int-or-string": st.one_of(st.booleans(), st.floats(allow_nan=False, allow_infinity=False)
                               .filter(lambda f: not f.is_integer()), st.lists(st.integers(), max_size=2)),
}


def node_type(node: dict[str, Any]) -> str | None:
    return "int-or-string" if node.get("x-kubernetes-int-or-string") else node.get("type")


def below(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    low = node["minimum"]
    if node["type"] == "integer":
        return st.integers(low - 10**6, low if node.get("exclusiveMinimum") else low - 1)
    return st.floats(low - 1e6, low, exclude_max=not node.get("exclusiveMinimum"))


def above(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    high = node["maximum"]
    if node["type"] == "integer":
        return st.integers(high if node.get("exclusiveMaximum") else high + 1, high + 10**6)
    return st.floats(high, high + 1e6, exclude_min=not node.get("exclusiveMaximum"))


def not_matching(node: dict[str, Any]) -> st.SearchStrategy[str]:
    pattern = re.compile(node["pattern"])
    return st.text(min_size=node.get("minLength", 0), max_size=min(node.get("maxLength", 40), 40)).filter(
        lambda s: pattern.search(s) is None)


def too_long(node: dict[str, Any]) -> st.SearchStrategy[str]:
    return st.builds(lambda n, c: c * n, st.integers(node["maxLength"] + 1, node["maxLength"] + 64),
                     st.sampled_from(["a", "1", "/", "é", "-"]))


def too_many_items(base: Any) -> Callable[[dict[str, Any]], st.SearchStrategy[Any]]:
    def make(node: dict[str, Any]) -> st.SearchStrategy[Any]:
        return st.integers(node["maxItems"] + 1, node["maxItems"] + 4).map(lambda n: [copy.deepcopy(base[0])] * n)
    return make


def too_many_properties(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    value = "1" if node["additionalProperties"].get("x-kubernetes-int-or-string") else "v"
    return st.integers(node["maxProperties"] + 1, node["maxProperties"] + 4).map(
        lambda n: {f"k{i}": value for i in range(n)})


# kind -> (applies to a schema node?, the strategy of bad values given the node and the value now there, says)
SCHEMA_KINDS: dict[str, tuple[Callable[[dict[str, Any]], bool], Callable[[dict[str, Any], Any],
                                                                        st.SearchStrategy[Any]], str]] = {
    "type": (lambda n: node_type(n) in JUNK, lambda n, v: JUNK[str(node_type(n))], "must be of type"),
    "enum": (lambda n: "enum" in n,
             lambda n, v: (st.integers(-1000, 1000) if n["type"] == "integer" else TEXT).filter(
                 lambda x: x not in n["enum"]), "Unsupported value"),
    "minimum": (lambda n: "minimum" in n, lambda n, v: below(n), "should be greater than"),
    "maximum": (lambda n: "maximum" in n, lambda n, v: above(n), "should be less than"),
    "pattern": (lambda n: "pattern" in n and node_type(n) in ("string", "int-or-string"), lambda n, v: not_matching(n),
                "should match"),
    "maxLength": (lambda n: "maxLength" in n, lambda n, v: too_long(n), "Too long"),
    "minLength": (lambda n: n.get("minLength", 0) > 0,
                  lambda n, v: st.text(max_size=n["minLength"] - 1), "should be at least"),
    "maxItems": (lambda n: "maxItems" in n, lambda n, v: too_many_items(v)(n), "Too many"),
    "minItems": (lambda n: n.get("minItems", 0) > 0, lambda n, v: st.just([]), "should have at least"),
    "maxProperties": (lambda n: "maxProperties" in n, lambda n, v: too_many_properties(n), "Too many"),
}


def build_schema_targets(base: dict[str, Any]) -> dict[str, list[tuple[tuple[str | int, ...], dict[str, Any]]]]:
    """kind -> every (location in base, schema node) that kind of violation applies to."""
    targets: dict[str, list[tuple[tuple[str | int, ...], dict[str, Any]]]] = {k: [] for k in SCHEMA_KINDS}
    targets["required"], targets["unknown"] = [], []
    for path, node in walk(SCHEMA):
        if path[:1] != ("spec",):
            continue
        for at in instances(base, path):
            present = _present(base, at)
            for kind, (applies, _, _) in SCHEMA_KINDS.items():
                needs_value = kind in ("maxItems",)
                if applies(node) and (present or not needs_value):
                    targets[kind].append((at, node))
            if present and node.get("type") == "object":
                if node.get("required"):
                    targets["required"].append((at, node))
                if "properties" in node:
                    targets["unknown"].append((at, node))
    return targets


def _present(body: Any, at: tuple[str | int, ...]) -> bool:
    try:
        lookup(body, at)
    except (KeyError, IndexError, TypeError):
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# Violations of the CEL rules (and the list-map key), keyed by (schema path, rule message): every rule has one

I = st.integers  # noqa: E741 - short alias in the table below


def _cel(at: tuple[str | int, ...], values: st.SearchStrategy[Any], field: tuple[str | int, ...] | None = None,
         ) -> tuple[tuple[str | int, ...], st.SearchStrategy[Any], str]:
    return at, values, field_name(field if field is not None else at)


def _cuda_quantize_compiled_on(scheme: str) -> dict[str, Any]:
    """The example's compression quantizing for CUDA with compiled.mode on: two fields in one mutation."""
    compression: dict[str, Any] = digits()["spec"]["compression"]
    compression["steps"][-1] = {"quantize": {"scheme": scheme}}
    compression["compiled"] = {"mode": "on"}
    return compression


STEPS, METRICS = ("spec", "compression", "steps"), ("spec", "rollout", "analysis", "metrics")
RESOURCES = {"compression": ("spec", "compression", "resources"), "serving": ("spec", "serving", "resources")}
CEL_VIOLATIONS: dict[tuple[str, str], list[tuple[tuple[str | int, ...], st.SearchStrategy[Any], str]]] = {
    ("spec.image", "spec.image must be a valid image reference: [registry[:port]/]repository[:tag][@sha256:digest], "
                   "repository in lower case"): [
        _cel(("spec", "image"), st.sampled_from(["registry.example/Shipyard/digits:1.0", "digits:1.0 ", ":1.0",
                                                 "reg.example/a//b:1", "a:1@sha256:xyz"]))],
    ("spec.image", "spec.image must carry a tag (repository:1.4.0) or a digest (@sha256:...): the tag is the version, "
                   "and a registry port is not a tag"): [
        _cel(("spec", "image"), st.sampled_from(["registry.example/shipyard/digits", "registry.example:5000/digits",
                                                 "digits"]))],
    ("spec", "spec.serving.batching.maxBatchSize must not exceed spec.compression.compiled.maxBatchSize, the "
             "largest batch the compiled package accepts"): [
        _cel(("spec", "serving", "batching", "maxBatchSize"), I(65, 4096)),
        _cel(("spec", "compression", "compiled", "maxBatchSize"), I(2, 31),
             ("spec", "serving", "batching", "maxBatchSize"))],
    ("spec.compression.compiled", "spec.compression.compiled.aotInductor cannot be true with mode off"): [
        _cel(("spec", "compression", "compiled", "mode"), st.just("off"),
             ("spec", "compression", "compiled", "aotInductor"))],  # the base sets aotInductor true
    ("spec", "spec.serving.batching.maxBatchSize must not exceed spec.compression.compiled.maxBatchSize with "
             "compiled.mode on: the pods must serve the compiled package"): [
        _cel(("spec", "compression", "compiled"), I(2, 31).map(lambda n: {"mode": "on", "maxBatchSize": n}),
             ("spec", "serving", "batching", "maxBatchSize"))],  # the base serves batches of up to 32
    ("spec", "spec.compression.compiled.mode on serves the AOTInductor package, which is CPU code: GPU inference "
             "pods (spec.serving.resources nvidia.com/gpu) cannot serve it; use mode auto"): [
        _cel(("spec", "compression", "compiled", "mode"), st.just("on"),
             ("spec", "compression", "compiled"))],  # the base's pods ask for a GPU
    ("spec", "spec.compression.compiled.mode on needs a CPU package, and fp8 and int4-weight-only quantize for "
             "CUDA; use mode auto"): [
        _cel(("spec", "compression"), st.sampled_from(["fp8", "int4-weight-only"]).map(_cuda_quantize_compiled_on),
             ("spec", "compression", "compiled"))],
    ("spec.model", "spec.model must set path or uri"): [
        _cel(("spec", "model"), st.sampled_from([{}, {"name": "digits"}]))],
    ("spec.model", "spec.model must set only one of path and uri (both only for an oci:// image: path is then the "
                   "model's directory inside it)"): [
        _cel(("spec", "model", "uri"), st.sampled_from(["pvc://models/digits", "s3://bucket/d", "https://h/d"]),
             ("spec", "model"))],
    ("spec.model", "spec.model.digest is only allowed with a s3:// or https:// or oci:// uri: a model in the image "
                   "or on a volume has no download to verify"): [
        _cel(("spec", "model", "digest"), st.just("sha256:" + "ab" * 32))],
    ("spec.model", "spec.model.credentials is only allowed with a s3:// or oci:// uri: https:// takes no credentials "
                   "(use a presigned URL, or s3://)"): [
        _cel(("spec", "model"), st.sampled_from([{"uri": "https://h.example/m.tar.gz", "credentials": {
            "secretName": "s"}}, {"path": "/models/digits", "credentials": {"serviceAccountName": "sa"}}]),
             ("spec", "model", "credentials"))],
    ("spec.model", "spec.model.s3 is only allowed with a s3:// uri: endpoint, region and addressing of an S3 "
                   "store"): [
        _cel(("spec", "model", "s3"), st.sampled_from([{"region": "eu-west-1"}, {"addressing": "path"}]))],
    ("spec.model", "spec.model.caBundle is only allowed with a s3:// or https:// or oci:// uri: the CAs of a "
                   "download"): [
        _cel(("spec", "model", "caBundle"), st.just({"configMapName": "models-ca"}))],
    ("spec.model", "spec.model.mount is only allowed with a oci:// uri: an image volume mounts an OCI image or "
                   "artifact"): [
        _cel(("spec", "model", "mount"), st.sampled_from(["download", "imageVolume"]))],
    ("spec.model.credentials", "spec.model.credentials must set secretName or serviceAccountName"): [
        _cel(("spec", "model"), st.just({"uri": "s3://models/digits/", "credentials": {}}),
             ("spec", "model", "credentials"))],
    ("spec", "spec.compression reads the model in a Job: an image volume (spec.model.mount imageVolume) is only "
             "mounted into the inference pods; use mount download"): [
        _cel(("spec", "model"), st.just({"uri": "oci://registry.example/models/digits:1", "mount": "imageVolume"}),
             ("spec", "compression"))],
    ("spec.compression.steps[].prune", "prune.norm is only allowed with scope structured"): [
        _cel((*STEPS, 1, "prune", "norm"), st.sampled_from([1, 2]))],
    ("spec.compression.steps[]", "each spec.compression.steps item must set one of prune, quantize, distill"): [
        _cel((*STEPS, i), st.just({}), (*STEPS, i)) for i in range(4)],
    ("spec.compression.steps[]", "each spec.compression.steps item must set only one of prune, quantize, distill"): [
        _cel((*STEPS, 2, "prune"), st.just({"amount": 0.5}), (*STEPS, 2)),
        _cel((*STEPS, 0, "quantize"), st.just({"scheme": "int8-dynamic"}), (*STEPS, 0))],
    **{(f"spec.{part}.resources", f"spec.{part}.resources.limits nvidia.com/gpu must be a whole number of GPUs"): [
        _cel((*RESOURCES[part], "limits", "nvidia.com/gpu"), st.sampled_from(["1.5", "500m", "1e3", "+1"]),
             (*RESOURCES[part], "limits"))] for part in RESOURCES},
    **{(f"spec.{part}.resources",
        f"spec.{part}.resources nvidia.com/gpu must be set in limits, and requests must equal limits"): [
        _cel((*RESOURCES[part], "requests", "nvidia.com/gpu"), st.sampled_from([2, "3", "0"]),
             (*RESOURCES[part], "limits"))] for part in RESOURCES},
    **{(f"spec.{part}.resources.{kind}", "resource names must be at most 317 characters"): [
        _cel((*RESOURCES[part], kind), I(318, 400).map(lambda n: {"r" * n: "1"}))]
       for part in RESOURCES for kind in ("requests", "limits")},
    ("spec.serving.nodeSelector", "spec.serving.nodeSelector label keys must be at most 317 characters"): [
        _cel(("spec", "serving", "nodeSelector"), I(318, 400).map(lambda n: {"k" * n: "v"}))],
    ("spec.serving.nodeSelector", "spec.serving.nodeSelector keys must be label keys: [prefix/]name, the name of "
                                  "alphanumerics, '-', '_' and '.' (at most 63), beginning and ending with an "
                                  "alphanumeric"): [
        _cel(("spec", "serving", "nodeSelector"), st.sampled_from([{"not a label key!": "v"}, {"-pool": "v"},
                                                                   {"Example.com/pool": "v"}, {"a/b/c": "v"}]))],
    ("spec.serving.nodeSelector", "spec.serving.nodeSelector values must be label values: empty, or alphanumerics, "
                                  "'-', '_' and '.', beginning and ending with an alphanumeric"): [
        _cel(("spec", "serving", "nodeSelector"), st.sampled_from([{"pool": "two words"}, {"pool": "-gpu"},
                                                                   {"pool": "gpu/a"}]))],
    ("spec.model.uri", "spec.model.uri must not carry credentials (user:password@host): it is shown in status and "
                       "Events; name a Secret in spec.model.credentials"): [
        _cel(("spec", "model"), st.sampled_from([{"uri": "https://user:s3cret@models.example/d"},
                                                 {"uri": "s3://key@bucket/d"}]), ("spec", "model", "uri"))],
    ("spec.rollout.analysis.prometheus.address", "a Prometheus address must not carry credentials "
                                                 "(user:password@host): addresses appear in status and Events"): [
        _cel(("spec", "rollout", "analysis", "prometheus", "address"),
             st.sampled_from(["http://admin:s3cret@prometheus:9090", "https://token@prometheus/api"]))],
    ("spec.rollout.analysis.metrics[].prometheus.address", "a Prometheus address must not carry credentials "
                                                           "(user:password@host): addresses appear in status and "
                                                           "Events"): [
        _cel((*METRICS, 2, "prometheus", "address"), st.sampled_from(["http://admin:s3cret@prometheus:9090"]))],
    ("spec.rollout.analysis.metrics[].prometheus.query", "a Prometheus query must not be blank"): [
        _cel((*METRICS, 2, "prometheus", "query"), st.sampled_from([" ", " \t ", "\n"]))],
    ("spec.serving.tolerations[]", "a toleration with operator Exists must not set value"): [
        _cel(("spec", "serving", "tolerations", 0, "value"), st.sampled_from(["v", "true"]))],
    ("spec.rollout.steps[]", "a rollout step sets either pause or manual, not both"): [
        _cel(("spec", "rollout", "steps", 0, "manual"), st.just(True), ("spec", "rollout", "steps", 0, "pause"))],
    ("spec.rollout.steps[].pause", "a rollout step pause must be at most 168h (hold longer with manual true)"): [
        _cel(("spec", "rollout", "steps", 1, "pause"), st.sampled_from(["169h", "604801s", "100000000h",
                                                                        "9999999999999999999999999h"]))],
    ("spec.rollout.steps", "spec.rollout.steps weights must be strictly increasing"): [
        _cel(("spec", "rollout", "steps"), st.sampled_from([[{"weight": 50}, {"weight": 25}],
                                                            [{"weight": 25}, {"weight": 25}]]))],
    ("spec.rollout.analysis.interval", "spec.rollout.analysis.interval must be between 1s and 1h"): [
        _cel(("spec", "rollout", "analysis", "interval"), st.sampled_from(["0s", "999ms", "61m", "2h",
                                                                           "99999999999999999999h"]))],
    ("spec.rollout.analysis.initialDelay", "spec.rollout.analysis.initialDelay must be at most 24h"): [
        _cel(("spec", "rollout", "analysis", "initialDelay"), st.sampled_from(["25h", "86401s", "1441m"]))],
    ("spec.rollout.analysis.metrics[]",
     "each spec.rollout.analysis.metrics item must set one of builtin, prometheus, scrape, web, job"): [
        _cel((*METRICS, 0, "builtin"), st.just(DELETE), (*METRICS, 0))],
    ("spec.rollout.analysis.metrics[]",
     "each spec.rollout.analysis.metrics item must set only one of builtin, prometheus, scrape, web, job"): [
        _cel((*METRICS, 0, "scrape"), st.just({"metric": "m"}), (*METRICS, 0)),
        _cel((*METRICS, 3, "builtin"), st.just("errorRate"), (*METRICS, 3)),
        _cel((*METRICS, 4, "job"), st.just({"template": {"spec": {"containers": [{"name": "c"}]}}}), (*METRICS, 4))],
    ("spec.rollout.analysis.metrics[]",
     "each spec.rollout.analysis.metrics item must set a threshold (max, min or maxRelativeToStable), unless it is "
     "a job metric (its exit code is the verdict)"): [
        _cel((*METRICS, 0, "max"), st.just(DELETE), (*METRICS, 0)),
        _cel((*METRICS, 4, "min"), st.just(DELETE), (*METRICS, 4))],
    ("spec.rollout.analysis.metrics[]",
     "a job metric cannot be compared with the stable (maxRelativeToStable): the Job measures the candidate; give it "
     "the stable's endpoint instead (SHIPYARD_REFERENCE_ENDPOINT)"): [
        _cel((*METRICS, 5, "maxRelativeToStable"), st.floats(0, 10), (*METRICS, 5, "maxRelativeToStable"))],
    ("spec.rollout.analysis.metrics[].web", "web.body is only allowed with method POST"): [
        _cel((*METRICS, 4, "web", "method"), st.just("GET"), (*METRICS, 4, "web", "body"))],
    ("spec.rollout.analysis.metrics[].web.headers[]",
     "credentials never belong in a spec: measure an endpoint that needs them with a job metric, whose pod gets them "
     "from a Secret"): [
        _cel((*METRICS, 4, "web", "headers", 0, "name"), st.sampled_from(["Authorization", "cookie",
                                                                           "Proxy-Authorization"]),
             (*METRICS, 4, "web", "headers", 0, "name"))],
    ("spec.rollout.analysis.metrics[].web.url",
     "a web metric's url must not carry credentials (user:password@host): urls appear in status and Events"): [
        _cel((*METRICS, 4, "web", "url"), st.sampled_from(["http://admin:s3cret@quality.example/score",
                                                           "https://token@q.example/api"]))],
    ("spec.rollout.analysis.metrics[]", "spec.rollout.analysis.metrics min must not exceed max"): [
        _cel((*METRICS, 3, "min"), st.floats(100, 1e9, exclude_min=True), (*METRICS, 3, "min"))],
    ("spec.rollout.analysis.metrics[]",
     "a prometheus query compared with the stable (maxRelativeToStable) must contain {{version}}"): [
        _cel((*METRICS, 2, "prometheus", "query"), st.sampled_from(["up", "{{stableVersion}}", "{{ version }}"]))],
    ("spec.rollout.analysis.metrics[].scrape.labels", "scrape label names must be at most 256 characters"): [
        _cel((*METRICS, 3, "scrape", "labels"), I(257, 300).map(lambda n: {"l" * n: "v"}))],
}
LIST_MAP_VIOLATIONS = [  # x-kubernetes-list-type: map, keyed by name: a duplicate key
    _cel((*METRICS, i, "name"), st.just("error-rate"), METRICS) for i in (1, 2, 3)]


def schema_rules() -> set[tuple[str, str]]:
    return {(schema_name(path), rule["message"]) for path, node in walk(SCHEMA) if path[:1] == ("spec",)
            for rule in node.get("x-kubernetes-validations", [])}


def _rule(path: str, starts: str) -> tuple[str, str]:
    """The (schema path, message) of the CRD's rule at ``path`` whose message starts with ``starts``."""
    found = [(p, m) for p, m in schema_rules() if p == path and m.startswith(starts)]
    assert len(found) == 1, (path, starts, found)
    return found[0]


# Serving runtimes and gRPC (docs/runtimes.md). The base compresses, which a preset refuses too: those cases are
# rejected with both messages, and each must name its own field and say its own message.
RUNTIME, SERVING = ("spec", "serving", "runtime"), ("spec", "serving")
CUSTOM = {"ports": {"http": 8080}}


def _labelled(where: str) -> dict[str, Any]:
    """A custom runtime whose mapping has a label name Prometheus does not allow, at ``where``."""
    bad = {"not a label": "x"}
    counter = {"metric": "requests_total"}
    mapping: dict[str, Any] = {
        "errors": {"errorRate": {"errors": [{**counter, "labels": bad}], "total": [counter]}},
        "total": {"errorRate": {"errors": [counter], "total": [{**counter, "labels": bad}]}},
    }.get(where, {where: {"histogram": "h", "labels": bad}})
    return {**CUSTOM, "metrics": mapping}


CEL_VIOLATIONS.update({
    _rule("spec", "spec.compression makes an artifact"): [
        _cel(RUNTIME, st.sampled_from([{"preset": p} for p in ("vllm", "triton")]), ("spec", "compression"))],
    _rule("spec", "spec.serving.grpc.http false"): [
        _cel(("spec", "serving", "grpc"), st.just({"http": False}), METRICS)],
    _rule("spec", "spec.rollout.analysis.metrics: builtin errorRate"): [_cel(RUNTIME, st.just(CUSTOM), METRICS)],
    _rule("spec", "spec.rollout.analysis.metrics: builtin latencyP99"): [
        _cel(RUNTIME, st.sampled_from([{"preset": "torchserve"}, {"preset": "triton"}]), METRICS)],
    **{_rule("spec", f"spec.rollout.analysis.metrics: builtin {name}"): [
        _cel((*METRICS, 0, "builtin"), st.just(name), METRICS)] for name in ("ttftP99", "tpotP99")},
    _rule("spec.serving", "spec.serving.grpc turns on"): [
        _cel(SERVING, st.just({"grpc": {}, "runtime": {"preset": "vllm"}}), ("spec", "serving", "grpc"))],
    _rule("spec.serving", "spec.serving.grpc.port must differ"): [
        _cel(("spec", "serving", "grpc"), st.just({"port": 80}), ("spec", "serving", "grpc", "port"))],
    _rule("spec.serving", "spec.serving.runtime.ports.grpc must differ"): [
        _cel(RUNTIME, I(1, 65535).map(lambda n: {"ports": {"http": n, "grpc": n}}), (*RUNTIME, "ports", "grpc"))],
    _rule("spec.serving.runtime", "spec.serving.runtime without a preset"): [
        _cel(RUNTIME, st.sampled_from([{"command": ["/serve"]}, {"ports": {"metrics": 9100}}]),
             (*RUNTIME, "ports"))],
    **{_rule(f"spec.serving.runtime.metrics.errorRate.{where}[].labels", "counter label names"): [
        _cel(RUNTIME, st.just(_labelled(where)), (*RUNTIME, "metrics", "errorRate", where, 0, "labels"))]
       for where in ("errors", "total")},
    **{_rule(f"spec.serving.runtime.metrics.{name}.labels", "histogram label names"): [
        _cel(RUNTIME, st.just(_labelled(name)), (*RUNTIME, "metrics", name, "labels"))]
       for name in ("latencyP99", "ttftP99", "tpotP99")},
    **{_rule(f"spec.serving.runtime.probes.{kind}", "a runtime probe sets a path"): [
        _cel(RUNTIME, st.sampled_from([{"preset": "vllm", "probes": {kind: probe}} for probe in (
            {"port": "http"}, {"port": "grpc", "path": "/health"})]), (*RUNTIME, "probes", kind, "path"))]
       for kind in ("readiness", "liveness", "startup")},
})


# Pod templates (docs/pods.md): each rule of spec.serving.podTemplate and spec.compression.podTemplate, wherever the
# schema has it, violated by a template that nests one invalid object at the rule's place (the list items around it
# valid); the error names the rule's object (and its fieldPath).
_ITEM_DEFAULTS: dict[str, dict[str, Any]] = {
    "containers": {"name": "side", "image": "registry.example/side:1"},
    "initContainers": {"name": "init", "image": "registry.example/init:1"},
    "volumes": {"name": "v", "emptyDir": {}}, "env": {"name": "E"}, "envFrom": {}, "ports": {"containerPort": 1},
    "volumeMounts": {"name": "v", "mountPath": "/m"}, "sysctls": {"name": "net.ipv4.tcp_syncookies", "value": "1"},
    "tolerations": {},
}
_LEAVES: list[tuple[str, Callable[[str], dict[str, Any]]]] = [  # (message start, invalid object at the rule's place)
    ("hostNetwork true", lambda m: {"hostNetwork": True}), ("hostPID true", lambda m: {"hostPID": True}),
    ("hostIPC true", lambda m: {"hostIPC": True}), ("privileged:", lambda m: {"privileged": True}),
    ("allowPrivilegeEscalation true", lambda m: {"allowPrivilegeEscalation": True}),
    ("procMount Unmasked", lambda m: {"procMount": "Unmasked"}),
    ("runAsNonRoot false", lambda m: {"runAsNonRoot": False}), ("runAsUser 0", lambda m: {"runAsUser": 0}),
    ("capabilities other than", lambda m: {"add": ["SYS_ADMIN"]}),
    ("keeping capabilities", lambda m: {"drop": ["NET_RAW"]}),
    ("seccomp Unconfined", lambda m: {"type": "Unconfined"}), ("AppArmor Unconfined", lambda m: {"type": "Unconfined"}),
    ("SELinux types", lambda m: {"type": "spc_t"}), ("a custom SELinux user", lambda m: {"user": "system_u"}),
    ("a custom SELinux role", lambda m: {"role": "system_r"}),
    ("sysctls outside", lambda m: {"name": "kernel.msgmax", "value": "1"}),
    ("hostPort", lambda m: {"containerPort": 80, "hostPort": 80}),
    ("volumes artifacts", lambda m: {"name": "tmp", "emptyDir": {}}),
    ("a volume sets one source", lambda m: {"name": "v", "emptyDir": {}, "secret": {"secretName": "s"}}),
    ("label ", lambda m: {"labels": {m.split()[1]: "x"}}),
    ("an AppArmor profile", lambda m: {"annotations": {
        "container.apparmor.security.beta.kubernetes.io/server": "unconfined"}}),
    ("labels keys must be at most", lambda m: {"k" * 318: "x"}),
    ("annotations keys must be at most", lambda m: {"k" * 318: "x"}),
    ("nodeSelector keys must be at most", lambda m: {"k" * 318: "x"}),
    ("labels keys must be qualified", lambda m: {"not a key": "x"}),
    ("annotations keys must be qualified", lambda m: {"not a key": "x"}),
    ("nodeSelector keys must be qualified", lambda m: {"not a key": "x"}),
    ("labels values", lambda m: {"k": "not a value"}),
    ("nodeSelector values", lambda m: {"k": "not a value"}),
    ("resource names", lambda m: {"r" * 318: "1"}),
    ("resources has requests", lambda m: {"claims": {}}),
    ("a toleration with operator Exists", lambda m: {"operator": "Exists", "value": "v"}),
    ("an env variable sets value or valueFrom", lambda m: {
        "name": "E", "value": "v", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}),
    ("valueFrom must set one of", lambda m: {}),
    ("valueFrom must set only one of", lambda m: {"secretKeyRef": {"name": "s", "key": "k"},
                                                  "configMapKeyRef": {"name": "c", "key": "k"}}),
    ("envFrom must set one of", lambda m: {}),
    ("envFrom must set only one of", lambda m: {"secretRef": {"name": "s"}, "configMapRef": {"name": "c"}}),
    ("a sidecar container must set image", lambda m: {"name": "side"}),
    ("an init container must set image", lambda m: {"name": "init"}),
    ("is the name of Shipyard's container", lambda m: {"name": "server", "image": "registry.example/x:1"}),
]
_OWNED: dict[str, Any] = {  # a field of Shipyard's model container -> a value it must not take
    "image": "registry.example/x:1", "command": ["sh"], "ports": [{"containerPort": 1}],
    "readinessProbe": {"exec": {"command": ["true"]}}, "livenessProbe": {"exec": {"command": ["true"]}},
    "startupProbe": {"exec": {"command": ["true"]}}, "resources": {"limits": {"cpu": "1"}},
    "env": [{"name": "SHIPYARD_MODEL_NAME", "value": "x"}], "volumeMounts": [{"name": "v", "mountPath": "/tmp"}],
}


def _leaf(message: str) -> dict[str, Any]:
    owned = re.match(r"^(\w+) of the (\w+) container: ", message)
    if owned:
        return {"name": owned[2], owned[1]: _OWNED[owned[1]]}
    volume = re.match(r"^(\w+) volumes: ", message)
    if volume:
        return {"name": "v", volume[1]: {}}
    for start, build in _LEAVES:
        if message.startswith(start):
            return build(message)
    raise AssertionError(f"no violation for the pod template rule {message!r}")


def _pod_template_case(path: str, rule: dict[str, Any]) -> tuple[tuple[str | int, ...], st.SearchStrategy[Any], str]:
    """The podTemplate (of spec.serving or spec.compression) violating ``rule`` of the schema object at ``path``."""
    head, _, rest = path.partition(".podTemplate")
    root: tuple[str | int, ...] = (*head.split("."), "podTemplate")
    value: Any = _leaf(rule["message"])
    where: list[str | int] = []
    tokens = re.findall(r"[A-Za-z]+|\[\]|\{\}", rest)
    for token in tokens:  # the concrete location of the rule's object, list items at index 0, map values at limits
        where += [0] if token == ITEM else ["\0limits"] if token == VALUE else [token]
    for i in range(len(tokens) - 1, -1, -1):  # nest the leaf, from the innermost token out
        token = tokens[i]
        if token == ITEM and i == len(tokens) - 1:
            value = [value]  # the rule's object is the item: the leaf is all of it
        elif token == ITEM:
            value = [{**_ITEM_DEFAULTS.get(str(tokens[i - 1]), {}), **value}]
        elif token == VALUE:
            value = {"limits": value}
        else:
            value = {token: value}
    field = field_name((*root, *where)).replace(".\0limits", "[limits]") + rule.get("fieldPath", "")
    return root, st.just(value), field


CEL_VIOLATIONS.update({
    (schema_name(path), rule["message"]): [_pod_template_case(schema_name(path), rule)]
    for path, node in walk(SCHEMA) if ".podTemplate" in schema_name(path)
    for rule in node.get("x-kubernetes-validations", [])})
_NO_GPU = {**rich_digits()["spec"], "serving": {**rich_digits()["spec"]["serving"], "resources": {}}}
CEL_VIOLATIONS.update({
    _rule("spec", "spec.compression.steps[].quantize.scheme fp8 and int4-weight-only"): [
        _cel(("spec",), st.just({**_NO_GPU, "compression": {**_NO_GPU["compression"], "steps": [
            {"quantize": {"scheme": "fp8"}}]}}), ("spec", "serving", "resources"))],
    _rule("spec.serving", "spec.serving.server configures"): [
        _cel(("spec", "serving"), st.just({**rich_digits()["spec"]["serving"], "server": {"dtype": "float16"},
                                           "runtime": CUSTOM}), ("spec", "serving", "server"))],
    _rule("spec.serving.disruptionBudget", "spec.serving.disruptionBudget sets"): [
        _cel(("spec", "serving", "disruptionBudget"), st.just({"maxUnavailable": 1, "minAvailable": 1}),
             ("spec", "serving", "disruptionBudget", "minAvailable"))],
    **{_rule(f"spec.serving.disruptionBudget.{bound}", "must be a number of pods"): [
        _cel(("spec", "serving", "disruptionBudget", bound), I(100001, 10**6))]
       for bound in ("maxUnavailable", "minAvailable")},
})


# Blue-green (spec.rollout.strategy, spec.rollout.blueGreen). The post-promotion analysis has the analysis' rules at
# its own path: each analysis case is replayed there, on a blue-green rollout whose post-promotion analysis is the
# base's analysis with that case's mutation (so that the one error is the rule's own).
ANALYSIS, POST = ("spec", "rollout", "analysis"), ("spec", "rollout", "blueGreen", "postPromotionAnalysis")


def _post_promotion(case: tuple[tuple[str | int, ...], st.SearchStrategy[Any], str],
                    ) -> tuple[tuple[str | int, ...], st.SearchStrategy[Any], str]:
    at, values, field = case
    assert at[:3] == ANALYSIS, at

    def rollout(value: Any) -> dict[str, Any]:
        analysis = copy.deepcopy(rich_digits()["spec"]["rollout"]["analysis"])
        inner = Case("cel", ("a", *at[3:]), value, "", "").apply({"a": analysis})["a"] if len(at) > 3 else value
        return {"strategy": "blueGreen", "blueGreen": {"postPromotionAnalysis": inner}}

    analysis_name = field_name(ANALYSIS)
    return ("spec", "rollout"), values.map(rollout), field.replace(analysis_name, field_name(POST), 1)


CEL_VIOLATIONS.update({
    (path.replace(field_name(ANALYSIS), field_name(POST), 1), message): [_post_promotion(c) for c in cases]
    for (path, message), cases in list(CEL_VIOLATIONS.items()) if path.startswith(field_name(ANALYSIS))})
CEL_VIOLATIONS.update({
    _rule("spec.rollout", "spec.rollout.steps are canary steps"): [
        _cel(("spec", "rollout", "strategy"), st.just("blueGreen"), ("spec", "rollout", "steps"))],
    _rule("spec.rollout", "spec.rollout.blueGreen is only allowed"): [
        _cel(("spec", "rollout", "blueGreen"), st.just({"autoPromotion": False}), ("spec", "rollout", "blueGreen"))],
})

CEL_VIOLATIONS.update({
    _rule("spec.rollout.traffic", "spec.rollout.traffic must set only one of"): [
        _cel(("spec", "rollout", "traffic"), st.just({"replicas": {}, "gatewayAPI": {"httpRoute": "digits"}}),
             ("spec", "rollout", "traffic"))],
})

# Shadow steps (docs/shadow.md): a valid spec with one, and mutations breaking each of its rules.
ROLLOUT_STEPS = ("spec", "rollout", "steps")
_AGREEMENT = {"name": "agreement", "builtin": "predictionAgreement", "min": 0.99}


def _shadow_spec(**changes: Any) -> dict[str, Any]:
    """rich_digits' spec with a shadow step first, spec.model.output and a predictionAgreement metric (valid), then
    ``changes`` (a value of None removes the key) at dotted paths."""
    spec = copy.deepcopy(rich_digits()["spec"])
    spec["model"]["output"] = {"kind": "classes"}
    spec["rollout"]["steps"].insert(0, {"shadow": {"percent": 10, "minRequests": 100}})
    spec["rollout"]["analysis"]["metrics"].append(dict(_AGREEMENT))
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        node = spec
        for parent in parents:
            node = node.setdefault(parent, {})
        if value is None:
            node.pop(key, None)
        else:
            node[key] = value
    return spec


_WITH_AGREEMENT = copy.deepcopy(rich_digits()["spec"]["rollout"]["analysis"]["metrics"]) + [_AGREEMENT]
CEL_VIOLATIONS.update({
    _rule("spec.rollout.steps[]", "each spec.rollout.steps item must set one of weight, shadow"): [
        _cel((*ROLLOUT_STEPS, 0, "weight"), st.just(DELETE), (*ROLLOUT_STEPS, 0))],
    _rule("spec.rollout.steps[]", "each spec.rollout.steps item must set only one of weight, shadow"): [
        _cel((*ROLLOUT_STEPS, 0, "shadow"), st.just({"percent": 10, "minRequests": 5}), (*ROLLOUT_STEPS, 0))],
    _rule("spec.rollout.steps[]", "a shadow step sets neither pause nor manual"): [
        _cel((*ROLLOUT_STEPS, 0), st.sampled_from([{"shadow": {"percent": 10, "duration": "5m"}, "pause": "30s"},
                                                   {"shadow": {"percent": 10, "duration": "5m"}, "manual": True}]),
             (*ROLLOUT_STEPS, 0, "shadow"))],
    _rule("spec.rollout.steps[].shadow", "spec.rollout.steps[].shadow must set minRequests or duration"): [
        _cel((*ROLLOUT_STEPS, 0), st.just({"shadow": {"percent": 10}}), (*ROLLOUT_STEPS, 0, "shadow"))],
    _rule("spec.rollout.steps[].shadow.duration", "a shadow step's duration must be at most 168h"): [
        _cel((*ROLLOUT_STEPS, 0), st.sampled_from([{"shadow": {"percent": 10, "duration": d}}
                                                   for d in ("169h", "604801s", "100000h")]),
             (*ROLLOUT_STEPS, 0, "shadow", "duration"))],
    _rule("spec.rollout.steps", "spec.rollout.steps: a shadow step must be the first step"): [
        _cel(ROLLOUT_STEPS, st.sampled_from([
            [{"weight": 25}, {"shadow": {"percent": 10, "minRequests": 5}}],
            [{"shadow": {"percent": 10, "minRequests": 5}}, {"shadow": {"percent": 20, "minRequests": 5}}]]))],
    _rule("spec.model.output", "spec.model.output.minCosineSimilarity is only allowed"): [
        _cel(("spec", "model", "output"), st.sampled_from([{"kind": k, "minCosineSimilarity": 0.9}
                                                           for k in ("classes", "tensor")]),
             ("spec", "model", "output", "minCosineSimilarity"))],
    _rule("spec.model.output", "spec.model.output.maxAbsDifference is only allowed"): [
        _cel(("spec", "model", "output"), st.sampled_from([{"kind": k, "maxAbsDifference": 0.1}
                                                           for k in ("classes", "embedding")]),
             ("spec", "model", "output", "maxAbsDifference"))],
    _rule("spec.rollout.analysis.metrics[]", "builtin predictionAgreement is judged with min"): [
        _cel((*METRICS, 0, "builtin"), st.just("predictionAgreement"), (*METRICS, 0, "min"))],  # max 0.01, no min
    _rule("spec.rollout.analysis.metrics[]", "builtin predictionAgreement compares the candidate with the stable"): [
        _cel((*METRICS, 0), st.sampled_from([{**_AGREEMENT, "maxRelativeToStable": 0.1},
                                             {**_AGREEMENT, "max": 1.0}]), (*METRICS, 0, "maxRelativeToStable"))],
    _rule("spec.rollout.blueGreen", "spec.rollout.blueGreen.postPromotionAnalysis cannot use builtin "
                                    "predictionAgreement"): [
        _cel(("spec", "rollout"), st.just({"strategy": "blueGreen", "blueGreen": {"postPromotionAnalysis": {
            "metrics": [_AGREEMENT]}}}), ("spec", "rollout", "blueGreen", "postPromotionAnalysis"))],
    _rule("spec", "a shadow step (spec.rollout.steps[0].shadow) needs Shipyard's own server"): [
        _cel(("spec",), st.just(_shadow_spec(**{"serving.runtime": CUSTOM})), ("spec", "serving", "runtime"))],
    _rule("spec", "a shadow step (spec.rollout.steps[0].shadow) needs spec.model.output"): [
        _cel(("spec",), st.just(_shadow_spec(**{"model.output": None})), ("spec", "model", "output"))],
    _rule("spec", "a shadow step (spec.rollout.steps[0].shadow) copies requests to the candidate's HTTP"): [
        _cel(("spec",), st.just(_shadow_spec(**{"serving.grpc": {"http": False}})),
             ("spec", "serving", "grpc", "http"))],
    _rule("spec", "a shadow step (spec.rollout.steps[0].shadow) is judged by the builtin metric"): [
        _cel(("spec",), st.just(_shadow_spec(**{"rollout.analysis.metrics":
                                                rich_digits()["spec"]["rollout"]["analysis"]["metrics"]})),
             ("spec", "rollout", "analysis"))],
    _rule("spec", "builtin predictionAgreement measures a shadow step"): [
        _cel((*METRICS,), st.just(_WITH_AGREEMENT), METRICS)],
})
CEL_VIOLATIONS.update({  # the metric rules at the post-promotion analysis' path too (as the blue-green section does)
    (path.replace(field_name(ANALYSIS), field_name(POST), 1), message): [_post_promotion(c) for c in cases]
    for (path, message), cases in list(CEL_VIOLATIONS.items())
    if path.startswith(field_name(METRICS)) and "predictionAgreement" in message})


# Autoscaling (docs/autoscaling.md).
AUTOSCALING = ("spec", "serving", "autoscaling")
_SERVING = rich_digits()["spec"]["serving"]  # 4 replicas, a CPU request
CEL_VIOLATIONS.update({
    _rule("spec.serving.autoscaling", "spec.serving.autoscaling minReplicas must not exceed"): [
        _cel(AUTOSCALING, st.just({"minReplicas": 5, "maxReplicas": 4, "target": 3}), (*AUTOSCALING, "minReplicas"))],
    _rule("spec.serving.autoscaling", "spec.serving.autoscaling.minReplicas 0"): [
        _cel(AUTOSCALING, st.just({"provider": "hpa", "minReplicas": 0, "maxReplicas": 6, "target": 3}),
             (*AUTOSCALING, "minReplicas"))],
    _rule("spec.serving.autoscaling", "spec.serving.autoscaling.target of gpuUtilization"): [
        _cel(AUTOSCALING, st.sampled_from([{"metric": m, "maxReplicas": 6, "target": 150}
                                           for m in ("gpuUtilization", "cpu")]), (*AUTOSCALING, "target"))],
    _rule("spec.serving", "spec.serving.replicas must not exceed"): [
        _cel(AUTOSCALING, st.just({"maxReplicas": 2, "target": 3}), ("spec", "serving", "replicas"))],
    _rule("spec.serving", "spec.serving.autoscaling.metric cpu"): [
        _cel(("spec", "serving"), st.just({**_SERVING, "resources": {"limits": {"nvidia.com/gpu": "1"}},
                                           "autoscaling": {"metric": "cpu", "maxReplicas": 6, "target": 70}}),
             (*AUTOSCALING, "metric"))],
})


# ---------------------------------------------------------------------------------------------------------------
# The strategy: pick a kind, then a field of that kind, then a violating value


def invalid_cases(base: dict[str, Any]) -> st.SearchStrategy[Case]:
    """Invalid mutations of base: a kind of violation, then a field it applies to, then a violating value."""
    targets = build_schema_targets(base)
    return _invalid_case(base, targets)


@st.composite
def _invalid_case(draw: st.DrawFn, base: dict[str, Any],
                  targets: dict[str, list[tuple[tuple[str | int, ...], dict[str, Any]]]]) -> Case:
    kinds = [*SCHEMA_KINDS, "required", "unknown", "cel", "listMapKey"]
    kind = draw(st.sampled_from(kinds))
    if kind in SCHEMA_KINDS:
        at, node = draw(st.sampled_from(targets[kind]))
        current = lookup(base, at) if _present(base, at) else None
        value = draw(SCHEMA_KINDS[kind][1](node, current))
        return Case(kind, at, value, field_name(at), SCHEMA_KINDS[kind][2])
    if kind == "required":
        at, node = draw(st.sampled_from(targets["required"]))
        key = draw(st.sampled_from(node["required"]))
        return Case(kind, (*at, key), DELETE, field_name((*at, key)), "Required value")
    if kind == "unknown":
        at, node = draw(st.sampled_from(targets["unknown"]))
        key = draw(st.from_regex(r"[a-z][a-zA-Z]{2,11}", fullmatch=True).filter(lambda k: k not in node["properties"]))
        return Case(kind, (*at, key), draw(st.one_of(st.integers(), TEXT)), field_name((*at, key)), "unknown field")
    if kind == "cel":
        return draw(cel_cases())
    at, values, field = draw(st.sampled_from(LIST_MAP_VIOLATIONS))
    return Case(kind, at, draw(values), field, "Duplicate value")


@st.composite
def cel_cases(draw: st.DrawFn, rules: tuple[tuple[str, str], ...] = ()) -> Case:
    rule = draw(st.sampled_from(rules or sorted(CEL_VIOLATIONS)))
    at, values, field = draw(st.sampled_from(CEL_VIOLATIONS[rule]))
    return Case("cel", at, draw(values), field, rule[1])


def all_cases(base: dict[str, Any]) -> list[Case]:
    """Every kind of violation, plus each CEL rule alone; distinct."""
    drawn = generate(invalid_cases(base), EXAMPLES)
    for rule in sorted(CEL_VIOLATIONS):
        drawn += generate(cel_cases((rule,)), CEL_EXAMPLES)
    return list({c.key: c for c in drawn}.values())


def generate(strategy: st.SearchStrategy[Case], examples: int) -> list[Case]:
    """The distinct examples a derandomized hypothesis run draws (no I/O inside: the API server is called after)."""
    drawn: dict[str, Case] = {}

    @settings(max_examples=examples, derandomize=True, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(case: Case) -> None:
        drawn.setdefault(case.key, case)

    collect()
    return list(drawn.values())


# ---------------------------------------------------------------------------------------------------------------
# Cases only the operator can reject (accepted at admission; Stalled, naming the field)

OPERATOR_BASE = "operator-base"  # digits without compression: the operator goes straight to its Deployment
OPERATOR_CASES = [
    # The order of compression steps: no schema rule expresses it; the operator refuses it before any Job.
    ("prune-after-quantize", ("spec", "compression"),
     {"steps": [{"quantize": {"scheme": "int8-dynamic"}}, {"prune": {"amount": 0.5}}],
      "evaluation": {"dataset": "builtin:digits"}, "artifacts": {"pvc": "shipyard-artifacts"}}, "InvalidSpec",
     "spec.compression.steps[1].prune: cannot follow the quantize step at spec.compression.steps[0]"),
    # the API server's pod validation: a request above its limit (neither the CRD nor spec.py compares them)
    ("cpu-request-over-limit", ("spec", "serving", "resources", "limits", "cpu"), "100m", "ChildRejected",
     "must be less than or equal to cpu limit"),
]


def operator_base() -> dict[str, Any]:
    body = digits()
    del body["spec"]["compression"]
    return body


# ---------------------------------------------------------------------------------------------------------------
# Helpers


@dataclass(frozen=True)
class Answer:
    code: int
    message: str


class Api:
    """Creates and updates ModelDeployments over HTTP with strict field validation (what kubectl --validate=strict
    does, without a process per call)."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        config = kubeconfig.KubeConfig.from_file(cluster.kubeconfig).get()
        self.http = client_adapter.Client(config, client_adapter.ConnectionParams())
        self.path = f"/apis/shipyard.dev/v1alpha1/namespaces/{namespace}/modeldeployments"

    def _answer(self, response: Any) -> Answer:
        try:
            message = str(response.json().get("message", ""))
        except ValueError:
            message = response.text
        return Answer(response.status_code, message)

    def create(self, body: dict[str, Any]) -> Answer:
        return self._answer(self.http.post(self.path, params={"fieldValidation": "Strict"},
                                           content=json.dumps(body)))

    def replace(self, body: dict[str, Any], resource_version: str) -> Answer:
        body = copy.deepcopy(body)
        body["metadata"]["resourceVersion"] = resource_version
        return self._answer(self.http.put(f"{self.path}/{body['metadata']['name']}",
                                          params={"fieldValidation": "Strict"}, content=json.dumps(body)))


def named(body: dict[str, Any], name: str) -> dict[str, Any]:
    body = copy.deepcopy(body)
    body["metadata"] = {"name": name}
    return body


def stored_names(cluster: Cluster, namespace: str) -> list[str]:
    out = json.loads(cluster.kubectl("get", "md", "-n", namespace, "-o", "json").stdout)
    return sorted(i["metadata"]["name"] for i in out["items"])


def stalled(md: dict[str, Any] | None) -> dict[str, Any] | None:
    for c in ((md or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == "Stalled" and c["status"] == "True":
            return dict(c)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Tests


def test_every_cel_rule_of_the_crd_has_a_violation() -> None:
    assert set(CEL_VIOLATIONS) == schema_rules()


def test_generated_cases_are_distinct_and_cover_every_kind_and_rule() -> None:
    cases = all_cases(rich_digits())
    assert len(cases) >= MIN_DISTINCT
    assert len({c.key for c in cases}) == len(cases)
    assert {c.kind for c in cases} == {*SCHEMA_KINDS, "required", "unknown", "cel", "listMapKey"}
    assert {c.says for c in cases if c.kind == "cel"} == {message for _, message in schema_rules()}
    assert len({c.field for c in cases if c.kind in SCHEMA_KINDS}) >= 30  # fields all over the schema
    assert all_cases(rich_digits()) == cases  # reproducible


def test_generated_invalid_specs_are_rejected_on_create_and_update(cluster: Cluster, namespace: str) -> None:
    api = Api(cluster, namespace)
    base = rich_digits()
    assert api.create(named(base, "existing")).code == 201
    existing = cluster.get("md", "existing", namespace)
    assert existing is not None
    version = existing["metadata"]["resourceVersion"]
    cases = all_cases(base)
    assert len(cases) >= MIN_DISTINCT
    for case in cases:
        for verb, out in (("create", api.create(case.apply(named(base, "hostile")))),
                          ("update", api.replace(case.apply(named(base, "existing")), version))):
            assert out.code in (400, 422), f"{verb} of {case}: {out}"
            assert case.field in out.message, f"{verb} of {case}: the error does not name {case.field}: {out}"
            # (an object where a number belongs may also be refused by strict decoding, as unknown fields of it)
            unknown = case.kind == "type" and isinstance(case.value, dict) and "unknown field" in out.message
            assert case.says in out.message or unknown, f"{verb} of {case}: {out}"
    assert stored_names(cluster, namespace) == ["existing"]
    after = cluster.get("md", "existing", namespace)
    assert after is not None
    assert after["spec"] == existing["spec"]
    assert after["metadata"]["resourceVersion"] == existing["metadata"]["resourceVersion"]
    print(f"{len(cases)} distinct invalid specs, by kind:",
          {k: sum(c.kind == k for c in cases) for k in sorted({c.kind for c in cases})})


@pytest.mark.parametrize(("path", "value", "says"), [
    pytest.param(("spec", "image"), "registry.example/" + "a" * 200_000 + ":1.0", "Too long", id="huge-string"),
    pytest.param(("spec", "model", "path"), "/" + "m" * 1_000_000, "Too long", id="megabyte-string"),
    pytest.param(("spec", "rollout", "steps"), [{"weight": w} for w in range(1, 30)], "Too many",
                 id="list-over-max-items"),
    pytest.param(("spec", "compression", "steps"), [{"quantize": {"scheme": "int8-dynamic"}}] * 5000, "Too many",
                 id="long-list-over-max-items"),
    pytest.param(("spec", "serving", "nodeSelector"), {f"k{i}": "v" for i in range(5000)}, "Too many",
                 id="map-over-max-properties"),
])
def test_oversized_field_is_rejected_naming_it(cluster: Cluster, namespace: str, path: tuple[str, ...],
                                               value: Any, says: str) -> None:
    api = Api(cluster, namespace)
    body = Case("oversized", path, value, field_name(path), says).apply(digits())
    out = api.create(body)
    assert out.code == 422, out.message[:2000]
    assert f"{field_name(path)}: " in out.message and says in out.message, out.message[:2000]
    assert stored_names(cluster, namespace) == []
    assert api.create(named(digits(), "target")).code == 201  # the same as an update
    stored = cluster.get("md", "target", namespace)
    assert stored is not None
    out = api.replace(named(body, "target"), stored["metadata"]["resourceVersion"])
    assert out.code == 422 and f"{field_name(path)}: " in out.message, out.message[:2000]
    after = cluster.get("md", "target", namespace)
    assert after is not None and after["spec"] == stored["spec"]


def test_object_over_the_request_limit_is_rejected(cluster: Cluster, namespace: str) -> None:
    api = Api(cluster, namespace)
    body = digits()
    body["spec"]["model"]["path"] = "/" + "m" * (4 * 1024 * 1024)  # 4 MiB: over the API server's 3 MiB limit
    out = api.create(body)
    assert out.code == 413 and "Request entity too large" in out.message, out
    assert stored_names(cluster, namespace) == []
    assert api.create(named(digits(), "target")).code == 201
    stored = cluster.get("md", "target", namespace)
    assert stored is not None
    out = api.replace(named(body, "target"), stored["metadata"]["resourceVersion"])
    assert out.code == 413 and "Request entity too large" in out.message, out
    after = cluster.get("md", "target", namespace)
    assert after is not None and after["spec"] == stored["spec"]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[str] = []
        self.seen = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.seen += 1
        if record.exc_info or record.levelno >= logging.ERROR:
            self.bad.append(self.format(record))


def test_operator_stalls_on_what_only_it_can_reject_and_keeps_reconciling(
        cluster: Cluster, operator: KopfRunner, namespace: str) -> None:
    records = _Records()
    logging.getLogger().addHandler(records)
    try:
        base = operator_base()
        bodies = {name: Case("operator", at, value, "", "").apply(named(base, name))
                  for name, at, value, _, _ in OPERATOR_CASES}
        api = Api(cluster, namespace)
        for name, body in bodies.items():  # accepted at admission: the schema cannot express these rules
            out = api.create(body)
            assert out.code == 201, f"{name}: {out}"
        for name, _, _, reason, says in OPERATOR_CASES:
            md = wait_until(lambda n=name: stalled(cluster.get("md", n, namespace)), 60, message=f"{name} Stalled")
            assert md["reason"] == reason and says in md["message"], (name, md)
            full = cluster.get("md", name, namespace)
            assert full is not None and full["status"]["message"] == md["message"]
            assert full["status"]["observedGeneration"] == full["metadata"]["generation"]
        # Nothing was made for them, and a valid object created afterwards is reconciled as usual.
        invalid = {n for n, *_ in OPERATOR_CASES if dict((c[0], c[3]) for c in OPERATOR_CASES)[n] == "InvalidSpec"}
        assert api.create(named(base, "valid")).code == 201
        wait_until(lambda: (md := cluster.get("md", "valid", namespace)) and (md.get("status") or {}).get(
            "observedGeneration") == 1 and not stalled(md) and cluster.get("deployment", "valid-1-0-0", namespace),
            60, message="the valid object reconciled")
        deployments = json.loads(cluster.kubectl("get", "deployments", "-n", namespace, "-o", "json").stdout)
        owners = {i["metadata"]["labels"].get("shipyard.dev/model") for i in deployments["items"]}
        assert owners.isdisjoint(invalid), owners
    finally:
        logging.getLogger().removeHandler(records)
    assert records.seen > 0 and records.bad == []  # the operator's log went through the handler, clean
