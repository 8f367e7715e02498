"""Shadow traffic, the pure part: its settings, which requests are copied, and how two answers are compared.

Pure, no I/O: `build_shadow_config` reads the settings from the environment (`shipyard.contract.ENV_SHADOW_*`),
`build_shadow_file_config` from the JSON file the operator mounts on the stable's pods (`ENV_SHADOW_CONFIG`: the
same settings, switched while the server runs), `plan_sample` picks exactly `percent` % of the answered requests
(a counter, no randomness), `parse_infer_response` reads an Open Inference Protocol v2 inference response (JSON,
or the binary tensor data extension) into arrays, and `compare_answers` compares the stable's and the candidate's
answers to the same request row by row: top-1 agreement (classifiers), cosine similarity (embeddings) or the max
absolute difference (anything else). The I/O (sending the copy, counting) is `shipyard.runtime.server.shadow`.
"""

from __future__ import annotations

import contextlib
import math
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from shipyard import contract
from shipyard.runtime import oip

TOP1, COSINE, MAXABS = contract.SHADOW_COMPARES


class ShadowConfigError(ValueError):
    """A shadow environment variable has an invalid value (the message names it)."""


class AnswerError(ValueError):
    """An answer cannot be compared: malformed, an error document, or not the shape of the other answer."""


@dataclass(frozen=True)
class ShadowConfig:
    host: str
    port: int
    base_path: str  # the URL's path, without a trailing slash ("" for most Services)
    display: str  # the URL as logs show it
    percent: float = 100.0
    compare: str = MAXABS
    tolerance: float = contract.SHADOW_DEFAULT_TOLERANCE[MAXABS]
    max_inflight: int = contract.SHADOW_DEFAULT_MAX_INFLIGHT
    max_inflight_bytes: int = contract.SHADOW_DEFAULT_MAX_INFLIGHT_BYTES
    timeout_s: float = contract.SHADOW_DEFAULT_TIMEOUT_MS / 1000.0
    candidate: str = "unknown"  # the candidate's version (the `candidate` label)


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ShadowConfigError(f"environment variable {name}={raw!r} is not a number") from None
    if not math.isfinite(value):
        raise ShadowConfigError(f"environment variable {name}={raw!r} is not a finite number")
    return value


def build_shadow_config(env: Mapping[str, str]) -> ShadowConfig | None:
    """The shadow settings from the environment; None when SHIPYARD_SHADOW_URL is unset or empty (no shadow) or the
    percent is 0. Raises ShadowConfigError naming the variable at fault."""
    url = env.get(contract.ENV_SHADOW_URL, "").strip()
    if not url:
        return None
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ShadowConfigError(f"{contract.ENV_SHADOW_URL}={url!r}: the port is not valid") from None
    if parts.scheme != "http" or not parts.hostname:
        raise ShadowConfigError(f"{contract.ENV_SHADOW_URL}={url!r}: must be http://host[:port][/path] (the "
                                "candidate's Service; TLS is not supported)")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ShadowConfigError(f"{contract.ENV_SHADOW_URL}: no credentials, query or fragment")
    percent = _number(env, contract.ENV_SHADOW_PERCENT, 100.0)
    if not 0.0 <= percent <= 100.0:
        raise ShadowConfigError(f"{contract.ENV_SHADOW_PERCENT}={percent:g} must be within 0..100")
    if percent == 0.0:
        return None
    compare = env.get(contract.ENV_SHADOW_COMPARE, "").strip() or MAXABS
    if compare not in contract.SHADOW_COMPARES:
        raise ShadowConfigError(f"{contract.ENV_SHADOW_COMPARE}={compare!r} is not one of "
                                f"{', '.join(contract.SHADOW_COMPARES)}")
    tolerance = _number(env, contract.ENV_SHADOW_TOLERANCE, contract.SHADOW_DEFAULT_TOLERANCE[compare])
    if tolerance < 0:
        raise ShadowConfigError(f"{contract.ENV_SHADOW_TOLERANCE}={tolerance:g} must be >= 0")
    inflight = _number(env, contract.ENV_SHADOW_MAX_INFLIGHT, contract.SHADOW_DEFAULT_MAX_INFLIGHT)
    if inflight < 1 or inflight != int(inflight):
        raise ShadowConfigError(f"{contract.ENV_SHADOW_MAX_INFLIGHT}={inflight:g} must be a whole number >= 1")
    held = _number(env, contract.ENV_SHADOW_MAX_INFLIGHT_BYTES, contract.SHADOW_DEFAULT_MAX_INFLIGHT_BYTES)
    if held < 1 or held != int(held):
        raise ShadowConfigError(f"{contract.ENV_SHADOW_MAX_INFLIGHT_BYTES}={held:g} must be a whole number >= 1")
    timeout_ms = _number(env, contract.ENV_SHADOW_TIMEOUT_MS, contract.SHADOW_DEFAULT_TIMEOUT_MS)
    if timeout_ms <= 0:
        raise ShadowConfigError(f"{contract.ENV_SHADOW_TIMEOUT_MS}={timeout_ms:g} must be > 0")
    host = parts.hostname
    base_path = parts.path.rstrip("/")
    display = urllib.parse.urlunsplit(("http", parts.netloc, base_path, "", ""))
    return ShadowConfig(host=host, port=port or 80, base_path=base_path, display=display, percent=percent,
                        compare=compare, tolerance=tolerance, max_inflight=int(inflight),
                        max_inflight_bytes=int(held), timeout_s=timeout_ms / 1000,
                        candidate=env.get(contract.ENV_SHADOW_VERSION, "").strip() or "unknown")


