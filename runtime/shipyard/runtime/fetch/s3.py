"""`s3://` sources (AWS S3 and S3-compatible stores), with botocore: its credential chain (environment, web identity
/ IRSA, EKS Pod Identity, config files, instance metadata), SigV4, endpoint, region and addressing settings.

Objects are downloaded with parallel ranged GETs of `--part-size` bytes, `--parallelism` at a time over one
connection pool (`os.pwrite` at each part's offset), each part retried on its own from the byte where it stopped,
every GET conditional on the ETag the HEAD or LIST saw (`If-Match`: an object replaced mid-download fails instead of
mixing two versions). The sha256 of each file is computed while the download runs: whichever worker completes the
part at the hashing frontier reads the parts now contiguous back (from the page cache) and hashes them, so the digest
costs no second pass over the file at the end.

Environment (botocore reads it): `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`,
`AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN` (IRSA), `AWS_REGION`/`AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL` (another store), `AWS_CA_BUNDLE`; fetch's own: `SHIPYARD_FETCH_S3_ADDRESSING` (`path`, `virtual`,
`auto`; default `path` with an endpoint URL, else `auto`). With no credentials at all the requests go unsigned
(public buckets), which the log says.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

from shipyard.runtime.fetch.errors import (
    FetchError,
    UsageError,
    build_status_message,
    build_timeout_message,
    is_retryable_status,
)
from shipyard.runtime.fetch.plan import Downloaded, Plan, RemoteObject, build_validator
from shipyard.runtime.fetch.progress import LowSpeedWindow, Progress
from shipyard.runtime.fetch.retry import Deadline, run_with_retries
from shipyard.runtime.fetch.sources import Source, check_relative_path

log = logging.getLogger("shipyard.runtime.fetch")

CHUNK = 1 << 20
HASH_CHUNK = 4 << 20
ADDRESSING = ("auto", "path", "virtual")


def build_parts(size: int, part_size: int) -> list[tuple[int, int]]:
    """Inclusive byte ranges covering `size` bytes in parts of `part_size`; none for an empty object. Pure."""
    return [(start, min(size, start + part_size) - 1) for start in range(0, size, max(1, part_size))]


def build_relative_paths(keys: list[str], prefix: str, display_prefix: str) -> dict[str, str]:
    """Key -> relative path of the objects under a prefix (folder markers `.../` left out), or FetchError naming
    the object refused: `..`, absolute, a name fetch reserves, two keys with one path, a path that is both a file and
    a directory. Pure."""
    out: dict[str, str] = {}
    taken: dict[str, str] = {}
    for key in keys:
        if key.endswith("/"):
            continue
        rel_raw = key[len(prefix):]
        try:
            rel = check_relative_path(rel_raw)
        except ValueError as error:
            raise FetchError(f"refused object {display_prefix}{rel_raw}: {error}") from None
        if rel in taken:
            raise FetchError(f"refused object {display_prefix}{rel_raw}: the same path as {display_prefix}"
                             f"{taken[rel][len(prefix):]}")
        taken[rel] = key
        out[key] = rel
    files = set(out.values())
    for rel in files:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in files:
                raise FetchError(f"refused object {display_prefix}{'/'.join(parts[:i])}: it is also a directory "
                                 f"({display_prefix}{rel})")
    return out


def build_client_settings(env: dict[str, str], addressing: str | None) -> dict[str, Any]:
    """Endpoint, region and addressing style from the environment and the flag. Pure."""
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
    style = (addressing or "").strip().lower() or ("path" if endpoint else "auto")
    if style not in ADDRESSING:
        raise UsageError(f"S3 addressing {addressing!r}: expected one of {', '.join(ADDRESSING)} "
                         "(SHIPYARD_FETCH_S3_ADDRESSING)")
    return {"endpoint": endpoint, "region": region, "addressing": style}


@dataclasses.dataclass
class _File:
    """One object being downloaded: its parts and the hashing frontier."""

    obj: RemoteObject
    path: Path
    fd: int
    parts: list[tuple[int, int]]
    done: set[int] = dataclasses.field(default_factory=set)
    next_hash: int = 0
    hashing: bool = False
    sha: Any = dataclasses.field(default_factory=hashlib.sha256)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


class S3Fetcher:
    def __init__(self, source: Source, *, deadline: Deadline, timeout: float, retries: int, parallelism: int,
                 part_size: int, ca_bundle: str | None = None, addressing: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        import boto3
        import botocore
        import botocore.config

        self.source = source
        self.deadline = deadline
        self.timeout = timeout
        self.retries = retries
        self.parallelism = max(1, parallelism)
        self.part_size = max(1 << 20, part_size)
        settings = build_client_settings(dict(os.environ if env is None else env), addressing)
        session = boto3.session.Session()
        try:
            credentials = session.get_credentials()
        except Exception as error:  # botocore's providers raise their own kinds (a bad token file, an STS error)
            raise FetchError(f"could not load AWS credentials: {type(error).__name__}") from None
        signature: Any = "s3v4"
        if credentials is None:
            log.warning("No AWS credentials found (environment, web identity token, config files, instance "
                        "metadata): sending unsigned requests, which only public buckets answer")
            signature = botocore.UNSIGNED
        self.endpoint = settings["endpoint"] or ""
        region = settings["region"] or session.region_name or "us-east-1"
        config = botocore.config.Config(
            region_name=region, signature_version=signature, connect_timeout=timeout, read_timeout=timeout,
            retries={"total_max_attempts": 1}, max_pool_connections=self.parallelism + 2, tcp_keepalive=True,
            s3={"addressing_style": settings["addressing"]}, request_checksum_calculation="when_required",
            response_checksum_validation="when_required")
        self.client = session.client("s3", endpoint_url=settings["endpoint"], config=config,
                                     verify=ca_bundle or None)
        self._errors = (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError)
        self._client_error = botocore.exceptions.ClientError
        log.info("S3: endpoint %s, region %s, %s addressing, %s", self.endpoint or "AWS (default)", region,
                 settings["addressing"], "unsigned" if credentials is None else f"credentials from "
                 f"{getattr(credentials, 'method', 'the chain')}")

    # -- errors ----------------------------------------------------------------------------------------------------

    def _error(self, error: Exception, display: str) -> FetchError:
        if isinstance(error, self._client_error):
            response: dict[str, Any] = error.response
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            code = str(response.get("Error", {}).get("Code") or "")
            if code == "NoSuchBucket":
                return FetchError(f"not found (404): s3://{self.source.bucket} (no such bucket)")
            if status == 412 or code == "PreconditionFailed":
                return FetchError(f"{display} changed during the download (its ETag is no longer the one seen "
                                  "at the start): fetch again")
            return FetchError(build_status_message(status, display, code), retryable=is_retryable_status(status))
        name = type(error).__name__
        if "Timeout" in name:
            return FetchError(build_timeout_message(self.timeout, display, "no answer"), retryable=True)
        if "Connect" in name or "Connection" in name:
            where = self.endpoint or "S3"
            return FetchError(f"could not connect to {where} for {display}", retryable=True)
        return FetchError(f"{name} for {display}", retryable=True)

    def _call(self, what: str, display: str, fn: Any, **kwargs: Any) -> Any:
        def attempt(_: int) -> Any:
            try:
                return fn(**kwargs)
            except self._errors as error:
                raise self._error(error, display) from None

        return run_with_retries(attempt, retries=self.retries, deadline=self.deadline, display=display, what=what)

    # -- plan ------------------------------------------------------------------------------------------------------

    def plan(self, probe: bool = True) -> Plan:
        source = self.source
        if source.is_prefix:
            return self._list(source.key, required=True)
        try:
            head = self._call("HEAD", source.display, self.client.head_object, Bucket=source.bucket, Key=source.key)
        except FetchError as error:
            if error.message.startswith(("access denied (403)", "bad request (400)")):
                # a HEAD's error has no body, so no code: one GET of a byte says why (SignatureDoesNotMatch,
                # InvalidAccessKeyId, AccessDenied...), or succeeds where only HEAD is refused
                head = self._probe_with_get(source)
            elif not error.message.startswith("not found (404)") or "no such bucket" in error.message:
                raise
            else:
                return self._fall_back_to_prefix(source)
        etag, size = head.get("ETag"), int(head.get("ContentLength", 0))
        obj = RemoteObject(source.name, source.key, size, etag)
        return Plan((obj,), tree=False, validator=build_validator([(source.key, size, etag, None)]))

    def _probe_with_get(self, source: Source) -> dict[str, Any]:
        response = self._call("GET", source.display, self.client.get_object, Bucket=source.bucket, Key=source.key,
                              Range="bytes=0-0")
        response["Body"].close()
        total = str(response.get("ContentRange", "")).rpartition("/")[2]
        return {"ETag": response.get("ETag"), "ContentLength": int(total) if total.isdigit() else 0}

    def _fall_back_to_prefix(self, source: Source) -> Plan:
        """No object has the key: the objects under `key/`, as KServe users write directory models."""
        listed = self._list(source.key + "/", required=False)
        if not listed.objects:
            raise FetchError(f"not found (404): {source.display} (no such object, and no objects under "
                             f"{source.display}/)")
        log.info("No object %s: fetching the %d objects under %s/", source.display, len(listed.objects),
                 source.display)
        return listed

    def _list(self, prefix: str, *, required: bool) -> Plan:
        display_prefix = f"s3://{self.source.bucket}/{prefix}"
        rows: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.source.bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("LIST", display_prefix, self.client.list_objects_v2, **kwargs)
            rows.extend(page.get("Contents", []))
            if not page.get("IsTruncated"):
                break
            token = page.get("NextContinuationToken")
        rels = build_relative_paths([r["Key"] for r in rows], prefix, display_prefix)
        if required and not rels:
            raise FetchError(f"not found (404): {display_prefix} (no objects under the prefix)")
        objects = tuple(RemoteObject(rels[r["Key"]], r["Key"], int(r.get("Size", 0)), r.get("ETag"))
                        for r in rows if r["Key"] in rels)
        validator = build_validator([(o.locator, o.size, o.etag, None) for o in objects])
        return Plan(objects, tree=True, validator=validator)

    # -- download --------------------------------------------------------------------------------------------------

    def download(self, plan: Plan, placements: dict[str, Path], progress: Progress) -> dict[str, Downloaded]:
        files: list[_File] = []
        tasks: list[tuple[_File, int]] = []
        try:
            for obj in plan.objects:
                path = placements[obj.rel]
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                state = _File(obj, path, fd, build_parts(obj.size or 0, self.part_size))
                files.append(state)
                if obj.size:
                    os.ftruncate(fd, obj.size)
                tasks.extend((state, i) for i in range(len(state.parts)))
            # parts queued in order, file by file: each file's hashing frontier follows close behind
            abort = threading.Event()
            with concurrent.futures.ThreadPoolExecutor(self.parallelism, thread_name_prefix="fetch-s3") as pool:
                futures = [pool.submit(self._fetch_part, f, i, progress, abort) for f, i in tasks]
                self._wait(futures, abort)
            out: dict[str, Downloaded] = {}
            for state in files:
                if state.next_hash != len(state.parts):
                    raise FetchError(f"s3://{self.source.bucket}/{state.obj.locator}: hashing incomplete")
                out[state.obj.rel] = Downloaded(state.sha.hexdigest(), state.obj.size or 0)
            return out
        finally:
            for state in files:
                os.close(state.fd)

    def _wait(self, futures: list[concurrent.futures.Future[None]], abort: threading.Event) -> None:
        """Waits for every part (the main thread stays responsive to signals); the first error stops the rest."""
        first: BaseException | None = None
        pending = set(futures)
        while pending:
            try:
                done, pending = concurrent.futures.wait(pending, timeout=0.5,
                                                        return_when=concurrent.futures.FIRST_EXCEPTION)
            except BaseException as error:  # SIGTERM's Interrupted, raised in the main thread
                abort.set()
                first = first or error
                continue
            for future in done:
                failure = future.exception()
                if failure is not None and first is None:
                    first = failure
                    abort.set()
            if first is None and self.deadline.cancel.is_set():
                abort.set()
        if first is not None:
            raise first

    def _fetch_part(self, state: _File, index: int, progress: Progress, abort: threading.Event) -> None:
        start, end = state.parts[index]
        obj = state.obj
        display = f"s3://{self.source.bucket}/{obj.locator}"
        position = start

        def attempt(_: int) -> None:
            nonlocal position
            if abort.is_set():
                raise FetchError("stopped", retryable=False)
            kwargs: dict[str, Any] = {"Bucket": self.source.bucket, "Key": obj.locator,
                                      "Range": f"bytes={position}-{end}"}
            if obj.etag:
                kwargs["IfMatch"] = obj.etag
            try:
                response = self.client.get_object(**kwargs)
            except self._errors as error:
                raise self._error(error, display) from None
            body = response["Body"]
            raw = getattr(body, "_raw_stream", None)
            read = getattr(raw, "read1", None) or body.read
            window = LowSpeedWindow(self.timeout)
            try:
                while position <= end:
                    if abort.is_set():
                        raise FetchError("stopped", retryable=False)
                    self.deadline.check(display)
                    try:
                        chunk = read(min(CHUNK, end + 1 - position))
                    except Exception as error:  # urllib3/botocore/socket errors mid-body: resume from here
                        if "Timeout" in type(error).__name__:
                            raise FetchError(build_timeout_message(self.timeout, display, "no data"),
                                             retryable=True) from None
                        raise FetchError(f"connection broken at byte {position} of {display}",
                                         retryable=True) from None
                    if not chunk:
                        raise FetchError(f"connection closed at byte {position} of {display}", retryable=True)
                    try:
                        os.pwrite(state.fd, chunk, position)
                    except OSError as error:
                        raise FetchError(f"could not write {state.path}: {error.strerror}") from None
                    position += len(chunk)
                    progress.add(len(chunk))
                    slow = window.add(len(chunk))
                    if slow is not None:
                        raise FetchError(build_timeout_message(self.timeout, display, slow), retryable=True)
            finally:
                body.close()

        run_with_retries(attempt, retries=self.retries, deadline=self.deadline, display=display,
                         what=f"bytes {start}-{end}")
        self._advance_hash(state, index)

    def _advance_hash(self, state: _File, index: int) -> None:
        """Marks a part done; whoever finds the frontier part done hashes forward as far as parts are complete."""
        with state.lock:
            state.done.add(index)
            if state.hashing:
                return
            state.hashing = True
        while True:
            with state.lock:
                if state.next_hash not in state.done:
                    state.hashing = False
                    return
                part = state.next_hash
                state.next_hash += 1
            start, end = state.parts[part]
            offset = start
            while offset <= end:
                data = os.pread(state.fd, min(HASH_CHUNK, end + 1 - offset), offset)
                if not data:
                    raise FetchError(f"could not read back {state.path} at byte {offset}")
                state.sha.update(data)
                offset += len(data)
