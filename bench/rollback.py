"""Rollback benchmark (issue 8): time from a bad version's first failing request to the stable serving all traffic.

Does I/O: starts the e2e stack of tests/e2e/conftest.py (local control plane, the node agent running pods as real
processes, Debian's Prometheus with 1 s scrapes, the operator as a subprocess with ``--prometheus-address``), so it
needs root like the e2e tier. The stack is the e2e fixture itself, entered as a context manager; only its pod IP
prefix (127.0.12, so that a concurrent e2e run on 127.0.11 is not disturbed) and its log folder are changed.

The ModelDeployment is the e2e one (tests/e2e/manifests.py: 3 replicas, canary steps 30%/60%, failureLimit 1,
initialDelay 0) without compression (the stable serves the image's model as is) and with the builtin errorRate
(max 0.01) as its only metric, so that the error detection alone decides. The stable ``1.0.0`` serves 20 requests/s
(tests/e2e/loadgen.py: a new connection per request through the node agent's Service proxy). Each run applies a
new bad tag ``1.2.<n>-bad`` (the image catalogue gives ``*-bad`` tags ``SHIPYARD_FAULT_ERROR_RATE=0.5``) with the
run's analysis interval, and measures, on the client's clock:

- first failure: the end of the first failed response (HTTP 500 from a canary pod, attributed through the proxy's
  conntrack.jsonl as scenario 3 does);
- stable serves all traffic: the later of the last response answered by a canary pod and the last connection the
  proxy forwarded to a canary pod (the proxy drops a pod from the Service's endpoints once it is terminating).
  The run then checks that every canary pod is terminating or gone and that 3 s more of traffic reach the stable
  only;
- measured = stable serves all traffic - first failure, next to the analytic bound
  ``initialDelay + (failureLimit + 1) x interval`` (status.analysis.detectionBoundSeconds). Target: measured <=
  bound + 5 s, counted per interval on the slowest of its repetitions;
- the operator-side split: first failure -> decision (the first poll, every 0.25 s, that reads phase RolledBack)
  and decision -> stable serves all traffic;
- what Prometheus made of the first errors (``fetch_prometheus_view``): the canary's 5xx counted before its 5xx
  series' first stored sample (invisible to rate()), and how long after the first failure the operator's builtin
  errorRate query first reads above its max when evaluated over Prometheus (query_range, 0.1 s steps).

Runs are interleaved (every interval once, then the second repetition...) and a run is skipped when it would not
fit ``--budget-s``. ``--label`` names the variant of the code under test (e.g. ``before``/``after`` a runtime
change): bench/results/rollback.json keeps one entry per label, and records whether the runtime pre-creates its
5xx series.

    OMP_NUM_THREADS=1 .venv/bin/python bench/rollback.py [--intervals 5,10,30] [--repetitions 2] [--label after]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.e2e is imported from the checkout

from lightkube.resources.core_v1 import Pod  # noqa: E402

from shipyard import contract  # noqa: E402
from shipyard.operator import analysis, naming  # noqa: E402
from tests.e2e import conftest as e2e_stack  # noqa: E402
from tests.e2e import loadgen, manifests  # noqa: E402
from tests.e2e import test_rollout as scenarios  # noqa: E402
from tests.integration.conftest import wait_until  # noqa: E402

RESULTS = REPO / "bench" / "results" / "rollback.json"
MODEL = scenarios.MODEL
STABLE = "1.0.0"
POD_IP_PREFIX = "127.0.12"
LOAD_RATE = 20.0
SLACK_S = 5.0  # target: measured <= bound + SLACK_S
SETTLE_S = 3.0  # traffic kept after the canary left the endpoints, to check the stable answers everything
RUN_OVERHEAD_S = 40.0  # canary start, drain and settle beyond the bound, for the budget


def build_md(tag: str, interval_s: float) -> dict[str, Any]:
    """The e2e ModelDeployment for ``tag`` without compression, errorRate only, analysis every ``interval_s``."""
    md = manifests.build_digits(tag)
    spec = md["spec"]
    del spec["compression"]
    spec["rollout"]["analysis"]["interval"] = f"{interval_s:g}s"
    spec["rollout"]["analysis"]["metrics"] = [{"name": "error-rate", "builtin": "errorRate", "max": 0.01}]
    return md


def build_bound(interval_s: float) -> float:
    return analysis.build_detection_bound_seconds(manifests.INITIAL_DELAY_S, manifests.FAILURE_LIMIT, interval_s)


def assess_run(results: list[loadgen.Result], conntrack: list[dict[str, Any]], pod_versions: dict[str, str],
               tag: str, since: float) -> dict[str, Any]:
    """The client-side figures of one run from its requests and the proxy's connection log (pure)."""
    attributed = scenarios.attribute(results, conntrack, pod_versions)
    canary_pods = {pod for pod, version in pod_versions.items() if version == tag}
    canary = [(r, pod) for r, pod, version in attributed if version == tag]
    failed = [r for r, _pod, _version in attributed if r.failed]
    canary_failed = [r for r, _pod in canary if r.failed]
    forwards = [float(e["t"]) for e in conntrack if e.get("pod") in canary_pods and float(e["t"]) >= since]
    first_failure = min((r.finished for r in canary_failed), default=None)
    last_response = max((r.finished for r, _pod in canary), default=None)
    last_forward = max(forwards, default=None)
    back = max((t for t in (last_response, last_forward) if t is not None), default=None)
    return {
        "requests": len(results),
        "counts": scenarios.count_by_version(attributed),
        "canaryRequests": len(canary),
        "canaryFailed": len(canary_failed),
        "otherFailed": len(failed) - len(canary_failed),
        "firstCanaryResponse": min((r.started for r, _pod in canary), default=None),
        "firstFailure": first_failure,
        "lastCanaryResponse": last_response,
        "lastCanaryForward": last_forward,
        "stableServesAll": back,
    }


