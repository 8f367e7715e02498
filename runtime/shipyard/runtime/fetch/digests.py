"""Digests of what fetch writes: one file, or a directory (a prefix, an extracted archive).

- A file: `sha256:` + the sha256 of its bytes (what `sha256sum FILE` prints).
- A directory: `sha256:` + the sha256 of its listing: one line `<sha256 of the file, hex>  <relative path>\\n` per
  file (two spaces, as `sha256sum` writes it), sorted by the relative path's UTF-8 bytes (`LC_ALL=C sort`). Paths use
  `/`, never start with `./`; directories themselves, and names starting with `.shipyard-fetch` at the top (fetch's
  own lock and record), are not listed; a symbolic link counts as the file it points to (it must stay inside the
  directory). The same figure from coreutils, for names without newlines or backslashes (fetch refuses those):

      cd DIR && find -L . -type f ! -path './.shipyard-fetch*' -printf '%P\\n' | LC_ALL=C sort \\
          | xargs -r -d '\\n' sha256sum | sha256sum

`shipyard-runtime fetch --print-digest PATH` prints it. `build_listing` and `build_listing_digest` are pure; the rest
reads files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from shipyard.runtime.fetch.errors import FetchError
from shipyard.runtime.fetch.sources import RESERVED_PREFIX, check_relative_path

PREFIX = "sha256:"
CHUNK = 4 << 20


@dataclasses.dataclass(frozen=True)
class FileEntry:
    path: str  # relative, `/`-separated
    sha256: str  # hex
    size: int


def build_listing(entries: Iterable[tuple[str, str]]) -> bytes:
    """The canonical listing of (relative path, sha256 hex) pairs. Pure."""
    rows = sorted(((path.encode("utf-8"), digest) for path, digest in entries), key=lambda row: row[0])
    return b"".join(digest.encode("ascii") + b"  " + path + b"\n" for path, digest in rows)


def build_listing_digest(entries: Iterable[tuple[str, str]]) -> str:
    """`sha256:` + the sha256 of the listing. Pure."""
    return PREFIX + hashlib.sha256(build_listing(entries)).hexdigest()


def check_digest(text: str) -> str:
    """A `--digest` value normalised to `sha256:<64 lowercase hex>`, or ValueError. Pure."""
    value = text.strip()
    algorithm, sep, hexdigest = value.partition(":")
    if not sep or algorithm.lower() != "sha256":
        raise ValueError(f"digest {value!r} is not sha256:<64 hex digits>")
    hexdigest = hexdigest.lower()
    if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
        raise ValueError(f"digest {value!r} is not sha256:<64 hex digits>")
    return PREFIX + hexdigest


def hash_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(sha256 hex, size) of a file's bytes."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        while True:
            n = handle.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
            size += n
    return digest.hexdigest(), size


def list_tree(root: str | os.PathLike[str], known: Mapping[str, tuple[str, int]] | None = None) -> list[FileEntry]:
    """Every file of a directory with its sha256 (see the module's rules); FetchError for what cannot be listed.
    `known`: relative path -> (sha256 hex, size) of regular files whose bytes were hashed as they were written (an
    oci:// blob verified against its digest): not read again when their size matches."""
    base = Path(root)
    real_root = os.path.realpath(base)
    found: list[FileEntry] = []
    for directory, dirnames, filenames in os.walk(base):
        rel_dir = os.path.relpath(directory, base)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if not d.startswith(RESERVED_PREFIX)]
            filenames = [f for f in filenames if not f.startswith(RESERVED_PREFIX)]
        for name in sorted(dirnames):
            full = os.path.join(directory, name)
            if os.path.islink(full):  # os.walk does not descend into it: a link to a directory
                raise FetchError(f"{_rel(rel_dir, name)}: a symbolic link to a directory is not supported")
        for name in filenames:
            rel = _rel(rel_dir, name)
            try:
                check_relative_path(rel)
            except ValueError as error:
                raise FetchError(f"{rel!r}: {error}") from None
            full = os.path.join(directory, name)
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                target = os.path.realpath(full)
                if os.path.commonpath([real_root, target]) != real_root:
                    raise FetchError(f"{rel}: symbolic link points outside the directory")
                if not os.path.isfile(target):
                    raise FetchError(f"{rel}: symbolic link to something else than a file")
            elif not stat.S_ISREG(mode):
                raise FetchError(f"{rel}: not a regular file")
            already = (known or {}).get(rel)
            if already is not None and stat.S_ISREG(mode) and os.lstat(full).st_size == already[1]:
                found.append(FileEntry(rel, already[0], already[1]))
                continue
            sha, size = hash_file(full)
            found.append(FileEntry(rel, sha, size))
    found.sort(key=lambda e: e.path.encode("utf-8"))
    return found


def _rel(rel_dir: str, name: str) -> str:
    return name if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{name}"


def compute_digest(path: str | os.PathLike[str]) -> str:
    """The digest of a file (its bytes) or a directory (its listing)."""
    target = Path(path)
    if target.is_dir():
        return build_listing_digest((e.path, e.sha256) for e in list_tree(target))
    if target.is_file():
        return PREFIX + hash_file(target)[0]
    raise FetchError(f"{path}: no such file or directory")
