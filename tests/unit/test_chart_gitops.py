"""The GitOps examples in deploy/ stay consistent with the chart: their values satisfy values.schema.json, their
paths exist, and they use the API versions Argo CD and Flux serve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((REPO / "charts" / "shipyard" / "values.schema.json").read_text())


def docs(path: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((REPO / path).read_text()) if d]


def chart_values() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for app in docs("deploy/argocd/application.yaml"):
        helm = app["spec"]["source"].get("helm")
        if helm:
            found.append((f"argocd/{app['metadata']['name']}", helm["valuesObject"]))
    for release in docs("deploy/flux/helmrelease.yaml"):
        if release["kind"] == "HelmRelease":
            found.append((f"flux/{release['metadata']['name']}", release["spec"]["values"]))
    return found


@pytest.mark.parametrize(("where", "values"), chart_values(), ids=[w for w, _ in chart_values()])
def test_example_values_satisfy_the_chart_schema(where: str, values: dict[str, Any]) -> None:
    jsonschema.validate(values, SCHEMA)


def test_examples_point_at_the_chart_and_use_served_api_versions() -> None:
    kinds = {(d["apiVersion"], d["kind"]) for f in ("deploy/argocd/application.yaml", "deploy/flux/helmrelease.yaml",
                                                    "deploy/flux/kustomization-models.yaml") for d in docs(f)}
    assert kinds == {("argoproj.io/v1alpha1", "Application"), ("source.toolkit.fluxcd.io/v1", "GitRepository"),
                     ("helm.toolkit.fluxcd.io/v2", "HelmRelease"), ("kustomize.toolkit.fluxcd.io/v1", "Kustomization")}
    (app,) = [a for a in docs("deploy/argocd/application.yaml") if a["metadata"]["name"] == "shipyard"]
    assert (REPO / app["spec"]["source"]["path"] / "Chart.yaml").exists()
    assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]
    (release,) = [r for r in docs("deploy/flux/helmrelease.yaml") if r["kind"] == "HelmRelease"]
    assert (REPO / release["spec"]["chart"]["spec"]["chart"] / "Chart.yaml").exists()
    (models,) = [k for k in docs("deploy/flux/kustomization-models.yaml") if k["kind"] == "Kustomization"]
    assert models["spec"]["wait"] is True
