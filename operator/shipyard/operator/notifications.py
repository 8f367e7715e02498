"""Webhook notifications of rollout events (docs/notifications.md).

The operator posts a JSON document to each configured target when a ModelDeployment's rollout reaches one of
``EVENTS`` (the same reasons it posts as Kubernetes Events). Configuration lives in the operator's own namespace: a
ConfigMap lists the targets (name, events, payload template or the ``slack`` preset, timeout, retries) and ONE
Secret holds their URLs (a target names a key of it) and the HMAC key that signs every request, so that URLs with
tokens never sit in a ConfigMap. Both are re-read every ``refresh_seconds``: changes apply without a restart.

Pure (table-tested in tests/unit/test_notifications.py): ``parse_config`` (ConfigMap + Secret -> targets and
problems), ``assess_selected``, ``build_notification``, ``build_payload`` (a template or the preset),
``build_signature`` / ``build_headers``, ``plan_retry`` (exponential backoff with jitter, ``Retry-After``).

I/O (``Notifier``): a bounded queue of deliveries that a reconcile only appends to (never waits on: a full queue
drops and counts), one lane per (target, ModelDeployment) delivering in order, so one model's events reach a target
in the order they happened while other models and targets proceed; HTTP through one aiohttp session (redirects never
followed); counted in ``metrics`` (``shipyard_operator_notifications_total{target,event,result}`` and others).

Nothing secret is ever logged, put in status, Events or metric labels: URLs and the HMAC key are held in
``Sensitive`` (whose ``str``/``repr`` say REDACTED), log lines name the target and the error's class, never the URL.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import email.utils
import hashlib
import hmac
import json
import logging
import random
import re
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import yaml

from shipyard.operator import egress, metrics
from shipyard.operator import spec as spec_mod
from shipyard.operator.rollout import Reason

logger = logging.getLogger("shipyard.operator.notifications")

EVENTS: Final = (Reason.ROLLOUT_STARTED, Reason.STEP_COMPLETED, Reason.PROMOTED, Reason.ROLLED_BACK,
                 Reason.ANALYSIS_INCONCLUSIVE, Reason.COMPRESSION_FAILED)
DEFAULT_NAME: Final = "shipyard-notifications"  # of the ConfigMap and of the Secret
CONFIG_KEY: Final = "config.yaml"  # the ConfigMap's key holding the targets
HMAC_KEY: Final = "hmacKey"  # the Secret's key holding the signing key
MIN_HMAC_BYTES: Final = 16
PRESETS: Final = ("json", "slack")
PLACEHOLDERS: Final = ("event", "reason", "type", "namespace", "name", "version", "image", "message", "summary",
                       "time", "generation", "deliveryId", "target")
DEFAULT_TIMEOUT: Final = 5.0
DEFAULT_RETRIES: Final = 3
DEFAULT_BACKOFF: Final = 1.0
MAX_BACKOFF: Final = 60.0  # one wait between attempts is at most this (backoff), ...
MAX_RETRY_AFTER: Final = 300.0  # ... or this when the receiver asked for it (Retry-After)
MAX_MESSAGE: Final = 1024
SIGNATURE_HEADER: Final = "X-Shipyard-Signature"
TIMESTAMP_HEADER: Final = "X-Shipyard-Timestamp"
EVENT_HEADER: Final = "X-Shipyard-Event"
DELIVERY_HEADER: Final = "X-Shipyard-Delivery"
ATTEMPT_HEADER: Final = "X-Shipyard-Attempt"
USER_AGENT: Final = "shipyard-operator"
_NAME_RE: Final = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_PLACEHOLDER_RE: Final = re.compile(r"\{\{\s*([A-Za-z]+)\s*\}\}")
_URL_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
_SLACK_ICONS: Final[Mapping[str, str]] = {
    Reason.ROLLOUT_STARTED: ":arrow_forward:", Reason.STEP_COMPLETED: ":white_small_square:",
    Reason.PROMOTED: ":white_check_mark:", Reason.ROLLED_BACK: ":rotating_light:",
    Reason.ANALYSIS_INCONCLUSIVE: ":grey_question:", Reason.COMPRESSION_FAILED: ":x:",
}


class Sensitive:
    """A secret value (a URL with its token, a key) that never shows in a log line, a repr or an exception."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"<Sensitive {egress.REDACTED}>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sensitive) and self._value == other._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Target:
    name: str  # a metric label: a DNS label, chosen by the administrator
    url_key: str  # the Secret's key holding the URL
    url: Sensitive
    events: frozenset[str]
    preset: str = "json"  # json | slack (without a template)
    template: str | None = None  # JSON text with {{placeholders}}
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_BACKOFF


