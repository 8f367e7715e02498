"""The Kopf shell (I/O): watch -> cache -> work queue -> observe, measure, plan, apply. The only module with Kopf.

Kopf supplies the watches (with its reconnects, peering and liveness). Its event handlers only update an
in-memory cache of ModelDeployments and of the children Shipyard manages (Deployments, Services, Jobs, PDBs,
ConfigMaps and the pods of Jobs; server-side filtered by the ``app.kubernetes.io/managed-by=shipyard`` label) and
enqueue the owning ModelDeployment. Queue workers then reconcile each object level-triggered (``reconcile``): parse
its spec once, observe its children from the cache (``observed``), measure the analysis metrics that are due
(``providers``, never raising), plan (``planning.plan_reconcile``, pure), server-side apply what differs, one status
patch when it changed, events. Kopf itself stores nothing on the objects (no finalizer, no progress annotations), so
an idle operator writes nothing, deletion cascades through ownerReferences, and a restart resumes from the initial
listing.

Everything the shell needs at run time (the API client, the providers, the caches, the queue) is one ``Operator``
object created at start-up and kept in Kopf's memo: no module global, so one pass (``reconcile(op, key)``) is
unit-tested with a fake of the API (tests/unit/test_handlers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
import time
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import kopf
import lightkube

from shipyard import contract
from shipyard.operator import (
    autoscaling,
    egress,
    metrics,
    naming,
    notifications,
    objects,
    observed,
    planning,
    providers,
    runtimes,
    traffic,
)
from shipyard.operator import kube as kube_mod
from shipyard.operator import spec as spec_mod
from shipyard.operator.rollout import Reason
from shipyard.operator.workqueue import Workqueue

logger = logging.getLogger("shipyard.operator")
API_ERROR_BACKOFF: Final = 5.0
CONFLICT_RETRY: Final = 0.5
PAUSED_RETRY_SECONDS: Final = 2.0
PEERING_LIFETIME_SECONDS: Final = 15
CHILD_KINDS: Final = ("Deployment", "Service", "Job", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                      "ScaledObject", "Pod")
ACTIVATOR_IMAGE_ENV: Final = "SHIPYARD_ACTIVATOR_IMAGE"
FETCH_IMAGE_ENV: Final = "SHIPYARD_FETCH_IMAGE"
MODEL_CACHE_PATH_ENV: Final = "SHIPYARD_MODEL_CACHE_PATH"
KEDA_LOOKUP_SECONDS: Final = 30.0  # whether KEDA's ScaledObjects are served is looked up again after this long
# The pods whose termination messages and exit codes count: compression and analysis Jobs'.
WATCHED_POD_COMPONENTS: Final = ("compression", providers.base.MEASUREMENT_COMPONENT)


class KubeApi(Protocol):
    """What the shell asks of the API server (``kube.Kube``; a fake in the unit tests)."""

    async def apply_object(self, obj: Mapping[str, Any]) -> dict[str, Any]: ...
    async def scale_deployment(self, namespace: str, name: str, replicas: int) -> dict[str, Any]: ...
    async def delete_object(self, api_version: str, kind: str, namespace: str, name: str) -> None: ...
    async def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any]: ...
    async def post_event(self, owner: Mapping[str, Any], type_: str, reason: str, message: str) -> None: ...
    async def list_pods(self, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]: ...
    async def pvc_exists(self, namespace: str, name: str) -> bool: ...
    async def serves(self, api_version: str, kind: str, namespace: str) -> bool: ...
    async def fetch_namespace_annotations(self, namespace: str) -> dict[str, str]: ...
    async def fetch_object(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...
    async def close(self) -> None: ...


@dataclass
class Caches:
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # "ns/name" -> ModelDeployment body
    # model key -> kind -> name -> body
    children: dict[str, dict[str, dict[str, dict[str, Any]]]] = field(default_factory=dict)

    def of(self, key: str, kind: str) -> dict[str, dict[str, Any]]:
        return self.children.get(key, {}).get(kind, {})


@dataclass
class Operator:
    """The run-time state of one operator process."""

    kube: KubeApi
    providers: providers.Providers
    queue: Workqueue = field(default_factory=Workqueue)
    caches: Caches = field(default_factory=Caches)
    workers: int = 128
    task: asyncio.Task[None] | None = None
    paused: bool = False  # Kopf's peering paused this replica in favour of another: act on nothing
    background: set[asyncio.Task[None]] = field(default_factory=set)
    keda_seen: dict[str, tuple[float, bool]] = field(default_factory=dict)  # namespace -> (when, served)
    notifier: notifications.Notifier | None = None  # webhook notifications (--notifications-namespace)
    activator_image: str | None = None  # the activator of models that scale to zero (--activator-image)
    fetch: objects.FetchSettings = field(default_factory=objects.FetchSettings)  # --fetch-image, --model-cache-path

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Runs a best-effort coroutine in the background, keeping a reference until it ends."""
        task = asyncio.create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def remember_child(self, body: Mapping[str, Any], deleted: bool) -> str | None:
        """Caches (or forgets) a child; returns its owner's key, None when it is not a child of a ModelDeployment."""
        key = owner_key(body)
        kind = body.get("kind")
        if key is None or kind not in CHILD_KINDS:
            return None
        children = self.caches.children.setdefault(key, {}).setdefault(str(kind), {})
        name = body["metadata"]["name"]
        if deleted:
            children.pop(name, None)
        elif assess_newer(body, children.get(name)):
            children[name] = dict(body)
        return key


