"""The e2e node agent's pure parts (hack/node_agent.py): image references, the local image catalogue's tags, the
files of configMap and secret volumes, Services' virtual IPs and pods' hosts files, what it reports of a pod (its
phase, its init containers' progress, container statuses), and a container's env as the kubelet builds it (envFrom,
secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef, $(VAR) expansion, the kubelet's messages), the pod network's
layout, address queue, names and overlap check, and configMap/secret files replaced whole. What it does
with real pods is the harness tier's (tests/harness/test_node_agent.py)."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from typing import Any

import pytest

from tests import stack

agent = stack.load_hack_module("node_agent")
DIGITS = "registry.example/shipyard/digits-model"


@pytest.mark.parametrize(("reference", "repository", "tag"), [
    pytest.param(f"{DIGITS}:1.0.0", DIGITS, "1.0.0", id="tag"),
    pytest.param("localhost:5000/a/b", "localhost:5000/a/b", "latest", id="registry-port-no-tag"),
    pytest.param("localhost:5000/a/b:2", "localhost:5000/a/b", "2", id="registry-port-tag"),
    pytest.param("a/b@sha256:abc", "a/b", "sha256:abc", id="digest"),
])
def test_parse_image(reference: str, repository: str, tag: str) -> None:
    assert agent.parse_image(reference) == (repository, tag)


MODEL = {"/models/digits": "digits"}


@pytest.mark.parametrize(("image", "env", "contents", "error"), [
    pytest.param(f"{DIGITS}:1.1.0", {}, MODEL, None, id="good-tag"),
    pytest.param(f"{DIGITS}:1.2.0-bad", {"SHIPYARD_FAULT_ERROR_RATE": "0.5"}, MODEL, None, id="bad-tag-fails-half"),
    pytest.param(f"{DIGITS}:1.2.0-slow", {"SHIPYARD_FAULT_EXTRA_LATENCY_MS": "300"}, MODEL, None, id="slow-tag"),
    pytest.param(f"{DIGITS}:1.2.0-inaccurate", {}, {"/models/digits": "digits-inaccurate"}, None,
                 id="inaccurate-tag-ships-another-model"),
    pytest.param(f"{DIGITS}:latest", None, None, "manifest for tag 'latest' unknown", id="unlisted-tag"),
    pytest.param("registry.example/other:1.0.0", None, None, "not in the local image catalogue", id="unknown-repo"),
])
def test_catalogue_maps_tags_to_behaviour(tmp_path: Path, image: str, env: dict[str, str] | None,
                                          contents: dict[str, str] | None, error: str | None) -> None:
    catalogue = agent.Catalogue(stack.REPO / "hack" / "e2e-images.yaml", tmp_path, "python")
    if error:
        with pytest.raises(agent.ImagePullError, match=error):
            catalogue.resolve(image)
        return
    resolved = catalogue.resolve(image)
    assert resolved.env == env
    assert resolved.contents == contents
    assert set(resolved.contents.values()) <= set(catalogue.builds)  # every build it names exists


@pytest.mark.parametrize(("kind", "obj", "items", "files"), [
    pytest.param("configMap", {"data": {"a.json": "{}"}}, None, {"a.json": b"{}"}, id="configmap"),
    pytest.param("secret", {"data": {"k": "aGk="}}, None, {"k": b"hi"}, id="secret-base64"),
    pytest.param("configMap", {"data": {"a": "1", "b": "2"}}, [{"key": "b", "path": "sub/b.txt"}],
                 {"sub/b.txt": b"2"}, id="items"),
])
def test_projected_volume_files(kind: str, obj: dict[str, Any], items: list[dict[str, str]] | None,
                                files: dict[str, bytes]) -> None:
    assert agent.write_projection(kind, obj, items) == files


# ------------------------------------------------------------------------------------- Services' virtual IPs


def _replay(pool: Any, steps: list[tuple[str, str, str | None]]) -> list[str]:
    """Runs ("assign", key, ip) / ("release", key, None) steps on a pool; returns the candidates of the last key."""
    for op, key, ip in steps:
        pool.assign(key, ip) if op == "assign" else pool.release(key)
    return list(pool.candidates(steps[-1][1]))[:3] if steps else list(pool.candidates("x/y"))[:3]


@pytest.mark.parametrize(("steps", "held", "candidates"), [
    pytest.param([], {}, ["127.0.254.1", "127.0.254.2", "127.0.254.3"], id="fresh-pool-offers-the-lowest"),
    pytest.param([("assign", "ns/a", "127.0.254.1")], {"ns/a": "127.0.254.1"},
                 ["127.0.254.1", "127.0.254.2", "127.0.254.3"], id="a-service-keeps-its-own-first"),
    pytest.param([("assign", "ns/a", "127.0.254.1"), ("assign", "ns/b", "127.0.254.2")],
                 {"ns/a": "127.0.254.1", "ns/b": "127.0.254.2"}, ["127.0.254.2", "127.0.254.3", "127.0.254.4"],
                 id="held-addresses-are-not-offered-to-others"),
    pytest.param([("assign", "ns/a", "127.0.254.1"), ("release", "ns/a", None)], {},
                 ["127.0.254.2", "127.0.254.3", "127.0.254.4"], id="released-goes-to-the-back"),
    pytest.param([("assign", "ns/a", "127.0.254.1"), ("assign", "ns/a", "127.0.254.5")], {"ns/a": "127.0.254.5"},
                 ["127.0.254.5", "127.0.254.2", "127.0.254.3"], id="moving-frees-the-old-address"),
    pytest.param([("release", "ns/never", None)], {}, ["127.0.254.1", "127.0.254.2", "127.0.254.3"],
                 id="releasing-an-unknown-service-is-a-no-op"),
])
def test_service_ip_pool(steps: list[tuple[str, str, str | None]], held: dict[str, str],
                         candidates: list[str]) -> None:
    pool = agent.ServiceIPPool("127.0.254")
    assert _replay(pool, steps) == candidates
    assert pool.held == held
    assert len(pool.free) + len(pool.held) == 254  # every address is free or held, once
    if any(op == "release" and key == "ns/a" for op, key, _ in steps):
        assert pool.free[-1] == "127.0.254.1"  # no quick reuse


@pytest.mark.parametrize(("prefix", "error"), [
    pytest.param("10.0.0", "must be loopback", id="not-loopback"),
    pytest.param("127.1.2", None, id="any-loopback-range"),
])
def test_service_ip_pool_stays_on_loopback(prefix: str, error: str | None) -> None:
    if error:
        with pytest.raises(ValueError, match=error):
            agent.ServiceIPPool(prefix)
    else:
        assert agent.ServiceIPPool(prefix).candidates("ns/a")[0] == f"{prefix}.1"


def test_service_ip_pool_refuses_an_address_it_does_not_offer() -> None:
    pool = agent.ServiceIPPool("127.0.254")
    pool.assign("ns/a", "127.0.254.1")
    with pytest.raises(ValueError, match="not a free service IP"):
        pool.assign("ns/b", "127.0.254.1")


@pytest.mark.parametrize(("namespace", "key", "names"), [
    pytest.param("ml", "ml/digits", ["digits.ml.svc.cluster.local", "digits.ml.svc", "digits.ml", "digits"],
                 id="same-namespace-short-name-too"),
    pytest.param("other", "ml/digits", ["digits.ml.svc.cluster.local", "digits.ml.svc", "digits.ml"],
                 id="other-namespace-qualified-only"),
    pytest.param("ml", "ml/digits-1-1-0", ["digits-1-1-0.ml.svc.cluster.local", "digits-1-1-0.ml.svc",
                                          "digits-1-1-0.ml", "digits-1-1-0"], id="version-service"),
])
def test_service_hostnames(namespace: str, key: str, names: list[str]) -> None:
    assert agent.build_service_hostnames(namespace, key) == names


HEADER = "# Kubernetes-managed hosts file"


@pytest.mark.parametrize(("services", "node_hosts", "expected"), [
    pytest.param({}, "", ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
                          "127.0.11.5\tpod-a"], id="no-services"),
    pytest.param({"ml/digits": "127.0.254.1", "ml/digits-1-1-0": "127.0.254.2", "other/db": "127.0.254.3"}, "",
                 ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", "127.0.11.5\tpod-a",
                  "127.0.254.1\tdigits.ml.svc.cluster.local digits.ml.svc digits.ml digits",
                  "127.0.254.2\tdigits-1-1-0.ml.svc.cluster.local digits-1-1-0.ml.svc digits-1-1-0.ml digits-1-1-0",
                  "127.0.254.3\tdb.other.svc.cluster.local db.other.svc db.other"], id="services-sorted"),
    pytest.param({"ml/digits": "127.0.254.1"}, "# comment\n127.0.0.1 localhost vm\n\n10.1.2.3 registry\n",
                 ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", "127.0.11.5\tpod-a",
                  "127.0.254.1\tdigits.ml.svc.cluster.local digits.ml.svc digits.ml digits",
                  "127.0.0.1 localhost vm", "10.1.2.3 registry"], id="node-hosts-last-without-comments"),
])
def test_hosts_file(services: dict[str, str], node_hosts: str, expected: list[str]) -> None:
    text = agent.build_hosts_file("ml", "pod-a", "127.0.11.5", services, node_hosts)
    assert text.startswith(HEADER) and text.endswith("\n")
    assert [line for line in text.splitlines() if not line.startswith("#")] == expected


@pytest.mark.parametrize(("before", "after"), [
    pytest.param("", "127.0.254.1\ta\n", id="creates"),
    pytest.param("127.0.254.1\ta-long-name\n127.0.254.2\tb\n", "127.0.254.2\tb\n", id="shrinks"),
    pytest.param("x\n", "127.0.254.1\ta\n127.0.254.2\tb\n", id="grows"),
])
def test_write_in_place_keeps_the_inode(tmp_path: Path, before: str, after: str) -> None:
    path = tmp_path / "hosts"
    if before:
        path.write_text(before)
    inode = path.stat().st_ino if before else None
    agent.write_in_place(path, after)
    assert path.read_text() == after
    if inode is not None:
        assert path.stat().st_ino == inode  # a bind mount of the file sees the new content


@pytest.mark.parametrize(("text", "env", "expected"), [
    ("--host=$(POD_IP)", {"POD_IP": "127.0.11.3"}, "--host=127.0.11.3"),
    ("http://$(POD_IP):$(PORT)", {"POD_IP": "127.0.11.3", "PORT": "8080"}, "http://127.0.11.3:8080"),
    ("$(UNDEFINED) stays", {}, "$(UNDEFINED) stays"),
    ("$$(POD_IP) is escaped", {"POD_IP": "x"}, "$(POD_IP) is escaped"),
    ("cost $$5", {}, "cost $5"),
    ("no reference", {"A": "b"}, "no reference"),
])
def test_expansion_as_the_kubelet_does_it(text: str, env: dict[str, str], expected: str) -> None:
    assert agent._expand(text, env) == expected


@pytest.mark.parametrize(("container", "entrypoint", "cmd", "argv"), [
    ({"command": ["serve"], "args": ["--port", "1"]}, ("ep",), ("c",), ["serve", "--port", "1"]),
    ({"command": ["serve"]}, ("ep",), ("c",), ["serve"]),  # a command drops the image's CMD
    ({"args": ["--x"]}, ("ep", "-a"), ("c",), ["ep", "-a", "--x"]),  # args replace CMD
    ({}, ("ep",), ("c", "d"), ["ep", "c", "d"]),
    ({}, (), (), []),
])
def test_argv_from_command_args_and_the_image(container: dict[str, Any], entrypoint: tuple[str, ...],
                                              cmd: tuple[str, ...], argv: list[str]) -> None:
    image = agent.Image("r/i:1", {}, {}, "r/i@sha256:0", entrypoint, cmd)
    assert agent.build_argv(container, image) == argv


# ------------------------------------------------------------------------------------- pod and container status

STARTED = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
COMPLETED = {"terminated": {"exitCode": 0, "reason": "Completed", "message": '{"bytes": 12}',
                            "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:00:01Z"}}
DENIED = {"terminated": {"exitCode": 3, "reason": "Error", "message": "access denied (403) to s3://b/k",
                         "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:00:01Z"}}
INITIALIZING = {"waiting": {"reason": "PodInitializing"}}
BACKING_OFF = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s restarting failed container=fetch"}}


def _run(name: str, state: dict[str, Any], last_state: dict[str, Any] | None = None, restarts: int = 0,
         ready: bool = False) -> Any:
    return agent.ContainerRun(spec={"name": name, "image": f"{DIGITS}:1.0.0"}, name=name, state=state,
                              last_state=last_state or {}, restart_count=restarts, ready=ready)


@pytest.mark.parametrize(("policy", "init", "containers", "phase"), [
    pytest.param("Always", [], [STARTED], "Running", id="no-init-running"),
    pytest.param("Never", [], [COMPLETED], "Succeeded", id="no-init-succeeded"),
    pytest.param("Never", [], [DENIED], "Failed", id="no-init-failed"),
    pytest.param("OnFailure", [], [DENIED], "Running", id="no-init-on-failure-restarts"),
    pytest.param("Always", [INITIALIZING], [INITIALIZING], "Pending", id="init-not-started"),
    pytest.param("Always", [STARTED, INITIALIZING], [INITIALIZING], "Pending", id="init-running"),
    pytest.param("Always", [COMPLETED, STARTED], [INITIALIZING], "Pending", id="second-init-running"),
    pytest.param("Always", [DENIED], [INITIALIZING], "Pending", id="init-failed-will-restart"),
    pytest.param("Always", [BACKING_OFF], [INITIALIZING], "Pending", id="init-backing-off"),
    pytest.param("OnFailure", [BACKING_OFF], [INITIALIZING], "Pending", id="init-backing-off-on-failure"),
    pytest.param("Never", [DENIED], [INITIALIZING], "Failed", id="init-failed-never"),
    pytest.param("Never", [COMPLETED, DENIED], [INITIALIZING], "Failed", id="second-init-failed-never"),
    pytest.param("Never", [STARTED], [INITIALIZING], "Pending", id="init-running-never"),
    pytest.param("Always", [COMPLETED, COMPLETED], [INITIALIZING], "Pending", id="initialized-not-yet-started"),
    pytest.param("Always", [COMPLETED, COMPLETED], [STARTED], "Running", id="initialized-running"),
    pytest.param("Never", [COMPLETED], [COMPLETED], "Succeeded", id="initialized-succeeded"),
])
def test_pod_phase(policy: str, init: list[dict[str, Any]], containers: list[dict[str, Any]], phase: str) -> None:
    init_runs = [_run(f"init-{i}", s) for i, s in enumerate(init)]
    runs = [_run(f"c-{i}", s) for i, s in enumerate(containers)]
    assert agent.build_phase(policy, init_runs, runs) == phase


def test_init_failure_waiting_to_restart_counts_as_failed_under_never() -> None:
    """What a kubelet's getPhase reads: a waiting init container whose last run failed."""
    run = _run("fetch", INITIALIZING, last_state=DENIED, restarts=1)
    assert agent.build_phase("Never", [run], [_run("main", INITIALIZING)]) == "Failed"
    assert agent.build_phase("Always", [run], [_run("main", INITIALIZING)]) == "Pending"


