"""The metric providers of the analysis: one module per backend, registered by the field it owns. Does I/O.

| field | module | measured by | needs pods | spec address (egress) |
|---|---|---|---|---|
| ``builtin`` | ``builtin`` | Prometheus, else a scrape of the pods | without Prometheus | the analysis' Prometheus |
| ``prometheus`` | ``prometheus`` | a PromQL instant query | no | the metric's or the analysis' |
| ``scrape`` | ``scrape`` | the version's pods' ``/metrics`` | yes | none |
| ``web`` | ``web`` | GET/POST of a JSON endpoint + JSONPath | no | the url |
| ``job`` | ``job`` | a Job the planner creates (planned) | no | none |

Adding a provider is one module (its spec fragment, request, egress, ``measure``) plus its line in ``BACKENDS``
and its field in ``spec.Metric``; the CRD is regenerated from the types. ``Providers`` is what the shell keeps for
the operator's lifetime: it picks each metric's backend from the registry, applies the egress rule to every
spec-supplied address before any request (a refused address gets none: each measurement is an Error naming the
rule), measures the candidate (and the stable for ``maxRelativeToStable``) concurrently, and never raises into the
reconciler: any exception of a backend becomes an Error sample, redacted and capped (``egress.build_capped``).
Only cancellation propagates. Verdicts are not decided here: ``analysis`` judges every backend's samples.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Final

from shipyard import contract
from shipyard.operator import analysis, egress
from shipyard.operator.providers import base, builtin, job, prometheus, scrape, web

if TYPE_CHECKING:
    from shipyard.operator import runtimes
    from shipyard.operator import spec as spec_mod

logger = logging.getLogger(__name__)

BACKENDS: Final[Mapping[str, base.Backend]] = {
    b.key: b for b in (builtin.BACKEND, prometheus.BACKEND, scrape.BACKEND, web.BACKEND, job.BACKEND)
}
DEFAULT_TIMEOUT_SECONDS: Final = base.DEFAULT_TIMEOUT_SECONDS


def backend_of(metric: spec_mod.Metric) -> base.Backend:
    """The backend measuring ``metric`` (the one whose field it sets)."""
    return BACKENDS[metric.provider_key]


def planned_backend(metric: spec_mod.Metric) -> base.PlannedBackend | None:
    """The backend of a metric measured by a planned child (a Job), None for a pulled one."""
    backend = backend_of(metric)
    return backend if backend.planned and isinstance(backend, base.PlannedBackend) else None


def build_relative_floor(metric: spec_mod.Metric) -> float:
    return backend_of(metric).relative_floor(metric)


def plan_pulled(analysis_spec: spec_mod.Analysis) -> tuple[spec_mod.Metric, ...]:
    """The metrics the shell measures (every backend but the planned ones)."""
    return tuple(m for m in analysis_spec.metrics if not backend_of(m).planned)


class Providers:
    """The providers of one operator process: shared HTTP session and backend state, the allow-list.

    ``prometheus_address`` is the operator's configured Prometheus (None: builtins are scraped from the pods);
    ``allowed_addresses`` the further addresses a spec may name (``--allowed-prometheus-address``); invalid entries
    raise ValueError (a configuration error: the operator must not start with it).
    """

    def __init__(self, prometheus_address: str | None = None, *, allowed_addresses: Sequence[str] = (),
                 timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS, namespace_label: str | None = "namespace",
                 min_window_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        own, problems = egress.parse_address_list(prometheus_address, egress.FLAG_OPERATOR, userinfo=True)
        more, more_problems = egress.parse_address_list(allowed_addresses, egress.FLAG_ALLOWED)
        if problems or more_problems:
            raise ValueError("; ".join(problems + more_problems))
        self.env = base.Env(prometheus_address=prometheus_address, allowed=own + more, namespace_label=namespace_label,
                            min_window_seconds=min_window_seconds, http=base.Http(timeout_seconds), clock=clock)

    @property
    def prometheus_address(self) -> str | None:
        return self.env.prometheus_address

    @property
    def allowed(self) -> tuple[egress.Allowed, ...]:
        return self.env.allowed

    def uses_pods(self, analysis_spec: spec_mod.Analysis) -> bool:
        """Whether some pulled metric reads the version's pods (the shell then lists them)."""
        return any(backend_of(m).uses_pods(m, analysis_spec, self.env) for m in plan_pulled(analysis_spec))

    def assess_address(self, metric: spec_mod.Metric, analysis_spec: spec_mod.Analysis,
                       namespace_allowed: Sequence[egress.Allowed] = ()) -> egress.Decision | None:
        """The egress decision on the metric's spec-supplied address; None when it uses none."""
        supplied = backend_of(metric).spec_address(metric, analysis_spec, analysis_spec.metrics.index(metric))
        if supplied is None:
            return None
        field, address = supplied
        return egress.assess_address(address, field, self.env.allowed + tuple(namespace_allowed),
                                     what=f"{metric.provider_key} metric address")

    def needs_namespace_allow_list(self, analysis_spec: spec_mod.Analysis) -> bool:
        """Whether some spec-supplied address is not settled by the operator's own configuration alone (the caller
        then reads the namespace's annotation; otherwise it need not)."""
        for metric in plan_pulled(analysis_spec):
            supplied = backend_of(metric).spec_address(metric, analysis_spec, analysis_spec.metrics.index(metric))
            if supplied is None or egress.has_userinfo(supplied[1]):
                continue
            decision = self.assess_address(metric, analysis_spec)
            if decision is not None and not decision.allowed:
                return True
        return False

    async def measure(self, request: base.MeasurementRequest) -> analysis.Sample:
        """One measurement; never raises (see the module docstring)."""
        metric = request.metric
        decision = self.assess_address(metric, request.analysis, request.allowed)
        if decision is not None and not decision.allowed:
            return analysis.Sample(value=None, query="", error=f"refused: {decision.reason}")
        try:
            sample = await backend_of(metric).measure(request, self.env)
        except asyncio.CancelledError:
            raise
        except (base.ProviderError, ValueError) as exc:
            sample = analysis.Sample(value=None, query="", error=str(exc))
        except Exception as exc:  # a bug in a backend must not reach the reconciler either
            logger.error("Failed to measure %s: internal error %s: %s", request.where, type(exc).__name__,
                         egress.build_capped(str(exc)))
            sample = analysis.Sample(value=None, query="", error=f"internal error: {type(exc).__name__}: {exc}")
        if sample.error is not None:
            sample = analysis.Sample(value=None, query=sample.query, error=egress.build_capped(sample.error))
            logger.warning("Failed to measure %s: %s", request.where, sample.error)
        return sample

    async def query_measurements(
        self,
        analysis_spec: spec_mod.Analysis,
        *,
        namespace: str,
        name: str,
        model: str,
        candidate_version: str,
        stable_version: str | None,
        candidate_targets: Sequence[str] = (),
        stable_targets: Sequence[str] = (),
        metric_names: Sequence[str] | None = None,
        namespace_allowed: Sequence[egress.Allowed] = (),
        runtime: runtimes.ResolvedRuntime | None = None,
    ) -> dict[str, analysis.Measurement]:
        """Measures every pulled metric (or those in ``metric_names``) concurrently, by metric name; never raises.

        The stable version is measured too for metrics with ``maxRelativeToStable`` when there is one.
        ``namespace_allowed`` are the entries of the namespace's allow-list annotation (``egress``); ``runtime`` the
        serving runtime when it is not Shipyard's server (its metrics path, its builtins' mapping).
        """
        metrics = [m for m in plan_pulled(analysis_spec) if metric_names is None or m.name in metric_names]

        def request(metric: spec_mod.Metric, version: str, targets: Sequence[str]) -> base.MeasurementRequest:
            return base.MeasurementRequest(namespace=namespace, name=name, metric=metric, analysis=analysis_spec,
                                           model=model, version=version, stable_version=stable_version,
                                           targets=tuple(targets), stable_targets=tuple(stable_targets),
                                           allowed=tuple(namespace_allowed),
                                           runtime=runtime, metrics_path=runtime.metrics_path if runtime is not None
                                           else contract.PATH_METRICS)

        async def one(metric: spec_mod.Metric) -> analysis.Measurement:
            if metric.compares_with_stable and stable_version is not None:
                candidate, stable = await asyncio.gather(
                    self.measure(request(metric, candidate_version, candidate_targets)),
                    self.measure(request(metric, stable_version, stable_targets)))
                return analysis.Measurement(candidate=candidate, stable=stable)
            return analysis.Measurement(candidate=await self.measure(request(metric, candidate_version,
                                                                             candidate_targets)))

        results = await asyncio.gather(*(one(m) for m in metrics))
        for metric, measurement in zip(metrics, results, strict=True):
            logger.debug("Measured %s/%s metric %s: %s", namespace, name, metric.name, measurement)
        return {m.name: r for m, r in zip(metrics, results, strict=True)}

    async def close(self) -> None:
        await self.env.http.close()


__all__ = ["BACKENDS", "Providers", "backend_of", "base", "build_relative_floor", "builtin", "job", "plan_pulled",
           "planned_backend", "prometheus", "scrape", "web"]