@dataclass(frozen=True)
class Config:
    targets: tuple[Target, ...] = ()
    hmac_key: Sensitive | None = None
    problems: tuple[str, ...] = ()  # one line each, naming keys and targets, never values of the Secret

    def target(self, name: str) -> Target | None:
        return next((t for t in self.targets if t.name == name), None)


@dataclass(frozen=True)
class Notification:
    """One rollout event of one ModelDeployment, as the payloads see it."""

    event: str  # a Reason of EVENTS
    reason: str  # the cause, where the status tells one (RolledBack: AnalysisFailed, StartupTimeout, ...)
    type: str  # Normal | Warning
    namespace: str
    name: str
    version: str
    image: str
    message: str  # redacted, capped
    time: str  # RFC 3339, UTC
    generation: int
    id: str  # the delivery id: the same for every attempt (receivers deduplicate on it)


@dataclass(frozen=True)
class Response:
    """What one attempt got: an HTTP status, or an error (``timeout`` | ``connection``) and no status."""

    status: int | None
    retry_after: str | None = None
    error: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# Configuration (pure)


def _number(raw: Any, where: str, low: float, high: float, default: float, problems: list[str]) -> float:
    if raw is None:
        return default
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not low <= raw <= high:
        problems.append(f"{where} must be a number from {low:g} to {high:g}")
        return default
    return float(raw)


def _valid_url(url: str) -> str | None:
    """Why a webhook URL is unusable (never echoing it), None when it is an http(s) URL with a host."""
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "must be an http or https URL"
    if not parts.hostname:
        return "has no host"
    if any(c.isspace() for c in url):
        return "contains white space"
    return None


def parse_config(configmap: Mapping[str, str] | None, secret: Mapping[str, bytes] | None) -> Config:
    """The targets from the ConfigMap's ``config.yaml`` and the Secret's data; an invalid target is left out with a
    problem naming it (the others still work). Problems never quote a value of the Secret."""
    problems: list[str] = []
    if configmap is None:
        return Config()
    try:
        doc = yaml.safe_load(configmap.get(CONFIG_KEY) or "") or {}
    except yaml.YAMLError as exc:
        return Config(problems=(f"{CONFIG_KEY} is not valid YAML ({type(exc).__name__})",))
    if not isinstance(doc, Mapping) or not isinstance(doc.get("targets") or [], list):
        return Config(problems=(f"{CONFIG_KEY} must be a mapping with a list 'targets'",))
    data = dict(secret or {})
    if secret is None:
        problems.append("the Secret is missing: no target is notified")
    key_bytes = data.get(HMAC_KEY)
    hmac_key: Sensitive | None = None
    if secret is not None and (key_bytes is None or len(key_bytes) < MIN_HMAC_BYTES):
        problems.append(f"the Secret's key {HMAC_KEY} is missing or shorter than {MIN_HMAC_BYTES} bytes: no target is "
                        "notified (every request is signed)")
    elif key_bytes is not None:
        hmac_key = Sensitive(key_bytes.decode("latin-1"))
    targets: list[Target] = []
    for i, raw in enumerate(doc.get("targets") or []):
        target = _parse_target(raw, i, data, problems)
        if target is not None and any(t.name == target.name for t in targets):
            problems.append(f"targets[{i}]: the name {target.name} is used twice")
        elif target is not None:
            targets.append(target)
    if hmac_key is None:
        targets = []
    return Config(targets=tuple(targets), hmac_key=hmac_key, problems=tuple(problems))


