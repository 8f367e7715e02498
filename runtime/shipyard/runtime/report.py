"""The compression report (JSON) and the one-line summary for the termination log. Pure functions.

The latencies after compression are those of the form the pods serve by default (the faster of the eager model and
its AOTInductor package, as the Job measured them: `served`), so that the summary line and the Compressed event say
what a user gets, e.g. `p50 batch1 0.045 -> 0.009 ms (5.00x, served AOTInductor package, eager 0.630 ms)`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from shipyard import contract
from shipyard.runtime import evaluate
from shipyard.runtime.fetch.progress import build_bytes_text  # one formatter of sizes (fetch's: no torch)

TERMINATION_LINE_LIMIT = 4000  # Kubernetes keeps at most 4096 bytes of a termination message
FORM_NAMES = {"eager": "eager", "compiled": "AOTInductor package"}


def build_latency_section(
    before: Mapping[int, Mapping[str, float]], after: Mapping[int, Mapping[str, float]]
) -> dict[str, Any]:
    """Latency before/after per batch size, with the speedup of the p50 (before / after). Pure."""
    section: dict[str, Any] = {"before": {}, "after": {}, "speedupP50": {}}
    for batch, stats in before.items():
        section["before"][f"batch{batch}"] = dict(stats)
        if batch in after:
            section["after"][f"batch{batch}"] = dict(after[batch])
            section["speedupP50"][f"batch{batch}"] = stats["p50_ms"] / after[batch]["p50_ms"]
    return section


def build_report(
    *,
    status: str,
    name: str,
    task: str,
    dataset: Mapping[str, Any],
    source: Mapping[str, Any],
    output: str | None,
    digest: str | None,
    bytes_before: int,
    bytes_after: int | None,
    parameters_before: int,
    parameters_after: int,
    metrics_before: Mapping[str, float],
    metrics_after: Mapping[str, float],
    gate: evaluate.GateDecision,
    latency_before: Mapping[int, Mapping[str, float]],
    latency_after: Mapping[int, Mapping[str, float]],
    steps: Sequence[Mapping[str, Any]],
    durations: Mapping[str, float],
    environment: Mapping[str, Any],
    created_at: str,
    compiled: Mapping[str, Any] | None = None,
    artifact_bytes_before: int | None = None,
    artifact_bytes_after: int | None = None,
    served: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the report written to `report.json` and printed by the job. Pure.

    Sizes: `weightsBytes` counts the weights file alone (`bytes_before`/`bytes_after`: what compression shrinks,
    as the Deep Compression paper counts); `artifactBytes` the model directory as the server loads it (manifest +
    weights), when given; `bytes` is `weightsBytes` under its older name, kept for existing readers.

    Latency: `latency_before` is the source's, `latency_after` the served form's (`served`: the form the Job
    measured fastest, why, and every form's figures), timed in the same rounds.
    """
    primary = evaluate.PRIMARY_METRIC[task]
    check = next((c for c in gate.checks if c.metric == primary), None)
    return {
        "status": status,
        "name": name,
        "task": task,
        "dataset": dict(dataset),
        "source": dict(source),
        "output": output,
        "digest": digest,
        "bytes": _build_sizes(bytes_before, bytes_after),
        "weightsBytes": _build_sizes(bytes_before, bytes_after),
        "artifactBytes": (
            _build_sizes(artifact_bytes_before, artifact_bytes_after) if artifact_bytes_before is not None else None
        ),
        "parameters": {"before": parameters_before, "after": parameters_after},
        "accuracy": {
            "metric": primary,
            "before": metrics_before[primary],
            "after": metrics_after[primary],
            "relativeLoss": check.relative_loss if check else None,
            "tolerance": check.tolerance if check else None,
        },
        "metrics": {"before": dict(metrics_before), "after": dict(metrics_after)},
        "gate": gate.to_dict(),
        "latency": {**build_latency_section(latency_before, latency_after),
                    "form": (served or {}).get("form", "eager")},
        "served": dict(served) if served else None,
        "compiled": dict(compiled) if compiled else None,
        "steps": [dict(s) for s in steps],
        "durations": dict(durations),
        "environment": dict(environment),
        "createdAt": created_at,
    }


