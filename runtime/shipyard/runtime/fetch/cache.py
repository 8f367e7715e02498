"""The node-level cache (`--cache DIR`): content stored by its digest, looked up by digest or by source.

    DIR/blobs/sha256-<hex>        a single file's bytes (its name comes from the URI of each fetch)
    DIR/trees/sha256-<hex>/       a directory model (a prefix, an extracted archive), paths kept
    DIR/index/src-<hex>           "sha256:<hex>": the content a source had, keyed by the sha256 of the endpoint,
                                  the URI and the validator the source reported (S3: each object's key, size and
                                  ETag; HTTPS: ETag or Last-Modified and Content-Length)
    DIR/locks/<key>.lock          flock(2) per key, held while that key is looked up, fetched and inserted
    DIR/tmp/s-<random>/           staging of downloads into the cache (same filesystem: inserted by rename(2))

Every fetch asks the source first (one HEAD or LIST, no download), a hit included: that request checks the pod's
access, since the cache is shared by the node's pods and a digest is not a credential. With `--digest` the fetch then
takes the digest's lock; without one it takes the index key's lock (the source's validator), then the digest's. A
concurrent fetch of the same key waits for the first one and then finds the entry: one download per node.

Entries are read-only and inserted only after verification, and a hit is verified again before use (the sha256 of
every file: the cache may be shared by pods of several tenants, and a hard link shares the inode with them), so a
corrupted or tampered entry is removed and fetched again, never served. The destination gets hard links to the
entry when both are on one filesystem (and one mount: two volumes of a pod are two mounts even on one disk), else
copies.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from shipyard.runtime.fetch.digests import compute_digest
from shipyard.runtime.fetch.errors import FetchError
from shipyard.runtime.fetch.progress import build_bytes_text
from shipyard.runtime.fetch.retry import Deadline
from shipyard.runtime.fetch.staging import Staging, held_lock, remove_tree, sweep

log = logging.getLogger("shipyard.runtime.fetch")

TMP_PREFIX = "s-"


def build_digest_key(digest: str) -> str:
    """`sha256-<hex>` for `sha256:<hex>`. Pure."""
    return digest.replace(":", "-", 1)


def build_index_key(endpoint: str, uri: str, validator: str) -> str:
    """`src-<hex>`: the sha256 of endpoint, URI and validator (a presigned query is hashed, never stored). Pure."""
    text = f"{endpoint}\n{uri}\n{validator}\n"
    return "src-" + hashlib.sha256(text.encode("utf-8")).hexdigest()


class Cache:
    def __init__(self, root: Path, deadline: Deadline) -> None:
        self.root = root
        self.deadline = deadline
        for name in ("blobs", "trees", "index", "locks", "tmp"):
            (root / name).mkdir(parents=True, exist_ok=True)
        sweep(root / "tmp", TMP_PREFIX)

    def lock(self, key: str) -> AbstractContextManager[None]:
        return held_lock(self.root / "locks" / f"{key}.lock", f"cache key {key}", self.deadline)

    def entry_path(self, digest: str, tree: bool) -> Path:
        return self.root / ("trees" if tree else "blobs") / build_digest_key(digest)

    def lookup(self, digest: str, kinds: tuple[bool, ...]) -> tuple[bool, Path] | None:
        """The verified entry of `digest` among `kinds` (tree or not), or None; a corrupt entry is removed.
        The caller holds the digest's lock."""
        for tree in kinds:
            path = self.entry_path(digest, tree)
            if not path.exists():
                continue
            started = time.monotonic()
            try:
                found = compute_digest(path)
            except (FetchError, OSError) as error:
                found = f"unreadable ({error})"
            if found == digest:
                log.info("Cache hit %s (verified in %.1f s)", path, time.monotonic() - started)
                return tree, path
            log.warning("Cache entry %s is corrupt (its content has digest %s): removed, fetching again", path, found)
            remove_tree(path)
        return None

    def index_get(self, key: str) -> str | None:
        try:
            return (self.root / "index" / key).read_text(encoding="utf-8").strip() or None
        except OSError:
            return None

    def index_put(self, key: str, digest: str) -> None:
        path = self.root / "index" / key
        tmp = path.with_name(f"{key}.{os.getpid()}.tmp")
        tmp.write_text(digest + "\n", encoding="utf-8")
        os.rename(tmp, path)

    def staging(self) -> Staging:
        return Staging(self.root / "tmp", TMP_PREFIX)

    def insert(self, content: Path, digest: str, tree: bool) -> Path:
        """Moves verified `content` (a file, or a directory for a tree) into the cache, read-only. The caller holds
        the digest's lock."""
        target = self.entry_path(digest, tree)
        if target.exists():
            remove_tree(target)
        for path in _walk_files(content) if tree else iter([content]):
            os.chmod(path, 0o444)
        os.rename(content, target)
        return target


def _walk_files(root: Path) -> Iterator[Path]:
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            if not path.is_symlink():
                yield path


def populate(entry: Path, tree: bool, model: Path, name: str) -> tuple[int, int, str]:
    """Puts an entry's content into `model/` (hard links, else copies); returns (files, bytes, how)."""
    linked = copied = 0
    size = 0

    def place(source: Path, target: Path) -> None:
        nonlocal linked, copied, size
        size += source.stat().st_size
        try:
            os.link(source, target)
            linked += 1
        except OSError:
            shutil.copyfile(source, target)
            os.chmod(target, 0o644)
            copied += 1

    if not tree:
        place(entry, model / name)
    else:
        for directory, dirnames, files in os.walk(entry):
            rel = Path(directory).relative_to(entry)
            for d in dirnames:
                source = Path(directory) / d
                if source.is_symlink():
                    os.symlink(os.readlink(source), model / rel / d)
                else:
                    (model / rel / d).mkdir(exist_ok=True)
            for f in files:
                source = Path(directory) / f
                if source.is_symlink():
                    os.symlink(os.readlink(source), model / rel / f)
                else:
                    place(source, model / rel / f)
    how = "hard links" if not copied else "copies" if not linked else f"{linked} hard links, {copied} copies"
    log.info("Placed %d files (%s) from the cache as %s", linked + copied, build_bytes_text(size), how)
    return linked + copied, size, how
