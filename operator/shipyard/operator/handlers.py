"""The only module with Kopf decorators (I/O shell): watch -> cache -> work queue -> observe, measure, plan, apply.

Kopf supplies the watches (with its reconnects, peering and liveness). Its event handlers only update an
in-memory cache of ModelDeployments and of the children Shipyard manages (Deployments, Services, Jobs,
ConfigMaps and their Pods; server-side filtered by the ``app.kubernetes.io/managed-by=shipyard`` label) and
enqueue the owning ModelDeployment. A few queue workers then reconcile each object level-triggered: observe from
the cache, measure the analysis metrics when they are due (``providers``, never raising), ``planning.plan_reconcile``
(pure), server-side apply what differs, one status patch when it changed, events. Kopf itself stores nothing on the
objects (no finalizer, no progress annotations), so an idle operator writes nothing, deletion cascades through
ownerReferences, and a restart resumes from the initial listing.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import time
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
import lightkube

from shipyard import contract
from shipyard.operator import egress, metrics, naming, planning, providers
from shipyard.operator import kube as kube_mod
from shipyard.operator import spec as spec_mod
from shipyard.operator.workqueue import Workqueue

logger = logging.getLogger("shipyard.operator")
API_ERROR_BACKOFF = 5.0
PEERING_LIFETIME_SECONDS = 15
CHILD_KINDS = ("Deployment", "Service", "Job", "ConfigMap", "Pod")


@dataclass
class Caches:
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # "ns/name" -> ModelDeployment body
    # model key -> kind -> name -> body
    children: dict[str, dict[str, dict[str, dict[str, Any]]]] = field(default_factory=dict)

    def of(self, key: str, kind: str) -> dict[str, dict[str, Any]]:
        return self.children.get(key, {}).get(kind, {})


@dataclass
class Runtime:
    kube: kube_mod.Kube | None = None
    providers: providers.Providers | None = None
    queue: Workqueue = field(default_factory=Workqueue)
    caches: Caches = field(default_factory=Caches)
    workers: int = 128
    task: asyncio.Task[None] | None = None
    paused: bool = False  # Kopf's peering paused this replica in favour of another: act on nothing


RUNTIME = Runtime()
PAUSED_RETRY_SECONDS = 2.0


def assess_peering_message(message: str) -> bool | None:
    """Whether one of Kopf's peering log lines pauses (True) or resumes (False) this replica; None if neither.

    Kopf stops its watches when peering pauses a replica, but not Shipyard's work queue, whose timers (analysis
    intervals, pauses) would keep a paused replica writing from a cache that no longer updates. Kopf exposes the
    pause only in these lines (kopf/_core/engines/peering.py), so they are what the queue follows.
    """
    if message.startswith(("Pausing operations in favour of", "Pausing all operators, including self")):
        return True
    if message.startswith("Resuming operations after the pause"):
        return False
    return None


class PeeringPauseFollower(logging.Handler):
    """Sets RUNTIME.paused from Kopf's peering log lines (see assess_peering_message)."""

    def emit(self, record: logging.LogRecord) -> None:
        paused = assess_peering_message(record.getMessage())
        if paused is not None and paused != RUNTIME.paused:
            RUNTIME.paused = paused
            logger.info("Peering %s this replica's reconciles", "paused" if paused else "resumed")


_BACKGROUND: set[asyncio.Task[None]] = set()


def _spawn(coroutine: Coroutine[Any, Any, None]) -> None:
    """Runs a best-effort coroutine in the background, keeping a reference until it ends."""
    task = asyncio.create_task(coroutine)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


def model_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def owner_key(body: Mapping[str, Any]) -> str | None:
    """The ModelDeployment owning a child: its controller reference, or (for pods) the model label."""
    meta = body.get("metadata", {})
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == naming.KIND and ref.get("apiVersion", "").startswith(naming.GROUP + "/"):
            return model_key(meta.get("namespace", ""), ref["name"])
    model = (meta.get("labels") or {}).get(naming.LABEL_MODEL)
    if body.get("kind") == "Pod" and model:
        return model_key(meta.get("namespace", ""), model)
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


