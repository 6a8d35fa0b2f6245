"""Sessions, CSRF tokens and the login rate limit of the dashboard.

The session is Starlette's signed cookie (itsdangerous): it holds the user's id, name,
role, a fingerprint of the password hash, a CSRF token and when the login expires; the
user on every action is the one the session names, never a form field, so one reader
cannot act as another.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

#: Failed logins allowed per window, per client address and per user name.
MAX_FAILURES = 5
WINDOW_S = 300.0


def session_secret(path: Path) -> str:
    """The cookie signing key, made once and kept (0600) so a restart keeps readers logged in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip()


def password_fingerprint(password_hash: str) -> str:
    """What a session keeps of its account's password hash: a reset changes it, and the session ends.

    A digest, not the hash: the cookie is signed but readable, and an Argon2 hash in it
    would be an offline guessing target.
    """
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]


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
    """Sliding-window count of failed logins; a key over the limit is refused until it slides."""

    def __init__(self, max_failures: int = MAX_FAILURES, window_s: float = WINDOW_S) -> None:
        self.max_failures, self.window_s = max_failures, window_s
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._failures.setdefault(key, deque())
        while q and q[0] < now - self.window_s:
            q.popleft()
        return q

    def blocked(self, *keys: str) -> bool:
        now = time.monotonic()
        with self._lock:
            return any(len(self._recent(k, now)) >= self.max_failures for k in keys)

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            for k in keys:
                self._recent(k, now).append(now)

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for k in keys:
                self._failures.pop(k, None)