# ---------------------------------------------------------------------------------------------------------------
# Pure decisions of the shell


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


def plan_api_error(code: int, message: str) -> float | None:
    """What to do after the API server refused a pass: seconds until the next look, None to drop the key.

    404: the object was deleted while we worked (nothing left to do). 409: the cache was stale (look again soon).
    403 "being terminated": its namespace is going away. Anything else: retry after a back-off.
    """
    if code == 404:
        return None
    if code == 409:
        return CONFLICT_RETRY
    if code == 403 and "being terminated" in message:
        return None
    return API_ERROR_BACKOFF


def assess_rejected(error: BaseException) -> bool:
    """Whether an apply failed because the API server refused the object itself (400, 422): that needs the user,
    not a retry loop."""
    return isinstance(error, lightkube.ApiError) and error.status.code in (400, 422)


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


def build_pod_targets(pods: Iterable[Mapping[str, Any]], name: str, version: str) -> list[str]:
    """podIP:port of the ready serving pods of the version's own Deployment (``egress.assess_scrape_pod``: a pod
    someone else made with copied labels, or on the host network, is never scraped)."""
    deployment = naming.build_deployment_name(name, version)
    labels = naming.build_version_labels(name, version)
    return sorted(f"{pod['status']['podIP']}:{_pod_port(pod)}" for pod in pods
                  if egress.assess_scrape_pod(pod, deployment, labels) is None)


def _pod_port(pod: Mapping[str, Any]) -> int:
    """The port serving the pod's metrics: a ``shipyard.dev/port`` annotation (pods run as local processes), else the
    container's ``metrics`` port (a runtime whose metrics have a port of their own), else its ``http`` port."""
    override = (pod["metadata"].get("annotations") or {}).get(naming.ANNOTATION_METRICS_PORT)
    if override and str(override).isdigit():
        return int(override)
    ports = [p for c in pod.get("spec", {}).get("containers") or [] for p in c.get("ports") or []]
    for name in (contract.METRICS_PORT_NAME, contract.SERVING_PORT_NAME):
        for port in ports:
            if port.get("name") == name:
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


def assess_wakes_owner(body: Mapping[str, Any]) -> bool:
    """Whether a child's change can change a decision. Serving pods only feed the cache (their readiness reaches the
    planner through their Deployment's status), so their many status updates do not cost reconciles; a Job's pod
    matters once it has terminated (its termination message and exit code)."""
    if body.get("kind") == "PodDisruptionBudget":
        return False  # its status follows the pods; the owner is woken when one is deleted (_child_event)
    if body.get("kind") != "Pod":
        return True
    labels = body.get("metadata", {}).get("labels") or {}
    if labels.get(naming.LABEL_COMPONENT) not in WATCHED_POD_COMPONENTS:
        return False
    statuses = (body.get("status") or {}).get("containerStatuses") or []
    return any((cs.get("state") or {}).get("terminated") for cs in statuses)


