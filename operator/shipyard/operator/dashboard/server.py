"""`kubectl shipyard dashboard`: the dashboard's web server (I/O). aiohttp, Jinja2 templates, server-sent events.

One process, the user's own kubeconfig (it sees exactly what the user may see):

- a ``Hub`` holds what one list+watch of ModelDeployments and one of their Events keep current (``run_reflector``:
  list, then watch from the list's resourceVersion; a broken watch lists again). Pages never poll: each open page
  holds one server-sent-events stream and is told which rows or sections changed (coalesced: a slow page gets the
  latest state, never a backlog), with SSE ids so that a reconnecting page misses nothing;
- actions go through ``plugin.apply_control`` (the commands' own code: same checks, same merge patch, same field
  manager), refused in read-only mode; whether to offer them is asked of the API server with a
  SelfSubjectAccessReview per namespace;
- every request is checked by ``views.assess_request`` (own Host and Origin; actions need the page's CSRF token),
  and every response carries a strict Content-Security-Policy (scripts only from this server).

Static files are the package's (``static/``) and plotly.js from the installed ``plotly`` distribution (no CDN).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import logging
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp_sse
import jinja2
import lightkube
from aiohttp import web
from lightkube.models.authorization_v1 import ResourceAttributes, SelfSubjectAccessReviewSpec
from lightkube.resources.authorization_v1 import SelfSubjectAccessReview

from shipyard.operator import kube, naming, plugin
from shipyard.operator.dashboard import views

logger = logging.getLogger("shipyard.dashboard")

PACKAGE_DIR: Final = Path(__file__).resolve().parent
STATIC_FILES: Final = ("dashboard.css", "dashboard.js")
ACCESS_TTL_SECONDS: Final = 30.0
KEPT_TTL_SECONDS: Final = 10.0
TOMBSTONES_KEPT: Final = 10_000
Key = views.Key


def fetch_plotly_js() -> tuple[Path, str]:
    """plotly.min.js as the installed plotly distribution ships it (found without importing plotly), its version."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or spec.origin is None:
        raise plugin.PluginError("the dashboard needs plotly (pip install 'shipyard-operator[dashboard]')")
    path = Path(spec.origin).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise plugin.PluginError(f"plotly is installed without its bundled plotly.min.js ({path})")
    return path, importlib.metadata.version("plotly")


# --- the shared state -----------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Subscriber:
    """One open page's stream: the keys changed since it last sent (coalesced), woken on change."""

    model: Key | None  # None: the list page (every key)
    dirty: set[Key] = field(default_factory=set)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, key: Key) -> None:
        if self.model is None or self.model == key:
            self.dirty.add(key)
            self.wake.set()


class Hub:
    """The ModelDeployments and their recent Events in scope, a change sequence, and the open pages."""

    def __init__(self) -> None:
        self.models: dict[Key, dict[str, Any]] = {}
        self.events: dict[Key, dict[str, dict[str, Any]]] = {}
        self.seq = 0
        self.changed: dict[Key, int] = {}  # the sequence number of each key's last change (deleted keys too)
        self.subscribers: set[Subscriber] = set()
        self.states: dict[str, str] = {"modeldeployments": "connecting", "events": "connecting"}
        self.synced = asyncio.Event()
        self.closing = False

    # changes
    def _touch(self, key: Key) -> None:
        self.seq += 1
        self.changed[key] = self.seq
        for sub in self.subscribers:
            sub.offer(key)

    def put_model(self, body: Mapping[str, Any]) -> None:
        trimmed = views.build_trimmed_model(body)
        meta = trimmed["metadata"]
        key = (str(meta["namespace"]), str(meta["name"]))
        if self.models.get(key) != trimmed:
            self.models[key] = trimmed
            self._touch(key)

    def remove_model(self, key: Key) -> None:
        if self.models.pop(key, None) is not None:
            self._touch(key)
            if len(self.changed) > len(self.models) + TOMBSTONES_KEPT:
                self.changed = {k: s for k, s in self.changed.items() if k in self.models}

    def replace_models(self, bodies: Iterable[Mapping[str, Any]]) -> None:
        seen = set()
        for body in bodies:
            meta = body.get("metadata") or {}
            seen.add((str(meta.get("namespace")), str(meta.get("name"))))
            self.put_model(body)
        for key in set(self.models) - seen:
            self.remove_model(key)

    def put_event(self, event: Mapping[str, Any], deleted: bool = False) -> None:
        found = views.build_event_record(event)
        if found is None:
            return
        key, record = found
        kept = self.events.setdefault(key, {})
        if deleted:
            if kept.pop(record["id"], None) is None:
                return
        else:
            kept[record["id"]] = record
            if len(kept) > views.EVENTS_KEPT:
                newest = views.build_recent_events(kept.values())
                self.events[key] = {e["id"]: e for e in newest}
        if key in self.models:
            self._touch(key)

    def replace_events(self, events: Iterable[Mapping[str, Any]]) -> None:
        before = set(self.events)
        self.events = {}
        for event in events:
            found = views.build_event_record(event)
            if found is not None:
                self.events.setdefault(found[0], {})[found[1]["id"]] = found[1]
        for key, kept in self.events.items():
            if len(kept) > views.EVENTS_KEPT:
                self.events[key] = {e["id"]: e for e in views.build_recent_events(kept.values())}
        for key in (before | set(self.events)) & set(self.models):
            self._touch(key)

    def recent_events(self, key: Key, limit: int = views.EVENTS_KEPT) -> list[dict[str, Any]]:
        return views.build_recent_events((self.events.get(key) or {}).values(), limit)

    def set_state(self, what: str, state: str) -> None:
        if self.states.get(what) != state:
            self.states[what] = state
            for sub in self.subscribers:
                sub.wake.set()

    # pages
    def subscribe(self, model: Key | None, since: int | None) -> Subscriber:
        sub = Subscriber(model)
        if since is not None:
            for key, seq in self.changed.items():
                if seq > since:
                    sub.offer(key)
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def close(self) -> None:
        self.closing = True
        for sub in self.subscribers:
            sub.wake.set()


