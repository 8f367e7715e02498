"""Benchmark of shadow traffic's cost to the client: the stable's latency with and without 100 % shadowing.

Not a test. Three `shipyard-runtime serve` processes (one torch thread each) serve the same small MLP (64 -> 256 ->
256 -> 10, single-row requests): stable A without shadow settings, stable B with `SHIPYARD_SHADOW_URL` pointing at
candidate C (`SHIPYARD_SHADOW_PERCENT=100`, top1), and C. An open-loop client sends single-row JSON requests at a
fixed rate (20 and 200 req/s) from 8 keep-alive threads; latency is timed from each request's scheduled start to
its answer read whole (so a late client counts, no coordinated omission). A and B are measured in alternating
rounds at each rate, in the same run. With two or more CPUs the stables are pinned to CPU 0 and the candidate and
the client to CPU 1, as in a cluster where the candidate's pods are not the stable's: what is measured is what
shadowing costs the stable's own process (the copy, the client connection, the comparison on its event loop).
After the run B's /metrics must show every copy compared and agreeing (C serves the same model).

It prints a table, writes bench/results/shadow.json (with the usual `meta` block) and ends with `targets: K/N met`:
- at each rate, B's p99 <= 1.10 x A's p99 (shadowing does not slow the client);
- every copy B made was compared (none dropped, timed out or failed) and agreed.

With `--baseline REF` a fourth server, the runtime of git commit REF (e.g. the commit before shadow traffic existed),
is measured too without shadow settings, as column `today`: A's path is meant to be that one.

Usage: OMP_NUM_THREADS=1 python bench/shadow_bench.py [--rates 20,200] [--round-seconds 3,1.5] [--rounds 2]
       [--baseline REF]
       python bench/shadow_bench.py report [--check]   # bench/README.md's shadow section from the result file
The model's factory (`shadow_bench:build_mlp`) lives in this file; the servers get this folder on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchmeta import build_meta, fetch_git_state  # noqa: E402

MODEL = "mlp"
CLIENT_THREADS = 8
P99_RATIO = 1.10
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def build_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def start_server(model_dir: Path, env: dict[str, str], cpus: set[int] | None,
                 source: Path | None = None) -> tuple[subprocess.Popen[str], int]:
    """A server process; `source`: a tree whose contract/ and runtime/ are imported instead of this checkout's."""
    paths = [str(HERE)] + ([str(source / "contract"), str(source / "runtime")] if source else [])
    environment = {**os.environ, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]), **env}
    command = [sys.executable, "-m", "shipyard.runtime.cli", "serve", "--artifact", str(model_dir), "--host",
               "127.0.0.1", "--port", "0", "--threads", "1", "--model-name", MODEL, "--log-level", "INFO"]
    process = subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, text=True)
    if cpus:
        os.sched_setaffinity(process.pid, cpus)
    log: list[str] = []
    port: dict[str, int] = {}
    ready = threading.Event()

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            log.append(line.rstrip())
            if match := re.search(r"Listened on 127\.0\.0\.1:(\d+)", line):
                port["http"] = int(match.group(1))
            if "Became ready" in line:
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(180) or process.poll() is not None:
        process.kill()
        raise RuntimeError("a server did not become ready:\n" + "\n".join(log))
    return process, port["http"]


def run_load(port: int, rate: float, seconds: float, body: bytes) -> tuple[list[float], int]:
    """Open loop: requests scheduled every 1/rate s for `seconds`; latency (s) from schedule to answer; errors."""
    slots: queue.Queue[float | None] = queue.Queue()
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while (scheduled := slots.get()) is not None:
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            try:
                conn.request("POST", f"/v2/models/{MODEL}/infer", body=body,
                             headers={"content-type": "application/json"})
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                ok = False
            elapsed = time.perf_counter() - scheduled
            with lock:
                latencies.append(elapsed)
                errors[0] += 0 if ok else 1
        conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(CLIENT_THREADS)]
    for thread in threads:
        thread.start()
    start = time.perf_counter() + 0.05
    for i in range(int(rate * seconds)):
        slots.put(start + i / rate)
    for _ in threads:
        slots.put(None)
    for thread in threads:
        thread.join()
    return latencies, errors[0]


