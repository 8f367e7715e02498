"""The runtime's request counter as the operator's analysis reads it: every status series exists at 0 from the start.

Prometheus' ``rate()`` and a ``scrape`` metric with ``rate: true`` only count increases of a series they saw
before, so the error series must exist before the first error. Pure: the runtime's exposition text is parsed with
the operator's own scrape parser (``providers.scrape.build_target_snapshot``) and evaluated with its arithmetic.
"""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shipyard import contract
from shipyard.operator.providers import scrape
from shipyard.runtime import metrics, oip

MODEL, VERSION = "digits", "1.2.0"
ERRORS = scrape.Scrape(metric=contract.METRIC_REQUESTS_TOTAL, labels={"code": "500"}, rate=True)


def requests_by_code(server: metrics.ServerMetrics) -> dict[str, float]:
    text = server.build_exposition().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == contract.METRIC_REQUESTS_TOTAL:
                assert sample.labels[contract.LABEL_MODEL] == MODEL
                assert sample.labels[contract.LABEL_VERSION] == VERSION
                out[sample.labels[contract.LABEL_CODE]] = sample.value
    return out


def snapshot(server: metrics.ServerMetrics) -> dict[str, scrape.TargetSnapshot]:
    text = server.build_exposition().decode()
    return {"10.0.0.1:8080": scrape.build_target_snapshot(text, lambda name, labels: True)}


def test_a_fresh_server_exports_success_and_every_mapped_error_code_at_zero() -> None:
    codes = requests_by_code(metrics.ServerMetrics(MODEL, VERSION))
    assert codes == dict.fromkeys(codes, 0.0)
    assert {"200", "500", "503", "504"} <= set(codes)  # success, model failure/injected fault, overload, timeout
    assert {str(status) for status in oip.STATUS_BY_ERROR.values()} <= set(codes)  # no drift from the mapping


@pytest.mark.parametrize(("answered", "expected"), [
    pytest.param([], {}, id="nothing-answered"),
    pytest.param([200, 200, 500], {"200": 2, "500": 1}, id="success-and-error"),
    pytest.param([429], {"429": 1}, id="a-code-outside-the-mapping-gets-its-own-series"),
    pytest.param([503] * 3, {"503": 3}, id="overload"),
])
def test_counts_add_to_the_precreated_series(answered: list[int], expected: dict[str, int]) -> None:
    server = metrics.ServerMetrics(MODEL, VERSION)
    for status in answered:
        server.observe_request(status, 0.01)
    codes = requests_by_code(server)
    assert {code: value for code, value in codes.items() if value} == expected
    assert {str(c) for c in metrics.PRECREATED_CODES} <= set(codes)


def test_the_first_errors_count_in_a_rate_over_a_direct_scrape() -> None:
    """A `scrape` metric with `rate: true` leaves out series absent from the previous snapshot: without the
    pre-created series, the first 5xx of a canary would read as no data instead of its rate."""
    server = metrics.ServerMetrics(MODEL, VERSION)
    for _ in range(20):
        server.observe_request(200, 0.01)
    before = snapshot(server)
    for status in [200] * 8 + [500] * 2:
        server.observe_request(status, 0.01)
    after = snapshot(server)
    assert scrape.build_scrape_value(ERRORS, before, after, elapsed_seconds=2.0) == pytest.approx(1.0)
    errors = scrape.build_error_rate(scrape.build_series_increase(before, after),
                                       {contract.LABEL_VERSION: VERSION})
    assert errors == pytest.approx(0.2)


def test_no_requests_is_still_no_data_for_the_builtin_error_rate() -> None:
    """Zero-valued series must not turn an idle canary into a measured 0% (noData policy applies)."""
    server = metrics.ServerMetrics(MODEL, VERSION)
    increase = scrape.build_series_increase(snapshot(server), snapshot(server))
    assert scrape.build_error_rate(increase, {contract.LABEL_VERSION: VERSION}) is None
    assert scrape.build_error_rate(scrape.build_series_increase(None, snapshot(server))) is None
