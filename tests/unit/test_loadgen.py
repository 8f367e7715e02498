"""The e2e load generator's pure parts (tests/e2e/loadgen.py): the prediction of each row of an answer, and which
pod and version answered each request, from the Service proxy's connection log."""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e import loadgen


def _result(started: float, port: int, status: int = 200, version: str | None = "1") -> loadgen.Result:
    error = None if status == 200 else f"HTTP {status}: x"
    return loadgen.Result(started, started + 0.01, status, version if status == 200 else None, error, port, True)


@pytest.mark.parametrize(("result", "conntrack", "expected"), [
    pytest.param(_result(100.0, 5, 500), [{"t": 100.001, "clientPort": 5, "pod": "p-bad"}], ("p-bad", "bad"),
                 id="failed-request-by-port"),
    pytest.param(_result(100.0, 5, 500), [{"t": 40.0, "clientPort": 5, "pod": "p-old"},
                                         {"t": 100.002, "clientPort": 5, "pod": "p-bad"}], ("p-bad", "bad"),
                 id="reused-port-nearest-in-time"),
    pytest.param(_result(100.0, 5, 200, "2"), [{"t": 100.0, "clientPort": 5, "pod": "p-bad"}], ("p-bad", "2"),
                 id="version-from-the-response-first"),
    pytest.param(_result(100.0, 6, 0), [{"t": 100.0, "clientPort": 6}], (None, "no endpoint"),
                 id="no-endpoint"),
])
def test_attribute_requests_to_pods(result: loadgen.Result, conntrack: list[dict[str, Any]],
                                    expected: tuple[str | None, str]) -> None:
    [(_, pod, version)] = loadgen.attribute([result], conntrack, {"p-bad": "bad", "p-old": "old"})
    assert (pod, version) == expected


def test_count_by_version() -> None:
    results = [_result(1.0, 1), _result(2.0, 2, 500), _result(3.0, 3, 200, "2")]
    attributed = loadgen.attribute(results, [{"t": 2.0, "clientPort": 2, "pod": "p-bad"}], {"p-bad": "bad"})
    assert loadgen.count_by_version(attributed) == {"1": {"served": 1, "failed": 0}, "2": {"served": 1, "failed": 0},
                                                    "bad": {"served": 0, "failed": 1}}


def test_parse_predictions_takes_the_argmax_per_row() -> None:
    body = {"outputs": [{"shape": [2, 3], "data": [0.1, 0.7, 0.2, 5.0, -1.0, 4.9]}]}
    assert loadgen.parse_predictions(body) == [1, 0]
