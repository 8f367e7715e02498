"""Shadow traffic's pure decisions (`shipyard.runtime.shadowplan`, `contract.build_prediction_agreement`): the
settings from the environment, exact sampling, reading OIP v2 answers (JSON and binary), comparing two answers row
by row (top1, cosine, maxabs) and the response-head parser of the shadow client."""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import orjson
import pytest

from shipyard import contract
from shipyard.runtime import shadowplan
from shipyard.runtime.server import settings
from shipyard.runtime.server import shadow as shadow_io

URL = {contract.ENV_SHADOW_URL: "http://digits-1-1-0.ml:8080"}


# ------------------------------------------------------------------------------------------------- settings

@pytest.mark.parametrize("env, expected", [
    pytest.param({}, None, id="unset-is-off"),
    pytest.param({contract.ENV_SHADOW_URL: "  "}, None, id="empty-is-off"),
    pytest.param({**URL, contract.ENV_SHADOW_PERCENT: "0"}, None, id="zero-percent-is-off"),
    pytest.param(URL, {"host": "digits-1-1-0.ml", "port": 8080, "percent": 100.0, "compare": "maxabs",
                       "tolerance": 1e-3, "max_inflight": 64, "max_inflight_bytes": 64 * 1024 * 1024,
                       "timeout_s": 1.0, "candidate": "unknown"},
                 id="defaults"),
    pytest.param({contract.ENV_SHADOW_URL: "http://c/", contract.ENV_SHADOW_PERCENT: "12.5",
                  contract.ENV_SHADOW_COMPARE: "top1", contract.ENV_SHADOW_MAX_INFLIGHT: "8",
                  contract.ENV_SHADOW_TIMEOUT_MS: "250", contract.ENV_SHADOW_VERSION: "1.1.0",
                  contract.ENV_SHADOW_MAX_INFLIGHT_BYTES: "1048576"},
                 {"host": "c", "port": 80, "base_path": "", "percent": 12.5, "compare": "top1", "tolerance": 0.0,
                  "max_inflight": 8, "max_inflight_bytes": 1048576, "timeout_s": 0.25, "candidate": "1.1.0"},
                 id="all-set"),
    pytest.param({**URL, contract.ENV_SHADOW_COMPARE: "cosine"}, {"tolerance": 0.01}, id="cosine-default-tolerance"),
    pytest.param({**URL, contract.ENV_SHADOW_COMPARE: "maxabs", contract.ENV_SHADOW_TOLERANCE: "0.5"},
                 {"tolerance": 0.5}, id="tolerance"),
    pytest.param({contract.ENV_SHADOW_URL: "http://gw:80/prefix/"}, {"base_path": "/prefix"}, id="base-path"),
])
def test_shadow_config_from_the_environment(env: dict[str, str], expected: dict[str, Any] | None) -> None:
    config = shadowplan.build_shadow_config(env)
    if expected is None:
        assert config is None
        return
    assert config is not None
    for key, value in expected.items():
        assert getattr(config, key) == value, key


