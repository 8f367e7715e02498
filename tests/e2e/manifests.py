"""The e2e variant of examples/digits.yaml (pure), also printed for `make demo`:

    python -m tests.e2e.manifests TAG [--namespace NS] [--accuracy]    # the ModelDeployment as YAML

Changes to the example, so that a whole rollout fits a few minutes on 2 shared cores:
- 3 replicas with a CPU limit of 1 (the runtime sizes its torch threads from it) instead of 4 unlimited;
- canary steps of 30% and 60% (1 then 2 of 3 pods) with 4 s pauses instead of 60 s;
- analysis every 2 s (worst-case detection 0 + (1 + 1) x 2 = 4 s) instead of 15 s; p99 latency checked against an
  absolute 0.5 s only (comparing with the stable on a shared 2-core machine is noise);
- the compression recipe of examples/models/digits.compression.yaml (structured 70% + global 80% pruning, each
  fine-tuned, then int8): the example's one-shot 90% global prune with 2 fine-tuning epochs fails its own 1%
  accuracy gate on the digits model the catalogue builds.

`build_digits_accuracy` is the variant of the accuracy scenario: no compression (the image's model is served as it
is), and besides the error rate a `job` metric that scores the candidate's own Service with `shipyard-runtime
evaluate` on the digits eval split, in the digits image, and needs an accuracy of ACCURACY_MIN.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
IMAGE_REPOSITORY = "registry.example/shipyard/digits-model"
ARTIFACTS_PVC = "shipyard-artifacts"
ANALYSIS_INTERVAL_S = 2
FAILURE_LIMIT = 1
INITIAL_DELAY_S = 0
ACCURACY_MIN = 0.9
EVALUATION_SAMPLES = 450  # the whole eval split of builtin:digits
EVALUATION_IMAGE_TAG = "1.0.0"  # the image the accuracy Job runs in: the runtime (its model is not used)


def build_digits(tag: str, namespace: str | None = None) -> dict[str, Any]:
    example = yaml.safe_load((REPO / "examples" / "digits.yaml").read_text())
    md = copy.deepcopy(example)
    if namespace:
        md["metadata"]["namespace"] = namespace
    spec = md["spec"]
    spec["image"] = f"{IMAGE_REPOSITORY}:{tag}"
    spec["compression"]["steps"] = [
        {"prune": {"amount": 0.7, "scope": "structured", "norm": 2, "fineTuneEpochs": 20}},
        {"prune": {"amount": 0.8, "scope": "global", "fineTuneEpochs": 20}},
        {"quantize": {"scheme": "int8-dynamic"}},
    ]
    spec["compression"]["artifacts"] = {"pvc": ARTIFACTS_PVC}
    spec["serving"]["replicas"] = 3
    spec["serving"]["resources"] = {"requests": {"cpu": "100m", "memory": "256Mi"},
                                    "limits": {"cpu": "1", "memory": "1Gi"}}
    spec["rollout"]["steps"] = [{"weight": 30, "pause": "4s"}, {"weight": 60, "pause": "4s"}]
    spec["rollout"]["startupTimeoutSeconds"] = 300
    analysis = spec["rollout"]["analysis"]
    analysis["interval"] = f"{ANALYSIS_INTERVAL_S}s"
    analysis["initialDelay"] = f"{INITIAL_DELAY_S}s"
    analysis["failureLimit"] = FAILURE_LIMIT
    analysis["metrics"] = [
        {"name": "error-rate", "builtin": "errorRate", "max": 0.01},
        {"name": "p99-latency", "builtin": "latencyP99", "max": 0.5},
    ]
    return md


def build_digits_accuracy(tag: str, namespace: str | None = None) -> dict[str, Any]:
    """`build_digits` without compression, analysed by its error rate and by the accuracy a Job measures (pure)."""
    md = build_digits(tag, namespace)
    spec = md["spec"]
    del spec["compression"]
    spec["rollout"]["analysis"]["metrics"] = [
        {"name": "error-rate", "builtin": "errorRate", "max": 0.01},
        {"name": "accuracy", "min": ACCURACY_MIN, "job": {
            "activeDeadlineSeconds": 120,
            "template": {"spec": {
                "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001},
                "containers": [{
                    "name": "evaluate",
                    "image": f"{IMAGE_REPOSITORY}:{EVALUATION_IMAGE_TAG}",
                    # The endpoint, model name and the stable's endpoint come from the operator's env.
                    "command": ["shipyard-runtime", "evaluate", "--dataset", "builtin:digits",
                                "--samples", str(EVALUATION_SAMPLES)],
                    "resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                                  "limits": {"cpu": "1", "memory": "1Gi"}},
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                }],
            }},
        }},
    ]
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tag")
    parser.add_argument("--namespace")
    parser.add_argument("--accuracy", action="store_true", help="the accuracy scenario's variant")
    args = parser.parse_args(argv)
    build = build_digits_accuracy if args.accuracy else build_digits
    sys.stdout.write(yaml.safe_dump(build(args.tag, args.namespace), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
