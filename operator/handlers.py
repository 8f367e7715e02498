"""The only module with Kopf decorators (I/O shell): watch -> cache -> work queue -> observe, plan, apply, patch.

Kopf supplies the watches (with its reconnects, peering and liveness). Its event handlers only update an
in-memory cache of ModelDeployments and their Deployments/Services (an informer cache) and enqueue the owning
ModelDeployment. A few queue workers then reconcile each object level-triggered: observe from the cache,
``planning.plan_reconcile`` (pure), server-side apply what differs, one status patch when it changed. Kopf
itself stores nothing on the objects (no finalizer, no progress annotations), so an idle operator writes
nothing, deletion cascades through ownerReferences, and a restart resumes from the initial listing.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
import lightkube

from shipyard.operator import kube as kube_mod
from shipyard.operator import metrics, naming, planning
from shipyard.operator.workqueue import Workqueue

logger = logging.getLogger("shipyard.operator")
API_ERROR_BACKOFF = 5.0


@dataclass
class Caches:
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # "ns/name" -> ModelDeployment body
    deployments: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # model key -> name -> body
    services: dict[str, dict[str, Any]] = field(default_factory=dict)  # model key -> Service body


@dataclass
class Runtime:
    kube: kube_mod.Kube | None = None
    queue: Workqueue = field(default_factory=Workqueue)
    caches: Caches = field(default_factory=Caches)
    workers: int = 4
    task: asyncio.Task[None] | None = None


RUNTIME = Runtime()


def model_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def owner_key(body: Mapping[str, Any]) -> str | None:
    meta = body.get("metadata", {})
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == naming.KIND and ref.get("apiVersion", "").startswith(naming.GROUP + "/"):
            return model_key(meta.get("namespace", ""), ref["name"])
    return None


def build_deployment_view(body: Mapping[str, Any]) -> planning.DeploymentView:
    meta, spec, status = body["metadata"], body.get("spec", {}), body.get("status", {})
    annotations = meta.get("annotations") or {}
    return planning.DeploymentView(
        name=meta["name"],
        version=meta.get("labels", {}).get(naming.LABEL_VERSION, ""),
        image=annotations.get(naming.ANNOTATION_IMAGE, ""),
        replicas=int(spec.get("replicas", 1)),
        ready_replicas=int(status.get("readyReplicas", 0)),
        available_replicas=int(status.get("availableReplicas", 0)),
        updated_replicas=int(status.get("updatedReplicas", 0)),
        generation=int(meta.get("generation", 1)),
        observed_generation=int(status.get("observedGeneration", 0)),
        spec_hash=annotations.get(naming.ANNOTATION_SPEC_HASH, ""),
    )


def build_observed(caches: Caches, key: str) -> planning.Observed:
    deployments = {}
    for body in caches.deployments.get(key, {}).values():
        view = build_deployment_view(body)
        deployments[view.version] = view
    service = caches.services.get(key)
    service_hash = None
    if service is not None:
        service_hash = (service["metadata"].get("annotations") or {}).get(naming.ANNOTATION_SPEC_HASH, "")
    return planning.Observed(deployments=deployments, service_hash=service_hash)


def _remember_child(body: Mapping[str, Any], deleted: bool) -> str | None:
    key = owner_key(body)
    if key is None:
        return None
    caches = RUNTIME.caches
    kind, name = body.get("kind"), body["metadata"]["name"]
    if kind == "Deployment":
        children = caches.deployments.setdefault(key, {})
        if deleted:
            children.pop(name, None)
        else:
            children[name] = dict(body)
    elif kind == "Service":
        if deleted:
            caches.services.pop(key, None)
        else:
            caches.services[key] = dict(body)
    return key


async def reconcile(key: str) -> float | None:
    """One level-triggered pass over one ModelDeployment; returns seconds until it wants another look."""
    body = RUNTIME.caches.models.get(key)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    kube = RUNTIME.kube
    assert kube is not None
    started = time.perf_counter()
    namespace, name = key.split("/", 1)
    plan = planning.plan_reconcile(body, build_observed(RUNTIME.caches, key), datetime.datetime.now(datetime.UTC))
    try:
        for obj in plan.apply:
            try:
                applied = await kube.apply_object(obj)
            except lightkube.ApiError as e:
                if e.status.code not in (400, 422):
                    raise
                # The API server refused what the spec asked for (e.g. an invalid nodeSelector value):
                # that needs the user, not a retry loop. Stalled with the server's words; nothing else touched.
                message = f"{obj['kind']} {obj['metadata']['name']} was rejected by the API server: {e.status.message}"
                plan = planning.plan_invalid(planning.build_meta(body), body.get("status") or {}, message,
                                             datetime.datetime.now(datetime.UTC), reason="ChildRejected")
                break
            _remember_child(applied, deleted=False)
            logger.info("Applied %s %s/%s", obj["kind"], namespace, obj["metadata"]["name"])
        for child, replicas in plan.scale:
            _remember_child(await kube.scale_deployment(namespace, child, replicas), deleted=False)
            logger.info("Scaled Deployment %s/%s to %d replica(s)", namespace, child, replicas)
        for api_version, kind, child in plan.delete:
            await kube.delete_object(api_version, kind, namespace, child)
            logger.info("Deleted %s %s/%s beyond the revision history limit", kind, namespace, child)
        previous = body.get("status") or {}
        if planning.assess_status_changed(previous, plan.status):
            patched = await kube.patch_status(namespace, name, plan.status)
            if key in RUNTIME.caches.models:
                RUNTIME.caches.models[key] = patched
            if previous.get("phase") != plan.status.get("phase"):
                logger.info("Moved %s to phase %s: %s", key, plan.status.get("phase"), plan.status.get("message"))
        for event in plan.events:
            await kube.post_event(body, event.type, event.reason, event.message)
    except lightkube.ApiError as e:
        code, message = e.status.code, str(e.status.message or "")
        if code == 404:  # deleted while we worked: nothing left to do
            return None
        if code == 409:  # conflict: the cache was stale; look again soon
            return 0.5
        if code == 403 and "being terminated" in message:  # its namespace is going away
            return None
        logger.warning("Reconcile of %s was refused by the API server (%s): %s; retrying in %.0f s",
                       key, code, message, API_ERROR_BACKOFF)
        return API_ERROR_BACKOFF
    finally:
        metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
    metrics.PHASE.labels(namespace=namespace, name=name).state(str(plan.status.get("phase", "Pending")))
    return plan.requeue_after


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = f"{naming.GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=naming.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=naming.GROUP, key="last-handled-configuration")
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.inactivity_timeout = 600
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.queueing.worker_limit = 200
    # Server-side filtering: only the children Shipyard manages are listed, watched and cached.
    selector = f"{naming.LABEL_MANAGED_BY}={naming.MANAGED_BY}"
    settings.watching.label_selectors["apps", "v1", "deployments"] = selector
    settings.watching.label_selectors["v1", "services"] = selector
    options: Mapping[str, Any] = memo.get("options", {}) if isinstance(memo, Mapping) else {}
    RUNTIME.kube = kube_mod.Kube.from_env(options.get("kubeconfig"))
    RUNTIME.queue = Workqueue()
    RUNTIME.caches = Caches()
    RUNTIME.workers = int(options.get("workers", 4))
    RUNTIME.task = asyncio.create_task(RUNTIME.queue.run(reconcile, workers=RUNTIME.workers))
    logger.info("Started %d reconcile workers", RUNTIME.workers)


@kopf.on.cleanup()
async def shutdown(**_: Any) -> None:
    RUNTIME.queue.close()
    if RUNTIME.task is not None:
        RUNTIME.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await RUNTIME.task
    if RUNTIME.kube is not None:
        await RUNTIME.kube.close()
    logger.info("Stopped the reconcile workers")


@kopf.on.event(naming.GROUP, naming.VERSION, naming.PLURAL)
async def model_event(event: Mapping[str, Any], body: kopf.Body, namespace: str | None, name: str,
                      **_: Any) -> None:
    key = model_key(namespace or "", name)
    if event.get("type") == "DELETED":
        RUNTIME.caches.models.pop(key, None)
        RUNTIME.caches.deployments.pop(key, None)
        RUNTIME.caches.services.pop(key, None)
        RUNTIME.queue.forget(key)
        metrics.forget(namespace or "", name)
        return
    RUNTIME.caches.models[key] = dict(body)
    RUNTIME.queue.add(key)


@kopf.on.event("apps", "v1", "deployments", labels={naming.LABEL_MANAGED_BY: naming.MANAGED_BY})
async def deployment_event(event: Mapping[str, Any], body: kopf.Body, **_: Any) -> None:
    key = _remember_child(body, deleted=event.get("type") == "DELETED")
    if key is not None:
        RUNTIME.queue.add(key)


@kopf.on.event("", "v1", "services", labels={naming.LABEL_MANAGED_BY: naming.MANAGED_BY})
async def service_event(event: Mapping[str, Any], body: kopf.Body, **_: Any) -> None:
    key = _remember_child(body, deleted=event.get("type") == "DELETED")
    if key is not None:
        RUNTIME.queue.add(key)
