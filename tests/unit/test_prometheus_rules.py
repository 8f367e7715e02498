"""The PrometheusRule (deploy/prometheus/rules.yaml) and the Grafana dashboard (deploy/grafana/shipyard-dashboard.json)
with promtool from Debian's `prometheus` package: every expression parses, each alert fires on sample series (and
stays silent on healthy ones) under `promtool test rules`, and every metric name used is one the operator or the
runtime exports (operator/metrics.py, operator/contract.py, runtime/metrics.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = yaml.safe_load((REPO / "deploy" / "prometheus" / "rules.yaml").read_text())
DASHBOARD = json.loads((REPO / "deploy" / "grafana" / "shipyard-dashboard.json").read_text())
PROMTOOL = shutil.which("promtool")
SOURCES = ("operator/shipyard/operator/metrics.py", "contract/shipyard/contract/__init__.py",
           "runtime/shipyard/runtime/metrics.py")
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
            "inf", "nan"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def build_exported_names() -> set[str]:
    """Metric names exported by Shipyard's code (string literals that name metrics in the metric modules)."""
    names: set[str] = set()
    for source in SOURCES:
        names |= set(re.findall(r'"((?:shipyard|http)_[a-z0-9_]+)"', (REPO / source).read_text()))
    return names


def build_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a small tokenizer: strings, label matchers, ranges, grouping
    clauses, functions, keywords and numbers are removed; what is left are metric names)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"(?<![A-Za-z0-9_:.])[0-9][0-9.]*(?:e[+-]?[0-9]+)?(?:ms|[smhdwy])?\b", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word, after = match.group(0), text[match.end():].lstrip()[:1]
        if after == "(" or word.lower() in KEYWORDS:
            continue
        names.add(word)
    return names


def assess_unknown_names(names: set[str], exported: set[str]) -> set[str]:
    known = exported | {n + s for n in exported for s in HISTOGRAM_SUFFIXES}
    return {n for n in names if n not in known}