@pytest.mark.parametrize(("init", "incomplete"), [
    pytest.param([], [], id="no-init-containers"),
    pytest.param([INITIALIZING, INITIALIZING], ["init-0", "init-1"], id="none-ran"),
    pytest.param([COMPLETED, STARTED], ["init-1"], id="first-completed"),
    pytest.param([DENIED], ["init-0"], id="failed"),
    pytest.param([BACKING_OFF], ["init-0"], id="backing-off"),
    pytest.param([COMPLETED, COMPLETED], [], id="all-completed"),
])
def test_incomplete_init_containers(init: list[dict[str, Any]], incomplete: list[str]) -> None:
    assert agent.build_incomplete_init([_run(f"init-{i}", s) for i, s in enumerate(init)]) == incomplete


@pytest.mark.parametrize(("run", "init", "expected"), [
    pytest.param(_run("fetch", INITIALIZING), True,
                 {"ready": False, "started": False, "restartCount": 0, "state": INITIALIZING, "lastState": {}},
                 id="init-waiting"),
    pytest.param(_run("fetch", STARTED), True,
                 {"ready": False, "started": True, "restartCount": 0, "state": STARTED, "lastState": {}},
                 id="init-running-is-started"),
    pytest.param(_run("fetch", COMPLETED), True,
                 {"ready": True, "started": False, "restartCount": 0, "state": COMPLETED, "lastState": {}},
                 id="init-completed-is-ready"),
    pytest.param(_run("fetch", DENIED), True,
                 {"ready": False, "started": False, "restartCount": 0, "state": DENIED, "lastState": {}},
                 id="init-failed"),
    pytest.param(_run("fetch", BACKING_OFF, DENIED, restarts=2), True,
                 {"ready": False, "started": False, "restartCount": 2, "state": BACKING_OFF, "lastState": DENIED},
                 id="init-crash-loop"),
    pytest.param(_run("main", STARTED, ready=True), False,
                 {"ready": True, "started": False, "restartCount": 0, "state": STARTED, "lastState": {}},
                 id="regular-ready-from-its-probe"),
    pytest.param(_run("main", INITIALIZING), False,
                 {"ready": False, "started": False, "restartCount": 0, "state": INITIALIZING, "lastState": {}},
                 id="regular-while-initializing"),
])
def test_container_status(run: Any, init: bool, expected: dict[str, Any]) -> None:
    status = agent.build_container_status(run, init=init)
    assert status == {"name": run.name, "image": f"{DIGITS}:1.0.0", "imageID": "", **expected}


