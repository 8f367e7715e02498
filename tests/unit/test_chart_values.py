"""The chart's files without Helm: generated files in sync with their sources, the values schema (strict, complete,
documented), and the generator's own behaviour."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.modules import load_file

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "shipyard"
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


def _load_sync() -> Any:
    return load_file("shipyard_sync_chart", REPO / "hack" / "sync-chart.py")


SYNC = _load_sync()


def object_nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every object schema with named properties, by its dotted values path."""
    if node.get("type") == "object" and "properties" in node:
        yield path, node
        for key, child in node["properties"].items():
            yield from object_nodes(child, f"{path}.{key}" if path else key)
    if node.get("type") == "array" and isinstance(node.get("items"), dict):
        yield from object_nodes(node["items"], f"{path}[]")


def leaves(values: Any, path: str = "") -> Iterator[str]:
    if isinstance(values, dict) and values:
        for key, child in values.items():
            yield from leaves(child, f"{path}.{key}" if path else key)
    else:
        yield path


def set_path(values: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(values))
    node = out
    for key in path.split("."):
        node = node.setdefault(key, {})
    node["unexpectedKey"] = value
    return out


# --- generated files ---------------------------------------------------------------------------------------------

def test_generated_files_are_in_sync_with_their_sources() -> None:
    out = subprocess.run([sys.executable, str(REPO / "hack" / "sync-chart.py"), "--check"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr


def test_check_fails_naming_a_stale_crd_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(SYNC, "CRD_TEMPLATES", tmp_path)
    source = next((REPO / "crds").glob("*.yaml"))
    (tmp_path / source.name).write_text(SYNC.build_crd_template(source.name, source.read_text()) + "# edited\n")
    (tmp_path / "removed-from-crds.yaml").write_text("kind: CustomResourceDefinition\n")
    assert SYNC.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert f"{source.name} is out of date" in err and "removed-from-crds.yaml has no source" in err


@pytest.mark.parametrize(("text", "expected"), [
    ("spec:\n  description: query with {{version}}\n", 'query with {{ "{{" }}version}}'),
    ("spec:\n  rule: \"self.contains('{{x}}')\"\n", "self.contains('{{ \"{{\" }}x}}')"),
    ("spec:\n  plain: no braces here\n", "plain: no braces here"),
], ids=["description", "cel-rule", "untouched"])
def test_crd_template_escapes_template_delimiters(text: str, expected: str) -> None:
    head = "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: x.example\n"
    out = SYNC.build_crd_template("x.yaml", head + text)
    assert expected in out
    assert out.startswith("{{- /* Generated") and "{{- if .Values.crds.install }}" in out
    assert "helm.sh/resource-policy: keep" in out and out.rstrip().endswith("{{- end }}")


def test_crd_template_refuses_other_kinds() -> None:
    with pytest.raises(ValueError, match="not a CustomResourceDefinition"):
        SYNC.build_crd_template("x.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\nspec: {}\n")


# --- the values schema -------------------------------------------------------------------------------------------

def test_default_values_satisfy_the_schema() -> None:
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    jsonschema.validate(VALUES, SCHEMA)


def test_every_object_rejects_unknown_keys() -> None:
    loose = [path or "<root>" for path, node in object_nodes(SCHEMA)
             if node.get("additionalProperties") is not False and not node.get("x-passthrough")]
    assert loose == []


@pytest.mark.parametrize("path", [p for p, _ in object_nodes(SCHEMA) if "[]" not in p and p],
                         ids=lambda p: p)
def test_an_unknown_key_is_rejected_naming_it(path: str) -> None:
    errors = list(jsonschema.Draft7Validator(SCHEMA).iter_errors(set_path(VALUES, path, 1)))
    assert errors and any("'unexpectedKey' was unexpected" in e.message for e in errors), [e.message for e in errors]


def test_every_value_has_a_description_and_a_readme_row() -> None:
    readme = (CHART / "README.md").read_text()
    documented = {row[0] for row in SYNC.build_values_rows(SCHEMA, VALUES)}
    for leaf in leaves(VALUES):
        covered = any(leaf == d or leaf.startswith(d + ".") for d in documented)
        assert covered, f"{leaf} has no row in the values table"
    for key, _kind, _default, description in SYNC.build_values_rows(SCHEMA, VALUES):
        assert description, f"{key} has no description in values.schema.json"
        assert f"| `{key}` |" in readme, f"{key} is missing from charts/shipyard/README.md"


@pytest.mark.parametrize(("override", "path"), [
    ({"replicaCount": -1}, "replicaCount"),
    ({"image": {**VALUES["image"], "pullPolicy": "Sometimes"}}, "image.pullPolicy"),
    ({"watchNamespaces": ["Not_A_Namespace"]}, "watchNamespaces.0"),
    ({"operator": {**VALUES["operator"], "metricsPort": 70000}}, "operator.metricsPort"),
    ({"podDisruptionBudget": {"enabled": True, "minAvailable": "half"}}, "podDisruptionBudget.minAvailable"),
], ids=["negative-replicas", "pull-policy", "namespace-name", "port-range", "pdb-percentage"])
def test_wrong_values_are_rejected_at_their_path(override: dict[str, Any], path: str) -> None:
    errors = list(jsonschema.Draft7Validator(SCHEMA).iter_errors({**VALUES, **override}))
    assert [".".join(str(p) for p in e.absolute_path) for e in errors] == [path]
