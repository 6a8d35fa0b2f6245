"""Sessions, CSRF tokens and the login rate limit of the dashboard.

The session is Starlette's signed cookie (itsdangerous): it holds the user's id, name,
role, the account's session generation at login, a CSRF token and when the login expires.
:class:`SessionBackend` (Starlette's ``AuthenticationMiddleware``) checks it against the
account on every request; the user on every action is the one the session names, never a
form field, so one reader cannot act as another.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import stat
import tempfile
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from starlette.authentication import AuthCredentials, AuthenticationBackend, BaseUser
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection

from worker.dashboard.accounts import Accounts
from worker.errors import ConfigError
from worker.store import User

logger = logging.getLogger(__name__)

#: The cookie signing key's length: HMAC-SHA1 (itsdangerous) wants at least its block's worth of entropy.
MIN_SECRET_BYTES = 32
_BAD = "(bad key)"  # what _read_key says of a file that holds no usable key

#: Login attempts allowed per window, per client address and per user name (a success clears them).
MAX_FAILURES = 5
WINDOW_S = 300.0
#: Keys the login limiter remembers at most (about 200 bytes each).
MAX_KEYS = 10_000


def session_secret(path: Path) -> str:
    """The cookie signing key (hex), made once and kept (0600) so a restart keeps readers logged in.

    A key file that is empty, short or not hex (a full disk at its first write leaves an
    empty one) is replaced: signing with it would let anyone forge an administrator's cookie.

    Raises:
        ConfigError: the key file can be neither read nor written.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = _read_key(path)
        if key is None or key == _BAD:
            # Only a bad key is replaced; a missing one is created without overwriting, since another
            # dashboard starting at the same time may have created it since the read above.
            if key == _BAD:
                logger.warning("dashboard session key too short or not hex: a new one replaces it (readers log "
                               "in again)", extra={"path": str(path)})
            _write_key(path, replace=key == _BAD)
            key = _read_key(path)
        if key is None or key == _BAD:  # written and read back, still no key: the file system lies
            raise ConfigError(f"dashboard session key {path}: a key written there does not read back")
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("dashboard session key is readable by others: chmod 600 it", extra={"path": str(path)})
    except OSError as exc:
        raise ConfigError(f"dashboard session key {path}: {type(exc).__name__}: {exc.strerror}") from None
    return key


def _read_key(path: Path) -> str | None:
    """The key in the file; None when there is no file, _BAD when it holds less than MIN_SECRET_BYTES."""
    try:
        text = path.read_text(encoding="ascii").strip()
        return text if len(bytes.fromhex(text)) >= MIN_SECRET_BYTES else _BAD
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, ValueError):
        return _BAD


def _write_key(path: Path, replace: bool) -> None:
    """A new key, whole or not at all: written to a temporary file (0600), then put in place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_hex(MIN_SECRET_BYTES) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            # link() fails when the name exists: of two dashboards starting at once, the second
            # keeps the first's key instead of overwriting it, and nobody reads a half-written one.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def csrf_token(session: dict[str, Any]) -> str:
    """The session's CSRF token, made on first use (the login form has one too)."""
    token = session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


def csrf_ok(session: dict[str, Any], submitted: object) -> bool:
    expected = session.get("csrf")
    return isinstance(expected, str) and isinstance(submitted, str) and secrets.compare_digest(expected, submitted)


class LoginLimiter:
    """Sliding-window count of login attempts per key; a key at the limit is refused until it slides.

    An attempt is counted when it begins, before the password is checked, so that concurrent
    guesses cannot all pass a check made before any of them failed; a successful login
    clears its keys. Memory is bounded: at most ``max_keys`` keys (the oldest go first), and a
    user name is kept as a short digest, whatever its length.
    """

    def __init__(self, max_failures: int = MAX_FAILURES, window_s: float = WINDOW_S,
                 max_keys: int = MAX_KEYS) -> None:
        self.max_failures, self.window_s, self.max_keys = max_failures, window_s, max_keys
        self._attempts: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def keys(address: str, name: str) -> tuple[str, str]:
        """The keys of one attempt: its client address and (a digest of) the user name tried."""
        return f"ip:{address[:64]}", "user:" + hashlib.sha256(name.encode("utf-8", "replace")).hexdigest()[:16]

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._attempts.get(key)
        if q is None:
            q = self._attempts[key] = deque(maxlen=self.max_failures)
            while len(self._attempts) > self.max_keys:
                self._attempts.popitem(last=False)
        else:
            self._attempts.move_to_end(key)
        while q and q[0] < now - self.window_s:
            q.popleft()
        return q

    def attempt(self, *keys: str) -> bool:
        """Count one attempt under every key; False (and nothing counted) when one is at the limit."""
        now = time.monotonic()
        with self._lock:
            queues = [self._recent(k, now) for k in keys]
            if any(len(q) >= self.max_failures for q in queues):
                return False
            for q in queues:
                q.append(now)
            return True

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for k in keys:
                self._attempts.pop(k, None)

    def __len__(self) -> int:
        return len(self._attempts)


@dataclass(frozen=True)
class DashboardUser(BaseUser):
    """The reader (or administrator) a request's session names, as the accounts table has them now."""

    id: int
    name: str
    role: str

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.name

    @property
    def identity(self) -> str:
        return str(self.id)


def session_of(user: User, hours: float) -> dict[str, Any]:
    """What a new login keeps in its session cookie: who, until when, in which session generation."""
    expires = datetime.now(UTC) + timedelta(hours=hours)
    return {"id": user.id, "name": user.name, "role": user.role, "expires": expires.timestamp(),
            "generation": user.session_generation}


class SessionBackend(AuthenticationBackend):
    """Starlette authentication from the signed session cookie, checked against the account each request.

    A session ends when it expires, when its account is gone or disabled, and when the
    account's session generation has moved on since the login (logout, disable, enable,
    password reset, role change); its user then is Starlette's ``UnauthenticatedUser``.
    Administrators get the ``admin`` scope besides ``authenticated``.
    """

    def __init__(self, accounts: Accounts) -> None:
        self.accounts = accounts

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        if conn.url.path.startswith("/static/") or "session" not in conn.scope:
            return None
        saved = conn.session.get("user")
        if not isinstance(saved, dict) or not isinstance(saved.get("id"), int):
            return None
        if float(saved.get("expires", 0)) < datetime.now(UTC).timestamp():
            return None
        account = await run_in_threadpool(self.accounts.get_user, saved["id"])
        if (account is None or account.disabled or account.role != saved.get("role")
                or account.session_generation != saved.get("generation")):
            return None
        scopes = ["authenticated", "admin"] if account.role == "admin" else ["authenticated"]
        return AuthCredentials(scopes), DashboardUser(account.id, account.name, account.role)