# --- watching -------------------------------------------------------------------------------------------------------

def _as_dict(obj: Any) -> dict[str, Any]:
    return dict(obj.to_dict()) if hasattr(obj, "to_dict") else dict(obj)


async def run_reflector(hub: Hub, what: str, list_: Callable[[], Any], watch: Callable[[str], Any],
                        replace: Callable[[list[dict[str, Any]]], None],
                        apply: Callable[[str, dict[str, Any]], None]) -> None:
    """List, then watch from the list's resourceVersion, forever; a watch that fails (410 Gone, the API server
    restarting, a dropped connection) lists again after a pause (1 s, doubling to 30 s while it keeps failing)."""
    pause = 1.0
    while True:
        try:
            listing = list_()
            items = [_as_dict(o) async for o in listing]
            replace(items)
            hub.set_state(what, "live")
            if what == "modeldeployments":
                hub.synced.set()
            pause = 1.0
            async for kind, obj in watch(listing.resourceVersion):
                apply(kind, _as_dict(obj))
            raise RuntimeError("the watch ended")
        except asyncio.CancelledError:
            raise
        except lightkube.ApiError as e:
            code = e.status.code
            hub.set_state(what, "not allowed (RBAC)" if code == 403 else f"API error {code}: {e.status.message}")
            if what == "modeldeployments" and code == 403:
                hub.synced.set()  # nothing to wait for: the page says why
            logger.warning("Watching %s failed (%s): %s", what, code, e.status.message)
        except Exception as e:  # the connection, a decoding problem: say so on the pages, list again
            hub.set_state(what, f"reconnecting ({type(e).__name__})")
            logger.warning("Watching %s failed: %s", what, e)
        await asyncio.sleep(pause)
        pause = min(pause * 2, 30.0)


def start_reflectors(hub: Hub, client: lightkube.AsyncClient, namespace: str | None) -> list[asyncio.Task[None]]:
    md_res = kube.resource_for(naming.API_VERSION, naming.KIND)
    event_res = kube.resource_for("v1", "Event")
    ns = namespace or lightkube.ALL_NS
    fields: dict[str, Any] = {"involvedObject.kind": naming.KIND}

    def apply_model(kind: str, body: dict[str, Any]) -> None:
        if kind == "DELETED":
            meta = body.get("metadata") or {}
            hub.remove_model((str(meta.get("namespace")), str(meta.get("name"))))
        elif kind in ("ADDED", "MODIFIED"):
            hub.put_model(body)

    def apply_event(kind: str, body: dict[str, Any]) -> None:
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            hub.put_event(body, deleted=kind == "DELETED")

    return [
        asyncio.create_task(run_reflector(
            hub, "modeldeployments", lambda: client.list(md_res, namespace=ns, chunk_size=500),
            lambda rv: client.watch(md_res, namespace=ns, resource_version=rv), hub.replace_models, apply_model)),
        asyncio.create_task(run_reflector(
            hub, "events", lambda: client.list(event_res, namespace=ns, fields=fields, chunk_size=500),
            lambda rv: client.watch(event_res, namespace=ns, fields=fields, resource_version=rv),
            hub.replace_events, apply_event)),
    ]


