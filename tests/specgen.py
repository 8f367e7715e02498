"""Hypothesis strategies over the CRD's structural schema: ModelDeployment specs the schema allows.

``build_strategy(schema)`` walks an ``openAPIV3Schema`` node and draws values that satisfy its types, enums,
patterns, lengths, bounds, required keys and item/property counts (not its CEL rules: the API server decides those,
so a test submits what this draws with a server-side dry run and keeps what is admitted). A few fields get values
drawn from realistic pools instead of their bare pattern (``HINTS``), so that most drawn specs also pass the CEL
rules and the test exercises the planner rather than admission.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from hypothesis import strategies as st

Strategy = st.SearchStrategy[Any]

IMAGES = ("registry.example/acme/digits-model:1.1.0", "host:5000/team/m:v2", "m:latest",
          "registry.example/acme/m@sha256:" + "ab" * 32, "m:1.0@sha256:" + "cd" * 32)
ASCII = st.characters(min_codepoint=32, max_codepoint=126)  # what a YAML stream of manifests carries safely
QUANTITIES = ("1", "2", "500m", "250000u", "1k", "1Gi", "512Mi", "1e3", "0.5", "100n")


def _label_keys() -> Strategy:
    return st.sampled_from(["pool", "kubernetes.io/arch", "example.com/gpu-type", "a", "zone_1"])


def _resources() -> Strategy:
    names = st.sampled_from(["cpu", "memory", "ephemeral-storage"])
    quantities = st.one_of(st.sampled_from(QUANTITIES), st.integers(0, 64))
    plain = st.dictionaries(names, quantities, max_size=3)
    gpus = st.integers(0, 8)
    return st.builds(lambda requests, limits, gpu, with_gpu: {
        **({"requests": {**requests, **({"nvidia.com/gpu": str(gpu)} if with_gpu else {})}} if requests or with_gpu
           else {}),
        **({"limits": {**limits, **({"nvidia.com/gpu": gpu} if with_gpu else {})}} if limits or with_gpu else {}),
    }, plain, plain, gpus, st.booleans())


def _steps() -> Strategy:
    """Rollout steps: strictly increasing weights, each a pause or manual (not both)."""
    weights = st.lists(st.integers(1, 100), min_size=0, max_size=5, unique=True).map(sorted)

    def step(weight: int, kind: int, pause: str) -> dict[str, Any]:
        return {"weight": weight, **({"pause": pause} if kind == 1 else {"manual": True} if kind == 2 else {})}

    return weights.flatmap(lambda ws: st.tuples(*[
        st.builds(step, st.just(w), st.integers(0, 2), st.sampled_from(["0s", "1s", "30s", "1m30s", "168h"]))
        for w in ws]).map(list))


def _one_of_keys(keys: tuple[str, ...], fix: Callable[[dict[str, Any]], dict[str, Any]] = lambda d: d,
                 ) -> Callable[[Mapping[str, Any], str], Strategy]:
    """An object setting exactly one of ``keys`` (its other fields drawn as usual), then ``fix``ed."""

    def hint(node: Mapping[str, Any], path: str) -> Strategy:
        others = {k: v for k, v in node["properties"].items() if k not in keys}
        required = set(node.get("required", ()))
        rest = st.fixed_dictionaries({k: build_strategy(v, f"{path}.{k}") for k, v in others.items() if k in required},
                                     optional={k: build_strategy(v, f"{path}.{k}") for k, v in others.items()
                                               if k not in required})
        one = st.sampled_from(keys).flatmap(lambda k: build_strategy(node["properties"][k], f"{path}.{k}").map(
            lambda value, k=k: {k: value}))
        return st.builds(lambda a, b: fix({**a, **b}), rest, one)

    return hint


def _fix_prune(step: dict[str, Any]) -> dict[str, Any]:
    prune = step.get("prune")
    if prune is not None and prune.get("scope") != "structured":
        prune.pop("norm", None)
    return step


def _fix_metric(metric: dict[str, Any]) -> dict[str, Any]:
    if "job" in metric:
        metric.pop("maxRelativeToStable", None)
    elif not any(k in metric for k in ("max", "min", "maxRelativeToStable")):
        metric["max"] = 1
    if "min" in metric and "max" in metric and metric["min"] > metric["max"]:
        metric["min"], metric["max"] = metric["max"], metric["min"]
    if "prometheus" in metric and "maxRelativeToStable" in metric:
        metric["prometheus"]["query"] = 'up{version="{{version}}"}'
    web = metric.get("web")
    if web is not None and web.get("method") != "POST":
        web.pop("body", None)
    if metric.get("builtin") == "predictionAgreement":  # judged with min only
        metric.pop("max", None)
        metric.pop("maxRelativeToStable", None)
        metric.setdefault("min", 0.9)
    return metric


AGREEMENT = {"name": "shadow-agreement", "builtin": "predictionAgreement", "min": 0.95}


def _shadow_step() -> Strategy:
    """A shadow step: percent, and minRequests, duration or both."""
    return st.builds(lambda percent, until: {"shadow": {"percent": percent, **until}}, st.integers(1, 100),
                     st.sampled_from([{"minRequests": 1}, {"minRequests": 500}, {"duration": "30s"},
                                      {"duration": "10m", "minRequests": 100}]))


def _fix_spec(spec: dict[str, Any], shadow: dict[str, Any] | None, output: dict[str, Any]) -> dict[str, Any]:
    """The cross-field rules of a shadow step, which drawing field by field would rarely meet: with ``shadow`` (and a
    canary rollout), it goes first, with Shipyard's own server over HTTP, spec.model.output and a predictionAgreement
    metric; without, predictionAgreement metrics become errorRate (they need a shadow step)."""
    rollout = spec.setdefault("rollout", {})
    if shadow is not None and rollout.get("strategy", "canary") == "canary":
        rollout["steps"] = [shadow, *rollout.get("steps", [])]
        spec["model"]["output"] = output
        serving = spec.setdefault("serving", {})
        serving.pop("runtime", None)
        if isinstance(serving.get("grpc"), dict):
            serving["grpc"]["http"] = True
        analysis = rollout.setdefault("analysis", {"metrics": []})
        if not any(m.get("builtin") == "predictionAgreement" for m in analysis["metrics"]):
            analysis["metrics"] = [m for m in analysis["metrics"] if m.get("name") != AGREEMENT["name"]][:15]
            analysis["metrics"].append(dict(AGREEMENT))
        return spec
    for analysis in (rollout.get("analysis"), (rollout.get("blueGreen") or {}).get("postPromotionAnalysis")):
        for metric in (analysis or {}).get("metrics", ()):
            if metric.get("builtin") == "predictionAgreement":
                metric["builtin"] = "errorRate"
    return spec


HINTS: Mapping[str, Callable[[Mapping[str, Any], str], Strategy]] = {
    "spec.compression.steps[]": _one_of_keys(("prune", "quantize", "distill"), _fix_prune),
    "spec.rollout.analysis.metrics[]": _one_of_keys(("builtin", "prometheus", "scrape", "web", "job"), _fix_metric),
    "spec.image": lambda node, path: st.sampled_from(IMAGES),
    "spec.model": lambda node, path: st.one_of(
        st.fixed_dictionaries({"path": st.sampled_from(["/models/digits", "/m"])},
                              optional={"name": st.sampled_from(["digits", "m.v1"])}),
        st.fixed_dictionaries({"uri": st.sampled_from(["pvc://models/digits", "pvc://m", "s3://bucket/key",
                                                       "gs://bucket/key", "https://models.example/m.tar.gz"])}),
        # downloaded models, each scheme with the options it takes (so that most are admitted; the hostile specs
        # test the options with the wrong scheme)
        st.fixed_dictionaries(
            {"uri": st.sampled_from(["s3://bucket/digits/", "s3://bucket/digits.pt"])},
            optional={"digest": st.just("sha256:" + "ab" * 32),
                      "credentials": st.sampled_from([{"secretName": "model-storage"},
                                                      {"serviceAccountName": "model-reader"}]),
                      "s3": st.just({"endpoint": "http://127.0.0.1:9000", "region": "eu-west-1",
                                     "addressing": "path"}),
                      "caBundle": st.just({"configMapName": "models-ca"})}),
        st.fixed_dictionaries({"uri": st.just("https://models.example/m.tar.gz")},
                              optional={"digest": st.just("sha256:" + "cd" * 32),
                                        "caBundle": st.just({"configMapName": "models-ca"})}),
        st.fixed_dictionaries({"uri": st.just("oci://registry.example:5000/models/digits:1.0")},
                              optional={"digest": st.just("sha256:" + "ef" * 32),
                                        "credentials": st.just({"secretName": "regcred"}),
                                        "mount": st.just("download"), "path": st.just("/models/digits")}),
        st.just({"uri": "gs://bucket/m"})),
    "spec.serving.resources": lambda node, path: _resources(),
    "spec.compression.resources": lambda node, path: _resources(),
    "spec.serving.nodeSelector": lambda node, path: st.dictionaries(_label_keys(), st.sampled_from(["a", "x-1", ""]),
                                                         max_size=3),
    "spec.rollout.steps": lambda node, path: _steps(),
    "spec.rollout.traffic": lambda node, path: st.sampled_from([
        {"replicas": {}}, {"gatewayAPI": {"httpRoute": "digits"}},
        {"gatewayAPI": {"httpRoute": "digits", "grpcRoute": "digits-grpc", "previewHeader": "x-preview"}}]),
    "spec.rollout.analysis.interval": lambda node, path: st.sampled_from(["1s", "10s", "30s", "1h", "1m30s"]),
    "spec.rollout.analysis.initialDelay": lambda node, path: st.sampled_from(["0s", "5s", "24h"]),
    "spec.rollout.analysis.metrics[].prometheus.query": lambda node, path: st.sampled_from(
        ['up{version="{{version}}"}', "sum(rate(x[1m]))", 'a{v="{{version}}",s="{{stableVersion}}"}']),
    "spec.rollout.analysis.metrics[].web.url": lambda node, path: st.sampled_from(
        ["http://quality.example/score?v={{version}}", "https://q.example/api"]),
    "spec.rollout.analysis.metrics[].web.headers": lambda node, path: st.lists(st.fixed_dictionaries(
        {"name": st.sampled_from(["Accept", "X-Team"]), "value": st.text(alphabet=ASCII, max_size=8)}), max_size=2,
        unique_by=lambda h: h["name"]),
    "spec.rollout.analysis.metrics[].web.jsonPath": lambda node, path: st.sampled_from(
        ["$.score", "$.data[0].value", "ok"]),
    "spec.rollout.analysis.metrics[].job.template": lambda node, path: st.just(
        {"spec": {"containers": [{"name": "e", "image": "m:1", "command": ["shipyard-runtime", "evaluate"]}]}}),
    "spec.compression.steps[].distill.studentKwargs": lambda node, path: st.sampled_from([{}, {"hidden": 32}]),
    "spec.compression.evaluation.maxRelativeLoss": lambda node, path: st.sampled_from([{}, {"nn_agreement": 0.05}]),
    "spec.serving.tolerations": lambda node, path: st.lists(st.one_of(
        st.just({"operator": "Exists"}),
        st.fixed_dictionaries({"key": st.sampled_from(["nvidia.com/gpu", "k"]), "operator": st.just("Equal"),
                               "value": st.sampled_from(["v", ""]),
                               "effect": st.sampled_from(["NoSchedule", "NoExecute"])})), max_size=2),
}


def _fix_rollout(rollout: dict[str, Any]) -> dict[str, Any]:
    """blueGreen settings only with strategy blueGreen, canary steps only without it."""
    if rollout.get("strategy") == "blueGreen":
        rollout.pop("steps", None)
    else:
        rollout.pop("blueGreen", None)
    return rollout


def _fix_serving(serving: dict[str, Any]) -> dict[str, Any]:
    """Settings of Shipyard's server only without a runtime; a runtime without a preset declares a port; autoscaling
    bounds in order, a percentage target at most 100, the cpu metric only with a CPU request."""
    runtime = serving.get("runtime")
    if runtime is not None:
        serving.pop("server", None)
        serving.pop("grpc", None)
        if not runtime.get("preset") and not (runtime.get("ports") or {}).get("http") and \
                not (runtime.get("ports") or {}).get("grpc"):
            runtime["ports"] = {**(runtime.get("ports") or {}), "http": 8000}
    auto = serving.get("autoscaling")
    if auto is not None:
        low, high = auto.get("minReplicas"), auto.get("maxReplicas")
        if low is not None and high is not None and low > high:
            auto["minReplicas"], auto["maxReplicas"] = high, low
        if serving.get("replicas") is not None and high is not None and serving["replicas"] > max(high, low or 0):
            serving["replicas"] = max(high, low or 0)
        if auto.get("metric") in ("cpu", "gpuUtilization") and (auto.get("target") or 0) > 100:
            auto["target"] = 70
        cpu = any("cpu" in ((serving.get("resources") or {}).get(k) or {}) for k in ("requests", "limits"))
        if auto.get("metric") == "cpu" and not cpu:
            auto["metric"] = "requestRate"
    return serving


FIXES: Mapping[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "spec.rollout": _fix_rollout, "spec.serving": _fix_serving}


def _number(node: Mapping[str, Any], integer: bool) -> Strategy:
    low, high = node.get("minimum"), node.get("maximum")
    if integer:
        lo = None if low is None else int(low) + (1 if node.get("exclusiveMinimum") else 0)
        hi = None if high is None else int(high) - (1 if node.get("exclusiveMaximum") else 0)
        return st.integers(lo if lo is not None else -(2**31), hi if hi is not None else 2**31)
    return st.floats(min_value=low if low is not None else -1e6, max_value=high if high is not None else 1e6,
                     exclude_min=bool(node.get("exclusiveMinimum")), exclude_max=bool(node.get("exclusiveMaximum")),
                     allow_nan=False, allow_infinity=False).map(lambda v: int(v) if v.is_integer() else v)


def _string(node: Mapping[str, Any]) -> Strategy:
    if "enum" in node:
        return st.sampled_from(node["enum"])
    low, high = node.get("minLength", 0), min(node.get("maxLength", 24), 24)
    if "pattern" in node:
        return st.from_regex(re.compile(node["pattern"]), fullmatch=True, alphabet=ASCII).filter(
            lambda s: low <= len(s) <= node.get("maxLength", math.inf))
    return st.text(alphabet=ASCII, min_size=low, max_size=max(low, high))


def build_strategy(node: Mapping[str, Any], path: str = "spec") -> Strategy:
    """Values the schema node allows (see the module docstring)."""
    if path == "spec":  # a quarter of the specs get a shadow step, with what it needs (``_fix_spec``)
        outputs = st.sampled_from([{"kind": "classes"}, {"kind": "embedding", "minCosineSimilarity": 0.98},
                                   {"kind": "tensor", "maxAbsDifference": 0.01}, {"kind": "tensor"}])
        return st.builds(_fix_spec, _build(node, path), st.one_of(st.none(), st.none(), st.none(), _shadow_step()),
                         outputs)
    return _build(node, path)


def _build(node: Mapping[str, Any], path: str) -> Strategy:
    if path in HINTS:
        return HINTS[path](node, path)
    if node.get("x-kubernetes-int-or-string"):
        return st.one_of(st.sampled_from(QUANTITIES), st.integers(0, 64))
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return st.just({})
    kind = node.get("type")
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if kind == "boolean":
        return st.booleans()
    if kind in ("integer", "number"):
        return _number(node, kind == "integer")
    if kind == "string":
        return _string(node)
    if kind == "array":
        items = build_strategy(node["items"], f"{path}[]")
        keys = node.get("x-kubernetes-list-map-keys")
        unique = (lambda item: tuple(item.get(k) for k in keys)) if keys else None
        return st.lists(items, min_size=node.get("minItems", 0), max_size=min(node.get("maxItems", 4), 4),
                        unique_by=unique)
    if kind == "object" and "properties" in node:
        required = set(node.get("required", ()))
        fields = {k: build_strategy(v, f"{path}.{k}") for k, v in node["properties"].items()}
        drawn = st.fixed_dictionaries({k: s for k, s in fields.items() if k in required},
                                      optional={k: s for k, s in fields.items() if k not in required})
        return drawn.map(FIXES[path]) if path in FIXES else drawn
    if kind == "object" and isinstance(node.get("additionalProperties"), Mapping):
        values = build_strategy(node["additionalProperties"], f"{path}{{}}")
        return st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True, alphabet=ASCII), values,
                               max_size=min(node.get("maxProperties", 3), 3))
    if kind == "object":
        return st.just({})
    raise ValueError(f"{path}: no strategy for {dict(node)}")
