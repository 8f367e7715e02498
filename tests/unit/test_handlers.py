"""The Kopf shell: its pure decisions (which child events wake the owner, scrape targets, the cache's ordering, peering
pauses, what an API error means) and whole reconcile passes against a fake of the API server (``FakeKube``): the
shell writes what the plan says and nothing else, once, and stalls on a refused child without touching anything
else. No Kopf, no network."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Mapping
from typing import Any

import lightkube
import pytest
from lightkube.core.exceptions import ApiError as LightkubeApiError

from shipyard.operator import handlers, naming, providers


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
    pytest.param(pod("analysis"), False, id="analysis-pod-running"),
    pytest.param(pod("analysis", terminated=True), True, id="analysis-pod-terminated"),
    pytest.param(pod("other", terminated=True), False, id="another-component-terminated"),
])
def test_which_child_events_wake_the_owner(body: dict[str, Any], wakes: bool) -> None:
    assert handlers.assess_wakes_owner(body) is wakes


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
    kube = FakeKube()
    op = handlers.Operator(kube=kube, providers=providers.Providers())
    follower = handlers.PeeringPauseFollower(op)
    op.caches.models["ml/digits"] = model()
    follower.emit(logging.LogRecord("kopf._core.engines.peering", logging.INFO, __file__, 1,
                                    "Pausing operations in favour of %s.", (["b"],), None))
    assert op.paused
    assert asyncio.run(handlers.reconcile(op, "ml/digits")) == handlers.PAUSED_RETRY_SECONDS
    assert kube.calls == []  # nothing asked of the API server
    follower.emit(logging.LogRecord("kopf._core.engines.peering", logging.INFO, __file__, 1,
                                    "Resuming operations after the pause.", (), None))
    assert not op.paused


@pytest.mark.parametrize(("body", "unobserved"), [
    ({"metadata": {"generation": 1}}, True),  # created a moment ago
    ({"metadata": {"generation": 1}, "status": {"observedGeneration": 1}}, False),  # a status-only change
    ({"metadata": {"generation": 3}, "status": {"observedGeneration": 2}}, True),  # a new spec
    ({"metadata": {}}, False),
])
def test_specs_not_acted_on_yet_are_urgent(body: dict[str, Any], unobserved: bool) -> None:
    assert handlers.assess_unobserved(body) is unobserved


@pytest.mark.parametrize(("code", "message", "retry"), [
    pytest.param(404, "not found", None, id="deleted-meanwhile-dropped"),
    pytest.param(409, "the object has been modified", handlers.CONFLICT_RETRY, id="stale-cache-soon"),
    pytest.param(403, "namespace ml is being terminated", None, id="namespace-going-away-dropped"),
    pytest.param(403, "forbidden: cannot patch", handlers.API_ERROR_BACKOFF, id="forbidden-backs-off"),
    pytest.param(500, "etcd timeout", handlers.API_ERROR_BACKOFF, id="server-error-backs-off"),
    pytest.param(429, "too many requests", handlers.API_ERROR_BACKOFF, id="throttled-backs-off"),
])
def test_what_an_api_error_means(code: int, message: str, retry: float | None) -> None:
    assert handlers.plan_api_error(code, message) == retry


# ---------------------------------------------------------------------------------------------------------------
# Whole passes against a fake API server


def api_error(code: int, message: str) -> lightkube.ApiError:
    response = type("Response", (), {"json": lambda self: {"code": code, "message": message, "status": "Failure"},
                                     "status_code": code})()
    return LightkubeApiError(response=response)  # type: ignore[arg-type]


class FakeKube:
    """Records every call; applies return the object with a resourceVersion, as the API server does."""

    def __init__(self, reject: Mapping[str, str] | None = None, pvcs: tuple[str, ...] = ()) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.reject = dict(reject or {})  # kind -> message of a 422
        self.pvcs = pvcs
        self.version = 100
        self.models: dict[str, dict[str, Any]] = {}  # the stored objects (the operator's cache stands in for them)

    def _stamp(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        self.version += 1
        body = copy.deepcopy(dict(obj))
        body["metadata"]["resourceVersion"] = str(self.version)
        return body

    async def apply_object(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        self.calls.append(("apply", (obj["kind"], obj["metadata"]["name"])))
        if obj["kind"] in self.reject:
            raise api_error(422, self.reject[obj["kind"]])
        return self._stamp(obj)

    async def scale_deployment(self, namespace: str, name: str, replicas: int) -> dict[str, Any]:
        self.calls.append(("scale", (name, replicas)))
        return self._stamp({"kind": "Deployment", "metadata": {"name": name, "namespace": namespace}})

    async def delete_object(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self.calls.append(("delete", (kind, name)))

    async def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        """A merge patch of status: the whole object comes back, as from the API server."""
        self.calls.append(("status", dict(status)))
        stored = self.models.get(f"{namespace}/{name}", {"metadata": {"name": name, "namespace": namespace}})
        merged = {k: v for k, v in {**(stored.get("status") or {}), **status}.items() if v is not None}
        return self._stamp({**stored, "status": merged})

    async def post_event(self, owner: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        self.calls.append(("event", reason))

    async def list_pods(self, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        self.calls.append(("list_pods", dict(labels)))
        return []

    async def pvc_exists(self, namespace: str, name: str) -> bool:
        self.calls.append(("pvc", name))
        return name in self.pvcs

    async def fetch_namespace_annotations(self, namespace: str) -> dict[str, str]:
        self.calls.append(("namespace", namespace))
        return {}

    async def close(self) -> None:
        return None

    def of(self, verb: str) -> list[Any]:
        return [arg for v, arg in self.calls if v == verb]


def operator_with(kube: FakeKube) -> handlers.Operator:
    op = handlers.Operator(kube=kube, providers=providers.Providers())
    kube.models = op.caches.models
    return op


def model(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": naming.API_VERSION, "kind": naming.KIND,
            "metadata": {"name": "digits", "namespace": "ml", "uid": "u-1", "generation": 1, "resourceVersion": "7"},
            "spec": {"image": "registry.example/digits:1.0.0", "model": {"path": "/models/digits"},
                     "serving": {"replicas": 2}, **spec}}


async def _pass(op: handlers.Operator, key: str = "ml/digits") -> float | None:
    retry = await handlers.reconcile(op, key)
    if op.background:
        await asyncio.wait(list(op.background))
    return retry


def test_a_new_model_gets_its_deployment_and_service_and_one_status_write() -> None:
    kube = FakeKube()
    op = operator_with(kube)
    op.caches.models["ml/digits"] = model()
    asyncio.run(_pass(op))
    # two replicas: the version's PodDisruptionBudget too (maxUnavailable 1 by default)
    assert sorted(kube.of("apply")) == [("Deployment", "digits-1-0-0"), ("PodDisruptionBudget", "digits-1-0-0"),
                                        ("Service", "digits")]
    (status,) = kube.of("status")
    assert status["phase"] == "Progressing" and status["observedGeneration"] == 1
    assert kube.of("event") == ["Deploying"]
    assert kube.of("list_pods") == [] and kube.of("pvc") == []  # nothing needed them
    # What was applied is in the cache: the next pass plans from it and writes nothing new.
    assert set(op.caches.children["ml/digits"]) == {"Deployment", "PodDisruptionBudget", "Service"}
    kube.calls.clear()
    asyncio.run(_pass(op))
    assert kube.of("apply") == [] and kube.of("scale") == [] and kube.of("delete") == []


def test_a_refused_child_stalls_the_model_and_nothing_else_is_written() -> None:
    kube = FakeKube(reject={"Deployment": 'Deployment.apps "digits-1-0-0" is invalid: nodeSelector'})
    op = handlers.Operator(kube=kube, providers=providers.Providers())
    op.caches.models["ml/digits"] = model()
    asyncio.run(_pass(op))
    (status,) = kube.of("status")
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "ChildRejected")
    assert "Deployment digits-1-0-0 was rejected by the API server" in status["message"]
    assert kube.of("scale") == [] and kube.of("delete") == []
    assert kube.of("event") == ["ChildRejected"]


def test_an_invalid_spec_is_stalled_without_any_other_request() -> None:
    kube = FakeKube()
    op = handlers.Operator(kube=kube, providers=providers.Providers())
    op.caches.models["ml/digits"] = model(serving={"replicas": -1})
    asyncio.run(_pass(op))
    assert [v for v, _ in kube.calls] == ["status", "event"]
    (status,) = kube.of("status")
    assert status["message"].startswith("spec.serving.replicas: ")


def test_a_missing_artifacts_claim_is_looked_up_and_stalls_before_any_job() -> None:
    compression = {"steps": [{"quantize": {"scheme": "int8-dynamic"}}], "evaluation": {"dataset": "builtin:digits"},
                   "artifacts": {"pvc": "shipyard-artifacts"}}
    kube = FakeKube()
    op = operator_with(kube)
    op.caches.models["ml/digits"] = model(compression=compression)
    retry = asyncio.run(_pass(op))
    assert kube.of("pvc") == ["shipyard-artifacts"]
    assert not any(kind in ("Job", "ConfigMap", "Deployment") for kind, _ in kube.of("apply"))
    assert retry == pytest.approx(10.0, abs=0.5)  # PVCs are not watched: look again
    kube.pvcs = ("shipyard-artifacts",)
    kube.calls.clear()
    asyncio.run(_pass(op))
    assert {kind for kind, _ in kube.of("apply")} >= {"ConfigMap", "Job"}


def test_a_deleted_model_is_dropped_and_an_api_error_is_retried() -> None:
    kube = FakeKube()
    op = handlers.Operator(kube=kube, providers=providers.Providers())
    assert asyncio.run(_pass(op, "ml/gone")) is None

    async def refused(namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        raise api_error(500, "etcd timeout")

    kube.patch_status = refused  # type: ignore[method-assign]
    op.caches.models["ml/digits"] = model()
    assert asyncio.run(_pass(op)) == handlers.API_ERROR_BACKOFF


@pytest.mark.parametrize(("ports", "target"), [
    pytest.param([{"name": "http", "containerPort": 8080}], "127.0.0.10:8080", id="shipyard-http"),
    pytest.param([{"name": "http", "containerPort": 8080}, {"name": "grpc", "containerPort": 7070},
                  {"name": "metrics", "containerPort": 8082}], "127.0.0.10:8082", id="runtime-metrics-port"),
    pytest.param([{"name": "http", "containerPort": 8000}, {"name": "grpc", "containerPort": 8001}],
                 "127.0.0.10:8000", id="runtime-metrics-on-http"),
])
def test_scrape_targets_use_the_metrics_port_where_there_is_one(ports: list[dict[str, Any]], target: str) -> None:
    serving = owned(pod("serving", ip="127.0.0.10"))
    serving["spec"]["containers"][0]["ports"] = ports
    assert handlers.build_pod_targets([serving], "digits", "1.0.0") == [target]