def fetch_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14 and 15 of stat)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))
    return ordered[index]


def fetch_shadow_counts(port: int) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "shipyard_shadow_requests_total":
                counts[sample.labels["outcome"]] = sample.value
            elif sample.name in ("shipyard_shadow_rows_total", "shipyard_shadow_agreeing_rows_total",
                                 "shipyard_shadow_inflight_requests"):
                counts[sample.name] = sample.value
    return counts


README = HERE / "README.md"
RESULT = HERE / "results" / "shadow.json"
README_BEGIN = "<!-- shadow.json:begin (generated by `python bench/shadow_bench.py report`; do not edit) -->"
README_END = "<!-- shadow.json:end -->"


def build_readme_section(result: dict[str, Any]) -> str:
    """bench/README.md's shadow figures from a result file's content (pure): one row per rate, each figure as
    today / without / with (today only with a baseline), and the copies' outcomes and targets."""
    meta, shadow = result["meta"], result["shadow"]
    modes = ["today", "without", "with"] if result["setup"].get("baseline") else ["without", "with"]

    def figures(row: dict[str, Any], key: str, unit: str = "") -> str:
        return " / ".join(f"{row[mode][key]:.2f}" for mode in modes) + unit

    baseline = result["setup"].get("baseline")
    lines = [README_BEGIN, "",
             f"Latest run (`results/shadow.json`): commit {str(meta['gitCommit'])[:7]}"
             f"{' (uncommitted changes)' if meta.get('gitDirty') else ''}, {meta['startedAt']}, load average "
             f"{meta['loadBefore'][0]} before, CPUs {result['setup']['cpus']}"
             f"{', pinned' if result['setup'].get('pinned') else ''}; figures as {' / '.join(modes)}"
             f"{f' (today: {baseline})' if baseline else ''}:", "",
             "| req/s | requests per stable | p50 | p99 | p99 with/without | stable CPU ms/request |",
             "|---|---|---|---|---|---|"]
    for row in result["results"]:
        lines.append(f"| {row['rate']:g} | {row['with']['requests']} | {figures(row, 'p50Ms', ' ms')} | "
                     f"{figures(row, 'p99Ms', ' ms')} | {row['p99Ratio']:.2f} | "
                     f"{figures(row, 'serverCpuMsPerRequest')} |")
    met = sum(1 for target in result["targets"] if target["met"])
    lines += ["", f"Copies: {shadow['sent']} sent, {shadow.get('compared', 0):g} compared, "
                  f"{shadow.get('dropped', 0):g} dropped, {shadow.get('timeout', 0):g} timed out, "
                  f"{shadow.get('error', 0):g} failed; agreement {shadow['agreement']}. "
                  f"`targets: {met}/{len(result['targets'])} met`", "", README_END]
    return "\n".join(lines)


def apply_readme_section(readme: str, section: str) -> str:
    """The README with the text between the markers replaced by `section` (pure); raises ValueError without them."""
    start, end = readme.find(README_BEGIN), readme.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"bench/README.md lacks the markers {README_BEGIN!r} ... {README_END!r}")
    return readme[:start] + section + readme[end + len(README_END):]