@pytest.mark.parametrize("env, message", [
    pytest.param({contract.ENV_SHADOW_URL: "https://c:8443"}, "SHIPYARD_SHADOW_URL", id="https"),
    pytest.param({contract.ENV_SHADOW_URL: "c:8080"}, "SHIPYARD_SHADOW_URL", id="no-scheme"),
    pytest.param({contract.ENV_SHADOW_URL: "http://u:p@c:8080"}, "credentials", id="credentials"),
    pytest.param({contract.ENV_SHADOW_URL: "http://c:99999"}, "port", id="bad-port"),
    pytest.param({**URL, contract.ENV_SHADOW_PERCENT: "101"}, "SHIPYARD_SHADOW_PERCENT", id="percent-over"),
    pytest.param({**URL, contract.ENV_SHADOW_PERCENT: "ten"}, "SHIPYARD_SHADOW_PERCENT", id="percent-nan"),
    pytest.param({**URL, contract.ENV_SHADOW_PERCENT: "nan"}, "SHIPYARD_SHADOW_PERCENT", id="percent-literal-nan"),
    pytest.param({**URL, contract.ENV_SHADOW_COMPARE: "l2"}, "SHIPYARD_SHADOW_COMPARE", id="compare"),
    pytest.param({**URL, contract.ENV_SHADOW_TOLERANCE: "-1"}, "SHIPYARD_SHADOW_TOLERANCE", id="tolerance"),
    pytest.param({**URL, contract.ENV_SHADOW_MAX_INFLIGHT: "0"}, "SHIPYARD_SHADOW_MAX_INFLIGHT", id="inflight-0"),
    pytest.param({**URL, contract.ENV_SHADOW_MAX_INFLIGHT: "2.5"}, "SHIPYARD_SHADOW_MAX_INFLIGHT", id="inflight-frac"),
    pytest.param({**URL, contract.ENV_SHADOW_TIMEOUT_MS: "0"}, "SHIPYARD_SHADOW_TIMEOUT_MS", id="timeout"),
    pytest.param({**URL, contract.ENV_SHADOW_MAX_INFLIGHT_BYTES: "0"}, "SHIPYARD_SHADOW_MAX_INFLIGHT_BYTES",
                 id="inflight-bytes"),
])
def test_bad_shadow_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(shadowplan.ShadowConfigError, match=message):
        shadowplan.build_shadow_config(env)


def test_the_server_settings_carry_the_shadow_and_refuse_a_bad_one() -> None:
    config = settings.build_config(["--artifact", "/m/digits"], {**URL, contract.ENV_SHADOW_PERCENT: "5"})
    assert config.shadow is not None and config.shadow.percent == 5
    assert settings.build_config(["--artifact", "/m/digits"], {}).shadow is None
    with pytest.raises(settings.ConfigError, match="SHIPYARD_SHADOW_COMPARE"):
        settings.build_config(["--artifact", "/m/digits"], {**URL, contract.ENV_SHADOW_COMPARE: "x"})


# ------------------------------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("percent, n, expected", [
    pytest.param(100.0, 1000, 1000, id="all"),
    pytest.param(10.0, 1000, 100, id="ten"),
    pytest.param(10.0, 1005, 100, id="ten-partial"),
    pytest.param(12.5, 800, 100, id="fraction"),
    pytest.param(33.3, 1000, 333, id="uneven"),
    pytest.param(0.1, 999, 0, id="tiny-before-first"),
    pytest.param(0.1, 1000, 1, id="tiny-first"),
    pytest.param(0.0, 1000, 0, id="none"),
])
def test_sampling_is_exact_over_n(percent: float, n: int, expected: int) -> None:
    sampled = [i for i in range(1, n + 1) if shadowplan.plan_sample(i, percent)]
    assert len(sampled) == expected == math.floor(n * percent / 100)


def test_sampling_spreads_evenly() -> None:
    assert [i for i in range(1, 41) if shadowplan.plan_sample(i, 10.0)] == [10, 20, 30, 40]


@pytest.mark.parametrize("base, model, expected", [
    pytest.param("", "digits", "/v2/models/digits/infer", id="plain"),
    pytest.param("/p", "a b", "/p/v2/models/a%20b/infer", id="quoted-prefixed"),
])
def test_the_candidates_path_is_never_versioned(base: str, model: str, expected: str) -> None:
    assert shadowplan.build_infer_path(base, model) == expected


# -------------------------------------------------------------------------------------------------- answers

def answer(*outputs: dict[str, Any]) -> bytes:
    return orjson.dumps({"model_name": "m", "model_version": "1", "outputs": list(outputs)})


def fp32(data: list[float], shape: list[int], name: str = "y") -> dict[str, Any]:
    return {"name": name, "datatype": "FP32", "shape": shape, "data": data}


