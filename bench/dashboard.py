"""The dashboard with 1,000 ModelDeployments: time to first render, live-update latency and memory (does I/O).

A fresh local control plane (hack/cluster.py; no operator: statuses are written as the operator writes them) gets N
ModelDeployments (default 1,000) in one namespace, their statuses (70% Healthy, 15% Progressing with a 30-point
analysis series, 5% each Paused, RolledBack, Failed; history and a compression report on each) and one Event each.
Then `kubectl-shipyard dashboard` runs as a real process and Debian's Chromium (headless, Playwright) loads:

- the list page, first right after the server started (its one list+watch still syncing: start -> first paint), then
  `--loads` more times in fresh browser contexts: the server's time to first byte, first contentful paint and
  DOMContentLoaded (the Navigation/Paint Timing API), all N rows present;
- a Progressing model's page until its chart is drawn (plotly.js from the installed package);
- live updates: a status patch of one object until its row changes in an open list page (server-sent events), 10x.

The dashboard's RSS (/proc: VmRSS after sync, with the pages open; VmHWM peak) is read throughout. Prints a table,
writes bench/results/dashboard.json with the commit, and ends with `targets: K/N met`.

    .venv/bin/python bench/dashboard.py [--n 1000] [--loads 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.*, bench.*, from the checkout
from bench import benchmeta  # noqa: E402
from tests.browser import DashboardProcess, launch_chromium, rss_mib  # noqa: E402
from tests.modules import load_file  # noqa: E402

RESULTS = REPO / "bench" / "results"
NAMESPACE = "bench"
T0 = "2026-01-03T00:00:00Z"


def build_objects(n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(ModelDeployments, their statuses, one Event each): a realistic mix of phases and status sizes."""
    models, statuses, events = [], [], []
    for i in range(n):
        name = f"model-{i:04d}"
        stable, candidate = f"1.{i % 7}.0", f"1.{i % 7 + 1}.0"
        models.append({"apiVersion": "shipyard.dev/v1alpha1", "kind": "ModelDeployment",
                       "metadata": {"name": name, "namespace": NAMESPACE},
                       "spec": {"image": f"registry.example/bench/{name}:{candidate}", "model": {"path": "/m"},
                                "serving": {"replicas": 4},
                                "rollout": {"steps": [{"weight": 25, "pause": "5m"}, {"weight": 50, "pause": "5m"}],
                                            "analysis": {"interval": "30s", "metrics": [
                                                {"name": "error-rate", "builtin": "errorRate", "max": 0.05,
                                                 "maxRelativeToStable": 0.5}]}}}})
        bucket = i % 20
        phase = ("Progressing" if bucket < 3 else "Paused" if bucket == 3 else "RolledBack" if bucket == 4
                 else "Failed" if bucket == 5 else "Healthy")
        history = [{"version": f"1.{i % 7 - 1}.0", "outcome": "Superseded", "reason": "RolledOut", "time": T0},
                   {"version": stable, "outcome": "Promoted", "reason": "RolledOut", "time": T0}]
        status: dict[str, Any] = {
            "observedGeneration": 1, "phase": phase, "message": f"{phase} (bench)", "stableVersion": stable,
            "stableImage": f"registry.example/bench/{name}:{stable}", "replicas": {"ready": 4, "stable": 4},
            "history": history, "artifacts": [{
                "key": f"{i:064x}"[:16], "version": stable, "phase": "Succeeded", "sourceBytes": 1797120,
                "compressedBytes": 467456, "sourceAccuracy": 0.9722, "compressedAccuracy": 0.9694,
                "relativeAccuracyLoss": 0.0029, "sourceLatencyMs": 2.1, "compressedLatencyMs": 1.19}],
            "conditions": [{"type": "Ready", "status": "True" if phase == "Healthy" else "False",
                            "reason": phase, "message": "", "lastTransitionTime": T0}],
        }
        if phase in ("Progressing", "Paused"):
            status.update({"candidateVersion": candidate,
                           "candidateImage": f"registry.example/bench/{name}:{candidate}", "currentStepIndex": 0,
                           "replicas": {"ready": 4, "stable": 3, "candidate": 1}})
            status["analysis"] = {"version": candidate, "phase": "Running", "startedAt": T0, "metrics": [{
                "name": "error-rate", "provider": "builtin", "verdict": "Successful", "lastValue": 0.004,
                "stableValue": 0.003, "successes": 30, "failures": 0, "inconclusive": 0, "errors": 0,
                "history": [{"time": f"2026-01-03T00:{k // 2:02d}:{30 * (k % 2):02d}Z", "value": 0.004 + 0.0001 * k,
                             "stableValue": 0.003, "verdict": "Successful"} for k in range(30)]}]}
        statuses.append({"apiVersion": "shipyard.dev/v1alpha1", "kind": "ModelDeployment",
                         "metadata": {"name": name, "namespace": NAMESPACE}, "status": status})
        events.append({"apiVersion": "v1", "kind": "Event",
                       "metadata": {"name": f"{name}.bench", "namespace": NAMESPACE},
                       "involvedObject": {"apiVersion": "shipyard.dev/v1alpha1", "kind": "ModelDeployment",
                                          "name": name, "namespace": NAMESPACE},
                       "reason": "Promoted", "message": f"Version {stable} is stable and serves all traffic",
                       "type": "Normal", "firstTimestamp": T0, "lastTimestamp": T0, "count": 1,
                       "source": {"component": "shipyard-operator"}})
    return models, statuses, events


