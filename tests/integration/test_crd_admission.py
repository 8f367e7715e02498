"""Admission of ModelDeployments by the real API server: the CRD's schema, defaults and CEL rules.

Talks to the local control plane through the ``cluster`` and ``namespace`` fixtures (kubectl, server-side apply
with strict field validation, as GitOps tools use it). No operator runs here.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import examples

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = examples.PATHS
DIGEST = "sha256:" + "0123456789abcdef" * 4
DELETE = object()


def digits() -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((REPO / "examples" / "digits.yaml").read_text())
    return body


def mutate(body: dict[str, Any], path: list[str | int], value: object) -> dict[str, Any]:
    """Sets (or, with DELETE, removes) body[path[0]][path[1]]...; missing objects on the way are created."""
    node: Any = body
    for key in path[:-1]:
        if isinstance(key, str) and key not in node:
            node[key] = {}
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return body


def apply(cluster: Any, namespace: str, body: dict[str, Any]) -> Any:
    return cluster.kubectl("apply", "--server-side", "--validate=strict", "--field-manager=shipyard-tests",
                           "-n", namespace, "-f", "-", input=json.dumps(body), check=False)


# ---------------------------------------------------------------------------------------------------------------
# Valid manifests are accepted, and defaults are applied


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem) for p in EXAMPLES])
def test_example_is_accepted(cluster: Any, namespace: str, path: Path) -> None:
    # the ModelDeployment of the file (an example's HTTPRoute needs the Gateway API CRDs, not installed here)
    body = examples.load_model_deployment(path)
    out = apply(cluster, namespace, body)
    assert out.returncode == 0, out.stderr
    name = body["metadata"]["name"]
    stored = cluster.get("modeldeployment", name, namespace)
    assert stored is not None and stored["spec"]["image"].startswith("registry.example/shipyard/")


VALID_VARIANTS = [
    pytest.param(["spec", "image"], "registry.example:5000/shipyard/digits-model:1.0.1", id="registry-port-and-tag"),
    pytest.param(["spec", "image"], f"registry.example/shipyard/digits-model@{DIGEST}", id="digest-only"),
    pytest.param(["spec", "image"], f"registry.example:5000/digits:1.0@{DIGEST}", id="tag-and-digest"),
    pytest.param(["spec", "model"], {"uri": "pvc://models/digits/1.0.0"}, id="model-uri"),
    pytest.param(["spec", "compression", "steps"],
                 [{"prune": {"amount": 0.5, "scope": "structured", "norm": 1}},
                  {"distill": {"student": "models.small:build", "temperature": 2, "alpha": 0.3}},
                  {"quantize": {"scheme": "int8-weight-only"}}], id="all-step-kinds"),
    pytest.param(["spec", "serving", "resources"],
                 {"requests": {"nvidia.com/gpu": "2"}, "limits": {"nvidia.com/gpu": 2, "memory": "1Gi"}},
                 id="gpus-requests-equal-limits"),
    pytest.param(["spec", "rollout", "steps"], [{"weight": 10, "manual": True}, {"weight": 100, "pause": "1h30m"}],
                 id="manual-step-and-weight-100"),
    pytest.param(["spec", "rollout", "analysis", "metrics"],
                 [{"name": "p99", "prometheus": {"query": 'q{v="{{version}}"}'}, "maxRelativeToStable": 0.1},
                  {"name": "inflight", "scrape": {"metric": "shipyard_inflight_requests", "rate": True},
                   "min": 0, "max": 10}], id="prometheus-and-scrape-metrics"),
    pytest.param(["spec", "rollout", "steps"], [], id="no-steps"),
    pytest.param(["spec", "compression", "compiled"], {"aotInductor": True, "maxBatchSize": 32, "maxAutotune": True},
                 id="compiled-package-max-batch-equal-to-serving"),
    pytest.param(["spec", "compression", "compiled"], {"mode": "off", "maxBatchSize": 16},
                 id="mode-off-any-serving-batch"),
    pytest.param(["spec", "compression", "compiled"], {"mode": "auto", "maxBatchSize": 16},
                 id="mode-auto-serves-eager-above-the-package-batch"),
    pytest.param(["spec", "rollout"], {"strategy": "blueGreen", "scaleDownDelaySeconds": 120, "blueGreen": {
        "autoPromotion": False, "postPromotionAnalysis": {"metrics": [
            {"name": "error-rate", "builtin": "errorRate", "max": 0.05}]}}}, id="blue-green"),
    pytest.param(["spec", "rollout", "scaleDownDelaySeconds"], 600, id="canary-rollback-window"),
]


@pytest.mark.parametrize(("path", "value"), VALID_VARIANTS)
def test_valid_variant_is_accepted(cluster: Any, namespace: str, path: list[str | int], value: object) -> None:
    out = apply(cluster, namespace, mutate(digits(), path, value))
    assert out.returncode == 0, out.stderr


def test_defaults_are_applied_and_read_back(cluster: Any, namespace: str) -> None:
    body = {
        "apiVersion": "shipyard.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "tiny"},
        "spec": {
            "image": "registry.example/shipyard/digits-model:1.0.0",
            "model": {"path": "/models/digits"},
            "compression": {"steps": [{"prune": {"amount": 0.5}}, {"distill": {"student": "m:f"}}],
                            "evaluation": {"dataset": "builtin:digits"}, "artifacts": {"pvc": "a"}},
            "rollout": {"steps": [{"weight": 50}],
                        "analysis": {"metrics": [{"name": "e", "builtin": "errorRate", "max": 0.1},
                                                 {"name": "s", "scrape": {"metric": "m"}, "max": 1}]}},
        },
    }
    out = apply(cluster, namespace, body)
    assert out.returncode == 0, out.stderr
    stored = cluster.get("modeldeployment", "tiny", namespace)
    assert stored is not None
    assert stored["spec"] == {
        "image": "registry.example/shipyard/digits-model:1.0.0",
        "model": {"path": "/models/digits"},
        "compression": {
            "steps": [{"prune": {"amount": 0.5, "scope": "global", "fineTuneEpochs": 0, "lr": 0.001, "batchSize": 64}},
                      {"distill": {"student": "m:f", "temperature": 4, "alpha": 0.5, "epochs": 10, "lr": 0.001,
                                   "batchSize": 64}}],
            "evaluation": {"dataset": "builtin:digits", "maxRelativeAccuracyLoss": 0.01, "samples": 1000},
            "artifacts": {"pvc": "a"},
            "backoffLimit": 1,
            "activeDeadlineSeconds": 3600,
        },
        "serving": {"replicas": 1, "batching": {"maxBatchSize": 32, "maxDelayMs": 5}, "port": 8080},
        "rollout": {
            "steps": [{"weight": 50, "manual": False}],
            "strategy": "canary",
            "startupTimeoutSeconds": 900,
            "analysis": {
                "interval": "30s", "initialDelay": "0s", "failureLimit": 1, "consecutiveErrorLimit": 4,
                "minSamples": 1, "noData": "Inconclusive",
                "metrics": [{"name": "e", "builtin": "errorRate", "max": 0.1},
                            {"name": "s", "scrape": {"metric": "m", "aggregation": "sum", "rate": False}, "max": 1}],
            },
        },
        "rollback": {"policy": "Automatic"},
        "revisionHistoryLimit": 10,
        "retry": 0,
    }


# ---------------------------------------------------------------------------------------------------------------
# Invalid manifests are rejected at admission, naming the field

INVALID = [
    pytest.param(["spec", "image"], DELETE, "spec.image", "Required value", id="missing-image"),
    pytest.param(["spec", "image"], "registry.example/shipyard/digits-model", "spec.image",
                 "must carry a tag", id="image-without-tag"),
    pytest.param(["spec", "image"], "registry.example:5000/shipyard/digits-model", "spec.image",
                 "must carry a tag", id="image-registry-port-no-tag"),
    pytest.param(["spec", "image"], "registry.example/Shipyard/digits-model:1.0", "spec.image",
                 "must be a valid image reference", id="image-upper-case-repository"),
    pytest.param(["spec", "model", "uri"], "pvc://models/digits", "spec.model",
                 "must set only one of path and uri", id="model-path-and-uri"),
    pytest.param(["spec", "model"], {"name": "digits"}, "spec.model", "must set path or uri", id="model-no-source"),
    pytest.param(["spec", "model"], {"uri": "ftp://host/digits"}, "spec.model.uri", "should match",
                 id="model-uri-scheme"),
    pytest.param(["spec", "compression", "steps", 0, "prune", "amount"], 1.0,
                 "spec.compression.steps[0].prune.amount", "should be less than 1", id="prune-amount-1"),
    pytest.param(["spec", "compression", "steps", 0, "prune", "amount"], 0,
                 "spec.compression.steps[0].prune.amount", "should be greater than 0", id="prune-amount-0"),
    pytest.param(["spec", "compression", "steps", 1, "prune", "norm"], 2, "spec.compression.steps[1].prune.norm",
                 "only allowed with scope structured", id="prune-norm-with-global-scope"),
    pytest.param(["spec", "compression", "steps", 2, "quantize", "scheme"], "int3",
                 "spec.compression.steps[2].quantize.scheme", 'Unsupported value: "int3"', id="quantize-scheme"),
    pytest.param(["spec", "compression", "steps", 2, "prune"], {"amount": 0.5}, "spec.compression.steps[2]",
                 "must set only one of prune, quantize, distill", id="step-with-two-kinds"),
    pytest.param(["spec", "compression", "steps", 1], {}, "spec.compression.steps[1]",
                 "must set one of prune, quantize, distill", id="step-with-no-kind"),
    pytest.param(["spec", "compression", "evaluation", "maxRelativeAccuracyLoss"], 1.5,
                 "spec.compression.evaluation.maxRelativeAccuracyLoss", "should be less than or equal to 1",
                 id="accuracy-loss-over-1"),
    pytest.param(["spec", "compression", "compiled", "maxBatchSize"], 1, "spec.compression.compiled.maxBatchSize",
                 "should be greater than or equal to 2", id="compiled-max-batch-1"),
    pytest.param(["spec", "compression", "compiled"], {"aotInductor": True, "maxBatchSize": 16},
                 "spec.serving.batching.maxBatchSize", "must not exceed spec.compression.compiled.maxBatchSize",
                 id="serving-batch-over-compiled-package"),
    pytest.param(["spec", "compression", "compiled"], {"mode": "on", "maxBatchSize": 16},
                 "spec.serving.batching.maxBatchSize",
                 "with compiled.mode on: the pods must serve the compiled package",
                 id="serving-batch-over-a-required-package"),
    pytest.param(["spec", "compression", "compiled"], {"mode": "maybe"}, "spec.compression.compiled.mode",
                 'Unsupported value: "maybe"', id="compiled-mode-unknown"),
    pytest.param(["spec", "compression", "compiled"], {"mode": "off", "aotInductor": True},
                 "spec.compression.compiled.aotInductor", "cannot be true with mode off", id="aot-inductor-mode-off"),
    pytest.param(["spec", "rollout", "steps"], [{"weight": 50}, {"weight": 25}], "spec.rollout.steps",
                 "weights must be strictly increasing", id="weights-decreasing"),
    pytest.param(["spec", "rollout", "steps"], [{"weight": 25}, {"weight": 25}], "spec.rollout.steps",
                 "weights must be strictly increasing", id="weights-equal"),
    pytest.param(["spec", "rollout", "steps", 1, "weight"], 101, "spec.rollout.steps[1].weight",
                 "should be less than or equal to 100", id="weight-over-100"),
    pytest.param(["spec", "rollout", "steps", 0, "pause"], "5 minutes", "spec.rollout.steps[0].pause",
                 "should match", id="pause-not-a-duration"),
    pytest.param(["spec", "rollout", "steps", 0, "manual"], True, "spec.rollout.steps[0].pause",
                 "either pause or manual", id="pause-and-manual"),
    pytest.param(["spec", "rollout", "analysis", "interval"], "0s", "spec.rollout.analysis.interval",
                 "must be between 1s and 1h", id="interval-zero"),
    pytest.param(["spec", "rollout", "analysis", "interval"], "soon", "spec.rollout.analysis.interval",
                 "should match", id="interval-not-a-duration"),
    pytest.param(["spec", "rollout", "analysis", "noData"], "Pass", "spec.rollout.analysis.noData",
                 'Unsupported value: "Pass"', id="no-data-policy"),
    pytest.param(["spec", "rollout", "analysis", "metrics", 0, "prometheus"], {"query": "up"},
                 "spec.rollout.analysis.metrics[0]", "must set only one of builtin, prometheus, scrape, web, job",
                 id="metric-two-providers"),
    pytest.param(["spec", "rollout", "analysis", "metrics", 0, "builtin"], DELETE,
                 "spec.rollout.analysis.metrics[0]", "must set one of builtin, prometheus, scrape, web, job",
                 id="metric-no-provider"),
    pytest.param(["spec", "rollout", "analysis", "metrics", 0, "max"], DELETE,
                 "spec.rollout.analysis.metrics[0]",
                 "must set a threshold (max, min or maxRelativeToStable), unless it is a job metric",
                 id="metric-no-threshold"),
    pytest.param(["spec", "rollout", "analysis", "metrics", 1, "name"], "error-rate",
                 "spec.rollout.analysis.metrics", 'duplicate entries for key [name="error-rate"]',
                 id="metric-duplicate-names"),
    pytest.param(["spec", "rollout", "analysis", "metrics", 0, "min"], 0.5, "spec.rollout.analysis.metrics[0].min",
                 "min must not exceed max", id="metric-min-over-max"),
    pytest.param(["spec", "rollout", "analysis", "metrics", 1], {"name": "p99", "prometheus": {"query": "up"},
                                                                  "maxRelativeToStable": 0.1},
                 "spec.rollout.analysis.metrics[1].prometheus.query", "must contain {{version}}",
                 id="relative-query-without-version"),
    pytest.param(["spec", "model"], {"uri": "https://user:s3cret@models.example/digits"}, "spec.model.uri",
                 "must not carry credentials", id="model-uri-with-credentials"),
    pytest.param(["spec", "rollout", "analysis", "prometheus"], {"address": "http://admin:s3cret@prometheus:9090"},
                 "spec.rollout.analysis.prometheus.address", "must not carry credentials",
                 id="prometheus-address-with-credentials"),
    pytest.param(["spec", "rollout", "analysis", "metrics", 1], {"name": "p99", "max": 1, "prometheus": {
        "query": "up", "address": "https://admin:s3cret@prometheus:9090/prom"}},
                 "spec.rollout.analysis.metrics[1].prometheus.address", "must not carry credentials",
                 id="metric-address-with-credentials"),
    pytest.param(["spec", "rollout", "analysis", "metrics", 1], {"name": "p99", "max": 1, "prometheus": {
        "query": " \t "}}, "spec.rollout.analysis.metrics[1].prometheus.query", "must not be blank",
                 id="blank-query"),
    pytest.param(["spec", "serving", "nodeSelector"], {"not a label key!": "v"}, "spec.serving.nodeSelector",
                 "keys must be label keys", id="node-selector-key"),
    pytest.param(["spec", "serving", "nodeSelector"], {"pool": "two words"}, "spec.serving.nodeSelector",
                 "values must be label values", id="node-selector-value"),
    pytest.param(["spec", "serving", "replicas"], -1, "spec.serving.replicas",
                 "should be greater than or equal to 0", id="negative-replicas"),
    pytest.param(["spec", "serving", "resources", "limits", "nvidia.com/gpu"], "1.5", "spec.serving.resources.limits",
                 "whole number of GPUs", id="fractional-gpu"),
    pytest.param(["spec", "serving", "resources", "requests", "nvidia.com/gpu"], 1, "spec.serving.resources.limits",
                 "requests must equal limits", id="gpu-requested-not-limited"),
    pytest.param(["spec", "serving", "resources", "limits", "memory"], "lots", "spec.serving.resources.limits.memory",
                 "should match", id="memory-not-a-quantity"),
    pytest.param(["spec", "serving", "tolerations"], [{"key": "k", "operator": "Exists", "value": "v"}],
                 "spec.serving.tolerations[0].value", "operator Exists must not set value",
                 id="toleration-exists-with-value"),
    pytest.param(["spec", "rollback", "policy"], "Sometimes", "spec.rollback.policy",
                 'Unsupported value: "Sometimes"', id="rollback-policy"),
    pytest.param(["spec", "revisionHistoryLimit"], 101, "spec.revisionHistoryLimit",
                 "should be less than or equal to 100", id="revision-history-over-100"),
    pytest.param(["spec", "replicas"], 3, ".spec.replicas", "field not declared in schema",
                 id="unknown-field"),
    pytest.param(["spec", "serving", "gpus"], 1, ".spec.serving.gpus", "field not declared in schema",
                 id="unknown-nested-field"),
    pytest.param(["spec", "rollout"], {"strategy": "blueGreen", "steps": [{"weight": 50}]}, "spec.rollout.steps",
                 "blue-green (spec.rollout.strategy blueGreen) has none", id="blue-green-with-canary-steps"),
    pytest.param(["spec", "rollout"], {"blueGreen": {"autoPromotion": False}}, "spec.rollout.blueGreen",
                 "only allowed with strategy blueGreen", id="blue-green-settings-on-a-canary"),
    pytest.param(["spec", "rollout", "strategy"], "redBlack", "spec.rollout.strategy", "Unsupported value",
                 id="unknown-strategy"),
    pytest.param(["spec", "rollout", "scaleDownDelaySeconds"], -1, "spec.rollout.scaleDownDelaySeconds",
                 "should be greater than or equal to 0", id="negative-scale-down-delay"),
]


@pytest.mark.parametrize(("mutations", "message"), [
    pytest.param([(["spec", "compression", "steps", 2, "quantize", "scheme"], "fp8"),
                   # a CUDA-only artifact is served by GPU pods (refused with CPU pods whatever the mode)
                   (["spec", "serving", "resources"], {"limits": {"nvidia.com/gpu": 1}})],
                 "mode on needs a CPU package, and fp8 and int4-weight-only quantize for CUDA",
                 id="mode-on-after-a-cuda-scheme"),
    pytest.param([(["spec", "serving", "resources"], {"limits": {"nvidia.com/gpu": 1}})],
                 "GPU inference pods (spec.serving.resources nvidia.com/gpu) cannot serve it",
                 id="mode-on-with-gpu-pods"),
])
def test_a_required_package_needs_cpu_pods_and_a_cpu_model(cluster: Any, namespace: str,
                                                           mutations: list[tuple[list[str | int], object]],
                                                           message: str) -> None:
    """compiled.mode on: the package is CPU code of a float32 graph; each rule is also fine with mode auto."""
    for mode, refused in (("on", True), ("auto", False)):
        body = mutate(digits(), ["spec", "compression", "compiled"], {"mode": mode})
        for path, value in mutations:
            body = mutate(body, path, value)
        out = apply(cluster, namespace, body)
        if refused:
            assert out.returncode != 0 and "spec.compression.compiled:" in out.stderr, out.stderr
            assert message in out.stderr, out.stderr
        else:
            assert out.returncode == 0, out.stderr
            cluster.kubectl("delete", "modeldeployment", "digits", "-n", namespace, "--wait=true")


@pytest.mark.parametrize(("path", "value", "field", "message"), INVALID)
def test_invalid_manifest_is_rejected(cluster: Any, namespace: str, path: list[str | int], value: object,
                                      field: str, message: str) -> None:
    out = apply(cluster, namespace, mutate(digits(), path, value))
    assert out.returncode != 0, f"accepted: {path}={value!r}"
    assert f"{field}:" in out.stderr, out.stderr
    assert message in out.stderr, out.stderr
    assert "s3cret" not in out.stderr  # a refused credential is not echoed back
    assert cluster.get("modeldeployment", "digits", namespace) is None


def test_unknown_field_is_rejected_by_create_with_strict_validation(cluster: Any, namespace: str) -> None:
    body = mutate(digits(), ["spec", "rollout", "analysis", "metrics", 0, "threshold"], 0.1)
    out = cluster.kubectl("create", "--validate=strict", "-n", namespace, "-f", "-", input=json.dumps(body),
                          check=False)
    assert out.returncode != 0
    assert 'unknown field "spec.rollout.analysis.metrics[0].threshold"' in out.stderr, out.stderr


def test_update_is_validated_too(cluster: Any, namespace: str) -> None:
    assert apply(cluster, namespace, digits()).returncode == 0
    out = apply(cluster, namespace, mutate(digits(), ["spec", "image"], "registry.example/shipyard/digits-model"))
    assert out.returncode != 0
    assert "spec.image:" in out.stderr and "must carry a tag" in out.stderr, out.stderr
    stored = cluster.get("modeldeployment", "digits", namespace)
    assert stored is not None and stored["spec"]["image"] == digits()["spec"]["image"]


# ---------------------------------------------------------------------------------------------------------------
# Status: everything the operator writes is kept; printer columns read it


def full_status() -> dict[str, Any]:
    t = "2026-01-02T03:04:05Z"
    return {
        "observedGeneration": 2,
        "phase": "Progressing",
        "message": "Canary 1.0.1 at step 1 of 2 (25%)",
        "stableVersion": "1.0.0",
        "stableImage": "registry.example/shipyard/digits-model:1.0.0",
        "candidateVersion": "1.0.1",
        "candidateImage": "registry.example/shipyard/digits-model:1.0.1",
        "currentStepIndex": 0,
        "stepStartedAt": t,
        "pausedReason": "ManualStep",
        "conditions": [
            {"type": "Ready", "status": "False", "reason": "Progressing", "message": "rolling out",
             "lastTransitionTime": t, "observedGeneration": 2},
            {"type": "Reconciling", "status": "True", "reason": "Progressing", "message": "",
             "lastTransitionTime": t, "observedGeneration": 2},
            {"type": "Compressed", "status": "True", "reason": "ArtifactReady", "message": "ok",
             "lastTransitionTime": t, "observedGeneration": 2},
        ],
        "history": [{"version": "1.0.0", "image": "registry.example/shipyard/digits-model:1.0.0", "artifact": "ab12",
                     "outcome": "Promoted", "reason": "StepsCompleted", "message": "promoted", "time": t,
                     "retry": 0, "generation": 1}],
        "artifacts": [{"key": "ab12", "version": "1.0.0", "path": "/artifacts/ab12", "digest": "sha256:00",
                       "job": "digits-compress-ab12", "phase": "Succeeded", "message": "accuracy 0.97 -> 0.965",
                       "createdAt": t, "sourceBytes": 430000, "compressedBytes": 9800, "sourceAccuracy": 0.97,
                       "compressedAccuracy": 0.965, "relativeAccuracyLoss": 0.005, "sourceLatencyMs": 0.4,
                       "compressedLatencyMs": 0.1}],
        "analysis": {
            "version": "1.0.1", "phase": "Running", "startedAt": t, "detectionBoundSeconds": 30.0, "message": "",
            "metrics": [{"name": "error-rate", "provider": "builtin", "query": "errorRate", "lastValue": 0.002,
                         "stableValue": 0.001, "verdict": "Successful", "message": "", "successes": 3, "failures": 0,
                         "inconclusive": 1, "errors": 0, "consecutiveErrors": 0, "lastMeasuredAt": t}],
        },
        "replicas": {"stable": 3, "candidate": 1, "ready": 4},
        "controls": {"promote": "1.0.1", "abort": "0.9.0", "retry": "1", "rollbackTo": "0.8.0"},
    }


def test_full_status_is_kept_and_shown_in_columns(cluster: Any, namespace: str) -> None:
    assert apply(cluster, namespace, digits()).returncode == 0
    status = full_status()
    cluster.kubectl("patch", "modeldeployment", "digits", "-n", namespace, "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": status}))
    stored = cluster.get("modeldeployment", "digits", namespace)
    assert stored is not None and stored["status"] == status
    table = cluster.kubectl("get", "md", "digits", "-n", namespace, "--no-headers",
                            "-o", "custom-columns=P:.status.phase").stdout.split()
    assert table == ["Progressing"]
    row = cluster.kubectl("get", "modeldeployments", "-n", namespace).stdout.splitlines()
    assert row[0].split() == ["NAME", "PHASE", "STABLE", "CANDIDATE", "READY", "DESIRED", "CURRENT", "AGE"]
    assert row[1].split()[:5] == ["digits", "Progressing", "1.0.0", "1.0.1", "False"]


INVALID_STATUS = [
    pytest.param({"phase": "Exploded"}, "status.phase", id="phase"),
    pytest.param({"conditions": [{"type": "Ready", "status": "Maybe"}]}, "status.conditions[0].status",
                 id="condition-status"),
    pytest.param({"history": [{"version": "1", "outcome": "Won"}]}, "status.history[0].outcome", id="outcome"),
    pytest.param({"stepStartedAt": "2026-01-02T03:04:05"}, "status.stepStartedAt", id="timestamp-without-zone"),
]


@pytest.mark.parametrize(("status", "field"), INVALID_STATUS)
def test_invalid_status_is_rejected(cluster: Any, namespace: str, status: dict[str, Any], field: str) -> None:
    assert apply(cluster, namespace, digits()).returncode == 0
    out = cluster.kubectl("patch", "modeldeployment", "digits", "-n", namespace, "--subresource=status",
                          "--type=merge", "-p", json.dumps({"status": status}), check=False)
    assert out.returncode != 0
    assert f"{field}:" in out.stderr, out.stderr


def test_status_is_not_written_through_the_main_resource(cluster: Any, namespace: str) -> None:
    body = copy.deepcopy(digits())
    body["status"] = {"phase": "Healthy"}
    assert apply(cluster, namespace, body).returncode == 0
    stored = cluster.get("modeldeployment", "digits", namespace)
    assert stored is not None and "status" not in stored


def test_explain_describes_the_analysis(cluster: Any) -> None:
    deadline = time.monotonic() + 30
    while True:  # the OpenAPI document is published a moment after the CRD is Established
        out = cluster.kubectl("explain", "modeldeployment.spec.rollout.analysis", check=False)
        if out.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert out.returncode == 0, out.stderr
    for text in ("initialDelay + (failureLimit + 1) x interval", "consecutiveErrorLimit", "noData", "metrics"):
        assert text in out.stdout


def test_short_names_and_category(cluster: Any, namespace: str) -> None:
    assert apply(cluster, namespace, digits()).returncode == 0
    for resource in ("md", "mds", "modeldeployment", "shipyard"):
        out = cluster.kubectl("get", resource, "-n", namespace, "-o", "name")
        assert out.stdout.strip() == "modeldeployment.shipyard.dev/digits", resource
