"""The only module that talks to the Kubernetes API server (I/O): server-side apply, deletes, status patches, events.

Objects travel as plain dicts (the planner builds them); lightkube's generic resources carry them without
converting them to typed models, so nothing the planner sets is dropped or reshaped on the way.
"""

from __future__ import annotations

import base64
import datetime
import logging
from collections.abc import Mapping
from typing import Any

import httpx2
import lightkube
from lightkube.config import client_adapter
from lightkube.config.kubeconfig import KubeConfig
from lightkube.generic_resource import create_global_resource, create_namespaced_resource
from lightkube.types import CascadeType, PatchType

from shipyard.operator import httptransport, naming

logger = logging.getLogger(__name__)
# Per-request timeout (connect, pool wait, each read). lightkube's default of 10 s failed writes that were only
# queued behind others on a busy API server (N = 1,000 on 2 shared cores), each failure costing a retry.
REQUEST_TIMEOUT_SECONDS = 60.0
TRANSPORTS = ("aiohttp", "httpx")

_RESOURCES: dict[tuple[str, str], Any] = {
    ("apps/v1", "Deployment"): create_namespaced_resource("apps", "v1", "Deployment", "deployments"),
    ("v1", "Service"): create_namespaced_resource("", "v1", "Service", "services"),
    ("batch/v1", "Job"): create_namespaced_resource("batch", "v1", "Job", "jobs"),
    ("v1", "Event"): create_namespaced_resource("", "v1", "Event", "events"),
    ("v1", "ConfigMap"): create_namespaced_resource("", "v1", "ConfigMap", "configmaps"),
    ("v1", "Pod"): create_namespaced_resource("", "v1", "Pod", "pods"),
    ("policy/v1", "PodDisruptionBudget"): create_namespaced_resource("policy", "v1", "PodDisruptionBudget",
                                                                     "poddisruptionbudgets"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): create_namespaced_resource(
        "autoscaling", "v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers"),
    ("keda.sh/v1alpha1", "ScaledObject"): create_namespaced_resource("keda.sh", "v1alpha1", "ScaledObject",
                                                                     "scaledobjects"),
    ("v1", "PersistentVolumeClaim"): create_namespaced_resource("", "v1", "PersistentVolumeClaim",
                                                                "persistentvolumeclaims"),
    # spec.rollout.traffic.gatewayAPI: the routes whose rules Shipyard manages (read, and applied: spec.rules only)
    # and their Gateways (read)
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): create_namespaced_resource(
        "gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes"),
    ("gateway.networking.k8s.io/v1", "GRPCRoute"): create_namespaced_resource(
        "gateway.networking.k8s.io", "v1", "GRPCRoute", "grpcroutes"),
    ("gateway.networking.k8s.io/v1", "Gateway"): create_namespaced_resource(
        "gateway.networking.k8s.io", "v1", "Gateway", "gateways"),
    (naming.API_VERSION, naming.KIND): create_namespaced_resource(
        naming.GROUP, naming.VERSION, naming.KIND, naming.PLURAL
    ),
}

_NAMESPACE: Any = create_global_resource("", "v1", "Namespace", "namespaces")
# Read only, one named object each in the operator's own namespace (notifications.py; RBAC: resourceNames).
_CONFIGMAP: Any = _RESOURCES[("v1", "ConfigMap")]
_SECRET: Any = create_namespaced_resource("", "v1", "Secret", "secrets")


def resource_for(api_version: str, kind: str) -> Any:
    try:
        return _RESOURCES[(api_version, kind)]
    except KeyError:
        raise ValueError(f"Shipyard does not manage {kind} ({api_version})") from None


class NotServed(Exception):
    """The API server does not serve a kind (its CRD is not installed)."""


