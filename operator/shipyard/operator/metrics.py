"""The operator's own Prometheus metrics (module-level collectors; no I/O until the HTTP server is started)."""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Enum, Histogram

PHASES = ["Pending", "Compressing", "Progressing", "Paused", "Healthy", "RolledBack", "Failed", "Degraded"]

RECONCILE_SECONDS = Histogram(
    "shipyard_operator_reconcile_duration_seconds",
    "Time of one reconcile pass of a ModelDeployment (observe, plan, apply, status).",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
ROLLBACKS = Counter(
    "shipyard_operator_rollbacks_total", "Automatic and manual rollbacks performed.", ["namespace", "name"]
)
VERDICTS = Counter(
    "shipyard_operator_analysis_verdicts_total", "Analysis measurements by verdict.",
    ["namespace", "name", "metric", "verdict"],
)
PHASE = Enum(
    "shipyard_operator_modeldeployment_phase", "Phase of each ModelDeployment.", ["namespace", "name"],
    states=PHASES,
)


def forget(namespace: str, name: str) -> None:
    """Drops a deleted object's series so that they do not linger."""
    for collector in (PHASE, ROLLBACKS):
        with contextlib.suppress(KeyError):
            collector.remove(namespace, name)