def test_container_status_names_its_container_and_image() -> None:
    run = _run("fetch", COMPLETED)
    run.image = agent.Image(f"{DIGITS}:1.0.0", {}, {}, f"{DIGITS}@sha256:0")
    run.container_id = "shipyard-local://uid/fetch/0/42"
    status = agent.build_container_status(run, init=True)
    assert status["imageID"] == f"{DIGITS}@sha256:0" and status["containerID"] == "shipyard-local://uid/fetch/0/42"


# ------------------------------------------------------------------------------------------------ container env

NS = "models"
FIELDS = {"metadata.name": "p", "metadata.namespace": NS, "status.podIP": "127.0.12.3"}
ALLOCATABLE = {"cpu": "16", "memory": "64Gi"}


def _b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def _secret(**data: str) -> dict[str, Any]:
    return {"kind": "Secret", "data": {k: _b64(v) for k, v in data.items()}}


def _configmap(**data: str) -> dict[str, Any]:
    return {"kind": "ConfigMap", "data": data}


STORAGE = _secret(AWS_ACCESS_KEY_ID="AKIA1", AWS_SECRET_ACCESS_KEY="s3cr3t/+=")
SOURCES = {("secret", "model-storage"): STORAGE, ("configmap", "settings"): _configmap(REGION="eu", LEVEL="info"),
           ("secret", "absent"): None, ("configmap", "absent"): None}


