"""Archives (`.tar`, `.tar.gz`/`.tgz`, `.tar.bz2`, `.tar.xz`, `.zip`), extracted with every entry checked.

Refused, each with an error naming the entry (`ArchiveError`), before anything of that entry is written:

- a path that is absolute (`/etc/x`), holds `..`, a backslash or a control character, or takes a name fetch keeps;
- a symbolic link whose target is absolute or leaves the directory (`lib -> ../../etc`), a hard link to a path
  outside it;
- device files, FIFOs and anything but files, directories and links; in a zip, any symbolic link;
- the same path twice;
- a decompression bomb: the extracted bytes (entries' sizes, added up in order) above `--max-extracted-bytes`, or,
  once past 16 MiB, above `--max-compression-ratio` times the archive's own size.

Tar members then also go through Python's `tarfile` "data" filter (PEP 706: it resolves links and parent
directories on disk, drops setuid bits and odd modes), a second line behind these checks.

`build_tar_entry`, `check_entry` and `Budget` are pure; `extract` reads and writes files.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import stat
import tarfile
import threading
import zipfile
from pathlib import Path

from shipyard.runtime.fetch.errors import ArchiveError, Interrupted
from shipyard.runtime.fetch.sources import check_relative_path

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")
ZIP_SUFFIXES = (".zip",)
RATIO_FLOOR_BYTES = 16 << 20  # below this much extracted, the ratio is not judged (small, compressible files)
COPY_CHUNK = 1 << 20

FILE, DIRECTORY, SYMLINK, HARDLINK, DEVICE, FIFO, OTHER = "file", "directory", "symlink", "hardlink", "device", \
    "fifo", "other"


def archive_kind(name: str) -> str | None:
    """`tar`, `zip` or None, from a file name (case-insensitive). Pure."""
    lower = name.lower()
    if lower.endswith(TAR_SUFFIXES):
        return "tar"
    if lower.endswith(ZIP_SUFFIXES):
        return "zip"
    return None


@dataclasses.dataclass(frozen=True)
class Entry:
    """What the checks need of an archive entry."""

    name: str
    kind: str  # file | directory | symlink | hardlink | device | fifo | other
    size: int = 0
    linkname: str = ""


def check_entry(entry: Entry) -> str:
    """The entry's normalised relative path ("" for the top directory itself, `./` in `tar -C dir .`), or
    ArchiveError naming it and the reason. Pure."""
    if entry.kind == DIRECTORY and entry.name.strip("/") in ("", "."):
        return ""
    try:
        path = check_relative_path(entry.name)
    except ValueError as error:
        raise ArchiveError(f"refused archive entry {entry.name!r}: {error}") from None
    if entry.kind == DEVICE:
        raise ArchiveError(f"refused archive entry {entry.name!r}: device file")
    if entry.kind == FIFO:
        raise ArchiveError(f"refused archive entry {entry.name!r}: FIFO")
    if entry.kind not in (FILE, DIRECTORY, SYMLINK, HARDLINK):
        raise ArchiveError(f"refused archive entry {entry.name!r}: not a file, directory or link")
    if entry.kind == SYMLINK:
        target = entry.linkname
        if not target or target.startswith("/") or "\\" in target:
            raise ArchiveError(f"refused archive entry {entry.name!r}: symbolic link to {target!r} points outside "
                               "the model (absolute)")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
        if resolved == ".." or resolved.startswith("../") or resolved == ".":
            raise ArchiveError(f"refused archive entry {entry.name!r}: symbolic link to {target!r} points outside "
                               "the model")
    if entry.kind == HARDLINK:
        try:
            check_relative_path(entry.linkname)
        except ValueError as error:
            raise ArchiveError(f"refused archive entry {entry.name!r}: hard link to {entry.linkname!r} points "
                               f"outside the model ({error})") from None
    return path


class Budget:
    """The extracted bytes so far, against `max_bytes` and `max_ratio` times the archive's size. Pure."""

    def __init__(self, archive_bytes: int, max_bytes: int, max_ratio: float) -> None:
        self.archive_bytes = max(1, archive_bytes)
        self.max_bytes = max_bytes
        self.max_ratio = max_ratio
        self.total = 0

    def add(self, name: str, size: int) -> None:
        """Counts an entry of `size` bytes; ArchiveError naming it when it takes the total over a bound."""
        total = self.total + max(0, size)
        if total > self.max_bytes:
            raise ArchiveError(
                f"refused archive entry {name!r}: extracting it would write {total} bytes, above the limit of "
                f"{self.max_bytes} bytes (--max-extracted-bytes)")
        ratio = total / self.archive_bytes
        if total > RATIO_FLOOR_BYTES and self.max_ratio > 0 and ratio > self.max_ratio:
            raise ArchiveError(
                f"refused archive entry {name!r}: {total} bytes extracted from an archive of {self.archive_bytes} "
                f"bytes is a compression ratio of {ratio:.0f}, above {self.max_ratio:g} (--max-compression-ratio): "
                "a decompression bomb?")
        self.total = total


