"""Prometheus metrics of the inference server, under the names of the operator contract.

No I/O. The server observes several values per request, so the values live in plain Python counters and
bucket arrays, updated without locks on the server's event loop (the only writer, and the only reader: the
`/metrics` handler runs there too), and a prometheus-client `Collector` turns them into metric families at
scrape time; `build_exposition` renders them in the Prometheus text format with prometheus-client. Each
server has its own `CollectorRegistry`, so several servers can share a process in tests.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from shipyard import contract
from shipyard.runtime import oip

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
HTTP_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"})
# Every status an inference request can be answered with (success and the typed errors' mapping), exported at 0
# from the start: Prometheus' rate() needs a series to exist before its first increase, so an error series born
# on the first 5xx would hide those first errors (and read 0 through the errorRate query's `or vector(0)`) until a
# later scrape; a `scrape` metric with `rate: true` likewise skips a series absent from the previous snapshot.
PRECREATED_CODES = tuple(sorted({200, *oip.STATUS_BY_ERROR.values()}))


class GpuReading(Protocol):
    """One CUDA device's numbers at scrape time (`engine.GpuStats` is one)."""

    @property
    def device(self) -> str: ...

    @property
    def allocated_bytes(self) -> int: ...

    @property
    def reserved_bytes(self) -> int: ...

    @property
    def utilization(self) -> float | None: ...  # 0..1; None when NVML cannot tell (nvidia-ml-py not installed)


class Histogram:
    """Bucket counts and a sum; `observe` is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # "le": a value equal to a bound is in its bucket
        self.sum += value

    def build_buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs ending with +Inf, as Prometheus histograms are exposed."""
        buckets = []
        total = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            total += count
            buckets.append((prometheus_client.utils.floatToGoString(bound), float(total)))  # type: ignore[no-untyped-call]
        buckets.append(("+Inf", float(total + self.counts[-1])))
        return buckets

    @property
    def count(self) -> int:
        return sum(self.counts)