def _secret_key(name: str, key: str, optional: bool | None = None, kind: str = "secretKeyRef") -> dict[str, Any]:
    ref: dict[str, Any] = {"name": name, "key": key}
    if optional is not None:
        ref["optional"] = optional
    return {"valueFrom": {kind: ref}}


@pytest.mark.parametrize(("container", "expected"), [
    pytest.param({"env": [{"name": "A", "value": "1"}, {"name": "B"}]}, {"A": "1", "B": ""}, id="value-and-no-value"),
    pytest.param({"env": [{"name": "KEY", **_secret_key("model-storage", "AWS_SECRET_ACCESS_KEY")}]},
                 {"KEY": "s3cr3t/+="}, id="secret-key-ref-decoded"),
    pytest.param({"env": [{"name": "R", **_secret_key("settings", "REGION", kind="configMapKeyRef")}]},
                 {"R": "eu"}, id="configmap-key-ref"),
    pytest.param({"envFrom": [{"secretRef": {"name": "model-storage"}}]},
                 {"AWS_ACCESS_KEY_ID": "AKIA1", "AWS_SECRET_ACCESS_KEY": "s3cr3t/+="}, id="env-from-secret"),
    pytest.param({"envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "APP_"}]},
                 {"APP_REGION": "eu", "APP_LEVEL": "info"}, id="env-from-configmap-with-prefix"),
    pytest.param({"envFrom": [{"configMapRef": {"name": "settings"}},
                              {"secretRef": {"name": "model-storage"}, "prefix": "LEVEL"}],
                  "env": [{"name": "REGION", "value": "us"}]},
                 {"REGION": "us", "LEVEL": "info", "LEVELAWS_ACCESS_KEY_ID": "AKIA1",
                  "LEVELAWS_SECRET_ACCESS_KEY": "s3cr3t/+="}, id="env-overrides-env-from"),
    pytest.param({"envFrom": [{"configMapRef": {"name": "settings"}}, {"configMapRef": {"name": "other"}}]},
                 {"REGION": "us", "LEVEL": "info", "ZONE": "b"}, id="later-env-from-overrides-earlier"),
    pytest.param({"envFrom": [{"configMapRef": {"name": "settings"}}],
                  "env": [{"name": "URL", "value": "s3://b-$(REGION)/$(LATER)/$(PATH)/$$(REGION)"},
                          {"name": "LATER", "value": "x"}, {"name": "AGAIN", "value": "$(URL)+$(LATER)"}]},
                 {"REGION": "eu", "LEVEL": "info", "URL": "s3://b-eu/$(LATER)/$(PATH)/$(REGION)", "LATER": "x",
                  "AGAIN": "s3://b-eu/$(LATER)/$(PATH)/$(REGION)+x"},
                 id="expansion-sees-only-earlier-declared-variables"),
    pytest.param({"envFrom": [{"secretRef": {"name": "absent", "optional": True}},
                              {"configMapRef": {"name": "absent", "optional": True}}],
                  "env": [{"name": "A", **_secret_key("absent", "k", optional=True)},
                          {"name": "B", **_secret_key("model-storage", "nope", optional=True)},
                          {"name": "C", **_secret_key("settings", "nope", True, "configMapKeyRef")}]},
                 {}, id="optional-missing-objects-and-keys-are-skipped"),
    pytest.param({"envFrom": [{"configMapRef": {"name": "odd"}}]}, {"1st": "a", "with-dash": "b", "dot.ted": "c"},
                 id="keys-not-c-identifiers-are-taken-as-kubelet-1.34+"),
    pytest.param({"env": [{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                          {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                          {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                          {"name": "NOTE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['a/b']"}}},
                          {"name": "NONE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['nope']"}}}]},
                 {"POD": "p", "IP": "127.0.12.3", "APP": "digits", "NOTE": "c", "NONE": ""}, id="field-ref"),
])
def test_container_env(container: dict[str, Any], expected: dict[str, str]) -> None:
    sources = {**SOURCES, ("configmap", "other"): _configmap(REGION="us", ZONE="b"),
               ("configmap", "odd"): _configmap(**{"1st": "a", "with-dash": "b", "dot.ted": "c"})}
    pod = {"metadata": {"namespace": NS, "name": "p", "labels": {"app": "digits"}, "annotations": {"a/b": "c"}},
           "spec": {"containers": [container]}}
    assert agent.build_container_env(pod, container, sources, FIELDS, ALLOCATABLE) == expected