def build_job_view(body: Mapping[str, Any], pods: Mapping[str, Mapping[str, Any]]) -> planning.JobView:
    """A Job's phase from its conditions, and its pod's termination message (the compression summary)."""
    meta, status = body["metadata"], body.get("status", {})
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    if conditions.get("Complete") == "True" or conditions.get("SuccessCriteriaMet") == "True":
        phase = "Succeeded"
    elif conditions.get("Failed") == "True" or conditions.get("FailureTarget") == "True":
        phase = "Failed"
    elif status.get("active"):
        phase = "Running"
    else:
        phase = "Pending"
    message = ""
    newest = ""
    for pod in pods.values():
        if (pod["metadata"].get("labels") or {}).get("job-name") != meta["name"]:
            continue
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (cs.get("state") or {}).get("terminated") or {}
            finished = str(terminated.get("finishedAt") or "")
            if terminated.get("message") and finished >= newest:
                message, newest = egress.redact_text(str(terminated["message"]).strip()), finished
    if phase == "Failed" and not message:
        failed: Mapping[str, Any] = next(
            (c for c in status.get("conditions") or [] if c.get("type") == "Failed"), {})
        message = egress.redact_text(f"{failed.get('reason', 'Failed')}: {failed.get('message', '')}".strip(": "))
    annotations = meta.get("annotations") or {}
    return planning.JobView(name=meta["name"], key=(meta.get("labels") or {}).get(naming.LABEL_ARTIFACT, ""),
                            phase=phase, message=message, spec_hash=annotations.get(naming.ANNOTATION_SPEC_HASH, ""))


def build_observed(caches: Caches, key: str, missing_pvc: str | None = None) -> planning.Observed:
    deployments = {}
    for body in caches.of(key, "Deployment").values():
        view = build_deployment_view(body)
        deployments[view.version] = view
    service = next(iter(caches.of(key, "Service").values()), None)
    service_hash = None
    if service is not None:
        service_hash = (service["metadata"].get("annotations") or {}).get(naming.ANNOTATION_SPEC_HASH, "")
    pods = caches.of(key, "Pod")
    jobs = {name: build_job_view(body, pods) for name, body in caches.of(key, "Job").items()}
    config_maps = {name: (body["metadata"].get("annotations") or {}).get(naming.ANNOTATION_SPEC_HASH, "")
                   for name, body in caches.of(key, "ConfigMap").items()}
    return planning.Observed(deployments=deployments, service_hash=service_hash, jobs=jobs,
                             config_maps=config_maps, missing_pvc=missing_pvc)


def build_pod_targets(pods: Iterable[Mapping[str, Any]], name: str, version: str) -> list[str]:
    """podIP:port of the ready serving pods of the version's own Deployment (``egress.assess_scrape_pod``: a pod
    someone else made with copied labels, or on the host network, is never scraped)."""
    deployment = naming.build_deployment_name(name, version)
    labels = naming.build_version_labels(name, version)
    return sorted(f"{pod['status']['podIP']}:{_pod_port(pod)}" for pod in pods
                  if egress.assess_scrape_pod(pod, deployment, labels) is None)


