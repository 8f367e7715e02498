"""Webhook notifications on the real control plane: the operator (a real `shipyard-operator` process) reads its
notification ConfigMap and Secret from its own namespace and posts a rollout's events (first version, a canary
promoted, a canary rolled back on a failing metric) to local receivers that verify every signature as
docs/notifications.md shows; a receiver that times out and answers 500 is retried and counted in the operator's
metrics while the rollout goes on at its own pace; nothing secret reaches the log, Events, status or metrics."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import Cluster, OperatorProcess, free_port, wait_until
from tests.integration.test_operator_rollout import FakePrometheus, analysis, healthy, model, wait_status
from tests.unit.test_notifications import documented_verify

pytestmark = pytest.mark.integration
TOKEN = "whk-" + uuid.uuid4().hex  # the webhook URLs' secret path segment
HMAC = "hmac-" + uuid.uuid4().hex  # the signing key
STEPS = [{"weight": 50, "pause": "1s"}]


class Receiver:
    """A webhook receiver on 127.0.0.1. ``/<TOKEN>/<name>`` records each request (name, headers, body, whether the
    signature verifies). ``flaky``: per delivery, the first attempt hangs past the target's timeout, the second gets
    500, the third 200. ``hang``: every request hangs (until the receiver closes)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()
        self.lock = threading.Lock()
        verify = documented_verify()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                name = self.path.rsplit("/", 1)[-1]
                headers = {k: v for k, v in self.headers.items()}
                with outer.lock:
                    outer.requests.append({"target": name, "path": self.path, "headers": headers, "body": body,
                                           "valid": verify(HMAC.encode(), headers, body), "at": time.monotonic()})
                    attempts = sum(1 for r in outer.requests if r["target"] == name
                                   and r["headers"].get("X-Shipyard-Delivery") == headers.get("X-Shipyard-Delivery"))
                code = 200
                if name == "hang" or (name == "flaky" and attempts == 1):
                    outer.release.wait(20)
                elif name == "flaky" and attempts == 2:
                    code = 500
                try:
                    self.send_response(code)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the operator gave up on this attempt (timeout)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/{TOKEN}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def of(self, target: str, model_name: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            got = [r for r in self.requests if r["target"] == target]
        return [r for r in got if model_name is None or model_name in r["body"].decode()]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def json_body(request: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(request["body"])
    return doc


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def system_namespace(cluster: Cluster) -> Iterator[str]:
    name = f"sys-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def notifying_operator(cluster: Cluster, system_namespace: str, receiver: Receiver,
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OperatorProcess, int]]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    port = free_port()
    op = OperatorProcess(cluster.kubeconfig, log, "--all-namespaces", "--metrics-port", str(port),
                         "--metrics-address", "127.0.0.1", "--notifications-namespace", system_namespace,
                         "--notifications-refresh-seconds", "1")
    try:
        wait_until(op.live, 30, message="the operator's liveness endpoint")
        yield op, port
    finally:
        text = op.stop()
        assert "Traceback" not in text, text[-4000:]
        assert TOKEN not in text and HMAC not in text  # never logged, whatever happened


def configure(cluster: Cluster, namespace: str, receiver: Receiver, targets: list[dict[str, Any]]) -> None:
    """The ConfigMap and the Secret (one key per target's URL, and the HMAC key) in the operator's namespace."""
    data = {t["urlKey"]: f"{receiver.base}/{t['name']}" for t in targets}
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "shipyard-notifications"},
              "data": {k: base64.b64encode(v.encode()).decode() for k, v in {**data, "hmacKey": HMAC}.items()}}
    cluster.apply(secret, namespace)
    cluster.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shipyard-notifications"},
                   "data": {"config.yaml": yaml.safe_dump({"targets": targets})}}, namespace)


def loaded(op: OperatorProcess, *names: str) -> bool:
    return f"{len(names)} target(s) ({', '.join(names)})" in op.log.read_text()


def operator_metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text: str = r.read().decode()
    return text


