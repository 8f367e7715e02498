"""The ``prometheus`` metric provider: a PromQL instant query returning one number. Does I/O (HTTP).

Spec fragment ``metrics[].prometheus {query, address}``; the query's ``{{namespace}}``, ``{{name}}``,
``{{version}}`` and ``{{stableVersion}}`` are replaced (escaped for a double-quoted PromQL string) before it runs.
Address: the metric's own, else ``spec.rollout.analysis.prometheus.address``, else the operator's
``--prometheus-address``; a spec-supplied one is contacted only when the egress rule allows it (``egress``).
Results: a scalar or a one-element vector is a value; an empty vector or NaN is no data; several series, another
result type or a Prometheus error is an Error. The PromQL helpers here are also used by ``builtin``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Final

from pydantic import Field

from shipyard.contract import schema
from shipyard.operator import analysis, egress
from shipyard.operator.providers import base

if TYPE_CHECKING:
    from shipyard.operator import spec as spec_mod

DEFAULT_RELATIVE_FLOOR: Final = 0.001
ADDRESS_PATTERN: Final = r"^https?://[^ /]+(/[^ ]*)?$"
NO_CREDENTIALS_RULE: Final = "!self.matches('^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@')"


class Query(schema.ApiModel):
    """A PromQL query returning one number."""

    query: Annotated[str, Field(min_length=1, max_length=4096, json_schema_extra=schema.k8s(validations=[
        schema.Cel("self.matches('\\\\S')", "a Prometheus query must not be blank")]))]
    """PromQL query; {{namespace}}, {{name}}, {{version}} and {{stableVersion}} are replaced before it runs."""
    address: Annotated[str, Field(max_length=512, pattern=ADDRESS_PATTERN, json_schema_extra=schema.k8s(
        validations=[schema.Cel(NO_CREDENTIALS_RULE, "a Prometheus address must not carry credentials "
                                "(user:password@host): addresses appear in status and Events",
                                reason="FieldValueForbidden")]))] | None = None
    """Prometheus base URL for this metric; default spec.rollout.analysis.prometheus.address."""


def build_label_value(value: str) -> str:
    """``value`` escaped for the inside of a double-quoted PromQL string literal."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def build_selector(labels: Mapping[str, str]) -> str:
    return "{" + ",".join(f'{k}="{build_label_value(v)}"' for k, v in labels.items()) + "}"


def render_query(template: str, namespace: str, name: str, version: str, stable_version: str | None) -> str:
    """A user's PromQL template with ``{{namespace}}``, ``{{name}}``, ``{{version}}``, ``{{stableVersion}}`` replaced.

    Values are escaped for a double-quoted PromQL string (``version="{{version}}"``); no stable version renders
    as the empty string (such a selector matches nothing: no data).
    """
    values = {"namespace": namespace, "name": name, "version": version, "stableVersion": stable_version or ""}
    return base.render_template(template, values, build_label_value)


def build_prometheus_value(payload: object) -> tuple[float | None, str | None]:
    """(value, error) from a decoded ``/api/v1/query`` response: a scalar or a one-element vector has a value;
    an empty vector or NaN is no data (None, None); anything else is an error."""
    if not isinstance(payload, Mapping):
        return None, "malformed response: not a JSON object"
    if payload.get("status") != "success":
        kind = payload.get("errorType") or "error"
        return None, f"Prometheus answered {kind}: {payload.get('error') or payload.get('status')}"
    data = payload.get("data")
    if not isinstance(data, Mapping):
        return None, "malformed response: no data"
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        return _parse_point(result)
    if kind == "vector":
        if not isinstance(result, list):
            return None, "malformed response: vector result is not a list"
        if not result:
            return None, None
        if len(result) > 1:
            series = ", ".join(_series_labels(s) for s in result[:3]) + (", ..." if len(result) > 3 else "")
            return None, f"query returned {len(result)} series, expected one: {series}"
        item = result[0]
        if not isinstance(item, Mapping):
            return None, "malformed response: vector element is not an object"
        return _parse_point(item.get("value"))
    return None, f"query returned a {kind}, expected a scalar or a one-element vector"