def binary_answer(arrays: list[tuple[str, str, np.ndarray]]) -> tuple[bytes, int]:
    items, chunks = [], []
    for name, datatype, array in arrays:
        raw = array.tobytes()
        items.append({"name": name, "datatype": datatype, "shape": list(array.shape),
                      "parameters": {"binary_data_size": len(raw)}})
        chunks.append(raw)
    header = orjson.dumps({"outputs": items})
    return header + b"".join(chunks), len(header)


def test_json_answer_rows_per_rank() -> None:
    outputs = shadowplan.parse_infer_response(answer(
        fp32([1, 2, 3, 4, 5, 6], [2, 3]), fp32([1, 2, 3, 4, 5, 6, 7, 8], [2, 2, 2], "z"), fp32([7, 8], [2], "v"),
        {"name": "s", "datatype": "FP64", "shape": [], "data": [3.5]},
        {"name": "t", "datatype": "BYTES", "shape": [1], "data": ["skip me"]}))
    assert [o.name for o in outputs] == ["y", "z", "v", "s"]
    assert [o.rows.shape for o in outputs] == [(2, 3), (2, 4), (2, 1), (1, 1)]


def test_binary_answer_with_bf16_and_bytes() -> None:
    bf16 = (np.array([1.5, -2.0], dtype="<f4").view("<u4") >> 16).astype("<u2")
    body, length = binary_answer([("y", "FP32", np.arange(6, dtype="<f4").reshape(2, 3)),
                                  ("t", "BYTES", np.frombuffer(struct.pack("<I", 1) + b"a", dtype="u1")),
                                  ("b", "BF16", bf16)])
    outputs = shadowplan.parse_infer_response(body, length)
    assert [o.name for o in outputs] == ["y", "b"]
    assert outputs[0].rows.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert outputs[1].rows.reshape(-1).tolist() == [1.5, -2.0]


@pytest.mark.parametrize("body, header_length, message", [
    pytest.param(b"{", None, "not JSON", id="not-json"),
    pytest.param(b"[]", None, "no outputs", id="not-an-object"),
    pytest.param(orjson.dumps({"error": "boom"}), None, "no outputs", id="error-document"),
    pytest.param(answer(fp32([1, 2, 3], [2, 2])), None, "3 values for shape", id="count"),
    pytest.param(answer({"name": "y", "datatype": "FP32", "shape": [1]}), None, "no data", id="no-data"),
    pytest.param(answer(fp32(["a"], [1])), None, "not numeric", id="strings"),
    pytest.param(answer({"name": "y", "datatype": "FP8", "shape": [1], "data": [1]}), None, "unknown datatype",
                 id="datatype"),
    pytest.param(answer({"name": "y", "shape": [1], "data": [1]}), None, "lacks", id="no-datatype"),
    pytest.param(answer(fp32([], [0, 3])), None, "empty", id="empty"),
    pytest.param(answer({"name": "y", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}),
                 None, "binary data outside", id="binary-without-header"),
])
def test_malformed_answers_are_answer_errors(body: bytes, header_length: int | None, message: str) -> None:
    with pytest.raises(shadowplan.AnswerError, match=message):
        shadowplan.parse_infer_response(body, header_length)


def test_a_binary_size_that_does_not_fit_the_shape_is_an_answer_error() -> None:
    header = orjson.dumps({"outputs": [{"name": "y", "datatype": "FP32", "shape": [3],
                                        "parameters": {"binary_data_size": 8}}]})
    with pytest.raises(shadowplan.AnswerError, match="do not hold"):
        shadowplan.parse_infer_response(header + bytes(8), len(header))


# ---------------------------------------------------------------------------------------------- comparisons

def outputs(data: list[list[float]], name: str = "y") -> list[shadowplan.Output]:
    array = np.asarray(data, dtype=np.float64)
    return [shadowplan.Output(name, "FP32", array.shape, shadowplan.build_rows(array, array.shape))]