# ---------------------------------------------------------------------------------------------------------------
# One pass


async def _fetches(op: Operator, md: spec_mod.ModelDeployment, status: Mapping[str, Any], seen: observed.Observed,
                   namespace: str) -> dict[str, tuple[observed.FetchView, ...]]:
    """The download steps of the serving pods of the versions that fetch their model now (planning.plan_fetch_checks):
    one LIST per such version, none at rest."""
    out: dict[str, tuple[observed.FetchView, ...]] = {}
    for version in planning.plan_fetch_checks(md, status, seen):
        pods = await op.kube.list_pods(namespace, naming.build_version_labels(md.name, version))
        out.update(observed.build_fetch_views(pods))
    return out


async def _missing_pvc(op: Operator, md: spec_mod.ModelDeployment, status: Mapping[str, Any],
                       namespace: str) -> str | None:
    """The first PVC this pass needs (planning.plan_volume_checks) that does not exist; one GET each, only then."""
    for claim in planning.plan_volume_checks(md, status):
        if not await op.kube.pvc_exists(namespace, claim):
            return claim
    return None


async def _traffic(op: Operator, md: spec_mod.ModelDeployment, namespace: str) -> traffic.TrafficObserved | None:
    """gatewayAPI traffic: the managed routes (one GET each; a missing one is told apart from a missing CRD by one
    LIST) and the Gateways they name (one GET each, only once a controller accepted the route). None otherwise."""
    gw = md.spec.rollout.gateway_api
    if gw is None:
        return None
    routes: dict[str, traffic.RouteView] = {}
    gateways: dict[tuple[str, str], traffic.GatewayView] = {}
    for kind, name in ((traffic.HTTP_ROUTE, gw.http_route), (traffic.GRPC_ROUTE, gw.grpc_route)):
        if name is None:
            continue
        try:
            body = await op.kube.fetch_object(traffic.API_VERSION, kind, namespace, name)
        except kube_mod.NotServed:
            body, served = None, False
        else:
            served = body is not None or await op.kube.serves(traffic.API_VERSION, kind, namespace)
        view = traffic.RouteView(kind=kind, name=name, served=served, body=body)
        routes[kind] = view
        if body is None or not view.parent_statuses:
            continue
        for key in traffic.build_parent_gateways(view, namespace):
            if key not in gateways:
                try:
                    found = await op.kube.fetch_object(traffic.API_VERSION, traffic.GATEWAY, key[0], key[1])
                except lightkube.ApiError as e:
                    if e.status.code != 403:
                        raise
                    continue  # a Gateway in a namespace the operator may not read: its Programmed is not checked
                gateways[key] = traffic.GatewayView(
                    namespace=key[0], name=key[1], found=found is not None,
                    conditions=tuple(((found or {}).get("status") or {}).get("conditions") or ()))
    return traffic.TrafficObserved(routes=routes, gateways=gateways)


async def _keda_served(op: Operator, md: spec_mod.ModelDeployment, namespace: str) -> bool | None:
    """Whether KEDA's ScaledObjects are served, looked up (one LIST, at most every KEDA_LOOKUP_SECONDS per namespace)
    only for a spec that scales with KEDA; None otherwise."""
    auto = md.spec.serving.autoscaling
    if auto is None or auto.provider != "keda":
        return None
    seen = op.keda_seen.get(namespace)
    if seen is not None and time.monotonic() - seen[0] < KEDA_LOOKUP_SECONDS:
        return seen[1]
    served = await op.kube.serves(autoscaling.KEDA_API, autoscaling.SCALED_OBJECT, namespace)
    op.keda_seen[namespace] = (time.monotonic(), served)
    return served


