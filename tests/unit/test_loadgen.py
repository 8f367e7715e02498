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


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("x-shipyard-version: 1.1.0", ("x-shipyard-version", "1.1.0"), id="name-colon-space-value"),
    pytest.param("x-a:b:c", ("x-a", "b:c"), id="first-colon-splits"),
    pytest.param("x-empty:", ("x-empty", ""), id="empty-value"),
])
def test_parse_header(text: str, expected: tuple[str, str]) -> None:
    assert loadgen.parse_header(text) == expected


@pytest.mark.parametrize("text", [
    pytest.param("no-colon", id="no-colon"),
    pytest.param(": value", id="no-name"),
    pytest.param("x-a: b\r\nx-injected: c", id="line-break"),
])
def test_parse_header_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="is not a header"):
        loadgen.parse_header(text)


@pytest.mark.parametrize(("argv", "expected"), [
    pytest.param(["--port", "5"], {"port": 5, "model": "digits", "rate": 20.0, "seconds": 300.0, "requests": None,
                                   "header": []}, id="defaults-as-before"),
    pytest.param(["--port", "5", "--requests", "2000", "--rate", "250", "--header", "x-a: 1", "--header", "x-b:2"],
                 {"port": 5, "model": "digits", "rate": 250.0, "seconds": 300.0, "requests": 2000,
                  "header": [("x-a", "1"), ("x-b", "2")]}, id="requests-rate-headers"),
])
def test_command_line(argv: list[str], expected: dict[str, Any]) -> None:
    assert vars(loadgen.build_parser().parse_args(argv)) == expected


def test_command_line_refuses_a_bad_header(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        loadgen.build_parser().parse_args(["--port", "5", "--header", "nope"])
    assert "--header" in capsys.readouterr().err
