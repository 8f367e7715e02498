"""The providers' own arithmetic: builtin and user PromQL (``providers.builtin``, ``providers.prometheus``), and the
counter arithmetic of direct scrapes (``providers.scrape``): increases with resets, error share, histogram quantiles,
user scrape values. Pure: no I/O (the providers' HTTP is tested in test_providers.py)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shipyard import contract
from shipyard.operator.providers import builtin as builtin_provider
from shipyard.operator.providers import prometheus, scrape

INF = math.inf
NAN = math.nan


# ---------------------------------------------------------------------------------------------------------------
# Queries


@pytest.mark.parametrize(
    ("builtin", "namespace_label", "expected"),
    [
        pytest.param(
            "errorRate", "namespace",
            '(sum(rate(shipyard_requests_total{namespace="ml",model="digits",version="1.4.0",code=~"5.."}[60s]))'
            ' or vector(0)) / sum(rate(shipyard_requests_total{namespace="ml",model="digits",version="1.4.0"}[60s]))',
            id="error-rate",
        ),
        pytest.param(
            "latencyP99", "namespace",
            "histogram_quantile(0.99, sum by (le) (rate(shipyard_request_duration_seconds_bucket"
            '{namespace="ml",model="digits",version="1.4.0"}[60s])))',
            id="latency-p99",
        ),
        pytest.param(
            "latencyP99", None,
            'histogram_quantile(0.99, sum by (le) (rate(shipyard_request_duration_seconds_bucket'
            '{model="digits",version="1.4.0"}[60s])))',
            id="without-namespace-label",
        ),
        pytest.param(
            "errorRate", "kubernetes_namespace",
            '(sum(rate(shipyard_requests_total{kubernetes_namespace="ml",model="digits",version="1.4.0",code=~"5.."}'
            '[60s])) or vector(0)) / sum(rate(shipyard_requests_total{kubernetes_namespace="ml",model="digits",'
            'version="1.4.0"}[60s]))',
            id="custom-namespace-label",
        ),
    ],
)
def test_builtin_queries(builtin: builtin_provider.Builtin, namespace_label: str | None, expected: str) -> None:
    query = builtin_provider.build_builtin_query(builtin, "ml", "digits", "1.4.0", "60s",
                                                 namespace_label=namespace_label)
    assert query == expected
    assert contract.METRIC_REQUESTS_TOTAL in query or contract.METRIC_REQUEST_DURATION in query


def test_builtin_query_escapes_label_values() -> None:
    query = builtin_provider.build_builtin_query("errorRate", "ml", 'a"b\\c', "1", "60s")
    assert 'model="a\\"b\\\\c"' in query


def test_unknown_builtin_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown builtin"):
        builtin_provider.build_builtin_query("throughput", "ml", "m", "1", "60s")  # type: ignore[arg-type, unused-ignore]


@pytest.mark.parametrize(
    ("interval", "minimum", "window"),
    [
        pytest.param(15.0, 60.0, "60s", id="at-least-a-minute"),
        pytest.param(120.0, 60.0, "120s", id="interval"),
        pytest.param(2.5, 1.0, "3s", id="rounded-up"),
    ],
)
def test_query_window(interval: float, minimum: float, window: str) -> None:
    assert builtin_provider.build_query_window(interval, minimum) == window


@pytest.mark.parametrize(
    ("template", "stable", "expected"),
    [
        pytest.param('x{namespace="{{namespace}}",model="{{name}}",version="{{version}}"}', "1.3",
                     'x{namespace="ml",model="digits",version="1.4"}', id="all-placeholders"),
        pytest.param('a{version="{{version}}"} / a{version="{{stableVersion}}"}', "1.3",
                     'a{version="1.4"} / a{version="1.3"}', id="stable-version"),
        pytest.param('a{version="{{stableVersion}}"}', None, 'a{version=""}', id="no-stable-version"),
        pytest.param("sum(up)", "1.3", "sum(up)", id="no-placeholders"),
        pytest.param("{{version}}{{version}}", "1.3", "1.41.4", id="repeated"),
        pytest.param("{{ version }} {{unknown}}", "1.3", "{{ version }} {{unknown}}", id="unknown-left-alone"),
    ],
)
def test_render_query(template: str, stable: str | None, expected: str) -> None:
    assert prometheus.render_query(template, "ml", "digits", "1.4", stable) == expected


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        pytest.param('1"} or vector(1) #', '1\\"} or vector(1) #', id="quote-injection"),
        pytest.param("a\\b", "a\\\\b", id="backslash"),
        pytest.param("a\nb", "a\\nb", id="newline"),
        pytest.param("{{name}}", "{{name}}", id="placeholder-in-value-not-replaced"),
    ],
)
def test_render_query_escapes_values(value: str, escaped: str) -> None:
    assert prometheus.render_query('v="{{version}}"', "ml", "digits", value, None) == f'v="{escaped}"'


# ---------------------------------------------------------------------------------------------------------------
# Histogram quantile (as Prometheus' histogram_quantile)

BUCKETS = [(0.1, 10.0), (0.2, 20.0), (0.5, 100.0), (INF, 100.0)]


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        pytest.param(0.99, BUCKETS, 0.2 + 0.3 * 79 / 80, id="p99-interpolated"),
        pytest.param(0.5, BUCKETS, 0.2 + 0.3 * 30 / 80, id="p50"),
        pytest.param(0.1, BUCKETS, 0.1, id="rank-at-bucket-edge"),
        pytest.param(0.05, BUCKETS, 0.05, id="first-bucket-from-zero"),
        pytest.param(1.0, BUCKETS, 0.2 + 0.3 * 80 / 80, id="q1"),
        pytest.param(0.0, BUCKETS, 0.0, id="q0"),
        pytest.param(0.0, [(0.1, 0.0), (0.2, 5.0), (INF, 5.0)], NAN, id="q0-empty-first-bucket-nan-as-prometheus"),
        pytest.param(0.99, [(0.1, 0.0), (0.5, 1.0), (INF, 10.0)], 0.5, id="rank-in-inf-bucket"),
        pytest.param(0.5, [(INF, 10.0), (0.5, 10.0), (0.1, 0.0)], 0.3, id="unsorted-input"),
        pytest.param(0.5, [(-1.0, 6.0), (0.0, 8.0), (INF, 10.0)], -1.0, id="negative-first-bound"),
        pytest.param(0.5, [(0.1, 5.0), (0.2, 4.0), (INF, 10.0)], 0.1, id="non-monotonic-forced"),
        pytest.param(0.5, [(0.1, 2.0), (0.1, 3.0), (1.0, 10.0), (INF, 10.0)], 0.1, id="equal-bounds-merged"),
        pytest.param(0.99, [(0.1, 0.0), (0.2, 0.0), (INF, 0.0)], NAN, id="no-observations"),
        pytest.param(0.99, [(0.1, 1.0), (0.2, 2.0)], NAN, id="no-inf-bucket"),
        pytest.param(0.99, [(INF, 5.0)], NAN, id="only-inf-bucket"),
        pytest.param(0.99, [], NAN, id="empty"),
        pytest.param(-0.1, BUCKETS, -INF, id="q-below-0"),
        pytest.param(1.1, BUCKETS, INF, id="q-above-1"),
        pytest.param(NAN, BUCKETS, NAN, id="q-nan"),
    ],
)
def test_histogram_quantile(q: float, buckets: Sequence[tuple[float, float]], expected: float) -> None:
    got = scrape.build_histogram_quantile(q, buckets)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected)


@given(
    counts=st.lists(st.integers(min_value=0, max_value=1000), min_size=1, max_size=10),
    q=st.floats(min_value=0.0, max_value=1.0),
)
def test_histogram_quantile_stays_within_its_bucket(counts: list[int], q: float) -> None:
    """For any histogram, the quantile lies in the bucket whose cumulative count first reaches the rank."""
    bounds = [0.001 * 2**i for i in range(len(counts))]
    cumulative = [sum(counts[: i + 1]) for i in range(len(counts))]
    buckets = [*zip(bounds, map(float, cumulative), strict=True), (INF, float(cumulative[-1]))]
    got = scrape.build_histogram_quantile(q, buckets)
    if cumulative[-1] == 0:
        assert math.isnan(got)
        return
    rank = q * cumulative[-1]
    b = next(i for i, c in enumerate(cumulative) if c >= rank)
    if counts[b] == 0:  # rank 0 in an empty bucket: 0/0, NaN in Prometheus too
        assert rank == 0 and math.isnan(got)
        return
    low = bounds[b - 1] if b > 0 else 0.0
    assert low - 1e-12 <= got <= bounds[b] + 1e-12


# ---------------------------------------------------------------------------------------------------------------
# Direct scrape: increases with counter resets, error rate, latency


def key(name: str, **labels: str) -> scrape.SeriesKey:
    return scrape.build_series_key(name, labels)


REQ = contract.METRIC_REQUESTS_TOTAL
OK_SERIES = key(REQ, model="m", version="1", code="200")
ERR_SERIES = key(REQ, model="m", version="1", code="503")


def pod(ok: float, err: float | None = None, created: float | None = 100.0) -> dict[
        scrape.SeriesKey, scrape.SeriesSample]:
    out = {OK_SERIES: scrape.SeriesSample(ok, created)}
    if err is not None:
        out[ERR_SERIES] = scrape.SeriesSample(err, created)
    return out


@pytest.mark.parametrize(
    ("previous", "current", "expected"),
    [
        pytest.param({"a": pod(10, 1)}, {"a": pod(25, 2)}, {OK_SERIES: 15, ERR_SERIES: 1}, id="increase"),
        pytest.param({"a": pod(10, 1), "b": pod(5, 0)}, {"a": pod(20, 1), "b": pod(8, 3)},
                     {OK_SERIES: 13, ERR_SERIES: 3}, id="summed-over-pods"),
        pytest.param({"a": pod(100, 9)}, {"a": pod(7, 1)}, {OK_SERIES: 7, ERR_SERIES: 1}, id="reset-value-dropped"),
        pytest.param({"a": pod(10, 1, created=100.0)}, {"a": pod(30, 2, created=200.0)},
                     {OK_SERIES: 30, ERR_SERIES: 2}, id="reset-created-changed"),
        pytest.param({"a": pod(10, 1, created=None)}, {"a": pod(30, 2, created=None)},
                     {OK_SERIES: 20, ERR_SERIES: 1}, id="no-created-timestamps"),
        pytest.param({"a": pod(10)}, {"a": pod(12, 4)}, {OK_SERIES: 2, ERR_SERIES: 4}, id="new-series-from-zero"),
        pytest.param({"a": pod(10, 1)}, {"a": pod(12, 1), "b": pod(3, 1)}, {OK_SERIES: 5, ERR_SERIES: 1},
                     id="new-pod-from-zero"),
        pytest.param({"a": pod(10, 1), "gone": pod(50, 50)}, {"a": pod(12, 1)}, {OK_SERIES: 2, ERR_SERIES: 0},
                     id="pod-gone"),
        pytest.param(None, {"a": pod(10, 1), "b": pod(5, 0)}, {OK_SERIES: 15, ERR_SERIES: 1},
                     id="first-snapshot-since-start"),
    ],
)
def test_series_increase(
    previous: Mapping[str, scrape.TargetSnapshot] | None,
    current: Mapping[str, scrape.TargetSnapshot],
    expected: Mapping[scrape.SeriesKey, float],
) -> None:
    assert scrape.build_series_increase(previous, current) == expected


@pytest.mark.parametrize(
    ("increase", "expected"),
    [
        pytest.param({OK_SERIES: 90.0, ERR_SERIES: 10.0}, 0.1, id="ten-percent"),
        pytest.param({OK_SERIES: 90.0}, 0.0, id="no-errors"),
        pytest.param({OK_SERIES: 0.0, ERR_SERIES: 0.0}, None, id="no-requests"),
        pytest.param({}, None, id="no-series"),
        pytest.param({ERR_SERIES: 4.0, key(REQ, model="m", version="1", code="429"): 4.0}, 0.5, id="4xx-not-errors"),
        pytest.param({key(REQ, code="500"): 1.0, key(REQ, code="504"): 1.0, key(REQ, code="200"): 2.0}, 0.5,
                     id="all-5xx"),
        pytest.param({OK_SERIES: 1.0, key("other_total", code="500"): 100.0}, 0.0, id="other-metrics-ignored"),
    ],
)
def test_error_rate(increase: Mapping[scrape.SeriesKey, float], expected: float | None) -> None:
    assert scrape.build_error_rate(increase) == expected


def buckets(counts: Mapping[str, float], **labels: str) -> dict[scrape.SeriesKey, float]:
    name = contract.METRIC_REQUEST_DURATION + "_bucket"
    return {key(name, le=le, **labels): c for le, c in counts.items()}


@pytest.mark.parametrize(
    ("increase", "expected"),
    [
        pytest.param(buckets({"0.1": 10, "0.2": 20, "0.5": 100, "+Inf": 100}), 0.2 + 0.3 * 79 / 80, id="p99"),
        pytest.param({**buckets({"0.1": 5, "0.5": 5, "+Inf": 5}, pod="a"),
                      **buckets({"0.1": 0, "0.5": 95, "+Inf": 95}, pod="b")},
                     0.1 + 0.4 * (99 - 5) / 95, id="summed-by-le"),
        pytest.param(buckets({"0.1": 0, "0.5": 0, "+Inf": 0}), None, id="no-requests"),
        pytest.param({}, None, id="no-series"),
        pytest.param(buckets({"0.1": 0, "bogus": 3, "+Inf": 10}), 0.1, id="malformed-le-skipped"),
    ],
)
def test_latency_quantile(increase: Mapping[scrape.SeriesKey, float], expected: float | None) -> None:
    got = scrape.build_latency_quantile(increase)
    assert got == (None if expected is None else pytest.approx(expected))


# ---------------------------------------------------------------------------------------------------------------
# Direct scrape: user scrape metrics

G = "shipyard_inflight_requests"
C = "jobs_total"


def snap(**pods: Mapping[scrape.SeriesKey, float]) -> dict[str, dict[scrape.SeriesKey, scrape.SeriesSample]]:
    return {p: {k: scrape.SeriesSample(v) for k, v in series.items()} for p, series in pods.items()}


GAUGES = snap(a={key(G, kind="x"): 2.0, key(G, kind="y"): 10.0}, b={key(G, kind="x"): 4.0})


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        pytest.param(scrape.Scrape(metric=G), 16.0, id="sum"),
        pytest.param(scrape.Scrape(metric=G, aggregation="avg"), 16.0 / 3, id="avg"),
        pytest.param(scrape.Scrape(metric=G, aggregation="max"), 10.0, id="max"),
        pytest.param(scrape.Scrape(metric=G, aggregation="min"), 2.0, id="min"),
        pytest.param(scrape.Scrape(metric=G, labels={"kind": "x"}), 6.0, id="label-filter"),
        pytest.param(scrape.Scrape(metric=G, labels={"kind": "z"}), None, id="no-match"),
        pytest.param(scrape.Scrape(metric="absent"), None, id="absent"),
    ],
)
def test_scrape_value(selector: scrape.Scrape, expected: float | None) -> None:
    got = scrape.build_scrape_value(selector, None, GAUGES, None)
    assert got == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    ("previous", "current", "elapsed", "expected"),
    [
        pytest.param(snap(a={key(C): 10.0}), snap(a={key(C): 40.0}), 15.0, 2.0, id="per-second"),
        pytest.param(snap(a={key(C): 10.0}, b={key(C): 0.0}), snap(a={key(C): 40.0}, b={key(C): 15.0}), 15.0, 3.0,
                     id="summed-over-pods"),
        pytest.param(snap(a={key(C): 100.0}), snap(a={key(C): 30.0}), 15.0, 2.0, id="reset"),
        pytest.param(snap(a={key(C): 10.0}), snap(a={key(C): 40.0}, b={key(C): 999.0}), 15.0, 2.0,
                     id="new-pod-left-out"),
        pytest.param(None, snap(a={key(C): 40.0}), None, None, id="first-measurement-no-data"),
        pytest.param(snap(a={key(C): 10.0}), snap(a={key(C): 40.0}), 0.0, None, id="no-elapsed-time"),
    ],
)
def test_scrape_rate(
    previous: Mapping[str, scrape.TargetSnapshot] | None,
    current: Mapping[str, scrape.TargetSnapshot],
    elapsed: float | None,
    expected: float | None,
) -> None:
    selector = scrape.Scrape(metric=C, rate=True)
    got = scrape.build_scrape_value(selector, previous, current, elapsed)
    assert got == (None if expected is None else pytest.approx(expected))


# ---------------------------------------------------------------------------------------------------------------
# predictionAgreement (measured on the stable's pods, about the candidate)


@pytest.mark.parametrize(("label", "expected"), [
    pytest.param("namespace", 'sum(rate(shipyard_shadow_agreeing_rows_total{namespace="ml",model="digits",'
                              'candidate="1.1.0"}[60s])) / sum(rate(shipyard_shadow_rows_total{namespace="ml",'
                              'model="digits",candidate="1.1.0"}[60s]))', id="namespace-label"),
    pytest.param(None, 'sum(rate(shipyard_shadow_agreeing_rows_total{model="digits",candidate="1.1.0"}[60s])) / '
                       'sum(rate(shipyard_shadow_rows_total{model="digits",candidate="1.1.0"}[60s]))',
                 id="no-namespace-label"),
])
def test_prediction_agreement_query(label: str | None, expected: str) -> None:
    assert builtin_provider.build_agreement_query("ml", "digits", "1.1.0", "60s", namespace_label=label) == expected


def test_shadow_count_query() -> None:
    assert builtin_provider.build_shadow_count_query("ml", "digits", "1.1.0", "compared") == (
        'sum(shipyard_shadow_requests_total{namespace="ml",model="digits",candidate="1.1.0",outcome="compared"})')


def test_shadow_queries_read_the_stables_pods_only() -> None:
    """The stable's version in the selector: counters any other pod exports about the candidate (its own pods, had
    they read the settings naming themselves) never count."""
    assert builtin_provider.build_agreement_query("ml", "digits", "1.1.0", "60s", stable="1.0.0") == (
        'sum(rate(shipyard_shadow_agreeing_rows_total{namespace="ml",model="digits",version="1.0.0",'
        'candidate="1.1.0"}[60s])) / sum(rate(shipyard_shadow_rows_total{namespace="ml",model="digits",'
        'version="1.0.0",candidate="1.1.0"}[60s]))')
    assert builtin_provider.build_shadow_count_query("ml", "digits", "1.1.0", "error", stable="1.0.0") == (
        'sum(shipyard_shadow_requests_total{namespace="ml",model="digits",version="1.0.0",candidate="1.1.0",'
        'outcome="error"})')


def _pod(**values: float) -> scrape.TargetSnapshot:
    out: dict[scrape.SeriesKey, scrape.SeriesSample] = {}
    for key, value in values.items():
        name, _, outcome = key.partition("__")
        labels = {"model": "digits", "candidate": "1.1.0", **({"outcome": outcome} if outcome else {})}
        out[scrape.build_series_key({"requests": contract.METRIC_SHADOW_REQUESTS, "rows": contract.METRIC_SHADOW_ROWS,
                                     "other": contract.METRIC_SHADOW_REQUESTS}[name],
                                    {**labels, **({"candidate": "0.9.0"} if name == "other" else {})})] = \
            scrape.SeriesSample(value)
    return out


def test_shadow_figures_sum_the_stables_pods_for_one_candidate() -> None:
    current = {"10.0.0.1:8080": _pod(requests__compared=10, requests__error=2, rows=12, other__compared=99),
               "10.0.0.2:8080": _pod(requests__compared=5, requests__dropped=1, requests__timeout=3, rows=5)}
    assert builtin_provider.build_shadow_figures(current, {"model": "digits", "candidate": "1.1.0"}) == {
        "compared": 15.0, "dropped": 1.0, "timeouts": 3.0, "errors": 2.0, "rows": 17.0}