async def _measure(op: Operator, md: spec_mod.ModelDeployment, status: Mapping[str, Any], now: datetime.datetime,
                   namespace: str, name: str) -> dict[str, Any] | None:
    request = planning.plan_measurement(md, status, now)
    analysis_spec = planning.build_active_analysis(md.spec, int(status.get("currentStepIndex") or 0))
    if request is None or analysis_spec is None:
        return None
    pods: list[dict[str, Any]] = []
    if op.providers.uses_pods(analysis_spec):
        # Serving pods are not watched (their status churn is large); they are listed when a measurement needs them.
        pods = await op.kube.list_pods(namespace, naming.build_selector_labels(name))
    allowed: tuple[egress.Allowed, ...] = ()
    if op.providers.needs_namespace_allow_list(analysis_spec):  # one GET, only then
        annotations = await op.kube.fetch_namespace_annotations(namespace)
        allowed, _ = egress.parse_address_list(annotations.get(egress.ANNOTATION_ALLOWED),
                                               f"annotation {egress.ANNOTATION_ALLOWED} of namespace {namespace}")
    return await op.providers.query_measurements(
        analysis_spec, namespace=namespace, name=name, model=md.served_model_name,
        candidate_version=request.candidate, stable_version=request.stable,
        candidate_targets=build_pod_targets(pods, name, request.candidate),
        stable_targets=build_pod_targets(pods, name, request.stable) if request.stable else (),
        metric_names=request.metrics, namespace_allowed=allowed,
        runtime=runtimes.resolve_runtime(md.spec.serving.runtime) if md.spec.serving.runtime is not None else None,
    )


async def _apply(op: Operator, plan: planning.Plan, body: Mapping[str, Any], namespace: str) -> planning.Plan:
    """Writes the plan's objects, scales and deletes; returns the plan, or the stall that replaces it when the API
    server refused an object the spec asked for (nothing else is touched then)."""
    # ConfigMaps first (a Job mounts its own), then everything else concurrently.
    for group in ([o for o in plan.apply if o["kind"] == "ConfigMap"],
                  [o for o in plan.apply if o["kind"] != "ConfigMap"]):
        results = await asyncio.gather(*(op.kube.apply_object(o) for o in group), return_exceptions=True)
        rejected: tuple[dict[str, Any], lightkube.ApiError] | None = None
        for obj, result in zip(group, results, strict=True):
            if isinstance(result, lightkube.ApiError) and assess_rejected(result):
                rejected = rejected or (obj, result)
            elif isinstance(result, BaseException):
                raise result
            else:
                op.remember_child(result, deleted=False)
                logger.info("Applied %s %s/%s", obj["kind"], namespace, obj["metadata"]["name"])
        if rejected is not None:
            obj, error = rejected
            message = (f"{obj['kind']} {obj['metadata']['name']} was rejected by the API server: "
                       f"{egress.build_capped(str(error.status.message), 1024)}")
            return planning.plan_invalid(planning.build_meta(body), body.get("status") or {}, message,
                                         datetime.datetime.now(datetime.UTC), reason=Reason.CHILD_REJECTED)
    scaled = await asyncio.gather(*(op.kube.scale_deployment(namespace, child, n) for child, n in plan.scale))
    for (child, replicas), result in zip(plan.scale, scaled, strict=True):
        op.remember_child(result, deleted=False)
        logger.info("Scaled Deployment %s/%s to %d replica(s)", namespace, child, replicas)
    await asyncio.gather(*(op.kube.delete_object(v, k, namespace, c) for v, k, c in plan.delete))
    for _, kind, child in plan.delete:
        logger.info("Deleted %s %s/%s", kind, namespace, child)
    return plan


