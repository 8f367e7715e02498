"""`kubectl shipyard dashboard` in headless Chromium (Debian's, driven by Playwright) against the real control plane,
without the operator (statuses are written as the operator would): read-only mode and an account without patch (a
ServiceAccount's token) both refuse actions visibly, on the page and from the server; the server refuses foreign
Hosts and Origins and actions without the page's CSRF token, and serves plotly.js from the installed package.
The operator's real rollout and rollback, seen live: test_dashboard_rollout.py (these fixtures).

Screenshots go to $SHIPYARD_SCREENSHOTS when set (`SHIPYARD_SCREENSHOTS=docs/images` refreshes the README's).
"""

from __future__ import annotations

import importlib.util
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.browser import Browser, DashboardProcess
from tests.integration.conftest import Cluster
from tests.integration.test_plugin import PROGRESSING, create_model, reader_kubeconfig

pytestmark = pytest.mark.integration


def annotations_of(cluster: Cluster, namespace: str, name: str) -> dict[str, str]:
    md = cluster.get("md", name, namespace)
    assert md is not None
    return dict(md["metadata"].get("annotations") or {})


def row_text(page: Any, namespace: str, name: str) -> str:
    return " ".join(page.inner_text(f"[id='md-{namespace}--{name}']").split())


def wait_text(page: Any, selector: str, text: str, timeout: float = 90) -> None:
    """Waits until the element's rendered text contains `text` (live updates: the page is never reloaded)."""
    page.wait_for_function("([s, t]) => { const e = document.querySelector(s); return e && e.innerText.includes(t); }",
                           arg=[selector, text], timeout=timeout * 1000)