def _parse_target(raw: Any, i: int, secret: Mapping[str, bytes], problems: list[str]) -> Target | None:
    where = f"targets[{i}]"
    if not isinstance(raw, Mapping):
        problems.append(f"{where} must be a mapping")
        return None
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        problems.append(f"{where}.name must be a DNS label (lower case letters, digits, '-'; at most 63)")
        return None
    where = f"target {name}"
    known = {"name", "urlKey", "events", "preset", "template", "timeoutSeconds", "retries", "backoffSeconds"}
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        problems.append(f"{where}: unknown field(s) {', '.join(unknown)}")
        return None
    url_key = raw.get("urlKey")
    if not isinstance(url_key, str) or not url_key:
        problems.append(f"{where}: urlKey (a key of the Secret) is required")
        return None
    url_bytes = secret.get(url_key)
    if url_bytes is None:
        problems.append(f"{where}: the Secret has no key {url_key}")
        return None
    url = url_bytes.decode("utf-8", "replace").strip()
    why = _valid_url(url)
    if why is not None:
        problems.append(f"{where}: the URL in the Secret's key {url_key} {why}")
        return None
    events_raw = raw.get("events")
    if events_raw is None:
        events = frozenset(str(e) for e in EVENTS)
    elif isinstance(events_raw, list) and events_raw and all(isinstance(e, str) for e in events_raw):
        wrong = sorted(set(events_raw) - {str(e) for e in EVENTS})
        if wrong:
            problems.append(f"{where}: unknown event(s) {', '.join(wrong)} (known: {', '.join(EVENTS)})")
            return None
        events = frozenset(events_raw)
    else:
        problems.append(f"{where}: events must be a non-empty list of event names")
        return None
    preset = raw.get("preset", "json")
    template = raw.get("template")
    if preset not in PRESETS:
        problems.append(f"{where}: preset must be one of {', '.join(PRESETS)}")
        return None
    if template is not None:
        if not isinstance(template, str) or "preset" in raw:
            problems.append(f"{where}: template must be a string, and excludes preset")
            return None
        why = assess_template(template)
        if why is not None:
            problems.append(f"{where}: template {why}")
            return None
    local: list[str] = []
    timeout = _number(raw.get("timeoutSeconds"), f"{where}: timeoutSeconds", 0.1, 60, DEFAULT_TIMEOUT, local)
    retries = _number(raw.get("retries"), f"{where}: retries", 0, 10, DEFAULT_RETRIES, local)
    backoff = _number(raw.get("backoffSeconds"), f"{where}: backoffSeconds", 0.01, 60, DEFAULT_BACKOFF, local)
    if retries != int(retries):
        local.append(f"{where}: retries must be a whole number")
    if local:
        problems.extend(local)
        return None
    return Target(name=name, url_key=url_key, url=Sensitive(url), events=events, preset=str(preset),
                  template=template, timeout=timeout, retries=int(retries), backoff=backoff)


def assess_template(template: str) -> str | None:
    """Why a payload template is unusable (an unknown placeholder, not JSON once rendered), None when it is fine."""
    unknown = sorted({m.group(1) for m in _PLACEHOLDER_RE.finditer(template)} - set(PLACEHOLDERS))
    if unknown:
        return f"has unknown placeholder(s) {', '.join(unknown)} (known: {', '.join(PLACEHOLDERS)})"
    sample = Notification(event="RolledBack", reason="AnalysisFailed", type="Warning", namespace="ns", name="m",
                          version="1.0.0", image="registry/m:1.0.0", message='a "quoted"\nmessage\\', time="t",
                          generation=1, id="00000000-0000-0000-0000-000000000000")
    try:
        json.loads(render_template(template, sample, "target"))
    except json.JSONDecodeError as exc:
        return f"is not JSON once rendered ({exc.msg} at line {exc.lineno} column {exc.colno})"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Events and payloads (pure)


def assess_selected(target: Target, event: str) -> bool:
    return event in target.events


def build_reason(event: str, status: Mapping[str, Any]) -> str:
    """The cause behind an event where the status tells one: a rollback's Stalled reason (AnalysisFailed,
    StartupTimeout, Aborted, ...); else the event itself."""
    if event == Reason.ROLLED_BACK:
        for c in status.get("conditions") or []:
            if c.get("type") == "Stalled" and c.get("status") == "True" and c.get("reason"):
                return str(c["reason"])
    return event


def build_notification(body: Mapping[str, Any], event_type: str, event: str, message: str,
                       status: Mapping[str, Any], now: datetime.datetime, delivery_id: str) -> Notification | None:
    """The notification of a planned Kubernetes Event, None when the event is not one that is notified."""
    if event not in {str(e) for e in EVENTS}:
        return None
    meta = body.get("metadata") or {}
    image = str((body.get("spec") or {}).get("image") or "")
    try:
        version = spec_mod.image_version(image)
    except Exception:  # an invalid spec: the image as it is written
        version = ""
    return Notification(
        event=event, reason=build_reason(event, status), type=event_type, namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""), version=version, image=image,
        message=egress.build_capped(message, MAX_MESSAGE),
        time=now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        generation=int(meta.get("generation") or 0), id=delivery_id)