def assess_targets(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per interval: the slowest measured run against bound + SLACK_S (a run without a figure misses) (pure)."""
    out = []
    for interval in sorted({r["intervalSeconds"] for r in runs}):
        mine = [r for r in runs if r["intervalSeconds"] == interval]
        measured = [r["measuredSeconds"] for r in mine]
        worst = None if any(m is None for m in measured) else max(measured)
        bound = mine[0]["boundSeconds"]
        out.append({"intervalSeconds": interval, "boundSeconds": bound, "repetitions": len(mine),
                    "measuredMaxSeconds": worst,
                    "measuredMedianSeconds": round(statistics.median(measured), 2) if worst is not None else None,
                    "met": worst is not None and worst <= bound + SLACK_S})
    return out


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def _canary_out_of_endpoints(e2e: Any, tag: str) -> bool:
    """Every pod of ``tag`` terminating or gone: the node agent's proxy no longer sends it connections."""
    pods = e2e.client.list(Pod, namespace=e2e.namespace, labels={naming.LABEL_VERSION: tag})
    return all(p.metadata.deletionTimestamp is not None for p in pods)


def query_range(e2e: Any, promql: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    url = f"{e2e.prometheus}/api/v1/query_range?" + urllib.parse.urlencode(
        {"query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"})
    with urllib.request.urlopen(url, timeout=10) as response:  # 127.0.0.1 only (hack/prometheus.py)
        body = json.loads(response.read())
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def fetch_prometheus_view(e2e: Any, tag: str, interval_s: float, first_failure: float | None) -> dict[str, Any]:
    """What Prometheus made of the canary's first errors (the mechanism the pre-created 5xx series changes):

    - 5xx invisible to rate(): per canary pod, the value of its 5xx series' first stored sample (rate() and
      increase() only count increases between samples, so errors counted before the series' first scrape are lost);
    - errorRate visible after: from the first failed response to the first instant (0.1 s steps) at which the
      operator's builtin errorRate query, as sent to Prometheus, reads above its max 0.01.
    """
    selector = analysis.build_selector({"namespace": e2e.namespace, "model": MODEL, "version": tag, "code": "500"})
    series = e2e.query(f"{contract.METRIC_REQUESTS_TOTAL}{selector}[15m]")
    firsts = [float(s["values"][0][1]) for s in series if s.get("values")]
    out: dict[str, Any] = {"errorSeries": len(series), "errorsInvisibleToRate": sum(firsts),
                           "errorRateVisibleAfterSeconds": None}
    if first_failure is None:
        return out
    query = analysis.build_builtin_query("errorRate", e2e.namespace, MODEL, tag,
                                         analysis.build_query_window(interval_s))
    points = [(float(t), float(v)) for s in query_range(e2e, query, first_failure - 2, first_failure + 15, 0.1)
              for t, v in s["values"]]
    visible = min((t for t, v in points if v > 0.01 and t >= first_failure), default=None)
    out["errorRateVisibleAfterSeconds"] = _round(visible - first_failure) if visible is not None else None
    return out


def run_once(e2e: Any, port: int, tag: str, interval_s: float) -> dict[str, Any]:
    """One bad rollout under load; returns its figures (times relative to the first failure)."""
    bound = build_bound(interval_s)
    with scenarios.Watcher(e2e) as watcher:
        load = loadgen.LoadGenerator(port, MODEL, scenarios.SAMPLES, scenarios.LABELS, rate=LOAD_RATE,
                                     max_seconds=bound + 240).start()
        try:
            time.sleep(2)
            applied = time.time()
            e2e.cluster.apply(build_md(tag, interval_s), e2e.namespace)
            candidate = watcher.wait(lambda o: o.candidate == tag, 120, f"{tag} to become the candidate")
            decided = watcher.wait(lambda o: o.t > candidate.t and o.phase == "RolledBack", bound + 180,
                                   f"the rollback of {tag}")
            wait_until(lambda: _canary_out_of_endpoints(e2e, tag), timeout=60, interval=0.25,
                       message=f"the pods of {tag} to leave the endpoints")
            out_of_endpoints = time.time()
            time.sleep(SETTLE_S)
        finally:
            results = load.stop()
    md = e2e.md(MODEL)
    status = md.get("status") or {}
    figures = assess_run(results, e2e.conntrack(), watcher.pod_versions, tag, applied)
    first, back = figures["firstFailure"], figures["stableServesAll"]
    late = [r for r in results if back is not None and r.started > back and r.version not in (STABLE, None)]
    metric = next(iter((status.get("analysis") or {}).get("metrics") or []), {})
    prometheus = fetch_prometheus_view(e2e, tag, interval_s, first)
    return {
        "tag": tag,
        "intervalSeconds": interval_s,
        "boundSeconds": (status.get("analysis") or {}).get("detectionBoundSeconds", bound),
        "measuredSeconds": _round(back - first) if first is not None and back is not None else None,
        "decisionSeconds": _round(decided.t - first) if first is not None else None,
        "decisionToStableServesAllSeconds": _round(back - decided.t) if back is not None else None,
        "applyToFirstCanaryResponseSeconds": _round(figures["firstCanaryResponse"] - applied)
        if figures["firstCanaryResponse"] else None,
        "firstCanaryResponseToFirstFailureSeconds": _round(first - figures["firstCanaryResponse"])
        if first is not None and figures["firstCanaryResponse"] else None,
        "decisionToOutOfEndpointsPollSeconds": _round(out_of_endpoints - decided.t),
        "requests": figures["requests"],
        "canaryRequests": figures["canaryRequests"],
        "canaryFailed": figures["canaryFailed"],
        "otherFailed": figures["otherFailed"],
        "nonStableAnswersAfterBack": len(late),
        "prometheus": prometheus,
        "counts": figures["counts"],
        "status": {"phase": status.get("phase"), "stableVersion": status.get("stableVersion"),
                   "message": status.get("message")},
        "analysisAtDecision": {k: metric.get(k) for k in ("successes", "failures", "inconclusive", "errors",
                                                          "lastValue", "message")},
    }


def fetch_versions() -> dict[str, Any]:
    def first_line(*cmd: str) -> str | None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        return None

    bin_dir = Path.home() / ".cache" / "shipyard" / "bin"
    packages = {}
    for name in ("kopf", "lightkube", "prometheus-client", "torch"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            packages[name] = importlib.metadata.version(name)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "runtime", "operator"],
                           capture_output=True, text=True, check=False).stdout.split("\n")
    return {
        "python": platform.python_version(),
        "packages": packages,
        "prometheus": first_line(os.environ.get("SHIPYARD_PROMETHEUS", "/usr/bin/prometheus"), "--version"),
        "controlPlaneBinaries": sorted(p.name for p in bin_dir.iterdir()) if bin_dir.is_dir() else [],
        "gitCommit": first_line("git", "-C", str(REPO), "rev-parse", "HEAD"),
        "uncommittedInRuntimeOrOperator": [line[3:] for line in dirty if line.strip()],
    }


def fetch_machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), None)
    return {"cpus": os.cpu_count(), "cpuModel": model, "kernel": platform.release(), "os": platform.platform()}


