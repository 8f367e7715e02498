"""Open Inference Protocol v2 (REST) encoding and validation, and the typed errors of the server.

Pure: JSON bytes in, numpy arrays and JSON bytes out; no sockets, no torch, no clock. Every way a request can
be wrong is a `ServingError` subclass here, and `build_error_status` is the one place that maps them to HTTP
status codes.
"""

from __future__ import annotations

import math
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


def _fail(message: str) -> BadRequest:
    return BadRequest(message)


def build_array(item: Mapping[str, Any], spec: TensorSpecLike, maybe_bools: bool = True) -> np.ndarray:
    """Validate one request input against its spec and return it as a numpy array of the spec's shape.

    Raises BadRequest naming the input for a wrong datatype, a wrong shape, a wrong element count or data of
    the wrong kind (strings for numbers, booleans or floats for integers, out-of-range integers...).
    `maybe_bools=False` skips the search for booleans among numbers (the body has no ``true``/``false``).
    """
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
    data = item.get("data", _MISSING)
    if type(data) is not list:
        if data is _MISSING:
            raise _fail(f"input {name!r}: 'data' is missing")
        raise _fail(f"input {name!r}: 'data' must be a list")
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
    body: bytes, inputs: Sequence[TensorSpecLike], outputs: Sequence[TensorSpecLike]
) -> InferRequest:
    """Parse and validate an OIP inference request body against the model's declared inputs and outputs."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
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
    return InferRequest(arrays, rows, key, request_id, output_indices)


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
