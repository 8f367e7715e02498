"""A small Open Inference Protocol v2 REST client (JSON): model metadata and inference, for `evaluate`.

Pure: `build_endpoint` (URL checks, a display form without credentials), `build_tensor_specs` (metadata ->
tensor specs), `build_infer_body` (numpy arrays -> request JSON), `build_output_array` (response JSON -> the
numpy array of one output), `plan_backoff`. Does I/O: `OipClient` talks HTTP/1.1 over `http.client`, one
keep-alive connection per thread, with a timeout on every socket operation, a bounded number of retries for
connection errors only (refused, reset before an answer, DNS: what a starting pod or a new Service gives),
never for an answer (an HTTP error or a timeout waiting for one), and size-capped response bodies.

Standard library, numpy and orjson only: no torch, no aiohttp. Every failure is an `EndpointError` whose
message names the endpoint (without credentials) and what went wrong.
"""

from __future__ import annotations

import dataclasses
import http.client
import math
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import orjson

from shipyard.runtime import oip

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_RETRIES = 5  # connection retries, with backoff 0.2, 0.4, 0.8, 1.6, 2 s: about 5 s for a starting pod
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
MAX_METADATA_BYTES = 1024 * 1024
MAX_ERROR_EXCERPT = 200  # characters of a server's error message quoted in ours
USER_AGENT = "shipyard-runtime-evaluate"


class EndpointError(RuntimeError):
    """The endpoint could not be reached, answered with an error, or answered something malformed."""


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """An OIP server's base URL, split for http.client; `display` is the URL as messages show it."""

    scheme: str
    host: str
    port: int
    base_path: str
    display: str

    def model_path(self, model: str, suffix: str = "") -> str:
        return f"{self.base_path}/v2/models/{urllib.parse.quote(model, safe='')}{suffix}"