@pytest.mark.parametrize("compare, tolerance, stable, candidate, rows, agreeing", [
    pytest.param("top1", 0, [[0.1, 0.9, 0.0]], [[0.2, 0.7, 0.1]], 1, 1, id="top1-same-class"),
    pytest.param("top1", 0, [[0.1, 0.9, 0.0]], [[0.9, 0.1, 0.0]], 1, 0, id="top1-other-class"),
    pytest.param("top1", 0, [[1, 0], [0, 1], [1, 0], [0, 1]], [[1, 0], [1, 0], [1, 0], [0, 1]], 4, 3,
                 id="top1-batch-fraction"),
    pytest.param("top1", 0, [[2.0], [-1.0]], [[0.5], [0.5]], 2, 1, id="top1-one-logit-sign"),
    pytest.param("cosine", 0.01, [[1, 0], [0, 1]], [[2, 0], [1, 1]], 2, 1, id="cosine-scale-free"),
    pytest.param("cosine", 0.5, [[1, 0], [0, 1]], [[2, 0], [1, 1]], 2, 2, id="cosine-loose"),
    pytest.param("cosine", 0.01, [[0, 0]], [[0, 0]], 1, 1, id="cosine-both-zero"),
    pytest.param("cosine", 0.01, [[0, 0]], [[1, 0]], 1, 0, id="cosine-one-zero"),
    pytest.param("maxabs", 1e-3, [[1, 2], [3, 4]], [[1, 2.0005], [3, 4.1]], 2, 1, id="maxabs-tolerance"),
    pytest.param("maxabs", 0, [[1, 2]], [[1, 2]], 1, 1, id="maxabs-exact"),
    pytest.param("maxabs", 1e9, [[1, 2]], [[1, float("nan")]], 1, 0, id="maxabs-nan-never-agrees"),
])
def test_comparisons(compare: str, tolerance: float, stable: list[list[float]], candidate: list[list[float]],
                     rows: int, agreeing: int) -> None:
    result = shadowplan.compare_answers(outputs(stable), outputs(candidate), compare, tolerance)
    assert (result.rows, result.agreeing) == (rows, agreeing)
    assert result.agreement == agreeing / rows


def test_cosine_and_maxabs_scores_per_row() -> None:
    cosine = shadowplan.compare_answers(outputs([[1, 0], [0, 1]]), outputs([[2, 0], [1, 1]]), "cosine", 0.01)
    assert cosine.scores == pytest.approx((1.0, math.sqrt(0.5)))
    maxabs = shadowplan.compare_answers(outputs([[1, 2]]), outputs([[1.5, 1.0]]), "maxabs", 0.1)
    assert maxabs.scores == (1.0,)
    assert shadowplan.compare_answers(outputs([[1, 2]]), outputs([[2, 1]]), "top1", 0).scores == ()


@pytest.mark.parametrize("stable, candidate, message", [
    pytest.param(outputs([[1, 2]]), outputs([[1, 2, 3]]), "shape", id="shape"),
    pytest.param(outputs([[1, 2]]), outputs([[1, 2]], name="z"), "no output 'y'", id="name"),
    pytest.param([], outputs([[1, 2]]), "no numeric output", id="stable-empty"),
])
def test_answers_that_do_not_fit_are_answer_errors(stable: list[shadowplan.Output],
                                                   candidate: list[shadowplan.Output], message: str) -> None:
    with pytest.raises(shadowplan.AnswerError, match=message):
        shadowplan.compare_answers(stable, candidate, "top1", 0)


@pytest.mark.parametrize("status, body, message", [
    pytest.param(500, orjson.dumps({"error": "injected fault"}), "HTTP 500: injected fault", id="error-document"),
    pytest.param(503, b"<html>", "HTTP 503", id="not-json"),
])
def test_a_candidate_error_is_an_answer_error(status: int, body: bytes, message: str) -> None:
    with pytest.raises(shadowplan.AnswerError, match=message):
        shadowplan.assess_candidate_answer(status, body, None)


# ------------------------------------------------------------------------------------------ scrape formula

def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