def _pod_port(pod: Mapping[str, Any]) -> int:
    """The serving port: a ``shipyard.dev/port`` annotation (pods run as local processes), else the container's."""
    override = (pod["metadata"].get("annotations") or {}).get(f"{naming.GROUP}/port")
    if override and str(override).isdigit():
        return int(override)
    for container in pod.get("spec", {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == contract.SERVING_PORT_NAME:
                return int(port.get("containerPort", contract.SERVING_PORT))
    return contract.SERVING_PORT


def assess_unobserved(body: Mapping[str, Any]) -> bool:
    """Whether the operator has not acted on this spec yet (new object, changed spec): such work goes first."""
    generation = (body.get("metadata") or {}).get("generation")
    return generation is not None and (body.get("status") or {}).get("observedGeneration") != generation


def assess_newer(new: Mapping[str, Any], old: Mapping[str, Any] | None) -> bool:
    """Whether `new` is at least as recent as `old` (same object), by resourceVersion.

    A write's response can reach the cache after the watch already delivered a later state of the same object (a
    Deployment applied, then made available by the controller-manager before the apply call returned): the older
    body must not replace the newer one, or the reconcile that follows plans from a stale status and nothing wakes
    it again. The API server's resourceVersions are etcd revisions (integers); anything else is taken as newer.
    """
    if old is None:
        return True
    try:
        return int(new["metadata"]["resourceVersion"]) >= int(old["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return True


def _remember_child(body: Mapping[str, Any], deleted: bool) -> str | None:
    key = owner_key(body)
    kind = body.get("kind")
    if key is None or kind not in CHILD_KINDS:
        return None
    children = RUNTIME.caches.children.setdefault(key, {}).setdefault(str(kind), {})
    name = body["metadata"]["name"]
    if deleted:
        children.pop(name, None)
    elif assess_newer(body, children.get(name)):
        children[name] = dict(body)
    return key


async def _missing_pvc(kube: kube_mod.Kube, body: Mapping[str, Any], namespace: str) -> str | None:
    """The first PVC this pass needs (planning.plan_volume_checks) that does not exist; one GET each, only then."""
    for claim in planning.plan_volume_checks(body):
        if not await kube.pvc_exists(namespace, claim):
            return claim
    return None


async def reconcile(key: str) -> float | None:
    """One level-triggered pass over one ModelDeployment; returns seconds until it wants another look."""
    body = RUNTIME.caches.models.get(key)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    if RUNTIME.paused:  # another replica acts; look again when this one may have resumed
        return PAUSED_RETRY_SECONDS
    kube, provs = RUNTIME.kube, RUNTIME.providers
    assert kube is not None and provs is not None
    started = time.perf_counter()
    namespace, name = key.split("/", 1)
    logger.debug("Reconciling %s (%d waiting)", key, len(RUNTIME.queue))
    try:
        observed = build_observed(RUNTIME.caches, key, await _missing_pvc(kube, body, namespace))
        now = datetime.datetime.now(datetime.UTC)
        measurements = await _measure(provs, body, observed, now, key, namespace, name)
        plan = planning.plan_reconcile(body, observed, now, measurements)
        # ConfigMaps first (a Job mounts its own), then everything else concurrently.
        rejected: tuple[dict[str, Any], lightkube.ApiError] | None = None
        for group in ([o for o in plan.apply if o["kind"] == "ConfigMap"],
                      [o for o in plan.apply if o["kind"] != "ConfigMap"]):
            results = await asyncio.gather(*(kube.apply_object(o) for o in group), return_exceptions=True)
            for obj, result in zip(group, results, strict=True):
                if isinstance(result, lightkube.ApiError) and result.status.code in (400, 422):
                    rejected = rejected or (obj, result)
                elif isinstance(result, BaseException):
                    raise result
                else:
                    _remember_child(result, deleted=False)
                    logger.info("Applied %s %s/%s", obj["kind"], namespace, obj["metadata"]["name"])
            if rejected is not None:
                # The API server refused what the spec asked for (e.g. an invalid nodeSelector value): that needs
                # the user, not a retry loop. Stalled with the server's words; nothing else touched.
                obj, error = rejected
                message = f"{obj['kind']} {obj['metadata']['name']} was rejected by the API server: " \
                          f"{egress.build_capped(str(error.status.message), 1024)}"
                plan = planning.plan_invalid(planning.build_meta(body), body.get("status") or {}, message,
                                             datetime.datetime.now(datetime.UTC), reason="ChildRejected")
                break
        scaled = await asyncio.gather(*(kube.scale_deployment(namespace, child, n) for child, n in plan.scale))
        for (child, replicas), result in zip(plan.scale, scaled, strict=True):
            _remember_child(result, deleted=False)
            logger.info("Scaled Deployment %s/%s to %d replica(s)", namespace, child, replicas)
        await asyncio.gather(*(kube.delete_object(v, k, namespace, c) for v, k, c in plan.delete))
        for _, kind, child in plan.delete:
            logger.info("Deleted %s %s/%s", kind, namespace, child)
        previous = body.get("status") or {}
        if planning.assess_status_changed(previous, plan.status):
            patched = await kube.patch_status(namespace, name, plan.status)
            if key in RUNTIME.caches.models and assess_newer(patched, RUNTIME.caches.models[key]):
                RUNTIME.caches.models[key] = patched
            if previous.get("phase") != plan.status.get("phase"):
                logger.info("Moved %s to phase %s: %s", key, plan.status.get("phase"), plan.status.get("message"))
        for event in plan.events:  # best effort, off the reconcile's critical path
            _spawn(kube.post_event(body, event.type, event.reason, event.message))
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
    if plan.rollbacks:
        metrics.ROLLBACKS.labels(namespace=namespace, name=name).inc(plan.rollbacks)
    for result in (plan.status.get("analysis") or {}).get("metrics") or []:
        if measurements and result.get("name") in measurements:
            metrics.VERDICTS.labels(namespace=namespace, name=name, metric=result["name"],
                                    verdict=result.get("verdict", "Pending")).inc()
    metrics.PHASE.labels(namespace=namespace, name=name).state(str(plan.status.get("phase") or "Pending"))
    return plan.requeue_after


async def _measure(provs: providers.Providers, body: Mapping[str, Any], observed: planning.Observed,
                   now: datetime.datetime, key: str, namespace: str, name: str,
                   ) -> dict[str, Any] | None:
    request = planning.plan_measurement(body, observed, now)
    if request is None:
        return None
    md = spec_mod.parse_model_deployment(body)
    assert md.spec.rollout.analysis is not None
    pods: list[dict[str, Any]] = []
    if any(isinstance(m.provider, spec_mod.ScrapeProvider) or provs.build_address(m, md.spec.rollout.analysis) is None
           for m in md.spec.rollout.analysis.metrics):
        # Serving pods are not watched (their status churn is large); the scraper lists them when it measures.
        pods = await RUNTIME.kube.list_pods(namespace, naming.build_selector_labels(name)) if RUNTIME.kube else []
    allowed: tuple[egress.Allowed, ...] = ()
    if RUNTIME.kube and provs.needs_namespace_allow_list(md.spec.rollout.analysis):  # one GET, only then
        annotations = await RUNTIME.kube.fetch_namespace_annotations(namespace)
        allowed, _ = egress.parse_address_list(annotations.get(egress.ANNOTATION_ALLOWED),
                                               f"annotation {egress.ANNOTATION_ALLOWED} of namespace {namespace}")
    return await provs.query_measurements(
        md.spec.rollout.analysis, namespace=namespace, name=name, model=md.served_model_name,
        candidate_version=request.candidate, stable_version=request.stable,
        candidate_targets=build_pod_targets(pods, name, request.candidate),
        stable_targets=build_pod_targets(pods, name, request.stable) if request.stable else (),
        namespace_allowed=allowed,
    )


class NoDiffBase(kopf.DiffBaseStorage):
    """Shipyard registers no change handlers (only watch events feeding its own work queue), so there is no
    "last handled" state to build or store; Kopf's default would deep-copy every event's body to build one."""

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """Explicit login (kubeconfig, else the in-cluster service account). Kopf adds its default login only when it
    sees credentials at import time, which an embedding process (tests) may not have yet."""
    return kopf.login_with_kubeconfig(**kwargs) or kopf.login_with_service_account(**kwargs)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = f"{naming.GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=naming.GROUP)
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.inactivity_timeout = 600
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.queueing.worker_limit = 200
    # Peering (--peering): a standby takes over at the latest PEERING_LIFETIME_SECONDS after the active replica's
    # last keep-alive (sent every lifetime - 5..10 s); Kopf's default of 60 s would leave a killed leader's models
    # unattended for up to a minute. Only used when peering is on.
    settings.peering.lifetime = PEERING_LIFETIME_SECONDS
    # Server-side filtering: only the children Shipyard manages are listed, watched and cached.
    selector = f"{naming.LABEL_MANAGED_BY}={naming.MANAGED_BY}"
    for resource in (("apps", "v1", "deployments"), ("v1", "services"), ("batch", "v1", "jobs"),
                     ("v1", "configmaps")):
        settings.watching.label_selectors[resource] = selector
    # Of the pods, only the compression Jobs' (their termination messages); serving pods are listed on demand.
    settings.watching.label_selectors["v1", "pods"] = f"{selector},{naming.LABEL_COMPONENT}=compression"
    # Only watch-event handlers here: no diff-base to compute per event (Kopf's default deep-copies every body).
    settings.persistence.diffbase_storage = NoDiffBase()
    options: Mapping[str, Any] = memo.get("options", {}) if isinstance(memo, Mapping) else {}
    RUNTIME.kube = kube_mod.Kube.from_env(options.get("kubeconfig"))
    RUNTIME.providers = providers.Providers(
        options.get("prometheus_address") or os.environ.get("SHIPYARD_PROMETHEUS_ADDRESS") or None,
        allowed_addresses=options.get("allowed_prometheus_addresses") or [os.environ.get(egress.ENV_ALLOWED, "")])
    RUNTIME.queue = Workqueue()
    RUNTIME.caches = Caches()
    RUNTIME.workers = int(options.get("workers", 128))
    RUNTIME.paused = False
    peering_log = logging.getLogger("kopf._core.engines.peering")
    if not any(isinstance(h, PeeringPauseFollower) for h in peering_log.handlers):
        peering_log.addHandler(PeeringPauseFollower())
    if not peering_log.isEnabledFor(logging.INFO):  # a quiet log level must not hide a pause from the queue
        peering_log.setLevel(logging.INFO)
    RUNTIME.task = asyncio.create_task(RUNTIME.queue.run(reconcile, workers=RUNTIME.workers))
    logger.info("Started %d reconcile workers", RUNTIME.workers)


@kopf.on.cleanup()
async def shutdown(**_: Any) -> None:
    RUNTIME.queue.close()
    if RUNTIME.task is not None:
        RUNTIME.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await RUNTIME.task
    if _BACKGROUND:
        await asyncio.wait(list(_BACKGROUND), timeout=5)
    if RUNTIME.providers is not None:
        await RUNTIME.providers.close()
    if RUNTIME.kube is not None:
        await RUNTIME.kube.close()
    logger.info("Stopped the reconcile workers")


@kopf.on.event(naming.GROUP, naming.VERSION, naming.PLURAL)
async def model_event(event: Mapping[str, Any], body: kopf.Body, namespace: str | None, name: str,
                      **_: Any) -> None:
    key = model_key(namespace or "", name)
    if event.get("type") == "DELETED":
        RUNTIME.caches.models.pop(key, None)
        RUNTIME.caches.children.pop(key, None)
        RUNTIME.queue.forget(key)
        metrics.forget(namespace or "", name)
        return
    if assess_newer(body, RUNTIME.caches.models.get(key)):
        RUNTIME.caches.models[key] = dict(body)
    RUNTIME.queue.add(key, urgent=assess_unobserved(body))


async def _child_event(event: Mapping[str, Any], body: kopf.Body, **_: Any) -> None:
    key = _remember_child(body, deleted=event.get("type") == "DELETED")
    if key is not None and assess_wakes_owner(body):
        RUNTIME.queue.add(key)


def assess_wakes_owner(body: Mapping[str, Any]) -> bool:
    """Whether a child's change can change a decision. Serving pods only feed the cache (scrape targets; their
    readiness reaches the planner through their Deployment's status), so their many status updates do not cost
    reconciles; a compression pod matters once it has terminated (its termination message)."""
    if body.get("kind") != "Pod":
        return True
    labels = body.get("metadata", {}).get("labels") or {}
    if labels.get(naming.LABEL_COMPONENT) != "compression":
        return False
    statuses = (body.get("status") or {}).get("containerStatuses") or []
    return any((cs.get("state") or {}).get("terminated") for cs in statuses)


def _index_child(body: kopf.Body, **_: Any) -> None:
    """Caches a child before any handler runs. Kopf calls index handlers first for every event, and holds all other
    handlers (the ModelDeployments' too) until the initial listing of every indexed resource is done: so the first
    reconcile after a start sees every child. Without this, a restarted operator could reconcile a model before its
    stable Deployment was listed and deploy the candidate at full size, skipping the canary. Kopf stores nothing
    (None is not indexed)."""
    _remember_child(body, deleted=False)


MANAGED = {naming.LABEL_MANAGED_BY: naming.MANAGED_BY}
for _group, _version, _plural in (("apps", "v1", "deployments"), ("", "v1", "services"), ("batch", "v1", "jobs"),
                                  ("", "v1", "configmaps"), ("", "v1", "pods")):
    kopf.index(_group, _version, _plural, labels=MANAGED, id=f"{_plural}_index")(_index_child)
    kopf.on.event(_group, _version, _plural, labels=MANAGED, id=f"{_plural}_event")(_child_event)
