"""The ``web`` metric provider: GET or POST an HTTP(S) endpoint answering JSON, the value picked by a JSONPath.

Does I/O (HTTP). Spec fragment ``metrics[].web {url, method, headers, body, jsonPath, timeoutSeconds}`` (as Argo
Rollouts' web metric). ``{{namespace}}``, ``{{name}}``, ``{{version}}`` and ``{{stableVersion}}`` are replaced in
the URL (URL-encoded) and in the body (JSON-string-escaped) before the request.

Egress: the same rule as spec-supplied Prometheus addresses (``egress``): the rendered URL, without its query, must
match the operator's ``--prometheus-address``, an ``--allowed-prometheus-address`` or an entry of the namespace's
``shipyard.dev/allowed-prometheus-addresses`` annotation; anything else gets no request and every measurement is an
Error naming the rule. Redirects are not followed (a redirect could leave the allowed prefix).

Credentials: none. Headers are plain text in the spec (which GitOps repositories and ``kubectl get`` show), so
``Authorization``, ``Proxy-Authorization`` and ``Cookie`` are refused at admission; secret-backed headers would
need the operator to read Secrets in every watched namespace, which its RBAC deliberately never grants. An endpoint
that needs credentials is measured with a ``job`` metric instead: the kubelet mounts the Secret into the Job's pod,
and the operator never sees it (docs/security.md).

Value (the first JSONPath match): a number; a boolean (true = 1, false = 0); a string holding a number. No match or
null is no data; anything else (an object, a list, a non-numeric string), a non-2xx status or a body that is not
JSON is an Error.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from typing import TYPE_CHECKING, Annotated, ClassVar, Final, Literal

from jsonpath_ng import exceptions as jsonpath_exceptions
from jsonpath_ng.ext import parser as jsonpath_parser
from pydantic import Field

from shipyard.contract import schema
from shipyard.operator import analysis, egress
from shipyard.operator.providers import base

if TYPE_CHECKING:
    from shipyard.operator import spec as spec_mod

DEFAULT_RELATIVE_FLOOR: Final = 0.001
FORBIDDEN_HEADERS: Final = ("authorization", "proxy-authorization", "cookie")
URL_PATTERN: Final = r"^https?://[^ /?#]+(/[^ ]*)?$"
HEADER_NAME_PATTERN: Final = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"  # an HTTP token (RFC 9110)


FORBIDDEN_HEADER_MESSAGE: Final = ("credentials never belong in a spec: measure an endpoint that needs them with a job "
                                  "metric, whose pod gets them from a Secret")


class Header(schema.ApiModel):
    """A request header (plain text: never a credential)."""

    # One rule, checked by the API server (CEL) and by the type (Python): the names are case-insensitive.
    __constraints__ = (schema.Constraint(
        schema.Cel(f"!(self.name.lowerAscii() in {list(FORBIDDEN_HEADERS)})", FORBIDDEN_HEADER_MESSAGE,
                   field_path=".name", reason="FieldValueForbidden"),
        lambda d: f"@name: {FORBIDDEN_HEADER_MESSAGE}" if str(d.get("name")).lower() in FORBIDDEN_HEADERS else None),)

    name: Annotated[str, Field(max_length=256, pattern=HEADER_NAME_PATTERN)]
    """Header name, e.g. Accept. Authorization, Proxy-Authorization and Cookie are refused."""
    value: Annotated[str, Field(max_length=4096)]
    """Header value."""


class Web(schema.ApiModel):
    """An HTTP(S) endpoint answering JSON; the value is picked with a JSONPath."""

    __constraints__ = (schema.requires("body", "method", "POST", what="web.body"),)

    url: Annotated[str, Field(max_length=2048, pattern=URL_PATTERN, json_schema_extra=schema.k8s(validations=[
        schema.Cel("!self.matches('^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@')", "a web metric's url must not carry "
                   "credentials (user:password@host): urls appear in status and Events",
                   reason="FieldValueForbidden")]))]
    """URL of the endpoint, e.g. http://quality.example/api/score?version={{version}}; {{namespace}}, {{name}},
    {{version}} and {{stableVersion}} are replaced. It must be on an allowed address (see docs/security.md)."""
    method: Literal["GET", "POST"] = "GET"
    """HTTP method. Default GET."""
    headers: Annotated[tuple[Header, ...], Field(max_length=16, json_schema_extra=schema.k8s(
        list_type="map", list_map_keys=["name"]))] = ()
    """Request headers (plain text; never credentials)."""
    body: Annotated[str, Field(max_length=65536)] | None = None
    """Request body of a POST (sent as application/json), with the same placeholders as the url."""
    json_path: Annotated[str, Field(min_length=1, max_length=1024)]
    """JSONPath of the value in the response, e.g. $.data.score; the first match is used."""
    timeout_seconds: Annotated[int, Field(ge=1, le=60)] = 10
    """Timeout of one request, in seconds. Default 10."""


def build_url(template: str, values: dict[str, str]) -> str:
    """The URL with its placeholders replaced by URL-encoded values. Pure."""
    return base.render_template(template, values, lambda v: urllib.parse.quote(v, safe=""))


def build_body(template: str, values: dict[str, str]) -> bytes:
    """The body with its placeholders replaced by JSON-string-escaped values. Pure."""
    return base.render_template(template, values, lambda v: json.dumps(v)[1:-1]).encode()


def build_value(document: object, path: str) -> float | None:
    """The number at ``path`` in a decoded JSON document (see the module docstring); ValueError when the path is
    invalid or the value is not a number. Pure."""
    try:
        matches = jsonpath_parser.parse(path).find(document)
    except (jsonpath_exceptions.JsonPathParserError, jsonpath_exceptions.JsonPathLexerError, Exception) as exc:
        raise ValueError(f"jsonPath {path!r} is invalid: {exc}") from None
    if not matches:
        return None
    value = matches[0].value
    if value is None:
        return None
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"jsonPath {path!r} matched the string {value[:80]!r}, not a number") from None
        return None if math.isnan(number) else number
    kind = "a list" if isinstance(value, list) else "an object" if isinstance(value, dict) else type(value).__name__
    raise ValueError(f"jsonPath {path!r} matched {kind}, not a number")


def build_endpoint_address(url: str) -> str:
    """The URL without its query and fragment: what the egress rule matches."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