def build_tar_entry(member: tarfile.TarInfo) -> Entry:
    if member.isreg():
        kind = FILE
    elif member.isdir():
        kind = DIRECTORY
    elif member.issym():
        kind = SYMLINK
    elif member.islnk():
        kind = HARDLINK
    elif member.ischr() or member.isblk():
        kind = DEVICE
    elif member.isfifo():
        kind = FIFO
    else:
        kind = OTHER
    return Entry(member.name, kind, member.size if kind == FILE else 0, member.linkname)


def _zip_entry(info: zipfile.ZipInfo) -> Entry:
    mode = (info.external_attr >> 16) & 0xFFFF
    fmt = stat.S_IFMT(mode)
    if info.is_dir() or fmt == stat.S_IFDIR:
        kind = DIRECTORY
    elif fmt == stat.S_IFLNK:
        kind = SYMLINK
    elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
        kind = DEVICE
    elif fmt == stat.S_IFIFO:
        kind = FIFO
    elif fmt in (0, stat.S_IFREG):
        kind = FILE
    else:
        kind = OTHER
    return Entry(info.filename, kind, info.file_size if kind == FILE else 0)


def extract(archive: Path, kind: str, target: Path, *, max_bytes: int, max_ratio: float,
            cancel: threading.Event | None = None) -> int:
    """Extracts `archive` (`tar` or `zip`) into the existing directory `target`; returns the bytes written."""
    budget = Budget(archive.stat().st_size, max_bytes, max_ratio)
    cancel = cancel or threading.Event()
    try:
        if kind == "tar":
            _extract_tar(archive, target, budget, cancel)
        else:
            _extract_zip(archive, target, budget, cancel)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as error:
        raise ArchiveError(f"{archive.name}: not a valid {kind} archive ({error})") from None
    return budget.total


def _admit(entry: Entry, name: str, seen: set[str], budget: Budget) -> str:
    """The checked relative path of an archive entry ("" for one that extracts to nothing), counted against the
    budget; a path seen twice (but for directories) is refused."""
    path = check_entry(entry)
    if not path:
        return ""
    if path in seen and entry.kind != DIRECTORY:
        raise ArchiveError(f"refused archive entry {name!r}: the same path twice")
    seen.add(path)
    budget.add(name, entry.size)
    return path


def _extract_tar(archive: Path, target: Path, budget: Budget, cancel: threading.Event) -> None:
    seen: set[str] = set()
    with tarfile.open(archive, "r:*") as tar:
        tar.errorlevel = 2
        for member in tar:
            if cancel.is_set():
                raise Interrupted("interrupted while extracting")
            entry = build_tar_entry(member)
            path = _admit(entry, member.name, seen, budget)
            if not path:
                continue
            try:
                tar.extract(member, target, filter="data")
            except tarfile.FilterError as error:
                raise ArchiveError(f"refused archive entry {member.name!r}: {error}") from None
            except OSError as error:
                raise ArchiveError(f"archive entry {member.name!r}: {error.strerror or error}") from None


def _extract_zip(archive: Path, target: Path, budget: Budget, cancel: threading.Event) -> None:
    seen: set[str] = set()
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if cancel.is_set():
                raise Interrupted("interrupted while extracting")
            entry = _zip_entry(info)
            if entry.kind == SYMLINK:
                raise ArchiveError(f"refused archive entry {info.filename!r}: symbolic links in zip archives are "
                                   "not supported")
            path = _admit(entry, info.filename, seen, budget)
            if not path:
                continue
            try:
                _write_zip_entry(zf, info, entry, target / path, cancel)
            except OSError as error:
                raise ArchiveError(f"archive entry {info.filename!r}: {error.strerror or error}") from None


def _write_zip_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, entry: Entry, out: Path,
                     cancel: threading.Event) -> None:
    if entry.kind == DIRECTORY:
        out.mkdir(parents=True, exist_ok=True)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as sink, zf.open(info) as source:
        while chunk := source.read(COPY_CHUNK):
            written += len(chunk)
            if written > entry.size:  # zipfile stops at the declared size; never trust that alone
                raise ArchiveError(f"refused archive entry {info.filename!r}: more bytes than it declares")
            sink.write(chunk)
            if cancel.is_set():
                raise Interrupted("interrupted while extracting")
