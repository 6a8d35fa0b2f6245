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

import logging
import math
import secrets
import threading
import time
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from worker.audit import AuditTrail
from worker.config import Settings
from worker.dashboard import operations
from worker.dashboard.accounts import Accounts
from worker.dashboard.auth import LoginLimiter, csrf_ok, csrf_token, password_fingerprint, session_secret
from worker.store import LABELS, ResultStore, StoredResult, Worklist

logger = logging.getLogger(__name__)

PAGE_SIZE = 50
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


class Dashboard:
    """The application's state: settings, store, templates, audit trail, login limiter."""

    def __init__(self, settings: Settings, store: ResultStore) -> None:
        self.settings = settings
        self.store = store
        self.accounts = Accounts(store)
        d = settings.dashboard
        self.tls = d.tls_cert is not None
        self.secure_cookies = self.tls if d.secure_cookies is None else d.secure_cookies
        self.audit = AuditTrail(settings.audit.path, settings.dicom.ae_title)
        self.limiter = LoginLimiter()
        self.metrics_url = d.metrics_url or (
            f"http://{settings.metrics.bind}:{settings.metrics.port}/metrics" if settings.metrics.port else None)
        self.templates = Environment(loader=FileSystemLoader(_package_dir("templates")),
                                     autoescape=select_autoescape(["html"]))
        self.templates.filters["when"] = lambda v: v.astimezone(UTC).strftime("%Y-%m-%d %H:%M") if v else "—"
        self.templates.filters["pct"] = lambda v: "—" if v is None else f"{100 * v:.0f}%"
        self.templates.filters["num"] = lambda v, n=2: "—" if v is None or not math.isfinite(v) else f"{v:.{n}f}"
        self.templates.filters["person"] = lambda v: str(v or "").replace("^", ", ", 1).replace("^", " ")
        self._snapshot: tuple[float, operations.Snapshot] | None = None
        self._snapshot_lock = threading.Lock()

    # -- plumbing -------------------------------------------------------------------------

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        context.update(user=request.session.get("user"), csrf=csrf_token(request.session), path=request.url.path)
        return HTMLResponse(self.templates.get_template(name).render(**context), status_code=status)

    @staticmethod
    def client(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    def user(self, request: Request) -> dict[str, Any] | None:
        """The logged-in user, or None (also when the login expired or the account went)."""
        user = request.session.get("user")
        if not isinstance(user, dict) or user.get("expires", 0) < datetime.now(UTC).timestamp():
            return None
        account = self.accounts.get_user(int(user.get("id", -1)))  # disabled or reset since the login: out
        if account is None or account.disabled or account.role != user.get("role"):
            return None
        if not secrets.compare_digest(str(user.get("password", "")), password_fingerprint(account.password_hash)):
            return None  # the password was reset since this login
        return user

    def need_user(self, request: Request) -> dict[str, Any] | Response:
        user = self.user(request)
        if user is None:
            request.session.pop("user", None)
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?{urlencode({'next': target})}", status_code=303)
        return user

    # -- login ----------------------------------------------------------------------------

    async def login_page(self, request: Request) -> Response:
        return self.render(request, "login.html", next=_safe_next(request.query_params.get("next")))

    async def login(self, request: Request) -> Response:
        form = await request.form()
        return await run_in_threadpool(self._login, request, form)  # Argon2 takes tens of ms of CPU

    def _login(self, request: Request, form: FormData) -> Response:
        target = _safe_next(str(form.get("next") or "/"))
        if not csrf_ok(request.session, form.get("csrf")):
            return self.render(request, "login.html", 403, error="The form expired; please try again.", next=target)
        name, password = str(form.get("username") or ""), str(form.get("password") or "")
        address = self.client(request)
        keys = (f"ip:{address}", f"user:{name}")
        if self.limiter.blocked(*keys):
            self.audit.user_authentication(name[:64], address, login=True, success=False)
            return self.render(request, "login.html", 429, next=target,
                               error="Too many failed attempts. Wait a few minutes and try again.")
        user = self.accounts.authenticate(name, password) if name and password else None
        if user is None:
            self.limiter.failed(*keys)
            self.audit.user_authentication(name[:64], address, login=True, success=False)
            return self.render(request, "login.html", 401, error="Wrong user name or password.", next=target)
        self.limiter.succeeded(*keys)
        request.session.clear()  # a new session (and CSRF token) at each login: no fixation
        expires = datetime.now(UTC) + timedelta(hours=self.settings.dashboard.session_hours)
        # The hash as stored now: authenticate() may just have rehashed it with newer parameters.
        account = self.accounts.get_user(user.id) or user
        request.session["user"] = {"id": user.id, "name": user.name, "role": user.role,
                                   "expires": expires.timestamp(),
                                   "password": password_fingerprint(account.password_hash)}
        csrf_token(request.session)
        self.audit.user_authentication(user.name, address, login=True, success=True)
        return RedirectResponse(target, status_code=303)

    async def logout(self, request: Request) -> Response:
        form = await request.form()
        return await run_in_threadpool(self._logout, request, form)

    def _logout(self, request: Request, form: FormData) -> Response:
        user = self.user(request)
        if not csrf_ok(request.session, form.get("csrf")):
            return Response("forged request refused", status_code=403, media_type="text/plain")
        if user is not None:
            self.audit.user_authentication(user["name"], self.client(request), login=False, success=True)
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # -- pages ----------------------------------------------------------------------------

    def worklist(self, request: Request) -> Response:
        user = self.need_user(request)
        if isinstance(user, Response):
            return user
        q = request.query_params
        page = max(1, _int(q.get("page"), 1))
        w = Worklist(decision=q.get("decision", ""), date_from=_date(q.get("from")), date_to=_date(q.get("to")),
                     model_version=q.get("model", ""), ood=_choice(q.get("ood"), ("yes", "no")),  # type: ignore[arg-type]
                     feedback=_choice(q.get("feedback"), ("none", "reviewed", "disagreed")),  # type: ignore[arg-type]
                     search=q.get("q", "")[:64], limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
        rows, total = self.store.worklist(w)
        feedback = self.store.feedback_summary([r.id for r in rows])
        filters = {k: v for k, v in q.items() if k != "page" and v}
        return self.render(request, "worklist.html", rows=rows, total=total, feedback=feedback, w=w, q=filters,
                           page=page, pages=max(1, math.ceil(total / PAGE_SIZE)), versions=self.store.model_versions(),
                           query=lambda **kw: urlencode({**filters, **kw}))

    def review_link(self, request: Request) -> Response:
        """``/r/<key>``: the short link printed on the SC and carried by the SR."""
        user = self.need_user(request)
        if isinstance(user, Response):
            return user
        row = self.store.by_review_key(request.path_params["key"][:16].lower())
        if row is None:
            return self.render(request, "message.html", 404, title="Not found",
                               message="No result for this link (it may have passed the retention period).")
        return RedirectResponse(f"/results/{row.id}", status_code=303)

    def _result_or_404(self, request: Request) -> StoredResult | Response:
        row = self.store.get(_int(request.path_params["rid"], -1))
        if row is None:
            return self.render(request, "message.html", 404, title="Not found",
                               message="No such result (it may have passed the retention period).")
        return row

    def result(self, request: Request) -> Response:
        user = self.need_user(request)
        if isinstance(user, Response):
            return user
        row = self._result_or_404(request)
        if isinstance(row, Response):
            return row
        history = self.store.feedback_history(row.id)
        mine = [f for f in history if f.user_id == user["id"]]
        self.audit.instances_viewed(user["name"], self.client(request), row.study_instance_uid, row.sop_class_uid,
                                    row.sop_instance_uid, detail="result viewed in the dashboard")
        return self.render(request, "result.html", r=row, history=history, mine=mine[-1] if mine else None,
                           current=self.store.current(history), labels=LABELS, saved=request.query_params.get("saved"))

    async def feedback(self, request: Request) -> Response:
        user = await run_in_threadpool(self.need_user, request)
        if isinstance(user, Response):
            return Response("login required", status_code=401, media_type="text/plain")
        form = await request.form()
        return await run_in_threadpool(self._feedback, request, user, form)

    def _feedback(self, request: Request, user: dict[str, Any], form: FormData) -> Response:
        if not csrf_ok(request.session, form.get("csrf")):
            return Response("forged request refused (missing or wrong CSRF token)", status_code=403,
                            media_type="text/plain")
        row = self._result_or_404(request)
        if isinstance(row, Response):
            return row
        agree, label = form.get("agree"), form.get("label")
        if agree not in ("agree", "disagree") or label not in LABELS:
            return Response("choose agree or disagree and a label", status_code=400, media_type="text/plain")
        self.store.add_feedback(row.id, int(user["id"]), agree == "agree", str(label),
                                str(form.get("comment") or "").strip()[:2000])
        self.audit.instances_viewed(user["name"], self.client(request), row.study_instance_uid, row.sop_class_uid,
                                    row.sop_instance_uid, action="U", detail="reader feedback recorded")
        return RedirectResponse(f"/results/{row.id}?saved=1", status_code=303)

    def preview(self, request: Request) -> Response:
        if self.user(request) is None:
            return Response("login required", status_code=401, media_type="text/plain")
        row = self._result_or_404(request)
        if isinstance(row, Response):
            return row
        path = self.store.media_dir / row.preview_path
        if not path.is_file():
            return Response("preview no longer stored", status_code=404, media_type="text/plain")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, no-store"})

    def grid(self, request: Request) -> Response:
        """The raw Grad-CAM grid scaled as the SC scales it (a 0-1 heat per cell); the page draws it."""
        if self.user(request) is None:
            return Response("login required", status_code=401, media_type="text/plain")
        row = self._result_or_404(request)
        if isinstance(row, Response):
            return row
        cam = self.store.grid(row).clip(min=0.0)
        scale = row.heatmap_scale if row.heatmap_scale else float(cam.max())
        heat = (cam / scale).clip(0.0, 1.0) if scale > 0 else cam * 0.0
        return JSONResponse({"rows": int(heat.shape[0]), "cols": int(heat.shape[1]),
                             "heat": [round(float(v), 4) for v in heat.ravel()],
                             "scale": "fixed" if row.heatmap_scale else "per-image"})

    def forbidden_unless_admin(self, request: Request, user: dict[str, Any]) -> Response | None:
        if user.get("role") == "admin":
            return None
        return self.render(request, "message.html", 403, title="Administrators only",
                           message="The operations page is for administrators; ask one for access.")

    def operations_page(self, request: Request) -> Response:
        user = self.need_user(request)
        if isinstance(user, Response):
            return user
        if (refused := self.forbidden_unless_admin(request, user)) is not None:
            return refused
        snap = self.snapshot()
        return self.render(request, "operations.html", s=snap, names=operations.WORKER_METRICS)

    def plot(self, request: Request) -> Response:
        user = self.user(request)
        if user is None:
            return Response("login required", status_code=401, media_type="text/plain")
        if user.get("role") != "admin":
            return Response("administrators only", status_code=403, media_type="text/plain")
        draw = operations.PLOTS.get(request.path_params["name"])
        if draw is None:
            return Response("no such plot", status_code=404, media_type="text/plain")
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


def create_app(settings: Settings, store: ResultStore, secret: str | None = None) -> Starlette:
    """The ASGI application; ``secret`` signs session cookies (default: kept beside the media)."""
    d = Dashboard(settings, store)
    key = secret or session_secret(Path(store.media_dir).parent / "dashboard-session.key")
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
        Middleware(SessionMiddleware, secret_key=key, session_cookie="cxr_session",
                   # Lax, not Strict: a review link opened from a PACS viewer or an e-mail is a cross-site
                   # navigation, and Strict would drop the session there; cross-site POSTs still carry
                   # no cookie, and every form has its CSRF token besides.
                   max_age=int(settings.dashboard.session_hours * 3600), same_site="lax",
                   https_only=d.secure_cookies),
    ]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.dashboard = d
    return app


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
    uvicorn.run(app, host=ds.bind, port=ds.port, ssl_certfile=str(ds.tls_cert) if ds.tls_cert else None,
                ssl_keyfile=str(ds.tls_key) if ds.tls_key else None, access_log=False, log_config=None,
                server_header=False, timeout_graceful_shutdown=5)  # a browser's keep-alive must not hold a stop
    stop.set()
    store.close()