# --- the application ------------------------------------------------------------------------------------------------

@dataclass
class Settings:
    namespace: str | None  # None: all namespaces
    read_only: bool
    address: str
    port: int
    context: str


class Dashboard:
    """The server's state: the Hub, the clients, the templates, the CSRF token, the caches of RBAC answers."""

    def __init__(self, settings: Settings, client: lightkube.AsyncClient, sync_client: lightkube.Client) -> None:
        self.settings = settings
        self.client = client
        self.sync_client = sync_client
        self.hub = Hub()
        self.csrf_token = secrets.token_urlsafe(32)
        self.allowed_hosts = views.build_allowed_hosts(settings.address, settings.port)
        self.templates = jinja2.Environment(loader=jinja2.PackageLoader("shipyard.operator.dashboard", "templates"),
                                            autoescape=True, trim_blocks=True, lstrip_blocks=True)
        self.plotly_path, self.plotly_version = fetch_plotly_js()
        self.access: dict[str, tuple[float, views.Access]] = {}
        self.kept: dict[Key, tuple[float, list[str] | None]] = {}
        self.rows: dict[Key, tuple[int, str]] = {}  # rendered list rows by the change that they show

    # I/O helpers
    async def query_access(self, namespace: str) -> views.Access:
        """May the user patch ModelDeployments in ``namespace``? Asked with a SelfSubjectAccessReview (cached)."""
        cached = self.access.get(namespace)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        review = SelfSubjectAccessReview(spec=SelfSubjectAccessReviewSpec(resourceAttributes=ResourceAttributes(
            namespace=namespace, verb="patch", group=naming.GROUP, resource=naming.PLURAL)))
        try:
            answer = await self.client.create(review)
            status = answer.status
            access = views.Access(bool(status and status.allowed),
                                  str((status.reason or status.evaluationError or "") if status else ""))
        except lightkube.ApiError as e:
            access = views.Access(False, f"the access review failed: {e.status.message}")
        self.access[namespace] = (time.monotonic() + ACCESS_TTL_SECONDS, access)
        return access

    async def query_kept(self, key: Key) -> list[str] | None:
        """Versions still kept as Deployments (the plugin's fetch_kept_versions; None when it may not list them)."""
        cached = self.kept.get(key)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        session = plugin.Session(self.sync_client, key[0])
        try:
            kept = await asyncio.to_thread(plugin.fetch_kept_versions, session, key[1])
        except plugin.PluginError:
            kept = None
        self.kept[key] = (time.monotonic() + KEPT_TTL_SECONDS, kept)
        return kept

    # rendering
    def state_text(self) -> str:
        states = self.hub.states
        if all(s == "live" for s in states.values()):
            return "Live"
        return "; ".join(f"{what}: {state}" for what, state in states.items() if state != "live")

    def render_row(self, key: Key) -> str:
        """A list row's HTML, rendered once per change of its object or events (pages and streams share it)."""
        changed = self.hub.changed.get(key, 0)
        cached = self.rows.get(key)
        if cached is not None and cached[0] == changed:
            return cached[1]
        macros: Any = self.templates.get_template("macros.html").module
        summary = views.build_summary(self.hub.models[key], self.hub.recent_events(key, 1))
        html = str(macros.row(summary, self.settings.namespace is None))
        self.rows[key] = (changed, html)
        return html

    async def build_model_sections(self, key: Key) -> tuple[dict[str, str], dict[str, Any]]:
        """The model page's sections (HTML by element id) and its charts (Plotly figures by element id)."""
        md = self.hub.models[key]
        access = await self.query_access(key[0]) if not self.settings.read_only else views.Access(False)
        kept = await self.query_kept(key) if (md.get("status") or {}).get("history") else None
        actions = views.build_actions(md, read_only=self.settings.read_only, access=access, kept=kept,
                                      now=datetime.datetime.now(datetime.UTC))
        current = views.build_analysis(md)
        context = {
            "summary": views.build_summary(md, self.hub.recent_events(key, 1)), "md": md,
            "conditions": views.build_conditions(md), "steps": views.build_steps(md),
            "timeline": views.build_timeline(md), "artifacts": views.build_artifacts(md),
            "analysis": current, "events": self.hub.recent_events(key), "actions": actions,
            "image": str((md.get("spec") or {}).get("image") or ""),
        }
        macros: Any = self.templates.get_template("macros.html").module
        sections = {name: str(getattr(macros, name.replace("-", "_"))(context))
                    for name in ("summary", "actions", "steps", "analysis", "timeline", "artifacts", "events")}
        figures = {m["chart_id"]: m["figure"] for m in (current or {}).get("metrics", [])}
        return sections, figures

    def page(self, template: str, status: int = 200, **context: Any) -> web.Response:
        html = self.templates.get_template(template).render(
            csrf_token=self.csrf_token, scope=self.scope_text(), context_name=self.settings.context,
            read_only=self.settings.read_only, state=self.state_text(), plotly=f"plotly-{self.plotly_version}.min.js",
            **context)
        return web.Response(text=html, status=status, content_type="text/html",
                            headers={"Cache-Control": "no-store"})

    def scope_text(self) -> str:
        return "all namespaces" if self.settings.namespace is None else f"namespace {self.settings.namespace}"

    # handlers
    async def wait_synced(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.hub.synced.wait(), 15)

    async def list_page(self, request: web.Request) -> web.Response:
        await self.wait_synced()
        hub = self.hub
        keys = sorted(hub.models)
        for gone in set(self.rows) - set(hub.models):
            del self.rows[gone]
        phases = [{"phase": (hub.models[k].get("status") or {}).get("phase") or "Pending"} for k in keys]
        return self.page("list.html", rows=[self.render_row(k) for k in keys], counts=views.build_phase_counts(phases),
                         phase_order=",".join(views.PHASE_TONES), all_namespaces=self.settings.namespace is None,
                         seq=hub.seq)

    def _key(self, request: web.Request) -> Key:
        key = (request.match_info["namespace"], request.match_info["name"])
        if self.settings.namespace is not None and key[0] != self.settings.namespace:
            raise web.HTTPNotFound(text=f"{key[0]}/{key[1]} is outside this dashboard's {self.scope_text()}")
        return key

    async def model_page(self, request: web.Request) -> web.Response:
        key = self._key(request)
        await self.wait_synced()
        if key not in self.hub.models:
            return self.page("missing.html", status=404, namespace=key[0], name=key[1])
        seq = self.hub.seq
        sections, figures = await self.build_model_sections(key)
        figures_json = json.dumps(figures).replace("<", "\\u003c")  # inside <script type="application/json">
        return self.page("model.html", key=key, sections=sections, figures=figures_json, seq=seq, name=key[1],
                         namespace=key[0])

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """The page's live updates: `row`/`gone` events (list page) or `model`/`gone` (one model), and `state`."""
        model: Key | None = None
        if request.query.get("model"):
            namespace, _, name = request.query["model"].partition("/")
            model = (namespace, name)
        since: int | None
        try:
            since = int(request.headers.get("Last-Event-Id") or request.query.get("since") or "")
        except ValueError:
            since = None
        hub = self.hub
        async with aiohttp_sse.sse_response(request, ping_interval=15) as resp:
            sub = hub.subscribe(model, since if since is not None else hub.seq)
            state = None
            try:
                while resp.is_connected() and not hub.closing:
                    if state != self.state_text():
                        state = self.state_text()
                        await resp.send(json.dumps({"text": state, "live": state == "Live"}), event="state")
                    keys, sub.dirty = sub.dirty, set()
                    for key in sorted(keys):
                        seq = str(hub.seq)
                        if key not in hub.models:
                            await resp.send(json.dumps({"id": views.build_row_id(key)}), event="gone", id=seq)
                        elif model is None:
                            await resp.send(json.dumps({"id": views.build_row_id(key), "sort": f"{key[0]}/{key[1]}",
                                                        "html": self.render_row(key)}), event="row", id=seq)
                        else:
                            sections, figures = await self.build_model_sections(key)
                            await resp.send(json.dumps({"sections": sections, "figures": figures}), event="model",
                                            id=seq)
                    sub.wake.clear()
                    if not sub.dirty:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(sub.wake.wait(), 5)
            except (ConnectionResetError, asyncio.CancelledError):
                pass
            finally:
                hub.unsubscribe(sub)
        return resp

    async def action(self, request: web.Request) -> web.Response:
        key = self._key(request)
        command = request.match_info["action"]
        if command not in plugin.CONTROLS:
            raise web.HTTPNotFound(text=f"no action {command!r}")
        if self.settings.read_only:
            return web.json_response({"ok": False, "message": "The dashboard runs read-only (--read-only): "
                                      "no action was taken."}, status=403)
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return web.json_response({"ok": False, "message": "the body must be a JSON object"}, status=400)
        args = {k: str(body[k]) for k in ("version", "to") if isinstance(body.get(k), str) and body[k]}
        session = plugin.Session(self.sync_client, key[0])
        try:
            control = await asyncio.to_thread(plugin.apply_control, session, command, key[1], **args)
        except plugin.PluginError as e:
            message = str(e)
            status = 403 if "(RBAC)" in message else 409
            logger.info("Refused %s of %s/%s: %s", command, key[0], key[1], message)
            return web.json_response({"ok": False, "message": f"Refused: {message}"}, status=status)
        self.kept.pop(key, None)
        logger.info("%s (%s=%s), from the dashboard", control.summary, control.annotation, control.value)
        return web.json_response({"ok": True, "message": f"{control.summary} ({control.annotation}="
                                                         f"{control.value})."})

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["file"]
        headers = {"Cache-Control": "public, max-age=31536000, immutable"}
        if name == f"plotly-{self.plotly_version}.min.js":
            return web.FileResponse(self.plotly_path, headers={**headers, "Content-Type": "text/javascript"})
        if name in STATIC_FILES:
            return web.FileResponse(PACKAGE_DIR / "static" / name, headers={"Cache-Control": "no-cache"})
        raise web.HTTPNotFound()


