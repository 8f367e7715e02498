"""What every metric provider module shares: the measurement request, the backend protocol, the HTTP client.

A provider module (``builtin``, ``prometheus``, ``scrape``, ``web``, ``job``) owns its spec fragment (the pydantic
type of its field in ``spec.rollout.analysis.metrics[]``), how it builds its request, which address a spec may make
the operator contact through it (the egress rule applies to it), whether it needs the version's pods, and how it
measures. It exposes one ``Backend`` object; ``shipyard.operator.providers`` registers them by field name.

Two kinds of backends: **pulled** ones are measured by the shell every interval (``measure``: HTTP, never raising
into the reconciler: ``providers.Providers`` turns any exception into an Error sample), and **planned** ones
(``job``) are measured by a child object the planner creates and whose outcome it reads (pure functions of the
module), so that no write happens outside the plan. The HTTP client (``Http``) does I/O; everything else here is
pure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol, runtime_checkable

import aiohttp

from shipyard import contract
from shipyard.operator import analysis, egress, naming

if TYPE_CHECKING:
    from shipyard.operator import observed as observed_mod
    from shipyard.operator import runtimes
    from shipyard.operator import spec as spec_mod

DEFAULT_TIMEOUT_SECONDS: Final = 5.0
# The labels of a planned measurement's child (a Job): the planner finds each metric's runs by them.
MEASUREMENT_COMPONENT: Final = "analysis"
LABEL_METRIC: Final = f"{naming.GROUP}/metric"
LABEL_RUN: Final = f"{naming.GROUP}/run"
MAX_RESPONSE_BYTES: Final = 8 * 1024 * 1024


class ProviderError(Exception):
    """A measurement that failed; its message (redacted, capped) becomes the Sample's error."""


@dataclass(frozen=True)
class MeasurementRequest:
    """One metric to measure for one version of a model.

    ``name`` is the ModelDeployment's, ``model`` the runtime's ``model`` label (the served model name);
    ``targets`` are the ``host:port`` of the version's ready pods (for backends that read the pods), whose metrics
    are at ``metrics_path``; ``runtime`` is the serving runtime when it is not Shipyard's own server (builtins then
    follow its metric mapping and select the version by its pods).
    """

    namespace: str
    name: str
    metric: spec_mod.Metric
    analysis: spec_mod.Analysis
    model: str
    version: str  # the version measured (candidate or stable)
    stable_version: str | None
    targets: tuple[str, ...] = ()
    allowed: tuple[egress.Allowed, ...] = ()  # the namespace's allow-list entries (the operator's are in Env)
    runtime: runtimes.ResolvedRuntime | None = None
    metrics_path: str = contract.PATH_METRICS
    stable_targets: tuple[str, ...] = ()  # the stable's ready pods (builtin predictionAgreement is measured there)

    @property
    def key(self) -> tuple[str, ...]:
        """Identifies a series of measurements (same metric definition, same version): state kept between them."""
        return self.namespace, self.name, self.metric.name, repr(self.metric.provider), self.version

    @property
    def where(self) -> str:
        return f"{self.namespace}/{self.name} metric {self.metric.name} of version {self.version}"


@dataclass
class Env:
    """The operator process' settings and state shared by the backends (one per process)."""

    prometheus_address: str | None  # the operator's own Prometheus (None: builtins are scraped from the pods)
    allowed: tuple[egress.Allowed, ...] = ()  # the operator's allow-list: its Prometheus and --allowed-* entries
    namespace_label: str | None = "namespace"  # the label Prometheus puts the pod's namespace in
    min_window_seconds: float = 60.0  # the shortest rate() window of builtin queries
    http: Http = field(default_factory=lambda: Http(DEFAULT_TIMEOUT_SECONDS))
    clock: Callable[[], float] = time.monotonic
    state: dict[str, Any] = field(default_factory=dict)  # per-backend state (e.g. the scraper's snapshots)


