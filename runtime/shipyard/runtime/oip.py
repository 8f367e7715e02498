"""Open Inference Protocol v2 (REST) encoding and validation, and the typed errors of the server.

Pure: JSON bytes in, numpy arrays and JSON bytes out; no sockets, no torch, no clock. Every way a request can
be wrong is a `ServingError` subclass here, and `build_error_status` is the one place that maps them to HTTP
status codes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import orjson

# --------------------------------------------------------------------------------------------- errors


class ServingError(Exception):
    """A request that cannot be served; its HTTP status comes from `build_error_status`."""


class BadRequest(ServingError):
    """The request is malformed or does not match the model's inputs (JSON, name, shape, datatype, data)."""


class RouteNotFound(ServingError):
    """No endpoint at that path."""


class ModelNotFound(ServingError):
    """The path names a model (or model version) that this server does not serve."""


class MethodNotAllowed(ServingError):
    """The path exists but not for that HTTP method."""


class PayloadTooLarge(ServingError):
    """The request body exceeds the configured limit."""


class HeadersTooLarge(ServingError):
    """The request line and headers exceed the fixed limit."""


class NotReady(ServingError):
    """The model is still loading or warming up, or the server is draining."""


class Overloaded(ServingError):
    """The inference queue is full: shed load at once rather than time out later."""


class ModelFailure(ServingError):
    """The model raised, or returned something that does not match its declared outputs."""


class InjectedFault(ServingError):
    """A failure injected on purpose (rollout testing)."""


class RequestTimeout(ServingError):
    """The request was not answered within the per-request timeout."""


# The one mapping from error types to HTTP status codes (most specific class first in the MRO walk).
STATUS_BY_ERROR: dict[type[ServingError], int] = {
    BadRequest: 400,
    RouteNotFound: 404,
    ModelNotFound: 404,
    MethodNotAllowed: 405,
    PayloadTooLarge: 413,
    HeadersTooLarge: 431,
    ModelFailure: 500,
    InjectedFault: 500,
    NotReady: 503,
    Overloaded: 503,
    RequestTimeout: 504,
}


def build_error_status(error: BaseException) -> int:
    """HTTP status for an error: the mapped status of its most specific ServingError class, else 500."""
    for cls in type(error).__mro__:
        status = STATUS_BY_ERROR.get(cls)
        if status is not None:
            return status
    return 500


def build_error_body(message: str) -> bytes:
    """The OIP error body: {"error": "..."}."""
    return orjson.dumps({"error": message})


# ------------------------------------------------------------------------------------------ datatypes

# OIP datatype -> numpy dtype used on the wire side. BF16 has no numpy dtype: it travels as float32 and the
# engine converts it to torch.bfloat16. BYTES (strings) is not a tensor datatype a torch model takes.
NUMPY_BY_DATATYPE: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": np.dtype(np.float32),
}
KNOWN_DATATYPES = frozenset(NUMPY_BY_DATATYPE) | {"BYTES"}
_FLOAT_DATATYPES = frozenset({"FP16", "FP32", "FP64", "BF16"})
# numpy "kind" codes that JSON data may have for each family of datatypes: ints are fine for floats, bools
# are not numbers, strings are never numbers.
_ACCEPTED_KINDS_FLOAT = frozenset("fiu")
_ACCEPTED_KINDS_INT = frozenset("iu")
_ACCEPTED_KINDS_BOOL = frozenset("b")
_ACCEPTED_KINDS = {
    datatype: _ACCEPTED_KINDS_FLOAT
    if datatype in _FLOAT_DATATYPES
    else _ACCEPTED_KINDS_BOOL
    if datatype == "BOOL"
    else _ACCEPTED_KINDS_INT
    for datatype in NUMPY_BY_DATATYPE
}
_MISSING = object()


class TensorSpecLike(Protocol):
    """What the server needs of a declared input or output (artifacts.manifests.TensorSpec satisfies it)."""

    @property
    def name(self) -> str: ...

    @property
    def datatype(self) -> str: ...

    @property
    def shape(self) -> Sequence[int]: ...


