"""The files of examples/ as the tests read them (reads files, nothing else).

An example holds one ModelDeployment, and may hold, as further YAML documents, the objects it needs that are not
Shipyard's (examples/digits-gateway.yaml: its HTTPRoute)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PATHS = sorted((REPO / "examples").glob("*.yaml"))
MODEL_DEPLOYMENT = "ModelDeployment"


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Every document of the file, in order."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def load_model_deployment(path: Path) -> dict[str, Any]:
    """The file's one ModelDeployment."""
    (body,) = [d for d in load_documents(path) if d.get("kind") == MODEL_DEPLOYMENT]
    return body


def load_others(path: Path) -> list[dict[str, Any]]:
    """The file's other objects (not ModelDeployments), in order."""
    return [d for d in load_documents(path) if d.get("kind") != MODEL_DEPLOYMENT]