def kubectl(kubeconfig: Path, *args: str, body: Any = None) -> str:
    out = subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", *args], capture_output=True, text=True,
                         input=None if body is None else json.dumps(body), timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args[:3])} failed: {out.stderr[-2000:]}")
    return out.stdout


def apply_all(kubeconfig: Path, items: list[dict[str, Any]], *args: str, batch: int = 250) -> None:
    for start in range(0, len(items), batch):
        kubectl(kubeconfig, "apply", "--server-side", "--force-conflicts", "--field-manager=bench", *args, "-f", "-",
                body={"apiVersion": "v1", "kind": "List", "items": items[start:start + batch]})


NAVIGATION = """async () => {
    const fcp = await new Promise((resolve) => {  // the paint entry may come after the load event
        new PerformanceObserver((list) => {
            const entry = list.getEntriesByName('first-contentful-paint')[0];
            if (entry) resolve(entry.startTime);
        }).observe({type: 'paint', buffered: true});
        setTimeout(() => resolve(null), 10000);
    });
    const nav = performance.getEntriesByType('navigation')[0];
    return {ttfb: nav.responseStart - nav.requestStart, dcl: nav.domContentLoadedEventEnd, fcp: fcp,
            rows: document.querySelectorAll('#rows tr').length, bytes: nav.transferSize};
}"""


DOCS = REPO / "bench" / "README.md"
DOCS_BEGIN = ("<!-- dashboard-figures:begin (generated by bench/dashboard.py --write-docs from "
              "bench/results/dashboard.json) -->")
DOCS_END = "<!-- dashboard-figures:end -->"


def build_markdown(data: dict[str, Any]) -> str:
    """The figures table of bench/README.md from a result file. Pure."""
    r, s = data["result"], data["summary"]
    load = data["meta"]["loadBefore"][0]
    rows = [
        (f"at {r['n']:,} ModelDeployments ({data['machine']['cpus']} cores, load average {load:.0f} before the run)",
         ""),
        ("---", "---"),
        ("list page, first contentful paint",
         f"{s['first_paint_ms_p50']:.0f} ms p50, {s['first_paint_ms_max']:.0f} ms max ({len(r['loads'])} loads)"),
        ("list page, server time to first byte", f"{s['ttfb_ms_p50']:.0f} ms p50 ({s['page_kb']:.0f} kB of HTML)"),
        ("process start -> first page painted",
         f"{r['startup_to_first_paint_seconds']:.1f} s ({r['serving_seconds']:.1f} s to listen, then the initial "
         f"list of {r['n']:,})"),
        ("a model page with its chart drawn (fresh cache)",
         f"{r['model_page_chart_seconds']:.1f} s, mostly parsing plotly.min.js"),
        ("status patch -> row updated on an open page",
         f"{s['live_update_ms_p50']:.0f} ms p50, {s['live_update_ms_max']:.0f} ms max"),
        ("dashboard RSS", f"{r['rss_after_sync_mib']:.0f} MiB after sync, {r['rss_peak_mib']:.0f} MiB peak with "
                          f"{r['open_pages']} pages streaming"),
        ("targets", f"{sum(t['met'] for t in data['targets'])}/{len(data['targets'])} met "
                    f"(commit {str(data['meta']['gitCommit'])[:10]})"),
    ]
    return "\n".join(f"| {a} | {b} |" for a, b in rows)