@pytest.mark.parametrize(("container", "message"), [
    pytest.param({"envFrom": [{"secretRef": {"name": "absent"}}]}, 'secret "absent" not found',
                 id="env-from-missing-secret"),
    pytest.param({"envFrom": [{"configMapRef": {"name": "absent", "optional": False}}]},
                 'configmap "absent" not found', id="env-from-missing-configmap"),
    pytest.param({"env": [{"name": "K", **_secret_key("absent", "k")}]}, 'secret "absent" not found',
                 id="key-ref-missing-secret"),
    pytest.param({"env": [{"name": "K", **_secret_key("model-storage", "token")}]},
                 f"couldn't find key token in Secret {NS}/model-storage", id="missing-secret-key"),
    pytest.param({"env": [{"name": "K", **_secret_key("settings", "token", kind="configMapKeyRef")}]},
                 f"couldn't find key token in ConfigMap {NS}/settings", id="missing-configmap-key"),
    pytest.param({"env": [{"name": "K", **_secret_key("absent", "k", optional=False)}]}, 'secret "absent" not found',
                 id="optional-false-is-required"),
    pytest.param({"env": [{"name": "F", "valueFrom": {"fieldRef": {"fieldPath": "spec.hostname"}}}]},
                 "unsupported fieldPath: spec.hostname", id="unsupported-field-path"),
    pytest.param({"env": [{"name": "F", "valueFrom": {"fileKeyRef": {"volumeName": "v", "path": "p", "key": "k"}}}]},
                 "env F: this valueFrom is not supported", id="file-key-ref"),
])
def test_container_env_that_cannot_be_built_waits_with_the_kubelets_message(container: dict[str, Any],
                                                                            message: str) -> None:
    pod = {"metadata": {"namespace": NS, "name": "p"}, "spec": {"containers": [container]}}
    with pytest.raises(agent.ContainerConfigError, match="^" + re.escape(message)):
        agent.build_container_env(pod, container, SOURCES, FIELDS, ALLOCATABLE)