def sample(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.split()[-1])
    return 0.0


def story(requests: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(json_body(r)["event"], json_body(r)["version"]) for r in requests]


def test_a_rollout_and_a_rollback_are_notified_in_order_with_valid_signatures(
        cluster: Cluster, notifying_operator: tuple[OperatorProcess, int], system_namespace: str,
        receiver: Receiver, namespace: str, prometheus: FakePrometheus) -> None:
    op, port = notifying_operator
    configure(cluster, system_namespace, receiver, [
        {"name": "audit", "urlKey": "audit"},
        {"name": "chat", "urlKey": "chat", "preset": "slack", "events": ["Promoted", "RolledBack"]},
    ])
    wait_until(lambda: loaded(op, "audit", "chat"), 15, message="the operator loaded the configuration")
    prometheus.answer = lambda q: 0.4 if 'version="1.2.0"' in q else 0.0
    spec = {"rollout": {"steps": STEPS, "analysis": analysis(prometheus.address)}}

    cluster.apply(model("told", "1.0.0", **spec), namespace)
    wait_status(cluster, namespace, "told", healthy("1.0.0"), message="1.0.0 healthy")
    cluster.apply(model("told", "1.1.0", **spec), namespace)
    wait_status(cluster, namespace, "told", healthy("1.1.0"), 60, message="1.1.0 promoted")
    cluster.apply(model("told", "1.2.0", **spec), namespace)
    md = wait_status(cluster, namespace, "told", lambda m: m["status"].get("phase") == "RolledBack", 60,
                     message="1.2.0 rolled back")

    expected = [("Promoted", "1.0.0"), ("RolloutStarted", "1.1.0"), ("StepCompleted", "1.1.0"),
                ("Promoted", "1.1.0"), ("RolloutStarted", "1.2.0"), ("RolledBack", "1.2.0")]
    wait_until(lambda: story(receiver.of("audit", "told")) == expected, 15,
               message=f"the audit target's story {expected}; got {story(receiver.of('audit', 'told'))}")
    audit = receiver.of("audit", "told")
    assert all(r["valid"] for r in audit)
    assert len({r["headers"]["X-Shipyard-Delivery"] for r in audit}) == len(audit)  # one delivery each, no retry
    for r in audit:
        doc = json_body(r)
        assert r["headers"]["X-Shipyard-Event"] == doc["event"] and doc["deliveryId"] == r["headers"][
            "X-Shipyard-Delivery"]
        assert (doc["namespace"], doc["name"], doc["target"]) == (namespace, "told", "audit")
        assert doc["image"].endswith(f":{doc['version']}") and doc["generation"] >= 1
    rolled_back = json_body(audit[-1])
    assert rolled_back["reason"] == "AnalysisFailed" and rolled_back["type"] == "Warning"
    assert rolled_back["generation"] == md["metadata"]["generation"]

    wait_until(lambda: len(receiver.of("chat", "told")) == 3, 15, message="three chat messages")
    chat = receiver.of("chat", "told")
    assert all(r["valid"] for r in chat)
    assert [r["headers"]["X-Shipyard-Event"] for r in chat] == ["Promoted", "Promoted", "RolledBack"]
    assert all(set(json_body(r)) == {"text", "blocks"} for r in chat)
    assert "RolledBack" in json_body(chat[-1])["text"] and "(AnalysisFailed)" in json.dumps(json_body(chat[-1]))

    exported = operator_metrics(port)
    assert sample(exported, "shipyard_operator_notifications_total", target="audit", event="RolledBack",
                  result="delivered") >= 1
    assert sample(exported, "shipyard_operator_notifications_total", target="chat", event="Promoted",
                  result="delivered") >= 2


