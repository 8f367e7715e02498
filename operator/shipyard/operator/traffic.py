"""Traffic through the Gateway API: ``spec.rollout.traffic`` and the pure decisions about the HTTPRoute/GRPCRoute
rules Shipyard manages (no I/O).

``replicas`` (the default): the model's Service selects the pods of every version during a canary, so the canary's
share is its share of Ready pods. ``gatewayAPI``: the model's Service selects the stable version only and is the
stable backend of the route's managed rules; the candidate's own Service (``<model>-<version>``, as its Deployment)
is the canary backend; the weights are set exactly per step, whatever the pod counts.

The route belongs to the user (or a GitOps tool). Shipyard writes only ``spec.rules``, by server-side apply with the
resourceVersion it read (a concurrent edit is a conflict, read again, never overwritten blind): every rule is kept
as found except (1) the backendRefs of the *managed* rules (those with a backendRef to the model's Service or to one
of its versions' Services) and (2) its preview rules (named ``shipyard-preview``, ``shipyard-preview-2``, ...), added
while a candidate is Ready and removed after. Gateway API v1.4 declares ``spec.rules`` an atomic list, so server-side
apply cannot own one rule; rebuilding the list from the route as it is means a person's or a GitOps tool's other
rules, hostnames and parentRefs are never fought over, only the managed weights are (a GitOps tool should ignore
them, as with Argo Rollouts: docs/traffic.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Final

from pydantic import Field

from shipyard.contract import schema

GROUP: Final = "gateway.networking.k8s.io"
API_VERSION: Final = f"{GROUP}/v1"
HTTP_ROUTE: Final = "HTTPRoute"
GRPC_ROUTE: Final = "GRPCRoute"
GATEWAY: Final = "Gateway"
PREVIEW_RULE: Final = "shipyard-preview"
DEFAULT_PREVIEW_HEADER: Final = "x-shipyard-version"
DNS_SUBDOMAIN_PATTERN: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
HEADER_NAME_PATTERN: Final = r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$"  # an HTTP token (Gateway API's HTTPHeaderName)


class GatewayAPI(schema.ApiModel):
    """Exact canary weights through Gateway API routes Shipyard manages the weights of (the routes exist: a person,
    a chart or a GitOps tool creates them with their parentRefs and matches)."""

    http_route: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)] = Field(
        alias="httpRoute")
    """Name of the HTTPRoute (in the model's namespace) whose rules with a backendRef to the model's Service
    (<name>) Shipyard manages: the model's Service as stable backend, the candidate's Service as canary backend,
    weighted per step; and a preview rule for the candidate."""
    grpc_route: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)] | None = Field(
        default=None, alias="grpcRoute")
    """Name of a GRPCRoute managed the same way, for the model's gRPC port (optional)."""
    preview_header: Annotated[str, Field(min_length=1, max_length=256, pattern=HEADER_NAME_PATTERN)] = (
        DEFAULT_PREVIEW_HEADER)
    """Header of the preview rule: requests carrying <header>: <candidate version> reach the candidate from the
    moment it is Ready (smoke tests, job metrics). Default x-shipyard-version."""


class ReplicasTraffic(schema.ApiModel):
    """Traffic split by Ready pods behind the model's Service (no settings)."""


class Traffic(schema.ApiModel):
    """How the candidate gets its share of requests: replicas (the default: by Ready pods behind the model's Service)
    or gatewayAPI (exact weights in HTTPRoute/GRPCRoute rules)."""

    __constraints__ = (schema.one_of("replicas", "gatewayAPI", what="spec.rollout.traffic")[1],)

    replicas: ReplicasTraffic | None = None
    gateway_api: GatewayAPI | None = Field(default=None, alias="gatewayAPI")


# ---------------------------------------------------------------------------------------------------------------
# Observed routes and Gateways


@dataclass(frozen=True)
class RouteView:
    """One route as read this pass. ``served`` False: the Gateway API CRDs are not installed; ``body`` None: the
    route does not exist."""

    kind: str
    name: str
    served: bool = True
    body: Mapping[str, Any] | None = None

    @property
    def rules(self) -> list[dict[str, Any]]:
        return [dict(r) for r in ((self.body or {}).get("spec") or {}).get("rules") or []]

    @property
    def generation(self) -> int:
        return int(((self.body or {}).get("metadata") or {}).get("generation") or 0)

    @property
    def resource_version(self) -> str:
        return str(((self.body or {}).get("metadata") or {}).get("resourceVersion") or "")

    @property
    def parent_refs(self) -> list[Mapping[str, Any]]:
        return list(((self.body or {}).get("spec") or {}).get("parentRefs") or [])

    @property
    def parent_statuses(self) -> list[Mapping[str, Any]]:
        return list(((self.body or {}).get("status") or {}).get("parents") or [])


@dataclass(frozen=True)
class GatewayView:
    namespace: str
    name: str
    found: bool = True
    conditions: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class TrafficObserved:
    """What the shell read for gatewayAPI traffic: the managed routes by kind, the Gateways their parentRefs name."""

    routes: Mapping[str, RouteView] = field(default_factory=dict)  # kind -> view
    gateways: Mapping[tuple[str, str], GatewayView] = field(default_factory=dict)  # (namespace, name) -> view


def build_parent_gateways(route: RouteView, namespace: str) -> list[tuple[str, str]]:
    """(namespace, name) of the Gateways a route's parentRefs name (other parent kinds are not checked)."""
    out = []
    for ref in route.parent_refs:
        if (ref.get("group") or GROUP) == GROUP and (ref.get("kind") or GATEWAY) == GATEWAY and ref.get("name"):
            out.append((str(ref.get("namespace") or namespace), str(ref["name"])))
    return sorted(set(out))


def _condition(conditions: Sequence[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def assess_route(route: RouteView, gateways: Mapping[tuple[str, str], GatewayView], namespace: str,
                 field_path: str) -> tuple[str, str] | None:
    """Why the route cannot carry the rollout's traffic: (reason, message), or None when it can. Pure.

    Not served (the CRDs are missing), not found, not attached (no parent status Accepted=True: no Gateway took
    it), or a parent Gateway absent or not Programmed."""
    what = f"{route.kind} {route.name!r} ({field_path})"
    if not route.served:
        return ("GatewayAPINotInstalled",
                f"The Gateway API is not installed: {route.kind.lower()}s.{GROUP} is not served by the API server "
                f"({field_path}); install the Gateway API CRDs and a Gateway controller, or use "
                "spec.rollout.traffic replicas")
    if route.body is None:
        return "RouteNotFound", f"{what} does not exist in namespace {namespace}"
    parents = build_parent_gateways(route, namespace)
    if not parents:
        return "RouteNotAttached", f"{what} names no Gateway in its parentRefs"
    accepted = [p for p in route.parent_statuses
                if (_condition(p.get("conditions") or [], "Accepted") or {}).get("status") == "True"]
    if not accepted:
        detail = "; ".join(f"{(p.get('parentRef') or {}).get('name')}: {c.get('reason')} {c.get('message', '')}"
                           .strip() for p in route.parent_statuses for c in p.get("conditions") or []
                           if c.get("type") == "Accepted")
        return ("RouteNotAttached", f"{what} is not attached to a Gateway: no Gateway controller accepted it"
                + (f" ({detail})" if detail else " (no status from a Gateway controller yet)"))
    for key in parents:
        gw = gateways.get(key)
        if gw is None:
            continue
        label = f"Gateway {key[1]!r} in namespace {key[0]} (a parent of {route.kind} {route.name!r})"
        if not gw.found:
            return "GatewayNotProgrammed", f"{label} does not exist"
        programmed = _condition(gw.conditions, "Programmed")
        if (programmed or {}).get("status") != "True":
            why = f": {programmed.get('reason')} {programmed.get('message', '')}".rstrip() if programmed else \
                ": no Programmed condition yet"
            return "GatewayNotProgrammed", f"{label} is not programmed{why}"
    return None


def assess_route_programmed(route: RouteView) -> bool:
    """Whether the Gateway controller has acted on the route's current generation: every parent status that accepted
    it reports that generation (Traefik, like other controllers, sets observedGeneration on its conditions)."""
    if route.body is None:
        return False
    gen = route.generation
    statuses = [c for p in route.parent_statuses for c in p.get("conditions") or [] if c.get("type") == "Accepted"]
    return bool(statuses) and all(int(c.get("observedGeneration") or 0) >= gen for c in statuses)


# ---------------------------------------------------------------------------------------------------------------
# Rules


@dataclass(frozen=True)
class Backends:
    """The Services of the managed rules: the model's (stable backend), the candidate's (canary backend), and every
    per-version Service name of the model (a rule naming any of them is managed)."""

    stable: str
    canary: str | None
    versions: frozenset[str] = frozenset()
    port: int = 8080


def _is_service_ref(ref: Mapping[str, Any]) -> bool:
    return (ref.get("group") or "") == "" and (ref.get("kind") or "Service") == "Service"


def assess_managed(rule: Mapping[str, Any], backends: Backends) -> bool:
    """A rule Shipyard manages: not one of its preview rules, with a backendRef to the model's or a version's
    Service."""
    if str(rule.get("name") or "").startswith(PREVIEW_RULE):
        return False
    names = {backends.stable, *backends.versions, *([backends.canary] if backends.canary else [])}
    return any(_is_service_ref(r) and r.get("name") in names for r in rule.get("backendRefs") or [])


def read_canary_weight(rules: Sequence[Mapping[str, Any]], backends: Backends) -> int | None:
    """The candidate's share (0..100) in the managed rules as they are: the canary backend's weight over the sum of
    the managed backends' weights (Gateway API: an absent weight is 1); None when no rule is managed, or the managed
    rules disagree."""
    shares = set()
    for rule in rules:
        if not assess_managed(rule, backends):
            continue
        refs = [r for r in rule.get("backendRefs") or [] if _is_service_ref(r)]
        total = sum(int(r.get("weight", 1)) for r in refs)
        canary = sum(int(r.get("weight", 1)) for r in refs if backends.canary and r.get("name") == backends.canary)
        shares.add(0 if total == 0 else round(100 * canary / total))
    return shares.pop() if len(shares) == 1 else None


def build_backend_refs(rule: Mapping[str, Any], backends: Backends, weight: int) -> list[dict[str, Any]]:
    """The managed rule's backendRefs for a canary share of ``weight`` percent: the model's Service (keeping the port
    and filters of an existing ref to it) at 100 - weight, the candidate's Service at weight. At 0 the model's
    Service alone, without a weight (one backend takes everything whatever its weight): a rule that already reads so,
    as a person or a GitOps tool wrote it, is left exactly as it is, so that a route at rest is never written."""
    refs_now = list(rule.get("backendRefs") or [])
    existing = next((r for r in refs_now if _is_service_ref(r) and r.get("name") == backends.stable), None)
    if weight == 0 and existing is not None and len(refs_now) == 1:
        return [dict(existing)]
    port = int((existing or {}).get("port") or backends.port)
    stable = {k: v for k, v in (existing or {}).items() if k not in ("weight",)} or {"name": backends.stable,
                                                                                     "port": port}
    stable.update({"name": backends.stable, "port": port})
    if weight > 0:
        stable["weight"] = 100 - weight
    refs = [stable] if weight < 100 else []
    if weight > 0 and backends.canary:
        refs.append({"name": backends.canary, "port": port, "weight": weight})
    return refs


def build_preview_rule(rule: Mapping[str, Any], name: str, header: str, version: str, canary: str,
                       port: int, kind: str) -> dict[str, Any]:
    """A rule reaching only the candidate: the managed rule's matches (or everything) plus an exact header match
    ``header: version``, and its filters. More header matches win over fewer (Gateway API precedence), so with the
    header a request takes this rule rather than the weighted one."""
    header_match = {"type": "Exact", "name": header, "value": version}
    matches = []
    for m in rule.get("matches") or [{}]:
        m = dict(m)
        m["headers"] = [h for h in m.get("headers") or [] if str(h.get("name", "")).lower() != header.lower()]
        m["headers"].append(header_match)
        if kind == HTTP_ROUTE and "path" not in m:
            m["path"] = {"type": "PathPrefix", "value": "/"}
        matches.append(m)
    out: dict[str, Any] = {"name": name, "matches": matches,
                           "backendRefs": [{"name": canary, "port": port, "weight": 1}]}
    if rule.get("filters"):
        out["filters"] = [dict(f) for f in rule["filters"]]
    if rule.get("timeouts"):
        out["timeouts"] = dict(rule["timeouts"])
    return out


@dataclass(frozen=True)
class Preview:
    header: str
    version: str


def build_rules(rules: Sequence[Mapping[str, Any]], backends: Backends, weight: int, preview: Preview | None,
                kind: str = HTTP_ROUTE) -> list[dict[str, Any]]:
    """The route's rules with the managed rules at ``weight`` percent for the candidate and the preview rules (one per
    managed rule, while ``preview`` is set); every other rule as it is, in its place. Pure."""
    out: list[dict[str, Any]] = []
    managed: list[Mapping[str, Any]] = []
    for rule in rules:
        if str(rule.get("name") or "").startswith(PREVIEW_RULE):
            continue  # rebuilt below
        if assess_managed(rule, backends):
            managed.append(rule)
            new = dict(rule)
            new["backendRefs"] = build_backend_refs(rule, backends, weight)
            out.append(new)
        else:
            out.append(dict(rule))
    if preview is not None and backends.canary:
        for i, rule in enumerate(managed):
            port = int(next((r.get("port") for r in rule.get("backendRefs") or []
                             if r.get("name") == backends.stable and r.get("port")), backends.port))
            name = PREVIEW_RULE if i == 0 else f"{PREVIEW_RULE}-{i + 1}"
            out.append(build_preview_rule(rule, name, preview.header, preview.version, backends.canary, port, kind))
    return out


def assess_rules_equal(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> bool:
    """Whether two rule lists are the same once the API server's defaults are applied to both (weight 1, group "",
    kind Service, a match's path PathPrefix /)."""
    return [_normal(r) for r in a] == [_normal(r) for r in b]


def _normal(rule: Mapping[str, Any]) -> Any:
    refs = [{**{"group": "", "kind": "Service", "weight": 1}, **dict(r)} for r in rule.get("backendRefs") or []]
    matches = rule.get("matches")
    out = {k: v for k, v in rule.items() if k not in ("backendRefs", "matches")}
    out["backendRefs"] = refs
    if matches is not None:
        out["matches"] = [{**m, "headers": [{"type": "Exact", **h} for h in m.get("headers") or []]}
                          if m.get("headers") else dict(m) for m in matches]
    return out


def build_route_apply(route: RouteView, rules: list[dict[str, Any]], namespace: str) -> dict[str, Any]:
    """The server-side apply body: ``spec.rules`` only, at the resourceVersion read (a concurrent change is a 409,
    read again next pass)."""
    return {"apiVersion": API_VERSION, "kind": route.kind,
            "metadata": {"name": route.name, "namespace": namespace, "resourceVersion": route.resource_version},
            "spec": {"rules": rules}}


def plan_gateway_replicas(total: int, canary_weight: int, stable_weight_floor: int) -> tuple[int, int]:
    """(candidate, stable) pods under exact weights. The candidate gets its step's share of the current replicas
    rounded up (at least one): its share of the peak load the replicas are sized for. The stable keeps enough for
    the larger of its share now and its share after the weight moves (``stable_weight_floor``: the lower of the
    canary weight in the route and the one about to be written), rounded up: it never shrinks below the load it
    still takes. Pure."""
    if total <= 0:
        return 0, 0
    canary = min(total, max(1, math.ceil(total * canary_weight / 100))) if canary_weight > 0 else 0
    stable = min(total, math.ceil(total * (100 - stable_weight_floor) / 100))
    return canary, stable