async def reconcile(op: Operator, key: str) -> float | None:
    """One level-triggered pass over one ModelDeployment; returns seconds until it wants another look."""
    body = op.caches.models.get(key)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    if op.paused:  # another replica acts; look again when this one may have resumed
        return PAUSED_RETRY_SECONDS
    started = time.perf_counter()
    namespace, name = key.split("/", 1)
    status: Mapping[str, Any] = body.get("status") or {}
    logger.debug("Reconciling %s (%d waiting)", key, len(op.queue))
    try:
        parsed = planning.parse(body)  # once per pass
        missing = None if isinstance(parsed, spec_mod.SpecError) else await _missing_pvc(op, parsed, status,
                                                                                          namespace)
        keda = None if isinstance(parsed, spec_mod.SpecError) else await _keda_served(op, parsed, namespace)
        seen = observed.build_observed(op.caches.children.get(key, {}), missing, keda)
        if not isinstance(parsed, spec_mod.SpecError):
            fetches = await _fetches(op, parsed, status, seen, namespace)
            if fetches:
                seen = dataclasses.replace(seen, fetches=fetches)
            routes = await _traffic(op, parsed, namespace)
            if routes is not None:
                seen = dataclasses.replace(seen, traffic=routes)
        now = datetime.datetime.now(datetime.UTC)
        measurements = None if isinstance(parsed, spec_mod.SpecError) else await _measure(
            op, parsed, status, now, namespace, name)
        plan = planning.plan_reconcile(body, seen, now, measurements, parsed=parsed,
                                       prometheus_address=op.providers.prometheus_address,
                                       activator_image=op.activator_image, fetch=op.fetch)
        plan = await _apply(op, plan, body, namespace)
        if planning.assess_status_changed(status, plan.status):
            patched = await op.kube.patch_status(namespace, name, plan.status)
            if key in op.caches.models and assess_newer(patched, op.caches.models[key]):
                op.caches.models[key] = patched
            if status.get("phase") != plan.status.get("phase"):
                logger.info("Moved %s to phase %s: %s", key, plan.status.get("phase"), plan.status.get("message"))
        for event in plan.events:  # best effort, off the reconcile's critical path
            op.spawn(op.kube.post_event(body, event.type, event.reason, event.message))
        if op.notifier is not None and plan.events:  # queued, never awaited (notifications.py)
            op.notifier.submit_events(body, plan.status, ((e.type, e.reason, e.message) for e in plan.events), now)
    except lightkube.ApiError as e:
        code, message = e.status.code or 0, str(e.status.message or "")
        retry = plan_api_error(code, message)
        if retry == API_ERROR_BACKOFF:
            logger.warning("Reconcile of %s was refused by the API server (%s): %s; retrying in %.0f s",
                           key, code, message, retry)
        return retry
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


# ---------------------------------------------------------------------------------------------------------------
# Kopf


class NoDiffBase(kopf.DiffBaseStorage):
    """Shipyard registers no change handlers (only watch events feeding its own work queue), so there is no
    "last handled" state to build or store; Kopf's default would deep-copy every event's body to build one."""

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


class PeeringPauseFollower(logging.Handler):
    """Sets ``Operator.paused`` from Kopf's peering log lines (see assess_peering_message)."""

    def __init__(self, op: Operator) -> None:
        super().__init__()
        self.op = op

    def emit(self, record: logging.LogRecord) -> None:
        paused = assess_peering_message(record.getMessage())
        if paused is not None and paused != self.op.paused:
            self.op.paused = paused
            logger.info("Peering %s this replica's reconciles", "paused" if paused else "resumed")