class Backend(Protocol):
    """One metric provider (see the module docstring)."""

    key: ClassVar[str]  # its field in a metric: builtin, prometheus, scrape, web, job
    planned: ClassVar[bool]  # measured through a child the planner creates (job), not pulled by the shell

    def uses_pods(self, metric: spec_mod.Metric, analysis_spec: spec_mod.Analysis, env: Env) -> bool:
        """Whether measuring needs the version's ready pods (``MeasurementRequest.targets``)."""
        ...

    def spec_address(self, metric: spec_mod.Metric, analysis_spec: spec_mod.Analysis,
                     index: int) -> tuple[str, str] | None:
        """(field path, address) of an address the spec makes the operator contact; None when it uses none."""
        ...

    def relative_floor(self, metric: spec_mod.Metric) -> float:
        """The floor under the stable's value in ``maxRelativeToStable`` comparisons."""
        ...

    async def measure(self, request: MeasurementRequest, env: Env) -> analysis.Sample:
        """Measures (pulled backends); may raise: the registry turns any exception into an Error sample."""
        ...


@runtime_checkable
class PlannedBackend(Backend, Protocol):
    """A backend measured by a child object per measurement (a Job), which the planner creates and reads back.

    The child carries ``naming.LABEL_COMPONENT = MEASUREMENT_COMPONENT``, ``LABEL_METRIC`` and ``LABEL_RUN`` (its
    measurement number), and reaches the versions through their own Services (``objects.build_version_service``).
    """

    def build_child_name(self, model: str, version: str, metric: str, run: int) -> str:
        """The child of a metric's ``run``-th measurement of a version (<= 63 characters, stable across restarts)."""
        ...

    def build_child(self, *, object_meta: Callable[[str, Mapping[str, str]], dict[str, Any]],
                    metric: spec_mod.Metric, model: str, served_model: str, namespace: str, candidate: str,
                    stable: str | None, port: int, run: int) -> dict[str, Any]:
        """The child measuring ``metric`` for the candidate (pure)."""
        ...

    def build_sample(self, view: observed_mod.JobView) -> analysis.Sample | None:
        """The measurement a finished child reports; None while it runs (pure)."""
        ...


class Http:
    """A lazily created aiohttp session with a total timeout per request and a bound on the response size."""

    def __init__(self, timeout_seconds: float) -> None:
        self.timeout_seconds = timeout_seconds
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_seconds))
        return self._session

    async def fetch(self, url: str, params: Mapping[str, str] | None = None, *, allow_redirects: bool = True,
                    method: str = "GET", data: bytes | None = None, headers: Mapping[str, str] | None = None,
                    timeout_seconds: float | None = None) -> tuple[int, bytes]:
        """Status and body of a request; transport failures and timeouts raise ProviderError."""
        timeout = aiohttp.ClientTimeout(total=timeout_seconds or self.timeout_seconds)
        try:
            async with self.session().request(method, url, params=params, allow_redirects=allow_redirects,
                                              data=data, headers=headers, timeout=timeout) as response:
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(65536):
                    size += len(chunk)
                    if size > MAX_RESPONSE_BYTES:
                        raise ProviderError(f"response of {egress.redact_url(url)} larger than {MAX_RESPONSE_BYTES} "
                                            "bytes")
                    chunks.append(chunk)
                return response.status, b"".join(chunks)
        except TimeoutError as exc:
            raise ProviderError(f"timed out after {timeout.total:g}s fetching {egress.redact_url(url)}") from exc
        except aiohttp.ClientError as exc:
            raise ProviderError(egress.build_capped(
                f"could not fetch {egress.redact_url(url)}: {exc or type(exc).__name__}")) from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def render_template(template: str, values: Mapping[str, str], escape: Callable[[str], str]) -> str:
    """``template`` with each ``{{key}}`` of ``values`` replaced by its escaped value, in one pass (a replaced value
    is never replaced again). Pure."""
    out: list[str] = []
    i = 0
    while i < len(template):
        for key, value in values.items():
            placeholder = "{{" + key + "}}"
            if template.startswith(placeholder, i):
                out.append(escape(value))
                i += len(placeholder)
                break
        else:
            out.append(template[i])
            i += 1
    return "".join(out)


def build_template_values(request: MeasurementRequest) -> dict[str, str]:
    """The placeholders every templated field accepts: namespace, name, version, stableVersion ("" when none)."""
    return {"namespace": request.namespace, "name": request.name, "version": request.version,
            "stableVersion": request.stable_version or ""}
