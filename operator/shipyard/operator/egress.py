"""What a ModelDeployment may make the operator contact, and what is redacted before text leaves it. Pure, no I/O.

Anyone who may create a ModelDeployment chooses the addresses its analysis contacts (Prometheus:
``spec.rollout.analysis.prometheus.address``, ``metrics[].prometheus.address``; web metrics: ``metrics[].web.url``);
unchecked, that lets a tenant make the operator send requests anywhere its network reaches (server-side request
forgery). The rule (``assess_address``), the same for every provider that contacts a spec-supplied address:

- an address with userinfo (``user:password@``) is always refused: credentials never belong in a spec;
- otherwise it is queried only if it matches an allowed entry: the operator's own ``--prometheus-address``, an
  ``--allowed-prometheus-address`` (``SHIPYARD_ALLOWED_PROMETHEUS_ADDRESSES``), or an entry of the annotation
  ``shipyard.dev/allowed-prometheus-addresses`` on the ModelDeployment's **Namespace** (set by whoever administers
  the namespace, not by the tenant who writes ModelDeployments);
- matching compares normalized endpoints: scheme, host (lower case, no trailing dot, IPv6 compressed), port (the
  scheme's default when absent) and path prefix by whole segments (``/prom`` allows ``/prom`` and ``/prom/x``, not
  ``/prometheus``). Dot segments, encoded slashes or dots, backslashes, a query or a fragment make an address
  invalid (they would let a path escape its prefix once the HTTP client normalizes it).

Scrape targets (``assess_scrape_pod``): only a ready, running pod of the version's own Deployment, i.e. owned by the
ReplicaSet ``<deployment>-<pod-template-hash>``, carrying the version's labels, not on the host network; its address
is ``status.podIP`` (set by the kubelet, not by whoever created the pod).

Redaction (``redact_url``, ``redact_text``, ``build_capped``): userinfo and the values of credential-looking query
parameters of every URL in a text, and a length cap, before a message reaches status, an Event or a log line.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

ANNOTATION_ALLOWED: Final = "shipyard.dev/allowed-prometheus-addresses"
ENV_ALLOWED: Final = "SHIPYARD_ALLOWED_PROMETHEUS_ADDRESSES"
FLAG_ALLOWED: Final = "--allowed-prometheus-address"
FLAG_OPERATOR: Final = "--prometheus-address"
MAX_ERROR_TEXT: Final = 300  # an error body or message quoted in a measurement
REDACTED: Final = "REDACTED"
DEFAULT_PORTS: Final[Mapping[str, int]] = {"http": 80, "https": 443}
RULE: Final = (f"a spec-supplied address must match the operator's {FLAG_OPERATOR}, an "
               f"{FLAG_ALLOWED}, or an entry of the annotation {ANNOTATION_ALLOWED} on the namespace "
               "(see docs/security.md)")
_SECRET_PARAM_RE: Final = re.compile(
    r"(pass|pwd|secret|token|key|auth|sig|credential|session|cookie|jwt|bearer)", re.IGNORECASE)
_URL_IN_TEXT_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
_USERINFO_IN_TEXT_RE: Final = re.compile(r"(?<=://)[^\s/@'\"<>`]+@")
_SEPARATORS_RE: Final = re.compile(r"[\s,]+")


@dataclass(frozen=True)
class Endpoint:
    """A normalized http(s) address: what matching compares."""

    scheme: str
    host: str
    port: int
    path: str  # "" or "/a/b" (no trailing slash)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"

    def covers(self, other: Endpoint) -> bool:
        """Whether ``other`` is this endpoint or below its path (whole segments)."""
        return (self.scheme, self.host, self.port) == (other.scheme, other.host, other.port) and (
            not self.path or other.path == self.path or other.path.startswith(self.path + "/"))


@dataclass(frozen=True)
class Allowed:
    """One allowed endpoint and where it was configured (shown when a decision is explained)."""

    endpoint: Endpoint
    source: str


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # why: the matching source, or the refusal (never the credentials)


def build_endpoint(address: str) -> Endpoint:
    """The normalized endpoint of an http(s) URL; ValueError (naming the problem, not echoing userinfo) otherwise.

    Userinfo is accepted here (``assess_address`` refuses it): operator-side configuration may carry it.
    """
    try:
        parts = urllib.parse.urlsplit(address.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError("must be an http or https URL")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise ValueError("has no host")
    try:
        host = ipaddress.ip_address(host).compressed
    except ValueError:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9_]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9_]*[a-z0-9])?)*", host):
            raise ValueError("has an invalid host name") from None
    if parts.query or parts.fragment or address.rstrip().endswith(("?", "#")):
        raise ValueError("must not carry a query or a fragment")
    path = parts.path
    lowered = path.lower()
    if "\\" in path or "%2f" in lowered or "%2e" in lowered or "%5c" in lowered:
        raise ValueError("has an encoded slash, dot or a backslash in its path")
    segments = [s for s in path.split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise ValueError("has a '.' or '..' segment in its path")
    return Endpoint(scheme=scheme, host=host, port=port or DEFAULT_PORTS[scheme],
                    path="/" + "/".join(segments) if segments else "")


def has_userinfo(address: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(address.strip())
    except ValueError:
        return "@" in address.split("/")[2] if address.count("/") >= 2 else False
    return "@" in parts.netloc


def parse_address_list(text: str | Iterable[str] | None, source: str, *, userinfo: bool = False,
                       ) -> tuple[tuple[Allowed, ...], tuple[str, ...]]:
    """Allowed entries from comma- or space-separated addresses (or several such texts), and one problem per invalid
    entry (redacted). Entries with userinfo are invalid (an allow-list entry matches addresses, it holds no secret)
    unless ``userinfo`` (the operator's own ``--prometheus-address``, which it queries with them)."""
    texts = [text] if isinstance(text, str) else list(text or ())
    entries: list[Allowed] = []
    problems: list[str] = []
    for item in (i for t in texts for i in _SEPARATORS_RE.split(t) if i):
        if has_userinfo(item) and not userinfo:
            problems.append(f"{source} entry {redact_url(item)} carries credentials (user:password@)")
            continue
        try:
            entries.append(Allowed(build_endpoint(item), source))
        except ValueError as exc:
            problems.append(f"{source} entry {redact_url(item)} {exc}")
    return tuple(entries), tuple(problems)


def assess_address(address: str, field: str, allowed: Sequence[Allowed], *, what: str = "Prometheus address",
                   ) -> Decision:
    """Whether the operator may contact a spec-supplied ``address`` (from ``field``); the rules are the module's.
    ``what`` names the kind of address in the refusal."""
    shown = redact_url(address)
    if has_userinfo(address):
        return Decision(False, f"{field}: {shown} carries credentials (user:password@), which are never accepted in "
                               "a spec; put the address without them on an allow-list and let the server (or a "
                               "proxy) authenticate")
    try:
        endpoint = build_endpoint(address)
    except ValueError as exc:
        return Decision(False, f"{field}: {shown} {exc}")
    for entry in allowed:
        if entry.endpoint.covers(endpoint):
            return Decision(True, f"{field}: {shown} is allowed by {entry.source} ({entry.endpoint})")
    return Decision(False, f"{field}: {shown} is not an allowed {what}: {RULE}")


# ---------------------------------------------------------------------------------------------------------------
# Scrape targets


def assess_scrape_pod(pod: Mapping[str, Any], deployment: str, labels: Mapping[str, str]) -> str | None:
    """Why ``pod`` must not be scraped as a pod of ``deployment`` (whose pods carry ``labels``); None: scrape it.

    A pod belongs to the Deployment when its controller is the ReplicaSet ``<deployment>-<pod-template-hash>``
    (the hash from its own ``pod-template-hash`` label) and it carries every label of the version; it must not use
    the host network (its address would be the node's), must be ready, running and not terminating, and must have a
    ``status.podIP``.
    """
    meta = pod.get("metadata") or {}
    pod_labels = meta.get("labels") or {}
    if any(pod_labels.get(k) != v for k, v in labels.items()):
        return "labels of another version"
    template_hash = pod_labels.get("pod-template-hash")
    if not template_hash:
        return "no pod-template-hash label (not made by a ReplicaSet)"
    owners = [r for r in meta.get("ownerReferences") or [] if r.get("controller")]
    if len(owners) != 1 or owners[0].get("kind") != "ReplicaSet" or owners[0].get("apiVersion") != "apps/v1" \
            or owners[0].get("name") != f"{deployment}-{template_hash}":
        return f"not controlled by ReplicaSet {deployment}-{template_hash}"
    if (pod.get("spec") or {}).get("hostNetwork"):
        return "uses the host network"
    if meta.get("deletionTimestamp"):
        return "terminating"
    status = pod.get("status") or {}
    if status.get("phase") not in (None, "Running"):
        return f"phase {status.get('phase')}"
    if not any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []):
        return "not ready"
    ip = status.get("podIP")
    if not ip:
        return "no podIP"
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return "podIP is not an IP address"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Redaction


def redact_url(url: str) -> str:
    """``url`` without its userinfo and with the values of credential-looking query parameters replaced.

    Anything that does not parse as a URL keeps only what precedes a possible userinfo.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return _USERINFO_IN_TEXT_RE.sub(f"{REDACTED}@", url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = "&".join(
            f"{urllib.parse.quote(k, safe='')}={REDACTED if _SECRET_PARAM_RE.search(k) else urllib.parse.quote(v)}"
            for k, v in pairs)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URL in a free text redacted (``redact_url``)."""
    return _URL_IN_TEXT_RE.sub(lambda m: redact_url(m.group(0)), text)


def build_capped(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    """``text`` redacted and cut to ``limit`` characters (an ellipsis marks the cut)."""
    text = redact_text(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
