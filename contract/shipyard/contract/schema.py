"""Typed API objects that are also Kubernetes schemas. Pure: no I/O (pydantic only).

Shipyard's API is defined once, as pydantic models (``shipyard.operator.spec`` for the ModelDeployment,
``shipyard.contract.recipe`` for the compression recipe that the operator and the runtime share). From those models:

- the operator and the runtime parse documents into typed, frozen objects (``parse`` / ``ApiError``: every problem
  named by its field path, ``spec.rollout.steps[1].weight: ...``);
- the CRD's ``openAPIV3Schema`` is generated (``build_structural_schema``): types, descriptions (the attribute
  docstrings), defaults, bounds, enums, patterns, list types and CEL rules;
- rules that the API server checks in CEL and a program must check too (a config file read by the runtime has no
  API server in front of it) are declared once as a ``Constraint``, which renders both to CEL (for the CRD) and to a
  Python check (run by ``ApiModel``'s validator): one declaration, never two implementations. Rules only the API
  server needs (``Cel``) are plain CEL strings.

Field names are snake_case in Python and camelCase on the wire (``alias_generator``); a field whose wire name is not
the camelCase of its Python name (``maxSurgeGPUs``) sets ``alias``. Unknown fields are ignored (the API server prunes
them) unless ``parse(..., forbid_unknown=True)`` asks for them to be refused (config files written by hand; there a
field's Python name, ``fine_tune_epochs``, is unknown too: only wire names are accepted).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Final, TypeVar

import pydantic
from pydantic import BaseModel, ConfigDict, GetJsonSchemaHandler, ValidationInfo, model_validator
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

_M = TypeVar("_M", bound="ApiModel")

# Structural-schema keys in the order the generated YAML lists them (readability only).
_KEY_ORDER: Final = (
    "type", "format", "nullable", "description", "required", "default", "enum", "minimum", "exclusiveMinimum",
    "maximum", "exclusiveMaximum", "minLength", "maxLength", "pattern", "minItems", "maxItems", "maxProperties",
    "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys", "x-kubernetes-validations", "anyOf", "items", "additionalProperties", "properties",
)


# ---------------------------------------------------------------------------------------------------------------
# Rules


@dataclasses.dataclass(frozen=True)
class Cel:
    """A CEL rule that only the API server evaluates (an ``x-kubernetes-validations`` entry)."""

    rule: str
    message: str
    field_path: str | None = None  # e.g. ".limits": where the API server reports the error
    reason: str | None = None  # FieldValueInvalid (default), FieldValueForbidden, FieldValueRequired, ...

    def as_k8s(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclasses.dataclass(frozen=True)
class Constraint:
    """A rule over an object's fields, declared once and rendered twice: to CEL (``cel``) for the API server and to a
    Python check (``problem``) for programs that read the same object without an API server in front of them.

    Build them with ``one_of``, ``requires``, ``at_least_one`` and ``not_above``.
    """

    cel: Cel
    # the object's fields by wire name, after validation and defaults (None: unset) -> a problem, or None; a problem
    # about one field starts with "@<field>: " (the error is then reported at that field's path)
    check: Callable[[Mapping[str, Any]], str | None]

    def problem(self, document: Mapping[str, Any]) -> str | None:
        return self.check(document)


def _has(document: Mapping[str, Any], key: str) -> bool:
    return document.get(key) is not None


def _cel_has(field: str) -> str:
    return f"has(self.{field})"


def one_of(*fields: str, what: str) -> tuple[Constraint, Constraint]:
    """Exactly one of ``fields`` is set (two rules, so that the API server names which half failed)."""
    listed = ", ".join(fields)
    some = Constraint(
        Cel(" || ".join(_cel_has(f) for f in fields), f"{what} must set one of {listed}", reason="FieldValueRequired"),
        lambda d: None if any(_has(d, f) for f in fields) else f"must set one of {listed}")
    only = Constraint(
        Cel(" + ".join(f"({_cel_has(f)} ? 1 : 0)" for f in fields) + " <= 1",
            f"{what} must set only one of {listed}", reason="FieldValueForbidden"),
        lambda d: None if sum(_has(d, f) for f in fields) <= 1 else
        f"must set only one of {listed}, got {', '.join(f for f in fields if _has(d, f))}")
    return some, only


def at_least_one(*fields: str, what: str) -> Constraint:
    """At least one of ``fields`` is set."""
    listed = ", ".join(fields[:-1]) + f" or {fields[-1]}" if len(fields) > 1 else fields[0]
    return Constraint(
        Cel(" || ".join(_cel_has(f) for f in fields), f"{what} must set {listed}", reason="FieldValueRequired"),
        lambda d: None if any(_has(d, f) for f in fields) else f"must set {listed}")


def requires(field: str, other: str, value: str, *, what: str) -> Constraint:
    """``field`` may only be set when ``other`` equals ``value`` (``other`` defaults to something else)."""
    return Constraint(
        Cel(f"!has(self.{field}) || self.{other} == '{value}'", f"{what} is only allowed with {other} {value}",
            field_path=f".{field}", reason="FieldValueForbidden"),
        lambda d: None if not _has(d, field) or d.get(other) == value else
        f"@{field}: only allowed with {other} {value}")


def not_above(low: str, high: str, *, what: str) -> Constraint:
    """``low`` <= ``high`` when both are set."""
    return Constraint(
        Cel(f"!has(self.{high}) || !has(self.{low}) || self.{low} <= self.{high}",
            f"{what} {low} must not exceed {high}", field_path=f".{low}"),
        lambda d: None if not (_has(d, low) and _has(d, high)) or d[low] <= d[high] else
        f"@{low}: must not exceed {high} ({d[low]:g} > {d[high]:g})")


def k8s(*, validations: Sequence[Cel] = (), list_type: str | None = None, list_map_keys: Sequence[str] = (),
        default: Any = None, nullable: bool = False, format: str | None = None,
        preserve_unknown: bool = False, max_properties: int | None = None) -> dict[str, Any]:
    """Kubernetes-specific schema keys of a field (``Field(json_schema_extra=k8s(...))``)."""
    out: dict[str, Any] = {}
    if validations:
        out["x-kubernetes-validations"] = [v.as_k8s() for v in validations]
    if list_type:
        out["x-kubernetes-list-type"] = list_type
    if list_map_keys:
        out["x-kubernetes-list-map-keys"] = list(list_map_keys)
    if default is not None:
        out["default"] = default
    if nullable:
        out["nullable"] = True
    if format:
        out["format"] = format
    if preserve_unknown:
        out["x-kubernetes-preserve-unknown-fields"] = True
    if max_properties is not None:
        out["maxProperties"] = max_properties
    return out


# ---------------------------------------------------------------------------------------------------------------
# The base model


class ApiModel(BaseModel):
    """A frozen API object: camelCase on the wire, attribute docstrings as descriptions, rules on the class.

    ``__cel__``: CEL rules of the object for the API server only; ``__constraints__``: rules rendered to CEL and
    checked in Python too (see ``Constraint``).
    """

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True, extra="ignore",
                              use_attribute_docstrings=True, serialize_by_alias=True, validate_by_name=True,
                              validate_by_alias=True)
    __cel__: ClassVar[tuple[Cel, ...]] = ()
    __constraints__: ClassVar[tuple[Constraint, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _check_fields(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, Mapping) and info.context and info.context.get("forbid_unknown"):
            wire = sorted(f.alias or name for name, f in cls.model_fields.items())
            # wire names only: a Python name (fine_tune_epochs) next to its wire name would be silently dropped
            unknown = [str(k) for k in data if k not in wire]
            if unknown:
                raise ValueError(f"@{unknown[0]}: unknown field (known: {', '.join(wire)})")
        return data

    @model_validator(mode="after")
    def _check_constraints(self) -> ApiModel:
        if self.__constraints__:
            fields = {info.alias or name: getattr(self, name) for name, info in type(self).model_fields.items()}
            for constraint in self.__constraints__:
                problem = constraint.problem(fields)
                if problem is not None:
                    raise ValueError(problem)
        return self

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler(core_schema)
        target = handler.resolve_ref_schema(schema)
        rules = [*(c.cel for c in cls.__constraints__), *cls.__cel__]
        if rules:
            target["x-kubernetes-validations"] = [r.as_k8s() for r in rules]
        return schema


class ApiError(ValueError):
    """A document that does not fit its type: ``problems`` lists every problem, each starting with the field path."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))

    @property
    def field(self) -> str:
        """The path of the first problem's field."""
        return self.problems[0].split(": ", 1)[0] if self.problems else ""


