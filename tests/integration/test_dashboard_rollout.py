"""The dashboard in headless Chromium while the operator really rolls out and rolls back (KWOK makes pods Ready, a
fake Prometheus answers the analysis): the new version appears in the open list without a reload, its analysis is
charted, it is promoted from the page by keyboard (the same annotation and field manager as `kubectl shipyard
promote`); then a failing version is rolled back, seen on the same open page. Its pages pass axe-core's checks and fit
a narrow window. Screenshots: $SHIPYARD_SCREENSHOTS (see test_dashboard.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from axe_playwright_python import sync_playwright as axe_sync
from kopf.testing import KopfRunner

from tests.browser import Browser, DashboardProcess, words
from tests.integration.conftest import Cluster, create_artifacts_volume
from tests.integration.test_dashboard import annotations_of, row_text, wait_text
from tests.integration.test_operator_rollout import COMPRESSION, FakePrometheus, analysis, healthy, model, wait_status

pytestmark = pytest.mark.integration


def varying(query: str) -> float:
    """The fake Prometheus' error rates: the candidate's a little above the stable's, both moving; 1.2.0 fails."""
    varying.calls += 1  # type: ignore[attr-defined]
    n = varying.calls  # type: ignore[attr-defined]
    if 'version="1.2.0"' in query:
        return 0.4
    if 'version="1.0.0"' in query:
        return 0.003 + 0.001 * (n % 3) / 2
    return 0.004 + 0.003 * (n % 5) / 4


varying.calls = 0  # type: ignore[attr-defined]


def reported(name: str, tag: str, **spec: Any) -> dict[str, Any]:
    """A ModelDeployment whose compression Jobs report figures (hack/kwok/compression-reported.yaml)."""
    body = model(name, tag, **spec)
    body["spec"]["image"] = f"registry.example/acme/digits-reported:{tag}"
    return body