def _series_labels(series: object) -> str:
    labels = series.get("metric") if isinstance(series, Mapping) else None
    if not isinstance(labels, Mapping):
        return "{}"
    return "{" + ",".join(f"{k}={v!r}" for k, v in sorted(labels.items())) + "}"


def _parse_point(point: object) -> tuple[float | None, str | None]:
    if not isinstance(point, list) or len(point) != 2:
        return None, f"malformed response: sample {point!r:.100} is not [time, value]"
    raw = point[1]
    if not isinstance(raw, str):
        return None, f"malformed response: value {raw!r:.100} is not a string"
    try:
        value = float(raw)
    except ValueError:
        return None, f"value {raw!r:.100} is not a number"
    return (None, None) if math.isnan(value) else (value, None)


async def query_prometheus(env: base.Env, address: str, query: str) -> tuple[float | None, str | None]:
    """(value, error) of an instant query at ``address``; transport failures raise ProviderError."""
    address = address.rstrip("/")
    shown = egress.redact_url(address)
    status, body = await env.http.fetch(f"{address}/api/v1/query", {"query": query})
    try:
        payload: Any = json.loads(body)
    except ValueError:
        payload = None
    if status != 200:
        if isinstance(payload, Mapping) and payload.get("status") == "error":
            return None, f"HTTP {status}: {build_prometheus_value(payload)[1]}"
        return None, f"HTTP {status} from {shown}: {body[:200].decode('utf-8', 'replace')}"
    if payload is None:
        return None, f"malformed response from {shown}: not JSON: {body[:100].decode('utf-8', 'replace')}"
    return build_prometheus_value(payload)


def build_address(metric: spec_mod.Metric, analysis_spec: spec_mod.Analysis, env: base.Env) -> str | None:
    """The Prometheus a metric is queried at: its own address, the analysis', the operator's (None: none)."""
    return analysis_spec.address_for(metric) or env.prometheus_address


def build_spec_address(metric: spec_mod.Metric, analysis_spec: spec_mod.Analysis,
                       index: int) -> tuple[str, str] | None:
    """(field, address) of the spec-supplied Prometheus a metric uses; None when it uses the operator's."""
    if metric.prometheus is not None and metric.prometheus.address is not None:
        return f"spec.rollout.analysis.metrics[{index}].prometheus.address", metric.prometheus.address
    if analysis_spec.prometheus_address is not None:
        return "spec.rollout.analysis.prometheus.address", analysis_spec.prometheus_address
    return None


NO_ADDRESS: Final = ("no Prometheus address: set spec.rollout.analysis.prometheus.address, the metric's "
                     "prometheus.address or the operator's Prometheus address")


class PrometheusBackend:
    key: ClassVar[str] = "prometheus"
    planned: ClassVar[bool] = False

    def uses_pods(self, metric: spec_mod.Metric, analysis_spec: spec_mod.Analysis, env: base.Env) -> bool:
        return False

    def spec_address(self, metric: spec_mod.Metric, analysis_spec: spec_mod.Analysis,
                     index: int) -> tuple[str, str] | None:
        return build_spec_address(metric, analysis_spec, index)

    def relative_floor(self, metric: spec_mod.Metric) -> float:
        return DEFAULT_RELATIVE_FLOOR

    def build_query(self, request: base.MeasurementRequest) -> str:
        assert request.metric.prometheus is not None
        return render_query(request.metric.prometheus.query, request.namespace, request.name, request.version,
                            request.stable_version)

    async def measure(self, request: base.MeasurementRequest, env: base.Env) -> analysis.Sample:
        query = self.build_query(request)
        address = build_address(request.metric, request.analysis, env)
        if address is None:
            return analysis.Sample(value=None, query=query, error=NO_ADDRESS)
        value, error = await query_prometheus(env, address, query)
        return analysis.Sample(value=value, query=query, error=error)


BACKEND: Final = PrometheusBackend()
