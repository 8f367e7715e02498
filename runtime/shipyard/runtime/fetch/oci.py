"""`oci://registry[:port]/repository[:tag|@sha256:<hex>]` sources: a model in an OCI registry, over the OCI
distribution API with urllib3.

What a reference holds:

- an **ORAS artifact** (what `oras push` makes): each layer annotated `org.opencontainers.image.title` is a file of
  that name; a layer ORAS pushed from a directory (annotation `io.deis.oras.content.unpack: "true"`, a tar+gzip whose
  entries start with the directory's name) is extracted with the archive checks of `archives`. Layers without a title
  are skipped, as `oras pull` does;
- an **image** (config media type `application/vnd.oci.image.config.v1+json` or Docker's): its layers are applied in
  order, whiteouts (`.wh.<name>`, `.wh..wh..opq`) honoured, and only the directory `--path` names is kept (required:
  an image's whole filesystem is not a model). Entries outside that directory are never written.

An image index (or a Docker manifest list) picks this machine's platform (linux/amd64 on x86_64), or its only
entry. The content's digest is the digest of the manifest the reference resolves to (the index's, for an index):
what `oras push` prints and what `@sha256:` pins. Every blob's sha256 and size are checked as it streams; blobs
download in parallel (`--parallelism`), each resumed with `Range` after a cut.

Authentication: anonymous; HTTP basic; and the bearer-token flow (a 401's `WWW-Authenticate: Bearer realm=...,
service=..., scope=...` -> a GET of the realm, with basic credentials when there are any -> `Authorization: Bearer`).
Credentials come from a Docker config file (`--registry-config`; a Kubernetes `kubernetes.io/dockerconfigjson`
Secret's `.dockerconfigjson` key mounted as a file has that format): `auths.<host>.auth` (base64 `user:password`)
or `username`/`password`; credential helpers (`credsStore`, `credHelpers`) are not run. They are never logged or put
in an error.

Why not a library: PyPI's `oras` (oras-py 0.2) pulls one blob at a time over requests, keeps no resumable state,
knows nothing of image layers and whiteouts, and its own README lists path-traversal checks on pull as to do; what
fetch needs on top (streamed sha256, parallel resumable blobs, retries within the deadline, safe extraction, the
cache keyed by the manifest digest) would be most of this module anyway, and urllib3 is already here.

Pure: `parse_reference`, `parse_challenge`, `build_token_url`, `build_registry_credentials`, `select_manifest`,
`build_manifest_kind`, `build_content_kind`, `build_artifact_files`, `build_layer_action`, `build_blob_name`,
`build_error_detail`. The rest does I/O.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import platform
import posixpath
import re
import shutil
import tarfile
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import urllib3

from shipyard.runtime.fetch import archives, digests
from shipyard.runtime.fetch.errors import (
    ArchiveError,
    DigestMismatch,
    FetchError,
    UsageError,
    build_timeout_message,
)
from shipyard.runtime.fetch.https import MAX_REDIRECTS, REDIRECTS, build_redirect_target, describe_exception
from shipyard.runtime.fetch.progress import LowSpeedWindow, Progress
from shipyard.runtime.fetch.retry import Deadline, run_with_retries
from shipyard.runtime.fetch.sources import check_relative_path
from shipyard.runtime.fetch.staging import remove_tree

log = logging.getLogger("shipyard.runtime.fetch")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
IMAGE_CONFIGS = ("application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json")
TITLE = "org.opencontainers.image.title"
UNPACK = "io.deis.oras.content.unpack"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_MANIFEST_BYTES = 4 << 20  # the distribution spec's suggested limit
CHUNK = 1 << 20
_REPOSITORY = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                   r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "ppc64le": "ppc64le",
         "s390x": "s390x"}


# -- references --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Reference:
    registry: str  # host[:port]
    repository: str
    tag: str = ""
    digest: str = ""  # sha256:<hex> when pinned

    @property
    def display(self) -> str:
        pin = f"@{self.digest}" if self.digest else ""
        tag = f":{self.tag}" if self.tag and not (self.digest and self.tag == "latest") else ""
        return f"oci://{self.registry}/{self.repository}{tag}{pin}"

    @property
    def manifest_ref(self) -> str:
        """What the manifest request names: the digest when pinned, else the tag."""
        return self.digest or self.tag


def parse_reference(text: str) -> Reference:
    """`registry[:port]/repository[:tag][@sha256:<hex>]` (what follows `oci://`) -> Reference; ValueError naming the
    problem. No tag and no digest means `latest` (as docker and oras). Credentials are refused. Pure."""
    if "://" in text:
        raise ValueError("expected registry/repository[:tag|@sha256:...] after oci://")
    registry, sep, rest = text.partition("/")
    if "@" in registry:
        raise ValueError("credentials in the URI are refused: give them in a Docker config file "
                         "(--registry-config)")
    if not sep or not rest:
        raise ValueError("no repository: expected oci://registry[:port]/repository[:tag|@sha256:...]")
    if not _HOST.match(registry):
        raise ValueError(f"invalid registry {registry!r}")
    name, at, digest = rest.partition("@")
    if at:
        try:
            digest = digests.check_digest(digest)
        except ValueError:
            raise ValueError(f"invalid digest {digest!r}: expected sha256:<64 hex digits>") from None
    repository, tag = name, ""
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        repository, _, tag = name.rpartition(":")
        if not _TAG.match(tag):
            raise ValueError(f"invalid tag {tag!r}")
    if not _REPOSITORY.match(repository) or len(repository) > 255:
        raise ValueError(f"invalid repository name {repository!r} (lower case letters, digits, separators . _ - /)")
    if not tag and not digest:
        tag = "latest"
    return Reference(registry, repository, tag, digest)


# -- authentication ----------------------------------------------------------------------------------------------

def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="https://a/token",service="r",scope="repository:m:pull"` -> ("bearer", {realm, service,
    scope}); `Basic realm="x"` -> ("basic", {realm}). Quoted values may hold commas. Pure."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    for m in re.finditer(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))', rest):
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
    return scheme.lower(), params


def build_token_url(params: Mapping[str, str], scope: str) -> str:
    """The token endpoint's URL for a bearer challenge: the realm with `service` and `scope` (the challenge's, else
    `scope`) in its query. Pure."""
    query = [(k, params[k]) for k in ("service",) if params.get(k)]
    query.append(("scope", params.get("scope") or scope))
    realm = params.get("realm", "")
    return realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)


def _host_of_config_key(key: str) -> str:
    text = key.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    return text.split("/", 1)[0].lower()


def build_registry_credentials(config: Mapping[str, Any], registry: str) -> tuple[str, str] | None:
    """The (username, password) a Docker config (`~/.docker/config.json`, or a `kubernetes.io/dockerconfigjson`
    Secret's `.dockerconfigjson`) holds for `registry` (host[:port]), or None. Keys may carry a scheme and a path
    (`https://index.docker.io/v1/`); the legacy `.dockercfg` form (hosts at the top, no `auths`) is read too; an
    `identitytoken` is taken as a refresh token is not (None). Pure."""
    auths: Mapping[str, Any] = config["auths"] if isinstance(config.get("auths"), Mapping) else config
    wanted = {registry.lower()}
    if registry.lower() in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        wanted |= {"docker.io", "index.docker.io", "registry-1.docker.io"}
    for key, entry in auths.items():
        if not isinstance(entry, Mapping) or _host_of_config_key(str(key)) not in wanted:
            continue
        if entry.get("username") and entry.get("password") is not None:
            return str(entry["username"]), str(entry["password"])
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(str(entry["auth"]), validate=False).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                continue
            user, sep, password = decoded.partition(":")
            if sep:
                return user, password
    return None


def load_registry_credentials(path: str | None, registry: str, explicit: bool) -> tuple[str, str] | None:
    """Reads the Docker config at `path` (an absent default file means anonymous; an absent or unreadable file
    given explicitly is a UsageError)."""
    if not path:
        return None
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        if explicit:
            raise UsageError(f"--registry-config {path}: no such file") from None
        return None
    except (OSError, ValueError) as error:
        raise UsageError(f"--registry-config {path}: not a readable Docker config (JSON): "
                         f"{type(error).__name__}") from None
    if not isinstance(config, Mapping):
        raise UsageError(f"--registry-config {path}: not a Docker config (a JSON object with `auths`)")
    found = build_registry_credentials(config, registry)
    log.info("Registry %s: %s", registry, f"credentials from {path}" if found else "anonymous")
    return found


# -- manifests ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)
    platform: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def parse_descriptor(doc: Any, what: str) -> Descriptor:
    """A descriptor of a manifest; FetchError for one without a sha256 digest or a size. Pure."""
    if not isinstance(doc, Mapping):
        raise FetchError(f"invalid {what}: not an object")
    try:
        digest = digests.check_digest(str(doc.get("digest", "")))
    except ValueError:
        raise FetchError(f"invalid {what}: digest {doc.get('digest')!r} is not sha256:<64 hex digits>") from None
    size = doc.get("size")
    if not isinstance(size, int) or size < 0:
        raise FetchError(f"invalid {what} {digest}: no size")
    annotations = doc.get("annotations") or {}
    plat = doc.get("platform") or {}
    return Descriptor(str(doc.get("mediaType", "")), digest, size,
                      {str(k): str(v) for k, v in annotations.items()} if isinstance(annotations, Mapping) else {},
                      plat if isinstance(plat, Mapping) else {})


def build_manifest_kind(doc: Mapping[str, Any], content_type: str) -> str:
    """`index` or `manifest`, from the document's mediaType, else the response's Content-Type, else its shape;
    FetchError for anything else (a schema 1 manifest). Pure."""
    media = str(doc.get("mediaType") or content_type.split(";")[0].strip())
    if media in (OCI_INDEX, DOCKER_LIST):
        return "index"
    if media in (OCI_MANIFEST, DOCKER_MANIFEST):
        return "manifest"
    if not media or media == "application/json":
        if "manifests" in doc:
            return "index"
        if "layers" in doc:
            return "manifest"
    raise FetchError(f"unsupported manifest type {media!r}")


def host_platform() -> tuple[str, str]:
    return "linux", _ARCH.get(platform.machine().lower(), platform.machine().lower())


def select_manifest(index: Mapping[str, Any], os_name: str, arch: str) -> Descriptor:
    """The entry of an index to fetch: the only one (attestations, platform `unknown/unknown`, left out), else the
    one for `os_name`/`arch`; FetchError listing what there is otherwise. Pure."""
    entries = [parse_descriptor(m, "index entry") for m in index.get("manifests") or []]
    real = [e for e in entries if e.platform.get("os") != "unknown"]
    if len(real) == 1:
        return real[0]
    matching = [e for e in real if e.platform.get("os") == os_name and e.platform.get("architecture") == arch]
    if matching:
        return matching[0]
    platforms = sorted({f"{e.platform.get('os', '?')}/{e.platform.get('architecture', '?')}" for e in real})
    raise FetchError(f"the index has no manifest for {os_name}/{arch} (it has: {', '.join(platforms) or 'none'})")


def build_content_kind(manifest: Mapping[str, Any]) -> str:
    """`image` (its config is an image configuration) or `artifact`. Pure."""
    config = manifest.get("config") or {}
    return "image" if isinstance(config, Mapping) and config.get("mediaType") in IMAGE_CONFIGS else "artifact"


@dataclasses.dataclass(frozen=True)
class ArtifactFile:
    layer: Descriptor
    name: str  # relative path in the model (the title)
    unpack: bool  # a directory ORAS packed: extract the tar into the model


def build_artifact_files(layers: Sequence[Descriptor]) -> tuple[list[ArtifactFile], list[Descriptor]]:
    """The files of an ORAS artifact, and the layers skipped (no title). A title that is not a safe relative path,
    or two layers with one title, is a FetchError. Pure."""
    files: list[ArtifactFile] = []
    skipped: list[Descriptor] = []
    seen: set[str] = set()
    for layer in layers:
        title = layer.annotations.get(TITLE)
        if not title:
            skipped.append(layer)
            continue
        try:
            name = check_relative_path(title)
        except ValueError as error:
            raise FetchError(f"refused artifact layer {layer.digest}: title {title!r}: {error}") from None
        if name in seen:
            raise FetchError(f"refused artifact layer {layer.digest}: title {title!r} twice")
        seen.add(name)
        files.append(ArtifactFile(layer, name, layer.annotations.get(UNPACK, "").lower() == "true"))
    return files, skipped


def build_layer_action(name: str, prefix: str) -> tuple[str, str]:
    """What to do with an image layer's tar entry `name` when only the directory `prefix` (normalised, no leading
    `/`) is kept: ("skip", ""), ("extract", rel), ("whiteout", rel: remove it), ("opaque", rel: empty that
    directory; "" is the model's top) or ("clear", ""): a whiteout of the prefix itself or of a directory above it
    (the model is deleted by this layer). `rel` is relative to the prefix; the prefix "" keeps the whole
    filesystem. Pure."""
    path = posixpath.normpath("/" + name).lstrip("/")
    if path in ("", "."):
        return "skip", ""
    parent, base = posixpath.split(path)
    if not prefix:
        if base == OPAQUE:
            return "opaque", parent
        if base.startswith(WHITEOUT):
            return "whiteout", posixpath.join(parent, base[len(WHITEOUT):])
        return "extract", path
    if base == OPAQUE:
        if parent == prefix or parent.startswith(prefix + "/"):
            return "opaque", parent[len(prefix) + 1:] if parent != prefix else ""
        if prefix.startswith(parent + "/") or not parent:
            return "clear", ""
        return "skip", ""
    if base.startswith(WHITEOUT):
        removed = posixpath.join(parent, base[len(WHITEOUT):])
        if removed == prefix or prefix.startswith(removed + "/"):
            return "clear", ""
        if removed.startswith(prefix + "/"):
            return "whiteout", removed[len(prefix) + 1:]
        return "skip", ""
    if path.startswith(prefix + "/"):
        return "extract", path[len(prefix) + 1:]
    return "skip", ""


def build_blob_name(digest: str) -> str:
    return "blob-" + digest.replace(":", "-", 1)


def build_error_detail(body: bytes) -> str:
    """The first error of a registry's JSON error body (`{"errors": [{"code": "MANIFEST_UNKNOWN", "message":
    "manifest unknown"}]}`): its message, else its code; "" when there is none. Pure."""
    try:
        doc = json.loads(body.decode("utf-8"))
        first = doc["errors"][0]
        text = str(first.get("message") or first.get("code") or "")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, UnicodeDecodeError):
        return ""
    return " ".join(text.split())[:200]


# -- the client --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Resolved:
    digest: str  # of the manifest the reference names (the index's, for an index)
    manifest: Mapping[str, Any]  # the image manifest to fetch (the selected one, for an index)
    kind: str  # image | artifact
    layers: tuple[Descriptor, ...]

    @property
    def total(self) -> int:
        return sum({d.digest: d.size for d in self.layers}.values())


class Client:
    """The distribution API of one repository: requests with authentication, retries, verified blob downloads."""

    def __init__(self, ref: Reference, *, deadline: Deadline, timeout: float, retries: int, parallelism: int,
                 ca_bundle: str | None, allow_http: bool, credentials: tuple[str, str] | None) -> None:
        self.ref = ref
        self.deadline = deadline
        self.timeout = timeout
        self.retries = retries
        self.parallelism = max(1, parallelism)
        self.allow_http = allow_http
        self.base = f"{'http' if allow_http else 'https'}://{ref.registry}"
        self.credentials = credentials
        self.scope = f"repository:{ref.repository}:pull"
        self._auth: str | None = None
        self._auth_lock = threading.Lock()
        kwargs: dict[str, Any] = {"cert_reqs": "CERT_REQUIRED"}
        if ca_bundle:
            kwargs["ca_certs"] = ca_bundle
        self.pool = urllib3.PoolManager(num_pools=4, maxsize=self.parallelism + 1, retries=False, **kwargs)

    @property
    def display(self) -> str:
        return self.ref.display

    def _timeout(self) -> urllib3.Timeout:
        seconds = self.deadline.socket_timeout(self.timeout)
        return urllib3.Timeout(connect=seconds, read=seconds)

    def _send(self, method: str, url: str, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        try:
            return self.pool.request(method, url, headers=headers, preload_content=False, redirect=False,
                                     retries=False, timeout=self._timeout(), decode_content=False)
        except urllib3.exceptions.HTTPError as error:
            reason = describe_exception(error)
            if reason.startswith("TLS certificate verification failed"):
                raise FetchError(f"{reason} for {self.display} (--ca-bundle?)") from None
            if reason.startswith("TLS error") and not self.allow_http:
                raise FetchError(f"{reason} talking to {self.display}", retryable=True) from None
            if reason == "timed out":
                raise FetchError(build_timeout_message(self.timeout, self.display, "no answer"),
                                 retryable=True) from None
            raise FetchError(f"{reason} to {self.display}", retryable=True) from None

    def request(self, method: str, path: str, headers: Mapping[str, str] | None = None) -> urllib3.BaseHTTPResponse:
        """`method` on the registry's `path` (`/v2/...`), authenticated on a 401 challenge, redirects followed (the
        Authorization header is not sent to another host: a blob store's presigned URL). Statuses are the
        caller's to judge; transport errors are retryable FetchErrors."""
        url = self.base + path
        sent: dict[str, str] = dict(headers or {})
        for _ in range(MAX_REDIRECTS + 1):
            same_host = urllib.parse.urlsplit(url).netloc == self.ref.registry
            hdrs = dict(sent)
            if same_host and self._auth:
                hdrs["Authorization"] = self._auth
            response = self._send(method, url, hdrs)
            if response.status == 401 and same_host and \
                    self._authenticate(response.headers.get("WWW-Authenticate", ""), hdrs.get("Authorization")):
                _discard(response)
                hdrs["Authorization"] = self._auth or ""
                response = self._send(method, url, hdrs)  # a 401 again is the caller's to report
            if response.status in REDIRECTS and response.headers.get("Location"):
                _discard(response)
                url = build_redirect_target(url, response.headers["Location"], self.display, self.allow_http)
                continue
            return response
        raise FetchError(f"{self.display}: more than {MAX_REDIRECTS} redirects")

    def _authenticate(self, challenge: str, tried: str | None) -> bool:
        """Sets the Authorization header a challenge asks for; False when there is nothing (new) to try."""
        scheme, params = parse_challenge(challenge)
        with self._auth_lock:
            if self._auth and self._auth != tried:  # another thread got a token meanwhile
                return True
            if scheme == "basic":
                if self.credentials is None or tried is not None:
                    return False
                user, password = self.credentials
                self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
                return True
            if scheme == "bearer" and params.get("realm"):  # a first token, or a new one for one that expired
                self._auth = "Bearer " + self._fetch_token(params)
                return True
            return False

    def _fetch_token(self, params: Mapping[str, str]) -> str:
        url = build_token_url(params, self.scope)
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme != "https" and not (scheme == "http" and self.allow_http):
            raise FetchError(f"{self.display}: the token endpoint is not https (refused)")
        headers: dict[str, str] = {}
        if self.credentials is not None:
            user, password = self.credentials
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        response = self._send("GET", url, headers)
        try:
            body = response.read(1 << 20, decode_content=True)
        finally:
            _discard(response)
        if response.status in (401, 403):
            raise FetchError(f"access denied ({response.status}) to {self.display} (token endpoint)")
        if response.status != 200:
            raise FetchError(f"the token endpoint of {self.display} answered {response.status}",
                             retryable=500 <= response.status <= 599 or response.status == 429)
        try:
            doc = json.loads(body.decode("utf-8"))
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, UnicodeDecodeError, AttributeError):
            token = None
        if not token:
            raise FetchError(f"the token endpoint of {self.display} gave no token")
        return str(token)

    def _check(self, response: urllib3.BaseHTTPResponse, what: str) -> None:
        if response.status in (200, 206):
            return
        try:
            detail = build_error_detail(response.read(64 << 10, decode_content=True))
        except (urllib3.exceptions.HTTPError, OSError):
            detail = ""
        _discard(response)
        status = response.status
        suffix = f": {detail}" if detail else ""
        if status in (401, 403):
            raise FetchError(f"access denied ({status}) to {self.display}{suffix}")
        if status == 404:
            raise FetchError(f"not found (404): {self.display}{suffix or ': ' + what + ' unknown'}")
        retryable = status in (408, 429) or 500 <= status <= 599
        raise FetchError(f"HTTP {status} from {self.display} ({what}){suffix}", retryable=retryable)

    def get_manifest(self, reference: str) -> tuple[bytes, str, str]:
        """(body, content type, digest) of a manifest by tag or digest; the digest is computed from the body (and
        must equal a pinned `reference`)."""
        def attempt(_: int) -> tuple[bytes, str, str]:
            response = self.request("GET", f"/v2/{self.ref.repository}/manifests/{reference}",
                                    {"Accept": ", ".join(MANIFEST_TYPES)})
            try:
                self._check(response, "manifest")
                body = response.read(MAX_MANIFEST_BYTES + 1, decode_content=True)
            except (urllib3.exceptions.HTTPError, OSError) as error:
                _discard(response)
                raise FetchError(f"{describe_exception(error)} reading the manifest of {self.display}",
                                 retryable=True) from None
            response.release_conn()
            if len(body) > MAX_MANIFEST_BYTES:
                raise FetchError(f"the manifest of {self.display} is larger than {MAX_MANIFEST_BYTES} bytes")
            digest = digests.PREFIX + hashlib.sha256(body).hexdigest()
            if reference.startswith(digests.PREFIX) and digest != reference:
                raise DigestMismatch(f"digest mismatch: the registry sent a manifest of digest {digest} for "
                                     f"{reference} ({self.display})")
            return body, response.headers.get("Content-Type", ""), digest

        return run_with_retries(attempt, retries=self.retries, deadline=self.deadline, display=self.display,
                                what="manifest")

    def resolve(self) -> Resolved:
        """The manifest the reference names (one GET; a second for an index's entry), its digest and layers."""
        body, content_type, digest = self.get_manifest(self.ref.manifest_ref)
        doc = _json_object(body, f"the manifest of {self.display}")
        if build_manifest_kind(doc, content_type) == "index":
            entry = select_manifest(doc, *host_platform())
            log.info("%s is an index: fetching its manifest %s (%s/%s)", self.display, entry.digest,
                     entry.platform.get("os", "?"), entry.platform.get("architecture", "?"))
            child, child_type, _ = self.get_manifest(entry.digest)
            doc = _json_object(child, f"the manifest {entry.digest} of {self.display}")
            if build_manifest_kind(doc, child_type) != "manifest":
                raise FetchError(f"{self.display}: an index inside an index is not supported")
        layers = tuple(parse_descriptor(d, "layer") for d in doc.get("layers") or [])
        return Resolved(digest, doc, build_content_kind(doc), layers)

    def download_blobs(self, blobs: Sequence[Descriptor], folder: Path, progress: Progress) -> dict[str, Path]:
        """Each distinct blob into `folder`, in parallel, verified; returns digest -> path."""
        unique = list({b.digest: b for b in blobs}.values())
        stop = threading.Event()
        paths = {b.digest: folder / build_blob_name(b.digest) for b in unique}

        def one(blob: Descriptor) -> None:
            try:
                self._download_blob(blob, paths[blob.digest], progress, stop)
            except BaseException:
                stop.set()
                raise

        if len(unique) <= 1:
            for blob in unique:
                one(blob)
            return paths
        with concurrent.futures.ThreadPoolExecutor(min(self.parallelism, len(unique)),
                                                   thread_name_prefix="fetch-blob") as pool:
            futures = [pool.submit(one, b) for b in unique]
            first_error: BaseException | None = None
            for future in concurrent.futures.as_completed(futures):
                error = future.exception()
                if error is not None and first_error is None:
                    first_error = error
            if first_error is not None:
                raise first_error
        return paths

    def _download_blob(self, blob: Descriptor, path: Path, progress: Progress, stop: threading.Event) -> None:
        display = f"{self.display} (blob {blob.digest[:19]})"
        state: dict[str, Any] = {"written": 0, "sha": hashlib.sha256()}
        with open(path, "wb") as sink:

            def attempt(n: int) -> None:
                headers: dict[str, str] = {"Accept-Encoding": "identity"}
                resuming = n > 0 and 0 < state["written"] < blob.size
                if resuming:
                    headers["Range"] = f"bytes={state['written']}-"
                response = self.request("GET", f"/v2/{self.ref.repository}/blobs/{blob.digest}", headers)
                complete = False
                try:
                    self._check(response, "blob")
                    if not (response.status == 206 and resuming and _range_start(response) == state["written"]):
                        if response.status == 206:
                            raise FetchError(f"unexpected partial answer (206) from {display}", retryable=True)
                        if state["written"]:
                            log.info("Restarting %s from the start", display)
                            progress.rewind(state["written"])
                        sink.seek(0)
                        sink.truncate()
                        state.update(written=0, sha=hashlib.sha256())
                    elif resuming:
                        log.info("Resuming %s at byte %d", display, state["written"])
                    self._stream(response, sink, state, progress, blob, display, stop)
                    complete = True
                finally:
                    if complete:
                        response.release_conn()
                    else:
                        _discard(response)

            run_with_retries(attempt, retries=self.retries, deadline=self.deadline, display=display, what="blob")
        got = digests.PREFIX + state["sha"].hexdigest()
        if got != blob.digest or state["written"] != blob.size:
            raise DigestMismatch(f"digest mismatch: blob {blob.digest} of {self.display} arrived as {got} "
                                 f"({state['written']} of {blob.size} bytes)")

    def _stream(self, response: urllib3.BaseHTTPResponse, sink: Any, state: dict[str, Any], progress: Progress,
                blob: Descriptor, display: str, stop: threading.Event) -> None:
        window = LowSpeedWindow(self.timeout)
        started = time.monotonic()
        while True:
            self.deadline.check(display)
            if stop.is_set():
                raise FetchError(f"stopped fetching {display}: another blob failed")
            try:
                chunk = response.read(CHUNK, decode_content=False)  # gathered in C: one call per MiB
            except urllib3.exceptions.ReadTimeoutError:
                raise FetchError(build_timeout_message(self.timeout, display, "no data"), retryable=True) from None
            except (urllib3.exceptions.HTTPError, OSError) as error:
                raise FetchError(f"{describe_exception(error)} after {state['written']} of {blob.size} bytes of "
                                 f"{display}", retryable=True) from None
            if not chunk:
                break
            if state["written"] + len(chunk) > blob.size:
                raise DigestMismatch(f"blob {blob.digest} of {self.display} is longer than its {blob.size} bytes")
            sink.write(chunk)
            state["sha"].update(chunk)
            state["written"] += len(chunk)
            progress.add(len(chunk))
            slow = window.add(len(chunk))
            if slow is not None:
                raise FetchError(build_timeout_message(round(time.monotonic() - started), display, slow),
                                 retryable=True)
        if state["written"] != blob.size:
            raise FetchError(f"connection closed after {state['written']} of {blob.size} bytes of {display}",
                             retryable=True)


def _json_object(body: bytes, what: str) -> Mapping[str, Any]:
    try:
        doc = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise FetchError(f"{what} is not JSON") from None
    if not isinstance(doc, Mapping):
        raise FetchError(f"{what} is not a JSON object")
    return doc


def _discard(response: urllib3.BaseHTTPResponse) -> None:
    response.close()
    response.release_conn()


def _range_start(response: urllib3.BaseHTTPResponse) -> int | None:
    value = response.headers.get("Content-Range", "")
    unit, _, rest = value.partition(" ")
    start = rest.partition("-")[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


# -- materializing -----------------------------------------------------------------------------------------------

def check_model_path(text: str | None) -> str | None:
    """`--path` normalised (no leading or trailing `/`): None when not given, "" for `/` (an image's whole
    filesystem, an artifact's every file); UsageError for `..` and the like. Pure."""
    if not text:
        return None
    if not text.strip("/"):
        return ""
    try:
        return check_relative_path(text.lstrip("/"))
    except ValueError as error:
        raise UsageError(f"--path {text!r}: {error}") from None


@dataclasses.dataclass(frozen=True)
class Materialized:
    downloaded: int  # bytes of blobs
    known: dict[str, tuple[str, int]]  # files that are whole verified blobs: path -> (sha256 hex, size)


def materialize(client: Client, resolved: Resolved, root: Path, model: Path, path: str | None, progress: Progress,
                *, max_bytes: int, max_ratio: float, cancel: threading.Event) -> Materialized:
    """Downloads what `resolved` needs into `root` and builds the model in `model` (an empty directory). `path`:
    `--path`, normalised."""
    blobs_dir = root / "blobs"
    blobs_dir.mkdir()
    if resolved.kind == "image":
        if path is None:
            raise UsageError(f"{client.display} is a container image: --path must name the model's directory in its "
                             "filesystem (e.g. --path /models/digits)")
        for layer in resolved.layers:
            if "zstd" in layer.media_type:
                raise FetchError(f"{client.display}: layer {layer.digest} is zstd-compressed ({layer.media_type}): "
                                 "not supported, push it gzip-compressed")
        paths = client.download_blobs(resolved.layers, blobs_dir, progress)
        progress.stop()
        budget = archives.Budget(sum(p.stat().st_size for p in paths.values()), max_bytes, max_ratio)
        found = False
        for layer in resolved.layers:
            found = apply_layer(paths[layer.digest], model, path, budget, cancel) or found
        if not found or not any(model.iterdir()):
            raise FetchError(f"{client.display}: nothing at /{path} in the image's filesystem (--path)")
        return Materialized(resolved.total, {})
    files, skipped = build_artifact_files(resolved.layers)
    for layer in skipped:
        log.info("Skipped layer %s of %s: no %s annotation", layer.digest, client.display, TITLE)
    if not files:
        raise FetchError(f"{client.display}: the artifact has no file (no layer with a {TITLE} annotation)")
    if path and not any(f.name == path or path.startswith(f.name + "/") for f in files):
        raise UsageError(f"--path /{path}: no such file or directory in the artifact {client.display} (it has: "
                         f"{', '.join(sorted(f.name for f in files))})")
    paths = client.download_blobs([f.layer for f in files], blobs_dir, progress)
    progress.stop()
    written = 0
    known: dict[str, tuple[str, int]] = {}
    for n, item in enumerate(files):
        blob = paths[item.layer.digest]
        if item.unpack:
            # ORAS packs a directory with its own name at the top of the tar: extracted apart, it must hold that
            # name alone (a layer never writes beside its own title), then moved into place
            unpacked = root / f"unpack-{n}"
            unpacked.mkdir()
            written += archives.extract(blob, "tar", unpacked, max_bytes=max_bytes - written, max_ratio=max_ratio,
                                        cancel=cancel)
            top = sorted(p.name for p in unpacked.iterdir())
            if top != [item.name.split("/", 1)[0]] or not (unpacked / item.name).is_dir():
                raise ArchiveError(f"refused artifact layer {item.layer.digest}: a directory layer titled "
                                   f"{item.name!r} holds {', '.join(top) or 'nothing'} at its top")
            (model / item.name).parent.mkdir(parents=True, exist_ok=True)
            if (model / item.name).exists():
                raise ArchiveError(f"refused artifact layer {item.layer.digest}: {item.name!r} twice")
            os.rename(unpacked / item.name, model / item.name)
        else:
            target = model / item.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if sum(1 for f in files if f.layer.digest == item.layer.digest) > 1:
                shutil.copyfile(blob, target)
            else:
                os.rename(blob, target)
            known[item.name] = (item.layer.digest.split(":", 1)[1], item.layer.size)
    if path:
        _select(model, path, root)
        known = {}
    return Materialized(sum(d.size for d in {f.layer.digest: f.layer for f in files}.values()), known)


def _select(model: Path, path: str, root: Path) -> None:
    """Keeps only `model/path` (a file: at the top under its name; a directory: its content)."""
    chosen = model / path
    if not chosen.exists() or chosen.is_symlink():
        raise UsageError(f"--path /{path}: no such file or directory in the artifact")
    keep = root / "selected"
    os.rename(chosen, keep)
    for entry in list(model.iterdir()):
        remove_tree(entry)
    if keep.is_dir():
        for entry in list(keep.iterdir()):
            os.rename(entry, model / entry.name)
        keep.rmdir()
    else:
        os.rename(keep, model / posixpath.basename(path))


def apply_layer(layer: Path, model: Path, prefix: str, budget: archives.Budget, cancel: threading.Event) -> bool:
    """Applies an image layer (a tar, any compression tarfile reads) to `model`, keeping only what lies under
    `prefix`: entries checked as archive entries (relative to the model), whiteouts honoured; a later layer's file
    replaces an earlier one's. Returns whether the layer touched the model."""
    touched = False
    seen: set[str] = set()
    try:
        with tarfile.open(layer, "r:*") as tar:
            tar.errorlevel = 2
            for member in tar:
                if cancel.is_set():
                    raise FetchError("interrupted while applying a layer")
                action, rel = build_layer_action(member.name, prefix)
                if action == "skip":
                    continue
                touched = True
                if action == "clear":
                    for child in list(model.iterdir()):
                        remove_tree(child)
                    continue
                if action in ("whiteout", "opaque"):
                    _remove_inside(model, rel, contents_only=action == "opaque")
                    continue
                if member.islnk():
                    link_action, link_rel = build_layer_action(member.linkname, prefix)
                    if link_action != "extract":
                        raise ArchiveError(f"refused layer entry {member.name!r}: hard link to "
                                                    f"{member.linkname!r} outside /{prefix}")
                    member.linkname = link_rel
                original = member.name
                member.name = rel
                entry = archives.build_tar_entry(member)
                checked = archives.check_entry(entry)
                if not checked:
                    continue
                if checked in seen and entry.kind != archives.DIRECTORY:
                    raise ArchiveError(f"refused layer entry {original!r}: the same path twice")
                seen.add(checked)
                budget.add(original, entry.size)
                _make_room(model, checked, entry.kind == archives.DIRECTORY)
                try:
                    tar.extract(member, model, filter="data")
                except tarfile.FilterError as error:
                    raise ArchiveError(f"refused layer entry {original!r}: {error}") from None
                except OSError as error:
                    raise ArchiveError(f"layer entry {original!r}: {error.strerror or error}") from None
    except (tarfile.TarError, EOFError) as error:
        raise ArchiveError(f"layer {layer.name}: not a valid tar ({error})") from None
    return touched


def _inside(model: Path, rel: str) -> Path | None:
    """`model/rel` when its parent resolves inside the model (no symlink leads out), else None."""
    target = model / rel if rel else model
    parent = os.path.realpath(target.parent if rel else target)
    root = os.path.realpath(model)
    if os.path.commonpath([root, parent]) != root:
        return None
    return target


def _remove_inside(model: Path, rel: str, contents_only: bool) -> None:
    target = _inside(model, rel)
    if target is None:
        raise ArchiveError(f"refused whiteout of {rel!r}: its directory leads outside the model")
    if contents_only:
        if target.is_dir() and not target.is_symlink():
            for entry in list(target.iterdir()):
                remove_tree(entry)
        return
    if target.is_symlink() or target.exists():
        remove_tree(target)


def _make_room(model: Path, rel: str, is_dir: bool) -> None:
    """Overlay semantics: what an earlier layer left at `rel` gives way, unless both are directories."""
    target = _inside(model, rel)
    if target is None:
        raise ArchiveError(f"refused layer entry {rel!r}: its directory leads outside the model")
    if target.is_symlink() or (target.exists() and not (is_dir and target.is_dir())):
        remove_tree(target)


def fetch_credentials(config_path: str | None, env: Mapping[str, str], registry: str) -> tuple[str, str] | None:
    """The credentials for `registry` from `--registry-config`, else `$DOCKER_CONFIG/config.json`, else
    `~/.docker/config.json` (those two only when present)."""
    if config_path:
        return load_registry_credentials(config_path, registry, explicit=True)
    folder = env.get("DOCKER_CONFIG") or (os.path.join(env["HOME"], ".docker") if env.get("HOME") else "")
    return load_registry_credentials(os.path.join(folder, "config.json") if folder else None, registry,
                                     explicit=False)

