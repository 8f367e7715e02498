"""Webhook notifications: configuration, event selection, payloads (template, presets), signatures, retry decisions,
and the notifier's queue (ordering per target and model, overflow counting, retries) with a fake receiver. Nothing
secret reaches a log line or a metric."""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import yaml

from shipyard.operator import notifications as nt

REPO = Path(__file__).resolve().parents[2]
KEY = b"0123456789abcdef-signing-key"
TOKEN = "tok-very-secret-77"
URL = f"https://hooks.example/services/{TOKEN}"
NOW = datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


def configmap(*targets: Mapping[str, Any]) -> dict[str, str]:
    return {nt.CONFIG_KEY: yaml.safe_dump({"targets": list(targets)})}


def secret(**urls: str) -> dict[str, bytes]:
    return {nt.HMAC_KEY: KEY, **{k: v.encode() for k, v in urls.items()}}


def notification(event: str = "RolledBack", name: str = "digits", message: str = "Rolled back",
                 id_: str = "d-1") -> nt.Notification:
    return nt.Notification(event=event, reason="AnalysisFailed" if event == "RolledBack" else event,
                           type="Warning", namespace="ml", name=name, version="1.1.0",
                           image="registry.example/digits:1.1.0", message=message, time="2025-01-02T03:04:05Z",
                           generation=7, id=id_)


def target(**overrides: Any) -> nt.Target:
    base: dict[str, Any] = {"name": "t", "url_key": "u", "url": nt.Sensitive(URL),
                            "events": frozenset(str(e) for e in nt.EVENTS)}
    return nt.Target(**{**base, **overrides})


def sample(name: str, **labels: str) -> float:
    return prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0


# --- configuration --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("targets", "data", "names", "problem"), [
    pytest.param([{"name": "a", "urlKey": "u"}], secret(u=URL), ["a"], None, id="minimal"),
    pytest.param([{"name": "a", "urlKey": "u", "preset": "slack", "events": ["Promoted"], "timeoutSeconds": 2,
                   "retries": 0, "backoffSeconds": 0.1}], secret(u=URL), ["a"], None, id="every-field"),
    pytest.param([{"name": "a", "urlKey": "u"}, {"name": "b", "urlKey": "missing"}], secret(u=URL), ["a"],
                 "target b: the Secret has no key missing", id="missing-key-leaves-out-only-that-target"),
    pytest.param([{"name": "a", "urlKey": "u"}], secret(u="ftp://x/" + TOKEN), [],
                 "the URL in the Secret's key u must be an http or https URL", id="not-http"),
    pytest.param([{"name": "A_b", "urlKey": "u"}], secret(u=URL), [], "targets[0].name must be a DNS label",
                 id="name-not-a-label"),
    pytest.param([{"name": "a", "urlKey": "u", "events": ["Deploying"]}], secret(u=URL), [],
                 "unknown event(s) Deploying", id="unknown-event"),
    pytest.param([{"name": "a", "urlKey": "u", "url": URL}], secret(u=URL), [], "unknown field(s) url",
                 id="url-in-the-configmap-refused"),
    pytest.param([{"name": "a", "urlKey": "u", "preset": "teams"}], secret(u=URL), [], "preset must be one of",
                 id="unknown-preset"),
    pytest.param([{"name": "a", "urlKey": "u", "template": '{"x": "{{nope}}"}'}], secret(u=URL), [],
                 "unknown placeholder(s) nope", id="unknown-placeholder"),
    pytest.param([{"name": "a", "urlKey": "u", "template": '{"x": {{message}}}'}], secret(u=URL), [],
                 "is not JSON once rendered", id="template-not-json"),
    pytest.param([{"name": "a", "urlKey": "u", "retries": 11}], secret(u=URL), [], "retries must be a number",
                 id="retries-out-of-range"),
    pytest.param([{"name": "a", "urlKey": "u"}, {"name": "a", "urlKey": "u"}], secret(u=URL), ["a"],
                 "the name a is used twice", id="duplicate-name"),
    pytest.param([{"name": "a", "urlKey": "u"}], {"u": URL.encode()}, [], "hmacKey is missing", id="no-hmac-key"),
    pytest.param([{"name": "a", "urlKey": "u"}], {"u": URL.encode(), nt.HMAC_KEY: b"short"}, [],
                 "shorter than 16 bytes", id="short-hmac-key"),
    pytest.param([{"name": "a", "urlKey": "u"}], None, [], "the Secret is missing", id="no-secret"),
])
def test_parse_config(targets: list[dict[str, Any]], data: dict[str, bytes] | None, names: list[str],
                      problem: str | None) -> None:
    config = nt.parse_config(configmap(*targets), data)
    assert [t.name for t in config.targets] == names
    if problem is None:
        assert config.problems == ()
    else:
        assert any(problem in p for p in config.problems), config.problems
    for p in config.problems:  # a problem names keys and targets, never a value of the Secret
        assert TOKEN not in p and KEY.decode() not in p


