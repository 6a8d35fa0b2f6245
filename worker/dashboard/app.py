"""The dashboard web application: worklist, result review with feedback, operations.

Starlette + Jinja2 under uvicorn: server-rendered pages with plain HTML forms, so the
whole application is a few routes and templates (FastAPI would add a JSON schema layer
that no page uses). It runs as its own process (``cxr-worker dashboard``), so readers
never slow the DICOM service; it shares only the results database and the audit trail.

Every page but the login needs a session; every POST carries the session's CSRF token;
the acting user is always the session's. Responses that hold PHI are not cached.

Handlers that query the database, verify a password or scrape the worker are plain ``def``
(Starlette runs them in its threadpool) or hand that work to ``run_in_threadpool``: on the
event loop it would hold every other reader's request.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import secrets
import threading
import time
from datetime import UTC, date
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.authentication import requires
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from cxr_contract.prevalence import format_pair
from worker.audit import AuditTrail, Repeats
from worker.config import Settings
from worker.dashboard import operations
from worker.dashboard.accounts import Accounts
from worker.dashboard.auth import (
    DashboardUser,
    LoginLimiter,
    SessionBackend,
    csrf_ok,
    csrf_token,
    session_of,
    session_secret,
)
from worker.dashboard.cards import ModelCards
from worker.store import LABELS, ResultStore, StoredResult, Worklist

logger = logging.getLogger(__name__)

PAGE_SIZE = 50
#: How long a login waits for a free password check before it is answered 503.
LOGIN_QUEUE_S = 10.0
#: How long one operations snapshot serves: a page view and its three plots compute it once.
SNAPSHOT_TTL_S = 5.0
SECURITY_HEADERS = {
    # Scripts and styles only from this server: an injected <script> would not run even unescaped.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
                               "object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def _package_dir(name: str) -> str:
    return str(resources.files("worker") / "dashboard" / name)


#: Endpoints that are pages: without a session they send the browser to the login; the
#: others (images, data, form posts) answer 401.
PAGES = frozenset({"worklist", "review_link", "result", "operations_page"})
#: Larger ids and page numbers are no row of any table (SQLite's integers are 64-bit).
MAX_ID = 2**53


class Dashboard:
    """The application's state: settings, store, templates, audit trail, login limiter."""

    def __init__(self, settings: Settings, store: ResultStore, audit_key: bytes = b"") -> None:
        self.settings = settings
        self.store = store
        self.accounts = Accounts(store)
        d = settings.dashboard
        self.tls = d.tls_cert is not None
        self.secure_cookies = self.tls if d.secure_cookies is None else d.secure_cookies
        self.audit = AuditTrail(settings.audit.path, settings.dicom.ae_title)
        self.audit_key = audit_key or secrets.token_bytes(32)
        self.limiter = LoginLimiter()
        self.refusals = Repeats()
        # Argon2 is expensive on purpose: a few checks at a time, the rest wait (then 503).
        self.password_checks = threading.BoundedSemaphore(d.login_concurrency)
        self.metrics_url = d.metrics_url or (
            f"http://{settings.metrics.bind}:{settings.metrics.port}/metrics" if settings.metrics.port else None)
        self.templates = Environment(loader=FileSystemLoader(_package_dir("templates")),
                                     autoescape=select_autoescape(["html"]))
        self.templates.filters["when"] = lambda v: v.astimezone(UTC).strftime("%Y-%m-%d %H:%M") if v else "—"
        self.templates.filters["pct"] = lambda v: "—" if v is None else f"{100 * v:.0f}%"
        self.templates.filters["num"] = lambda v, n=2: "—" if v is None or not math.isfinite(v) else f"{v:.{n}f}"
        self.templates.filters["person"] = lambda v: str(v or "").replace("^", ", ", 1).replace("^", " ")
        # Probability and threshold at the precision that shows which side of it the image lies.
        self.templates.filters["pair"] = lambda r: format_pair(r.probability, r.threshold)
        self.cards = ModelCards(settings.model.path)
        self._snapshot: tuple[float, operations.Snapshot] | None = None
        self._snapshot_lock = threading.Lock()

    # -- plumbing -------------------------------------------------------------------------

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        user = request.user if request.user.is_authenticated else None
        context.update(user=user, csrf=csrf_token(request.session), path=request.url.path)
        return HTMLResponse(self.templates.get_template(name).render(**context), status_code=status)

    @staticmethod
    def client(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    async def refused(self, request: Request, exc: Exception) -> Response:
        """Starlette's HTTPException as the browser has always seen it: pages redirect to the login
        or show a message; images, data and form posts answer in plain text."""
        assert isinstance(exc, HTTPException)
        endpoint = request.scope.get("endpoint")
        page = request.method == "GET" and getattr(endpoint, "__name__", "") in PAGES
        status, detail = exc.status_code, exc.detail
        if status in (401, 403) and not request.user.is_authenticated:
            if page:
                request.session.pop("user", None)
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"/login?{urlencode({'next': target})}", status_code=303)
            status, detail = 401, "login required"
        elif status == 403 and detail == HTTPStatus.FORBIDDEN.phrase:  # requires("admin") refused a reader
            if page:
                return self.render(request, "message.html", 403, title="Administrators only",
                                   message="The operations page is for administrators; ask one for access.")
            detail = "administrators only"
        elif status == 404 and page:
            return self.render(request, "message.html", 404, title="Not found", message=detail)
        return PlainTextResponse(detail, status_code=status, headers=exc.headers)

    async def form(self, request: Request) -> FormData:
        """The posted form, parsed with limits: no file parts, a few fields, small values."""
        return await request.form(max_files=0, max_fields=16, max_part_size=self.settings.dashboard.max_body_bytes)

    @staticmethod
    def check_csrf(request: Request, form: FormData) -> None:
        if not csrf_ok(request.session, form.get("csrf")):
            raise HTTPException(403, "forged request refused (missing or wrong CSRF token)")

    # -- login ----------------------------------------------------------------------------

    async def login_page(self, request: Request) -> Response:
        return self.render(request, "login.html", next=_safe_next(request.query_params.get("next")))

    async def login(self, request: Request) -> Response:
        form = await self.form(request)
        return await run_in_threadpool(self._login, request, form)  # Argon2 takes tens of ms of CPU

    def _login(self, request: Request, form: FormData) -> Response:
        target = _safe_next(str(form.get("next") or "/"))
        if not csrf_ok(request.session, form.get("csrf")):
            return self.render(request, "login.html", 403, error="The form expired; please try again.", next=target)
        name, password = str(form.get("username") or "")[:256], str(form.get("password") or "")[:1024]
        address = self.client(request)
        keys = self.limiter.keys(address, name)
        # Counted before the password is checked: concurrent guesses cannot all pass the limit.
        if not self.limiter.attempt(*keys):
            self._refused_login(name, address, "too many attempts")
            return self.render(request, "login.html", 429, next=target,
                               error="Too many failed attempts. Wait a few minutes and try again.")
        if not self.password_checks.acquire(timeout=LOGIN_QUEUE_S):
            return self.render(request, "login.html", 503, next=target,
                               error="The server is busy; please try again in a moment.")
        try:
            user = self.accounts.authenticate(name, password) if name and password else None
        finally:
            self.password_checks.release()
        if user is None:
            self._refused_login(name, address, "wrong user name or password")
            return self.render(request, "login.html", 401, error="Wrong user name or password.", next=target)
        self.limiter.succeeded(*keys)
        request.session.clear()  # a new session (and CSRF token) at each login: no fixation
        request.session["user"] = session_of(user, self.settings.dashboard.session_hours)
        csrf_token(request.session)
        self.audit.user_authentication(user.name, address, login=True, success=True)
        return RedirectResponse(target, status_code=303)

    def _refused_login(self, name: str, address: str, why: str) -> None:
        """Audit a refused login, aggregated per address (1st, 10th, 100th... of the hour): one
        client must not be able to fill the audit file. The name typed is recorded only when it
        is an account's: it may be a password typed into the wrong field."""
        count = self.refusals.note(address)
        if count is None:
            return
        who = name[:64] if name and self.accounts.exists(name) else "(not an account)"
        detail = why if count == 1 else f"{why}; refusal {count} from this address within the hour"
        self.audit.user_authentication(who, address, login=True, success=False, detail=detail)

    async def logout(self, request: Request) -> Response:
        form = await self.form(request)
        return await run_in_threadpool(self._logout, request, form)

    def _logout(self, request: Request, form: FormData) -> Response:
        self.check_csrf(request, form)
        if request.user.is_authenticated:
            user: DashboardUser = request.user
            self.accounts.end_sessions(user.id)  # a copy of the cookie must not outlive the logout
            self.audit.user_authentication(user.name, self.client(request), login=False, success=True)
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # -- pages ----------------------------------------------------------------------------

    @requires("authenticated")
    def worklist(self, request: Request) -> Response:
        q = request.query_params
        page = _int(q.get("page"), 1)
        if page > MAX_ID // PAGE_SIZE:
            raise HTTPException(404, "No such page.")
        page = max(1, page)
        w = Worklist(decision=q.get("decision", ""), date_from=_date(q.get("from")), date_to=_date(q.get("to")),
                     model_version=q.get("model", ""), ood=_choice(q.get("ood"), ("yes", "no")),  # type: ignore[arg-type]
                     feedback=_choice(q.get("feedback"), ("none", "reviewed", "disagreed")),  # type: ignore[arg-type]
                     search=q.get("q", "")[:64], limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
        rows, total = self.store.worklist(w)
        feedback = self.store.feedback_summary([r.id for r in rows])
        filters = {k: v for k, v in q.items() if k != "page" and v}
        self._audit_query(request, filters, page, len(rows))
        return self.render(request, "worklist.html", rows=rows, total=total, feedback=feedback, w=w, q=filters,
                           page=page, pages=max(1, math.ceil(total / PAGE_SIZE)), versions=self.store.model_versions(),
                           query=lambda **kw: urlencode({**filters, **kw}))

    def _audit_query(self, request: Request, filters: dict[str, str], page: int, shown: int) -> None:
        """A worklist view is a query of patient data (PS3.15 A.5.3.10): recorded with its filters;
        the search term (a patient ID or accession number) only as a keyed digest, which whoever
        holds the dashboard's key can match against a term but nobody can read."""
        recorded: dict[str, Any] = {k: v[:64] for k, v in filters.items() if k != "q"}
        if "q" in filters:
            recorded["q"] = "hmac-sha256:" + hmac.new(self.audit_key, filters["q"][:64].encode(),
                                                      hashlib.sha256).hexdigest()[:32]
        user: DashboardUser = request.user
        self.audit.query(user.name, self.client(request), {**recorded, "page": page},
                         detail=f"worklist: {shown} results shown")

    @requires("authenticated")
    def review_link(self, request: Request) -> Response:
        """``/r/<key>``: the short link printed on the SC and carried by the SR."""
        row = self.store.by_review_key(request.path_params["key"][:16].lower())
        if row is None:
            raise HTTPException(404, "No result for this link (it may have passed the retention period).")
        return RedirectResponse(f"/results/{row.id}", status_code=303)

    def _result_or_404(self, request: Request) -> StoredResult:
        rid = _int(request.path_params["rid"], -1)
        row = self.store.get(rid) if 0 < rid <= MAX_ID else None
        if row is None:
            raise HTTPException(404, "No such result (it may have passed the retention period).")
        return row

    def _audit_access(self, request: Request, row: StoredResult, detail: str, action: str = "R") -> None:
        user: DashboardUser = request.user
        self.audit.instances_viewed(user.name, self.client(request), row.study_instance_uid, row.sop_class_uid,
                                    row.sop_instance_uid, action=action, detail=detail)

    @requires("authenticated")
    def result(self, request: Request) -> Response:
        row = self._result_or_404(request)
        history = self.store.feedback_history(row.id)
        mine = [f for f in history if f.user_id == request.user.id]
        self._audit_access(request, row, "result viewed in the dashboard")
        return self.render(request, "result.html", r=row, history=history, mine=mine[-1] if mine else None,
                           card=self.cards.get(row.model_version),
                           current=self.store.current(history), labels=LABELS, saved=request.query_params.get("saved"))

    @requires("authenticated")
    async def feedback(self, request: Request) -> Response:
        form = await self.form(request)
        return await run_in_threadpool(self._feedback, request, form)

    def _feedback(self, request: Request, form: FormData) -> Response:
        self.check_csrf(request, form)
        row = self._result_or_404(request)
        agree, label = form.get("agree"), form.get("label")
        if agree not in ("agree", "disagree") or label not in LABELS:
            raise HTTPException(400, "choose agree or disagree and a label")
        self.store.add_feedback(row.id, request.user.id, agree == "agree", str(label),
                                str(form.get("comment") or "").strip()[:2000])
        self._audit_access(request, row, "reader feedback recorded", action="U")
        return RedirectResponse(f"/results/{row.id}?saved=1", status_code=303)

    @requires("authenticated")
    def preview(self, request: Request) -> Response:
        row = self._result_or_404(request)
        path = self.store.media_dir / row.preview_path
        if not path.is_file():
            raise HTTPException(404, "preview no longer stored")
        self._audit_access(request, row, "preview image downloaded")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, no-store"})

    @requires("authenticated")
    def grid(self, request: Request) -> Response:
        """The raw Grad-CAM grid scaled as the SC scales it (a 0-1 heat per cell); the page draws it."""
        row = self._result_or_404(request)
        cam = self.store.grid(row).clip(min=0.0)
        scale = row.heatmap_scale if row.heatmap_scale else float(cam.max())
        heat = (cam / scale).clip(0.0, 1.0) if scale > 0 else cam * 0.0
        self._audit_access(request, row, "heatmap grid downloaded")
        return JSONResponse({"rows": int(heat.shape[0]), "cols": int(heat.shape[1]),
                             "heat": [round(float(v), 4) for v in heat.ravel()],
                             "scale": "fixed" if row.heatmap_scale else "per-image"})

    @requires(["authenticated", "admin"])
    def operations_page(self, request: Request) -> Response:
        snap = self.snapshot()
        return self.render(request, "operations.html", s=snap, names=operations.WORKER_METRICS)

    @requires(["authenticated", "admin"])
    def plot(self, request: Request) -> Response:
        draw = operations.PLOTS.get(request.path_params["name"])
        if draw is None:
            raise HTTPException(404, "no such plot")
        return Response(draw(self.snapshot()), media_type="image/svg+xml")

    def snapshot(self) -> operations.Snapshot:
        """The operations numbers, computed at most once per SNAPSHOT_TTL_S (12 weeks of rows and a scrape).

        The lock makes the page's three plots, requested at once, wait for one computation.
        """
        with self._snapshot_lock:
            now = time.monotonic()
            if self._snapshot is None or now - self._snapshot[0] > SNAPSHOT_TTL_S:
                self._snapshot = (now, operations.snapshot(self.store, self.metrics_url))
            return self._snapshot[1]


def _safe_next(value: str | None) -> str:
    """Only a local path: a login must not redirect to another site."""
    return value if value and value.startswith("/") and not value.startswith("//") and "\\" not in value else "/"


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _date(value: str | None) -> date | None:
    try:
        return date.fromisoformat(value) if value else None
    except ValueError:
        return None


def _choice(value: str | None, allowed: tuple[str, ...]) -> str:
    return value if value in allowed else ""


class _Headers:
    """ASGI middleware: the security headers on every response."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                for k, v in SECURITY_HEADERS.items():
                    if k.lower().encode() not in present:
                        message.setdefault("headers", []).append((k.lower().encode(), v.encode()))
            await send(message)

        await self.app(scope, receive, with_headers)


class _BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before anything parses it.

    A declared Content-Length over the limit is refused before a byte is read; a chunked body
    is counted as it arrives and refused when it passes the limit (the form parser, and its
    temporary files, never see more than ``limit`` bytes).
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            await _too_large(scope, receive, send)
            return
        seen, started = 0, False

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def tracked(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await _too_large(scope, receive, send)


class _TooLarge(Exception):
    pass


async def _too_large(scope: Any, receive: Any, send: Any) -> None:
    # Connection: close, so that the server does not read the rest of the body to keep the connection.
    await PlainTextResponse("request body too large", status_code=413,
                            headers={"Connection": "close"})(scope, receive, send)


def allowed_hosts(settings: Settings) -> list[str]:
    """The Host header values the dashboard answers (DNS rebinding finds no other name)."""
    d = settings.dashboard
    if d.allowed_hosts is not None:
        return list(d.allowed_hosts)
    hosts = ["127.0.0.1", "localhost", "::1", "[::1]"]
    if d.bind not in ("0.0.0.0", "::", ""):
        hosts.append(d.bind)
    if d.public_url and (name := urlsplit(d.public_url).hostname):
        hosts.append(name)
    return hosts


def create_app(settings: Settings, store: ResultStore, secret: str | None = None) -> Starlette:
    """The ASGI application; ``secret`` signs session cookies (default: kept beside the media)."""
    key = secret or session_secret(Path(store.media_dir).parent / "dashboard-session.key")
    d = Dashboard(settings, store, audit_key=hashlib.sha256(b"audit:" + key.encode()).digest())
    routes = [
        Route("/login", d.login_page, methods=["GET"]),
        Route("/login", d.login, methods=["POST"]),
        Route("/logout", d.logout, methods=["POST"]),
        Route("/", d.worklist),
        Route("/r/{key}", d.review_link),
        Route("/results/{rid}", d.result),
        Route("/results/{rid}/feedback", d.feedback, methods=["POST"]),
        Route("/results/{rid}/preview.png", d.preview),
        Route("/results/{rid}/grid.json", d.grid),
        Route("/operations", d.operations_page),
        Route("/operations/{name}.svg", d.plot),
        Mount("/static", StaticFiles(directory=_package_dir("static")), name="static"),
    ]
    middleware = [
        Middleware(_Headers),
        Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(settings)),
        Middleware(_BodyLimit, limit=settings.dashboard.max_body_bytes),
        Middleware(SessionMiddleware, secret_key=key, session_cookie="cxr_session",
                   # Lax, not Strict: a review link opened from a PACS viewer or an e-mail is a cross-site
                   # navigation, and Strict would drop the session there; cross-site POSTs still carry
                   # no cookie, and every form has its CSRF token besides.
                   max_age=int(settings.dashboard.session_hours * 3600), same_site="lax",
                   https_only=d.secure_cookies),
        Middleware(AuthenticationMiddleware, backend=SessionBackend(d.accounts)),
    ]
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: d.refused})
    app.state.dashboard = d
    return app


def header_timeout(seconds: float) -> type[Any]:
    """uvicorn's h11 protocol, closing a connection whose request headers take longer than ``seconds``.

    uvicorn has no such limit of its own (its keep-alive timer restarts at every byte), so a
    client sending a header byte now and then would hold a connection, and a worker thread's
    worth of the concurrency limit, forever.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeout(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # the headers are in
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's headers, on a kept-alive connection

    return HeaderTimeout


def serve(settings: Settings) -> None:
    """``cxr-worker dashboard``: run until SIGTERM / Ctrl-C."""
    import threading

    import uvicorn

    ds = settings.dashboard
    store = ResultStore.from_settings(settings)
    app = create_app(settings, store)
    stop = threading.Event()

    def sweep() -> None:  # retention runs here too: a dashboard without a worker still forgets
        while not stop.wait(3600):
            try:
                store.sweep(ds.retention_days)
            except Exception as exc:
                logger.error("retention sweep failed: %s", type(exc).__name__)

    threading.Thread(target=sweep, name="retention", daemon=True).start()
    scheme = "https" if ds.tls_cert else "http"
    if scheme == "http" and ds.bind not in ("127.0.0.1", "::1", "localhost"):
        logger.warning("the dashboard shows patient data over plain HTTP on a non-loopback address; "
                       "set dashboard.tls_cert and tls_key, or put a TLS proxy in front", extra={"bind": ds.bind})
    logger.info("dashboard listening", extra={"url": f"{scheme}://{ds.bind}:{ds.port}",
                                              "database": ResultStore.engine_name(ds.store_url(settings.spool.dir))})
    # access_log off: request lines carry search terms (patient IDs, accession numbers).
    # Forwarded headers only from the configured proxies: uvicorn trusts loopback's by default, and
    # any local client could then choose the address the login limit and the audit trail see.
    proxies = ",".join(ds.trusted_proxies)
    config = uvicorn.Config(app, host=ds.bind, port=ds.port, ssl_certfile=str(ds.tls_cert) if ds.tls_cert else None,
                            ssl_keyfile=str(ds.tls_key) if ds.tls_key else None, access_log=False, log_config=None,
                            server_header=False, proxy_headers=bool(proxies), forwarded_allow_ips=proxies or None,
                            limit_concurrency=ds.max_connections, http=header_timeout(ds.header_timeout_s),
                            timeout_graceful_shutdown=5)  # a browser's keep-alive must not hold a stop
    uvicorn.Server(config).run()
    stop.set()
    store.close()