def test_secret_bytes_that_are_not_utf8_reach_the_process_unchanged() -> None:
    container = {"env": [{"name": "BIN", **_secret_key("bin", "k")}]}
    sources = {("secret", "bin"): {"data": {"k": _b64(b"\xffok")}}}
    pod = {"metadata": {"namespace": NS, "name": "p"}, "spec": {"containers": [container]}}
    env = agent.build_container_env(pod, container, sources, FIELDS, ALLOCATABLE)
    assert os.fsencode(env["BIN"]) == b"\xffok"  # what subprocess hands execve


@pytest.mark.parametrize(("container", "references"), [
    pytest.param({}, [], id="none"),
    pytest.param({"envFrom": [{"secretRef": {"name": "s"}}, {"configMapRef": {"name": "c"}}, {"prefix": "X"}],
                  "env": [{"name": "A", **_secret_key("s", "k")}, {"name": "B", **_secret_key("t", "k")},
                          {"name": "C", **_secret_key("c", "k", kind="configMapKeyRef")},
                          {"name": "D", "value": "v"},
                          {"name": "E", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]},
                 [("secret", "s"), ("configmap", "c"), ("secret", "t")], id="each-once-in-order"),
])
def test_env_references(container: dict[str, Any], references: list[tuple[str, str]]) -> None:
    assert agent.build_env_references(container) == references


@pytest.mark.parametrize(("resources", "selector", "value"), [
    pytest.param({"limits": {"cpu": "500m"}}, {"resource": "limits.cpu"}, "1", id="cpu-rounded-up-to-cores"),
    pytest.param({"limits": {"cpu": "500m"}}, {"resource": "limits.cpu", "divisor": "1m"}, "500", id="cpu-millis"),
    pytest.param({"limits": {"cpu": "2"}}, {"resource": "limits.cpu", "divisor": "300m"}, "7", id="cpu-divisor"),
    pytest.param({}, {"resource": "limits.cpu"}, "16", id="no-limit-is-the-nodes-allocatable"),
    pytest.param({}, {"resource": "requests.cpu"}, "0", id="no-request-is-zero"),
    pytest.param({"requests": {"memory": "1Gi"}}, {"resource": "requests.memory", "divisor": "1Mi"}, "1024",
                 id="memory-divisor"),
    pytest.param({"limits": {"memory": "1.5k"}}, {"resource": "limits.memory"}, "1500", id="memory-decimal-suffix"),
    pytest.param({"limits": {"memory": "1e3"}}, {"resource": "limits.memory", "divisor": "1Ki"}, "1",
                 id="memory-exponent-rounded-up"),
    pytest.param({}, {"resource": "limits.memory", "divisor": "1Gi"}, "64", id="memory-allocatable"),
    pytest.param({}, {"resource": "limits.cpu", "containerName": "other", "divisor": "1m"}, "250",
                 id="another-container"),
])
def test_resource_field_ref(resources: dict[str, Any], selector: dict[str, Any], value: str) -> None:
    container = {"name": "main", "resources": resources,
                 "env": [{"name": "V", "valueFrom": {"resourceFieldRef": selector}}]}
    other = {"name": "other", "resources": {"limits": {"cpu": "250m"}}}
    pod = {"metadata": {"namespace": NS, "name": "p"}, "spec": {"containers": [container, other]}}
    assert agent.build_container_env(pod, container, {}, FIELDS, ALLOCATABLE) == {"V": value}


@pytest.mark.parametrize(("text", "expected"), [
    ("$(A)$(B)", "12"),
    ("$(A", "$(A"),
    ("$()", "$()"),
    ("$(a$(B))", "$(a$(B))"),  # the name runs to the first ")", as the kubelet reads it
    ("$(1st)", "x"),  # relaxed names can be referenced too
    ("end$", "end$"),
    ("$A", "$A"),
])
def test_expansion_edge_cases_as_the_kubelet_reads_them(text: str, expected: str) -> None:
    assert agent._expand(text, {"A": "1", "B": "2", "1st": "x"}) == expected


@pytest.mark.parametrize(("ca", "config", "tail"), [
    (None, None, []),
    ("/ca.pem", None, ["--ca-bundle", "/ca.pem"]),
    ("/ca.pem", "/docker.json", ["--ca-bundle", "/ca.pem", "--registry-config", "/docker.json"]),
], ids=["anonymous-system-ca", "registry-ca", "registry-ca-and-credentials"])
def test_build_image_volume_fetch(ca: str | None, config: str | None, tail: list[str]) -> None:
    argv = agent.build_image_volume_fetch("/venv/bin/python", "127.0.0.1:5000/models/m:v1", Path("/w/pods/u/v"),
                                          Path("/w/image-volume-cache"), ca, config)
    assert argv == ["/venv/bin/python", "-m", "shipyard.runtime.cli", "fetch", "--uri",
                    "oci://127.0.0.1:5000/models/m:v1", "--dest", "/w/pods/u/v", "--path", "/", "--cache",
                    "/w/image-volume-cache", "--termination-log", "", *tail]


def test_an_image_pull_failure_names_the_reference() -> None:
    error = agent.ImagePullFailed("r:5000/m:v9", "model", "Fetch of oci://r:5000/m:v9 failed: not found (404)")
    assert str(error) == ('Failed to pull image "r:5000/m:v9" for volume \'model\': Fetch of oci://r:5000/m:v9 '
                          "failed: not found (404)")


# ------------------------------------------------------------------------------------------------ pod network


@pytest.mark.parametrize(("cidr", "host", "first_pod", "last_pod", "services"), [
    pytest.param("10.213.0.0/16", "10.213.0.1", "10.213.0.2", "10.213.255.0",
                 ["10.213.255.254", "10.213.255.253"], id="slash-16-254-services-from-the-top"),
    pytest.param("192.168.7.0/24", "192.168.7.1", "192.168.7.2", "192.168.7.191",
                 ["192.168.7.254", "192.168.7.253"], id="slash-24-a-quarter-for-services"),
    pytest.param("172.16.0.16/28", "172.16.0.17", "172.16.0.18", "172.16.0.27",
                 ["172.16.0.30", "172.16.0.29"], id="slash-28-the-smallest"),
])
def test_pod_network_layout(cidr: str, host: str, first_pod: str, last_pod: str, services: list[str]) -> None:
    layout = agent.plan_pod_network(cidr)
    assert layout.host == host
    assert str(agent.ipaddress.IPv4Address(layout.first_pod)) == first_pod
    assert str(agent.ipaddress.IPv4Address(layout.last_pod)) == last_pod
    assert list(layout.service_ips[:2]) == services
    usable = layout.network.num_addresses - 2
    assert len(layout.service_ips) == min(254, usable // 4)
    pods = {str(agent.ipaddress.IPv4Address(i)) for i in range(layout.first_pod, layout.last_pod + 1)}
    assert not pods & set(layout.service_ips) and host not in pods | set(layout.service_ips)  # apart, all of them
    assert all(layout.contains(ip) for ip in [host, first_pod, last_pod, *layout.service_ips])
    assert not layout.contains("127.0.0.1")


@pytest.mark.parametrize(("cidr", "error"), [
    pytest.param("8.8.0.0/16", "private range", id="public"),
    pytest.param("127.0.0.0/16", "private range", id="loopback"),
    pytest.param("10.0.0.0/29", "too small", id="too-small"),
    pytest.param("10.213.0.1/16", "has host bits set", id="not-the-network-address"),
    pytest.param("fd00::/64", "only IPv4", id="ipv6"),
    pytest.param("nonsense", "does not appear to be", id="not-a-cidr"),
])
def test_pod_network_refuses(cidr: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        agent.plan_pod_network(cidr)


def test_pod_addresses_in_order_released_ones_to_the_back() -> None:
    layout = agent.plan_pod_network("10.213.0.0/28")  # pods 10.213.0.2-.11, Services .14-.12
    queue = agent.AddressQueue(layout.first_pod, layout.last_pod)
    first = [queue.allocate() for _ in range(3)]
    assert first == ["10.213.0.2", "10.213.0.3", "10.213.0.4"]
    queue.release("10.213.0.3")
    queue.release("10.213.0.3")  # twice: once in the queue
    queue.release("10.213.0.99")  # never handed out: ignored
    rest = [queue.allocate() for _ in range(7)]
    assert rest == [f"10.213.0.{i}" for i in range(5, 12)]  # fresh ones first ...
    assert queue.allocate() == "10.213.0.3"  # ... then the released one
    with pytest.raises(RuntimeError, match="no free pod IP"):
        queue.allocate()


def test_network_names_fit_and_differ_per_work_directory() -> None:
    a, b = agent.build_network_names(Path("/tmp/stack-a")), agent.build_network_names(Path("/tmp/stack-b"))
    assert a == agent.build_network_names(Path("/tmp/stack-a"))  # the same work directory, the same names
    assert a.netns != b.netns and a.host_veth != b.host_veth
    assert re.fullmatch(r"shipyard-[0-9a-f]{8}", a.netns)
    uid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    interfaces = [a.host_veth, a.stack_veth, a.bridge, a.pod_veth(uid), "eth0"]
    assert all(len(name) <= 15 for name in interfaces), interfaces  # IFNAMSIZ
    assert len(set(interfaces)) == len(interfaces)
    assert a.pod_netns(uid) == f"{a.netns}-0f1e2d3c4b5a" and a.pod_veth(uid) == "p0f1e2d3c4b5a"
    assert a.owns_netns(a.netns) and a.owns_netns(a.pod_netns(uid))
    assert not a.owns_netns(b.netns) and not a.owns_netns(f"{a.netns}x") and not a.owns_netns("shipyard-gw-1")


@pytest.mark.parametrize(("routes", "overlaps"), [
    pytest.param([{"dst": "default", "dev": "eth0"}, {"dst": "192.0.2.0/24", "dev": "eth0"}], [],
                 id="default-route-is-no-overlap"),
    pytest.param([{"dst": "10.213.4.0/24", "dev": "tun0"}], ["10.213.4.0/24 dev tun0 (unicast)"], id="inside"),
    pytest.param([{"dst": "10.0.0.0/8", "dev": "vpn0"}], ["10.0.0.0/8 dev vpn0 (unicast)"], id="around"),
    pytest.param([{"dst": "10.213.0.7", "dev": "eth1", "type": "local"}], ["10.213.0.7 dev eth1 (local)"],
                 id="a-host-address"),
    pytest.param([{"dst": "10.214.0.0/16", "dev": "br1"}], [], id="next-door"),
])
def test_pod_network_overlaps_with_the_machines_routes(routes: list[dict[str, str]], overlaps: list[str]) -> None:
    assert agent.build_overlaps(agent.plan_pod_network("10.213.0.0/16").network, routes) == overlaps


def test_service_ip_pool_of_given_addresses() -> None:
    layout = agent.plan_pod_network("10.213.0.0/16")
    pool = agent.ServiceIPPool(addresses=layout.service_ips)
    assert pool.candidates("ns/a")[:2] == ["10.213.255.254", "10.213.255.253"]
    pool.assign("ns/a", "10.213.255.254")
    pool.release("ns/a")
    assert pool.free[-1] == "10.213.255.254" and len(pool.free) == 254


# --------------------------------------------------------------------------------------- configMap volume updates


def test_projected_files_are_replaced_whole_and_removed_keys_deleted(tmp_path: Path) -> None:
    assert agent.sync_projected_files(tmp_path, {"a": b"1", "dir/b": b"2"}, 0o644, {"dir/b": 0o600})
    assert (tmp_path / "a").read_bytes() == b"1" and (tmp_path / "dir" / "b").stat().st_mode & 0o777 == 0o600
    inode = (tmp_path / "a").stat().st_ino
    assert not agent.sync_projected_files(tmp_path, {"a": b"1", "dir/b": b"2"}, 0o644, {"dir/b": 0o600})
    assert (tmp_path / "a").stat().st_ino == inode  # unchanged: not rewritten
    assert agent.sync_projected_files(tmp_path, {"a": b"new"}, 0o640)
    assert (tmp_path / "a").read_bytes() == b"new" and (tmp_path / "a").stat().st_ino != inode  # renamed over it
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a"]  # the removed key's file and folder, no temp file
    assert agent.sync_projected_files(tmp_path, {}, 0o644) and not any(tmp_path.iterdir())  # an optional one deleted