class Gauge:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class ServerMetrics:
    """All metrics of one server; labels are the model and its version (plus code / method, route, status).

    ``shipyard_requests_total`` has a series at 0 for each of ``PRECREATED_CODES`` from the start (see there).
    """

    def __init__(self, model: str, version: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model = model
        self.version = version
        self.requests: dict[int, int] = dict.fromkeys(PRECREATED_CODES, 0)  # status code -> requests answered
        self.request_duration = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.queue_duration = Histogram(LATENCY_BUCKETS)
        self.inflight = Gauge()
        self.queue_depth: Callable[[], int] = lambda: 0  # the batcher's queue length, read at scrape time
        self.model_ready = Gauge()
        self.http: dict[tuple[str, str, int], Histogram] = {}
        # the gRPC front end's inference requests (`enable_grpc`), by the HTTP status of the same outcome
        self.grpc_requests: dict[int, int] | None = None
        self.grpc_request_duration: Histogram | None = None
        # other front ends' requests (protocol -> codes, latency): "openai" for /v1/embeddings, on first use
        self.protocols: dict[str, tuple[dict[int, int], Histogram]] = {}
        self.registry.register(_ServerCollector(self))

    def enable_grpc(self) -> None:
        """Export gRPC inference requests too (protocol="grpc"), their codes pre-created at 0 as for HTTP."""
        self.grpc_requests = dict.fromkeys(PRECREATED_CODES, 0)
        self.grpc_request_duration = Histogram(LATENCY_BUCKETS)

    def observe_grpc_request(self, status: int, seconds: float) -> None:
        """One gRPC inference request answered after `seconds`, with the outcome HTTP would answer `status`."""
        requests = self.grpc_requests
        assert requests is not None and self.grpc_request_duration is not None
        requests[status] = requests.get(status, 0) + 1
        self.grpc_request_duration.observe(seconds)

    def observe_protocol_request(self, protocol: str, status: int, seconds: float) -> None:
        """One request of another front end (`protocol`: contract.PROTOCOL_OPENAI) answered with `status`."""
        entry = self.protocols.get(protocol)
        if entry is None:
            entry = self.protocols[protocol] = (dict.fromkeys(PRECREATED_CODES, 0), Histogram(LATENCY_BUCKETS))
        entry[0][status] = entry[0].get(status, 0) + 1
        entry[1].observe(seconds)

    def observe_request(self, status: int, seconds: float) -> None:
        """One inference request answered with `status` after `seconds`."""
        requests = self.requests
        requests[status] = requests.get(status, 0) + 1
        self.request_duration.observe(seconds)

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        """Any HTTP request, labelled by its route template (never the raw path)."""
        key = (method, route, status)
        histogram = self.http.get(key)
        if histogram is None:
            if method not in HTTP_METHODS:
                key = ("OTHER", route, status)
                histogram = self.http.get(key)
            if histogram is None:
                histogram = self.http[key] = Histogram(LATENCY_BUCKETS)
        histogram.observe(seconds)

    def observe_batch(self, rows: int, queue_waits: Iterable[float]) -> None:
        self.batch_size.observe(rows)
        observe = self.queue_duration.observe
        for wait in queue_waits:
            observe(wait)

    def register_gpu(self, fetch: Callable[[], Iterable[GpuReading]]) -> None:
        """Export GPU memory/utilisation gauges, read from `fetch()` at scrape time (see `build_gpu_families`)."""
        self.registry.register(_GpuCollector(self.model, self.version, fetch))

    def build_exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


class _ServerCollector(Collector):
    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        m = self._metrics
        values = [m.model, m.version]
        labels = [contract.LABEL_MODEL, contract.LABEL_VERSION]
        requests = CounterMetricFamily(
            contract.METRIC_REQUESTS_TOTAL,
            "Inference requests by HTTP status code (for gRPC, the status HTTP answers for the same outcome).",
            labels=[*labels, contract.LABEL_CODE, contract.LABEL_PROTOCOL],
        )
        for code, count in sorted(m.requests.items()):
            requests.add_metric([*values, str(code), contract.PROTOCOL_HTTP], count)
        if m.grpc_requests is not None:
            for code, count in sorted(m.grpc_requests.items()):
                requests.add_metric([*values, str(code), contract.PROTOCOL_GRPC], count)
        for protocol, (codes, _) in sorted(m.protocols.items()):
            for code, count in sorted(codes.items()):
                requests.add_metric([*values, str(code), protocol], count)
        yield requests
        duration = HistogramMetricFamily(
            contract.METRIC_REQUEST_DURATION,
            "Inference request latency, from the first byte of the request to the response (seconds).",
            labels=[*labels, contract.LABEL_PROTOCOL],
        )
        duration.add_metric([*values, contract.PROTOCOL_HTTP], m.request_duration.build_buckets(),
                            m.request_duration.sum)
        if m.grpc_request_duration is not None:
            duration.add_metric([*values, contract.PROTOCOL_GRPC], m.grpc_request_duration.build_buckets(),
                                m.grpc_request_duration.sum)
        for protocol, (_, histogram) in sorted(m.protocols.items()):
            duration.add_metric([*values, protocol], histogram.build_buckets(), histogram.sum)
        yield duration
        for name, documentation, histogram in (
            (contract.METRIC_BATCH_SIZE, "Rows per batch handed to the model.", m.batch_size),
            (
                contract.METRIC_QUEUE_DURATION,
                "Time a request waited in the batching queue before its batch started (seconds).",
                m.queue_duration,
            ),
        ):
            family = HistogramMetricFamily(name, documentation, labels=labels)
            family.add_metric(values, histogram.build_buckets(), histogram.sum)
            yield family
        inflight = GaugeMetricFamily(
            contract.METRIC_INFLIGHT, "Inference requests received and not yet answered.", labels=labels
        )
        inflight.add_metric(values, m.inflight.value)
        yield inflight
        queue = GaugeMetricFamily(
            contract.METRIC_QUEUE_DEPTH, "Inference requests waiting in the batching queue for a batch.", labels=labels)
        queue.add_metric(values, m.queue_depth())
        yield queue
        cpu = CounterMetricFamily(
            contract.METRIC_CPU_SECONDS, "CPU time of the server process, user and system, all threads (seconds).",
            labels=labels)
        cpu.add_metric(values, time.process_time())
        yield cpu
        ready = GaugeMetricFamily(
            contract.METRIC_MODEL_READY,
            "1 when the model is loaded, warmed up and the server is not draining.",
            labels=labels,
        )
        ready.add_metric(values, m.model_ready.value)
        yield ready
        http = HistogramMetricFamily(
            contract.METRIC_HTTP_DURATION,
            "HTTP request latency by method, route template and status (seconds).",
            labels=["method", "path", "status"],
        )
        for (method, route, status), histogram in sorted(m.http.items()):
            http.add_metric([method, route, str(status)], histogram.build_buckets(), histogram.sum)
        yield http


def build_gpu_families(model: str, version: str, readings: Iterable[GpuReading]) -> list[GaugeMetricFamily]:
    """The GPU gauges for one scrape: per device, allocated and reserved memory and, when the reading has one,
    utilisation (a device whose utilisation is unknown has no utilisation sample, rather than a false 0). Pure."""
    labels = [contract.LABEL_MODEL, contract.LABEL_VERSION, contract.LABEL_DEVICE]
    allocated = GaugeMetricFamily(
        contract.METRIC_GPU_MEMORY_ALLOCATED, "GPU memory held by tensors (bytes).", labels=labels
    )
    reserved = GaugeMetricFamily(
        contract.METRIC_GPU_MEMORY_RESERVED, "GPU memory reserved by the caching allocator (bytes).", labels=labels
    )
    utilization = GaugeMetricFamily(
        contract.METRIC_GPU_UTILIZATION, "GPU utilisation over the driver's last sample period (0..1).", labels=labels
    )
    for reading in readings:
        values = [model, version, reading.device]
        allocated.add_metric(values, reading.allocated_bytes)
        reserved.add_metric(values, reading.reserved_bytes)
        if reading.utilization is not None:
            utilization.add_metric(values, reading.utilization)
    return [allocated, reserved, utilization]


class _GpuCollector(Collector):
    def __init__(self, model: str, version: str, fetch: Callable[[], Iterable[GpuReading]]) -> None:
        self._values = (model, version)
        self._fetch = fetch

    def collect(self) -> Iterable[Metric]:
        return build_gpu_families(*self._values, self._fetch())


SIMILARITY_BUCKETS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999, 1.0)
DIFFERENCE_BUCKETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)