def build_summary(n: Notification) -> str:
    """One line without links (chat tools unfurl URLs; a message may quote one)."""
    text = f"{n.event}: {n.namespace}/{n.name} {n.version}".rstrip() + f": {n.message}"
    return _URL_RE.sub("[link removed]", text)


def build_fields(n: Notification, target: str) -> dict[str, Any]:
    """Every placeholder's value."""
    return {"event": n.event, "reason": n.reason, "type": n.type, "namespace": n.namespace, "name": n.name,
            "version": n.version, "image": n.image, "message": n.message, "summary": build_summary(n),
            "time": n.time, "generation": n.generation, "deliveryId": n.id, "target": target}


def render_template(template: str, n: Notification, target: str) -> str:
    """The template with each ``{{placeholder}}`` replaced by its value JSON-escaped without quotes (so it belongs
    inside a JSON string; ``{{generation}}`` outside quotes is a number)."""
    fields = build_fields(n, target)

    def value(match: re.Match[str]) -> str:
        v = fields.get(match.group(1))
        return match.group(0) if v is None else json.dumps(str(v))[1:-1]

    return _PLACEHOLDER_RE.sub(value, template)


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _code(text: str) -> str:
    return "`" + _slack_escape(text.replace("`", "'")) + "`"


def build_slack(n: Notification) -> dict[str, Any]:
    """Slack's incoming-webhook document (also what Mattermost and Rocket.Chat accept): ``text`` is the fallback
    line, ``blocks`` the message; no links, everything escaped (no mentions, no markup injected by a message)."""
    icon = _SLACK_ICONS.get(n.event, "")
    head = f"{icon} *{n.event}*" + (f" ({_slack_escape(n.reason)})" if n.reason != n.event else "")
    return {
        "text": _slack_escape(f"{icon} {build_summary(n)}"),
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": (
                f"{head} {_code(f'{n.namespace}/{n.name}')} version {_code(n.version)}\n"
                f"{_slack_escape(_URL_RE.sub('[link removed]', n.message))}")}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": (
                f"image {_code(_URL_RE.sub('[link removed]', n.image))} · generation {n.generation} · {n.time}")}]},
        ],
    }


