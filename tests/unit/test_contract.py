"""The operator and the runtime agree: what the operator puts in pods and Jobs, the runtime's own parsers accept.

The operator never imports the runtime (no torch in its image); this test is the one place both meet, so a
renamed flag, env variable or recipe key on either side fails here rather than in a cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from shipyard import contract
from shipyard.operator import objects, planning
from shipyard.operator import spec as spec_mod
from shipyard.runtime import cli, recipe
from shipyard.runtime.server import settings
from tests import examples

# Examples served by Shipyard's own server (a spec.serving.runtime example runs another server: test_runtimes.py).
EXAMPLES = [p for p in examples.PATHS
            if "runtime" not in (examples.load_model_deployment(p)["spec"].get("serving") or {})]


def load(path: Path) -> dict[str, Any]:
    body = examples.load_model_deployment(path)
    body["metadata"].update(namespace="ml", uid="uid-1", generation=1)
    return body


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_serving_pods_start_the_runtime_server_with_flags_and_env_it_accepts(path: Path) -> None:
    body = load(path)
    md = spec_mod.parse_model_deployment(body)
    dep = planning.build_deployment(objects.build_meta(body), md, md.spec.version, md.spec.image, 2,
                                    artifact_path="/artifacts/ml/x/key")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[0] == contract.RUNTIME_COMMAND and command[1] in cli.SUBCOMMANDS
    assert cli.SUBCOMMANDS[command[1]][0] == "shipyard.runtime.server.lifecycle"
    env = {e["name"]: e["value"] for e in container["env"]}
    config = settings.build_config(command[2:], env)
    assert config.port == contract.SERVING_PORT
    assert config.model_name == md.served_model_name
    assert config.model_version == md.spec.version
    assert config.max_batch_size == md.spec.serving.batching.max_batch_size
    assert str(config.artifact) == "/artifacts/ml/x/key"
    port_names = {p["name"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["port"] in port_names


WITH_COMPRESSION = [p for p in EXAMPLES if "compression" in load(p)["spec"]]


@pytest.mark.parametrize(("mode", "artifact", "env_value", "served"), [
    pytest.param("auto", "/artifacts/ml/x/key", None, "auto", id="auto-is-the-servers-default-not-written"),
    pytest.param("on", "/artifacts/ml/x/key", "on", "on", id="on-pins-the-package"),
    pytest.param("off", "/artifacts/ml/x/key", "off", "off", id="off-pins-the-eager-model"),
    pytest.param("off", None, None, "auto", id="no-artifact-no-pin"),
])
def test_the_compiled_mode_reaches_the_server_as_its_pin(mode: str, artifact: str | None, env_value: str | None,
                                                        served: str) -> None:
    body = load(WITH_COMPRESSION[0])
    body["spec"]["compression"]["compiled"] = {"mode": mode}
    md = spec_mod.parse_model_deployment(body)
    dep = planning.build_deployment(objects.build_meta(body), md, md.spec.version, md.spec.image, 2,
                                    artifact_path=artifact)
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env.get(contract.ENV_COMPILED) == env_value
    assert settings.build_config(container["command"][2:], env).compiled == served
COMPILED = {"aotInductor": True, "maxBatchSize": 256, "maxAutotune": True}
# Every recipe field set, none to its default, so that a field the operator drops or renames cannot pass unnoticed.
FULL_RECIPE: dict[str, Any] = {
    "steps": [
        {"prune": {"amount": 0.7, "scope": "structured", "norm": 1, "fineTuneEpochs": 2, "lr": 0.005,
                   "batchSize": 32}},
        {"prune": {"amount": 0.5, "scope": "global", "fineTuneEpochs": 1, "lr": 0.02, "batchSize": 16}},
        {"distill": {"student": "pkg.students:mlp", "studentKwargs": {"hidden": 16, "layers": [32, 16], "dropout": 0.1,
                                                                      "act": "relu", "bias": False},
                     "temperature": 2.5, "alpha": 0.7, "epochs": 3, "lr": 0.002, "batchSize": 128}},
        {"quantize": {"scheme": "int8-dynamic"}},
        {"quantize": {"scheme": "int8-embedding"}},
    ],
    "evaluation": {"dataset": "pkg.data:load", "maxRelativeAccuracyLoss": 0.02, "samples": 500,
                   "maxRelativeLoss": {"accuracy": 0.03, "nn_agreement": 0.05}},
    "compiled": {**COMPILED, "mode": "on"},
}
CUDA_RECIPE: dict[str, Any] = {
    "steps": [{"quantize": {"scheme": "fp8"}}],
    "resources": {"limits": {"nvidia.com/gpu": "1"}},
}


@pytest.mark.parametrize(("path", "recipe_fields"), [
    *[pytest.param(p, None, id=p.stem) for p in WITH_COMPRESSION],
    *[pytest.param(p, {"compiled": COMPILED}, id=f"{p.stem}-compiled") for p in WITH_COMPRESSION],
    pytest.param(WITH_COMPRESSION[0], FULL_RECIPE, id="every-recipe-field"),
    pytest.param(WITH_COMPRESSION[0], CUDA_RECIPE, id="cuda-scheme"),
])
def test_compression_jobs_run_a_config_the_runtime_accepts(path: Path, recipe_fields: dict[str, Any] | None) -> None:
    body = load(path)
    if recipe_fields is not None:
        body["spec"]["compression"].update(recipe_fields)
    if recipe_fields is CUDA_RECIPE:  # a CUDA-only artifact is served by GPU pods (refused otherwise)
        body["spec"]["serving"]["resources"] = {"limits": {"nvidia.com/gpu": 1}}
    md = spec_mod.parse_model_deployment(body)
    compression = md.spec.compression
    assert compression is not None
    meta = objects.build_meta(body)
    key = objects.build_artifact_key(md.spec.image, compression.build_recipe())
    config_map, job = objects.build_compression_objects(md, meta, md.spec.version, key)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == [contract.RUNTIME_COMMAND, contract.COMPRESS_SUBCOMMAND]
    assert cli.SUBCOMMANDS[contract.COMPRESS_SUBCOMMAND][0] == "shipyard.runtime.compress"
    config_path = container["command"][container["command"].index("--config") + 1]
    mount = next(m for m in container["volumeMounts"] if config_path.startswith(m["mountPath"]))
    assert config_path == f"{mount['mountPath']}/{contract.COMPRESSION_CONFIG_FILE}"
    volume = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    # a read-only root filesystem, and TorchInductor compiles the package under /tmp: an emptyDir there
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert {"name": tmp["name"], "emptyDir": {}} in job["spec"]["template"]["spec"]["volumes"]
    document = yaml.safe_load(config_map["data"][contract.COMPRESSION_CONFIG_FILE])
    config = recipe.build_config(document)  # refuses unknown fields: a key the runtime does not know fails here
    assert str(config.output) == objects.build_artifact_path(meta, key)
    assert str(config.source) == md.spec.model.path
    assert config.name == md.served_model_name
    assert config.reuse_existing is True  # the operator's Jobs are retried; an artifact already there is reused
    assert config.termination_log == container["terminationMessagePath"] == contract.TERMINATION_LOG
    # the runtime runs the recipe the spec asked for, every field of it
    assert list(config.steps) == list(compression.steps)
    assert config.evaluation == compression.evaluation
    assert config.compiled == compression.compiled
    assert config.compiled.aot_inductor is (recipe_fields is not None and "compiled" in recipe_fields)
    if recipe_fields is not None:  # what the user wrote reaches the runtime as written
        for name in ("steps", "evaluation", "compiled"):
            if name in recipe_fields:
                written = getattr(config, name)
                dumped = ([s.model_dump(mode="json", exclude_none=True) for s in written] if name == "steps" else
                          written.model_dump(mode="json", exclude_none=True))
                expected = {"mode": "auto", **recipe_fields[name]} if name == "compiled" else recipe_fields[name]
                assert dumped == expected, name
    # mode auto (the runtime's default) is left out of the file, so that runtime images from before the field
    # accept the configs of recipes that do not set it
    assert ("mode" in document["compiled"]) is (config.compiled.mode != "auto")
    cuda = compression.needs_cuda
    assert bool(recipe.assess_device(config.steps, cuda_available=False)) is cuda
    assert recipe.assess_device(config.steps, cuda_available=True, compiled=config.compiled) == []
    assert recipe.assess_device(config.steps, cuda_available=True) == []
