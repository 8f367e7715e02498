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

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def load(path: Path) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load(path.read_text())
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
COMPILED = {"aotInductor": True, "maxBatchSize": 256, "maxAutotune": True}


@pytest.mark.parametrize(("path", "compiled"), [
    *[pytest.param(p, None, id=p.stem) for p in WITH_COMPRESSION],
    *[pytest.param(p, COMPILED, id=f"{p.stem}-compiled") for p in WITH_COMPRESSION],
])
def test_compression_jobs_run_a_config_the_runtime_accepts(path: Path, compiled: dict[str, Any] | None) -> None:
    body = load(path)
    if compiled is not None:
        body["spec"]["compression"]["compiled"] = compiled
    md = spec_mod.parse_model_deployment(body)
    assert md.spec.compression is not None
    meta = objects.build_meta(body)
    key = objects.build_artifact_key(md.spec.image, spec_mod.build_recipe(md.spec.compression))
    config_map, job = objects.build_compression_objects(md, meta, md.spec.version, key)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == [contract.RUNTIME_COMMAND, contract.COMPRESS_SUBCOMMAND]
    assert cli.SUBCOMMANDS[contract.COMPRESS_SUBCOMMAND][0] == "shipyard.runtime.compress"
    config_path = container["command"][container["command"].index("--config") + 1]
    mount = next(m for m in container["volumeMounts"] if config_path.startswith(m["mountPath"]))
    assert config_path == f"{mount['mountPath']}/{contract.COMPRESSION_CONFIG_FILE}"
    document = yaml.safe_load(config_map["data"][contract.COMPRESSION_CONFIG_FILE])
    config = recipe.build_config(document)
    assert str(config.output) == objects.build_artifact_path(meta, key)
    assert str(config.source) == md.spec.model.path
    assert len(config.steps) == len(md.spec.compression.steps)
    want = md.spec.compression.compiled
    assert config.compiled.aot_inductor is want.aot_inductor is (compiled is not None)
    if compiled is not None:  # the runtime builds the package the spec asked for
        assert (config.compiled.max_batch_size, config.compiled.max_autotune) == (256, True)
    assert container["terminationMessagePath"] == contract.TERMINATION_LOG