def post_from_page(page: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """What a script on the dashboard's own page could send, with the page's CSRF token (the button's request)."""
    answer: dict[str, Any] = page.evaluate("""async ([path, body]) => {
        const token = document.querySelector('meta[name="csrf-token"]').content;
        const r = await fetch(path, {method: 'POST', body: JSON.stringify(body),
                                     headers: {'Content-Type': 'application/json', 'X-CSRF-Token': token}});
        return {status: r.status, ...(await r.json())};
    }""", [path, body])
    return answer


# --- refusals ------------------------------------------------------------------------------------------------------

def test_read_only_mode_refuses_actions_visibly(cluster: Cluster, namespace: str, browser: Browser,
                                                dashboards: Callable[..., DashboardProcess]) -> None:
    create_model(cluster, namespace, PROGRESSING)
    dashboard = dashboards("-n", namespace, "--read-only")
    page = browser.page()
    page.goto(f"{dashboard.url}models/{namespace}/digits")
    assert "read-only" in page.inner_text("header")
    blocked = "The dashboard runs read-only (--read-only): no action can be taken."
    assert page.inner_text("#actions-blocked") == blocked
    for button in ("promote", "abort", "retry"):
        assert page.locator(f"#do-{button}").is_disabled()
    assert page.inner_text("#why-promote") == blocked  # the reason is the button's description
    assert page.get_attribute("#do-promote", "aria-describedby") == "why-promote"
    browser.expected = ("status of 403 (Forbidden)", "403 for POST")
    answer = post_from_page(page, f"/api/models/{namespace}/digits/promote", {"version": "1.1.0"})
    assert answer == {"status": 403, "ok": False,
                      "message": "The dashboard runs read-only (--read-only): no action was taken."}
    assert "shipyard.dev/promote" not in annotations_of(cluster, namespace, "digits")


def test_an_account_without_patch_sees_why_and_is_refused_by_the_api_server(
        cluster: Cluster, namespace: str, browser: Browser, tmp_path: Path,
        dashboards: Callable[..., DashboardProcess]) -> None:
    create_model(cluster, namespace, PROGRESSING)
    viewer = reader_kubeconfig(cluster, namespace, "viewer", "modeldeployments.shipyard.dev,events,deployments.apps",
                               tmp_path / "viewer")
    dashboard = dashboards("-n", namespace, kubeconfig=viewer)
    page = browser.page()
    page.goto(f"{dashboard.url}models/{namespace}/digits")
    blocked = page.inner_text("#actions-blocked")
    assert blocked.startswith(f"Your account may not patch ModelDeployments in namespace {namespace} (RBAC, asked "
                              "with a SelfSubjectAccessReview)"), blocked
    assert page.locator("#do-promote").is_disabled() and page.locator("#do-abort").is_disabled()
    assert page.inner_text("#live") == "Live"  # it may read and watch: only the actions are refused
    # Forced anyway: the API server refuses the patch, and the page's request gets the plugin's own message.
    browser.expected = ("status of 403 (Forbidden)", "403 for POST")
    answer = post_from_page(page, f"/api/models/{namespace}/digits/promote", {"version": "1.1.0"})
    assert answer["status"] == 403 and answer["ok"] is False
    assert answer["message"].startswith(f'Refused: not allowed to patch modeldeployment "digits" in namespace '
                                        f"{namespace} (RBAC)"), answer
    assert f"system:serviceaccount:{namespace}:viewer" in answer["message"]
    assert "shipyard.dev/promote" not in annotations_of(cluster, namespace, "digits")


def http(url: str, *, method: str = "GET", headers: dict[str, str] | None = None,
         body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {}, data=body)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.mark.parametrize(("method", "headers", "refusal"), [
    pytest.param("GET", {"Host": "rebound.example:{port}"}, "is not this dashboard's address", id="rebound-host"),
    pytest.param("POST", {"Origin": "http://evil.example", "Content-Type": "application/json"},
                 "Origin 'http://evil.example' is not this dashboard's", id="foreign-origin"),
    pytest.param("POST", {"Origin": "http://127.0.0.1:{port}", "Content-Type": "application/json"},
                 "the CSRF token is missing or wrong", id="no-csrf-token"),
    pytest.param("POST", {"Content-Type": "application/json", "X-CSRF-Token": "{token}"},
                 "an action must come from the dashboard's page (no Origin header)", id="no-origin"),
    pytest.param("POST", {"Origin": "http://127.0.0.1:{port}", "Content-Type": "text/plain", "X-CSRF-Token": "{token}"},
                 "an action's body must be JSON", id="form-body"),
])
def test_the_server_refuses_foreign_hosts_origins_and_requests_without_the_token(
        cluster: Cluster, namespace: str, dashboards: Callable[..., DashboardProcess], method: str,
        headers: dict[str, str], refusal: str) -> None:
    create_model(cluster, namespace, PROGRESSING)
    dashboard = dashboards("-n", namespace)
    port = dashboard.url.rstrip("/").rsplit(":", 1)[1]
    status, _, page = http(dashboard.url)
    token = page.decode().split('name="csrf-token" content="', 1)[1].split('"', 1)[0]
    sent = {k: v.format(port=port, token=token) for k, v in headers.items()}
    url = dashboard.url if method == "GET" else f"{dashboard.url}api/models/{namespace}/digits/promote"
    status, _, body = http(url, method=method, headers=sent, body=b'{"version": "1.1.0"}' if method == "POST" else None)
    assert status == 403 and refusal in json.loads(body)["message"], body
    assert "shipyard.dev/promote" not in annotations_of(cluster, namespace, "digits")


def test_pages_carry_a_strict_policy_and_plotly_comes_from_the_installed_package(
        cluster: Cluster, namespace: str, dashboards: Callable[..., DashboardProcess]) -> None:
    create_model(cluster, namespace, PROGRESSING)
    dashboard = dashboards("-n", namespace)
    status, headers, page = http(f"{dashboard.url}models/{namespace}/digits")
    assert status == 200
    assert "script-src 'self';" in headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Frame-Options"] == "DENY" and headers["Cache-Control"] == "no-store"
    html = page.decode()
    assert "http://" not in html.replace(dashboard.url, "") and "https://" not in html  # no CDN, no other origin
    spec = importlib.util.find_spec("plotly")
    assert spec is not None and spec.origin is not None
    shipped = (Path(spec.origin).parent / "package_data" / "plotly.min.js").read_bytes()
    src = html.split('<script src="/static/plotly-', 1)[1].split('"', 1)[0]
    status, _, served = http(f"{dashboard.url}static/plotly-{src}")
    assert status == 200 and served == shipped
    status, _, _ = http(f"{dashboard.url}models/elsewhere/digits")
    assert status == 404  # outside the dashboard's namespace
