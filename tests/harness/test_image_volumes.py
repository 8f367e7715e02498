"""Image volumes in the node agent (hack/node_agent.py), on a real control plane and the suite's real OCI registry: a
pod's ``volumes[].image`` is pulled by ``shipyard-runtime fetch`` (an ORAS artifact's files, an image's filesystem)
and mounted read-only at the container's mountPath; a reference that is not there leaves the pod Pending with
ErrImagePull / ImagePullBackOff naming it, and the pull is retried with back-off until it succeeds."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.harness.conftest import Node
from tests.integration.conftest import wait_until
from tests.registry import build_layer

pytestmark = [pytest.mark.harness, pytest.mark.timeout(600)]

DIGITS = "registry.example/shipyard/digits-model:1.0.0"  # a catalogue image: only its command is used


def _pod(name: str, reference: str, script: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 2,
                     "automountServiceAccountToken": False,
                     "volumes": [{"name": "model", "image": {"reference": reference, "pullPolicy": "IfNotPresent"}}],
                     "containers": [{"name": "main", "image": DIGITS, "command": ["sh", "-c", script],
                                     "terminationMessagePolicy": "FallbackToLogsOnError",
                                     "volumeMounts": [{"name": "model", "mountPath": "/mnt/model"}]}]}}


def _namespace(node: Node, namespace: str) -> str:
    if node.cluster.get("namespace", namespace) is None:
        node.cluster.kubectl("create", "namespace", namespace)
    return namespace


def _state(node: Node, namespace: str, name: str) -> dict[str, Any]:
    pod = node.cluster.get("pod", name, namespace) or {}
    statuses = (pod.get("status") or {}).get("containerStatuses") or [{}]
    state: dict[str, Any] = statuses[0].get("state") or {}
    return state


READ = ("{ cat /mnt/model/model.txt; ls /mnt/model; "
        "if touch /mnt/model/x 2>/dev/null; then echo writable; else echo read-only; fi; } > /dev/termination-log")


def test_an_artifact_volume_is_mounted_read_only(node: Node) -> None:
    namespace = _namespace(node, "image-volume")
    reference = f"{node.registry.address}/volumes/digits:v1"
    node.registry.push_artifact("volumes/digits:v1", {"model.txt": b"weights-v1\n", "config.json": b"{}"})
    node.cluster.apply(_pod("artifact", reference, READ), namespace)
    terminated = wait_until(lambda: _state(node, namespace, "artifact").get("terminated"), timeout=120,
                            message="the pod with an image volume to finish")
    assert terminated["exitCode"] == 0, terminated
    assert terminated["message"].split() == ["weights-v1", "config.json", "model.txt", "read-only"]
    events = json.loads(node.cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    assert any(e["reason"] == "Pulled" and f'Successfully pulled image "{reference}"' in e["message"] for e in events)


def test_an_image_volume_holds_the_image_filesystem(node: Node) -> None:
    namespace = _namespace(node, "image-volume")
    reference = f"{node.registry.address}/volumes/image:v1"
    node.registry.push_image("volumes/image:v1", [build_layer({"model.txt": b"old\n", "gone.txt": b"x"}),
                                                  build_layer({"model.txt": b"image-layer-2\n", "gone.txt": None})])
    node.cluster.apply(_pod("image", reference, READ), namespace)
    terminated = wait_until(lambda: _state(node, namespace, "image").get("terminated"), timeout=120,
                            message="the pod with an image volume to finish")
    assert terminated["exitCode"] == 0, terminated
    assert terminated["message"].split() == ["image-layer-2", "model.txt", "read-only"]


def test_a_missing_reference_backs_off_until_it_is_pushed(node: Node) -> None:
    namespace = _namespace(node, "image-volume")
    reference = f"{node.registry.address}/volumes/later:v1"
    node.cluster.apply(_pod("later", reference, READ), namespace)
    waiting = wait_until(lambda: (s := _state(node, namespace, "later").get("waiting")) and
                         s.get("reason") in ("ErrImagePull", "ImagePullBackOff") and s,
                         timeout=60, message="ErrImagePull")
    assert reference in waiting["message"]
    assert "not found (404)" in waiting["message"]
    pod = node.cluster.get("pod", "later", namespace)
    assert pod is not None and pod["status"]["phase"] == "Pending"
    wait_until(lambda: (_state(node, namespace, "later").get("waiting") or {}).get("reason") == "ImagePullBackOff",
               timeout=30, message="ImagePullBackOff")
    node.registry.push_artifact("volumes/later:v1", {"model.txt": b"pushed-late\n"})
    terminated = wait_until(lambda: _state(node, namespace, "later").get("terminated"), timeout=120,
                            message="the pull to be retried after the push")
    assert terminated["exitCode"] == 0, terminated
    assert terminated["message"].split()[0] == "pushed-late"