class Kube:
    """A thin async wrapper; one instance per operator process."""

    def __init__(self, client: lightkube.AsyncClient) -> None:
        self.client = client

    @classmethod
    def from_env(cls, kubeconfig: str | None = None, transport: str = "aiohttp") -> Kube:
        """A client from a kubeconfig (else $KUBECONFIG, else in-cluster). `transport`: "aiohttp" (default; see
        httptransport) or "httpx" (lightkube's own, httpx2 over httpcore2)."""
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown API transport {transport!r} (one of {', '.join(TRANSPORTS)})")
        config = (KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()).get()
        timeout = httpx2.Timeout(REQUEST_TIMEOUT_SECONDS)
        if transport == "httpx":
            return cls(lightkube.AsyncClient(config=config, field_manager=naming.FIELD_MANAGER, timeout=timeout))
        if config is None or config.user is None:
            raise ValueError("the kubeconfig has no current context with a user")
        secure = str(config.cluster.server).startswith("https")
        ssl_context = client_adapter.verify_cluster(config.cluster, config.user, config.abs_file) if secure else False
        return cls(lightkube.AsyncClient(config=config, field_manager=naming.FIELD_MANAGER, timeout=timeout,
                                         transport=httptransport.AiohttpTransport(ssl_context)))

    async def close(self) -> None:
        await self.client.close()

    async def apply_object(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply with Shipyard's field manager (force: the operator owns these fields)."""
        res = resource_for(obj["apiVersion"], obj["kind"])
        meta = obj["metadata"]
        applied = await self.client.apply(
            res(dict(obj)), name=meta["name"], namespace=meta["namespace"],
            field_manager=naming.FIELD_MANAGER, force=True,
        )
        result: dict[str, Any] = applied.to_dict() if hasattr(applied, "to_dict") else dict(applied)
        return result

    async def scale_deployment(self, namespace: str, name: str, replicas: int) -> dict[str, Any]:
        """Sets only spec.replicas (the pod template of a kept version stays as it was deployed)."""
        res = resource_for("apps/v1", "Deployment")
        patched = await self.client.patch(res, name, {"spec": {"replicas": replicas}}, namespace=namespace,
                                          patch_type=PatchType.MERGE)
        result: dict[str, Any] = patched.to_dict() if hasattr(patched, "to_dict") else dict(patched)
        return result

    async def list_pods(self, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        res = resource_for("v1", "Pod")
        return [p.to_dict() if hasattr(p, "to_dict") else dict(p)
                async for p in self.client.list(res, namespace=namespace, labels=dict(labels))]

    async def pvc_exists(self, namespace: str, name: str) -> bool:
        try:
            await self.client.get(resource_for("v1", "PersistentVolumeClaim"), name, namespace=namespace)
        except lightkube.ApiError as e:
            if e.status.code == 404:
                return False
            raise
        return True

    async def serves(self, api_version: str, kind: str, namespace: str) -> bool:
        """Whether the API server serves ``kind`` (one LIST of at most one object): False on 404, e.g. a custom
        resource whose CRD is not installed."""
        try:
            async for _ in self.client.list(resource_for(api_version, kind), namespace=namespace, chunk_size=1):
                break
        except lightkube.ApiError as e:
            if e.status.code == 404:
                return False
            raise
        except httpx2.HTTPStatusError as e:  # an unknown API group answers a plain-text 404, not a Status
            if e.response.status_code == 404:
                return False
            raise
        return True

    async def fetch_namespace_annotations(self, namespace: str) -> dict[str, str]:
        """The annotations of a Namespace (one GET). Refused (403) or gone (404): none, with a warning for 403."""
        try:
            ns = await self.client.get(_NAMESPACE, namespace)
        except lightkube.ApiError as e:
            if e.status.code == 403:
                logger.warning("Reading Namespace %s was forbidden: its allow-list annotations are not applied "
                               "(grant get on namespaces)", namespace)
            elif e.status.code != 404:
                raise
            return {}
        body: dict[str, Any] = ns.to_dict() if hasattr(ns, "to_dict") else dict(ns)
        return {str(k): str(v) for k, v in ((body.get("metadata") or {}).get("annotations") or {}).items()}

    async def fetch_object(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """One object (GET), None when it does not exist. Raises NotServed when the API server does not serve the
        kind at all (a custom resource whose CRD is not installed)."""
        try:
            return await self._get_or_none(resource_for(api_version, kind), namespace, name)
        except httpx2.HTTPStatusError as e:  # an unknown API group answers a plain-text 404, not a Status
            if e.response.status_code == 404:
                raise NotServed(f"{kind} ({api_version}) is not served") from None
            raise

    async def _get_or_none(self, res: Any, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj = await self.client.get(res, name, namespace=namespace)
        except lightkube.ApiError as e:
            if e.status.code == 404:
                return None
            raise
        body: dict[str, Any] = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
        return body

    async def fetch_configmap_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """A ConfigMap's data (one GET); None when it does not exist."""
        body = await self._get_or_none(_CONFIGMAP, namespace, name)
        return None if body is None else {str(k): str(v) for k, v in (body.get("data") or {}).items()}

    async def fetch_secret_data(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """A Secret's data, decoded (one GET); None when it does not exist. Its values are never logged."""
        body = await self._get_or_none(_SECRET, namespace, name)
        if body is None:
            return None
        return {str(k): base64.b64decode(v) for k, v in (body.get("data") or {}).items()}

    async def delete_object(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        res = resource_for(api_version, kind)
        try:
            await self.client.delete(res, name, namespace=namespace, cascade=CascadeType.BACKGROUND)
        except lightkube.ApiError as e:
            if e.status.code != 404:
                raise

    async def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        """Replaces the status fields Shipyard writes with one JSON merge patch on the status subresource."""
        res = resource_for(naming.API_VERSION, naming.KIND)
        patched = await self.client.patch(
            res.Status, name, {"status": dict(status)}, namespace=namespace, patch_type=PatchType.MERGE,
        )
        result: dict[str, Any] = patched.to_dict() if hasattr(patched, "to_dict") else dict(patched)
        return result

    async def post_event(self, owner: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on the ModelDeployment, so that `kubectl describe` tells the story."""
        meta = owner["metadata"]
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": owner.get("apiVersion", naming.API_VERSION),
                "kind": owner.get("kind", naming.KIND),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "source": {"component": naming.FIELD_MANAGER},
            "reportingComponent": naming.FIELD_MANAGER,
        }
        res = resource_for("v1", "Event")
        try:
            await self.client.create(res(event))
        except lightkube.ApiError as e:  # an event is best effort: never fail a reconcile over it
            logger.warning("Posting event %s for %s/%s failed: %s", reason, meta["namespace"], meta["name"], e)