class ShadowMetrics:
    """Shadow traffic's counters (the stable's server copies requests to a candidate and compares the answers),
    in the server's registry: requests by outcome (every outcome at 0 from the start, for rate()), compared rows
    and agreeing rows, copies in flight, and per row the cosine similarity (cosine) or max |difference| (maxabs)."""

    def __init__(self, server: ServerMetrics, candidate: str, compare: str) -> None:
        self.model = server.model
        self.version = server.version
        self.candidate = candidate
        self.compare = compare
        self.outcomes: dict[str, int] = dict.fromkeys(contract.SHADOW_OUTCOMES, 0)
        self.rows = 0
        self.agreeing_rows = 0
        self.inflight = Gauge()
        self.scores: Histogram | None = None
        if compare == "cosine":
            self.scores = Histogram(SIMILARITY_BUCKETS)
        elif compare == "maxabs":
            self.scores = Histogram(DIFFERENCE_BUCKETS)
        self._registry = server.registry
        self._collector = _ShadowCollector(self)
        server.registry.register(self._collector)

    def close(self) -> None:
        """Removes these series from the server's metrics (shadowing to this candidate ended): a later shadow period
        to the same candidate counts from zero again."""
        self._registry.unregister(self._collector)

    def observe_outcome(self, outcome: str) -> None:
        self.outcomes[outcome] += 1

    def observe_comparison(self, rows: int, agreeing: int, scores: Iterable[float]) -> None:
        self.outcomes["compared"] += 1
        self.rows += rows
        self.agreeing_rows += agreeing
        if self.scores is not None:
            observe = self.scores.observe
            for score in scores:
                observe(score)


class _ShadowCollector(Collector):
    def __init__(self, metrics: ShadowMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        m = self._metrics
        labels = [contract.LABEL_MODEL, contract.LABEL_VERSION, contract.LABEL_CANDIDATE]
        values = [m.model, m.version, m.candidate]
        requests = CounterMetricFamily(
            contract.METRIC_SHADOW_REQUESTS,
            "Inference requests copied to the candidate (shadow traffic), by outcome: compared, dropped (too many in "
            "flight), timeout, error.", labels=[*labels, contract.LABEL_OUTCOME])
        for outcome, count in m.outcomes.items():
            requests.add_metric([*values, outcome], count)
        yield requests
        compared = [*labels, contract.LABEL_COMPARE]
        rows = CounterMetricFamily(contract.METRIC_SHADOW_ROWS, "Rows of the compared answers (shadow traffic).",
                                   labels=compared)
        rows.add_metric([*values, m.compare], m.rows)
        yield rows
        agreeing = CounterMetricFamily(
            contract.METRIC_SHADOW_AGREEING_ROWS,
            "Rows on which the candidate's answer agreed with the stable's (top-1 equal, cosine >= 1 - tolerance, or "
            "max |difference| <= tolerance).", labels=compared)
        agreeing.add_metric([*values, m.compare], m.agreeing_rows)
        yield agreeing
        inflight = GaugeMetricFamily(contract.METRIC_SHADOW_INFLIGHT,
                                     "Copies sent to the candidate and not yet answered.", labels=labels)
        inflight.add_metric(values, m.inflight.value)
        yield inflight
        if m.scores is not None:
            if m.compare == "cosine":
                name, documentation = (contract.METRIC_SHADOW_SIMILARITY,
                                       "Cosine similarity of each compared row, candidate against stable.")
            else:
                name, documentation = (contract.METRIC_SHADOW_DIFFERENCE,
                                       "Max absolute difference of each compared row, candidate against stable.")
            family = HistogramMetricFamily(name, documentation, labels=labels)
            family.add_metric(values, m.scores.build_buckets(), m.scores.sum)
            yield family