class WebBackend:
    key: ClassVar[str] = "web"
    planned: ClassVar[bool] = False

    def uses_pods(self, metric: spec_mod.Metric, analysis_spec: spec_mod.Analysis, env: base.Env) -> bool:
        return False

    def spec_address(self, metric: spec_mod.Metric, analysis_spec: spec_mod.Analysis,
                     index: int) -> tuple[str, str] | None:
        assert metric.web is not None
        # The template's address: the rendered one is checked again before the request (a placeholder in the host).
        return f"spec.rollout.analysis.metrics[{index}].web.url", build_endpoint_address(metric.web.url)

    def relative_floor(self, metric: spec_mod.Metric) -> float:
        return DEFAULT_RELATIVE_FLOOR

    async def measure(self, request: base.MeasurementRequest, env: base.Env) -> analysis.Sample:
        spec = request.metric.web
        assert spec is not None
        values = base.build_template_values(request)
        url = build_url(spec.url, values)
        shown = egress.redact_url(url)
        index = request.analysis.metrics.index(request.metric)
        decision = egress.assess_address(build_endpoint_address(url), f"spec.rollout.analysis.metrics[{index}].web.url",
                                         env.allowed + request.allowed, what="web metric address")
        if not decision.allowed:
            return analysis.Sample(value=None, query=f"{spec.method} {shown}", error=f"refused: {decision.reason}")
        headers = {h.name: h.value for h in spec.headers}
        data = None
        if spec.method == "POST":
            if not any(name.lower() == "content-type" for name in headers):  # header names are case-insensitive
                headers["Content-Type"] = "application/json"
            data = build_body(spec.body or "", values)
        status, body = await env.http.fetch(url, method=spec.method, data=data, headers=headers,
                                            allow_redirects=False, timeout_seconds=spec.timeout_seconds)
        query = f"{spec.method} {shown} {spec.json_path}"
        if not 200 <= status < 300:
            raise base.ProviderError(f"HTTP {status} from {shown}: {body[:200].decode('utf-8', 'replace')}")
        try:
            document = json.loads(body)
        except ValueError:
            raise base.ProviderError(f"the response of {shown} is not JSON: "
                                     f"{body[:100].decode('utf-8', 'replace')}") from None
        try:
            value = build_value(document, spec.json_path)
        except ValueError as exc:
            return analysis.Sample(value=None, query=query, error=str(exc))
        return analysis.Sample(value=value, query=query)


BACKEND: Final = WebBackend()
