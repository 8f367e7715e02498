"""`shipyard-runtime fetch`: flags and environment, the fetch itself (cache, staging, verification), the summary.

    shipyard-runtime fetch --uri URI --dest DIR [--digest sha256:HEX] [--cache DIR] [--ca-bundle FILE]
        [--path PATH] [--registry-config FILE] [--timeout S] [--retries N] [--parallelism N] [--part-size BYTES]
        [--max-extracted-bytes BYTES] [--max-compression-ratio R] [--deadline S] [--allow-http] [--extract auto|never]
        [--s3-addressing STYLE] [--termination-log PATH] [--log-level LEVEL]
    shipyard-runtime fetch --print-digest PATH

Each flag also comes from `SHIPYARD_FETCH_<NAME>` (`--ca-bundle`: `SHIPYARD_FETCH_CA_BUNDLE`); a flag wins over its
variable. Credentials never come from flags: botocore's chain reads them (see `s3`). Exit codes: 0 fetched (or
already in place), 1 the fetch failed, 2 a flag or variable is invalid. The outcome is one line on stdout and in the
termination message (`contract.build_fetch_summary_fields` at its end).

Pure: `build_config`, `parse_size`, `build_lookup_kinds`, `build_summary_line`, `build_failure_line`. The rest
does I/O.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from shipyard import contract
from shipyard.runtime.fetch import archives, digests
from shipyard.runtime.fetch.cache import Cache, build_digest_key, build_index_key, populate
from shipyard.runtime.fetch.errors import (
    DigestMismatch,
    FetchError,
    Interrupted,
    UsageError,
    build_digest_mismatch_message,
)
from shipyard.runtime.fetch.plan import Fetcher, Plan
from shipyard.runtime.fetch.progress import Progress, build_bytes_text, build_rate_text
from shipyard.runtime.fetch.retry import Deadline
from shipyard.runtime.fetch.sources import Source, check_file_name, parse_uri
from shipyard.runtime.fetch.staging import Destination, Staging

log = logging.getLogger("shipyard.runtime.fetch")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
LINE_LIMIT = 4000  # Kubernetes keeps at most 4096 bytes of a termination message
WATCHDOG_GRACE_S = 5.0  # the process exits this long after --deadline when a request does not return
_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


@dataclasses.dataclass(frozen=True)
class FetchConfig:
    uri: str
    dest: str
    digest: str | None = None
    cache: str | None = None
    ca_bundle: str | None = None
    timeout: float = 30.0
    retries: int = 5
    parallelism: int = 8
    part_size: int = 16 << 20
    max_extracted_bytes: int = 64 << 30
    max_compression_ratio: float = 200.0
    deadline: float = 3600.0
    allow_http: bool = False
    extract: str = "auto"
    s3_addressing: str | None = None
    termination_log: str | None = None
    log_level: str = "INFO"
    path: str | None = None  # oci://: the model's file or directory in the image (or artifact)
    registry_config: str | None = None  # oci://: a Docker config file with the registry's credentials


@dataclasses.dataclass(frozen=True)
class Outcome:
    display: str
    dest: str
    digest: str
    files: int
    bytes: int
    downloaded: int
    seconds: float
    cache_hit: bool
    already: bool = False


def parse_size(text: str, name: str) -> int:
    """`1073741824`, `64Gi`, `500M`, `16Mi` -> bytes. Pure."""
    value = text.strip()
    digits = value.rstrip("kKmMgGtTiI")
    unit = value[len(digits):].lower()
    if not digits.isdigit() or unit not in _SIZE_UNITS:
        raise UsageError(f"{name}: {text!r} is not a size (bytes, or with K, M, G, T, Ki, Mi, Gi, Ti)")
    return int(digits) * _SIZE_UNITS[unit]


def _parse_bool(text: str, name: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise UsageError(f"{name}: {text!r} is not a boolean (true or false)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shipyard-runtime fetch", description="Download a model (s3://, https://, oci://) into a directory: "
        "verified, atomic, cached per node. Every flag also from SHIPYARD_FETCH_<NAME>.")
    add = parser.add_argument
    add("--uri", help="s3://bucket/key, s3://bucket/prefix/, https://host/path (a file or a .tar[.gz]/.zip) or "
        "oci://registry/repository:tag (or @sha256:HEX)")
    add("--dest", metavar="DIR", help="the model's directory: absent, empty, or written by fetch before")
    add("--digest", metavar="sha256:HEX", help="expected digest (see --print-digest); mismatch fails the fetch")
    add("--cache", metavar="DIR", help="node-level cache, keyed by digest (or by the source's ETag)")
    add("--ca-bundle", metavar="FILE", help="PEM CA certificates trusted for https:// and the S3 endpoint")
    add("--timeout", metavar="S", help="seconds to connect and for each wait for data; low-speed window (30)")
    add("--retries", metavar="N", help="retries of a request or part on connection errors, 5xx, timeouts (5)")
    add("--parallelism", metavar="N", help="S3: ranged GETs (and objects) at a time (8)")
    add("--part-size", metavar="BYTES", help="S3: bytes per ranged GET (16Mi)")
    add("--max-extracted-bytes", metavar="BYTES", help="archives: most bytes extracted (64Gi)")
    add("--max-compression-ratio", metavar="R", help="archives: most extracted/archive bytes, 0 = off (200)")
    add("--deadline", metavar="S", help="seconds for the whole fetch, 0 = none (3600)")
    add("--allow-http", action="store_const", const="true", help="allow plain http:// URIs")
    add("--extract", choices=("auto", "never"), help="extract archives by their name (auto) or keep them (never)")
    add("--s3-addressing", metavar="STYLE", help="path, virtual or auto (path with AWS_ENDPOINT_URL[_S3])")
    add("--termination-log", metavar="PATH", help=f"where the outcome line goes too (${contract.ENV_TERMINATION_LOG}"
        f", else {contract.TERMINATION_LOG} when writable; '' = nowhere)")
    add("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING (INFO)")
    add("--path", metavar="PATH", help="oci://: the model's directory in an image's filesystem (required for "
        "images), or a file or directory of an artifact")
    add("--registry-config", metavar="FILE", help="oci://: Docker config file with registry credentials "
        "(default: $DOCKER_CONFIG/config.json)")
    add("--print-digest", metavar="PATH", help="print the digest of a file or directory and exit")
    return parser


def build_config(argv: Sequence[str], env: Mapping[str, str]) -> FetchConfig:
    """Flags over SHIPYARD_FETCH_* over defaults; UsageError naming the flag. Pure (reads no file)."""
    try:
        args = _parser().parse_args(list(argv))
    except SystemExit as exit_:
        raise UsageError("invalid command line (see shipyard-runtime fetch --help)") from exit_
    values: dict[str, Any] = {}
    for action in _parser()._actions:
        if not action.option_strings or action.dest in ("help", "print_digest"):
            continue
        flag = action.option_strings[0]
        raw = getattr(args, action.dest)
        variable = contract.FETCH_ENV_PREFIX + action.dest.upper()
        if raw is None and variable in env:
            raw = env[variable]
        if raw is not None:
            values[action.dest] = (flag, variable, str(raw))
    defaults = FetchConfig(uri="", dest="")

    def get(name: str) -> str | None:
        return values[name][2] if name in values else None

    def label(name: str) -> str:
        flag, variable, _ = values[name]
        return f"{flag} ({variable})"

    def number(name: str, kind: type, low: float, high: float) -> Any:
        if name not in values:
            return getattr(defaults, name)
        try:
            value = kind(values[name][2])
        except ValueError:
            raise UsageError(f"{label(name)}: {values[name][2]!r} is not a number") from None
        if not low <= value <= high:
            raise UsageError(f"{label(name)}: {value} is out of range [{low:g}, {high:g}]")
        return value

    def size(name: str, low: int) -> int:
        if name not in values:
            return int(getattr(defaults, name))
        value = parse_size(values[name][2], label(name))
        if value < low:
            raise UsageError(f"{label(name)}: at least {low} bytes")
        return value

    uri, dest = get("uri"), get("dest")
    if not uri:
        raise UsageError(f"--uri ({contract.FETCH_ENV_PREFIX}URI) is required")
    if not dest:
        raise UsageError(f"--dest ({contract.FETCH_ENV_PREFIX}DEST) is required")
    digest = get("digest")
    if digest:
        try:
            digest = digests.check_digest(digest)
        except ValueError as error:
            raise UsageError(f"{label('digest')}: {error}") from None
    termination = get("termination_log")
    if termination is None:
        termination = env.get(contract.ENV_TERMINATION_LOG)
    level = (get("log_level") or "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise UsageError(f"{label('log_level')}: {level!r} is not DEBUG, INFO, WARNING or ERROR")
    config = FetchConfig(
        uri=uri, dest=dest, digest=digest or None, cache=get("cache") or None, ca_bundle=get("ca_bundle") or None,
        timeout=number("timeout", float, 0.1, 3600), retries=number("retries", int, 0, 100),
        parallelism=number("parallelism", int, 1, 64), part_size=size("part_size", 1 << 20),
        max_extracted_bytes=size("max_extracted_bytes", 1),
        max_compression_ratio=number("max_compression_ratio", float, 0, 1e9),
        deadline=number("deadline", float, 0, 7 * 86400),
        allow_http=_parse_bool(get("allow_http") or "false", "--allow-http (SHIPYARD_FETCH_ALLOW_HTTP)"),
        extract=get("extract") or "auto", s3_addressing=get("s3_addressing") or None,
        termination_log=termination, log_level=level, path=get("path") or None,
        registry_config=get("registry_config") or None)
    if config.extract not in ("auto", "never"):
        raise UsageError(f"{label('extract')}: {config.extract!r} is not auto or never")
    source = parse_uri(config.uri, allow_http=config.allow_http)  # refuses what it must now, before any I/O
    if config.path is not None and not source.is_oci:
        raise UsageError(f"{label('path')}: only for oci:// sources")
    if config.path is not None:
        from shipyard.runtime.fetch import oci

        oci.check_model_path(config.path)
    if source.oci is not None and source.oci.digest and digest and source.oci.digest != digest:
        raise UsageError(f"{label('digest')}: {digest} differs from the digest the URI pins ({source.oci.digest})")
    return config


def build_lookup_kinds(source: Source, extract: bool) -> tuple[bool, ...]:
    """Which kinds of cache entry (True: a tree) can hold this source's content. Pure."""
    if source.is_prefix:
        return (True,)
    if extract and archives.archive_kind(source.name):
        return (True,)
    return (False, True) if source.is_s3 else (False,)


