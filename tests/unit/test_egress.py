"""Egress rules: which Prometheus addresses a spec may name, which pods are scraped, and what is redacted."""

from __future__ import annotations

from typing import Any

import pytest

from shipyard.operator import egress

OPERATOR = "--prometheus-address"
FLAG = "--allowed-prometheus-address"
NAMESPACE = "annotation of namespace ml"


def allow_list(operator: str | None = "http://prometheus.monitoring:9090", flags: tuple[str, ...] = (),
               namespace: str = "") -> tuple[egress.Allowed, ...]:
    own, p1 = egress.parse_address_list(operator, OPERATOR)
    more, p2 = egress.parse_address_list(flags, FLAG)
    ns, p3 = egress.parse_address_list(namespace, NAMESPACE)
    assert not (p1 or p2 or p3)
    return own + more + ns


@pytest.mark.parametrize(("address", "allowed", "allowed_by"), [
    pytest.param("http://prometheus.monitoring:9090", allow_list(), OPERATOR, id="operator-address"),
    pytest.param("HTTP://Prometheus.Monitoring.:9090/", allow_list(), OPERATOR, id="case-trailing-dot-slash"),
    pytest.param("http://prometheus.monitoring:9090/api/prom", allow_list(), OPERATOR, id="below-root-path"),
    pytest.param("http://prometheus.monitoring:9091", allow_list(), None, id="other-port"),
    pytest.param("https://prometheus.monitoring:9090", allow_list(), None, id="other-scheme"),
    pytest.param("http://prometheus.monitoring", allow_list(), None, id="default-port-80-is-not-9090"),
    pytest.param("http://thanos:80/", allow_list(flags=("http://thanos",)), FLAG, id="flag-default-port"),
    pytest.param("https://thanos", allow_list(flags=("https://thanos:443",)), FLAG, id="https-default-port"),
    pytest.param("http://mimir:8080/prometheus", allow_list(flags=("http://mimir:8080/prometheus",)), FLAG,
                 id="path-equal"),
    pytest.param("http://mimir:8080/prometheus/tenant-a", allow_list(flags=("http://mimir:8080/prometheus/",)), FLAG,
                 id="path-prefix"),
    pytest.param("http://mimir:8080/prometheus-evil", allow_list(flags=("http://mimir:8080/prometheus",)), None,
                 id="path-prefix-whole-segments-only"),
    pytest.param("http://mimir:8080/other", allow_list(flags=("http://mimir:8080/prometheus",)), None,
                 id="other-path"),
    pytest.param("http://mimir:8080/prometheus/../admin", allow_list(flags=("http://mimir:8080/prometheus",)), None,
                 id="dot-dot-escape"),
    pytest.param("http://mimir:8080/prometheus/%2e%2e/admin", allow_list(flags=("http://mimir:8080/prometheus",)),
                 None, id="encoded-dot-dot"),
    pytest.param("http://mimir:8080/prometheus/..%2fadmin", allow_list(flags=("http://mimir:8080/prometheus",)),
                 None, id="encoded-slash"),
    pytest.param("http://prom.team-a:9090", allow_list(namespace="http://prom.team-a:9090, http://x:1"), NAMESPACE,
                 id="namespace-annotation"),
    pytest.param("http://[::1]:9090", allow_list(namespace="http://[0:0:0:0:0:0:0:1]:9090"), NAMESPACE,
                 id="ipv6-normalized"),
    pytest.param("http://prom.team-b:9090", allow_list(namespace="http://prom.team-a:9090"), None,
                 id="other-namespace-entry"),
    pytest.param("http://169.254.169.254/latest/meta-data", allow_list(), None, id="metadata-endpoint"),
    pytest.param("http://user:pw@prometheus.monitoring:9090", allow_list(), None, id="userinfo-even-if-host-allowed"),
    pytest.param("http://token@prometheus.monitoring:9090", allow_list(), None, id="user-only"),
    pytest.param("http://prometheus.monitoring:9090@evil:80", allow_list(), None, id="host-confusion"),
    pytest.param("http://prometheus.monitoring:9090?x=1", allow_list(), None, id="query"),
    pytest.param("http://prometheus.monitoring:9090#f", allow_list(), None, id="fragment"),
    pytest.param("ftp://prometheus.monitoring:9090", allow_list(), None, id="scheme"),
    pytest.param("http://prometheus.monitoring:99999", allow_list(), None, id="port-out-of-range"),
    pytest.param("http://prometheus.monitoring:9090", allow_list(operator=None), None, id="nothing-allowed"),
])
def test_spec_addresses_are_allowed_only_by_an_entry(address: str, allowed: tuple[egress.Allowed, ...],
                                                     allowed_by: str | None) -> None:
    field = "spec.rollout.analysis.prometheus.address"
    decision = egress.assess_address(address, field, allowed)
    assert decision.allowed is (allowed_by is not None), decision.reason
    assert decision.reason.startswith(field + ": ")
    if allowed_by is not None:
        assert f"allowed by {allowed_by}" in decision.reason
    assert "pw" not in decision.reason and "token@" not in decision.reason


