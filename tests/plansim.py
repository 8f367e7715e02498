"""A small simulated cluster and clock around the pure planner (``planning.plan_reconcile``).

``Sim`` plays the API server and the Deployment/Job controllers: it applies each plan (pods of a version become
ready at once unless the version is "broken"), persists the planned status as the API server would (a merge
patch: None removes a field), advances a fake clock, feeds metric measurements when the planner asks for them and
finishes Jobs (compression and analysis) as a fake kubelet would. Used by the planner's unit tests and by the
property test over generated specs (tests/integration/test_valid_specs.py).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shipyard.operator import analysis, naming, objects, observed, planning, spec, traffic

T0 = datetime.datetime(2026, 11, 28, 12, 0, 0, tzinfo=datetime.UTC)
CRD = Path(__file__).resolve().parents[1] / "crds" / "modeldeployments.shipyard.dev.yaml"
IMAGE = "registry.example/acme/digits-model"

Measure = Callable[[str, datetime.datetime], float | None | ConnectionError]


def md(tag: str = "1.0.0", replicas: int = 4, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "shipyard.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "digits", "namespace": "ml", "uid": "uid-1", "generation": 1, "annotations": {}},
        "spec": {"image": f"{IMAGE}:{tag}", "model": {"path": "/models/digits"},
                 "serving": {"replicas": replicas}, **spec},
        "status": {},
    }


ANALYSIS = {"interval": "10s", "failureLimit": 1, "minSamples": 2, "noData": "Inconclusive",
            "metrics": [{"name": "error-rate", "builtin": "errorRate", "max": 0.05}]}
EVALUATE = {"spec": {"containers": [{"name": "evaluate", "image": "registry.example/acme/digits-model:1.1.0",
                                     "command": ["shipyard-runtime", "evaluate", "--dataset", "builtin:digits"],
                                     "env": [{"name": "SHIPYARD_MODEL_NAME", "value": "mine"}]}]}}
JOB_ANALYSIS = {"interval": "10s", "failureLimit": 0, "consecutiveErrorLimit": 2, "minSamples": 2,
                "metrics": [{"name": "error-rate", "builtin": "errorRate", "max": 0.05},
                            {"name": "accuracy", "job": {"template": EVALUATE}, "min": 0.9}]}
STEPS = [{"weight": 25, "pause": "60s"}, {"weight": 50, "pause": "60s"}]
COMPRESSION = {"steps": [{"prune": {"amount": 0.5}}, {"quantize": {"scheme": "int8-dynamic"}}],
               "evaluation": {"dataset": "builtin:digits"}, "artifacts": {"pvc": "shipyard-artifacts"}}


def good(version: str, now: datetime.datetime) -> float | None:
    return 0.0


class Sim:
    """A tiny fake cluster + clock around plan_reconcile."""

    def __init__(self, body: dict[str, Any], measure: Measure = good, tick: float = 5.0) -> None:
        self.body = body
        self.now = T0
        self.tick = tick
        self.measure = measure
        # what a predictionAgreement measurement counts beside its value (the stable's copies by outcome); None: none
        self.figures: Callable[[str, datetime.datetime], dict[str, float] | None] = lambda version, now: None
        self.config_data: dict[str, dict[str, str]] = {}  # ConfigMap name -> its data as last applied
        self.deployments: dict[str, observed.DeploymentView] = {}
        self.jobs: dict[str, observed.JobView] = {}
        self.config_maps: dict[str, str] = {}
        self.services: dict[str, str] = {}  # name -> spec hash
        self.selectors: dict[str, dict[str, str]] = {}  # Service name -> its selector
        self.min_serving: int | None = None  # the fewest ready pods the model's Service selected after any write
        self.budgets: dict[str, str] = {}  # PodDisruptionBudget name -> spec hash
        self.scalers: dict[str, observed.ScalerView] = {}  # ScaledObject / HPA name -> view
        self.scaler_writes = 0  # scaler objects applied
        self.keda: bool | None = None  # whether the fake API server serves ScaledObjects (None: not looked up)
        self.prometheus_address: str | None = None  # the operator's --prometheus-address
        self.activator_image: str | None = None  # the operator's --activator-image
        self.activator: observed.DeploymentView | None = None  # the activator's Deployment (ready at once)
        self.fetch_settings: objects.FetchSettings | None = None  # the operator's --fetch-image, --model-cache-path
        self.fetches: dict[str, tuple[observed.FetchView, ...]] = {}  # download steps the shell would list, by version
        self.broken: set[str] = set()  # versions whose pods never become ready
        self.frozen: set[str] = set()  # versions whose new pods stay starting (the ready ones stay ready)
        self.lagging: set[str] = set()  # versions whose Deployment controller catches up with a scale one pass late
        self._catching_up: dict[str, observed.DeploymentView] = {}
        self.job_outcome: tuple[str, str] = ("Succeeded", "accepted: sourceBytes=1000 compressedBytes=100")
        # An analysis Job (job metric) finishes with (phase, termination message, exit code) for its candidate.
        self.analysis_outcome: Callable[[str], tuple[str, str, int | None]] = lambda version: (
            "Succeeded", "accuracy 0.97 [value=0.97]", 0)
        self.analysis_jobs: list[dict[str, Any]] = []  # every analysis Job applied
        self.missing_pvc: str | None = None
        self.plans: list[planning.Plan] = []
        self.measured = 0
        self.peak_replicas = 0  # the most Deployment replicas at once, after any single write (the operator's order)
        # gatewayAPI traffic: the routes the fake API server holds (kind -> body; None: not read by the shell), whether
        # the Gateway API is served, the Gateways, and whether the fake Gateway controller acts on a route at once
        self.routes: dict[str, dict[str, Any]] | None = None
        self.gateway_api_served = True
        self.gateways: dict[tuple[str, str], traffic.GatewayView] = {}
        self.route_controller = True
        self.route_writes = 0
        # (pass, candidate weight in the HTTPRoute as the controller acts on it, replicas by version) after each pass
        self.timeline: list[tuple[int, int | None, dict[str, int]]] = []

    # --- what the operator observes
    def observed(self) -> observed.Observed:
        return observed.Observed(deployments=dict(self.deployments), services=dict(self.services),
                                 jobs=dict(self.jobs), config_maps=dict(self.config_maps),
                                 missing_pvc=self.missing_pvc, budgets=dict(self.budgets),
                                 scalers=dict(self.scalers), keda=self.keda, activator=self.activator,
                                 fetches=dict(self.fetches), traffic=self._traffic())

    def _traffic(self) -> traffic.TrafficObserved | None:
        if self.routes is None:
            return None
        gw = planning.parse(self.body)
        assert not isinstance(gw, spec.SpecError) and gw.spec.rollout.gateway_api is not None
        names = {traffic.HTTP_ROUTE: gw.spec.rollout.gateway_api.http_route,
                 traffic.GRPC_ROUTE: gw.spec.rollout.gateway_api.grpc_route}
        views = {kind: traffic.RouteView(kind=kind, name=name, served=self.gateway_api_served,
                                         body=copy.deepcopy(self.routes.get(kind)) if self.gateway_api_served else None)
                 for kind, name in names.items() if name}
        return traffic.TrafficObserved(routes=views, gateways=dict(self.gateways))

    def program_routes(self) -> None:
        """The fake Gateway controller acts on every route's current generation."""
        for body in (self.routes or {}).values():
            gen = body["metadata"]["generation"]
            for parent in body.setdefault("status", {}).setdefault("parents", []):
                for c in parent.get("conditions") or []:
                    c["observedGeneration"] = gen

    def route_weight(self) -> int | None:
        """The candidate's share in the HTTPRoute's first managed rule (None: no such route)."""
        body = (self.routes or {}).get(traffic.HTTP_ROUTE)
        if body is None:
            return None
        rule = next((r for r in body["spec"]["rules"] if any(b["name"] == "digits" or b["name"].startswith("digits-")
                                                              for b in r.get("backendRefs") or [])
                     and not str(r.get("name", "")).startswith(traffic.PREVIEW_RULE)), None)
        if rule is None:
            return None
        refs = rule["backendRefs"]
        total = sum(b.get("weight", 1) for b in refs)
        return round(100 * sum(b.get("weight", 1) for b in refs if b["name"] != "digits") / total) if total else 0

    @property
    def status(self) -> dict[str, Any]:
        return self.body["status"]

    def set_spec(self, **changes: Any) -> None:
        self.body["spec"].update(changes)
        self.body["metadata"]["generation"] += 1

    def annotate(self, key: str, value: str) -> None:
        self.body["metadata"]["annotations"][f"shipyard.dev/{key}"] = value

    def _ready(self, version: str, replicas: int) -> observed.DeploymentView:
        old = self.deployments.get(version)
        ready = 0 if version in self.broken else replicas
        if version in self.frozen and old is not None:
            ready = min(replicas, old.ready_replicas)
        return observed.DeploymentView(
            name=naming.build_deployment_name("digits", version), version=version,
            image=old.image if old else "", replicas=replicas, ready_replicas=ready, available_replicas=ready,
            updated_replicas=replicas, generation=1, observed_generation=1, spec_hash=old.spec_hash if old else "")

    def plan(self) -> planning.Plan:
        measurements = None
        body = copy.deepcopy(self.body)
        parsed = planning.parse(body)  # once per pass, as the shell does
        request = None if isinstance(parsed, spec.SpecError) else planning.plan_measurement(
            parsed, body.get("status") or {}, self.now)
        if request is not None:
            self.measured += 1
            value = self.measure(request.candidate, self.now)
            sample = analysis.Sample(value=None, query="q", error=str(value)) \
                if isinstance(value, ConnectionError) else analysis.Sample(
                    value=value, query="q", figures=self.figures(request.candidate, self.now))
            measurements = {name: analysis.Measurement(candidate=sample, stable=analysis.Sample(0.0, "q"))
                            for name in request.metrics}
        seen = self.observed()
        if not isinstance(parsed, spec.SpecError):  # the shell lists only the pods plan_fetch_checks names
            listed = planning.plan_fetch_checks(parsed, body.get("status") or {}, seen)
            seen = dataclasses.replace(seen, fetches={v: f for v, f in seen.fetches.items() if v in listed})
        return planning.plan_reconcile(body, seen, self.now, measurements, parsed=parsed,
                                       prometheus_address=self.prometheus_address,
                                       activator_image=self.activator_image, fetch=self.fetch_settings)

    def _lag(self, version: str, old: observed.DeploymentView, caught_up: observed.DeploymentView) -> None:
        """spec.replicas changed; the status still describes the old generation until the next pass."""
        generation = old.generation + 1
        self.deployments[version] = dataclasses.replace(old, replicas=caught_up.replicas, generation=generation)
        self._catching_up[version] = dataclasses.replace(caught_up, generation=generation,
                                                         observed_generation=generation)

    def step(self) -> planning.Plan:
        lagged, self._catching_up = self._catching_up, {}  # what the last pass saw lagging catches up after this one
        plan = self.plan()
        self.plans.append(plan)
        for obj in plan.apply:
            kind, name = obj["kind"], obj["metadata"]["name"]
            if kind == "Deployment" and obj["metadata"]["labels"].get(naming.LABEL_COMPONENT) == "activator":
                self.activator = observed.DeploymentView(
                    name=name, version="", image=obj["spec"]["template"]["spec"]["containers"][0]["image"],
                    replicas=1, ready_replicas=1, available_replicas=1, updated_replicas=1, generation=1,
                    observed_generation=1, spec_hash=objects.spec_hash_of(obj))
            elif kind == "Deployment":
                version = obj["metadata"]["labels"][naming.LABEL_VERSION]
                old = self.deployments.get(version)
                view = dataclasses.replace(
                    self._ready(version, obj["spec"]["replicas"]),
                    image=obj["spec"]["template"]["spec"]["containers"][0]["image"],
                    spec_hash=objects.spec_hash_of(obj))
                if version in self.lagging and old is not None and old.replicas != view.replicas:
                    self._lag(version, old, view)
                else:
                    self.deployments[version] = view
                self._note_peak()
            elif kind == "Service":
                self.services[name] = objects.spec_hash_of(obj)
                self.selectors[name] = dict(obj["spec"]["selector"])
                self._note_peak()
            elif kind == "ConfigMap":
                self.config_maps[name] = objects.spec_hash_of(obj)
                self.config_data[name] = dict(obj.get("data") or {})
            elif kind in (traffic.HTTP_ROUTE, traffic.GRPC_ROUTE):
                assert self.routes is not None
                body = self.routes[kind]
                assert obj["metadata"]["resourceVersion"] == body["metadata"]["resourceVersion"], "stale apply"
                assert set(obj["spec"]) == {"rules"}, "Shipyard applies spec.rules only"
                body["spec"]["rules"] = copy.deepcopy(obj["spec"]["rules"])
                body["metadata"]["generation"] += 1
                body["metadata"]["resourceVersion"] = str(int(body["metadata"]["resourceVersion"]) + 1)
                self.route_writes += 1
            elif kind == "PodDisruptionBudget":
                self.budgets[name] = objects.spec_hash_of(obj)
            elif kind in ("ScaledObject", "HorizontalPodAutoscaler"):
                self.scalers[name] = observed.ScalerView(kind=kind, spec_hash=objects.spec_hash_of(obj))
                self.scaler_writes += 1
            elif kind == "Job":
                labels = obj["metadata"]["labels"]
                self.jobs[name] = observed.JobView(name=name, key=labels.get(naming.LABEL_ARTIFACT, ""),
                                                   phase="Running", spec_hash=objects.spec_hash_of(obj),
                                                   labels=dict(labels))
                if not labels.get(naming.LABEL_ARTIFACT):
                    self.analysis_jobs.append(obj)
        for name, replicas in plan.scale:
            version = next(v for v, d in self.deployments.items() if d.name == name)
            old, view = self.deployments[version], self._ready(version, replicas)
            if version in self.lagging:
                self._lag(version, old, view)
            else:
                self.deployments[version] = view
            self._note_peak()
        for _, kind, name in plan.delete:
            if kind == "Deployment":
                self.deployments = {v: d for v, d in self.deployments.items() if d.name != name}
                if self.activator is not None and self.activator.name == name:
                    self.activator = None
            elif kind == "Job":
                self.jobs.pop(name, None)
            elif kind == "ConfigMap":
                self.config_maps.pop(name, None)
            elif kind == "Service":
                self.services.pop(name, None)
                self.selectors.pop(name, None)
            elif kind == "PodDisruptionBudget":
                self.budgets.pop(name, None)
            elif kind in ("ScaledObject", "HorizontalPodAutoscaler"):
                self.scalers.pop(name, None)
        for version, view in lagged.items():
            if version in self.deployments and version not in self._catching_up:
                self.deployments[version] = view
        # Running Jobs finish by the next pass, as the fake kubelet decides.
        for name, job in list(self.jobs.items()):
            if job.phase == "Running" and job.key:
                phase, message = self.job_outcome
                self.jobs[name] = dataclasses.replace(job, phase=phase, message=message)
            elif job.phase == "Running":
                phase, message, code = self.analysis_outcome(job.labels[naming.LABEL_VERSION])
                self.jobs[name] = dataclasses.replace(job, phase=phase, message=message, exit_code=code)
        merged = {**self.status, **plan.status}
        self.body["status"] = {k: v for k, v in merged.items() if v is not None}
        if self.routes is not None:
            if self.route_controller:
                self.program_routes()
            self.timeline.append((len(self.plans), self.route_weight(), self.replicas()))
        self.now += datetime.timedelta(seconds=self.tick)
        return plan

    def _note_peak(self) -> None:
        self.peak_replicas = max(self.peak_replicas, sum(self.replicas().values()))
        serving = self.serving_ready()
        if serving is not None:
            self.min_serving = serving if self.min_serving is None else min(self.min_serving, serving)

    def selected_versions(self, service: str = "digits") -> set[str] | None:
        """The versions a Service's selector picks (None: no such Service)."""
        selector = self.selectors.get(service)
        if selector is None:
            return None
        if selector.get(naming.LABEL_COMPONENT) == "activator":
            return set()
        wanted = selector.get(naming.LABEL_VERSION)
        return {v for v in self.deployments if wanted is None or naming.build_label_value(v) == wanted}

    def serving_ready(self, service: str = "digits") -> int | None:
        """Ready pods behind a Service now (None: no such Service)."""
        versions = self.selected_versions(service)
        return None if versions is None else sum(self.deployments[v].ready_replicas for v in versions)

    def run(self, until: Callable[[Sim], bool], max_passes: int = 200) -> Sim:
        for _ in range(max_passes):
            self.step()
            if until(self):
                return self
        raise AssertionError(f"did not settle: phase={self.status.get('phase')} message={self.status.get('message')}")

    def settle(self) -> Sim:
        """Runs until a pass plans nothing: no writes, no events, no status change, no timer."""
        def settled(s: Sim) -> bool:
            p = s.plans[-1]
            return not (p.apply or p.scale or p.delete or p.events) and p.requeue_after is None and \
                len(s.plans) > 1 and not planning.assess_status_changed(s.plans[-2].status, p.status)
        return self.run(settled)

    def replicas(self) -> dict[str, int]:
        return {v: d.replicas for v, d in self.deployments.items()}

    def reasons(self) -> list[str]:
        return [e.reason for p in self.plans for e in p.events]

    def history(self) -> list[tuple[str, str]]:
        return [(h["version"], h["outcome"]) for h in self.status.get("history", [])]

    def condition(self, type_: str) -> tuple[str, str]:
        c = next(c for c in self.status["conditions"] if c["type"] == type_)
        return c["status"], c["reason"]


