"""The ``scrape`` metric provider: a sample read directly from the version's pods' ``/metrics``. Does I/O (HTTP).

Spec fragment ``metrics[].scrape {metric, labels, aggregation, rate}``. The scraper keeps, in memory, the previous
snapshot of each (namespace, name, metric, version) to compute increases over the interval; ``rate: true`` has no
data until its second measurement (and again after an operator restart). Targets are ``host:port`` of the version's
own ready pods, chosen by the caller (``egress.assess_scrape_pod``); anything else (a URL, a path, a scheme) is
refused. The counter arithmetic here (increases with Prometheus' reset rule, error share, histogram quantile) is
pure and also serves ``builtin`` metrics scraped without a Prometheus.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, ClassVar, Final, Literal, TypeAlias

from prometheus_client import parser as prom_parser
from pydantic import Field

from shipyard import contract
from shipyard.contract import schema
from shipyard.operator import analysis
from shipyard.operator.providers import base, prometheus

if TYPE_CHECKING:
    from shipyard.operator import spec as spec_mod

STALE_SNAPSHOT_SECONDS: Final = 3 * 3600.0  # longer than the longest interval (1h)
DEFAULT_RELATIVE_FLOOR: Final = 0.001
ERROR_CODE_PREFIX: Final = "5"  # errorRate = share of 5xx responses
LATENCY_QUANTILE: Final = 0.99
_HOSTNAME_RE: Final = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[-A-Za-z0-9]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*"
)
_PORT_RE: Final = re.compile(r"[1-9][0-9]{0,4}")
_STATE: Final = "scrape.previous"


class Scrape(schema.ApiModel):
    """A metric read directly from the candidate pods' /metrics (no Prometheus needed)."""

    metric: Annotated[str, Field(max_length=256, pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")]
    """Name of the Prometheus sample, e.g. shipyard_inflight_requests."""
    labels: Annotated[dict[str, Annotated[str, Field(max_length=256)]], Field(json_schema_extra=schema.k8s(
        max_properties=16, validations=[schema.Cel("self.all(k, size(k) <= 256)",
                                                   "scrape label names must be at most 256 characters")]))] = Field(
        default_factory=dict)
    """Label values the samples must have."""
    aggregation: Literal["sum", "avg", "max", "min"] = "sum"
    """How the matching samples of all candidate pods are combined. Default sum."""
    rate: bool = False
    """For counters, judge the per-second increase since the previous scrape instead of the value. Default false."""


# ---------------------------------------------------------------------------------------------------------------
# Pure computation over parsed samples

SeriesKey: TypeAlias = tuple[str, tuple[tuple[str, str], ...]]  # sample name, sorted (label, value) pairs


@dataclass(frozen=True)
class SeriesSample:
    """One scraped sample; ``created`` is the ``_created`` timestamp of its series when exported (resets)."""

    value: float
    created: float | None = None


TargetSnapshot: TypeAlias = Mapping[SeriesKey, SeriesSample]  # one pod's samples


def build_series_key(name: str, labels: Mapping[str, str]) -> SeriesKey:
    return name, tuple(sorted(labels.items()))


def build_target_increases(
    previous: Mapping[str, TargetSnapshot] | None, current: Mapping[str, TargetSnapshot]
) -> dict[tuple[str, SeriesKey], float]:
    """Increase of each counter series of each target (pod) since ``previous``.

    Per series as Prometheus' ``increase``: current - previous, or the whole current value after a counter reset
    (the value went down, or the series' ``_created`` timestamp changed: the pod restarted). A series or a pod
    absent from ``previous`` (a new pod, a first 5xx, or no previous snapshot at all) counts from zero: its
    counters started after the previous snapshot, or, for the first snapshot, at the pod's start.
    """
    out: dict[tuple[str, SeriesKey], float] = {}
    for target, series in current.items():
        before = previous.get(target, {}) if previous is not None else {}
        for key, sample in series.items():
            old = before.get(key)
            reset = old is None or sample.value < old.value or (
                sample.created is not None and old.created is not None and sample.created != old.created)
            out[(target, key)] = sample.value if reset or old is None else sample.value - old.value
    return out


def build_series_increase(
    previous: Mapping[str, TargetSnapshot] | None, current: Mapping[str, TargetSnapshot]
) -> dict[SeriesKey, float]:
    """``build_target_increases`` summed over the targets (pods), by series."""
    out: dict[SeriesKey, float] = {}
    for (_target, key), value in build_target_increases(previous, current).items():
        out[key] = out.get(key, 0.0) + value
    return out


def _matches(labels: Iterable[tuple[str, str]], wanted: Mapping[str, str]) -> bool:
    have = dict(labels)
    return all(have.get(k) == v for k, v in wanted.items())


def build_error_rate(increase: Mapping[SeriesKey, float], labels: Mapping[str, str] | None = None) -> float | None:
    """Share of 5xx in the increase of ``shipyard_requests_total`` (series matching ``labels``); None: no requests."""
    total = errors = 0.0
    for (name, series_labels), value in increase.items():
        if name != contract.METRIC_REQUESTS_TOTAL or not _matches(series_labels, labels or {}):
            continue
        total += value
        if dict(series_labels).get(contract.LABEL_CODE, "").startswith(ERROR_CODE_PREFIX):
            errors += value
    return errors / total if total > 0 else None


def build_histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float:
    """Quantile ``q`` of a histogram given as (upper bound, cumulative count) pairs, as Prometheus computes it.

    Linear interpolation inside the bucket holding the rank (the first bucket starts at 0 unless its bound is
    <= 0); a rank in the +Inf bucket gives the highest finite bound; NaN without a +Inf bucket, with fewer than
    two buckets or without observations; counts are forced monotonic; equal bounds are merged.
    """
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    merged: dict[float, float] = {}
    for bound, count in buckets:
        merged[bound] = merged.get(bound, 0.0) + count
    ordered = sorted(merged.items())
    if not ordered or not math.isinf(ordered[-1][0]) or ordered[-1][0] < 0:
        return math.nan
    if len(ordered) < 2:
        return math.nan
    monotonic: list[tuple[float, float]] = []
    highest = 0.0
    for bound, count in ordered:
        highest = max(highest, count)
        monotonic.append((bound, highest))
    observations = monotonic[-1][1]
    if observations <= 0:
        return math.nan
    rank = q * observations
    b = next((i for i in range(len(monotonic) - 1) if monotonic[i][1] >= rank), len(monotonic) - 1)
    if b == len(monotonic) - 1:
        return monotonic[-2][0]
    if b == 0 and monotonic[0][0] <= 0:
        return monotonic[0][0]
    start, (end, count) = 0.0, monotonic[b]
    if b > 0:
        start = monotonic[b - 1][0]
        count -= monotonic[b - 1][1]
        rank -= monotonic[b - 1][1]
    if count <= 0:  # rank 0 in an empty bucket: 0/0, NaN in Prometheus (Go divides without raising)
        return math.nan
    return start + (end - start) * (rank / count)


def build_latency_quantile(
    increase: Mapping[SeriesKey, float],
    q: float = LATENCY_QUANTILE,
    labels: Mapping[str, str] | None = None,
    metric: str = contract.METRIC_REQUEST_DURATION,
) -> float | None:
    """Quantile ``q`` of the ``<metric>_bucket`` increases matching ``labels``, summed by ``le``; None: no data."""
    by_le: dict[float, float] = {}
    bucket_name = metric + "_bucket"
    for (name, series_labels), value in increase.items():
        if name != bucket_name or not _matches(series_labels, labels or {}):
            continue
        le = dict(series_labels).get("le")
        try:
            bound = float(le) if le is not None else math.nan
        except ValueError:
            continue
        if not math.isnan(bound):
            by_le[bound] = by_le.get(bound, 0.0) + value
    value = build_histogram_quantile(q, by_le.items())
    return None if math.isnan(value) else value


def build_scrape_value(
    selector: Scrape,
    previous: Mapping[str, TargetSnapshot] | None,
    current: Mapping[str, TargetSnapshot],
    elapsed_seconds: float | None,
) -> float | None:
    """Value of a ``scrape`` metric: the matching samples of every pod, aggregated (sum, avg, max, min).

    With ``rate``, each series' per-second increase since ``previous`` (Prometheus' reset rule) is aggregated
    instead; series or pods absent from ``previous`` are left out, and without a previous snapshot (first
    measurement, or after an operator restart) there is no data. None: no matching sample.
    """
    values: list[float] = []
    if selector.rate:
        if previous is None or elapsed_seconds is None or elapsed_seconds <= 0:
            return None
        for (target, key), increase in build_target_increases(previous, current).items():
            if key[0] == selector.metric and _matches(key[1], selector.labels) and key in previous.get(target, {}):
                values.append(increase / elapsed_seconds)
    else:
        for series in current.values():
            for (name, labels), sample in series.items():
                if name == selector.metric and _matches(labels, selector.labels):
                    values.append(sample.value)
    if not values:
        return None
    if selector.aggregation == "avg":
        return sum(values) / len(values)
    if selector.aggregation == "max":
        return max(values)
    if selector.aggregation == "min":
        return min(values)
    return sum(values)


def build_scrape_url(target: str, path: str = contract.PATH_METRICS) -> str:
    """``http://host:port<path>`` (``/metrics`` by default) for a ``host:port`` target (IPv4, [IPv6] or a hostname);
    else ValueError."""
    host, sep, port = target.rpartition(":")
    if not sep or not _PORT_RE.fullmatch(port) or int(port) > 65535:
        raise ValueError(f"scrape target {target!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"scrape target {target!r} has an invalid IPv6 address") from None
    elif not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(f"scrape target {target!r} is not an IP address or a hostname with a port")
    elif host.replace(".", "").isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"scrape target {target!r} has an invalid IPv4 address") from None
    if not path.startswith("/") or any(c in path for c in " ?#"):
        raise ValueError(f"metrics path {path!r} is not an absolute path")
    return f"http://{host}:{port}{path}"


def build_target_snapshot(text: str, wanted: Callable[[str, Mapping[str, str]], bool]) -> dict[
        SeriesKey, SeriesSample]:
    """The samples of a ``/metrics`` text for which ``wanted(name, labels)`` holds, with their series' ``_created``.

    Malformed text raises ValueError (from prometheus_client's parser).
    """
    values: dict[SeriesKey, float] = {}
    created: dict[SeriesKey, float] = {}
    for family in prom_parser.text_string_to_metric_families(text):
        for sample in family.samples:
            labels = {str(k): str(v) for k, v in sample.labels.items()}
            if sample.name.endswith("_created"):
                created[build_series_key(sample.name, labels)] = float(sample.value)
            if wanted(sample.name, labels):
                values[build_series_key(sample.name, labels)] = float(sample.value)
    out: dict[SeriesKey, SeriesSample] = {}
    for key, value in values.items():
        name, series_labels = key
        base_name = re.sub(r"_(total|bucket|count|sum)$", "", name)
        created_key = (base_name + "_created", tuple(kv for kv in series_labels if kv[0] != "le"))
        out[key] = SeriesSample(value=value, created=created.get(created_key))
    return out


# ---------------------------------------------------------------------------------------------------------------
# I/O: scraping a version's pods, keeping the previous snapshot


@dataclass
class _Previous:
    at: float
    snapshot: dict[str, dict[SeriesKey, SeriesSample]] = field(default_factory=dict)


@dataclass(frozen=True)
class Scraped:
    """Two consecutive snapshots of one series of measurements: ``before`` None on the first one."""

    before: Mapping[str, TargetSnapshot] | None
    current: Mapping[str, TargetSnapshot]
    elapsed: float | None


async def fetch_metrics(env: base.Env, url: str) -> str:
    """The exposition text at ``url``; anything but HTTP 200 raises ProviderError."""
    status, body = await env.http.fetch(url, allow_redirects=False)
    if status != 200:
        raise base.ProviderError(f"HTTP {status} from {url}")
    return body.decode("utf-8", "replace")


async def query_snapshots(env: base.Env, request: base.MeasurementRequest,
                          wanted: Callable[[str, Mapping[str, str]], bool]) -> Scraped | None:
    """Scrapes the request's targets and returns this snapshot with the previous one of the same series (kept in
    ``env.state``); None when there are no ready pods. Raises ProviderError / ValueError on failures."""
    urls = [build_scrape_url(t, request.metrics_path) for t in request.targets]
    if not urls:
        return None
    texts = await asyncio.gather(*(fetch_metrics(env, u) for u in urls), return_exceptions=True)
    current: dict[str, dict[SeriesKey, SeriesSample]] = {}
    for target, url, text in zip(request.targets, urls, texts, strict=True):
        if isinstance(text, BaseException):
            raise text
        try:
            current[target] = build_target_snapshot(text, wanted)
        except (ValueError, TypeError, IndexError) as exc:
            raise base.ProviderError(f"malformed metrics text from {url}: {exc}") from exc
    store: dict[tuple[str, ...], _Previous] = env.state.setdefault(_STATE, {})
    now = env.clock()
    for key in [k for k, p in store.items() if now - p.at > STALE_SNAPSHOT_SECONDS]:
        del store[key]
    previous = store.get(request.key)
    store[request.key] = _Previous(at=now, snapshot=current)
    return Scraped(before=None if previous is None else previous.snapshot, current=current,
                   elapsed=None if previous is None else now - previous.at)


def build_description(request: base.MeasurementRequest, what: str, scraped: Scraped | None, *, windowed: bool,
                      first_note: str) -> str:
    """What a scrape measured, shown in status (``query``)."""
    if windowed and scraped is not None and scraped.elapsed is not None:
        what += f" over the last {scraped.elapsed:.0f}s"
    elif windowed and scraped is not None:
        what += first_note
    suffix = ": no ready pods" if scraped is None else ""
    return f"scrape of {len(request.targets)} pod(s): {what}{suffix}"


class ScrapeBackend:
    key: ClassVar[str] = "scrape"
    planned: ClassVar[bool] = False

    def uses_pods(self, metric: spec_mod.Metric, analysis_spec: spec_mod.Analysis, env: base.Env) -> bool:
        return True

    def spec_address(self, metric: spec_mod.Metric, analysis_spec: spec_mod.Analysis,
                     index: int) -> tuple[str, str] | None:
        return None  # only the version's own pods, chosen by the operator

    def relative_floor(self, metric: spec_mod.Metric) -> float:
        return DEFAULT_RELATIVE_FLOOR

    async def measure(self, request: base.MeasurementRequest, env: base.Env) -> analysis.Sample:
        selector = request.metric.scrape
        assert selector is not None
        name = selector.metric
        scraped = await query_snapshots(env, request, lambda sample, labels: sample == name)
        what = f"{selector.aggregation} of {'rate of ' if selector.rate else ''}{selector.metric}"
        if selector.labels:
            what += prometheus.build_selector(selector.labels)
        query = build_description(request, what, scraped, windowed=selector.rate,
                                  first_note=" (first scrape: no rate yet)")
        if scraped is None:
            return analysis.Sample(value=None, query=query)
        value = build_scrape_value(selector, scraped.before, scraped.current, scraped.elapsed)
        return analysis.Sample(value=value, query=query)


BACKEND: Final = ScrapeBackend()
