"""Kubernetes quantities (shipyard.contract.quantity): the API server's grammar, exact decimals, and why Shipyard
keeps its own parser rather than lightkube's (which the operator already depends on)."""

from __future__ import annotations

import decimal
import re

import pytest
from lightkube.utils import quantity as lightkube_quantity

from shipyard.contract import quantity
from shipyard.operator import objects, planning
from tests.plansim import md

D = decimal.Decimal


@pytest.mark.parametrize(("text", "value"), [
    pytest.param("1", D(1), id="plain"),
    pytest.param(2, D(2), id="an-integer-as-the-api-server-stores-it"),
    pytest.param("500m", D("0.5"), id="milli"),
    pytest.param("250000u", D("0.25"), id="micro"),
    pytest.param("100n", D("1E-7"), id="nano"),
    pytest.param("1k", D(1000), id="kilo"),
    pytest.param("1.5Gi", D(1610612736), id="binary-fraction"),
    pytest.param("1Ei", D(2) ** 60, id="exbi"),
    pytest.param("1E", D(10) ** 18, id="exa-suffix"),
    pytest.param("1e3", D(1000), id="exponent"),
    pytest.param("1E3", D(1000), id="exponent-upper-case"),
    pytest.param("1.5e-3", D("0.0015"), id="negative-exponent"),
    pytest.param(".5", D("0.5"), id="leading-dot"),
    pytest.param("+2", D(2), id="sign"),
    pytest.param("0", D(0), id="zero"),
])
def test_quantities_the_api_server_accepts(text: str | int, value: decimal.Decimal) -> None:
    assert re.fullmatch(quantity.PATTERN, str(text))  # the CRD's pattern admits it
    assert quantity.parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "1x", "abc", "1 k", "1e1.5", "k", "1Ki2", "1.2.3"])
def test_what_is_not_a_quantity(text: str) -> None:
    with pytest.raises(ValueError, match="quantity"):
        quantity.parse_quantity(text)


@pytest.mark.parametrize("text", ["250000u", "100n", "1E3"])
def test_lightkube_refuses_what_the_api_server_accepts(text: str) -> None:
    """Why this parser exists (measured, lightkube 1.0.1): these pass admission and would raise in the operator."""
    with pytest.raises(ValueError):
        lightkube_quantity.parse_quantity(text)
    assert quantity.parse_quantity(text) > 0


@pytest.mark.parametrize(("cpu", "threads"), [
    pytest.param("1k", "1000", id="1k-is-1000-cores"),
    pytest.param("250000u", "1", id="a-quarter-core-is-one-thread"),
    pytest.param("2500m", "2", id="rounded-down"),
    pytest.param(4, "4", id="integer"),
])
def test_the_compression_jobs_threads_follow_any_cpu_limit(cpu: str | int, threads: str) -> None:
    """A cpu limit of 1k or 250000u passes admission; before, it made every reconcile of the object raise."""
    body = md("1.0.0", compression={"steps": [{"quantize": {"scheme": "int8-dynamic"}}],
                                    "evaluation": {"dataset": "builtin:digits"}, "artifacts": {"pvc": "a"},
                                    "resources": {"limits": {"cpu": cpu}}})
    parsed = planning.parse(body)
    assert not isinstance(parsed, Exception)
    _, job = objects.build_compression_objects(parsed, objects.build_meta(body), "1.0.0", "k" * 20)
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["OMP_NUM_THREADS"] == threads