def _operator(memo: Any) -> Operator:
    op = getattr(memo, "operator", None)
    if not isinstance(op, Operator):
        raise RuntimeError("the operator's start-up handler has not run")
    return op


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
                     ("v1", "configmaps"), ("policy", "v1", "poddisruptionbudgets"),
                     ("autoscaling", "v2", "horizontalpodautoscalers"), ("keda.sh", "v1alpha1", "scaledobjects")):
        settings.watching.label_selectors[resource] = selector
    # Of the pods, only the Jobs' (compression, analysis: their termination messages); serving pods are listed when
    # a measurement needs them.
    settings.watching.label_selectors["v1", "pods"] = (
        f"{selector},{naming.LABEL_COMPONENT} in ({','.join(WATCHED_POD_COMPONENTS)})")
    # Only watch-event handlers here: no diff-base to compute per event (Kopf's default deep-copies every body).
    settings.persistence.diffbase_storage = NoDiffBase()
    options: Mapping[str, Any] = memo.get("options", {}) if isinstance(memo, Mapping) else {}
    op = Operator(
        kube=kube_mod.Kube.from_env(options.get("kubeconfig"), options.get("api_transport", "aiohttp")),
        providers=providers.Providers(
            options.get("prometheus_address") or os.environ.get("SHIPYARD_PROMETHEUS_ADDRESS") or None,
            allowed_addresses=options.get("allowed_prometheus_addresses") or [
                os.environ.get(egress.ENV_ALLOWED, "")]),
        workers=int(options.get("workers", 128)),
        activator_image=options.get("activator_image") or os.environ.get(ACTIVATOR_IMAGE_ENV) or None,
        fetch=objects.FetchSettings(
            image=options.get("fetch_image") or os.environ.get(FETCH_IMAGE_ENV) or None,
            cache_path=options.get("model_cache_path") or os.environ.get(MODEL_CACHE_PATH_ENV) or None),
    )
    notify = options.get("notifications")
    if isinstance(notify, notifications.Settings) and isinstance(op.kube, kube_mod.Kube):
        op.notifier = notifications.Notifier(op.kube, notify)
        await op.notifier.start()
    memo.operator = op
    peering_log = logging.getLogger("kopf._core.engines.peering")
    for handler in [h for h in peering_log.handlers if isinstance(h, PeeringPauseFollower)]:
        peering_log.removeHandler(handler)  # one from an earlier run in the same process (tests)
    peering_log.addHandler(PeeringPauseFollower(op))
    if not peering_log.isEnabledFor(logging.INFO):  # a quiet log level must not hide a pause from the queue
        peering_log.setLevel(logging.INFO)

    async def work(key: str) -> float | None:
        return await reconcile(op, key)

    op.task = asyncio.create_task(op.queue.run(work, workers=op.workers))
    logger.info("Started %d reconcile workers", op.workers)


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    op = _operator(memo)
    op.queue.close()
    if op.task is not None:
        op.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await op.task
    if op.background:
        await asyncio.wait(list(op.background), timeout=5)
    if op.notifier is not None:
        await op.notifier.close()
    await op.providers.close()
    await op.kube.close()
    logger.info("Stopped the reconcile workers")


@kopf.on.event(naming.GROUP, naming.VERSION, naming.PLURAL)
async def model_event(event: Mapping[str, Any], body: kopf.Body, namespace: str | None, name: str, memo: kopf.Memo,
                      **_: Any) -> None:
    op = _operator(memo)
    key = model_key(namespace or "", name)
    if event.get("type") == "DELETED":
        op.caches.models.pop(key, None)
        op.caches.children.pop(key, None)
        op.queue.forget(key)
        metrics.forget(namespace or "", name)
        return
    if assess_newer(body, op.caches.models.get(key)):
        op.caches.models[key] = dict(body)
    op.queue.add(key, urgent=assess_unobserved(body))


async def _child_event(event: Mapping[str, Any], body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    op = _operator(memo)
    deleted = event.get("type") == "DELETED"
    key = op.remember_child(body, deleted=deleted)
    if key is not None and (assess_wakes_owner(body) or deleted and body.get("kind") == "PodDisruptionBudget"):
        op.queue.add(key)


def _index_child(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Caches a child before any handler runs. Kopf calls index handlers first for every event, and holds all other
    handlers (the ModelDeployments' too) until the initial listing of every indexed resource is done: so the first
    reconcile after a start sees every child. Without this, a restarted operator could reconcile a model before its
    stable Deployment was listed and deploy the candidate at full size, skipping the canary. Kopf stores nothing
    (None is not indexed)."""
    _operator(memo).remember_child(body, deleted=False)


MANAGED: Final = {naming.LABEL_MANAGED_BY: naming.MANAGED_BY}
for _group, _version, _plural in (("apps", "v1", "deployments"), ("", "v1", "services"), ("batch", "v1", "jobs"),
                                  ("", "v1", "configmaps"), ("policy", "v1", "poddisruptionbudgets"),
                                  ("autoscaling", "v2", "horizontalpodautoscalers"),
                                  ("keda.sh", "v1alpha1", "scaledobjects"), ("", "v1", "pods")):
    kopf.index(_group, _version, _plural, labels=MANAGED, id=f"{_plural}_index")(_index_child)
    kopf.on.event(_group, _version, _plural, labels=MANAGED, id=f"{_plural}_event")(_child_event)
