"""Names and labels fit Kubernetes' limits, are stable, and never collide for distinct versions."""

from __future__ import annotations

import re

import pytest

from shipyard.operator import naming

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@pytest.mark.parametrize(
    ("model", "version", "expected"),
    [
        pytest.param("digits", "1.4.0", "digits-1-4-0", id="semver"),
        pytest.param("Digits", "v2_RC.1", "digits-v2-rc-1", id="case-and-underscores"),
        pytest.param("m", "sha256-0123456789ab", "m-sha256-0123456789ab", id="digest-version"),
    ],
)
def test_deployment_names(model: str, version: str, expected: str) -> None:
    assert naming.build_deployment_name(model, version) == expected


@pytest.mark.parametrize(
    ("model", "version"),
    [
        pytest.param("a" * 63, "1.0.0", id="long-model"),
        pytest.param("model", "x" * 128, id="long-version"),
        pytest.param("m" * 40, "1.0.0-" + "r" * 40, id="both-long"),
    ],
)
def test_long_names_fit_and_stay_distinct(model: str, version: str) -> None:
    a = naming.build_deployment_name(model, version)
    b = naming.build_deployment_name(model, version + "1")
    assert len(a) <= 63 and len(b) <= 63
    assert DNS_LABEL.match(a) and DNS_LABEL.match(b)
    assert a != b
    assert a == naming.build_deployment_name(model, version)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("1.4.0", id="semver"),
        pytest.param("-weird..tag-", id="edges"),
        pytest.param("v" * 100, id="too-long"),
        pytest.param("a/b:c", id="slashes"),
    ],
)
def test_label_values_are_valid(text: str) -> None:
    value = naming.build_label_value(text)
    assert len(value) <= 63
    assert LABEL_VALUE.match(value)