def assess_tensor_specs(inputs: Sequence[TensorSpecLike], outputs: Sequence[TensorSpecLike]) -> list[str]:
    """Why a model's declared tensors cannot be served over this server's JSON path (empty = servable)."""
    problems = []
    for role, specs in (("input", inputs), ("output", outputs)):
        if not specs:
            problems.append(f"the model declares no {role}s")
        for spec in specs:
            if spec.datatype not in NUMPY_BY_DATATYPE:
                problems.append(f"{role} {spec.name!r}: datatype {spec.datatype} is not supported")
            if not spec.shape or any(d != -1 and d < 1 for d in spec.shape):
                problems.append(f"{role} {spec.name!r}: shape {list(spec.shape)} needs a batch dimension")
    return problems


# --------------------------------------------------------------------------------------------- requests


@dataclass(slots=True)
class InferRequest:
    """A validated inference request: one numpy array per declared input, in declared order."""

    arrays: list[np.ndarray]
    rows: int  # the batch dimension shared by every input
    key: tuple[tuple[int, ...], ...]  # non-batch shapes: requests batch together only when equal
    request_id: str | None
    output_indices: list[int] | None  # requested outputs (indices into the declared outputs), None = all
    # per answered output (output_indices' order, or all): True = raw bytes after the JSON header (the binary tensor
    # data extension); None = every output as JSON data (the plain JSON path)
    binary_outputs: list[bool] | None = None
    # per input, the value to pad its axis 1 with when requests of different lengths batch together (tokenized
    # text, `textinput`); None = requests batch only when their non-batch shapes are equal (every tensor request)
    pad_values: tuple[int | None, ...] | None = None


def _fail(message: str) -> BadRequest:
    return BadRequest(message)


def build_array(item: Mapping[str, Any], spec: TensorSpecLike, maybe_bools: bool = True) -> np.ndarray:
    """Validate one request input against its spec and return it as a numpy array of the spec's shape.

    Raises BadRequest naming the input for a wrong datatype, a wrong shape, a wrong element count or data of
    the wrong kind (strings for numbers, booleans or floats for integers, out-of-range integers...).
    `maybe_bools=False` skips the search for booleans among numbers (the body has no ``true``/``false``).
    """
    name = spec.name
    datatype, shape, count = build_tensor_header(item, spec)
    data = item.get("data", _MISSING)
    if type(data) is not list:
        if data is _MISSING:
            parameters = item.get("parameters")
            if type(parameters) is dict and "binary_data_size" in parameters:
                raise _fail(
                    f"input {name!r}: 'binary_data_size' is set but the request has no {INFERENCE_HEADER_NAME} header "
                    "(binary tensor data follows the JSON header, whose length that header gives)"
                )
            raise _fail(f"input {name!r}: 'data' is missing")
        raise _fail(f"input {name!r}: 'data' must be a list")
    if datatype == "BYTES":
        return _build_json_bytes_array(data, name, shape, count)
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError, OverflowError) as error:  # ragged nesting
        raise _fail(f"input {name!r}: 'data' is not a regular array ({error})") from None
    size = raw.size
    if size != count:
        raise _fail(f"input {name!r}: {size} data elements do not fill shape {shape} ({count} elements)")
    accepted = _ACCEPTED_KINDS[datatype]
    if size and raw.dtype.kind not in accepted:
        raise _fail(f"input {name!r}: data of kind {raw.dtype.name} is not valid {datatype}")
    # numpy turns true/false among numbers into 1/0 silently; JSON booleans are not numbers (all-boolean data is
    # refused just above, by its kind).
    if maybe_bools and size and accepted is not _ACCEPTED_KINDS_BOOL and _has_bool(data):
        raise _fail(f"input {name!r}: data mixes booleans with numbers, which is not valid {datatype}")
    target = NUMPY_BY_DATATYPE[datatype]
    if accepted is _ACCEPTED_KINDS_INT and size and target != raw.dtype:
        info = np.iinfo(target)
        if raw.min() < info.min or raw.max() > info.max:
            raise _fail(f"input {name!r}: values outside the {datatype} range")
    array = raw if raw.dtype == target else raw.astype(target)
    # JSON has no inf/nan, so a non-finite value here is a number too large for the datatype. The float64 sum
    # of float32/float16 values cannot overflow: it is non-finite only when an element is.
    if (
        accepted is _ACCEPTED_KINDS_FLOAT
        and target.itemsize < 8
        and size
        and not math.isfinite(array.sum(dtype=np.float64))
    ):
        raise _fail(f"input {name!r}: data contains values that do not fit {datatype}")
    return array.reshape(shape)


