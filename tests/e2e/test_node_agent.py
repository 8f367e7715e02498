"""The e2e tier's own machinery: the node agent's image catalogue and pod reports, the attribution of requests to
pods, the load generator's parsing. Pure checks first (table-driven), then what a kubelet must report for a pod
whose image is not in the catalogue and for a container that fails, on the real cluster."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import loadgen
from tests.e2e.conftest import E2E, REPO, load_hack_module
from tests.integration.conftest import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

agent = load_hack_module("node_agent")
DIGITS = "registry.example/shipyard/digits-model"


@pytest.mark.parametrize(("reference", "repository", "tag"), [
    pytest.param(f"{DIGITS}:1.0.0", DIGITS, "1.0.0", id="tag"),
    pytest.param("localhost:5000/a/b", "localhost:5000/a/b", "latest", id="registry-port-no-tag"),
    pytest.param("localhost:5000/a/b:2", "localhost:5000/a/b", "2", id="registry-port-tag"),
    pytest.param("a/b@sha256:abc", "a/b", "sha256:abc", id="digest"),
])
def test_parse_image(reference: str, repository: str, tag: str) -> None:
    assert agent.parse_image(reference) == (repository, tag)


@pytest.mark.parametrize(("image", "env", "error"), [
    pytest.param(f"{DIGITS}:1.1.0", {}, None, id="good-tag"),
    pytest.param(f"{DIGITS}:1.2.0-bad", {"SHIPYARD_FAULT_ERROR_RATE": "0.5"}, None, id="bad-tag-fails-half"),
    pytest.param(f"{DIGITS}:1.2.0-slow", {"SHIPYARD_FAULT_EXTRA_LATENCY_MS": "300"}, None, id="slow-tag"),
    pytest.param(f"{DIGITS}:latest", None, "manifest for tag 'latest' unknown", id="unlisted-tag"),
    pytest.param("registry.example/other:1.0.0", None, "not in the local image catalogue", id="unknown-repo"),
])
def test_catalogue_maps_tags_to_behaviour(tmp_path: Path, image: str, env: dict[str, str] | None,
                                          error: str | None) -> None:
    catalogue = agent.Catalogue(REPO / "hack" / "e2e-images.yaml", tmp_path, "python")
    if error:
        with pytest.raises(agent.ImagePullError, match=error):
            catalogue.resolve(image)
        return
    resolved = catalogue.resolve(image)
    assert resolved.env == env
    assert resolved.contents == {"/models/digits": "digits"}


@pytest.mark.parametrize(("kind", "obj", "items", "files"), [
    pytest.param("configMap", {"data": {"a.json": "{}"}}, None, {"a.json": b"{}"}, id="configmap"),
    pytest.param("secret", {"data": {"k": "aGk="}}, None, {"k": b"hi"}, id="secret-base64"),
    pytest.param("configMap", {"data": {"a": "1", "b": "2"}}, [{"key": "b", "path": "sub/b.txt"}],
                 {"sub/b.txt": b"2"}, id="items"),
])
def test_projected_volume_files(kind: str, obj: dict[str, Any], items: list[dict[str, str]] | None,
                                files: dict[str, bytes]) -> None:
    assert agent.write_projection(kind, obj, items) == files


def _result(started: float, port: int, status: int = 200, version: str | None = "1") -> loadgen.Result:
    error = None if status == 200 else f"HTTP {status}: x"
    return loadgen.Result(started, started + 0.01, status, version if status == 200 else None, error, port, True)


@pytest.mark.parametrize(("result", "conntrack", "expected"), [
    pytest.param(_result(100.0, 5, 500), [{"t": 100.001, "clientPort": 5, "pod": "p-bad"}], ("p-bad", "bad"),
                 id="failed-request-by-port"),
    pytest.param(_result(100.0, 5, 500), [{"t": 40.0, "clientPort": 5, "pod": "p-old"},
                                         {"t": 100.002, "clientPort": 5, "pod": "p-bad"}], ("p-bad", "bad"),
                 id="reused-port-nearest-in-time"),
    pytest.param(_result(100.0, 5, 200, "2"), [{"t": 100.0, "clientPort": 5, "pod": "p-bad"}], ("p-bad", "2"),
                 id="version-from-the-response-first"),
    pytest.param(_result(100.0, 6, 0), [{"t": 100.0, "clientPort": 6}], (None, "no endpoint"),
                 id="no-endpoint"),
])
def test_attribute_requests_to_pods(result: loadgen.Result, conntrack: list[dict[str, Any]],
                                    expected: tuple[str | None, str]) -> None:
    from tests.e2e import test_rollout

    [(_, pod, version)] = test_rollout.attribute([result], conntrack, {"p-bad": "bad", "p-old": "old"})
    assert (pod, version) == expected


def test_parse_predictions_takes_the_argmax_per_row() -> None:
    body = {"outputs": [{"shape": [2, 3], "data": [0.1, 0.7, 0.2, 5.0, -1.0, 4.9]}]}
    assert loadgen.parse_predictions(body) == [1, 0]


# ------------------------------------------------------------------------------------------------ on the cluster


def _pod(name: str, image: str, command: list[str], restart: str = "Never") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": restart, "terminationGracePeriodSeconds": 2,
                     "automountServiceAccountToken": False,
                     "containers": [{"name": "main", "image": image, "command": command,
                                     "terminationMessagePolicy": "FallbackToLogsOnError"}]}}


def _container_state(e2e: E2E, namespace: str, name: str) -> dict[str, Any] | None:
    pod = e2e.cluster.get("pod", name, namespace)
    statuses = ((pod or {}).get("status") or {}).get("containerStatuses") or []
    return statuses[0] if statuses else None


def test_unknown_image_stays_pending_with_err_image_pull(e2e: E2E) -> None:
    namespace = "agent-pull"
    e2e.cluster.kubectl("create", "namespace", namespace)
    e2e.cluster.apply(_pod("nope", "registry.example/not-there:1.0", ["true"]), namespace)
    status = wait_until(lambda: (s := _container_state(e2e, namespace, "nope")) and "waiting" in s["state"]
                        and s["state"]["waiting"].get("reason") == "ErrImagePull" and s,
                        timeout=60, message="ErrImagePull")
    pod = e2e.cluster.get("pod", "nope", namespace)
    assert pod is not None and pod["status"]["phase"] == "Pending" and pod["spec"]["nodeName"] == "local-0"
    assert "not in the local image catalogue" in status["state"]["waiting"]["message"]
    started = time.monotonic()
    e2e.cluster.kubectl("delete", "namespace", namespace, "--timeout=60s")
    assert time.monotonic() - started < 60


def test_unsupported_volume_fails_the_pod_with_a_message(e2e: E2E) -> None:
    namespace = "agent-volume"
    e2e.cluster.kubectl("create", "namespace", namespace)
    pod = _pod("token", f"{DIGITS}:1.0.0", ["true"])
    pod["spec"]["automountServiceAccountToken"] = True  # a projected service account token volume
    e2e.cluster.apply(pod, namespace)
    status = wait_until(lambda: (s := _container_state(e2e, namespace, "token")) and "waiting" in s["state"]
                        and s["state"]["waiting"].get("reason") == "CreateContainerConfigError" and s,
                        timeout=60, message="CreateContainerConfigError")
    assert "not supported by the local node agent" in status["state"]["waiting"]["message"]


@pytest.mark.parametrize(("name", "script", "exit_code", "message"), [
    pytest.param("writes-message", "echo done > /dev/termination-log; exit 0", 0, "done", id="termination-log"),
    pytest.param("fails-with-logs", "echo boom-in-logs; exit 3", 3, "boom-in-logs", id="fallback-to-logs"),
])
def test_finished_container_reports_exit_code_and_message(e2e: E2E, name: str, script: str, exit_code: int,
                                                          message: str) -> None:
    namespace = "agent-exit"
    if e2e.cluster.get("namespace", namespace) is None:
        e2e.cluster.kubectl("create", "namespace", namespace)
    e2e.cluster.apply(_pod(name, f"{DIGITS}:1.0.0", ["sh", "-c", script]), namespace)
    status = wait_until(lambda: (s := _container_state(e2e, namespace, name)) and "terminated" in s["state"] and s,
                        timeout=120, message=f"pod {name} to finish")
    terminated = status["state"]["terminated"]
    assert terminated["exitCode"] == exit_code and message in terminated.get("message", ""), json.dumps(status)
    phase = "Succeeded" if exit_code == 0 else "Failed"
    wait_until(lambda: (e2e.cluster.get("pod", name, namespace) or {}).get("status", {}).get("phase") == phase,
               timeout=30, message=f"phase {phase}")