def build_summary_line(outcome: Outcome) -> str:
    """One line: what, where, how much, how fast, the digest, and the machine-readable fields. Pure."""
    fields = contract.build_fetch_summary_fields({
        "bytes": outcome.bytes, "files": outcome.files, "seconds": round(outcome.seconds, 3),
        "downloadedBytes": outcome.downloaded, "digest": outcome.digest, "cacheHit": outcome.cache_hit})
    files = f"{outcome.files} file{'s' if outcome.files != 1 else ''}, {build_bytes_text(outcome.bytes)}"
    if outcome.already:
        text = f"{outcome.dest} already holds {outcome.display} ({files}, digest {outcome.digest}): nothing fetched"
    elif outcome.cache_hit:
        text = (f"Fetched {outcome.display} into {outcome.dest} from the cache: {files} in {outcome.seconds:.1f} s, "
                f"digest {outcome.digest}, cache hit")
    else:
        text = (f"Fetched {outcome.display} into {outcome.dest}: {files} in {outcome.seconds:.1f} s "
                f"({build_rate_text(outcome.downloaded, outcome.seconds)}), digest {outcome.digest}, cache miss")
    room = LINE_LIMIT - len(fields) - 1
    return f"{text if len(text) <= room else text[: room - 3] + '...'} {fields}"