def build_shadow_file_config(text: str | bytes) -> ShadowConfig | None:
    """The shadow settings from the file the operator mounts (``ENV_SHADOW_CONFIG``): one JSON object of the keys of
    ``contract.SHADOW_FILE_KEYS`` (url, version, percent, compare, tolerance, maxInflight, maxInflightBytes,
    timeoutMs), each meaning what its environment variable means. Empty (or only whitespace), ``{}``, no url, or
    percent 0: None (no shadow). Raises ShadowConfigError naming the key at fault."""
    raw = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    if not raw.strip():
        return None
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise ShadowConfigError(f"not JSON: {error}") from None
    if not isinstance(document, dict):
        raise ShadowConfigError(f"must be a JSON object, got {type(document).__name__}")
    env: dict[str, str] = {}
    for key, value in document.items():
        name = contract.SHADOW_FILE_KEYS.get(key)
        if name is None:
            raise ShadowConfigError(f"unknown key {key!r} (known: {', '.join(contract.SHADOW_FILE_KEYS)})")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ShadowConfigError(f"{key} must be a string or a number, got {type(value).__name__}")
        env[name] = str(value)
    try:
        return build_shadow_config(env)
    except ShadowConfigError as error:
        message = str(error).replace("environment variable ", "")
        for key, name in contract.SHADOW_FILE_KEYS.items():
            message = message.replace(name, key)
        raise ShadowConfigError(message) from None


def plan_sample(index: int, percent: float) -> bool:
    """Whether the `index`-th (1-based) answered request is copied: exactly floor(N * percent / 100) of the first
    N are, evenly spread (10 %: the 10th, 20th, ...), whatever N."""
    if percent >= 100.0:
        return True
    return math.floor(index * percent / 100.0) > math.floor((index - 1) * percent / 100.0)


def build_infer_path(base_path: str, model: str) -> str:
    """The candidate's inference path for `model`, never a versioned one (the candidate serves another version)."""
    return f"{base_path}/v2/models/{urllib.parse.quote(model, safe='')}/infer"


def build_request_body(inputs: Sequence[oip.TensorSpecLike], arrays: Sequence[np.ndarray],
                       outputs: Sequence[oip.TensorSpecLike], output_indices: Sequence[int] | None) -> bytes:
    """An OIP v2 JSON inference request from parsed input tensors (a gRPC request the stable answered, copied to the
    candidate's REST endpoint), asking for the same outputs."""
    items = [{"name": spec.name, "datatype": spec.datatype, "shape": list(array.shape),
              "data": np.ascontiguousarray(array).reshape(-1)} for spec, array in zip(inputs, arrays, strict=True)]
    document: dict[str, Any] = {"inputs": items}
    if output_indices is not None:
        document["outputs"] = [{"name": outputs[i].name} for i in output_indices]
    return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)


# ------------------------------------------------------------------------------------------------- answers

