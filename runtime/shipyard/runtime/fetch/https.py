"""`https://` (and, with `--allow-http`, `http://`) sources, with urllib3 (it comes with botocore).

One streaming GET, the bytes hashed as they are written. A connection error, a 5xx/429/408, a read timeout or a
body cut short is retried with backoff; when the server sent an ETag or Last-Modified and `Accept-Ranges: bytes`, the
retry resumes where it stopped (`Range` + `If-Range`), else it starts over. Redirects are followed (5 at most), never
from https to plain http. `Accept-Encoding: identity`: the bytes are the file's, never re-encoded by the server.

Slow servers are bounded three ways: `--timeout` for a connection and for each wait for data; a low-speed limit (an
attempt fails when fewer than `--timeout` x 1 KiB arrived in the last `--timeout` seconds: a server that drips a byte
every few seconds); and the overall `--deadline`.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import time
import urllib.parse
from pathlib import Path
from typing import Any

import urllib3

from shipyard.runtime.fetch.errors import FetchError, build_status_message, build_timeout_message, is_retryable_status
from shipyard.runtime.fetch.plan import Downloaded, Plan, RemoteObject, build_validator
from shipyard.runtime.fetch.progress import LowSpeedWindow, Progress
from shipyard.runtime.fetch.retry import Deadline, run_with_retries
from shipyard.runtime.fetch.sources import Source

log = logging.getLogger("shipyard.runtime.fetch")

CHUNK = 1 << 20
MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)


def describe_exception(error: BaseException) -> str:
    """A short reason for a transport error, without its URL (which may hold a presigned query). Pure."""
    seen: set[int] = set()
    queue: list[BaseException] = [error]
    while queue:  # the error, its causes and the exceptions it wraps (urllib3 keeps them in args or `reason`)
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            detail = getattr(current, "verify_message", None) or getattr(current, "reason", None) or "certificate"
            return f"TLS certificate verification failed: {detail}"
        if isinstance(current, ssl.SSLError):
            return f"TLS error: {getattr(current, 'reason', None) or type(current).__name__}"
        if isinstance(current, ConnectionRefusedError):
            return "connection refused"
        if isinstance(current, ConnectionResetError):
            return "connection reset"
        if isinstance(current, (TimeoutError, urllib3.exceptions.TimeoutError)) and \
                not isinstance(current, urllib3.exceptions.NewConnectionError):  # a subclass of ConnectTimeoutError
            return "timed out"
        wrapped = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        queue.extend(e for e in wrapped if isinstance(e, BaseException))
    if isinstance(error, urllib3.exceptions.SSLError):
        return "TLS error"
    if isinstance(error, urllib3.exceptions.NewConnectionError):
        return "could not connect"
    if isinstance(error, urllib3.exceptions.ProtocolError):
        return "connection broken"
    return type(error).__name__



def build_redirect_target(url: str, location: str, display: str, allow_http: bool) -> str:
    """Where a redirect from `url` leads; FetchError when it leaves https (for http only with `allow_http`). Pure."""
    target = urllib.parse.urljoin(url, location)
    scheme = urllib.parse.urlsplit(target).scheme.lower()
    if scheme != "https" and not (scheme == "http" and allow_http):
        raise FetchError(f"{display} redirects to a {scheme or 'relative'}:// URL: refused")
    return target

class HttpsFetcher:
    def __init__(self, source: Source, *, deadline: Deadline, timeout: float, retries: int,
                 ca_bundle: str | None = None, allow_http: bool = False) -> None:
        self.source = source
        self.deadline = deadline
        self.timeout = timeout
        self.retries = retries
        self.allow_http = allow_http
        self.endpoint = ""
        kwargs: dict[str, Any] = {"cert_reqs": "CERT_REQUIRED"}
        if ca_bundle:
            kwargs["ca_certs"] = ca_bundle
        self.pool = urllib3.PoolManager(num_pools=4, maxsize=2, retries=False, **kwargs)

    # -- requests --------------------------------------------------------------------------------------------------

    def _request(self, method: str, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        """One request, redirects followed; transport errors become retryable FetchErrors."""
        url = self.source.uri
        display = self.source.display
        for _ in range(MAX_REDIRECTS + 1):
            timeout = urllib3.Timeout(connect=self.deadline.socket_timeout(self.timeout),
                                      read=self.deadline.socket_timeout(self.timeout))
            try:
                response = self.pool.request(method, url, headers=headers, preload_content=False, redirect=False,
                                             retries=False, timeout=timeout, decode_content=False)
            except urllib3.exceptions.HTTPError as error:
                reason = describe_exception(error)
                if reason.startswith("TLS certificate verification failed"):
                    raise FetchError(f"{reason} for {display} (--ca-bundle?)") from None
                if reason == "timed out":
                    raise FetchError(build_timeout_message(self.timeout, display, "no answer"),
                                     retryable=True) from None
                raise FetchError(f"{reason} to {display}", retryable=True) from None
            if response.status in REDIRECTS and response.headers.get("Location"):
                _discard(response)
                url = build_redirect_target(url, response.headers["Location"], display, self.allow_http)
                continue
            return response
        raise FetchError(f"{display}: more than {MAX_REDIRECTS} redirects")

    def _check_status(self, response: urllib3.BaseHTTPResponse) -> None:
        if response.status in (200, 206):
            return
        _discard(response)
        raise FetchError(build_status_message(response.status, self.source.display),
                         retryable=is_retryable_status(response.status))

    # -- Fetcher ---------------------------------------------------------------------------------------------------

    def plan(self, probe: bool) -> Plan:
        name = self.source.name
        if not probe:
            return Plan((RemoteObject(name, self.source.uri),), tree=False)

        def head(_: int) -> Plan:
            response = self._request("HEAD", {"Accept-Encoding": "identity"})
            try:
                if response.status in (405, 501):  # no HEAD: nothing to key a cache entry on
                    return Plan((RemoteObject(name, self.source.uri),), tree=False)
                self._check_status(response)
                length = response.headers.get("Content-Length")
                size = int(length) if length and length.isdigit() else None
                etag, modified = response.headers.get("ETag"), response.headers.get("Last-Modified")
            finally:
                response.release_conn()
            obj = RemoteObject(name, self.source.uri, size, etag, modified)
            return Plan((obj,), tree=False, validator=build_validator([(name, size, etag, modified)]))

        return run_with_retries(head, retries=self.retries, deadline=self.deadline, display=self.source.display,
                                what="HEAD")

    def download(self, plan: Plan, placements: dict[str, Path], progress: Progress) -> dict[str, Downloaded]:
        (obj,) = plan.objects
        return {obj.rel: self._download_one(placements[obj.rel], progress)}

    def _download_one(self, path: Path, progress: Progress) -> Downloaded:
        display = self.source.display
        state: dict[str, Any] = {"written": 0, "sha": hashlib.sha256(), "etag": None, "modified": None,
                                 "ranges": False}
        with open(path, "wb") as sink:

            def attempt(n: int) -> Downloaded:
                headers = {"Accept-Encoding": "identity"}
                written = state["written"]
                validator = state["etag"] if state["etag"] and not state["etag"].startswith("W/") \
                    else state["modified"]
                resuming = n > 0 and written > 0 and state["ranges"] and validator
                if resuming:
                    headers["Range"] = f"bytes={written}-"
                    headers["If-Range"] = validator
                response = self._request("GET", headers)
                complete = False
                try:
                    self._check_status(response)
                    if response.status == 206 and resuming and _range_start(response) == written:
                        log.info("Resuming %s at byte %d", display, written)
                    else:
                        if response.status == 206:  # a range we did not ask for: start over without one
                            raise FetchError(f"unexpected partial answer (206) from {display}", retryable=True)
                        if written:
                            log.info("Restarting %s from the start (%d bytes discarded)", display, written)
                            progress.rewind(written)
                        sink.seek(0)
                        sink.truncate()
                        state.update(written=0, sha=hashlib.sha256(), etag=response.headers.get("ETag"),
                                     modified=response.headers.get("Last-Modified"),
                                     ranges=response.headers.get("Accept-Ranges", "").lower() == "bytes")
                    length = response.headers.get("Content-Length")
                    expected = state["written"] + int(length) if length and length.isdigit() else None
                    self._stream(response, sink, state, progress, expected)
                    if expected is not None and state["written"] != expected:
                        raise FetchError(f"connection closed after {state['written']} of {expected} bytes of "
                                         f"{display}", retryable=True)
                    complete = True
                finally:
                    if complete:
                        response.release_conn()
                    else:
                        _discard(response)
                return Downloaded(state["sha"].hexdigest(), state["written"])

            return run_with_retries(attempt, retries=self.retries, deadline=self.deadline, display=display,
                                    what="GET")

    def _stream(self, response: urllib3.BaseHTTPResponse, sink: Any, state: dict[str, Any],
                progress: Progress, expected: int | None) -> None:
        display = self.source.display
        window = LowSpeedWindow(self.timeout)
        started = time.monotonic()
        while True:
            self.deadline.check(display)
            try:
                chunk = response.read1(CHUNK, decode_content=False)
            except urllib3.exceptions.ReadTimeoutError:
                raise FetchError(build_timeout_message(self.timeout, display, "no data"), retryable=True) from None
            except (urllib3.exceptions.HTTPError, OSError) as error:
                of = f" of {expected}" if expected is not None else ""
                raise FetchError(f"{describe_exception(error)} after {state['written']}{of} bytes of {display}",
                                 retryable=True) from None
            if not chunk:
                return
            try:
                sink.write(chunk)
            except OSError as error:
                raise FetchError(f"could not write {sink.name}: {error.strerror}") from None
            state["sha"].update(chunk)
            state["written"] += len(chunk)
            progress.add(len(chunk))
            slow = window.add(len(chunk))
            if slow is not None:
                raise FetchError(build_timeout_message(round(time.monotonic() - started), display, slow),
                                 retryable=True)


def _discard(response: urllib3.BaseHTTPResponse) -> None:
    """Closes a response whose body is not read to its end: its connection must never go back to the pool (the next
    request on it would read the rest of this body as its answer)."""
    response.close()
    response.release_conn()


def _range_start(response: urllib3.BaseHTTPResponse) -> int | None:
    """The first byte of a 206's Content-Range (`bytes 100-199/200`)."""
    value = response.headers.get("Content-Range", "")
    unit, _, rest = value.partition(" ")
    start = rest.partition("-")[0]
    return int(start) if unit == "bytes" and start.isdigit() else None