def report(argv: list[str]) -> int:
    """Write (with --check: compare) bench/README.md's shadow section from bench/results/shadow.json."""
    parser = argparse.ArgumentParser(prog="shadow_bench.py report")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    readme = README.read_text()
    updated = apply_readme_section(readme, build_readme_section(json.loads(RESULT.read_text())))
    if args.check:
        if updated != readme:
            print("bench/README.md's shadow section differs from bench/results/shadow.json: run "
                  "`python bench/shadow_bench.py report`", file=sys.stderr)
            return 1
        return 0
    README.write_text(updated)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["report"]:
        return report(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="20,200", help="requests per second, comma-separated")
    parser.add_argument("--round-seconds", default="3,1.5",
                        help="seconds per round at each rate (one, or one per rate)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of A and B per rate")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load on each server before measuring")
    parser.add_argument("--baseline", metavar="REF",
                        help="also measure the server of this git commit (e.g. the commit before shadow traffic) "
                        "without shadow settings, as column 'today'")
    parser.add_argument("--out", default=str(RESULT), help="result file (the default one also regenerates the "
                        "README's section)")
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    durations = [float(s) for s in args.round_seconds.split(",")]
    durations = durations * len(rates) if len(durations) == 1 else durations
    available = sorted(os.sched_getaffinity(0))
    stable_cpus, other_cpus = ({available[0]}, {available[1]}) if len(available) >= 2 else (None, None)
    git_head, git_status = fetch_git_state()
    load_before = os.getloadavg()
    started_at = time.time()
    from shipyard.runtime.artifacts import store

    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32",
                                   "data": torch.rand(64).tolist()}]}).encode()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as work:
        model_dir = Path(work) / MODEL
        store.save_model(build_mlp().eval(), model_dir, name=MODEL, factory="shadow_bench:build_mlp",
                         factory_kwargs={}, inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 64]}],
                         outputs=[{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}])
        processes: list[subprocess.Popen[str]] = []
        try:
            candidate, candidate_port = start_server(model_dir, {"SHIPYARD_MODEL_VERSION": "2"}, other_cpus)
            processes.append(candidate)
            plain, plain_port = start_server(model_dir, {"SHIPYARD_MODEL_VERSION": "1"}, stable_cpus)
            processes.append(plain)
            shadowed, shadowed_port = start_server(model_dir, {
                "SHIPYARD_MODEL_VERSION": "1", "SHIPYARD_SHADOW_URL": f"http://127.0.0.1:{candidate_port}",
                "SHIPYARD_SHADOW_VERSION": "2", "SHIPYARD_SHADOW_PERCENT": "100", "SHIPYARD_SHADOW_COMPARE": "top1",
                "SHIPYARD_SHADOW_TIMEOUT_MS": "1000"}, stable_cpus)
            processes.append(shadowed)
            servers = {"without": plain_port, "with": shadowed_port}
            pids = {"without": plain.pid, "with": shadowed.pid}
            if args.baseline:
                tree = Path(work) / "baseline"
                tree.mkdir()
                archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", args.baseline, "contract",
                                          "runtime"], check=True, capture_output=True).stdout
                subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
                today, today_port = start_server(model_dir, {"SHIPYARD_MODEL_VERSION": "1"}, stable_cpus, tree)
                processes.append(today)
                servers, pids = {"today": today_port, **servers}, {"today": today.pid, **pids}
            if other_cpus:
                os.sched_setaffinity(0, other_cpus)
            sent_with_shadow = 0  # answered 200 by B: each one copied to C
            for mode, port in servers.items():
                got, failed = run_load(port, 100, args.warmup, body)
                sent_with_shadow += len(got) - failed if mode == "with" else 0
            for rate, seconds in zip(rates, durations, strict=True):
                latencies: dict[str, list[float]] = {mode: [] for mode in servers}
                errors = dict.fromkeys(latencies, 0)
                cpu = dict.fromkeys(latencies, 0.0)
                for round_index in range(args.rounds):
                    modes = list(servers)
                    shift = round_index % len(modes)
                    for mode in modes[shift:] + modes[:shift]:  # each mode first in turn
                        before = fetch_cpu_seconds(pids[mode])
                        got, failed = run_load(servers[mode], rate, seconds, body)
                        cpu[mode] += fetch_cpu_seconds(pids[mode]) - before
                        latencies[mode] += got
                        errors[mode] += failed
                        if mode == "with":
                            sent_with_shadow += len(got) - failed
                row = {"rate": rate, "secondsPerMode": seconds * args.rounds}
                for mode, values in latencies.items():
                    row[mode] = {"requests": len(values), "errors": errors[mode],
                                 "p50Ms": round(percentile(values, 0.50) * 1000, 3),
                                 "p99Ms": round(percentile(values, 0.99) * 1000, 3),
                                 "serverCpuMsPerRequest": round(cpu[mode] * 1000 / max(1, len(values)), 3)}
                row["p99Ratio"] = round(row["with"]["p99Ms"] / row["without"]["p99Ms"], 3)
                row["p50Ratio"] = round(row["with"]["p50Ms"] / row["without"]["p50Ms"], 3)
                if "today" in row:
                    row["withoutVsTodayP99Ratio"] = round(row["without"]["p99Ms"] / row["today"]["p99Ms"], 3)
                results.append(row)
            deadline = time.monotonic() + 5
            while True:
                counts = fetch_shadow_counts(shadowed_port)
                if counts.get("shipyard_shadow_inflight_requests", 1) == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
    print(f"\nShadow traffic: client latency of the stable without and with 100 % shadowing to a candidate "
          f"(single-row requests, {CLIENT_THREADS} client threads, open loop; servers on 1 torch thread; "
          f"{'stables on CPU 0, candidate and client on CPU 1' if stable_cpus else 'no CPU pinning'})\n")
    modes = ["today", "without", "with"] if args.baseline else ["without", "with"]
    header = f"{'req/s':>6} {'requests':>9}" + "".join(f" {'p50 ' + m:>12}" for m in modes) + "".join(
        f" {'p99 ' + m:>12}" for m in modes) + f" {'p99 with/without':>16}" + "".join(
        f" {'CPU ms/req ' + m:>18}" for m in modes)
    print(header)
    for row in results:
        print(f"{row['rate']:>6g} {row['with']['requests']:>9}" + "".join(
            f" {row[m]['p50Ms']:>10.3f}ms" for m in modes) + "".join(f" {row[m]['p99Ms']:>10.3f}ms" for m in modes)
            + f" {row['p99Ratio']:>16.3f}" + "".join(f" {row[m]['serverCpuMsPerRequest']:>18.3f}" for m in modes))
    compared = counts.get("compared", 0)
    agreement = (counts.get("shipyard_shadow_agreeing_rows_total", 0) / counts["shipyard_shadow_rows_total"]
                 if counts.get("shipyard_shadow_rows_total") else None)
    print(f"\nshadow copies: sent {sent_with_shadow}, compared {compared:g}, dropped {counts.get('dropped', 0):g}, "
          f"timeout {counts.get('timeout', 0):g}, error {counts.get('error', 0):g}; agreement {agreement}\n")
    targets = [{"target": f"p99 with shadow <= {P99_RATIO}x without at {row['rate']:g} req/s",
                "value": row["p99Ratio"], "bound": P99_RATIO, "met": row["p99Ratio"] <= P99_RATIO} for row in results]
    targets.append({"target": "every copy compared and agreeing", "value": {"sent": sent_with_shadow,
                                                                             "compared": compared,
                                                                             "agreement": agreement},
                    "bound": "compared == sent, agreement 1.0",
                    "met": compared == sent_with_shadow and agreement == 1.0})
    for target in targets:
        print(f"{'met' if target['met'] else 'MISSED':<7} {target['target']}: {target['value']} "
              f"(bound {target['bound']})")
    document = {
        "meta": build_meta(git_head, git_status, python=platform.python_version(), torch_version=torch.__version__,
                           platform_name=platform.platform(), load_before=load_before, load_after=os.getloadavg(),
                           started=started_at, finished=time.time()),
        "setup": {"model": "MLP 64-256-256-10", "clientThreads": CLIENT_THREADS, "rounds": args.rounds,
                  "warmupS": args.warmup, "serverTorchThreads": 1, "cpus": available,
                  "pinned": bool(stable_cpus), "baseline": args.baseline,
                  "shadow": {"percent": 100, "compare": "top1", "timeoutMs": 1000}},
        "results": results,
        "shadow": {"sent": sent_with_shadow, **counts, "agreement": agreement},
        "targets": targets,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    if out.resolve() == RESULT.resolve():
        README.write_text(apply_readme_section(README.read_text(), build_readme_section(document)))
    met = sum(1 for target in targets if target["met"])
    print(f"\nwrote {out}\ntargets: {met}/{len(targets)} met")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
