"""Open Inference Protocol v2 over gRPC (`inference.GRPCInferenceService`): messages to and from numpy.

Pure: protobuf messages in, `oip.InferRequest` and messages out; no sockets, no torch. The messages are the ones
KServe's `grpc_predict_v2.proto` defines, as generated in Triton's client package (`tritonclient.grpc.service_pb2`,
BSD-3-Clause; Triton's service is a superset of KServe's, with the same package, service, method names and field
numbers), so no generated code lives in this repository. Tensors are checked exactly as on the REST path (the same
`oip` functions and error messages): `raw_input_contents` as the binary tensor data extension's bytes, typed
`contents` as JSON data. Responses carry every output in `raw_output_contents`, as Triton answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from shipyard.runtime import oip

# The gRPC status for each HTTP status the typed errors map to (oip.STATUS_BY_ERROR): one mapping for both.
GRPC_CODE_BY_STATUS: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    431: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# The typed `contents` field that carries each datatype (FP16 and BF16 have none: they travel raw).
CONTENTS_FIELD_BY_DATATYPE = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def build_grpc_code(status: int) -> grpc.StatusCode:
    """The gRPC status code for an HTTP status (INTERNAL for anything unmapped)."""
    return GRPC_CODE_BY_STATUS.get(status, grpc.StatusCode.INTERNAL)


def build_grpc_infer_request(
    message: Any, inputs: Sequence[oip.TensorSpecLike], outputs: Sequence[oip.TensorSpecLike]
) -> oip.InferRequest:
    """Validate a ModelInferRequest against the model's declared inputs and outputs (raises oip.BadRequest)."""
    items = message.inputs
    if not items:
        raise oip.BadRequest("'inputs' must be a non-empty list")
    if len(items) != len(inputs):
        names = [spec.name for spec in inputs]
        raise oip.BadRequest(f"the model takes {len(inputs)} input(s) {names}, the request has {len(items)}")
    raw_contents = message.raw_input_contents
    if raw_contents and len(raw_contents) != len(items):
        raise oip.BadRequest(
            f"raw_input_contents has {len(raw_contents)} entries for {len(items)} inputs; send one per input, in order"
        )
    spec_by_name = {spec.name: spec for spec in inputs}
    by_name: dict[str, np.ndarray] = {}
    for index, item in enumerate(items):
        name = item.name
        if name in by_name:
            raise oip.BadRequest(f"input {name!r} appears twice")
        spec = spec_by_name.get(name)
        if spec is None:
            raise oip.BadRequest(f"unknown input {name!r}; the model takes {list(spec_by_name)}")
        header = {"name": name, "datatype": item.datatype, "shape": list(item.shape)}
        if raw_contents:
            if item.HasField("contents"):
                raise oip.BadRequest(f"input {name!r}: has both contents and raw_input_contents; send one")
            by_name[name] = oip.build_binary_array(memoryview(raw_contents[index]), header, spec)
        else:
            by_name[name] = _build_from_contents(item, header, spec)
    arrays = [by_name[spec.name] for spec in inputs]
    rows = arrays[0].shape[0]
    for array, spec in zip(arrays, inputs, strict=True):
        if array.shape[0] != rows:
            raise oip.BadRequest(f"input {spec.name!r}: every input must share the batch dimension ({rows})")
    key = tuple(array.shape[1:] for array in arrays)
    output_indices = None
    if message.outputs:
        output_indices = oip.build_output_selection([{"name": output.name} for output in message.outputs], outputs)
    return oip.InferRequest(arrays, rows, key, message.id or None, output_indices)


def _build_from_contents(item: Any, header: dict[str, Any], spec: oip.TensorSpecLike) -> np.ndarray:
    """An input given as typed `contents`: validated as JSON data of the same values would be."""
    datatype = item.datatype
    if datatype == "BYTES" and spec.datatype == "BYTES":  # strings: bytes_contents, one element each
        _, shape, count = oip.build_tensor_header(header, spec)
        values = item.contents.bytes_contents
        if len(values) != count:
            raise oip.BadRequest(f"input {spec.name!r}: {len(values)} bytes_contents elements do not fill shape "
                                 f"{shape} ({count} elements)")
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    field = CONTENTS_FIELD_BY_DATATYPE.get(datatype)
    if field is None or datatype not in oip.NUMPY_BY_DATATYPE:
        oip.build_tensor_header(header, spec)  # names a datatype or shape mismatch first
        raise oip.BadRequest(f"input {spec.name!r}: {datatype} data must be sent in raw_input_contents")
    values = getattr(item.contents, field)
    # as JSON data: a flat list of the field's values (python ints, floats or bools), checked by the same function
    return oip.build_array({**header, "data": list(values)}, spec, maybe_bools=False)


def build_grpc_infer_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: Sequence[oip.TensorSpecLike],
    arrays: Sequence[np.ndarray],
    output_indices: list[int] | None,
) -> Any:
    """A ModelInferResponse with each answered output's bytes in raw_output_contents (declared or requested order)."""
    selected = range(len(outputs)) if output_indices is None else output_indices
    response = service_pb2.ModelInferResponse(model_name=model_name, model_version=model_version,
                                              id=request_id or "")
    for i in selected:
        array = arrays[i]
        spec = outputs[i]
        response.outputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
        response.raw_output_contents.append(oip.build_binary_bytes(array, spec.datatype))
    return response


def build_model_metadata_response(
    model_name: str, model_version: str, inputs: Sequence[oip.TensorSpecLike], outputs: Sequence[oip.TensorSpecLike]
) -> Any:
    document = oip.build_model_metadata(model_name, model_version, inputs, outputs)
    response = service_pb2.ModelMetadataResponse(name=document["name"], versions=document["versions"],
                                                 platform=document["platform"])
    for tensor in document["inputs"]:
        response.inputs.add(**tensor)
    for tensor in document["outputs"]:
        response.outputs.add(**tensor)
    return response