def build_endpoint(url: str) -> Endpoint:
    """Check a base URL (http or https, a host, no credentials, query or fragment); raises ValueError. Pure."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError as error:
        raise ValueError(f"{url!r} is not a valid URL ({error})") from None
    netloc = parts.netloc.rpartition("@")[2]  # never echo credentials
    display = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{display or '(empty)'}: the URL must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"{display}: the URL has no host")
    if "@" in parts.netloc:
        raise ValueError(f"{display}: credentials in the URL are not supported")
    if parts.query or parts.fragment:
        raise ValueError(f"{display}: the URL must not carry a query or a fragment")
    default_port = 443 if parts.scheme == "https" else 80
    return Endpoint(parts.scheme, parts.hostname, port or default_port, parts.path.rstrip("/"), display)


def plan_backoff(attempt: int, base_s: float = 0.2, cap_s: float = 2.0) -> float:
    """Seconds to wait before retry number `attempt` (0-based): doubling from `base_s`, capped. Pure."""
    return float(min(cap_s, base_s * 2**attempt))


def build_tensor_specs(metadata: Mapping[str, Any], role: str) -> list[dict[str, Any]]:
    """The `inputs` or `outputs` of an OIP model metadata document as `{name, datatype, shape}` dicts, checked:
    a name, a datatype this client can carry (not BYTES), a shape of integers (-1 = variable). Pure."""
    specs = metadata.get(role)
    if not isinstance(specs, list) or not specs:
        raise EndpointError(f"the model metadata declares no {role}")
    checked = []
    for spec in specs:
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str):
            raise EndpointError(f"the model metadata has an entry of {role} without a string 'name'")
        datatype = spec.get("datatype")
        if datatype not in oip.NUMPY_BY_DATATYPE:
            raise EndpointError(f"{role[:-1]} {name!r}: datatype {datatype!r} cannot be evaluated (numbers only)")
        shape = spec.get("shape")
        if type(shape) is not list or not shape or not all(type(d) is int and d >= -1 for d in shape):
            raise EndpointError(f"{role[:-1]} {name!r}: shape {shape!r} is not a list of sizes (-1 = variable)")
        checked.append({"name": name, "datatype": datatype, "shape": shape})
    return checked


def build_infer_body(inputs: Sequence[Mapping[str, Any]], arrays: Sequence[np.ndarray], output: str) -> bytes:
    """An OIP inference request (JSON) carrying `arrays` as the declared `inputs`, in order, and asking for the
    one output named `output`. Pure."""
    items = []
    for spec, array in zip(inputs, arrays, strict=True):
        flat = np.ascontiguousarray(array.reshape(-1))
        items.append({"name": spec["name"], "datatype": spec["datatype"], "shape": list(array.shape), "data": flat})
    return orjson.dumps({"inputs": items, "outputs": [{"name": output}]}, option=orjson.OPT_SERIALIZE_NUMPY)


def build_output_array(body: bytes, spec: Mapping[str, Any], rows: int) -> np.ndarray:
    """The output `spec` (name, datatype, declared shape) of an OIP inference response, with `rows` rows, as a
    numpy array; raises EndpointError naming what is malformed. Pure."""
    name = spec["name"]
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise EndpointError(f"the response is not JSON ({error})") from None
    outputs = document.get("outputs") if isinstance(document, dict) else None
    if not isinstance(outputs, list):
        raise EndpointError("the response has no 'outputs' list")
    item = next((o for o in outputs if isinstance(o, dict) and o.get("name") == name), None)
    if item is None:
        names = [o.get("name") for o in outputs if isinstance(o, dict)]
        raise EndpointError(f"the response has no output {name!r} (outputs: {names})")
    where = f"output {name!r}"
    datatype = item.get("datatype")
    if datatype not in oip.NUMPY_BY_DATATYPE:
        raise EndpointError(f"{where}: datatype {datatype!r} is not a numeric tensor")
    shape = item.get("shape")
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise EndpointError(f"{where}: 'shape' must be a list of non-negative integers, got {shape!r}")
    declared = spec["shape"]
    if len(shape) != len(declared) or any(d not in (-1, s) for d, s in zip(declared[1:], shape[1:], strict=True)):
        raise EndpointError(f"{where}: shape {shape} does not match the declared {declared}")
    if shape[0] != rows:
        raise EndpointError(f"{where}: {shape[0]} rows for a request of {rows}")
    data = item.get("data")
    if type(data) is not list:
        raise EndpointError(f"{where}: 'data' must be a list")
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise EndpointError(f"{where}: 'data' is not a regular array") from None
    if raw.size != math.prod(shape):
        raise EndpointError(f"{where}: {raw.size} data elements do not fill shape {shape}")
    if raw.size and raw.dtype.kind not in "biuf":
        raise EndpointError(f"{where}: data of kind {raw.dtype.name} is not numeric")
    return raw.astype(oip.NUMPY_BY_DATATYPE[datatype], copy=False).reshape(shape)


def build_error_excerpt(body: bytes) -> str:
    """What an error response says, shortened: its OIP `error` field, else the start of the body. Pure."""
    try:
        document = orjson.loads(body)
        text = document["error"] if isinstance(document, dict) and isinstance(document.get("error"), str) else None
    except orjson.JSONDecodeError:
        text = None
    if text is None:
        text = body[: MAX_ERROR_EXCERPT * 4].decode("utf-8", "replace")
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_EXCERPT else text[: MAX_ERROR_EXCERPT - 3] + "..."


def _describe(error: BaseException) -> str:
    if isinstance(error, socket.gaierror):
        return f"name resolution failed ({error.strerror or error})"
    if isinstance(error, TimeoutError):
        return "timed out"
    text = getattr(error, "strerror", None) or str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _Retry(Exception):
    """A connection error worth another attempt (wraps the cause)."""


class OipClient:
    """Blocking OIP REST client, safe to share between threads (each thread keeps its own connection)."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.retries = retries
        self.max_response_bytes = max_response_bytes
        self.connection_retries = 0  # retries taken, all threads together
        self._sleep = sleep
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[http.client.HTTPConnection] = []

    def fetch_metadata(self, model: str) -> dict[str, Any]:
        """GET the model's metadata document."""
        what = f"model metadata at {self.endpoint.display}"
        body = self._exchange("GET", self.endpoint.model_path(model), None, MAX_METADATA_BYTES, what)
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as error:
            raise EndpointError(f"{what}: the response is not JSON ({error})") from None
        if not isinstance(document, dict):
            raise EndpointError(f"{what}: the response is not a JSON object")
        return document

    def query_infer(self, model: str, body: bytes) -> bytes:
        """POST one inference request; returns the body of the 200 response."""
        what = f"inference at {self.endpoint.display}"
        return self._exchange("POST", self.endpoint.model_path(model, "/infer"), body, self.max_response_bytes, what)

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()

    # -- internals

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            factory = http.client.HTTPSConnection if self.endpoint.scheme == "https" else http.client.HTTPConnection
            conn = factory(self.endpoint.host, self.endpoint.port, timeout=self.timeout_s)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        self._local.conn = None
        with self._lock:
            if conn in self._connections:
                self._connections.remove(conn)

    def _exchange(self, method: str, path: str, body: bytes | None, cap: int, what: str) -> bytes:
        attempt = 0
        while True:
            conn = self._connection()
            reused = conn.sock is not None
            try:
                status, data = self._attempt(conn, method, path, body, cap, what)
            except _Retry as retry:
                self._drop(conn)
                if reused:  # the server closed an idle keep-alive connection: a fresh one at once, not counted
                    continue
                cause = retry.__cause__ or retry
                if attempt >= self.retries:
                    tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
                    raise EndpointError(f"could not connect to {self.endpoint.display}: {_describe(cause)} "
                                        f"({tries})") from None
                self._sleep(plan_backoff(attempt))
                attempt += 1
                with self._lock:
                    self.connection_retries += 1
                continue
            except EndpointError:
                self._drop(conn)
                raise
            if status != 200:
                raise EndpointError(f"{what}: HTTP {status}: {build_error_excerpt(data)}")
            return data

    def _attempt(
        self, conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None, cap: int, what: str
    ) -> tuple[int, bytes]:
        headers = {"accept": "application/json", "user-agent": USER_AGENT}
        if body is not None:
            headers["content-type"] = "application/json"
        try:
            if conn.sock is None:
                conn.connect()
        except OSError as error:  # refused, unreachable, DNS, connect timeout: nothing was sent
            raise _Retry() from error
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
        except TimeoutError:
            raise EndpointError(f"{what}: no answer within {self.timeout_s:g} s") from None
        except (ConnectionError, http.client.RemoteDisconnected) as error:  # reset or closed before an answer
            raise _Retry() from error
        except (OSError, http.client.HTTPException) as error:
            raise EndpointError(f"{what}: {_describe(error)}") from None
        try:
            if response.length is not None and response.length > cap:
                raise EndpointError(f"{what}: the response of {response.length} bytes exceeds the limit of {cap}")
            data = response.read(cap + 1)
            if len(data) > cap:
                raise EndpointError(f"{what}: the response exceeds the limit of {cap} bytes")
        except TimeoutError:
            raise EndpointError(f"{what}: the response did not arrive within {self.timeout_s:g} s") from None
        except (OSError, http.client.HTTPException) as error:
            raise EndpointError(f"{what}: the response broke off ({_describe(error)})") from None
        if response.will_close or not response.isclosed():  # not a reusable connection
            self._drop(conn)
        return response.status, data