def _build_json_bytes_array(data: list[Any], name: str, shape: list[int], count: int) -> np.ndarray:
    """A BYTES input's JSON data: strings (nested lists allowed), one per element, as an object array of str."""
    flat: list[Any] = []
    stack = [data]
    while stack:  # depth first, left to right: row-major order
        items = stack.pop()
        for index, item in enumerate(items):
            if type(item) is list:
                stack.append(items[index + 1 :])
                stack.append(item)
                break
            flat.append(item)
    if len(flat) != count:
        raise _fail(f"input {name!r}: {len(flat)} data elements do not fill shape {shape} ({count} elements)")
    for index, item in enumerate(flat):
        if type(item) is not str:
            raise _fail(f"input {name!r}: BYTES element {index} must be a string, got {type(item).__name__}")
    array = np.empty(count, dtype=object)
    array[:] = flat
    return array.reshape(shape)


def build_tensor_header(item: Mapping[str, Any], spec: TensorSpecLike) -> tuple[str, list[int], int]:
    """An input's datatype, shape and element count, checked against its spec (JSON and binary inputs alike)."""
    name = spec.name
    datatype = item.get("datatype")
    if datatype != spec.datatype:
        if not isinstance(datatype, str):
            raise _fail(f"input {name!r}: 'datatype' must be a string")
        if datatype not in KNOWN_DATATYPES:
            raise _fail(f"input {name!r}: unknown datatype {datatype!r}")
        raise _fail(f"input {name!r}: datatype {datatype} does not match the model's {spec.datatype}")
    shape = item.get("shape")
    expected = spec.shape
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise _fail(f"input {name!r}: 'shape' must be a list of non-negative integers")
    if len(shape) != len(expected):
        raise _fail(f"input {name!r}: shape {shape} has rank {len(shape)}, the model expects {list(expected)}")
    count = 1
    for got, want in zip(shape, expected, strict=True):
        if want != -1 and got != want:
            raise _fail(f"input {name!r}: shape {shape} does not match the model's {list(expected)}")
        count *= got
    if shape and shape[0] == 0:
        raise _fail(f"input {name!r}: the batch dimension must be at least 1")
    return datatype, shape, count


def _has_bool(data: list[Any]) -> bool:
    """Whether a JSON array (nested lists) holds a boolean anywhere; C-speed per innermost list."""
    stack = [data]
    while stack:
        items = stack.pop()
        types = set(map(type, items))
        if bool in types:
            return True
        if list in types:
            stack.extend(item for item in items if type(item) is list)
    return False


def build_infer_request(
    body: bytes,
    inputs: Sequence[TensorSpecLike],
    outputs: Sequence[TensorSpecLike],
    inference_header: bytes | None = None,
) -> InferRequest:
    """Parse and validate an OIP inference request body against the model's declared inputs and outputs.

    `inference_header` is the raw value of the request's Inference-Header-Content-Length header (None: absent, the
    body is all JSON); with it the body is a JSON header followed by binary tensor data (`build_binary_infer_request`).
    """
    if inference_header is not None:
        return build_binary_infer_request(body, inference_header, inputs, outputs)
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        if b'"binary_data_size"' in body:
            raise _fail(
                f"malformed JSON: {error}; a body with binary tensor data needs the {INFERENCE_HEADER_NAME} header"
            ) from None
        raise _fail(f"malformed JSON: {error}") from None
    if type(document) is not dict:
        raise _fail("the request body must be a JSON object")
    get = document.get
    request_id = get("id")
    if request_id is not None and type(request_id) is not str:
        raise _fail("'id' must be a string")
    parameters = get("parameters")
    if parameters is not None and type(parameters) is not dict:
        raise _fail("'parameters' must be an object")
    items = get("inputs")
    if type(items) is not list or not items:
        raise _fail("'inputs' must be a non-empty list")
    if len(items) != len(inputs):
        names = [spec.name for spec in inputs]
        raise _fail(f"the model takes {len(inputs)} input(s) {names}, the request has {len(items)}")
    first = items[0]
    maybe_bools = b"true" in body or b"false" in body  # a fast scan of the bytes spares a slow one of the lists
    if len(inputs) == 1 and type(first) is dict and first.get("name") == inputs[0].name:
        arrays = [build_array(first, inputs[0], maybe_bools)]  # the common case: one input, named right
    else:
        arrays = _build_arrays(items, inputs, maybe_bools)
    rows = arrays[0].shape[0]
    for array, spec in zip(arrays, inputs, strict=True):
        if array.shape[0] != rows:
            raise _fail(f"input {spec.name!r}: every input must share the batch dimension ({rows})")
    key = tuple(array.shape[1:] for array in arrays)
    requested = get("outputs")
    output_indices = None if requested is None else build_output_selection(requested, outputs)
    binary_outputs = None
    if parameters or requested:  # the binary tensor data extension: outputs asked for as raw bytes
        binary_outputs = build_binary_output_flags(parameters, requested, output_indices, len(outputs))
    return InferRequest(arrays, rows, key, request_id, output_indices, binary_outputs)