def test_a_refusal_names_the_field_and_the_rule() -> None:
    field = "spec.rollout.analysis.metrics[2].prometheus.address"
    refused = egress.assess_address("http://evil:9090", field, allow_list())
    assert refused.reason == f"{field}: http://evil:9090 is not an allowed Prometheus address: {egress.RULE}"
    for needle in ("--prometheus-address", "--allowed-prometheus-address", egress.ANNOTATION_ALLOWED):
        assert needle in refused.reason
    creds = egress.assess_address("http://admin:s3cret@prometheus.monitoring:9090", field, allow_list())
    assert not creds.allowed and "carries credentials" in creds.reason and "s3cret" not in creds.reason
    assert "admin" not in creds.reason


@pytest.mark.parametrize(("text", "entries", "problems"), [
    pytest.param("", 0, [], id="empty"),
    pytest.param("http://a:1, http://b:2  http://c:3", 3, [], id="commas-and-spaces"),
    pytest.param("http://a:1,not-a-url", 1, ["entry not-a-url must be an http or https URL"], id="invalid"),
    pytest.param("http://u:s3cret@a:1", 0, ["entry http://REDACTED@a:1 carries credentials"], id="credentials"),
    pytest.param("http://a:1/x/../y", 0, ["has a '.' or '..' segment"], id="dot-segment"),
])
def test_allow_lists_parse_and_report_bad_entries(text: str, entries: int, problems: list[str]) -> None:
    parsed, found = egress.parse_address_list(text, "src")
    assert len(parsed) == entries
    assert len(found) == len(problems)
    for problem, message in zip(problems, found, strict=True):
        assert problem in message and message.startswith("src entry") and "s3cret" not in message


@pytest.mark.parametrize(("url", "redacted"), [
    pytest.param("http://prom:9090/api", "http://prom:9090/api", id="nothing-to-redact"),
    pytest.param("http://user:s3cret@prom:9090/api", "http://REDACTED@prom:9090/api", id="userinfo"),
    pytest.param("https://tok@prom/x", "https://REDACTED@prom/x", id="user-only"),
    pytest.param("http://p/q?token=abc&query=up&api_key=k1&X-Amz-Signature=s", None, id="query-credentials"),
    pytest.param("http://p/q?password=&x=1", "http://p/q?password=REDACTED&x=1", id="blank-secret"),
])
def test_redact_url(url: str, redacted: str | None) -> None:
    out = egress.redact_url(url)
    if redacted is not None:
        assert out == redacted
    else:
        assert out == "http://p/q?token=REDACTED&query=up&api_key=REDACTED&X-Amz-Signature=REDACTED"


@pytest.mark.parametrize("text", [
    pytest.param("could not fetch http://user:s3cret@127.0.0.1:1/api/v1/query: Connection refused", id="plain"),
    pytest.param("Cannot connect to 'http://a:s3cret@h:1' (x)", id="quoted"),
    pytest.param("see https://h/x?sig=s3cret and s3://bucket/k?token=s3cret", id="two-urls"),
    pytest.param("unparsable http://u:s3cret@[::1 host", id="broken-url"),
    pytest.param("access denied (403) to https://b.s3.amazonaws.com/m.tar.gz?X-Amz-Credential=AKIA&"
                 "X-Amz-Signature=s3cret (a model download step's line)", id="presigned-fetch"),
    pytest.param("not found (404): oci://robot:s3cret@registry.example/models/m:1", id="oci-userinfo"),
])
def test_redact_text_removes_credentials_of_every_url(text: str) -> None:
    out = egress.redact_text(text)
    assert "s3cret" not in out and "REDACTED" in out