def _build_sizes(before: int, after: int | None) -> dict[str, Any]:
    return {"before": before, "after": after, "ratio": (before / after) if after else None}


def build_summary_line(report: Mapping[str, Any]) -> str:
    """One line for the termination log: outcome, size, gated metrics, latency, digest. Pure."""
    name = report["name"]
    checks = "; ".join(
        f"{c['metric']} {c['before']:.4f} -> {c['after']:.4f} (relative loss {c['relativeLoss']:.2%} "
        f"{'<=' if c['passed'] else '>'} tolerance {c['tolerance']:.2%})"
        for c in report["gate"]["checks"]
    )
    fields = contract.build_summary_fields(build_summary_values(report))
    if report["status"] == "rejected":
        failed = ", ".join(c["metric"] for c in report["gate"]["checks"] if not c["passed"])
        line = f"Rejected {name}: {failed} failed the gate: {checks}; no artifact written"
    else:
        size = report["bytes"]
        latency = report["latency"]
        parts = [
            f"Compressed {name}: {build_bytes_text(size['before'])} -> {build_bytes_text(size['after'])} "
            f"({size['ratio']:.1f}x smaller)",
            checks,
        ]
        form = latency.get("form", "eager")
        others = {f: v for f, v in ((report.get("served") or {}).get("latency") or {}).items() if f != form}
        for key, speedup in latency["speedupP50"].items():  # the served form against the source
            other = "".join(f", {f} {v[key]['p50_ms']:.3f} ms" for f, v in others.items() if key in v)
            parts.append(
                f"p50 {key} {latency['before'][key]['p50_ms']:.3f} -> {latency['after'][key]['p50_ms']:.3f} ms "
                f"({speedup:.2f}x, served {FORM_NAMES.get(form, form)}{other})"
            )
        parts.append(f"digest {report['digest']}")
        line = "; ".join(parts)
    # The machine-readable tail is never cut: the human part gives way.
    return f"{build_one_line(line, TERMINATION_LINE_LIMIT - len(fields) - 1)} {fields}"


def build_summary_values(report: Mapping[str, Any]) -> dict[str, Any]:
    """The figures the operator keeps in status.artifacts (contract.SUMMARY_FIELDS). Pure."""
    size, accuracy = report.get("bytes") or {}, report.get("accuracy") or {}
    latency = report.get("latency") or {}
    batches = sorted(latency.get("before") or {}, key=lambda k: int(str(k).removeprefix("batch") or 0))
    first = batches[0] if batches else None

    def p50(side: str) -> float | None:
        value = ((latency.get(side) or {}).get(first) or {}).get("p50_ms") if first else None
        return round(value, 4) if isinstance(value, (int, float)) else None

    def rounded(value: object) -> float | None:
        return round(value, 6) if isinstance(value, (int, float)) else None

    return {
        "sourceBytes": size.get("before"),
        "compressedBytes": size.get("after") if report.get("status") == "accepted" else None,
        "sourceAccuracy": rounded(accuracy.get("before")) if accuracy.get("metric") == "accuracy" else None,
        "compressedAccuracy": rounded(accuracy.get("after")) if accuracy.get("metric") == "accuracy" else None,
        "relativeAccuracyLoss": rounded(accuracy.get("relativeLoss")) if accuracy.get("metric") == "accuracy"
        else None,
        "sourceLatencyMs": p50("before"),
        "compressedLatencyMs": p50("after") if report.get("status") == "accepted" else None,
        "digest": report.get("digest"),
    }


def build_one_line(text: str, limit: int = TERMINATION_LINE_LIMIT) -> str:
    """Collapse whitespace/newlines and cap the length for a termination message. Pure."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