def _build_arrays(items: list[Any], inputs: Sequence[TensorSpecLike], maybe_bools: bool) -> list[np.ndarray]:
    by_name: dict[str, Mapping[str, Any]] = {}
    for item in items:
        if not isinstance(item, dict):
            raise _fail("each input must be an object")
        name = item.get("name")
        if not isinstance(name, str):
            raise _fail("each input needs a string 'name'")
        if name in by_name:
            raise _fail(f"input {name!r} appears twice")
        by_name[name] = item
    arrays: list[np.ndarray] = []
    for spec in inputs:
        item = by_name.get(spec.name)
        if item is None:
            unknown = sorted(set(by_name) - {s.name for s in inputs})
            raise _fail(f"input {spec.name!r} is missing (unknown input(s): {unknown})")
        arrays.append(build_array(item, spec, maybe_bools))
    return arrays


def build_output_selection(requested: Any, outputs: Sequence[TensorSpecLike]) -> list[int] | None:
    """Indices of the outputs a request asks for (None = all), validating the names."""
    if requested is None:
        return None
    if not isinstance(requested, list):
        raise _fail("'outputs' must be a list")
    index = {spec.name: i for i, spec in enumerate(outputs)}
    selected: list[int] = []
    for item in requested:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str):
            raise _fail("each requested output needs a string 'name'")
        if name not in index:
            raise _fail(f"unknown output {name!r}; the model has {list(index)}")
        if index[name] in selected:
            raise _fail(f"output {name!r} is requested twice")
        selected.append(index[name])
    return selected


# ------------------------------------------------------------------------ the binary tensor data extension
# As Triton and KServe define it: the body is a JSON inference header followed by the tensors' raw bytes (little
# endian, row major, no padding), in the order the inputs (or outputs) appear in the header. The request's
# Inference-Header-Content-Length gives the header's length; `binary_data_size` (input/output parameter) each
# tensor's; `binary_data` (requested output) and `binary_data_output` (request) ask for outputs as raw bytes.
# BOOL is one byte per element (0 or 1), BF16 two (the upper half of a float32), BYTES a 4-byte little-endian
# unsigned length before each element. A header of length 0 is a raw binary request: the whole body is the one
# input's bytes, batch 1, every output binary.

INFERENCE_HEADER_NAME = "Inference-Header-Content-Length"
BINARY_EXTENSION = "binary_tensor_data"  # the name in the server metadata's "extensions"
WIRE_DTYPE_BY_DATATYPE: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("u1"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),  # bfloat16's bits; numpy has no bfloat16
}
_LENGTH_PREFIX = struct.Struct("<I")


