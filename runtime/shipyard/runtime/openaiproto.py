"""OpenAI's embeddings API (`POST /v1/embeddings`): its request and response documents and its error format.

Pure: JSON bytes in, a validated `EmbeddingsRequest` out; numpy vectors in, JSON bytes out. Served for a model that
takes text (a tokenizer in its manifest, `textinput`) and has one floating output of shape [-1, D]
(`assess_embedding_model`); the server runs it through the same batcher as the inference endpoints.

Errors follow OpenAI's format, `{"error": {"message", "type", "param", "code"}}`: `OpenAIError` carries the HTTP
status and those fields (`build_openai_error`, `build_error_body`).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from shipyard.runtime import oip

PATH = "/v1/embeddings"
ENCODING_FORMATS = ("float", "base64")
MAX_INPUTS = 2048  # OpenAI's limit on the items of one request
_FLOAT_DATATYPES = frozenset({"FP16", "FP32", "FP64", "BF16"})


class OpenAIError(Exception):
    """A request answered with an OpenAI-style error: HTTP `status`, and the error object's fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code


def build_openai_error(error: BaseException) -> OpenAIError:
    """An OpenAI error for any failure: itself, or a ServingError mapped by its HTTP status (`oip`). Pure."""
    if isinstance(error, OpenAIError):
        return error
    status = oip.build_error_status(error)
    type_ = {400: "invalid_request_error", 404: "invalid_request_error", 503: "server_error",
             504: "server_error"}.get(status, "server_error")
    code = {503: "service_unavailable", 504: "timeout"}.get(status)
    return OpenAIError(status, str(error), type_, None, code)


def build_error_body(error: OpenAIError) -> bytes:
    """OpenAI's error document. Pure."""
    return orjson.dumps({"error": {"message": error.message, "type": error.type, "param": error.param,
                                   "code": error.code}})


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str
    texts: list[str] | None  # the input as strings, or
    token_ids: list[list[int]] | None  # the input as token-id arrays (already tokenized)
    encoding_format: str = "float"
    dimensions: int | None = None

    @property
    def count(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids or [])


def build_embeddings_request(body: bytes) -> EmbeddingsRequest:
    """Parse and validate a `POST /v1/embeddings` body; raises OpenAIError (400) naming the parameter. Pure."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise OpenAIError(400, f"the request body is not valid JSON: {error}") from None
    if type(document) is not dict:
        raise OpenAIError(400, "the request body must be a JSON object")
    model = document.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError(400, "'model' must be a non-empty string", param="model")
    encoding_format = document.get("encoding_format") or "float"
    if encoding_format not in ENCODING_FORMATS:
        raise OpenAIError(400, f"'encoding_format' must be one of {', '.join(ENCODING_FORMATS)}, got "
                               f"{encoding_format!r}", param="encoding_format")
    dimensions = document.get("dimensions")
    if dimensions is not None and (type(dimensions) is not int or dimensions < 1):
        raise OpenAIError(400, f"'dimensions' must be a positive integer, got {dimensions!r}", param="dimensions")
    texts, token_ids = build_input(document.get("input", None))
    return EmbeddingsRequest(model, texts, token_ids, encoding_format, dimensions)


def build_input(raw: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    """`input`: a string, a list of strings, a list of token ids (one input) or a list of such lists. Pure."""
    if isinstance(raw, str):
        return [raw], None
    if type(raw) is not list or not raw:
        raise OpenAIError(400, "'input' must be a string, a non-empty list of strings or of token-id arrays",
                          param="input")
    if len(raw) > MAX_INPUTS:
        raise OpenAIError(400, f"'input' has {len(raw)} items; at most {MAX_INPUTS}", param="input")
    if all(type(item) is str for item in raw):
        return list(raw), None
    if all(type(item) is int for item in raw):
        raw = [raw]
    arrays = []
    for index, item in enumerate(raw):
        if type(item) is not list or not item or not all(type(token) is int and token >= 0 for token in item):
            raise OpenAIError(400, f"'input'[{index}] must be a string or a non-empty list of non-negative token "
                                   "ids, and every item of one kind", param="input")
        arrays.append(item)
    return None, arrays


def assess_embedding_model(has_text: bool, outputs: Sequence[oip.TensorSpecLike]) -> str | None:
    """Why a model cannot serve embeddings (None: it can): it needs a tokenizer and one floating output of shape
    [-1, D]. Pure."""
    if not has_text:
        return "it declares no tokenizer (the manifest's 'tokenizer'), so it does not take text"
    if len(outputs) != 1:
        return f"it has {len(outputs)} outputs; embeddings need exactly one"
    spec = outputs[0]
    shape = list(spec.shape)
    if spec.datatype not in _FLOAT_DATATYPES or len(shape) != 2 or shape[1] < 1:
        return f"its output {spec.name!r} is {spec.datatype} {shape}; embeddings need a floating output [-1, D]"
    return None


def build_embeddings_response(
    model: str, vectors: np.ndarray, encoding_format: str, dimensions: int | None, tokens: int
) -> bytes:
    """The response document: one embedding per row of `vectors` (float32 list, or base64 of little-endian float32
    bytes), shortened to `dimensions` and re-normalised to unit length when asked. Raises OpenAIError (400) for
    more dimensions than the model has. Pure."""
    values: np.ndarray = np.asarray(vectors, dtype=np.float32)
    if dimensions is not None:
        if dimensions > values.shape[1]:
            raise OpenAIError(400, f"'dimensions' is {dimensions}; model {model!r} has {values.shape[1]}",
                              param="dimensions")
        if dimensions < values.shape[1]:
            values = values[:, :dimensions]
            norms = np.linalg.norm(values, axis=1, keepdims=True)
            values = values / np.where(norms > 0, norms, 1.0)
    data = []
    for index, row in enumerate(values):
        embedding: Any = (
            base64.b64encode(np.ascontiguousarray(row, dtype="<f4").tobytes()).decode("ascii")
            if encoding_format == "base64"
            else row
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    document = {"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
