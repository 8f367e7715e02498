"""Where a fetch writes before its content is verified, and how it reaches `--dest` (atomically).

A staging directory holds `model/` (what will become the destination) and the downloaded archive, if any, and a
lock file (`fcntl.flock`) held while the fetch runs: a staging directory whose lock nobody holds was left by a
killed fetch, and the next fetch into the same place removes it (`sweep`).

The destination:

- **absent**: staged beside it (`<parent>/.<name>.shipyard-fetch-<random>/`), then `rename(2)`d into place: the
  destination appears whole or not at all;
- **an empty directory** (typically a volume's mount point, which cannot be renamed over, as KServe's `/mnt/models`):
  staged inside it (`<dest>/.shipyard-fetch-stage-<random>/`), then each top entry moved in by `rename(2)` while a
  marker `<dest>/.shipyard-fetch-incomplete` exists; a fetch that finds the marker (it was killed while moving)
  empties the directory and starts over, so a directory with the marker is never taken for a model;
- **a directory fetch wrote before** (it holds `.shipyard-fetch.json`): with `--digest` equal to its content's
  digest nothing is fetched (a restarted init container); otherwise its content is replaced as in the empty case,
  only after the new content was downloaded and verified;
- anything else (a non-empty directory fetch did not write, a file) is refused: fetch never deletes what it did not
  write.

Each successful fetch leaves `<dest>/.shipyard-fetch.json` (URI as shown in logs, digest, bytes, files, time); names
starting with `.shipyard-fetch` at the top are not part of the model's digest.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shipyard.runtime.fetch.digests import compute_digest
from shipyard.runtime.fetch.errors import FetchError, UsageError
from shipyard.runtime.fetch.retry import Deadline
from shipyard.runtime.fetch.sources import RESERVED_PREFIX

log = logging.getLogger("shipyard.runtime.fetch")

RECORD = f"{RESERVED_PREFIX}.json"
MARKER = f"{RESERVED_PREFIX}-incomplete"
INPLACE_PREFIX = f"{RESERVED_PREFIX}-stage-"
LOCK = ".lock"


class Staging:
    """A locked staging directory: `root/model/` is the content, `root/` holds downloads before extraction."""

    def __init__(self, parent: Path, prefix: str) -> None:
        self.root = parent / f"{prefix}{secrets.token_hex(6)}"
        self.root.mkdir(mode=0o755)
        self._lock_fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self.model = self.root / "model"
        self.model.mkdir()

    def close(self) -> None:
        remove_tree(self.root)
        os.close(self._lock_fd)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sweep(parent: Path, prefix: str) -> None:
    """Removes staging directories under `parent` starting with `prefix` whose lock nobody holds."""
    try:
        names = [p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink()]
    except OSError:
        return
    for path in names:
        try:
            fd = os.open(path / LOCK, os.O_RDWR)
        except FileNotFoundError:  # not (yet) a staging directory with a lock: created a moment ago, or broken
            if time.time() - path.stat().st_mtime > 3600:
                remove_tree(path)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a running fetch holds it
        log.info("Removing %s, left by an interrupted fetch", path)
        remove_tree(path)
        os.close(fd)


def remove_tree(path: Path) -> None:
    """rm -rf, also through read-only directories (cache entries are read-only)."""
    def retry_writable(function: Any, target: str, _: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(target), 0o755)
            function(target)

    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, onerror=retry_writable)


class Destination:
    """`--dest`: checks what is there, stages beside or inside it, commits."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.inplace = False
        self.replace = False

    def prepare(self, digest: str | None) -> bool:
        """Decides how to stage; True when the destination already holds `digest` (nothing to fetch)."""
        path = self.path
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise UsageError(f"destination {path} exists and is not a directory")
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            sweep(path.parent, self._sibling_prefix())
            return False
        self.inplace = True
        sweep(path, INPLACE_PREFIX)
        entries = [p for p in path.iterdir() if not p.name.startswith(RESERVED_PREFIX)]
        if (path / MARKER).exists():
            log.warning("%s holds a model whose move into place was interrupted: emptying it", path)
            for entry in entries:
                remove_tree(entry)
            (path / MARKER).unlink()
            (path / RECORD).unlink(missing_ok=True)
            return False
        if not entries:
            return False
        if digest is not None and (path / RECORD).exists():
            expected = digest
            recorded = _read_record(path / RECORD)
            if recorded.get("contentDigest"):  # oci://: `digest` is the manifest's; the files have their own
                expected = str(recorded["contentDigest"]) if recorded.get("digest") == digest else ""
            try:
                present = compute_digest(path)
            except FetchError as error:
                present = f"(unreadable: {error})"
            if expected and present == expected:
                return True
            log.info("%s holds %s, not %s: it will be replaced", path, present, digest)
        if not (path / RECORD).exists():
            raise UsageError(f"destination {path} is not empty and was not written by fetch (no {RECORD}): fetch "
                             "writes into an absent or empty directory, and replaces only what it wrote")
        self.replace = True
        return False

    def _sibling_prefix(self) -> str:
        return f".{self.path.name}{RESERVED_PREFIX}-"

    def new_staging(self) -> Staging:
        if self.inplace:
            return Staging(self.path, INPLACE_PREFIX)
        return Staging(self.path.parent, self._sibling_prefix())

    def commit(self, staging: Staging, record: dict[str, Any]) -> None:
        """Moves the verified content into place and writes the record."""
        write_record(staging.model / RECORD, record)
        if not self.inplace:
            try:
                os.rename(staging.model, self.path)
            except OSError as error:
                raise FetchError(f"could not move the fetched model to {self.path}: {error.strerror}") from None
            return
        marker = self.path / MARKER
        marker.touch()
        for entry in self.path.iterdir():
            if not entry.name.startswith(RESERVED_PREFIX):
                remove_tree(entry)
        for entry in staging.model.iterdir():
            os.rename(entry, self.path / entry.name)
        marker.unlink()


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def write_record(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, sort_keys=True) + "\n", encoding="utf-8")
    os.rename(tmp, path)


@contextlib.contextmanager
def held_lock(path: Path, what: str, deadline: Deadline | None = None) -> Iterator[None]:
    """An exclusive `flock` on `path` (created), logging when another process holds it, waiting within the
    deadline; released on exit (and by the kernel when the process dies: no stale locks)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("Waiting for another fetch of %s (lock %s)", what, path)
            started = time.monotonic()
            while True:
                if deadline is not None:
                    deadline.check(what)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(0.1)
            log.info("Got the lock of %s after %.1f s", what, time.monotonic() - started)
        yield
    finally:
        os.close(fd)
