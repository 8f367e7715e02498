"""Prometheus metrics of the inference server, under the names of the operator contract.

No I/O of its own: metrics live in a per-server `CollectorRegistry` (so several servers can share a process in
tests) and are rendered by `build_exposition`. Label children are resolved once and cached, because the hot
path observes several metrics per request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shipyard.operator import contract

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
METRIC_GPU_MEMORY_ALLOCATED = "shipyard_gpu_memory_allocated_bytes"
METRIC_GPU_MEMORY_RESERVED = "shipyard_gpu_memory_reserved_bytes"
METRIC_GPU_UTILIZATION = "shipyard_gpu_utilization_ratio"
HTTP_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"})


class ServerMetrics:
    """All metrics of one server (model + version fixed at construction)."""

    def __init__(self, model: str, version: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model = model
        self.version = version
        labels = (contract.LABEL_MODEL, contract.LABEL_VERSION)
        values = (model, version)
        self._requests = Counter(
            contract.METRIC_REQUESTS_TOTAL,
            "Inference requests by HTTP status code.",
            (*labels, contract.LABEL_CODE),
            registry=self.registry,
        )
        self.request_duration = Histogram(
            contract.METRIC_REQUEST_DURATION,
            "Inference request latency, from the first byte of the request to the response (seconds).",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        ).labels(*values)
        self.batch_size = Histogram(
            contract.METRIC_BATCH_SIZE,
            "Rows per batch handed to the model.",
            labels,
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        ).labels(*values)
        self.queue_duration = Histogram(
            contract.METRIC_QUEUE_DURATION,
            "Time a request waited in the batching queue before its batch started (seconds).",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        ).labels(*values)
        self.inflight = Gauge(
            contract.METRIC_INFLIGHT,
            "Inference requests received and not yet answered.",
            labels,
            registry=self.registry,
        ).labels(*values)
        self.model_ready = Gauge(
            contract.METRIC_MODEL_READY,
            "1 when the model is loaded, warmed up and the server is not draining.",
            labels,
            registry=self.registry,
        ).labels(*values)
        self._http = Histogram(
            contract.METRIC_HTTP_DURATION,
            "HTTP request latency by method, route template and status (seconds).",
            ("method", "path", "status"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._request_children: dict[int, Any] = {}
        self._http_children: dict[tuple[str, str, int], Any] = {}
        self.model_ready.set(0)

    def observe_request(self, status: int, seconds: float) -> None:
        """One inference request answered with `status` after `seconds`."""
        child = self._request_children.get(status)
        if child is None:
            child = self._requests.labels(self.model, self.version, str(status))
            self._request_children[status] = child
        child.inc()
        self.request_duration.observe(seconds)

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        """Any HTTP request, labelled by its route template (never the raw path)."""
        key = (method, route, status)
        child = self._http_children.get(key)
        if child is None:
            label_method = method if method in HTTP_METHODS else "OTHER"
            child = self._http.labels(label_method, route, str(status))
            self._http_children[key] = child
        child.observe(seconds)

    def observe_batch(self, rows: int, queue_waits: Iterable[float]) -> None:
        self.batch_size.observe(rows)
        observe = self.queue_duration.observe
        for wait in queue_waits:
            observe(wait)

    def register_gpu(self, fetch: Callable[[], Sequence[Any]]) -> None:
        """Export GPU memory/utilisation gauges, read from `fetch()` at scrape time."""
        self.registry.register(_GpuCollector(self.model, self.version, fetch))

    def build_exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


class _GpuCollector(Collector):
    def __init__(self, model: str, version: str, fetch: Callable[[], Sequence[Any]]) -> None:
        self._values = (model, version)
        self._fetch = fetch

    def collect(self) -> Iterable[GaugeMetricFamily]:
        labels = [contract.LABEL_MODEL, contract.LABEL_VERSION, "device"]
        allocated = GaugeMetricFamily(METRIC_GPU_MEMORY_ALLOCATED, "GPU memory held by tensors (bytes).", labels=labels)
        reserved = GaugeMetricFamily(
            METRIC_GPU_MEMORY_RESERVED, "GPU memory reserved by the caching allocator (bytes).", labels=labels
        )
        utilization = GaugeMetricFamily(
            METRIC_GPU_UTILIZATION,
            "GPU utilisation over the driver's last sample period (0..1).",
            labels=labels,
        )
        for stats in self._fetch():
            values = [*self._values, stats.device]
            allocated.add_metric(values, stats.allocated_bytes)
            reserved.add_metric(values, stats.reserved_bytes)
            if stats.utilization is not None:
                utilization.add_metric(values, stats.utilization)
        return [allocated, reserved, utilization]