CSP: Final = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
              "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def build_app(dashboard: Dashboard) -> web.Application:
    @web.middleware
    async def guard(request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        refusal = views.assess_request(request.method, request.headers, allowed_hosts=dashboard.allowed_hosts,
                                       csrf_token=dashboard.csrf_token)
        if refusal is not None:
            logger.warning("Refused %s %s: %s", request.method, request.path, refusal)
            response: web.StreamResponse = web.json_response({"ok": False, "message": refusal}, status=403)
        else:
            try:
                response = await handler(request)
            except web.HTTPException as e:
                response = e
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Cross-Origin-Resource-Policy", "same-origin")
        return response

    app = web.Application(middlewares=[guard])
    app.router.add_get("/", dashboard.list_page)
    app.router.add_get("/models/{namespace}/{name}", dashboard.model_page)
    app.router.add_get("/api/stream", dashboard.stream)
    app.router.add_post("/api/models/{namespace}/{name}/{action}", dashboard.action)
    app.router.add_get("/static/{file}", dashboard.static)
    return app


async def serve(settings: Settings, config: Any, ready: Callable[[str], None] | None = None) -> None:
    """Runs the dashboard until SIGINT/SIGTERM: the watches, the HTTP server; then closes everything."""
    client = lightkube.AsyncClient(config=config, field_manager=plugin.FIELD_MANAGER)
    sync_client = lightkube.Client(config=config, field_manager=plugin.FIELD_MANAGER)
    dashboard = Dashboard(settings, client, sync_client)
    tasks = start_reflectors(dashboard.hub, client, settings.namespace)
    runner = web.AppRunner(build_app(dashboard), access_log=None, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, settings.address, settings.port)
    await site.start()
    port = runner.addresses[0][1]
    dashboard.settings.port = port
    dashboard.allowed_hosts = views.build_allowed_hosts(settings.address, port)
    host = f"[{settings.address}]" if ":" in settings.address else settings.address
    url = f"http://{host}:{port}/"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    (ready or (lambda u: None))(url)
    try:
        await stop.wait()
    finally:
        dashboard.hub.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()
        await client.close()
        sync_client.close()


def main(args: argparse.Namespace) -> int:
    """`kubectl shipyard dashboard`: serve until Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpx2", "aiohttp.access"):  # one line per API request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = plugin.fetch_kubeconfig(args.kubeconfig, args.context)
    namespace = None if args.all_namespaces else (args.namespace or config.namespace or "default")
    if args.address not in ("127.0.0.1", "::1", "localhost"):
        logger.warning("Listening on %s: anyone who can reach it acts with your credentials", args.address)
    settings = Settings(namespace=namespace, read_only=args.read_only, address=args.address, port=args.port,
                        context=str(config.context_name or ""))

    def ready(url: str) -> None:
        mode = ", read-only" if args.read_only else ""
        print(f"Serving the Shipyard dashboard of {'all namespaces' if namespace is None else 'namespace ' + namespace}"
              f"{mode} on {url} (Ctrl-C to stop)", flush=True)

    try:
        asyncio.run(serve(settings, config, ready))
    except OSError as e:
        raise plugin.PluginError(f"cannot listen on {args.address}:{args.port}: {e}") from None
    return 0