def test_parse_config_without_a_configmap_or_with_garbage() -> None:
    assert nt.parse_config(None, secret(u=URL)) == nt.Config()
    assert "not valid YAML" in nt.parse_config({nt.CONFIG_KEY: "targets: [\n"}, secret()).problems[0]
    assert "must be a mapping" in nt.parse_config({nt.CONFIG_KEY: "- a\n"}, secret()).problems[0]


def test_defaults_and_the_url_never_shown() -> None:
    (t,) = nt.parse_config(configmap({"name": "a", "urlKey": "u"}), secret(u=f" {URL}\n")).targets
    assert t.events == {str(e) for e in nt.EVENTS} and t.preset == "json" and t.template is None
    assert (t.timeout, t.retries, t.backoff) == (nt.DEFAULT_TIMEOUT, nt.DEFAULT_RETRIES, nt.DEFAULT_BACKOFF)
    assert t.url.reveal() == URL  # stripped of the whitespace a `kubectl create secret --from-file` may add
    assert TOKEN not in repr(t) and TOKEN not in str(t.url) and TOKEN not in f"{t}"


# --- events and payloads ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("event", "events", "selected"), [
    pytest.param("RolledBack", None, True, id="all-by-default"),
    pytest.param("RolledBack", ["RolledBack"], True, id="listed"),
    pytest.param("Promoted", ["RolledBack"], False, id="not-listed"),
])
def test_event_selection(event: str, events: list[str] | None, selected: bool) -> None:
    raw: dict[str, Any] = {"name": "a", "urlKey": "u"} | ({"events": events} if events else {})
    (t,) = nt.parse_config(configmap(raw), secret(u=URL)).targets
    assert nt.assess_selected(t, event) is selected


BODY = {"metadata": {"namespace": "ml", "name": "digits", "generation": 7},
        "spec": {"image": "registry.example/digits:1.1.0"}}
STALLED = {"conditions": [{"type": "Stalled", "status": "True", "reason": "StartupTimeout"}]}


@pytest.mark.parametrize(("event", "status", "reason"), [
    pytest.param("RolledBack", STALLED, "StartupTimeout", id="rollback-cause"),
    pytest.param("RolledBack", {}, "RolledBack", id="rollback-without-condition"),
    pytest.param("Promoted", STALLED, "Promoted", id="other-events-are-their-own-reason"),
])
def test_build_notification_reason(event: str, status: dict[str, Any], reason: str) -> None:
    n = nt.build_notification(BODY, "Warning", event, "m", status, NOW, "id")
    assert n is not None and n.reason == reason
    assert (n.namespace, n.name, n.version, n.generation, n.time) == ("ml", "digits", "1.1.0", 7,
                                                                       "2025-01-02T03:04:05Z")


@pytest.mark.parametrize("event", ["Deploying", "StepReady", "Compressed", "Degraded", "ManualStep"])
def test_events_outside_the_six_are_not_notified(event: str) -> None:
    assert nt.build_notification(BODY, "Normal", event, "m", {}, NOW, "id") is None


def test_message_is_redacted_and_summary_link_free() -> None:
    n = nt.build_notification(BODY, "Warning", "RolledBack", "could not fetch http://admin:s3cret@prom:9090/q",
                              {}, NOW, "id")
    assert n is not None and "s3cret" not in n.message and "REDACTED@prom" in n.message
    assert "://" not in nt.build_summary(n) and "[link removed]" in nt.build_summary(n)


def test_template_renders_escaped_values_and_numbers() -> None:
    template = ('{"e": "{{event}}", "why": "{{ reason }}", "m": "{{message}}", "g": {{generation}}, '
                '"id": "{{deliveryId}}"}')
    n = notification(message='say "hi"\nand \\ go </script>')
    doc = json.loads(nt.build_payload(target(template=template), n))
    assert doc == {"e": "RolledBack", "why": "AnalysisFailed", "m": 'say "hi"\nand \\ go </script>', "g": 7,
                   "id": "d-1"}