def build_binary_infer_request(
    body: bytes, inference_header: bytes, inputs: Sequence[TensorSpecLike], outputs: Sequence[TensorSpecLike]
) -> InferRequest:
    """Parse a request of the binary tensor data extension: a JSON header of `inference_header` bytes (the raw
    header value), then each binary input's bytes. Inputs without `binary_data_size` carry JSON `data` as usual.

    Raises BadRequest for a header length that is not a decimal integer or exceeds the body, a header that is not
    JSON, a `binary_data_size` that is not a non-negative integer or does not match the input's shape and datatype,
    sizes that do not add up to the binary part of the body, and everything the JSON path refuses.
    """
    header_length = _parse_header_length(inference_header, len(body))
    if header_length == 0:
        return _build_raw_binary_request(body, inputs, outputs)
    view = memoryview(body)
    try:
        document = orjson.loads(view[:header_length])
    except orjson.JSONDecodeError as error:
        raise _fail(
            f"the inference header (the first {header_length} bytes of the body, per {INFERENCE_HEADER_NAME}) is not "
            f"valid JSON: {error}"
        ) from None
    if type(document) is not dict:
        raise _fail("the inference header must be a JSON object")
    get = document.get
    request_id = get("id")
    if request_id is not None and type(request_id) is not str:
        raise _fail("'id' must be a string")
    parameters = get("parameters")
    if parameters is not None and type(parameters) is not dict:
        raise _fail("'parameters' must be an object")
    items = get("inputs")
    if type(items) is not list or not items:
        raise _fail("'inputs' must be a non-empty list")
    if len(items) != len(inputs):
        names = [spec.name for spec in inputs]
        raise _fail(f"the model takes {len(inputs)} input(s) {names}, the request has {len(items)}")
    spec_by_name = {spec.name: spec for spec in inputs}
    by_name: dict[str, np.ndarray] = {}
    offset = header_length
    end_of_body = len(body)
    for item in items:
        if type(item) is not dict:
            raise _fail("each input must be an object")
        name = item.get("name")
        if not isinstance(name, str):
            raise _fail("each input needs a string 'name'")
        if name in by_name:
            raise _fail(f"input {name!r} appears twice")
        spec = spec_by_name.get(name)
        if spec is None:
            raise _fail(f"unknown input {name!r}; the model takes {list(spec_by_name)}")
        item_parameters = item.get("parameters")
        if item_parameters is not None and type(item_parameters) is not dict:
            raise _fail(f"input {name!r}: 'parameters' must be an object")
        size = _MISSING if item_parameters is None else item_parameters.get("binary_data_size", _MISSING)
        if size is _MISSING:  # this input's data is JSON
            by_name[name] = build_array(item, spec)
            continue
        if type(size) is not int or size < 0:
            raise _fail(f"input {name!r}: 'binary_data_size' must be a non-negative integer, got {size!r}")
        if "data" in item:
            raise _fail(f"input {name!r}: has both 'data' and 'binary_data_size'; send one")
        if offset + size > end_of_body:
            raise _fail(
                f"input {name!r}: binary_data_size {size} runs past the end of the body ({end_of_body - offset} "
                f"bytes of binary data left after the {header_length}-byte header and earlier inputs)"
            )
        by_name[name] = build_binary_array(view[offset : offset + size], item, spec)
        offset += size
    if offset != end_of_body:
        raise _fail(
            f"the body has {end_of_body - header_length} bytes after the {header_length}-byte inference header, but "
            f"the inputs' binary_data_size add up to {offset - header_length}"
        )
    arrays = [by_name[spec.name] for spec in inputs]  # every name was checked and the counts are equal
    rows = arrays[0].shape[0]
    for array, spec in zip(arrays, inputs, strict=True):
        if array.shape[0] != rows:
            raise _fail(f"input {spec.name!r}: every input must share the batch dimension ({rows})")
    key = tuple(array.shape[1:] for array in arrays)
    requested = get("outputs")
    output_indices = None if requested is None else build_output_selection(requested, outputs)
    binary_outputs = None
    if parameters or requested:
        binary_outputs = build_binary_output_flags(parameters, requested, output_indices, len(outputs))
    return InferRequest(arrays, rows, key, request_id, output_indices, binary_outputs)


def _parse_header_length(value: bytes, body_length: int) -> int:
    text = value.strip()
    if not text.isdigit() or len(text) > 18:
        raise _fail(
            f"{INFERENCE_HEADER_NAME} must be a non-negative decimal integer, got {value[:40].decode('latin-1')!r}"
        )
    length = int(text)
    if length > body_length:
        raise _fail(f"{INFERENCE_HEADER_NAME} ({length}) exceeds the body's length ({body_length} bytes)")
    return length