def write_docs(data: dict[str, Any], docs: Path = DOCS) -> None:
    text = docs.read_text()
    head, _, rest = text.partition(DOCS_BEGIN)
    _, _, tail = rest.partition(DOCS_END)
    docs.write_text(f"{head}{DOCS_BEGIN}\n{build_markdown(data)}\n{DOCS_END}{tail}")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    cluster = load_file("shipyard_hack_cluster", REPO / "hack" / "cluster.py")
    cluster.build_binaries()
    cluster.use_pinned_kubectl()
    state_dir = Path(tempfile.mkdtemp(prefix="shipyard-bench-dashboard-"))
    state = cluster.up(state_dir)
    kubeconfig = Path(state.kubeconfig)
    result: dict[str, Any] = {"n": args.n}
    dashboard = None
    try:
        kubectl(kubeconfig, "apply", "--server-side", "-f", str(REPO / "crds"))
        kubectl(kubeconfig, "wait", "--for=condition=Established", "--timeout=60s", "crd/modeldeployments.shipyard.dev")
        kubectl(kubeconfig, "create", "namespace", NAMESPACE)
        models, statuses, events = build_objects(args.n)
        started = time.monotonic()
        apply_all(kubeconfig, models)
        apply_all(kubeconfig, statuses, "--subresource=status", "--validate=false")  # status only: no spec
        apply_all(kubeconfig, events)
        result["create_seconds"] = round(time.monotonic() - started, 1)
        listed = json.loads(kubectl(kubeconfig, "get", "md", "-n", NAMESPACE, "-o", "json"))["items"]
        result["objects_bytes"] = len(json.dumps(listed))
        assert len(listed) == args.n and all(i.get("status", {}).get("phase") for i in listed)
        print(f"[bench] {args.n} ModelDeployments created ({result['objects_bytes'] / 1e6:.1f} MB as JSON) in "
              f"{result['create_seconds']} s", file=sys.stderr, flush=True)

        with sync_playwright() as p:
            browser = launch_chromium(p)
            spawned = time.monotonic()
            dashboard = DashboardProcess(str(kubeconfig), state_dir / "dashboard.log", "-n", NAMESPACE)
            result["serving_seconds"] = round(time.monotonic() - spawned, 3)
            pages = []
            context = browser.new_context()
            page = context.new_page()
            page.goto(dashboard.url, wait_until="load", timeout=60_000)
            cold = page.evaluate(NAVIGATION)
            result["startup_to_first_paint_seconds"] = round(time.monotonic() - spawned, 3)
            result["cold"] = cold
            assert cold["rows"] == args.n, cold
            result["rss_after_sync_mib"] = round(rss_mib(dashboard.pid), 1)
            pages.append(page)
            loads = []
            for _ in range(args.loads):
                context = browser.new_context()  # a fresh cache, as a new tab in a new profile would have
                page = context.new_page()
                page.goto(dashboard.url, wait_until="load", timeout=60_000)
                loads.append(page.evaluate(NAVIGATION))
                assert loads[-1]["rows"] == args.n
                pages.append(page)
            result["loads"] = loads
            # A Progressing model's page: until its chart is drawn.
            page = browser.new_context().new_page()
            begun = time.monotonic()
            page.goto(f"{dashboard.url}models/{NAMESPACE}/model-0000", wait_until="load")
            page.wait_for_selector("#chart-0 .main-svg", timeout=30_000)
            result["model_page_chart_seconds"] = round(time.monotonic() - begun, 3)
            result["model_page_points"] = page.locator("#chart-0 .scatterlayer .trace").first.locator(
                ".point").count()
            pages.append(page)
            # Live updates to an open list page (it has every row).
            watcher = pages[0]
            latencies = []
            for k in range(10):
                phase = "Degraded" if k % 2 == 0 else "Healthy"
                target = f"model-{(k * 97) % args.n:04d}"
                begun = time.monotonic()
                kubectl(kubeconfig, "patch", "md", target, "-n", NAMESPACE, "--subresource=status", "--type=merge",
                        "-p", json.dumps({"status": {"phase": phase}}))
                patched = time.monotonic()
                watcher.wait_for_function(
                    "([id, phase]) => document.getElementById(id).dataset.phase === phase",
                    arg=[f"md-{NAMESPACE}--{target}", phase], timeout=30_000, polling="raf")
                latencies.append({"patch_call": patched - begun, "to_row": time.monotonic() - patched})
            result["live_updates"] = latencies
            result["rss_with_pages_mib"] = round(rss_mib(dashboard.pid), 1)
            result["open_pages"] = len(pages)
            hwm = next(line for line in Path(f"/proc/{dashboard.pid}/status").read_text().splitlines()
                       if line.startswith("VmHWM:"))
            result["rss_peak_mib"] = round(int(hwm.split()[1]) / 1024, 1)
            browser.close()
    finally:
        if dashboard is not None:
            log = dashboard.stop()
            result["dashboard_log_tracebacks"] = log.count("Traceback")
        cluster.down(state_dir)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="ModelDeployments (default 1000)")
    parser.add_argument("--loads", type=int, default=5, help="list page loads after the first (default 5)")
    parser.add_argument("--output", type=Path, default=RESULTS / "dashboard.json")
    parser.add_argument("--write-docs", action="store_true",
                        help="only rewrite the figures table of bench/README.md from --output, measuring nothing")
    args = parser.parse_args()
    if args.write_docs:
        write_docs(json.loads(args.output.read_text()))
        return 0
    head, status = benchmeta.fetch_git_state()
    load_before, started = os.getloadavg(), time.time()
    r = measure(args)
    meta = benchmeta.build_meta(head, status, python=platform.python_version(), torch_version="not used",
                                platform_name=platform.platform(), load_before=load_before,
                                load_after=os.getloadavg(), started=started, finished=time.time())
    loads = r["loads"]
    fcp = [x["fcp"] for x in loads if x["fcp"] is not None]
    summary = {
        "first_paint_ms_p50": statistics.median(fcp), "first_paint_ms_max": max(fcp),
        "ttfb_ms_p50": statistics.median(x["ttfb"] for x in loads),
        "dom_content_loaded_ms_p50": statistics.median(x["dcl"] for x in loads),
        "page_kb": loads[0]["bytes"] / 1024,
        "live_update_ms_p50": 1000 * statistics.median(x["to_row"] for x in r["live_updates"]),
        "live_update_ms_max": 1000 * max(x["to_row"] for x in r["live_updates"]),
    }
    rows = [
        ("ModelDeployments", f"{r['n']}", f"{r['objects_bytes'] / 1e6:.1f} MB of objects as JSON"),
        ("process start -> serving", f"{r['serving_seconds']:.2f} s", "imports, kubeconfig, port bound"),
        ("process start -> first page loaded", f"{r['startup_to_first_paint_seconds']:.2f} s",
         f"the page waits for the initial list (cold FCP {r['cold']['fcp'] or float('nan'):.0f} ms after navigation)"),
        ("list page: first contentful paint", f"{summary['first_paint_ms_p50']:.0f} ms p50",
         f"max {summary['first_paint_ms_max']:.0f} ms over {len(loads)} loads, all {r['n']} rows rendered"),
        ("list page: server time to first byte", f"{summary['ttfb_ms_p50']:.0f} ms p50",
         f"{summary['page_kb']:.0f} kB HTML"),
        ("list page: DOMContentLoaded", f"{summary['dom_content_loaded_ms_p50']:.0f} ms p50", ""),
        ("model page: chart drawn", f"{r['model_page_chart_seconds'] * 1000:.0f} ms",
         f"{r['model_page_points']} points, plotly.js from the installed package"),
        ("status patch -> row updated", f"{summary['live_update_ms_p50']:.0f} ms p50",
         f"max {summary['live_update_ms_max']:.0f} ms (watch -> SSE -> DOM), 10 patches"),
        ("dashboard RSS after sync", f"{r['rss_after_sync_mib']:.0f} MiB", "one page open"),
        ("dashboard RSS, pages open", f"{r['rss_with_pages_mib']:.0f} MiB",
         f"{r['open_pages']} pages with live streams; peak {r['rss_peak_mib']:.0f} MiB"),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    targets = [
        (f"list of {r['n']}: first paint p50 <= 1000 ms", summary["first_paint_ms_p50"] <= 1000),
        ("process start -> first page <= 5 s", r["startup_to_first_paint_seconds"] <= 5),
        ("status change on screen p50 <= 500 ms", summary["live_update_ms_p50"] <= 500),
        ("a model's page with its chart drawn <= 3 s (fresh cache)", r["model_page_chart_seconds"] <= 3),
        (f"RSS <= 150 MiB with {r['n']} objects and pages open", r["rss_peak_mib"] <= 150),
        ("no traceback in the dashboard's log", r["dashboard_log_tracebacks"] == 0),
    ]
    for name, ok in targets:
        print(f"  {'met ' if ok else 'MISSED'}  {name}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"meta": meta, "machine": {"cpus": os.cpu_count()}, "result": r,
                                       "summary": summary, "targets": [{"name": n, "met": ok} for n, ok in targets]},
                                      indent=2))
    print(f"targets: {sum(ok for _, ok in targets)}/{len(targets)} met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
