"""What a fetch will download (a plan), shared by the S3 and HTTPS fetchers. Pure data."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Protocol

from shipyard.runtime.fetch.progress import Progress


@dataclasses.dataclass(frozen=True)
class RemoteObject:
    """One object to download: `rel` is its path in the model (a file name for a single object)."""

    rel: str
    locator: str  # the S3 key, or the URL
    size: int | None = None
    etag: str | None = None
    last_modified: str | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    objects: tuple[RemoteObject, ...]
    tree: bool  # a directory model (a prefix): paths kept, digest over the listing
    validator: str | None = None  # what identifies this content at the source (ETags...), for the cache's index

    @property
    def total(self) -> int | None:
        sizes = [o.size for o in self.objects]
        return None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)


@dataclasses.dataclass(frozen=True)
class Downloaded:
    sha256: str  # hex
    size: int


class Fetcher(Protocol):
    """A source: `plan` says what there is (one request at most: HEAD or LIST), `download` writes the objects."""

    endpoint: str  # part of the cache's index key: the same bucket on another endpoint is other content

    def plan(self, probe: bool) -> Plan:
        """What to download; with `probe`, also the validator (costs the HTTPS fetcher a HEAD)."""
        ...

    def download(self, plan: Plan, placements: dict[str, Path], progress: Progress) -> dict[str, Downloaded]:
        """Writes each object of the plan at `placements[rel]`; returns their sha256 and size."""
        ...


def build_validator(rows: list[tuple[str, int | None, str | None, str | None]]) -> str | None:
    """A validator from (name, size, ETag, Last-Modified) rows; None when an object has neither ETag nor
    Last-Modified (its content cannot be told apart from a newer one without downloading it). Pure."""
    if any(etag is None and modified is None for _, _, etag, modified in rows):
        return None
    text = "".join(f"{name}\t{size}\t{etag or ''}\t{modified or ''}\n" for name, size, etag, modified in sorted(rows))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
