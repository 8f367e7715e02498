"""The shell's pure helpers: which child events wake the owner, job phases and messages, scrape targets."""

from __future__ import annotations

from typing import Any

import pytest

from shipyard.operator import handlers


def pod(component: str, terminated: bool = False, ready: bool = True, ip: str = "127.0.0.9",
        version: str = "1.0.0", annotations: dict[str, str] | None = None) -> dict[str, Any]:
    state = {"terminated": {"exitCode": 1, "message": "Rejected: accuracy", "finishedAt": "2026-01-01T00:00:00Z"}} \
        if terminated else {"running": {}}
    return {"kind": "Pod",
            "metadata": {"name": f"p-{component}-{version}", "namespace": "ml",
                         "labels": {"shipyard.dev/model": "digits", "shipyard.dev/component": component,
                                    "shipyard.dev/version": version, "job-name": "digits-compress-abc"},
                         "annotations": annotations or {}},
            "spec": {"containers": [{"name": "server", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"podIP": ip, "containerStatuses": [{"state": state}],
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


@pytest.mark.parametrize(("body", "wakes"), [
    pytest.param({"kind": "Deployment", "metadata": {}}, True, id="deployment"),
    pytest.param({"kind": "Job", "metadata": {}}, True, id="job"),
    pytest.param(pod("serving"), False, id="serving-pod"),
    pytest.param(pod("compression"), False, id="compression-pod-running"),
    pytest.param(pod("compression", terminated=True), True, id="compression-pod-terminated"),
])
def test_which_child_events_wake_the_owner(body: dict[str, Any], wakes: bool) -> None:
    assert handlers.assess_wakes_owner(body) is wakes


@pytest.mark.parametrize(("conditions", "active", "phase"), [
    pytest.param([{"type": "Complete", "status": "True"}], 0, "Succeeded", id="complete"),
    pytest.param([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}], 0, "Failed", id="failed"),
    pytest.param([], 1, "Running", id="running"),
    pytest.param([], 0, "Pending", id="pending"),
])
def test_job_phase_and_termination_message(conditions: list[dict[str, str]], active: int, phase: str) -> None:
    job = {"metadata": {"name": "digits-compress-abc", "labels": {"shipyard.dev/artifact": "k"}},
           "status": {"conditions": conditions, "active": active}}
    view = handlers.build_job_view(job, {"p": pod("compression", terminated=True)})
    assert view.phase == phase and view.key == "k"
    assert view.message == "Rejected: accuracy"


def test_a_failed_job_without_a_pod_message_says_why() -> None:
    job = {"metadata": {"name": "j"}, "status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "Job was active longer"}]}}
    assert handlers.build_job_view(job, {}).message == "DeadlineExceeded: Job was active longer"


def owned(body: dict[str, Any], host_network: bool = False) -> dict[str, Any]:
    """The pod as its Deployment's ReplicaSet makes it (owner reference, pod-template-hash)."""
    version = body["metadata"]["labels"]["shipyard.dev/version"]
    body["metadata"]["labels"]["pod-template-hash"] = "5d9c7"
    body["metadata"]["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "controller": True,
                                            "name": f"digits-{version.replace('.', '-')}-5d9c7"}]
    body["spec"]["hostNetwork"] = host_network
    return body


def test_scrape_targets_are_ready_serving_pods_of_the_versions_deployment() -> None:
    pods = [
        owned(pod("serving", ip="127.0.0.10")),
        owned(pod("serving", ip="127.0.0.11", ready=False)),
        owned(pod("serving", ip="127.0.0.12", version="1.1.0")),
        owned(pod("serving", ip="127.0.0.13", annotations={"shipyard.dev/port": "18080"})),
        owned(pod("compression", ip="127.0.0.14")),
        pod("serving", ip="127.0.0.15"),  # same labels, made by someone else
        owned(pod("serving", ip="127.0.0.16"), host_network=True),
    ]
    assert handlers.build_pod_targets(pods, "digits", "1.0.0") == ["127.0.0.10:8080", "127.0.0.13:18080"]
    assert handlers.build_pod_targets(pods, "digits", "1.1.0") == ["127.0.0.12:8080"]


def _rv(value: object) -> dict[str, Any]:
    return {"metadata": {"name": "digits-1-0-0", "resourceVersion": value}}


@pytest.mark.parametrize(("new", "old", "newer"), [
    (_rv("12"), None, True),  # nothing cached yet
    (_rv("12"), _rv("11"), True),
    (_rv("12"), _rv("12"), True),  # the same state again (e.g. a relist)
    (_rv("11"), _rv("12"), False),  # a write's response arriving after the watch delivered a later state
    (_rv("9"), _rv("10"), False),  # compared as numbers, not strings
    (_rv("abc"), _rv("12"), True),  # not a number: cannot tell, the latest arrival wins
    ({"metadata": {"name": "x"}}, _rv("12"), True),
])
def test_an_older_body_never_replaces_a_newer_one_in_the_cache(new: dict[str, Any], old: dict[str, Any] | None,
                                                               newer: bool) -> None:
    assert handlers.assess_newer(new, old) is newer


@pytest.mark.parametrize(("message", "paused"), [
    ("Pausing operations in favour of [Peer(identity='b', priority=200)].", True),
    ("Pausing all operators, including self: [Peer(identity='a'), Peer(identity='b')]", True),
    ("Resuming operations after the pause. Conflicting operators with the same priority are gone.", False),
    ("Possibly conflicting operators with the same priority: [Peer(identity='b')].", None),  # followed by a pause
    ("Keep-alive in 'shipyard' cluster-wide: ok.", None),
])
def test_kopf_peering_lines_pause_and_resume_the_work_queue(message: str, paused: bool | None) -> None:
    assert handlers.assess_peering_message(message) is paused


def test_a_paused_replica_reconciles_nothing_and_looks_again_later() -> None:
    import asyncio
    import logging

    follower = handlers.PeeringPauseFollower()
    before = handlers.RUNTIME.paused, dict(handlers.RUNTIME.caches.models)
    try:
        handlers.RUNTIME.caches.models["ml/digits"] = {"metadata": {"name": "digits", "namespace": "ml"}}
        follower.emit(logging.LogRecord("kopf._core.engines.peering", logging.INFO, __file__, 1,
                                        "Pausing operations in favour of %s.", (["b"],), None))
        assert handlers.RUNTIME.paused
        # No Kube client is configured here: a paused reconcile must return before it would need one.
        assert asyncio.run(handlers.reconcile("ml/digits")) == handlers.PAUSED_RETRY_SECONDS
        follower.emit(logging.LogRecord("kopf._core.engines.peering", logging.INFO, __file__, 1,
                                        "Resuming operations after the pause.", (), None))
        assert not handlers.RUNTIME.paused
    finally:
        handlers.RUNTIME.paused = before[0]
        handlers.RUNTIME.caches.models.clear()
        handlers.RUNTIME.caches.models.update(before[1])


@pytest.mark.parametrize(("body", "unobserved"), [
    ({"metadata": {"generation": 1}}, True),  # created a moment ago
    ({"metadata": {"generation": 1}, "status": {"observedGeneration": 1}}, False),  # a status-only change
    ({"metadata": {"generation": 3}, "status": {"observedGeneration": 2}}, True),  # a new spec
    ({"metadata": {}}, False),
])
def test_specs_not_acted_on_yet_are_urgent(body: dict[str, Any], unobserved: bool) -> None:
    assert handlers.assess_unobserved(body) is unobserved