def test_build_capped_redacts_then_cuts() -> None:
    text = "HTTP 500 from http://u:s3cret@h:1: " + "x" * 1000
    capped = egress.build_capped(text)
    assert len(capped) == egress.MAX_ERROR_TEXT and capped.endswith("...") and "s3cret" not in capped
    assert egress.build_capped("short") == "short"


DEPLOYMENT = "digits-2-0-0"
LABELS = {"shipyard.dev/model": "digits", "shipyard.dev/component": "serving", "shipyard.dev/version": "2.0.0"}


def scrape_pod(**changes: Any) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "metadata": {"name": "digits-2-0-0-5d9c7-abcde", "labels": {**LABELS, "pod-template-hash": "5d9c7"},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "digits-2-0-0-5d9c7",
                                          "controller": True, "uid": "u"}]},
        "spec": {"containers": [{"name": "server"}]},
        "status": {"phase": "Running", "podIP": "127.1.0.7", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = pod
        for key in parents:
            node = node[key]
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return pod


@pytest.mark.parametrize(("pod", "reason"), [
    pytest.param(scrape_pod(), None, id="own-pod"),
    pytest.param(scrape_pod(metadata__ownerReferences=None), "not controlled by ReplicaSet", id="copied-labels"),
    pytest.param(scrape_pod(metadata__ownerReferences=[{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                                        "name": "other-5d9c7", "controller": True}]),
                 "not controlled by ReplicaSet", id="other-replicaset"),
    pytest.param(scrape_pod(metadata__ownerReferences=[{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                                        "name": "digits-2-0-0-5d9c7"}]),
                 "not controlled by ReplicaSet", id="owner-not-controller"),
    pytest.param(scrape_pod(metadata__ownerReferences=[{"apiVersion": "v1", "kind": "Pod",
                                                        "name": "digits-2-0-0-5d9c7", "controller": True}]),
                 "not controlled by ReplicaSet", id="owner-of-another-kind"),
    pytest.param(scrape_pod(metadata__labels={**LABELS, "pod-template-hash": "other"}),
                 "not controlled by ReplicaSet digits-2-0-0-other", id="hash-mismatch"),
    pytest.param(scrape_pod(metadata__labels=dict(LABELS)), "no pod-template-hash", id="no-hash"),
    pytest.param(scrape_pod(metadata__labels={**LABELS, "shipyard.dev/version": "1.0.0", "pod-template-hash": "5d9c7"}),
                 "labels of another version", id="other-version"),
    pytest.param(scrape_pod(spec__hostNetwork=True), "uses the host network", id="host-network"),
    pytest.param(scrape_pod(metadata__deletionTimestamp="2026-01-01T00:00:00Z"), "terminating", id="terminating"),
    pytest.param(scrape_pod(status__conditions=[{"type": "Ready", "status": "False"}]), "not ready", id="not-ready"),
    pytest.param(scrape_pod(status__phase="Succeeded"), "phase Succeeded", id="finished"),
    pytest.param(scrape_pod(status__podIP=None), "no podIP", id="no-ip"),
    pytest.param(scrape_pod(status__podIP="evil.example"), "podIP is not an IP address", id="ip-not-an-ip"),
])
def test_only_pods_of_the_versions_own_deployment_are_scraped(pod: dict[str, Any], reason: str | None) -> None:
    found = egress.assess_scrape_pod(pod, DEPLOYMENT, LABELS)
    if reason is None:
        assert found is None
    else:
        assert found is not None and reason in found


def test_operator_flags_collect_allowed_addresses_from_env_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from shipyard.operator import main

    monkeypatch.setenv(egress.ENV_ALLOWED, "http://a:1, http://b:2")
    args = main.build_parser().parse_args([FLAG, "http://c:3", FLAG, "http://d:4/x"])
    assert args.allowed_prometheus_addresses == ["http://a:1", "http://b:2", "http://c:3", "http://d:4/x"]


@pytest.mark.parametrize("argv", [
    pytest.param([FLAG, "http://u:s3cret@c:3"], id="credentials"),
    pytest.param([FLAG, "c:3"], id="not-a-url"),
    pytest.param([OPERATOR, "http://p:9090/a/../b"], id="operator-address-dot-segment"),
])
def test_operator_refuses_to_start_with_an_invalid_entry(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from shipyard.operator import main

    with pytest.raises(SystemExit) as exited:
        main.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert argv[0] in err and "s3cret" not in err