def build_field_path(prefix: str, loc: Sequence[int | str]) -> str:
    """``spec.rollout.steps[1].weight`` from a prefix and a pydantic error location."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else str(part)
    return path


def build_problems(error: pydantic.ValidationError, prefix: str = "") -> list[str]:
    """``<field path>: <message>`` per error, the input value shown where it helps (short, never a whole object)."""
    problems: list[str] = []
    for item in error.errors(include_url=False):
        loc = [p for p in item["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tagged-union")))]
        message = str(item["msg"]).removeprefix("Value error, ")
        if message.startswith("@") and ": " in message:  # a constraint about one field (see Constraint.check)
            field, message = message[1:].split(": ", 1)
            loc.append(field)
        value = item.get("input")
        if item["type"] not in ("missing", "value_error") and isinstance(value, str | int | float | bool):
            shown = repr(value)
            message += f", got {shown if len(shown) <= 80 else shown[:77] + '...'}"
        problems.append(f"{build_field_path(prefix, loc)}: {message}")
    return problems


def parse(model: type[_M], document: Any, *, prefix: str = "", forbid_unknown: bool = False) -> _M:
    """``document`` as a ``model``; raises ApiError naming every problem's field (under ``prefix``)."""
    try:
        return model.model_validate(document, context={"forbid_unknown": forbid_unknown})
    except pydantic.ValidationError as exc:
        raise ApiError(build_problems(exc, prefix)) from None