def rule_exprs() -> list[tuple[str, str]]:
    return [(r["alert"], r["expr"]) for g in RULES["spec"]["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[tuple[str, str]]:
    found = []
    for panel in DASHBOARD["panels"]:
        for target in panel.get("targets") or []:
            found.append((f"{panel['title']} {target['refId']}", target["expr"]))
    for variable in DASHBOARD["templating"]["list"]:
        if variable["type"] == "query":
            inner = re.fullmatch(r"label_values\((\w+),\s*\w+\)", variable["query"]["query"])
            assert inner, variable["query"]
            found.append((f"variable {variable['name']}", inner.group(1)))
    return found


def build_grafana_free(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced by what Prometheus could parse."""
    for name, value in (("$__rate_interval", "5m"), ("$__range", "1h"), ("$model", ".*"), ("$namespace", ".*")):
        expr = expr.replace(name, value)
    return expr


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL, "promtool is needed (apt-get install prometheus)"
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd, timeout=60)


# --- parsing -------------------------------------------------------------------------------------------------------

def test_rule_group_passes_promtool_check(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": RULES["spec"]["groups"]}))
    out = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 4 rules found" in out.stdout


def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    rules = [{"record": f"dashboard:expr_{i}", "expr": build_grafana_free(e)} for i, (_, e) in
             enumerate(dashboard_exprs())]
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = promtool("check", "rules", "dashboard.yaml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_rejects_a_broken_expression(tmp_path: Path) -> None:
    """The check above can fail: promtool refuses a malformed expression."""
    group = {"name": "g", "rules": [{"alert": "X", "expr": "sum by (namespace (shipyard_model_ready)"}]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"groups": [group]}))
    assert promtool("check", "rules", "bad.yaml", cwd=tmp_path).returncode != 0


# --- metric names --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("where", "expr"), rule_exprs() + dashboard_exprs(),
                         ids=[w for w, _ in rule_exprs() + dashboard_exprs()])
def test_every_metric_name_is_exported_by_shipyard(where: str, expr: str) -> None:
    names = build_metric_names(build_grafana_free(expr))
    assert names, f"{where}: no metric found in {expr!r}"
    assert assess_unknown_names(names, build_exported_names()) == set()


@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (version, code) (rate(shipyard_requests_total{model=~".*", code=~"5.."}[5m]))',
     {"shipyard_requests_total"}),
    ('histogram_quantile(0.99, sum by (le) (rate(foo_seconds_bucket[5m]))) > 0.25', {"foo_seconds_bucket"}),
    ('a unless on (namespace, name) label_replace(max by (namespace, model) (b == 1), "name", "$1", "model", "(.*)")',
     {"a", "b"}),
    ("increase(x_total[10m]) > 0 and bool y offset 5m", {"x_total", "y"}),
], ids=["matchers-and-grouping", "histogram", "label-replace", "keywords"])
def test_metric_name_extraction(expr: str, names: set[str]) -> None:
    assert build_metric_names(expr) == names


def test_unknown_names_are_caught() -> None:
    exported = build_exported_names()
    assert {"shipyard_operator_rollbacks_total", "shipyard_requests_total", "shipyard_model_ready",
            "http_request_duration_seconds", "shipyard_gpu_utilization_ratio"} <= exported
    assert assess_unknown_names({"shipyard_request_duration_seconds_bucket", "shipyard_requests_totall",
                                 "kube_deployment_status_replicas_ready"}, exported) == {
        "shipyard_requests_totall", "kube_deployment_status_replicas_ready"}


# --- alerts fire -----------------------------------------------------------------------------------------------------

def expected_alert(alert: str, severity: str, namespace: str = "ml", name: str = "digits") -> dict[str, Any]:
    (rule,) = [r for g in RULES["spec"]["groups"] for r in g["rules"] if r.get("alert") == alert]

    def render(text: str) -> str:
        return text.replace("{{ $labels.namespace }}", namespace).replace("{{ $labels.name }}", name)

    return {"exp_labels": {"severity": severity, "namespace": namespace, "name": name},
            "exp_annotations": {k: render(v) for k, v in rule["annotations"].items()}}


def phase_series(phase: str, values: str, namespace: str = "ml", name: str = "digits") -> dict[str, str]:
    return {"series": f'shipyard_operator_modeldeployment_phase{{namespace="{namespace}",name="{name}",'
                      f'shipyard_operator_modeldeployment_phase="{phase}"}}', "values": values}


TESTS = [
    {"name": "a rollback fires, a quiet counter does not",
     "input_series": [
         {"series": 'shipyard_operator_rollbacks_total{namespace="ml",name="digits"}', "values": "0 0 1 1 1"},
         {"series": 'shipyard_operator_rollbacks_total{namespace="ml",name="quiet"}', "values": "2 2 2 2 2"}],
     "alert_rule_test": [{"eval_time": "4m", "alertname": "ShipyardRollbackHappened",
                          "exp_alerts": [expected_alert("ShipyardRollbackHappened", "warning")]}]},
    {"name": "paused with only inconclusive verdicts for 15 minutes fires; with a success it does not",
     "input_series": [
         phase_series("Paused", "1x40"),
         {"series": 'shipyard_operator_analysis_verdicts_total{namespace="ml",name="digits",metric="error-rate",'
                    'verdict="Inconclusive"}', "values": "0+1x40"},
         phase_series("Paused", "1x40", name="measured"),
         {"series": 'shipyard_operator_analysis_verdicts_total{namespace="ml",name="measured",metric="error-rate",'
                    'verdict="Inconclusive"}', "values": "0+1x40"},
         {"series": 'shipyard_operator_analysis_verdicts_total{namespace="ml",name="measured",metric="latency",'
                    'verdict="Successful"}', "values": "0+1x40"}],
     "alert_rule_test": [
         {"eval_time": "10m", "alertname": "ShipyardAnalysisInconclusiveTooLong", "exp_alerts": []},
         {"eval_time": "35m", "alertname": "ShipyardAnalysisInconclusiveTooLong",
          "exp_alerts": [expected_alert("ShipyardAnalysisInconclusiveTooLong", "warning")]}]},
    {"name": "phase Failed fires after a minute; Healthy does not",
     "input_series": [phase_series("Failed", "0 1 1 1 1"), phase_series("Failed", "0 0 0 0 0", name="fine"),
                      phase_series("Healthy", "1 1 1 1 1", name="fine")],
     "alert_rule_test": [{"eval_time": "4m", "alertname": "ShipyardCompressionFailed",
                          "exp_alerts": [expected_alert("ShipyardCompressionFailed", "warning")]}]},
    {"name": "no ready pod for 5 minutes fires; a ready pod of the model keeps it silent",
     "input_series": [
         phase_series("Healthy", "1x20"),
         {"series": 'shipyard_model_ready{namespace="ml",model="digits",version="1.0.0",pod="a"}', "values": "0x20"},
         phase_series("Healthy", "1x20", name="served"),
         {"series": 'shipyard_model_ready{namespace="ml",model="served",version="1.0.0",pod="b"}', "values": "1x20"},
         {"series": 'shipyard_model_ready{namespace="ml",model="served",version="1.0.0",pod="c"}', "values": "0x20"}],
     "alert_rule_test": [
         {"eval_time": "3m", "alertname": "ShipyardNoReadyReplicas", "exp_alerts": []},
         {"eval_time": "10m", "alertname": "ShipyardNoReadyReplicas",
          "exp_alerts": [expected_alert("ShipyardNoReadyReplicas", "critical")]}]},
]


@pytest.mark.parametrize("case", TESTS, ids=[t["name"].split(",")[0].replace(" ", "-") for t in TESTS])
def test_alert_fires_on_sample_series(tmp_path: Path, case: dict[str, Any]) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": RULES["spec"]["groups"]}))
    (tmp_path / "test.yaml").write_text(yaml.safe_dump({
        "rule_files": ["rules.yaml"], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": case["input_series"],
                   "alert_rule_test": case["alert_rule_test"]}]}))
    out = promtool("test", "rules", "test.yaml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_firing_test() -> None:
    fired = {t["alertname"] for case in TESTS for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert fired == {alert for alert, _ in rule_exprs()}
    assert {"rollback", "inconclusive", "compression", "ready"} <= {
        word for alert in fired for word in ("rollback", "inconclusive", "compression", "ready")
        if word in alert.lower()}


# --- dashboard shape -----------------------------------------------------------------------------------------------

def test_dashboard_panels_are_well_formed() -> None:
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in DASHBOARD["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"]
    assert {v["name"] for v in DASHBOARD["templating"]["list"]} == {"datasource", "namespace", "model"}
    titles = " ".join(p["title"] for p in DASHBOARD["panels"])
    for word in ("Requests", "Error", "Latency", "Ready", "batch", "Phase", "Rollbacks", "verdicts", "Reconcile"):
        assert word in titles
