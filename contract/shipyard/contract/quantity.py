"""Kubernetes resource quantities (``500m``, ``1k``, ``250000u``, ``1.5Gi``, ``1e3``) as exact decimals. Pure.

The one parser of quantities in Shipyard (the operator's CPU threads, GPU counts, the node agent's CPU limits).
Kept here rather than taken from lightkube (``lightkube.utils.quantity``, already a dependency of the operator):
lightkube's parser refuses the ``n`` and ``u`` suffixes and ``E`` exponents that the API server accepts (``250000u``
and ``1E3`` raise ``ValueError``; tests/unit/test_quantity.py shows both), and the official client is not a
dependency of either image. The grammar is the API server's (k8s.io/apimachinery resource.Quantity):
``<sign><digits>[.<digits>]<suffix>``, suffixes ``n u m "" k M G T P E``, ``Ki Mi Gi Ti Pi Ei`` and
``e<exp>``/``E<exp>``.
"""

from __future__ import annotations

import decimal
import re
from typing import Final

PATTERN: Final = (r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
                  r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
MAX_LENGTH: Final = 64
_RE: Final = re.compile(PATTERN)
_DECIMAL_SUFFIXES: Final = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_BINARY_SUFFIXES: Final = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_CONTEXT: Final = decimal.Context(prec=60)


def parse_quantity(text: str | int) -> decimal.Decimal:
    """The exact value of a quantity (``"500m"`` -> 0.5, ``"1k"`` -> 1000, ``2`` -> 2); ValueError when it is not
    one."""
    raw = str(text)
    if len(raw) > MAX_LENGTH or not _RE.fullmatch(raw):
        raise ValueError(f"{raw!r} is not a Kubernetes quantity (e.g. 500m, 2, 1.5Gi)")
    number = re.match(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)", raw)
    assert number is not None  # the pattern matched
    value = decimal.Decimal(number.group(0))
    suffix = raw[number.end():]
    if suffix in _BINARY_SUFFIXES:
        return _CONTEXT.multiply(value, decimal.Decimal(2) ** _BINARY_SUFFIXES[suffix])
    if suffix in _DECIMAL_SUFFIXES:
        return _CONTEXT.scaleb(value, _DECIMAL_SUFFIXES[suffix])
    exponent = decimal.Decimal(suffix[1:])  # e<exponent>
    if exponent != exponent.to_integral_value() or abs(exponent) > 10_000:
        raise ValueError(f"{raw!r} is not a Kubernetes quantity: its exponent must be a whole number")
    return _CONTEXT.scaleb(value, int(exponent))


def build_cpu_cores(text: str | int) -> float:
    """CPU cores of a ``cpu`` quantity (``500m`` -> 0.5); ValueError when it is not a quantity."""
    return float(parse_quantity(text))