def test_a_failing_receiver_is_retried_and_counted_while_the_rollout_goes_on(
        cluster: Cluster, notifying_operator: tuple[OperatorProcess, int], system_namespace: str,
        receiver: Receiver, namespace: str, prometheus: FakePrometheus) -> None:
    op, port = notifying_operator
    # Changed while the operator runs: it reads the configuration again without a restart.
    configure(cluster, system_namespace, receiver, [
        {"name": "flaky", "urlKey": "flaky", "events": ["RolloutStarted", "Promoted"], "timeoutSeconds": 1,
         "retries": 3, "backoffSeconds": 0.2},
        {"name": "hang", "urlKey": "hang", "timeoutSeconds": 10, "retries": 2, "backoffSeconds": 5},
    ])
    wait_until(lambda: loaded(op, "flaky", "hang"), 15, message="the operator loaded the new configuration")
    spec = {"rollout": {"steps": STEPS, "analysis": analysis(prometheus.address)}}
    started = time.monotonic()
    cluster.apply(model("busy", "1.0.0", **spec), namespace)
    wait_status(cluster, namespace, "busy", healthy("1.0.0"), message="1.0.0 healthy")
    cluster.apply(model("busy", "1.1.0", **spec), namespace)
    wait_status(cluster, namespace, "busy", healthy("1.1.0"), 60, message="1.1.0 promoted")
    elapsed = time.monotonic() - started
    # The hanging target holds each of its deliveries for 10 + 5 + 10 + 10 + 10 s: had a reconcile waited on one, the
    # rollout (two promotions, a 1 s pause, 2 analysis samples) would have taken minutes.
    assert elapsed < 30, elapsed

    def flaky_done() -> bool:
        got = receiver.of("flaky", "busy")
        return [json_body(r)["event"] for r in got if r["headers"]["X-Shipyard-Attempt"] == "3"] == [
            "Promoted", "RolloutStarted", "Promoted"]
    wait_until(flaky_done, 60, message="every flaky delivery on its third attempt")
    flaky = receiver.of("flaky", "busy")
    by_delivery: dict[str, list[str]] = {}
    for r in flaky:
        assert r["valid"]  # every attempt is signed again (a fresh timestamp)
        by_delivery.setdefault(r["headers"]["X-Shipyard-Delivery"], []).append(r["headers"]["X-Shipyard-Attempt"])
    assert list(by_delivery.values()) == [["1", "2", "3"]] * 3
    # In order: the next event of the model waited for the retried one.
    firsts = [r for r in flaky if r["headers"]["X-Shipyard-Attempt"] == "1"]
    thirds = [r for r in flaky if r["headers"]["X-Shipyard-Attempt"] == "3"]
    assert all(third["at"] <= first["at"] for third, first in zip(thirds, firsts[1:], strict=False))
    assert len(receiver.of("hang", "busy")) >= 1
    wait_until(lambda: sample(operator_metrics(port), "shipyard_operator_notification_attempts_total", target="hang",
                              outcome="timeout") >= 1, 20, message="the hanging target's timeout counted")

    def counted() -> str | None:
        text = operator_metrics(port)
        ok = sample(text, "shipyard_operator_notifications_total", target="flaky", event="Promoted",
                    result="delivered") == 2
        return text if ok else None
    exported = wait_until(counted, 15, message="the flaky target's deliveries counted")
    assert sample(exported, "shipyard_operator_notification_attempts_total", target="flaky", outcome="timeout") == 3
    assert sample(exported, "shipyard_operator_notification_attempts_total", target="flaky", outcome="5xx") == 3
    assert sample(exported, "shipyard_operator_notification_attempts_total", target="flaky", outcome="ok") == 3
    assert sample(exported, "shipyard_operator_notification_delivery_seconds_count", target="flaky") == 3


def test_nothing_secret_reaches_events_status_or_metrics(
        cluster: Cluster, notifying_operator: tuple[OperatorProcess, int], tmp_path: Path) -> None:
    _, port = notifying_operator
    everything = [operator_metrics(port),
                  cluster.kubectl("get", "events", "-A", "-o", "json").stdout,
                  cluster.kubectl("get", "md", "-A", "-o", "json").stdout]
    for text in everything:
        assert TOKEN not in text and HMAC not in text
    # (the operator's log is checked when it stops: notifying_operator)