@pytest.mark.parametrize("increase, labels, expected", [
    pytest.param({key(contract.METRIC_SHADOW_ROWS, candidate="2"): 200.0,
                  key(contract.METRIC_SHADOW_AGREEING_ROWS, candidate="2"): 180.0}, {"candidate": "2"}, 0.9,
                 id="ratio"),
    pytest.param({key(contract.METRIC_SHADOW_ROWS, candidate="2", pod="a"): 100.0,
                  key(contract.METRIC_SHADOW_AGREEING_ROWS, candidate="2", pod="a"): 100.0,
                  key(contract.METRIC_SHADOW_ROWS, candidate="2", pod="b"): 100.0,
                  key(contract.METRIC_SHADOW_AGREEING_ROWS, candidate="2", pod="b"): 80.0}, {"candidate": "2"}, 0.9,
                 id="summed-over-pods"),
    pytest.param({key(contract.METRIC_SHADOW_ROWS, candidate="1"): 100.0,
                  key(contract.METRIC_SHADOW_AGREEING_ROWS, candidate="1"): 0.0,
                  key(contract.METRIC_SHADOW_ROWS, candidate="2"): 10.0,
                  key(contract.METRIC_SHADOW_AGREEING_ROWS, candidate="2"): 10.0}, {"candidate": "2"}, 1.0,
                 id="other-candidate-ignored"),
    pytest.param({key(contract.METRIC_SHADOW_ROWS, candidate="2"): 0.0}, {"candidate": "2"}, None, id="no-rows"),
    pytest.param({}, None, None, id="nothing"),
    pytest.param({key(contract.METRIC_SHADOW_ROWS): 10.0}, None, 0.0, id="no-agreeing-series-is-zero"),
])
def test_prediction_agreement_from_scraped_counters(increase: dict[Any, float], labels: dict[str, str] | None,
                                                    expected: float | None) -> None:
    assert contract.build_prediction_agreement(increase, labels) == expected


# ------------------------------------------------------------------------------------- the client's parser

@pytest.mark.parametrize("raw, expected", [
    pytest.param(b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n", (200, 12, None, False), id="plain"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nInference-Header-Content-Length: 4\r\n"
                 b"Connection: close\r\n\r\n", (200, 9, 4, True), id="binary-close"),
    pytest.param(b"HTTP/1.0 503 Busy\r\ncontent-length: 0\r\n\r\n", (503, 0, None, True), id="http10"),
])
def test_response_heads(raw: bytes, expected: tuple[int, int, int | None, bool]) -> None:
    assert shadow_io.parse_response_head(raw) == expected


@pytest.mark.parametrize("raw", [
    pytest.param(b"SSH-2.0\r\n\r\n", id="not-http"),
    pytest.param(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", id="chunked"),
    pytest.param(b"HTTP/1.1 200 OK\r\n\r\n", id="no-length"),
])
def test_response_heads_this_client_does_not_read(raw: bytes) -> None:
    with pytest.raises(shadow_io._ProtocolError):
        shadow_io.parse_response_head(raw)


def test_a_parsed_request_becomes_a_json_request_for_the_same_outputs() -> None:
    specs = [shadowplan.Output("x", "FP32", (2, 2), np.zeros((2, 2))), shadowplan.Output("m", "BOOL", (2,),
                                                                                          np.zeros((2, 1)))]
    outs = [shadowplan.Output("a", "FP32", (), np.zeros((1, 1))), shadowplan.Output("b", "FP32", (), np.zeros((1, 1)))]
    arrays = [np.arange(4, dtype=np.float32).reshape(2, 2).T, np.array([True, False])]  # a transposed view too
    document = orjson.loads(shadowplan.build_request_body(specs, arrays, outs, [1]))
    assert document == {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [0.0, 2.0, 1.0, 3.0]},
                                   {"name": "m", "datatype": "BOOL", "shape": [2], "data": [True, False]}],
                        "outputs": [{"name": "b"}]}
    assert "outputs" not in orjson.loads(shadowplan.build_request_body(specs, arrays, outs, None))
