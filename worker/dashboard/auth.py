"""Sessions, CSRF tokens and the login rate limit of the dashboard.

The session is Starlette's signed cookie (itsdangerous): it holds the user's id, name,
role, a fingerprint of the password hash, a CSRF token and when the login expires; the
user on every action is the one the session names, never a form field, so one reader
cannot act as another.
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
from collections import deque
from pathlib import Path
from typing import Any

from worker.errors import ConfigError

logger = logging.getLogger(__name__)

#: The cookie signing key's length: HMAC-SHA1 (itsdangerous) wants at least its block's worth of entropy.
MIN_SECRET_BYTES = 32
_BAD = "(bad key)"  # what _read_key says of a file that holds no usable key

#: Failed logins allowed per window, per client address and per user name.
MAX_FAILURES = 5
WINDOW_S = 300.0


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