def test_a_rollout_promoted_from_the_page_then_a_rollback_seen_live(
        cluster: Cluster, operator: KopfRunner, namespace: str, prometheus: FakePrometheus, browser: Browser,
        dashboards: Callable[..., DashboardProcess]) -> None:
    create_artifacts_volume(cluster, namespace)
    prometheus.answer = varying
    rollout = {"steps": [{"weight": 25, "pause": "1h"}, {"weight": 50, "pause": "1h"}],
               "analysis": analysis(prometheus.address, minSamples=3, metrics=[
                   {"name": "error-rate", "builtin": "errorRate", "max": 0.05, "maxRelativeToStable": 2.0}])}
    cluster.apply(reported("digits", "1.0.0", compression=COMPRESSION, rollout=rollout), namespace)
    cluster.apply(model("resnet", "2.0.0", replicas=2), namespace)
    cluster.apply(model("whisper", "0.9.0", replicas=1), namespace)
    cluster.apply(model("bert", "1.0.0", replicas=2), namespace)
    for name, version in (("digits", "1.0.0"), ("resnet", "2.0.0"), ("whisper", "0.9.0"), ("bert", "1.0.0")):
        wait_status(cluster, namespace, name, healthy(version), message=f"{name} {version} healthy")
    cluster.apply(model("bert", "1.1.0-gatefail", replicas=2, compression=COMPRESSION), namespace)
    wait_status(cluster, namespace, "bert", lambda m: m["status"].get("phase") == "Failed", message="bert Failed")

    dashboard = dashboards("-n", namespace)
    listing = browser.page()
    listing.goto(dashboard.url)
    assert words(listing.locator("#rows th[scope=row]").all_inner_texts()) == ["bert", "digits", "resnet", "whisper"]
    assert row_text(listing, namespace, "digits").startswith("digits Healthy 1.0.0 - -")
    assert row_text(listing, namespace, "bert").startswith("bert Failed 1.0.0 - -")
    assert "Rejected: accuracy 0.6120 vs source 0.9722" in row_text(listing, namespace, "bert")  # the last event
    assert words(listing.locator(".counts li").all_inner_texts()) == ["Healthy 3", "Failed 1"]

    # A new version: the open list shows it as it rolls out (server-sent events, no reload).
    cluster.apply(reported("digits", "1.1.0", compression=COMPRESSION, rollout=rollout), namespace)
    wait_text(listing, f"[id='md-{namespace}--digits']", "1/2 (weight 25%, pause 1h)")
    assert row_text(listing, namespace, "digits").startswith("digits Progressing 1.0.0 1.1.0 1/2 (weight 25%")
    assert words(listing.locator(".counts li").all_inner_texts()) == ["Healthy 2", "Progressing 1", "Failed 1"]
    browser.shoot(listing, "dashboard-list.png")
    listing.fill("#filter", "progressing")
    assert listing.locator("#rows tr:not([hidden])").count() == 1
    listing.fill("#filter", "")

    page = browser.page()
    page.goto(f"{dashboard.url}models/{namespace}/digits")
    wait_status(cluster, namespace, "digits", lambda m: len(
        ((m["status"].get("analysis") or {}).get("metrics") or [{}])[0].get("history") or []) >= 8, 60,
        message="eight measurements of 1.1.0")
    page.wait_for_function("parseInt(document.querySelector('#analysis summary').innerText.split('(')[1]) >= 8",
                           timeout=30_000)
    assert "Step 1: 25% of replicas, pause 1h current step" in words(page.locator(".step").all_inner_texts())
    assert page.locator(".step.current").count() == 1
    legend = " ".join(page.locator("#chart-0 .legendtext").all_text_contents())
    assert "candidate 1.1.0" in legend and "max 0.05" in legend
    assert "stable 1.0.0" in legend and "limit: stable x 3" in legend
    assert page.locator("#chart-0 .scatterlayer .trace").count() == 4  # candidate, stable, max, relative limit
    assert page.locator("#chart-0 .scatterlayer .trace").first.locator(".point").count() >= 8
    artifacts = words(page.locator("#artifacts tbody tr").all_inner_texts())
    assert artifacts == [f"{v} Succeeded 1.8 MB → 467 kB 3.84x smaller 0.9722 → 0.9694 loss 0.29% 2.1 → 1.19 1.76x "
                         f"faster {a.split()[-2]} {a.split()[-1]}" for v, a in zip(("1.0.0", "1.1.0"), artifacts,
                                                                                    strict=True)], artifacts
    assert page.locator("#do-promote").is_enabled() and page.locator("#do-abort").is_enabled()
    browser.shoot(page, "dashboard-rollout.png")

    # Promote from the page with the keyboard: the confirmation opens on Cancel; Tab, Enter confirms.
    page.focus("#do-promote")
    page.keyboard.press("Enter")
    assert page.locator("#confirm").is_visible()
    assert page.inner_text("#confirm-text") == f"Promote 1.1.0 in {namespace}/digits now, skipping its remaining " \
                                               "steps and analysis?"
    assert page.evaluate("document.activeElement.id") == "confirm-cancel"
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    wait_text(page, "#action-result", f"Asked to promote 1.1.0 in {namespace}/digits (shipyard.dev/promote=1.1.0).")
    assert annotations_of(cluster, namespace, "digits")["shipyard.dev/promote"] == "1.1.0"
    md = json.loads(cluster.kubectl("get", "md", "digits", "-n", namespace, "-o", "json",
                                    "--show-managed-fields").stdout)
    owners = {f["manager"] for f in md["metadata"]["managedFields"] if "shipyard.dev/promote" in json.dumps(f)}
    assert owners == {"kubectl-shipyard"}  # the plugin's field manager, as `kubectl shipyard promote` sets it
    promoted = wait_status(cluster, namespace, "digits", healthy("1.1.0"), 60, message="1.1.0 promoted")
    assert promoted["status"]["controls"]["promote"] == "1.1.0"
    wait_text(page, "#summary", "Healthy")
    assert words(page.locator(".timeline li").all_inner_texts())[0].startswith("1.1.0 Promoted stable")

    # A failing version: rolled back by the analysis, seen on the same open page.
    cluster.apply(reported("digits", "1.2.0", compression=COMPRESSION, rollout=rollout), namespace)
    wait_status(cluster, namespace, "digits", lambda m: m["status"].get("phase") == "RolledBack", 90,
                message="1.2.0 rolled back")
    wait_text(page, "#summary", "RolledBack")
    wait_text(page, "#analysis", "Analysis of 1.2.0")
    assert page.inner_text("#analysis .headline .badge") == "Failed"
    timeline = words(page.locator(".timeline li").all_inner_texts())
    assert timeline[0].startswith("1.2.0 RolledBack") and "AnalysisFailed" in timeline[0], timeline
    assert timeline[1].startswith("1.1.0 Promoted stable"), timeline
    page.wait_for_function("document.querySelectorAll('#chart-0 .scatterlayer .point').length >= 2")
    legend = " ".join(page.locator("#chart-0 .legendtext").all_text_contents())
    assert "candidate 1.2.0" in legend
    failed = page.locator("#analysis details tbody tr").all_text_contents()  # folded: not rendered
    assert sum("Failed" in r for r in failed) >= 2  # more than failureLimit 1
    assert page.locator("#do-retry").is_enabled()  # the failed spec version may be retried
    assert not page.locator("#do-promote").is_enabled()
    assert "has no candidate version to promote" in page.inner_text("#why-promote")
    browser.shoot(page, "dashboard-rollback.png")
    wait_text(listing, f"[id='md-{namespace}--digits']", "RolledBack")
    assert row_text(listing, namespace, "digits").startswith("digits RolledBack 1.1.0 -")

    # Back to a kept older version from the page (the mouse this time): rollback-to, as `kubectl shipyard rollback`.
    kept = page.locator("button[data-action=rollback]", has_text="Roll back to 1.0.0")
    assert kept.is_enabled()
    kept.click()
    assert page.inner_text("#confirm-text") == f"Roll {namespace}/digits back to version 1.0.0?"
    page.click("#confirm-ok")
    wait_text(page, "#action-result",
              f"Asked to roll {namespace}/digits back to 1.0.0 (shipyard.dev/rollback-to=1.0.0).")
    assert annotations_of(cluster, namespace, "digits")["shipyard.dev/rollback-to"] == "1.0.0"
    back = wait_status(cluster, namespace, "digits", lambda m: m["status"].get("stableVersion") == "1.0.0", 60,
                       message="1.0.0 stable again")
    assert back["status"]["controls"]["rollbackTo"] == "1.0.0"
    wait_text(page, "#summary", "1.0.0")
    assert page.inner_text("#summary dl div:first-child dd") == "1.0.0"  # Stable, updated live
    wait_text(listing, f"[id='md-{namespace}--digits']", "1.0.0")

    # Accessible (axe-core: no serious or critical violation, contrast included) and readable in a narrow window.
    for url in (dashboard.url, f"{dashboard.url}models/{namespace}/digits"):
        check = browser.page()
        check.goto(url)
        check.wait_for_load_state("networkidle")
        found = axe_sync.Axe().run(check)
        serious = [v for v in found.response["violations"] if v.get("impact") in ("serious", "critical")]
        assert serious == [], [(v["id"], v["help"], [n["target"] for n in v["nodes"]][:3]) for v in serious]
        check.close()
    narrow = browser.page(width=380, height=800)
    narrow.goto(dashboard.url)
    assert narrow.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert "RolledBack" in row_text(narrow, namespace, "digits")
    assert narrow.evaluate("getComputedStyle(document.querySelector('#rows tr')).display") == "block"  # a card
    browser.shoot(narrow, "dashboard-narrow.png")