def _build_raw_binary_request(
    body: bytes, inputs: Sequence[TensorSpecLike], outputs: Sequence[TensorSpecLike]
) -> InferRequest:
    """A raw binary request (header length 0): the body is one input's bytes, batch 1, shape deduced from the size."""
    if len(inputs) != 1:
        raise _fail(
            f"a raw binary request ({INFERENCE_HEADER_NAME}: 0) needs a model with one input; this one takes "
            f"{len(inputs)}"
        )
    spec = inputs[0]
    shape = list(spec.shape)
    if shape[0] == -1:
        shape[0] = 1  # the batch dimension
    variable = [i for i, d in enumerate(shape) if d == -1]
    wire = WIRE_DTYPE_BY_DATATYPE.get(spec.datatype)
    if wire is None or len(variable) > 1:
        raise _fail(f"a raw binary request cannot carry input {spec.name!r} of shape {list(spec.shape)} "
                    f"({spec.datatype}): its shape cannot be deduced from the body's size")
    if variable:
        fixed = math.prod(d for d in shape if d != -1) * wire.itemsize
        if fixed == 0 or len(body) % fixed:
            raise _fail(f"a raw binary request of {len(body)} bytes does not fill input {spec.name!r} of shape "
                        f"{list(spec.shape)} ({spec.datatype})")
        shape[variable[0]] = len(body) // fixed
    item = {"name": spec.name, "datatype": spec.datatype, "shape": shape}
    array = build_binary_array(memoryview(body), item, spec)
    return InferRequest([array], array.shape[0], (array.shape[1:],), None, None, [True] * len(outputs))


def build_binary_array(buffer: memoryview, item: Mapping[str, Any], spec: TensorSpecLike) -> np.ndarray:
    """One binary input: its bytes checked against its shape and datatype, as a writable native numpy array."""
    datatype, shape, count = build_tensor_header(item, spec)
    name = spec.name
    if datatype == "BYTES":
        elements = build_bytes_elements(buffer, count, name)
        array = np.empty(count, dtype=object)
        array[:] = elements
        return array.reshape(shape)
    wire = WIRE_DTYPE_BY_DATATYPE[datatype]
    expected = count * wire.itemsize
    if len(buffer) != expected:
        raise _fail(
            f"input {name!r}: binary_data_size {len(buffer)} does not match shape {shape} of {datatype} "
            f"({count} elements of {wire.itemsize} bytes = {expected})"
        )
    raw = np.frombuffer(buffer, dtype=wire)
    if datatype == "BOOL":
        if count and raw.max() > 1:
            raise _fail(f"input {name!r}: BOOL elements must be the bytes 0 or 1")
        array = raw.astype(np.bool_)
    elif datatype == "BF16":
        array = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        array = raw.astype(NUMPY_BY_DATATYPE[datatype])  # a copy: writable, native byte order
    return array.reshape(shape)


def build_bytes_elements(buffer: bytes | memoryview, count: int, name: str = "BYTES") -> list[bytes]:
    """Split BYTES tensor data in binary form (a 4-byte little-endian length before each element) into `count`
    elements; raises BadRequest when the lengths do not tile the buffer exactly."""
    view = memoryview(buffer)
    size = len(view)
    offset = 0
    elements = []
    for index in range(count):
        if offset + 4 > size:
            raise _fail(f"input {name!r}: BYTES data ends before element {index}'s 4-byte length")
        (length,) = _LENGTH_PREFIX.unpack_from(view, offset)
        offset += 4
        if offset + length > size:
            raise _fail(f"input {name!r}: BYTES element {index} is {length} bytes long, only {size - offset} remain")
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != size:
        raise _fail(f"input {name!r}: {size - offset} bytes are left after {count} BYTES elements")
    return elements


def build_bytes_buffer(elements: Sequence[bytes]) -> bytes:
    """BYTES elements in binary form: each a 4-byte little-endian length, then its bytes."""
    pack = _LENGTH_PREFIX.pack
    return b"".join(pack(len(element)) + element for element in elements)