@dataclass(frozen=True)
class Output:
    """One output tensor of an answer, as float64 rows: `rows[i]` is the i-th batch row, flattened."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    rows: np.ndarray  # 2-D float64: (batch rows, values per row)


def build_rows(values: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A tensor as 2-D rows: rank >= 2 is (shape[0], the rest flattened); rank 1 is one value per row (a binary
    classifier's one logit per sample); rank 0 is one row of one value."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(shape) == 0:
        return flat.reshape(1, 1)
    if len(shape) == 1:
        return flat.reshape(-1, 1)
    return flat.reshape(shape[0], -1)


def parse_infer_response(body: bytes, header_length: int | None = None) -> list[Output]:
    """The numeric outputs of an OIP v2 inference response, in its order (BYTES outputs are left out).
    `header_length`: the body is a JSON header of that length followed by the binary outputs' bytes (the binary
    tensor data extension). Raises AnswerError for anything malformed."""
    raw = body if header_length is None else body[:header_length]
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise AnswerError(f"not JSON: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("outputs"), list):
        raise AnswerError("no outputs in the answer")
    offset = header_length or 0
    found: list[Output] = []
    for item in document["outputs"]:
        if not isinstance(item, dict):
            raise AnswerError("an output is not an object")
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list) \
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise AnswerError("an output lacks a name, a datatype or a shape")
        count = math.prod(shape)
        parameters = item.get("parameters")
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if size is not None:
            if header_length is None or not isinstance(size, int) or size < 0 or offset + size > len(body):
                raise AnswerError(f"output {name}: binary data outside the answer")
            chunk = body[offset:offset + size]
            offset += size
            if datatype == "BYTES":
                continue
            dtype = oip.WIRE_DTYPE_BY_DATATYPE.get(datatype)
            if dtype is None or size != count * dtype.itemsize:
                raise AnswerError(f"output {name}: {size} bytes do not hold {count} {datatype}")
            values = np.frombuffer(chunk, dtype=dtype)
            if datatype == "BF16":  # bfloat16's bits are a float32's upper half
                values = (values.astype("<u4") << 16).view("<f4")
        else:
            if datatype == "BYTES":
                continue
            if datatype not in oip.NUMPY_BY_DATATYPE:
                raise AnswerError(f"output {name}: unknown datatype {datatype!r}")
            data = item.get("data")
            if not isinstance(data, list):
                raise AnswerError(f"output {name}: no data")
            try:
                values = np.asarray(data, dtype=np.float64).reshape(-1)
            except (ValueError, TypeError):
                raise AnswerError(f"output {name}: data is not numeric") from None
            if values.size != count:
                raise AnswerError(f"output {name}: {values.size} values for shape {shape}")
        if count == 0:
            raise AnswerError(f"output {name}: empty")
        found.append(Output(name, datatype, tuple(shape), build_rows(values, shape)))
    return found


@dataclass(frozen=True)
class Comparison:
    """Two answers to one request compared row by row."""

    rows: int
    agreeing: int
    scores: tuple[float, ...] = ()  # per row: cosine similarity (cosine), max |difference| (maxabs); none for top1

    @property
    def agreement(self) -> float:
        return self.agreeing / self.rows


def _top1(stable: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    if stable.shape[1] == 1:  # one logit per row: the class is its sign
        return np.asarray((stable[:, 0] > 0) == (candidate[:, 0] > 0))
    return np.asarray(np.argmax(stable, axis=1) == np.argmax(candidate, axis=1))


def build_cosines(stable: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity; two zero rows are identical (1), one zero row against another is 0."""
    dots = np.einsum("ij,ij->i", stable, candidate)
    norms = np.linalg.norm(stable, axis=1) * np.linalg.norm(candidate, axis=1)
    both_zero = (np.linalg.norm(stable, axis=1) == 0) & (np.linalg.norm(candidate, axis=1) == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cosines = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)
    return np.asarray(np.where(both_zero, 1.0, np.clip(cosines, -1.0, 1.0)))


def compare_answers(stable: Sequence[Output], candidate: Sequence[Output], compare: str,
                    tolerance: float) -> Comparison:
    """Compare the candidate's answer to the stable's on the stable's first numeric output (the candidate's output
    of the same name). top1: a row agrees when its argmax is the same (a one-value row: the same sign); cosine:
    when its cosine similarity is >= 1 - tolerance; maxabs: when its max absolute difference is <= tolerance (NaN
    never agrees). Raises AnswerError when there is nothing to compare or the shapes differ."""
    if not stable:
        raise AnswerError("the stable's answer has no numeric output")
    reference = stable[0]
    other = next((output for output in candidate if output.name == reference.name), None)
    if other is None:
        raise AnswerError(f"the candidate's answer has no output {reference.name!r}")
    if other.shape != reference.shape:
        raise AnswerError(f"output {reference.name!r}: the candidate's shape {list(other.shape)} is not the "
                          f"stable's {list(reference.shape)}")
    a, b = reference.rows, other.rows
    if compare == TOP1:
        agree = _top1(a, b)
        return Comparison(int(agree.size), int(agree.sum()))
    if compare == COSINE:
        cosines = build_cosines(a, b)
        agree = cosines >= 1.0 - tolerance
        return Comparison(int(agree.size), int(agree.sum()), tuple(float(c) for c in cosines))
    if compare == MAXABS:
        with np.errstate(invalid="ignore"):
            differences = np.max(np.abs(a - b), axis=1)
        agree = differences <= tolerance
        return Comparison(int(agree.size), int(agree.sum()), tuple(float(d) for d in differences))
    raise ValueError(f"unknown comparison {compare!r}")


def assess_candidate_answer(status: int, body: bytes, header_length: int | None) -> list[Output]:
    """The candidate's outputs from its HTTP answer; a non-200 answer is an AnswerError quoting its message."""
    if status != 200:
        message: Any = ""
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
            message = orjson.loads(body).get("error", "")
        raise AnswerError(f"the candidate answered HTTP {status}{': ' + str(message)[:200] if message else ''}")
    return parse_infer_response(body, header_length)
