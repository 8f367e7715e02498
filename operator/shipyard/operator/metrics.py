"""The operator's own Prometheus metrics (module-level collectors; no I/O until the HTTP server is started)."""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Enum, Gauge, Histogram

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

# Webhook notifications (notifications.py). Labels are the target's name (chosen by the administrator) and the event:
# never a URL.
NOTIFICATIONS = Counter(
    "shipyard_operator_notifications_total",
    "Webhook notifications by target, event and result (delivered, failed: given up or refused, dropped: queue full).",
    ["target", "event", "result"],
)
NOTIFICATION_ATTEMPTS = Counter(
    "shipyard_operator_notification_attempts_total",
    "HTTP attempts of webhook notifications by target and outcome (ok, timeout, connection, 3xx, 4xx, 429, 5xx).",
    ["target", "outcome"],
)
NOTIFICATION_SECONDS = Histogram(
    "shipyard_operator_notification_delivery_seconds",
    "From the event to its delivery (or to giving up), retries included, per target.", ["target"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
NOTIFICATION_QUEUE = Gauge("shipyard_operator_notification_queue", "Webhook notifications waiting or in delivery.")


def forget(namespace: str, name: str) -> None:
    """Drops a deleted object's series so that they do not linger."""
    for collector in (PHASE, ROLLBACKS):
        with contextlib.suppress(KeyError):
            collector.remove(namespace, name)