def build_binary_output_flags(
    parameters: Mapping[str, Any] | None, requested: Any, output_indices: list[int] | None, output_count: int
) -> list[bool] | None:
    """Per answered output, whether it goes back as raw bytes (None: none does). `binary_data` on a requested
    output overrides the request's `binary_data_output`; `requested` was checked by `build_output_selection`."""
    default = False
    if parameters:
        value = parameters.get("binary_data_output", False)
        if type(value) is not bool:
            raise _fail(f"'binary_data_output' must be a boolean, got {value!r}")
        default = value
    if requested is None or output_indices is None:
        return [True] * output_count if default else None
    flags = []
    for item in requested:
        item_parameters = item.get("parameters")
        if item_parameters is None:
            flags.append(default)
            continue
        name = item["name"]
        if type(item_parameters) is not dict:
            raise _fail(f"output {name!r}: 'parameters' must be an object")
        if item_parameters.get("classification"):
            raise _fail(f"output {name!r}: the classification extension is not supported")
        value = item_parameters.get("binary_data", default)
        if type(value) is not bool:
            raise _fail(f"output {name!r}: 'binary_data' must be a boolean, got {value!r}")
        flags.append(value)
    return flags if any(flags) else None


def build_binary_bytes(array: np.ndarray, datatype: str) -> bytes:
    """An output tensor's bytes in binary form (row major, little endian; BF16 rounded to nearest even)."""
    if datatype == "BF16":
        values = np.ascontiguousarray(array, dtype=np.float32)
        bits = values.view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
        rounded[np.isnan(values)] = 0x7FC0  # a quiet NaN (rounding could carry a NaN's bits into infinity)
        return rounded.tobytes()
    if datatype == "BYTES":
        return build_bytes_buffer([bytes(element) for element in array.reshape(-1)])
    return np.ascontiguousarray(array, dtype=WIRE_DTYPE_BY_DATATYPE[datatype]).tobytes()


# -------------------------------------------------------------------------------------------- responses

_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def build_infer_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: Sequence[TensorSpecLike],
    arrays: Sequence[np.ndarray],
    output_indices: list[int] | None,
) -> bytes:
    """Encode an OIP inference response; `arrays` holds every declared output, in order, for this request."""
    selected = range(len(outputs)) if output_indices is None else output_indices
    items = []
    for i in selected:
        array = arrays[i]
        spec = outputs[i]
        flat = array.reshape(-1)
        if not flat.flags.c_contiguous:
            flat = np.ascontiguousarray(flat)
        items.append({"name": spec.name, "datatype": spec.datatype, "shape": list(array.shape), "data": flat})
    document: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": items}
    if request_id is not None:
        document["id"] = request_id
    return orjson.dumps(document, option=_DUMPS_OPTIONS)


def build_model_metadata(
    model_name: str,
    model_version: str,
    inputs: Sequence[TensorSpecLike],
    outputs: Sequence[TensorSpecLike],
    platform: str = "pytorch",
) -> dict[str, Any]:
    """The OIP model metadata document."""

    def tensor(spec: TensorSpecLike) -> dict[str, Any]:
        return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}

    return {
        "name": model_name,
        "versions": [model_version],
        "platform": platform,
        "inputs": [tensor(spec) for spec in inputs],
        "outputs": [tensor(spec) for spec in outputs],
    }


def build_binary_infer_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: Sequence[TensorSpecLike],
    arrays: Sequence[np.ndarray],
    output_indices: list[int] | None,
    binary_outputs: list[bool],
) -> tuple[bytes, int]:
    """Encode a response of the binary tensor data extension: the JSON header (binary outputs carry
    `binary_data_size` instead of `data`), then the binary outputs' bytes in order. Returns the body and the
    header's length (the response's Inference-Header-Content-Length)."""
    selected = range(len(outputs)) if output_indices is None else output_indices
    items = []
    chunks = []
    for i, binary in zip(selected, binary_outputs, strict=True):
        array = arrays[i]
        spec = outputs[i]
        item: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype, "shape": list(array.shape)}
        if binary:
            raw = build_binary_bytes(array, spec.datatype)
            item["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            flat = array.reshape(-1)
            item["data"] = flat if flat.flags.c_contiguous else np.ascontiguousarray(flat)
        items.append(item)
    document: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": items}
    if request_id is not None:
        document["id"] = request_id
    header = orjson.dumps(document, option=_DUMPS_OPTIONS)
    return header + b"".join(chunks), len(header)
