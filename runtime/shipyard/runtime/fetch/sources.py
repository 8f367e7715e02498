"""Model URIs: parsing, what a fetch will write, and how a URI is shown in logs and errors. Pure.

- `s3://bucket/key`: one object, written as `<dest>/<last segment of key>`; when no object has that key, the
  objects under `key/` (a directory model), as KServe's storage initializer users write them.
- `s3://bucket/prefix/` (and `s3://bucket/`): every object under the prefix, relative paths kept.
- `https://host/path`: one file, or an archive (by its name: `.tar`, `.tar.gz`/`.tgz`, `.tar.bz2`, `.tar.xz`,
  `.zip`) extracted into the destination. `http://` only with `--allow-http`.

A URI never carries credentials: userinfo is refused, and `display` leaves out the query string (the signature of
a presigned URL), so that nothing secret reaches a log line, an error or the termination message.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from typing import TYPE_CHECKING

from shipyard.runtime.fetch.errors import UsageError

if TYPE_CHECKING:
    from shipyard.runtime.fetch.oci import Reference

SCHEMES = ("s3", "https", "http", "oci")
RESERVED_PREFIX = ".shipyard-fetch"  # names fetch keeps for itself at the top of a destination
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")


@dataclasses.dataclass(frozen=True)
class Source:
    """A parsed model URI."""

    scheme: str  # s3 | https | http | oci
    uri: str  # as given (may hold a presigned URL's query: never logged)
    bucket: str = ""
    key: str = ""  # s3: the key or prefix, as given ("" = the whole bucket)
    host: str = ""  # http(s): host[:port]
    path: str = ""  # http(s): the path, percent-encoded as given
    oci: Reference | None = None  # oci: registry, repository, tag, digest

    @property
    def is_oci(self) -> bool:
        return self.oci is not None

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"

    @property
    def is_prefix(self) -> bool:
        """An s3 URI that names a prefix for sure (ends with `/`, or the whole bucket)."""
        return self.is_s3 and (self.key == "" or self.key.endswith("/"))

    @property
    def display(self) -> str:
        """The URI for logs and errors: no userinfo, no query, no fragment."""
        if self.is_s3:
            return f"s3://{self.bucket}/{self.key}"
        if self.oci is not None:
            return self.oci.display
        return f"{self.scheme}://{self.host}{self.path}"

    @property
    def name(self) -> str:
        """The file name a single object is written under: the last segment of the key or path (decoded)."""
        last = (self.key if self.is_s3 else urllib.parse.unquote(self.path)).rstrip("/").rsplit("/", 1)[-1]
        return last


def parse_uri(text: str, *, allow_http: bool = False) -> Source:
    """Parse `--uri`; raises UsageError naming the problem (never echoing credentials). Pure."""
    uri = text.strip()
    if not uri:
        raise UsageError("--uri is required (s3://bucket/key, s3://bucket/prefix/, https://host/path or "
                         "oci://registry/repository:tag)")
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        shown = f"{scheme}://" if sep else "a URI without a scheme"
        raise UsageError(f"unsupported URI {shown}: fetch takes s3://, https://, oci:// (and http:// with "
                         "--allow-http)")
    if scheme == "s3":
        return _parse_s3(uri, rest)
    if scheme == "oci":
        return _parse_oci(uri, rest)
    return _parse_http(uri, scheme, allow_http)


def _parse_s3(uri: str, rest: str) -> Source:
    bucket, _, key = rest.partition("/")
    if "@" in bucket or ":" in bucket:
        raise UsageError("an s3:// URI names a bucket and a key only (no credentials, no endpoint): set "
                         "AWS_ENDPOINT_URL_S3 for another endpoint, and credentials in the environment")
    if not _BUCKET.match(bucket):
        raise UsageError(f"invalid bucket name {bucket!r} in s3://{bucket}/...")
    if "\x00" in key or "\n" in key:
        raise UsageError(f"invalid key in s3://{bucket}/...: control characters")
    return Source(scheme="s3", uri=uri, bucket=bucket, key=key)


def _parse_oci(uri: str, rest: str) -> Source:
    from shipyard.runtime.fetch import oci  # the module imports this one

    try:
        reference = oci.parse_reference(rest)
    except ValueError as error:
        registry = rest.partition("/")[0]
        shown = "oci://REDACTED@..." if "@" in registry else f"oci://{rest}"[:200]
        raise UsageError(f"invalid OCI reference {shown}: {error}") from None
    return Source(scheme="oci", uri=uri, host=reference.registry, path=reference.repository, oci=reference)


def _parse_http(uri: str, scheme: str, allow_http: bool) -> Source:
    try:
        parts = urllib.parse.urlsplit(uri)
        port = parts.port
    except ValueError as error:
        raise UsageError(f"invalid URL: {error}") from None
    host = parts.hostname or ""
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        shown = f"{scheme}://REDACTED@{host}{parts.path}"
        raise UsageError(f"credentials in the URI are refused ({shown}): fetch never puts them in a URI, a log or "
                         "an error; use a presigned URL, or an s3:// URI with credentials in the environment")
    if not host:
        raise UsageError(f"no host in {scheme}:// URI")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    source = Source(scheme=scheme, uri=uri, host=netloc, path=parts.path or "/")
    if scheme == "http" and not allow_http:
        raise UsageError(f"plain http is refused ({source.display}): use https://, or --allow-http "
                         "(SHIPYARD_FETCH_ALLOW_HTTP=true) for a trusted network, best with --digest")
    return source


def check_relative_path(name: str) -> str:
    """The normalised relative path of an archive entry or an object under a prefix, or ValueError with the reason
    it is refused: absolute, `..`, a backslash, a control character, or a name fetch reserves. `./a//b` is `a/b`.
    Pure."""
    if not name or not name.strip("/."):
        raise ValueError("empty path")
    if name.startswith("/"):
        raise ValueError("absolute path")
    if "\\" in name:
        raise ValueError("backslash in path")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError("control character in path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError("'..' in path")
    if not parts:
        raise ValueError("empty path")
    if parts[0].startswith(RESERVED_PREFIX):
        raise ValueError(f"name reserved by fetch ({RESERVED_PREFIX}*)")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("path is not UTF-8") from None
    return "/".join(parts)


def check_file_name(name: str, display: str) -> str:
    """The name a single object is written under, or UsageError (e.g. a URL ending in `/`). Pure."""
    try:
        path = check_relative_path(name)
    except ValueError as error:
        raise UsageError(f"no usable file name in {display}: {error}") from None
    if "/" in path:
        raise UsageError(f"no usable file name in {display}: '/' in name")
    return path