# ---------------------------------------------------------------------------------------------------------------
# The structural schema


def build_structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The Kubernetes structural schema (``openAPIV3Schema`` form) of ``model``: references inlined, optional
    fields as plain properties, exclusive bounds in OpenAPI v3.0 form, titles dropped. Pure."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    definitions = raw.pop("$defs", {})
    return _convert(raw, definitions)


def _convert(node: Mapping[str, Any], definitions: Mapping[str, Any]) -> dict[str, Any]:
    node = dict(node)
    if "$ref" in node:
        target = _convert(definitions[node.pop("$ref").rsplit("/", 1)[-1]], definitions)
        own = _convert(node, definitions)
        rules = target.get("x-kubernetes-validations", []) + own.pop("x-kubernetes-validations", [])
        node = {**target, **own}
        if rules:
            node["x-kubernetes-validations"] = rules
        return _ordered(node)
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        members = [m for m in node.pop("anyOf") if m != {"type": "null"}]
        if len(members) != 1:
            raise ValueError(f"a union of {len(members)} types has no structural schema: {members}")
        inner = _convert(members[0], definitions)
        if node.get("default", ...) is None:
            node.pop("default")
        own = _convert(node, definitions)
        rules = inner.get("x-kubernetes-validations", []) + own.pop("x-kubernetes-validations", [])
        merged = {**inner, **own}
        if rules:
            merged["x-kubernetes-validations"] = rules
        return _ordered(merged)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs") or (key == "default" and value in (None, [])):
            continue  # an empty list default would be written into every stored object
        if key == "additionalProperties" and (value is False or (value is True or value == {}) and
                                               node.get("x-kubernetes-preserve-unknown-fields")):
            continue  # structural schemas have no additionalProperties: false; preserved fields need none
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = _number(value)
            out[key] = True
        elif key == "const":
            out["enum"] = [value]
        elif key == "properties":
            out[key] = {name: _convert(prop, definitions) for name, prop in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, Mapping):
            out[key] = _convert(value, definitions)
        elif key in ("minimum", "maximum"):
            out[key] = _number(value)
        elif key == "description":
            out[key] = " ".join(str(value).split())  # docstrings wrap; a description is one paragraph
        else:
            out[key] = value
    if "default" in out and isinstance(out["default"], float):
        out["default"] = _number(out["default"])
    return _ordered(out)


def _number(value: Any) -> Any:
    """Integral floats as ints (``4`` rather than ``4.0``), as the API server echoes them."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def _ordered(node: Mapping[str, Any]) -> dict[str, Any]:
    rank = {k: i for i, k in enumerate(_KEY_ORDER)}
    return dict(sorted(node.items(), key=lambda kv: rank.get(kv[0], len(rank))))
