"""OIP v2 over gRPC (pure): ModelInferRequest -> InferRequest with the REST path's checks, responses with raw
output contents, and the one HTTP -> gRPC status mapping."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from shipyard.runtime import grpcproto, oip


@dataclass(frozen=True)
class Spec:
    name: str
    datatype: str
    shape: tuple[int, ...]


INPUTS = [Spec("x", "FP32", (-1, 3))]
OUTPUTS = [Spec("logits", "FP32", (-1, 2)), Spec("label", "INT64", (-1,))]
X_RAW = struct.pack("<3f", 1.0, 2.5, -3.0)


def request(raw: list[bytes] | None = None, **tensor: Any) -> Any:
    message = service_pb2.ModelInferRequest(model_name="m", id="r")
    fields = {"name": "x", "datatype": "FP32", "shape": [1, 3], **tensor}
    contents = fields.pop("contents", None)
    item = message.inputs.add(**fields)
    if contents is not None:
        for field, values in contents.items():
            getattr(item.contents, field).extend(values)
    message.raw_input_contents.extend([X_RAW] if raw is None else raw)
    return message


def test_raw_contents_become_the_array_they_encode() -> None:
    parsed = grpcproto.build_grpc_infer_request(request(), INPUTS, OUTPUTS)
    assert parsed.arrays[0].tolist() == [[1.0, 2.5, -3.0]] and parsed.rows == 1 and parsed.request_id == "r"
    assert parsed.output_indices is None


def test_typed_contents_are_checked_as_json_data_is() -> None:
    parsed = grpcproto.build_grpc_infer_request(request(raw=[], contents={"fp32_contents": [1, 2, 3]}), INPUTS,
                                                OUTPUTS)
    assert parsed.arrays[0].dtype == np.float32 and parsed.arrays[0].tolist() == [[1.0, 2.0, 3.0]]


def test_requested_outputs_select_by_name() -> None:
    message = request()
    message.outputs.add(name="label")
    assert grpcproto.build_grpc_infer_request(message, INPUTS, OUTPUTS).output_indices == [1]


BAD = [
    pytest.param(request(shape=[1, 4]), "does not match the model's", id="wrong-shape"),
    pytest.param(request(shape=[1, -3]), "non-negative", id="negative-dim"),
    pytest.param(request(datatype="FP64"), "does not match the model's FP32", id="wrong-datatype"),
    pytest.param(request(raw=[X_RAW[:8]]), "does not match shape", id="raw-size"),
    pytest.param(request(raw=[X_RAW, X_RAW]), "one per input", id="raw-count"),
    pytest.param(request(name="q"), "unknown input 'q'", id="unknown-input"),
    pytest.param(request(contents={"fp32_contents": [1.0]}), "both contents and raw", id="contents-and-raw"),
    pytest.param(request(raw=[], contents={"fp32_contents": [1.0, 2.0]}), "do not fill", id="contents-count"),
    pytest.param(request(raw=[], contents={"int64_contents": [1, 2, 3]}), "do not fill", id="contents-wrong-field"),
    pytest.param(request(raw=[], datatype="FP16", shape=[1, 3]), "does not match the model's FP32", id="fp16"),
]


@pytest.mark.parametrize(("message", "error"), BAD)
def test_bad_requests_are_bad_request_and_invalid_argument(message: Any, error: str) -> None:
    with pytest.raises(oip.BadRequest, match=error) as caught:
        grpcproto.build_grpc_infer_request(message, INPUTS, OUTPUTS)
    assert grpcproto.build_grpc_code(oip.build_error_status(caught.value)) == grpc.StatusCode.INVALID_ARGUMENT


def test_fp16_needs_raw_contents() -> None:
    with pytest.raises(oip.BadRequest, match="must be sent in raw_input_contents"):
        grpcproto.build_grpc_infer_request(request(raw=[], datatype="FP16"), [Spec("x", "FP16", (-1, 3))], OUTPUTS)


def test_response_carries_raw_output_contents_in_order() -> None:
    logits = np.array([[0.5, -1.25]], dtype=np.float32)
    label = np.array([1], dtype=np.int64)
    response = grpcproto.build_grpc_infer_response("m", "2", "r", OUTPUTS, [logits, label], [1, 0])
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("label", "INT64", [1]),
                                                                               ("logits", "FP32", [1, 2])]
    assert list(response.raw_output_contents) == [struct.pack("<q", 1), struct.pack("<2f", 0.5, -1.25)]
    assert response.id == "r" and response.model_version == "2"


STATUS_CODES = [
    pytest.param(oip.BadRequest("x"), grpc.StatusCode.INVALID_ARGUMENT, id="bad-request"),
    pytest.param(oip.ModelNotFound("x"), grpc.StatusCode.NOT_FOUND, id="model"),
    pytest.param(oip.PayloadTooLarge("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, id="payload"),
    pytest.param(oip.ModelFailure("x"), grpc.StatusCode.INTERNAL, id="model-failure"),
    pytest.param(oip.Overloaded("x"), grpc.StatusCode.UNAVAILABLE, id="overloaded"),
    pytest.param(oip.NotReady("x"), grpc.StatusCode.UNAVAILABLE, id="not-ready"),
    pytest.param(oip.RequestTimeout("x"), grpc.StatusCode.DEADLINE_EXCEEDED, id="timeout"),
    pytest.param(RuntimeError("x"), grpc.StatusCode.INTERNAL, id="unexpected"),
]


@pytest.mark.parametrize(("error", "code"), STATUS_CODES)
def test_errors_map_to_grpc_codes_through_the_http_mapping(error: BaseException, code: grpc.StatusCode) -> None:
    assert grpcproto.build_grpc_code(oip.build_error_status(error)) == code
