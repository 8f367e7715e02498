"""OIP v2 request validation and response encoding (pure): every bad-input case and the error -> status map."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pytest

from shipyard.runtime import oip


@dataclass(frozen=True)
class Spec:
    name: str
    datatype: str
    shape: tuple[int, ...]


INPUTS = [Spec("x", "FP32", (-1, 3))]
OUTPUTS = [Spec("logits", "FP32", (-1, 2)), Spec("label", "INT64", (-1,))]
TWO_INPUTS = [Spec("ids", "INT64", (-1, -1)), Spec("mask", "BOOL", (-1, -1))]


def body(**document: Any) -> bytes:
    return json.dumps(document).encode()  # json, not orjson: it writes integers past 64 bits too


def x_input(**overrides: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}
    item.update(overrides)
    return item


BAD_REQUESTS = [
    pytest.param(b"{not json", "malformed JSON", id="malformed-json"),
    pytest.param(b"", "malformed JSON", id="empty-body"),
    pytest.param(b"[1, 2]", "JSON object", id="not-an-object"),
    pytest.param(body(inputs=[]), "non-empty list", id="no-inputs"),
    pytest.param(body(inputs={"x": 1}), "non-empty list", id="inputs-not-list"),
    pytest.param(body(), "non-empty list", id="inputs-missing"),
    pytest.param(body(inputs=[x_input(), x_input()]), "takes 1 input", id="too-many-inputs"),
    pytest.param(body(inputs=[x_input(name="y")]), "'x' is missing", id="wrong-input-name"),
    pytest.param(body(inputs=["x"]), "must be an object", id="input-not-object"),
    pytest.param(body(inputs=[x_input(name=3)]), "string 'name'", id="name-not-string"),
    pytest.param(body(inputs=[x_input(datatype="FP64")]), "does not match the model's FP32", id="wrong-datatype"),
    pytest.param(body(inputs=[x_input(datatype="FLOAT")]), "unknown datatype", id="unknown-datatype"),
    pytest.param(body(inputs=[x_input(datatype=None)]), "'datatype' must be a string", id="datatype-missing"),
    pytest.param(body(inputs=[x_input(shape=[3])]), "rank 1", id="wrong-rank"),
    pytest.param(body(inputs=[x_input(shape=[1, 4], data=[1, 2, 3, 4])]), "does not match", id="wrong-dim"),
    pytest.param(body(inputs=[x_input(shape=[0, 3], data=[])]), "at least 1", id="zero-batch"),
    pytest.param(body(inputs=[x_input(shape="1,3")]), "list of non-negative", id="shape-not-list"),
    pytest.param(body(inputs=[x_input(shape=[1, -3])]), "list of non-negative", id="negative-dim"),
    pytest.param(body(inputs=[x_input(shape=[1.0, 3])]), "list of non-negative", id="float-dim"),
    pytest.param(body(inputs=[x_input(shape=[True, 3])]), "list of non-negative", id="bool-dim"),
    pytest.param(body(inputs=[x_input(data=[1.0, 2.0])]), "do not fill shape", id="too-little-data"),
    pytest.param(body(inputs=[x_input(data=[1.0, 2.0, 3.0, 4.0])]), "do not fill shape", id="too-much-data"),
    pytest.param(body(inputs=[{"name": "x", "shape": [1, 3], "datatype": "FP32"}]), "'data' is missing", id="no-data"),
    pytest.param(body(inputs=[x_input(data="1,2,3")]), "'data' must be a list", id="data-not-list"),
    pytest.param(body(inputs=[x_input(data=["1", "2", "3"])]), "not valid FP32", id="strings-for-floats"),
    pytest.param(body(inputs=[x_input(data=[True, False, True])]), "not valid FP32", id="bools-for-floats"),
    pytest.param(body(inputs=[x_input(data=[1.0, None, 3.0])]), "not valid FP32", id="null-in-data"),
    # numpy made true 1.0 among numbers (found by tests/integration/test_server_fuzz.py)
    pytest.param(body(inputs=[x_input(data=[1.0, True, 3.0])]), "mixes booleans with numbers", id="bool-among-floats"),
    pytest.param(body(inputs=[x_input(data=[[1.0, 2.0, False]])]), "mixes booleans", id="bool-among-nested-floats"),
    pytest.param(body(inputs=[x_input(data=[[1.0, 2.0], [3.0]])]), "not a regular array", id="ragged-data"),
    pytest.param(body(inputs=[x_input(data=[1e39, 1.0, 1.0])]), "do not fit FP32", id="float-overflow"),
    pytest.param(body(id=7, inputs=[x_input()]), "'id' must be a string", id="id-not-string"),
    pytest.param(body(parameters=[1], inputs=[x_input()]), "'parameters' must be an object", id="bad-parameters"),
    pytest.param(
        body(inputs=[x_input()], outputs={"name": "logits"}), "'outputs' must be a list", id="outputs-not-list"
    ),
    pytest.param(body(inputs=[x_input()], outputs=[{"name": "nope"}]), "unknown output", id="unknown-output"),
    pytest.param(body(inputs=[x_input()], outputs=[{}]), "string 'name'", id="output-without-name"),
    pytest.param(body(inputs=[x_input()], outputs=[{"name": "label"}, {"name": "label"}]), "twice", id="output-twice"),
]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize(("raw", "message"), BAD_REQUESTS)
def test_bad_requests_raise_bad_request_with_a_message(raw: bytes, message: str) -> None:
    with pytest.raises(oip.BadRequest, match=message) as caught:
        oip.build_infer_request(raw, INPUTS, OUTPUTS)
    assert oip.build_error_status(caught.value) == 400


INT_CASES = [
    pytest.param([[1, 2], [3, 4]], [[True, False], [True, True]], None, id="valid-nested"),
    pytest.param([[1.5, 2], [3, 4]], [[True, False], [True, True]], "not valid INT64", id="float-for-int"),
    pytest.param([[1, 2], [3, 4]], [[1, 0], [1, 1]], "not valid BOOL", id="int-for-bool"),
    pytest.param([[2**70, 2], [3, 4]], [[True, False], [True, True]], "INT64", id="int-overflow"),
    pytest.param([[1, True], [3, 4]], [[True, False], [True, True]], "mixes booleans", id="bool-among-ints"),
]


@pytest.mark.parametrize(("ids", "mask", "error"), INT_CASES)
def test_integer_and_bool_inputs_are_checked_strictly(ids: Any, mask: Any, error: str | None) -> None:
    raw = body(
        inputs=[
            {"name": "mask", "shape": [2, 2], "datatype": "BOOL", "data": mask},
            {"name": "ids", "shape": [2, 2], "datatype": "INT64", "data": ids},
        ]
    )
    if error is None:
        request = oip.build_infer_request(raw, TWO_INPUTS, OUTPUTS)
        assert [a.dtype for a in request.arrays] == [np.int64, np.bool_]  # declared order, not request order
        assert request.rows == 2 and request.key == ((2,), (2,))
    else:
        with pytest.raises(oip.BadRequest, match=error):
            oip.build_infer_request(raw, TWO_INPUTS, OUTPUTS)


def test_narrow_integer_range_is_enforced() -> None:
    spec = Spec("b", "UINT8", (-1,))
    with pytest.raises(oip.BadRequest, match="outside the UINT8 range"):
        oip.build_array({"name": "b", "shape": [2], "datatype": "UINT8", "data": [1, 300]}, spec)
    with pytest.raises(oip.BadRequest, match="outside the UINT8 range"):
        oip.build_array({"name": "b", "shape": [2], "datatype": "UINT8", "data": [-1, 3]}, spec)
    assert oip.build_array({"name": "b", "shape": [2], "datatype": "UINT8", "data": [0, 255]}, spec).tolist() == [
        0,
        255,
    ]


def test_inputs_must_share_the_batch_dimension() -> None:
    raw = body(
        inputs=[
            {"name": "ids", "shape": [2, 1], "datatype": "INT64", "data": [1, 2]},
            {"name": "mask", "shape": [1, 2], "datatype": "BOOL", "data": [True, True]},
        ]
    )
    with pytest.raises(oip.BadRequest, match="share the batch dimension"):
        oip.build_infer_request(raw, TWO_INPUTS, OUTPUTS)


def test_duplicate_input_names_are_rejected() -> None:
    raw = body(inputs=[x_input(), x_input()])
    with pytest.raises(oip.BadRequest, match="appears twice"):
        oip.build_infer_request(raw, [Spec("x", "FP32", (-1, 3)), Spec("z", "FP32", (-1, 3))], OUTPUTS)


VALID_DATA = [
    pytest.param([1, 2, 3, 4, 5, 6], id="flat-ints-as-floats"),
    pytest.param([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], id="nested"),
]


@pytest.mark.parametrize("data", VALID_DATA)
def test_valid_request_becomes_float32_array_of_the_declared_shape(data: Any) -> None:
    raw = body(id="r1", inputs=[x_input(shape=[2, 3], data=data)], outputs=[{"name": "label"}])
    request = oip.build_infer_request(raw, INPUTS, OUTPUTS)
    assert request.request_id == "r1"
    assert request.rows == 2
    assert request.output_indices == [1]
    (array,) = request.arrays
    assert array.dtype == np.float32 and array.shape == (2, 3)
    assert array.tolist() == [[1, 2, 3], [4, 5, 6]]


def test_response_encodes_selected_outputs_flat_with_shape_and_version() -> None:
    logits = np.array([[0.5, -1.25], [2.0, 3.0]], dtype=np.float32)
    labels = np.array([1, 0], dtype=np.int64)
    for indices, names in [(None, ["logits", "label"]), ([1], ["label"])]:
        document = orjson.loads(oip.build_infer_response("m", "1.2.3", "r9", OUTPUTS, [logits, labels], indices))
        assert document["model_name"] == "m" and document["model_version"] == "1.2.3" and document["id"] == "r9"
        assert [o["name"] for o in document["outputs"]] == names
    full = orjson.loads(oip.build_infer_response("m", "v", None, OUTPUTS, [logits, labels], None))
    assert "id" not in full
    assert full["outputs"][0] == {"name": "logits", "datatype": "FP32", "shape": [2, 2], "data": [0.5, -1.25, 2.0, 3.0]}
    assert full["outputs"][1] == {"name": "label", "datatype": "INT64", "shape": [2], "data": [1, 0]}


def test_response_of_a_non_contiguous_output_keeps_row_major_order() -> None:
    transposed = np.arange(6, dtype=np.float32).reshape(3, 2).T  # shape (2, 3), not C-contiguous
    document = orjson.loads(oip.build_infer_response("m", "v", None, OUTPUTS[:1], [transposed], None))
    assert document["outputs"][0]["data"] == [0, 2, 4, 1, 3, 5]


ERROR_STATUSES = [
    pytest.param(oip.BadRequest("x"), 400, id="bad-request"),
    pytest.param(oip.RouteNotFound("x"), 404, id="route"),
    pytest.param(oip.ModelNotFound("x"), 404, id="model"),
    pytest.param(oip.MethodNotAllowed("x"), 405, id="method"),
    pytest.param(oip.PayloadTooLarge("x"), 413, id="payload"),
    pytest.param(oip.HeadersTooLarge("x"), 431, id="headers"),
    pytest.param(oip.ModelFailure("x"), 500, id="model-failure"),
    pytest.param(oip.InjectedFault("x"), 500, id="fault"),
    pytest.param(oip.NotReady("x"), 503, id="not-ready"),
    pytest.param(oip.Overloaded("x"), 503, id="overloaded"),
    pytest.param(oip.RequestTimeout("x"), 504, id="timeout"),
    pytest.param(RuntimeError("x"), 500, id="unexpected"),
]


@pytest.mark.parametrize(("error", "status"), ERROR_STATUSES)
def test_errors_map_to_http_status_in_one_place(error: BaseException, status: int) -> None:
    assert oip.build_error_status(error) == status


def test_model_metadata_lists_version_and_tensors() -> None:
    document = oip.build_model_metadata("digits", "1.4.0", INPUTS, OUTPUTS)
    assert document == {
        "name": "digits",
        "versions": ["1.4.0"],
        "platform": "pytorch",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, 2]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
        ],
    }


def test_true_elsewhere_in_the_body_does_not_refuse_numbers() -> None:
    request = oip.build_infer_request(body(id="true false", parameters={"flag": True}, inputs=[x_input()]), INPUTS,
                                      OUTPUTS)
    assert request.arrays[0].tolist() == [[1.0, 2.0, 3.0]]


# ------------------------------------------------------------------------ the binary tensor data extension
# Bodies are framed here by hand (struct and numpy), not with the server's encoder: the tests pin the wire format.


def framed(document: dict[str, Any], *chunks: bytes) -> tuple[bytes, bytes]:
    """A binary request: (body, Inference-Header-Content-Length value)."""
    header = json.dumps(document).encode()
    return header + b"".join(chunks), str(len(header)).encode()


def x_binary(size: int = 12, **overrides: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"name": "x", "shape": [1, 3], "datatype": "FP32", "parameters": {"binary_data_size": size}}
    item.update(overrides)
    return item


X_BYTES = struct.pack("<3f", 1.0, 2.5, -3.0)


def test_binary_input_becomes_the_array_it_encodes() -> None:
    raw, header = framed({"id": "b1", "inputs": [x_binary()]}, X_BYTES)
    request = oip.build_infer_request(raw, INPUTS, OUTPUTS, header)
    (array,) = request.arrays
    assert array.dtype == np.float32 and array.shape == (1, 3) and array.tolist() == [[1.0, 2.5, -3.0]]
    assert array.flags.writeable  # torch.from_numpy needs no warning
    assert request.request_id == "b1" and request.binary_outputs is None  # no output asked for binary


def test_binary_and_json_inputs_mix_in_the_order_of_the_header() -> None:
    specs = [Spec("ids", "INT64", (-1, 2)), Spec("mask", "BOOL", (-1, 2)), Spec("h", "BF16", (-1, 1))]
    document = {"inputs": [
        {"name": "mask", "shape": [1, 2], "datatype": "BOOL", "parameters": {"binary_data_size": 2}},
        {"name": "ids", "shape": [1, 2], "datatype": "INT64", "data": [7, -8]},
        {"name": "h", "shape": [1, 1], "datatype": "BF16", "parameters": {"binary_data_size": 2}},
    ]}
    bf16_of_1_5 = struct.pack("<H", struct.unpack("<I", struct.pack("<f", 1.5))[0] >> 16)
    raw, header = framed(document, b"\x01\x00", bf16_of_1_5)
    ids, mask, h = oip.build_infer_request(raw, specs, OUTPUTS, header).arrays
    assert ids.tolist() == [[7, -8]] and mask.tolist() == [[True, False]] and h.tolist() == [[1.5]]


def test_raw_binary_request_is_one_input_of_batch_one_with_every_output_binary() -> None:
    request = oip.build_infer_request(X_BYTES * 1, INPUTS, OUTPUTS, b"0")
    assert request.arrays[0].tolist() == [[1.0, 2.5, -3.0]] and request.rows == 1
    assert request.binary_outputs == [True, True]
    variable = oip.build_infer_request(X_BYTES * 2, [Spec("v", "FP32", (-1, -1))], OUTPUTS, b"0")
    assert variable.arrays[0].shape == (1, 6)


OUTPUT_FLAGS = [
    pytest.param({}, None, id="none"),
    pytest.param({"parameters": {"binary_data_output": True}}, [True, True], id="all"),
    pytest.param({"outputs": [{"name": "label", "parameters": {"binary_data": True}}]}, [True], id="one"),
    pytest.param(
        {"parameters": {"binary_data_output": True},
         "outputs": [{"name": "label", "parameters": {"binary_data": False}}, {"name": "logits"}]},
        [False, True],
        id="override",
    ),
    pytest.param({"outputs": [{"name": "label", "parameters": {"binary_data": False}}]}, None, id="all-json"),
]


@pytest.mark.parametrize(("extra", "flags"), OUTPUT_FLAGS)
def test_binary_outputs_are_asked_for_in_json_and_binary_requests(extra: dict[str, Any], flags: Any) -> None:
    json_request = oip.build_infer_request(body(inputs=[x_input()], **extra), INPUTS, OUTPUTS)
    raw, header = framed({"inputs": [x_binary()], **extra}, X_BYTES)
    binary_request = oip.build_infer_request(raw, INPUTS, OUTPUTS, header)
    assert json_request.binary_outputs == flags and binary_request.binary_outputs == flags


BAD_BINARY = [
    pytest.param(*framed({"inputs": [x_binary()]}, X_BYTES), "", id="valid"),
    pytest.param(X_BYTES, b"-5", "non-negative decimal integer", id="negative-header-length"),
    pytest.param(X_BYTES, b"12abc", "non-negative decimal integer", id="header-length-not-a-number"),
    pytest.param(X_BYTES, b"", "non-negative decimal integer", id="header-length-empty"),
    pytest.param(X_BYTES, b"99999999999999999999999", "non-negative decimal integer", id="header-length-huge"),
    pytest.param(framed({"inputs": [x_binary()]}, X_BYTES)[0], b"500", "exceeds the body", id="header-past-body"),
    pytest.param(framed({"inputs": [x_binary()]}, X_BYTES)[0], b"20", "not valid JSON", id="header-cut-short"),
    pytest.param(b"\xff\xfe{{{{" + X_BYTES, b"6", "not valid JSON", id="header-not-json"),
    pytest.param(*framed({"inputs": [x_binary()]}, X_BYTES + b"\x00"), "add up to 12", id="trailing-bytes"),
    pytest.param(*framed({"inputs": [x_binary()]}, X_BYTES[:-1]), "runs past the end", id="too-few-bytes"),
    pytest.param(*framed({"inputs": [x_binary(size=-4)]}, X_BYTES), "non-negative integer", id="negative-size"),
    pytest.param(*framed({"inputs": [x_binary(size=2**40)]}, X_BYTES), "runs past the end", id="huge-size"),
    # orjson reads integers past 64 bits as floats: refused as not an integer
    pytest.param(*framed({"inputs": [x_binary(size=10**30)]}, X_BYTES), "non-negative integer", id="size-past-int64"),
    pytest.param(*framed({"inputs": [x_binary(size=12.0)]}, X_BYTES), "non-negative integer", id="float-size"),
    pytest.param(*framed({"inputs": [x_binary(size="12")]}, X_BYTES), "non-negative integer", id="string-size"),
    pytest.param(*framed({"inputs": [x_binary(size=None)]}, X_BYTES), "non-negative integer", id="null-size"),
    pytest.param(*framed({"inputs": [x_binary(size=8)]}, X_BYTES[:8]), "does not match shape", id="size-vs-shape"),
    pytest.param(*framed({"inputs": [x_binary(datatype="FP64", size=24)]}, X_BYTES * 2), "does not match the model",
                 id="wrong-datatype"),
    pytest.param(*framed({"inputs": [x_binary(shape=[1, 4], size=16)]}, X_BYTES + b"\0" * 4), "does not match",
                 id="wrong-shape"),
    pytest.param(*framed({"inputs": [x_binary(shape=[10**12, 3], size=12)]}, X_BYTES), "does not match shape",
                 id="huge-shape"),
    pytest.param(*framed({"inputs": [x_binary(data=[1, 2, 3])]}, X_BYTES), "both 'data' and", id="data-and-size"),
    pytest.param(*framed({"inputs": [x_binary(parameters=[1])]}, X_BYTES), "'parameters' must be an object",
                 id="input-parameters-not-object"),
    pytest.param(*framed({"inputs": [x_binary(name="q")]}, X_BYTES), "unknown input 'q'", id="unknown-input"),
    pytest.param(*framed([x_binary()], X_BYTES), "JSON object", id="header-not-object"),
    pytest.param(*framed({"inputs": [x_binary()], "parameters": {"binary_data_output": "yes"}}, X_BYTES),
                 "'binary_data_output' must be a boolean", id="binary-data-output-not-bool"),
    pytest.param(*framed({"inputs": [x_binary()], "outputs": [{"name": "label", "parameters": {"binary_data": 1}}]},
                         X_BYTES), "'binary_data' must be a boolean", id="binary-data-not-bool"),
    pytest.param(*framed({"inputs": [x_binary()], "outputs": [{"name": "label", "parameters": {"classification": 2}}]},
                         X_BYTES), "classification extension", id="classification"),
    pytest.param(X_BYTES[:8], b"0", "does not match shape", id="raw-wrong-size"),
]


@pytest.mark.parametrize(("raw", "header", "message"), BAD_BINARY)
def test_bad_binary_requests_raise_bad_request_with_a_message(raw: bytes, header: bytes, message: str) -> None:
    if not message:
        assert oip.build_infer_request(raw, INPUTS, OUTPUTS, header).arrays[0].shape == (1, 3)
        return
    with pytest.raises(oip.BadRequest, match=message) as caught:
        oip.build_infer_request(raw, INPUTS, OUTPUTS, header)
    assert oip.build_error_status(caught.value) == 400


def test_binary_bool_input_must_be_zero_or_one_bytes() -> None:
    spec = [Spec("m", "BOOL", (-1,))]
    raw, header = framed({"inputs": [{"name": "m", "shape": [2], "datatype": "BOOL",
                                      "parameters": {"binary_data_size": 2}}]}, b"\x01\x02")
    with pytest.raises(oip.BadRequest, match="BOOL elements must be the bytes 0 or 1"):
        oip.build_infer_request(raw, spec, OUTPUTS, header)


def test_binary_data_size_without_the_header_names_the_header() -> None:
    with pytest.raises(oip.BadRequest, match="no Inference-Header-Content-Length header"):
        oip.build_infer_request(body(inputs=[x_binary()]), INPUTS, OUTPUTS)


def test_raw_binary_request_needs_a_deducible_shape() -> None:
    with pytest.raises(oip.BadRequest, match="needs a model with one input"):
        oip.build_infer_request(b"\0" * 8, TWO_INPUTS, OUTPUTS, b"0")
    with pytest.raises(oip.BadRequest, match="cannot be deduced"):
        oip.build_infer_request(b"\0" * 8, [Spec("v", "FP32", (-1, -1, -1))], OUTPUTS, b"0")


def test_bytes_elements_are_length_prefixed_little_endian() -> None:
    wire = struct.pack("<I", 3) + b"abc" + struct.pack("<I", 0) + struct.pack("<I", 2) + "é".encode()
    assert oip.build_bytes_elements(wire, 3) == [b"abc", b"", "é".encode()]
    assert oip.build_bytes_buffer([b"abc", b"", "é".encode()]) == wire
    for broken, message in [(wire[:-1], "only 1 remain"), (wire + b"x", "left after"), (wire[:2], "4-byte length")]:
        with pytest.raises(oip.BadRequest, match=message):
            oip.build_bytes_elements(broken, 3)


def test_binary_response_is_a_json_header_then_raw_bytes_in_output_order() -> None:
    logits = np.array([[0.5, -1.25], [2.0, 3.0]], dtype=np.float32)
    labels = np.array([1, 0], dtype=np.int64)
    raw, header_length = oip.build_binary_infer_response(
        "m", "1", "r", OUTPUTS, [logits, labels], [1, 0], [True, True]
    )
    document = json.loads(raw[:header_length])
    assert document["id"] == "r"
    assert document["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [2], "parameters": {"binary_data_size": 16}},
        {"name": "logits", "datatype": "FP32", "shape": [2, 2], "parameters": {"binary_data_size": 16}},
    ]
    assert raw[header_length:] == struct.pack("<2q", 1, 0) + struct.pack("<4f", 0.5, -1.25, 2.0, 3.0)
    mixed, mixed_length = oip.build_binary_infer_response("m", "1", None, OUTPUTS, [logits, labels], None,
                                                          [False, True])
    outputs = json.loads(mixed[:mixed_length])["outputs"]
    assert outputs[0]["data"] == [0.5, -1.25, 2.0, 3.0] and mixed[mixed_length:] == struct.pack("<2q", 1, 0)


def test_binary_bf16_and_bool_outputs() -> None:
    assert oip.build_binary_bytes(np.array([1.5, -2.0], dtype=np.float32), "BF16") == struct.pack("<2H", 0x3FC0,
                                                                                                   0xC000)
    assert oip.build_binary_bytes(np.array([np.nan], dtype=np.float32), "BF16") == struct.pack("<H", 0x7FC0)
    assert oip.build_binary_bytes(np.array([True, False]), "BOOL") == b"\x01\x00"