def fetch_load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def build_summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per interval of the figures a variant is compared on (pure)."""
    def median(values: list[Any]) -> float | None:
        known = [v for v in values if v is not None]
        return round(statistics.median(known), 2) if known else None

    out = []
    for interval in sorted({r["intervalSeconds"] for r in runs}):
        mine = [r for r in runs if r["intervalSeconds"] == interval]
        prom = [r.get("prometheus") or {} for r in mine]
        out.append({
            "intervalSeconds": interval,
            "runs": len(mine),
            "measuredMedianSeconds": median([r["measuredSeconds"] for r in mine]),
            "decisionMedianSeconds": median([r["decisionSeconds"] for r in mine]),
            "errorRateVisibleMedianSeconds": median([p.get("errorRateVisibleAfterSeconds") for p in prom]),
            "errorsInvisibleToRate": sum(p.get("errorsInvisibleToRate") or 0 for p in prom),
        })
    return out


def print_variants(variants: dict[str, Any]) -> None:
    print("variants in rollback.json (medians; 5xx lost summed):")
    print(f"{'variant':<10} {'interval':>8} {'runs':>4} {'measured':>9} {'decision':>9} {'visible':>8} {'5xx lost':>8}")
    for label, variant in sorted(variants.items()):
        for row in variant.get("summary") or []:
            def f(v: float | None) -> str:
                return "-" if v is None else f"{v:.2f}"
            print(f"{label:<10} {row['intervalSeconds']:>7g}s {row['runs']:>4} {f(row['measuredMedianSeconds']):>9} "
                  f"{f(row['decisionMedianSeconds']):>9} {f(row['errorRateVisibleMedianSeconds']):>8} "
                  f"{row['errorsInvisibleToRate']:>8g}")


def assess_runtime_precreates() -> list[str]:
    """The status codes whose request series a fresh runtime exports at 0 (from the code in this checkout)."""
    from prometheus_client.parser import text_string_to_metric_families

    from shipyard import contract
    from shipyard.runtime import metrics

    text = metrics.ServerMetrics(MODEL, STABLE).build_exposition().decode()
    return sorted(s.labels[contract.LABEL_CODE] for f in text_string_to_metric_families(text)
                  for s in f.samples if s.name == contract.METRIC_REQUESTS_TOTAL)


def print_table(runs: list[dict[str, Any]], targets: list[dict[str, Any]]) -> None:
    head = (f"{'interval':>8} {'tag':<12} {'bound':>6} {'measured':>9} {'decision':>9} {'->all':>6} "
            f"{'canary req/fail':>15} {'other fail':>10} {'5xx lost':>8} {'visible':>7} {'met':>4}")
    print(head)
    print("-" * len(head))
    for r in runs:
        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f}"
        met = r["measuredSeconds"] is not None and r["measuredSeconds"] <= r["boundSeconds"] + SLACK_S
        prom = r.get("prometheus") or {}
        lost = prom.get("errorsInvisibleToRate")
        print(f"{r['intervalSeconds']:>7g}s {r['tag']:<12} {f(r['boundSeconds']):>6} {f(r['measuredSeconds']):>9} "
              f"{f(r['decisionSeconds']):>9} {f(r['decisionToStableServesAllSeconds']):>6} "
              f"{r['canaryRequests']:>8}/{r['canaryFailed']:<6} {r['otherFailed']:>10} "
              f"{'-' if lost is None else f'{lost:g}':>8} {f(prom.get('errorRateVisibleAfterSeconds')):>7} "
              f"{'yes' if met else 'no':>4}")
    print("measured: first failed response -> stable serves all traffic; decision: first failed response -> phase "
          "RolledBack read; ->all: decision -> stable serves all traffic; 5xx lost: canary 5xx counted before the "
          "series' first Prometheus sample (invisible to rate()); visible: first failed response -> the builtin "
          "errorRate query over Prometheus reads > 0.01 (seconds)")
    print()
    for t in targets:
        worst = "-" if t["measuredMaxSeconds"] is None else f"{t['measuredMaxSeconds']:.1f}"
        print(f"interval {t['intervalSeconds']:g}s: slowest of {t['repetitions']} = {worst} s vs bound "
              f"{t['boundSeconds']:g} + {SLACK_S:g} s: {'met' if t['met'] else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--intervals", default="5,10,30", help="analysis intervals in seconds (default 5,10,30)")
    parser.add_argument("--repetitions", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=560.0,
                        help="skip runs that would not fit this total (stack start included; default 560)")
    parser.add_argument("--label", default="current", help="variant name for the JSON (e.g. before, after)")
    args = parser.parse_args(argv)
    intervals = [float(v) for v in args.intervals.split(",") if v.strip()]
    started = time.monotonic()
    load_at_start = fetch_load()
    versions = fetch_versions()
    precreated = assess_runtime_precreates()
    e2e_stack.POD_IP_PREFIX = POD_IP_PREFIX
    logs = Path(tempfile.mkdtemp(prefix="shipyard-rollback-bench-"))
    e2e_stack.RESULTS_DIR = logs  # the stack's logs go to <logs>/logs, not over the e2e tier's last run
    runs: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    stack_up_s = None
    with contextlib.contextmanager(e2e_stack.e2e.__wrapped__)() as e2e:
        stack_up_s = round(time.monotonic() - started, 1)
        print(f"Started the e2e stack in {stack_up_s} s (logs will be kept in {logs}/logs)", flush=True)
        e2e.cluster.apply(build_md(STABLE, intervals[0]), e2e.namespace)
        wait_until(lambda: (m := e2e.md(MODEL)) and scenarios.assess_kstatus(m) == "Current"
                   and (m.get("status") or {}).get("stableVersion") == STABLE,
                   timeout=300, interval=0.5, message=f"{MODEL} {STABLE} to be Ready")
        port = e2e.service_port(MODEL)
        print(f"Stable {STABLE} ready after {time.monotonic() - started:.0f} s", flush=True)
        n = 0
        for rep in range(args.repetitions):
            for interval in intervals:
                tag = f"1.2.{n}-bad"
                n += 1
                need = build_bound(interval) + RUN_OVERHEAD_S
                if time.monotonic() - started + need > args.budget_s:
                    skipped.append({"intervalSeconds": interval, "repetition": rep + 1})
                    print(f"Skipped interval {interval:g}s repetition {rep + 1}: over the budget", flush=True)
                    continue
                try:
                    run = run_once(e2e, port, tag, interval)
                except AssertionError as error:  # a wait timed out: the run has no figure, its target is missed
                    run = {"tag": tag, "intervalSeconds": interval, "boundSeconds": build_bound(interval),
                           "measuredSeconds": None, "decisionSeconds": None, "decisionToStableServesAllSeconds": None,
                           "canaryRequests": 0, "canaryFailed": 0, "otherFailed": 0, "error": str(error)[:2000]}
                run["repetition"] = rep + 1
                runs.append(run)
                print(f"Ran interval {interval:g}s repetition {rep + 1} ({tag}): measured {run['measuredSeconds']} s"
                      f", bound {run['boundSeconds']} s, decision {run['decisionSeconds']} s", flush=True)
    targets = assess_targets(runs)
    variant = {
        "startedAt": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions,
        "loadAverage": {"start": load_at_start, "end": fetch_load()},
        "runtimePrecreatedCodes": precreated,
        "stackUpSeconds": stack_up_s,
        "totalSeconds": round(time.monotonic() - started, 1),
        "runs": runs,
        "skipped": skipped,
        "targets": targets,
        "summary": build_summary(runs),
    }
    doc: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    doc.update({
        "benchmark": "rollback",
        "machine": fetch_machine(),
        "config": {"replicas": 3, "loadRatePerSecond": LOAD_RATE, "badErrorRate": 0.5,
                   "failureLimit": manifests.FAILURE_LIMIT, "initialDelaySeconds": manifests.INITIAL_DELAY_S,
                   "metrics": "builtin errorRate max 0.01 (Prometheus, 1 s scrapes)", "slackSeconds": SLACK_S,
                   "signal": "stable serves all traffic = max(last response from a canary pod, last proxy "
                             "connection to a canary pod); canary pods all terminating (out of endpoints) checked"},
    })
    doc.pop("versions", None)  # kept per variant
    doc.setdefault("variants", {})[args.label] = variant
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print()
    print(f"variant {args.label}: runtime pre-creates shipyard_requests_total codes {precreated or 'none'}")
    print_table(runs, targets)
    print()
    print_variants(doc["variants"])
    print(f"wrote {RESULTS.relative_to(REPO)}; total {variant['totalSeconds']} s")
    print(f"targets: {sum(t['met'] for t in targets)}/{len(targets)} met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