def build_failure_line(display: str, error: str) -> str:
    """`Fetch of s3://b/k failed: access denied (403) to s3://b/k`, on one line, capped. Pure."""
    text = " ".join(f"Fetch of {display} failed: {error}".split())
    return text if len(text) <= LINE_LIMIT else text[: LINE_LIMIT - 3] + "..."


# -- the fetch ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Content:
    tree: bool
    digest: str
    files: int
    bytes: int
    downloaded: int


def build_fetcher(source: Source, config: FetchConfig, deadline: Deadline) -> Fetcher:
    if source.is_s3:
        from shipyard.runtime.fetch.s3 import S3Fetcher  # boto3 is imported only for s3://

        return S3Fetcher(source, deadline=deadline, timeout=config.timeout, retries=config.retries,
                         parallelism=config.parallelism, part_size=config.part_size, ca_bundle=config.ca_bundle,
                         addressing=config.s3_addressing)
    from shipyard.runtime.fetch.https import HttpsFetcher

    return HttpsFetcher(source, deadline=deadline, timeout=config.timeout, retries=config.retries,
                        ca_bundle=config.ca_bundle, allow_http=config.allow_http)


def run_fetch(config: FetchConfig, cancel: threading.Event | None = None) -> Outcome:
    started = time.monotonic()
    source = parse_uri(config.uri, allow_http=config.allow_http)
    if source.is_oci:
        return run_oci_fetch(source, config, cancel, started)
    if not source.is_prefix:
        check_file_name(source.name, source.display)
    if config.ca_bundle and not os.access(config.ca_bundle, os.R_OK):
        raise UsageError(f"--ca-bundle {config.ca_bundle}: not a readable file")
    deadline = Deadline(config.deadline, cancel)
    dest = Destination(Path(config.dest))
    if dest.prepare(config.digest):
        entries = digests.list_tree(dest.path)
        return Outcome(source.display, config.dest, config.digest or "", len(entries), sum(e.size for e in entries),
                       0, time.monotonic() - started, cache_hit=False, already=True)
    fetcher = build_fetcher(source, config, deadline)
    extract = config.extract == "auto"

    def finish(content: _Content, hit: bool) -> Outcome:
        return Outcome(source.display, config.dest, content.digest, content.files, content.bytes, content.downloaded,
                       time.monotonic() - started, cache_hit=hit)

    def record(content: _Content, hit: bool) -> dict[str, Any]:
        return {"uri": source.display, "digest": content.digest, "bytes": content.bytes, "files": content.files,
                "cacheHit": hit, "fetchedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    if not config.cache:
        plan = fetcher.plan(probe=False)
        with dest.new_staging() as staging:
            content = _materialize(fetcher, plan, staging, source, config, deadline, extract)
            dest.commit(staging, record(content, False))
        return finish(content, False)

    cache = Cache(Path(config.cache), deadline)
    kinds = build_lookup_kinds(source, extract)

    def place(entry: Path, tree: bool, content: _Content, hit: bool) -> None:
        with dest.new_staging() as staging:
            populate(entry, tree, staging.model, source.name)
            dest.commit(staging, record(content, hit))

    def hit_content(digest: str, tree: bool, entry: Path) -> _Content:
        if tree:
            entries = digests.list_tree(entry)
            return _Content(True, digest, len(entries), sum(e.size for e in entries), 0)
        return _Content(False, digest, 1, entry.stat().st_size, 0)

    def download_and_insert(plan: Plan, lock_held_for: str | None) -> _Content:
        with cache.staging() as staging:
            content = _materialize(fetcher, plan, staging, source, config, deadline, extract)
            inner = staging.model if content.tree else staging.model / source.name
            if lock_held_for == content.digest:
                entry = cache.insert(inner, content.digest, content.tree)
                place(entry, content.tree, content, False)
            else:
                with cache.lock(build_digest_key(content.digest)):
                    entry = cache.insert(inner, content.digest, content.tree)
                    place(entry, content.tree, content, False)
        return content

    if config.digest:
        # Access is checked at the source on every fetch, a cache hit included (one HEAD or LIST, no download): the
        # cache is shared by the node's pods, and a digest is not a credential.
        plan = fetcher.plan(probe=True)
        with cache.lock(build_digest_key(config.digest)):
            found = cache.lookup(config.digest, kinds)
            if found:
                content = hit_content(config.digest, found[0], found[1])
                place(found[1], found[0], content, True)
                return finish(content, True)
            content = download_and_insert(plan, config.digest)
        if plan.validator:
            cache.index_put(build_index_key(fetcher.endpoint, source.uri, plan.validator), content.digest)
        return finish(content, False)

    plan = fetcher.plan(probe=True)
    if not plan.validator:
        log.warning("%s reports neither an ETag nor a Last-Modified: not cached (give --digest to cache it)",
                    source.display)
        with dest.new_staging() as staging:
            content = _materialize(fetcher, plan, staging, source, config, deadline, extract)
            dest.commit(staging, record(content, False))
        return finish(content, False)
    index_key = build_index_key(fetcher.endpoint, source.uri, plan.validator)
    with cache.lock(index_key):
        known = cache.index_get(index_key)
        if known:
            with cache.lock(build_digest_key(known)):
                found = cache.lookup(known, kinds)
                if found:
                    content = hit_content(known, found[0], found[1])
                    place(found[1], found[0], content, True)
                    return finish(content, True)
        content = download_and_insert(plan, None)
        cache.index_put(index_key, content.digest)
    return finish(content, False)


def run_oci_fetch(source: Source, config: FetchConfig, cancel: threading.Event | None, started: float) -> Outcome:
    """An oci:// fetch: the content's digest is the manifest's (what `@sha256:` pins); the cache maps (registry,
    repository, manifest digest, --path) to the verified tree. A hit costs one GET of the manifest (the registry checks
    the pod's access: the cache is shared) and no blob."""
    from shipyard.runtime.fetch import oci

    assert source.oci is not None
    ref = source.oci
    if config.ca_bundle and not os.access(config.ca_bundle, os.R_OK):
        raise UsageError(f"--ca-bundle {config.ca_bundle}: not a readable file")
    model_path = oci.check_model_path(config.path)
    pinned = ref.digest or config.digest
    deadline = Deadline(config.deadline, cancel)
    dest = Destination(Path(config.dest))
    if dest.prepare(pinned):
        entries = digests.list_tree(dest.path)
        return Outcome(source.display, config.dest, pinned or "", len(entries), sum(e.size for e in entries),
                       0, time.monotonic() - started, cache_hit=False, already=True)
    credentials = oci.fetch_credentials(config.registry_config, os.environ, ref.registry)
    client = oci.Client(ref, deadline=deadline, timeout=config.timeout, retries=config.retries,
                        parallelism=config.parallelism, ca_bundle=config.ca_bundle, allow_http=config.allow_http,
                        credentials=credentials)

    def finish(digest: str, tree: _Content, hit: bool) -> Outcome:
        return Outcome(source.display, config.dest, digest, tree.files, tree.bytes, tree.downloaded,
                       time.monotonic() - started, cache_hit=hit)

    def record(digest: str, tree: _Content, hit: bool) -> dict[str, Any]:
        return {"uri": source.display, "digest": digest, "contentDigest": tree.digest, "bytes": tree.bytes,
                "files": tree.files, "cacheHit": hit, "path": f"/{model_path}" if model_path is not None else None,
                "fetchedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def build(resolved: oci.Resolved, staging: Staging) -> _Content:
        log.info("Fetching %s: %s %s, %d layer%s, %s", source.display, resolved.kind, resolved.digest,
                 len(resolved.layers), "s" if len(resolved.layers) != 1 else "", build_bytes_text(resolved.total))
        progress = Progress(source.display, resolved.total).start()
        try:
            done = oci.materialize(client, resolved, staging.root, staging.model, model_path, progress,
                                   max_bytes=config.max_extracted_bytes, max_ratio=config.max_compression_ratio,
                                   cancel=deadline.cancel)
        finally:
            progress.stop()
        entries = digests.list_tree(staging.model, known=done.known)  # a verified blob is not hashed twice
        return _Content(True, digests.build_listing_digest((e.path, e.sha256) for e in entries), len(entries),
                        sum(e.size for e in entries), done.downloaded)

    def resolve() -> oci.Resolved:
        resolved = client.resolve()
        if config.digest and resolved.digest != config.digest:
            raise DigestMismatch(build_digest_mismatch_message(config.digest, resolved.digest, source.display))
        return resolved

    if not config.cache:
        resolved = resolve()
        with dest.new_staging() as staging:
            content = build(resolved, staging)
            dest.commit(staging, record(resolved.digest, content, False))
        return finish(resolved.digest, content, False)

    cache = Cache(Path(config.cache), deadline)

    def index_key(digest: str) -> str:
        return build_index_key(f"oci://{ref.registry}", f"{ref.repository}@{digest}", f"path=/{model_path or ''}")

    def lookup(digest: str) -> Outcome | None:
        tree_digest = cache.index_get(index_key(digest))
        if not tree_digest:
            return None
        with cache.lock(build_digest_key(tree_digest)):
            found = cache.lookup(tree_digest, (True,))
            if not found:
                return None
            entries = digests.list_tree(found[1])
            content = _Content(True, tree_digest, len(entries), sum(e.size for e in entries), 0)
            with dest.new_staging() as staging:
                populate(found[1], True, staging.model, "")
                dest.commit(staging, record(digest, content, True))
        return finish(digest, content, True)

    def fetch_and_insert(resolved: oci.Resolved) -> Outcome:
        with cache.staging() as staging:
            content = build(resolved, staging)
            with cache.lock(build_digest_key(content.digest)):
                entry = cache.insert(staging.model, content.digest, True)
                with dest.new_staging() as placed:
                    populate(entry, True, placed.model, "")
                    dest.commit(placed, record(resolved.digest, content, False))
        cache.index_put(index_key(resolved.digest), content.digest)
        return finish(resolved.digest, content, False)

    # The manifest is asked for on every fetch, a hit included (no blob): that request checks the pod's access to the
    # registry, since the cache is shared by the node's pods and a digest is not a credential.
    resolved = resolve()
    with cache.lock(index_key(resolved.digest)):
        hit = lookup(resolved.digest)
        if hit is not None:
            return hit
        return fetch_and_insert(resolved)


def _materialize(fetcher: Fetcher, plan: Plan, staging: Staging, source: Source, config: FetchConfig,
                 deadline: Deadline, extract: bool) -> _Content:
    """Downloads the plan into `staging.model` (extracting an archive), computes and checks the digest."""
    total = plan.total
    count = len(plan.objects)
    log.info("Fetching %s (%s%s)%s", source.display, f"{count} object{'s' if count != 1 else ''}",
             f", {build_bytes_text(total)}" if total is not None else "",
             f" with up to {config.parallelism} ranged GETs of {build_bytes_text(config.part_size)} at a time"
             if source.is_s3 else "")
    progress = Progress(source.display, total).start()
    try:
        if plan.tree:
            got = fetcher.download(plan, {o.rel: staging.model / o.rel for o in plan.objects}, progress)
            content = _Content(True, digests.build_listing_digest((rel, d.sha256) for rel, d in got.items()),
                               len(got), sum(d.size for d in got.values()), sum(d.size for d in got.values()))
        else:
            (obj,) = plan.objects
            kind = archives.archive_kind(obj.rel) if extract else None
            if kind:
                archive = staging.root / f"download-{obj.rel}"
                got = fetcher.download(plan, {obj.rel: archive}, progress)
                progress.stop()
                started = time.monotonic()
                written = archives.extract(archive, kind, staging.model, max_bytes=config.max_extracted_bytes,
                                           max_ratio=config.max_compression_ratio, cancel=deadline.cancel)
                archive.unlink()
                entries = digests.list_tree(staging.model)
                log.info("Extracted %s: %d files, %s in %.1f s", obj.rel, len(entries), build_bytes_text(written),
                         time.monotonic() - started)
                content = _Content(True, digests.build_listing_digest((e.path, e.sha256) for e in entries),
                                   len(entries), sum(e.size for e in entries), got[obj.rel].size)
            else:
                got = fetcher.download(plan, {obj.rel: staging.model / obj.rel}, progress)
                content = _Content(False, digests.PREFIX + got[obj.rel].sha256, 1, got[obj.rel].size,
                                   got[obj.rel].size)
    finally:
        progress.stop()
    if config.digest and content.digest != config.digest:
        raise DigestMismatch(build_digest_mismatch_message(config.digest, content.digest, source.display))
    return content


# -- entry point -------------------------------------------------------------------------------------------------


def _termination_path(config_value: str | None, env: Mapping[str, str]) -> str | None:
    if config_value is not None:
        return config_value or None
    if env.get(contract.ENV_TERMINATION_LOG) is not None:
        return env[contract.ENV_TERMINATION_LOG] or None
    default = contract.TERMINATION_LOG
    return default if os.path.isfile(default) and os.access(default, os.W_OK) else None


def write_termination_log(path: str | None, line: str) -> None:
    """The outcome line as the container's termination message; a path that cannot be written is only logged."""
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(line + "\n")
    except OSError as error:
        log.warning("Could not write the termination message to %s: %s", path, error.strerror)


def _print_digest(argv: Sequence[str]) -> int:
    index = next(i for i, a in enumerate(argv) if a == "--print-digest" or a.startswith("--print-digest="))
    arg = argv[index]
    path = arg.partition("=")[2] if "=" in arg else (argv[index + 1] if index + 1 < len(argv) else "")
    if not path:
        print("shipyard-runtime fetch: --print-digest needs a PATH", file=sys.stderr)
        return EXIT_USAGE
    try:
        print(digests.compute_digest(path))
    except (FetchError, OSError) as error:
        print(f"shipyard-runtime fetch: {path}: {error}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def main(argv: list[str]) -> int:
    """Entry point of `shipyard-runtime fetch`."""
    if any(a == "--print-digest" or a.startswith("--print-digest=") for a in argv):
        return _print_digest(argv)
    if any(a in ("-h", "--help") for a in argv):
        _parser().print_help()
        return EXIT_OK
    env = dict(os.environ)
    try:
        config = build_config(argv, env)
    except UsageError as error:
        line = build_failure_line(_shown_uri(argv, env), str(error))
        print(line, flush=True)
        write_termination_log(_termination_path(None, env), line)
        return EXIT_USAGE
    logging.basicConfig(level=getattr(logging, config.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, getattr(logging, config.log_level)))
    display = parse_uri(config.uri, allow_http=config.allow_http).display
    cancel = threading.Event()
    previous = _install_signal_handlers(cancel)
    watchdog = _start_watchdog(config, display, env)
    try:
        outcome = run_fetch(config, cancel)
        line, code = build_summary_line(outcome), EXIT_OK
        log.info("%s", line)
    except FetchError as error:
        code = EXIT_USAGE if isinstance(error, UsageError) else EXIT_FAILED
        line = build_failure_line(display, str(error))
        log.error("%s", line)
    except Exception as error:  # a bug or an unforeseen failure: one line, exit 1, the traceback in the log
        log.exception("Failed with an unexpected %s", type(error).__name__)
        line, code = build_failure_line(display, f"unexpected {type(error).__name__}"), EXIT_FAILED
    finally:
        if watchdog is not None:
            watchdog.cancel()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print(line, flush=True)
    write_termination_log(_termination_path(config.termination_log, env), line)
    return code


def _start_watchdog(config: FetchConfig, display: str, env: Mapping[str, str]) -> threading.Timer | None:
    """The hard bound of `--deadline`: the fetch checks its deadline between reads and waits, but a request stuck
    inside a library (a server dripping its headers) would not return to check it. WATCHDOG_GRACE_S after the
    deadline the process reports and exits. That is safe at any moment: the destination only ever receives verified
    content, and staging left behind is removed by the next fetch (its lock died with the process)."""
    if config.deadline <= 0:
        return None

    def stop() -> None:
        line = build_failure_line(display, f"deadline of {config.deadline:g} s exceeded fetching {display} "
                                           "(--deadline; stopped: a request did not return)")
        log.error("%s", line)
        print(line, flush=True)
        write_termination_log(_termination_path(config.termination_log, env), line)
        os._exit(EXIT_FAILED)

    timer = threading.Timer(config.deadline + WATCHDOG_GRACE_S, stop)
    timer.daemon = True
    timer.start()
    return timer


def _shown_uri(argv: Sequence[str], env: Mapping[str, str]) -> str:
    """The URI of a command line that did not parse, as logs show it (best effort)."""
    uri = env.get(contract.FETCH_ENV_PREFIX + "URI", "")
    for i, arg in enumerate(argv):
        if arg == "--uri" and i + 1 < len(argv):
            uri = argv[i + 1]
        elif arg.startswith("--uri="):
            uri = arg.partition("=")[2]
    try:
        return parse_uri(uri, allow_http=True).display
    except UsageError:
        return "the model"


def _install_signal_handlers(cancel: threading.Event) -> dict[int, Any]:
    """SIGTERM/SIGINT: stop every worker (cancel) and raise Interrupted in the main thread, whose cleanup removes
    what was staged."""
    def handle(signum: int, _: FrameType | None) -> None:
        already = cancel.is_set()
        cancel.set()
        if not already:
            raise Interrupted(f"interrupted by {signal.Signals(signum).name}")

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, handle)
    return previous