def build_payload(target: Target, n: Notification) -> bytes:
    """The request body for a target: its template rendered, else its preset (``json``: every field; ``slack``)."""
    if target.template is not None:
        return render_template(target.template, n, target.name).encode()
    doc = build_slack(n) if target.preset == "slack" else build_fields(n, target.name)
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def build_signature(key: bytes, timestamp: int, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256 over ``<timestamp>.<body>``: the timestamp is signed, so a replayed request
    is recognised by its age (receivers refuse old timestamps)."""
    return "sha256=" + hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def build_headers(n: Notification, body: bytes, key: bytes, timestamp: int, attempt: int) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        EVENT_HEADER: n.event,
        DELIVERY_HEADER: n.id,
        "Idempotency-Key": n.id,
        ATTEMPT_HEADER: str(attempt),
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: build_signature(key, timestamp, body),
    }


# ---------------------------------------------------------------------------------------------------------------
# Retries (pure)


def assess_outcome(response: Response) -> str:
    """A metric label for one attempt: ok, timeout, connection, 429, 4xx, 5xx or 3xx (redirects are not followed)."""
    if response.status is None:
        return response.error or "connection"
    if 200 <= response.status < 300:
        return "ok"
    if response.status == 429:
        return "429"
    return f"{response.status // 100}xx"


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (seconds, or an HTTP date); None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - now)


def plan_retry(response: Response, attempt: int, target: Target, jitter: float, now: float) -> float | None:
    """Seconds until the next attempt after ``attempt`` (1 = the first) got ``response``; None: stop (delivered, a
    4xx other than 429, a redirect, or the retries are spent). Timeouts, connection errors, 5xx and 429 are retried,
    ``Retry-After`` honoured (at most MAX_RETRY_AFTER); otherwise ``backoff x 2^(attempt-1)`` (at most MAX_BACKOFF),
    of which a random half (``jitter`` in [0, 1)) is waited, so that receivers coming back are not hit in step."""
    status = response.status
    retryable = status is None or status >= 500 or status == 429
    if not retryable or attempt > target.retries:
        return None
    asked = parse_retry_after(response.retry_after, now)
    if asked is not None:
        return min(asked, MAX_RETRY_AFTER)
    delay = min(MAX_BACKOFF, target.backoff * 2.0 ** (attempt - 1))
    return delay / 2 + delay / 2 * jitter


# ---------------------------------------------------------------------------------------------------------------
# Delivery (I/O)


@dataclass(frozen=True)
class Settings:
    """Operator flags (main.py): where the configuration lives and how much may wait."""

    namespace: str
    configmap: str = DEFAULT_NAME
    secret: str = DEFAULT_NAME
    refresh_seconds: float = 30.0
    queue_size: int = 1000
    concurrency: int = 16


class ConfigSource(Protocol):
    """Reads the ConfigMap's and the Secret's data (``kube.Kube``; a fake in the unit tests). None: not found."""

    async def fetch_configmap_data(self, namespace: str, name: str) -> dict[str, str] | None: ...
    async def fetch_secret_data(self, namespace: str, name: str) -> dict[str, bytes] | None: ...


Post = Callable[[str, bytes, Mapping[str, str], float], Awaitable[Response]]


@dataclass
class _Item:
    target: Target
    notification: Notification
    body: bytes
    submitted: float  # monotonic


@dataclass
class Notifier:
    """The queue, its lanes and the configuration loop of one operator process."""

    source: ConfigSource
    settings: Settings
    post: Post | None = None  # default: aiohttp (a fake in the unit tests)
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    jitter: Callable[[], float] = random.random
    config: Config = field(default_factory=Config)
    queued: int = 0
    _lanes: dict[tuple[str, str], collections.deque[_Item]] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _refresher: asyncio.Task[None] | None = None
    _session: Any = None
    _semaphore: asyncio.Semaphore | None = None
    _shown: tuple[object, ...] | None = None

    # --- configuration

    async def start(self) -> None:
        """Reads the configuration once, then re-reads it every refresh_seconds in the background."""
        await self.refresh()
        self._refresher = asyncio.create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh_seconds)
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - the loop outlives any one bad read
                logger.error("Re-reading the notification configuration failed (%s)", type(exc).__name__)

    async def refresh(self) -> None:
        """One read of the ConfigMap and the Secret; on an API error the previous configuration stays."""
        ns, s = self.settings.namespace, self.settings
        try:
            configmap = await self.source.fetch_configmap_data(ns, s.configmap)
            secret = await self.source.fetch_secret_data(ns, s.secret) if configmap is not None else None
        except Exception as exc:  # noqa: BLE001 - any failure keeps the last good configuration
            code = getattr(getattr(exc, "status", None), "code", None)
            logger.warning("Reading the notification configuration %s/%s failed (%s%s); keeping the previous one",
                           ns, s.configmap, type(exc).__name__, f" {code}" if code else "")
            return
        config = parse_config(configmap, secret)
        shown = (configmap is None, tuple((t.name, t.url, t.events, t.template, t.preset, t.timeout, t.retries,
                                          t.backoff) for t in config.targets), config.hmac_key, config.problems)
        self.config = config
        if shown == self._shown:
            return
        self._shown = shown
        if configmap is None:
            logger.info("No notification ConfigMap %s/%s: no webhook notifications", ns, s.configmap)
            return
        logger.info("Loaded the notification configuration %s/%s: %d target(s)%s", ns, s.configmap,
                    len(config.targets), f" ({', '.join(t.name for t in config.targets)})" if config.targets else "")
        for problem in config.problems:
            logger.warning("Notification configuration %s/%s: %s", ns, s.configmap, problem)

    # --- the queue

    def submit(self, n: Notification) -> None:
        """Queues ``n`` for every target selecting its event; never waits. A full queue drops (and counts)."""
        for target in self.config.targets:
            if not assess_selected(target, n.event):
                continue
            if self.queued >= self.settings.queue_size:
                metrics.NOTIFICATIONS.labels(target=target.name, event=n.event, result="dropped").inc()
                logger.warning("Dropped notification %s of %s/%s for target %s: %d waiting (the queue is full)",
                               n.event, n.namespace, n.name, target.name, self.queued)
                continue
            lane = (target.name, f"{n.namespace}/{n.name}")
            item = _Item(target, n, build_payload(target, n), time.monotonic())
            self.queued += 1
            metrics.NOTIFICATION_QUEUE.set(self.queued)
            if lane in self._lanes:
                self._lanes[lane].append(item)
                continue
            self._lanes[lane] = collections.deque([item])
            task = asyncio.create_task(self._run_lane(lane))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def submit_events(self, body: Mapping[str, Any], status: Mapping[str, Any],
                      events: Iterable[tuple[str, str, str]], now: datetime.datetime) -> None:
        """The notifications of a pass's planned events ((type, reason, message), in order)."""
        if not self.config.targets:
            return
        try:
            for type_, reason, message in events:
                n = build_notification(body, type_, reason, message, status, now, str(uuid.uuid4()))
                if n is not None:
                    self.submit(n)
        except Exception as exc:  # noqa: BLE001 - a notification must never fail the reconcile that planned it
            meta = body.get("metadata") or {}
            logger.error("Queueing notifications of %s/%s failed (%s)", meta.get("namespace"), meta.get("name"),
                         type(exc).__name__)

    async def _run_lane(self, lane: tuple[str, str]) -> None:
        queue = self._lanes[lane]
        try:
            while queue:
                try:
                    await self._deliver(queue[0])
                finally:
                    queue.popleft()
                    self.queued -= 1
                    metrics.NOTIFICATION_QUEUE.set(self.queued)
        finally:
            self._lanes.pop(lane, None)

    async def _deliver(self, item: _Item) -> None:
        n = item.notification
        attempt = 0
        while True:
            attempt += 1
            # The latest configuration of the target (a rotated URL or key applies to the next attempt).
            target = self.config.target(item.target.name) or item.target
            key = self.config.hmac_key
            if key is None:
                result, why = "failed", "no configuration any more"
                break
            headers = build_headers(n, item.body, key.reveal().encode("latin-1"), int(time.time()), attempt)
            response = await self._attempt(target, item.body, headers)
            outcome = assess_outcome(response)
            metrics.NOTIFICATION_ATTEMPTS.labels(target=target.name, outcome=outcome).inc()
            if outcome == "ok":
                result, why = "delivered", ""
                break
            delay = plan_retry(response, attempt, target, self.jitter(), time.time())
            if delay is None:
                result, why = "failed", outcome
                break
            logger.info("Notification %s of %s/%s to target %s got %s (attempt %d); retrying in %.1f s",
                        n.event, n.namespace, n.name, target.name, outcome, attempt, delay)
            await self.sleep(delay)
        metrics.NOTIFICATIONS.labels(target=item.target.name, event=n.event, result=result).inc()
        metrics.NOTIFICATION_SECONDS.labels(target=item.target.name).observe(time.monotonic() - item.submitted)
        if result == "delivered":
            logger.info("Delivered notification %s of %s/%s to target %s (attempt %d)", n.event, n.namespace, n.name,
                        item.target.name, attempt)
        else:
            logger.warning("Notification %s of %s/%s to target %s failed after %d attempt(s): %s", n.event,
                           n.namespace, n.name, item.target.name, attempt, why)

    async def _attempt(self, target: Target, body: bytes, headers: Mapping[str, str]) -> Response:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.settings.concurrency)
        async with self._semaphore:
            post = self.post or self._post_aiohttp
            try:
                return await post(target.url.reveal(), body, headers, target.timeout)
            except Exception as exc:  # noqa: BLE001 - never raise into the lane; the class only (no URL in it)
                logger.warning("Notification to target %s raised %s", target.name, type(exc).__name__)
                return Response(None, error="connection")

    async def _post_aiohttp(self, url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> Response:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(trust_env=False)
        try:
            async with self._session.post(url, data=body, headers=dict(headers), allow_redirects=False,
                                          timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                await r.content.read(64 * 1024)  # a little of the body, so that the connection is reusable
                return Response(r.status, retry_after=r.headers.get("Retry-After"))
        except TimeoutError:
            return Response(None, error="timeout")
        except (aiohttp.ClientError, OSError, ValueError):
            return Response(None, error="connection")

    async def close(self, grace: float = 5.0) -> None:
        """Stops re-reading; gives what is queued ``grace`` seconds, then cancels it."""
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._session is not None:
            await self._session.close()