def test_json_preset_has_every_placeholder() -> None:
    doc = json.loads(nt.build_payload(target(), notification()))
    assert set(doc) == set(nt.PLACEHOLDERS)
    assert doc["target"] == "t" and doc["generation"] == 7 and doc["summary"].startswith("RolledBack: ml/digits 1.1.0")


def test_slack_preset_is_escaped_and_link_free() -> None:
    n = notification(message="<!channel> see http://grafana/d/x?token=abc & more")
    doc = json.loads(nt.build_payload(target(preset="slack"), n))
    assert set(doc) == {"text", "blocks"}
    assert [b["type"] for b in doc["blocks"]] == ["section", "context"]
    text = json.dumps(doc)
    assert "<!channel>" not in text and "&lt;!channel&gt;" in text and "&amp; more" in text
    assert "http://" not in text and "token=abc" not in text and "[link removed]" in text
    section = doc["blocks"][0]["text"]["text"]
    assert "*RolledBack* (AnalysisFailed)" in section and "`ml/digits`" in section and "`1.1.0`" in section


# --- signature -------------------------------------------------------------------------------------------------

def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"a":1}'
    expected = hmac.new(KEY, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert nt.build_signature(KEY, 1700000000, body) == f"sha256={expected}"
    headers = nt.build_headers(notification(), body, KEY, 1700000000, 2)
    assert headers[nt.SIGNATURE_HEADER] == f"sha256={expected}" and headers[nt.TIMESTAMP_HEADER] == "1700000000"
    assert headers[nt.EVENT_HEADER] == "RolledBack" and headers[nt.DELIVERY_HEADER] == headers["Idempotency-Key"]
    assert headers[nt.ATTEMPT_HEADER] == "2"


def documented_verify() -> Any:
    """The receiver's check as docs/notifications.md shows it (so the page's code is the tested code)."""
    doc = (REPO / "docs" / "notifications.md").read_text()
    match = re.search(r"<!-- verify-snippet[^>]*-->\n```python\n(.*?)```", doc, re.DOTALL)
    assert match, "docs/notifications.md lost its verification snippet"
    scope: dict[str, Any] = {}
    exec(match.group(1), scope)  # noqa: S102 - our own documentation
    return scope["verify"]


@pytest.mark.parametrize(("change", "valid"), [
    pytest.param({}, True, id="authentic"),
    pytest.param({"body": b'{"event":"Promoted"} '}, False, id="body-changed"),
    pytest.param({"timestamp_shift": 1}, False, id="timestamp-changed-after-signing"),
    pytest.param({"age": 3600}, False, id="replayed-an-hour-later"),
    pytest.param({"key": b"another-key-of-16-bytes"}, False, id="wrong-key"),
])
def test_documented_receiver_check(change: dict[str, Any], valid: bool) -> None:
    verify = documented_verify()
    body = b'{"event":"Promoted"}'
    sent = int(time.time()) - change.get("age", 0)
    headers = nt.build_headers(notification("Promoted"), body, KEY, sent, 1)
    headers[nt.TIMESTAMP_HEADER] = str(sent + change.get("timestamp_shift", 0))
    assert verify(change.get("key", KEY), headers, change.get("body", body)) is valid


# --- retries ---------------------------------------------------------------------------------------------------

HTTP_DATE = email.utils.format_datetime(datetime.datetime.fromtimestamp(1000 + 42, datetime.UTC), usegmt=True)


@pytest.mark.parametrize(("response", "attempt", "jitter", "delay"), [
    pytest.param(nt.Response(200), 1, 0.5, None, id="delivered"),
    pytest.param(nt.Response(204), 1, 0.5, None, id="delivered-204"),
    pytest.param(nt.Response(500), 1, 0.0, 0.5, id="5xx-first-retry-half-of-backoff"),
    pytest.param(nt.Response(502), 1, 0.999999, 1.0, id="5xx-jitter-up-to-the-whole"),
    pytest.param(nt.Response(503), 3, 0.0, 2.0, id="5xx-exponential"),
    pytest.param(nt.Response(None, error="timeout"), 2, 0.0, 1.0, id="timeout"),
    pytest.param(nt.Response(None, error="connection"), 2, 1.0, 2.0, id="connection-error"),
    pytest.param(nt.Response(429, retry_after="7"), 1, 0.5, 7.0, id="429-retry-after-seconds"),
    pytest.param(nt.Response(429, retry_after=HTTP_DATE), 1, 0.5, 42.0, id="429-retry-after-date"),
    pytest.param(nt.Response(503, retry_after="9"), 1, 0.5, 9.0, id="503-retry-after"),
    pytest.param(nt.Response(429, retry_after="86400"), 1, 0.5, nt.MAX_RETRY_AFTER, id="retry-after-capped"),
    pytest.param(nt.Response(429, retry_after="soon"), 1, 0.0, 0.5, id="unreadable-retry-after-backs-off"),
    pytest.param(nt.Response(429), 1, 0.0, 0.5, id="429-without-retry-after"),
    pytest.param(nt.Response(400), 1, 0.5, None, id="400-not-retried"),
    pytest.param(nt.Response(401), 1, 0.5, None, id="401-not-retried"),
    pytest.param(nt.Response(404), 1, 0.5, None, id="404-not-retried"),
    pytest.param(nt.Response(408), 1, 0.5, None, id="other-4xx-not-retried"),
    pytest.param(nt.Response(302), 1, 0.5, None, id="redirect-not-followed-nor-retried"),
    pytest.param(nt.Response(500), 4, 0.5, None, id="retries-spent"),
    pytest.param(nt.Response(500), 3, 0.0, 2.0, id="last-retry"),
])
def test_plan_retry(response: nt.Response, attempt: int, jitter: float, delay: float | None) -> None:
    got = nt.plan_retry(response, attempt, target(retries=3, backoff=1.0), jitter, now=1000.0)
    assert got == pytest.approx(delay) if delay is not None else got is None


def test_backoff_is_capped() -> None:
    assert nt.plan_retry(nt.Response(500), 10, target(retries=10, backoff=1.0), 0.999999, 0) == pytest.approx(
        nt.MAX_BACKOFF)


@pytest.mark.parametrize(("response", "outcome"), [
    (nt.Response(200), "ok"), (nt.Response(201), "ok"), (nt.Response(301), "3xx"), (nt.Response(404), "4xx"),
    (nt.Response(429), "429"), (nt.Response(500), "5xx"), (nt.Response(None, error="timeout"), "timeout"),
    (nt.Response(None, error="connection"), "connection"),
])
def test_assess_outcome(response: nt.Response, outcome: str) -> None:
    assert nt.assess_outcome(response) == outcome


# --- the notifier ----------------------------------------------------------------------------------------------

class FakeSource:
    def __init__(self, cm: dict[str, str] | None, data: dict[str, bytes] | None) -> None:
        self.cm, self.data = cm, data
        self.fail: Exception | None = None

    async def fetch_configmap_data(self, namespace: str, name: str) -> dict[str, str] | None:
        if self.fail:
            raise self.fail
        return self.cm

    async def fetch_secret_data(self, namespace: str, name: str) -> dict[str, bytes] | None:
        return self.data


class FakeReceiver:
    """Answers from a script of responses per request (then 200); records (url, event, delivery, attempt)."""

    def __init__(self, script: list[nt.Response] | None = None) -> None:
        self.script = list(script or [])
        self.got: list[tuple[str, str, str, str]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def post(self, url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> nt.Response:
        await self.gate.wait()
        ts = headers[nt.TIMESTAMP_HEADER]
        assert headers[nt.SIGNATURE_HEADER] == nt.build_signature(KEY, int(ts), body)
        self.got.append((url, json.loads(body)["event"], headers[nt.DELIVERY_HEADER], headers[nt.ATTEMPT_HEADER]))
        return self.script.pop(0) if self.script else nt.Response(200)


def notifier(receiver: FakeReceiver, *targets: Mapping[str, Any], queue: int = 100,
             **urls: str) -> tuple[nt.Notifier, list[float]]:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    source = FakeSource(configmap(*targets), secret(**urls))
    n = nt.Notifier(source, nt.Settings(namespace="sys", queue_size=queue), post=receiver.post, sleep=sleep,
                    jitter=lambda: 0.0)
    return n, slept


async def drain(n: nt.Notifier) -> None:
    await n.close(grace=5)


async def test_retries_keep_the_order_of_one_models_events_and_count_the_attempts() -> None:
    receiver = FakeReceiver([nt.Response(500), nt.Response(None, error="timeout"),
                             nt.Response(429, retry_after="3")])
    n, slept = notifier(receiver, {"name": "order", "urlKey": "u", "backoffSeconds": 1}, u=URL)
    await n.refresh()
    before = sample("shipyard_operator_notification_attempts_total", target="order", outcome="5xx")
    for i, event in enumerate(["RolloutStarted", "StepCompleted", "Promoted"]):
        n.submit(notification(event, id_=f"id-{i}"))
    assert n.queued == 3  # submitted without waiting
    await drain(n)
    assert [(e, d, a) for _, e, d, a in receiver.got] == [
        ("RolloutStarted", "id-0", "1"), ("RolloutStarted", "id-0", "2"), ("RolloutStarted", "id-0", "3"),
        ("RolloutStarted", "id-0", "4"), ("StepCompleted", "id-1", "1"), ("Promoted", "id-2", "1")]
    assert slept == [0.5, 1.0, 3.0]  # backoff (half, no jitter), doubled, then the receiver's Retry-After
    assert n.queued == 0
    assert sample("shipyard_operator_notification_attempts_total", target="order", outcome="5xx") == before + 1
    assert sample("shipyard_operator_notifications_total", target="order", event="Promoted",
                  result="delivered") >= 1


async def test_a_4xx_is_not_retried_and_counted_failed() -> None:
    receiver = FakeReceiver([nt.Response(404)])
    n, slept = notifier(receiver, {"name": "gone", "urlKey": "u"}, u=URL)
    await n.refresh()
    before = sample("shipyard_operator_notifications_total", target="gone", event="RolledBack", result="failed")
    n.submit(notification("RolledBack"))
    await drain(n)
    assert len(receiver.got) == 1 and slept == []
    assert sample("shipyard_operator_notifications_total", target="gone", event="RolledBack",
                  result="failed") == before + 1


async def test_retries_are_spent_then_failed() -> None:
    receiver = FakeReceiver([nt.Response(503)] * 5)
    n, slept = notifier(receiver, {"name": "down", "urlKey": "u", "retries": 2}, u=URL)
    await n.refresh()
    n.submit(notification("Promoted"))
    await drain(n)
    assert len(receiver.got) == 3 and len(slept) == 2
    assert sample("shipyard_operator_notifications_total", target="down", event="Promoted", result="failed") >= 1


async def test_a_full_queue_drops_and_counts_without_waiting() -> None:
    receiver = FakeReceiver()
    receiver.gate.clear()  # the receiver hangs: nothing leaves the queue
    n, _ = notifier(receiver, {"name": "full", "urlKey": "u"}, queue=2, u=URL)
    await n.refresh()
    before = sample("shipyard_operator_notifications_total", target="full", event="StepCompleted", result="dropped")
    started = time.monotonic()
    for i in range(5):
        n.submit(notification("StepCompleted", name=f"m{i}"))
    assert time.monotonic() - started < 0.5
    assert n.queued == 2
    assert sample("shipyard_operator_notifications_total", target="full", event="StepCompleted",
                  result="dropped") == before + 3
    assert sample("shipyard_operator_notification_queue") == 2
    receiver.gate.set()
    await drain(n)
    assert sorted(e for _, e, _, _ in receiver.got) == ["StepCompleted"] * 2


async def test_lanes_of_different_models_and_targets_do_not_wait_on_each_other() -> None:
    slow = FakeReceiver()
    n, _ = notifier(slow, {"name": "a", "urlKey": "ua"}, {"name": "b", "urlKey": "ub", "events": ["Promoted"]},
                    ua=URL + "/a", ub=URL + "/b")
    await n.refresh()
    slow.gate.clear()
    n.submit(notification("Promoted", name="m1"))
    n.submit(notification("RolledBack", name="m2"))
    assert len(n._lanes) == 3  # (a, m1), (b, m1), (a, m2): in flight together
    slow.gate.set()
    await drain(n)
    assert sorted((u.rsplit("/", 1)[1], e) for u, e, _, _ in slow.got) == [
        ("a", "Promoted"), ("a", "RolledBack"), ("b", "Promoted")]


async def test_configuration_changes_apply_and_an_api_error_keeps_the_last_good_one() -> None:
    receiver = FakeReceiver()
    n, _ = notifier(receiver, {"name": "one", "urlKey": "u"}, u=URL)
    await n.refresh()
    assert [t.name for t in n.config.targets] == ["one"]
    source = n.source
    assert isinstance(source, FakeSource)
    source.cm = configmap({"name": "two", "urlKey": "u", "events": ["Promoted"]})
    await n.refresh()
    assert [t.name for t in n.config.targets] == ["two"]
    source.fail = RuntimeError("apiserver down")
    await n.refresh()
    assert [t.name for t in n.config.targets] == ["two"]
    source.fail, source.cm = None, None
    await n.refresh()
    assert n.config.targets == ()
    n.submit(notification("Promoted"))
    assert n.queued == 0


async def test_submit_events_notifies_only_the_six_in_order() -> None:
    receiver = FakeReceiver()
    n, _ = notifier(receiver, {"name": "story", "urlKey": "u"}, u=URL)
    await n.refresh()
    n.submit_events(BODY, {}, [("Normal", "Deploying", "x"), ("Normal", "RolloutStarted", "y"),
                               ("Normal", "StepReady", "z"), ("Normal", "StepCompleted", "w")], NOW)
    await drain(n)
    assert [e for _, e, _, _ in receiver.got] == ["RolloutStarted", "StepCompleted"]


async def test_nothing_secret_in_logs_or_metrics(caplog: pytest.LogCaptureFixture) -> None:
    """Every path that logs (config problems, retries, failures, a client raising with the URL in its message)."""

    class Leaky(FakeReceiver):
        async def post(self, url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> nt.Response:
            if not self.got:
                self.got.append(("", "", "", ""))
                raise ValueError(f"cannot reach {url} with {headers[nt.SIGNATURE_HEADER]}")
            return nt.Response(500)

    caplog.set_level(logging.DEBUG)
    receiver = Leaky()
    n, _ = notifier(receiver, {"name": "leak", "urlKey": "u", "retries": 2},
                    {"name": "bad", "urlKey": "v"}, u=URL, v="gopher://" + TOKEN)
    await n.refresh()
    n.submit(notification("RolledBack", message="x"))
    await drain(n)
    assert "Notification configuration sys/shipyard-notifications: target bad" in caplog.text
    assert "raised ValueError" in caplog.text and "failed after 3 attempt(s): 5xx" in caplog.text
    exported = prometheus_client.generate_latest().decode()
    for text in (caplog.text, exported, repr(n.config)):
        assert TOKEN not in text and KEY.decode() not in text and "hooks.example" not in text


# --- the hook in the reconcile (handlers.reconcile) ------------------------------------------------------------

def _operator_with_notifier(receiver: FakeReceiver) -> tuple[Any, nt.Notifier]:
    from shipyard.operator import handlers, providers
    from tests.unit.test_handlers import FakeKube, model

    kube = FakeKube()
    op = handlers.Operator(kube=kube, providers=providers.Providers())
    kube.models = op.caches.models
    op.caches.models["ml/digits"] = model()
    n, _ = notifier(receiver, {"name": "hook", "urlKey": "u"}, u=URL)
    op.notifier = n
    return op, n


def _make_ready(op: Any) -> None:
    """The first version's Deployment became available (what the watch would bring)."""
    (dep,) = op.caches.children["ml/digits"]["Deployment"].values()
    dep["metadata"]["generation"] = 1
    dep["status"] = {"observedGeneration": 1, "replicas": 2, "readyReplicas": 2, "availableReplicas": 2,
                     "updatedReplicas": 2}


async def test_a_reconcile_queues_its_notified_events_without_waiting_for_the_receiver() -> None:
    from shipyard.operator import handlers

    receiver = FakeReceiver()
    receiver.gate.clear()  # the receiver never answers while the passes run
    op, n = _operator_with_notifier(receiver)
    await n.refresh()
    await handlers.reconcile(op, "ml/digits")  # Deploying: an Event, not a notification
    assert n.queued == 0
    _make_ready(op)
    await handlers.reconcile(op, "ml/digits")
    assert op.caches.models["ml/digits"]["status"]["stableVersion"] == "1.0.0"
    assert n.queued == 1  # Promoted, waiting on the receiver: the pass did not
    receiver.gate.set()
    await drain(n)
    assert [e for _, e, _, _ in receiver.got] == ["Promoted"]


async def test_a_failing_notifier_never_fails_the_reconcile(monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    from shipyard.operator import handlers

    def boom(target: nt.Target, n: nt.Notification) -> bytes:
        raise RuntimeError(URL)

    monkeypatch.setattr(nt, "build_payload", boom)
    op, n = _operator_with_notifier(FakeReceiver())
    await n.refresh()
    await handlers.reconcile(op, "ml/digits")
    _make_ready(op)
    await handlers.reconcile(op, "ml/digits")
    assert op.caches.models["ml/digits"]["status"]["stableVersion"] == "1.0.0"
    assert "Queueing notifications of ml/digits failed (RuntimeError)" in caplog.text and TOKEN not in caplog.text
    await drain(n)
