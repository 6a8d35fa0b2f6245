"""The dashboard's cookie signing key (worker.dashboard.auth.session_secret) and its login limiter."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest

from worker.dashboard.auth import MIN_SECRET_BYTES, LoginLimiter, session_secret
from worker.errors import ConfigError


def _key_bytes(key: str) -> int:
    return len(bytes.fromhex(key))


def test_a_new_key_is_long_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "spool" / "dashboard-session.key"
    key = session_secret(path)
    assert _key_bytes(key) >= MIN_SECRET_BYTES == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert session_secret(path) == key  # a restart keeps readers logged in
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


@pytest.mark.parametrize("content", ["", "\n", "abcd", "zz" * 40, "ab" * 31])
def test_an_empty_or_short_key_is_never_used(tmp_path: Path, content: str) -> None:
    # An empty file is what a full disk leaves at the first write; signing with "" lets anyone forge a session.
    path = tmp_path / "dashboard-session.key"
    path.write_text(content)
    key = session_secret(path)
    assert _key_bytes(key) >= MIN_SECRET_BYTES and key != content.strip()
    assert path.read_text().strip() == key and stat.S_IMODE(path.stat().st_mode) == 0o600


def _at_once(path: Path, n: int = 8) -> tuple[list[str], list[BaseException]]:
    """session_secret(path) from n threads released together: the keys they got, the errors they raised."""
    start = threading.Barrier(n)
    keys: list[str] = []
    errors: list[BaseException] = []

    def make() -> None:
        start.wait()
        try:
            keys.append(session_secret(path))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return keys, errors


def test_dashboards_starting_at_once_share_one_key(tmp_path: Path) -> None:
    for attempt in range(20):  # the race is narrow: several tries make a regression show
        path = tmp_path / f"k{attempt}" / "dashboard-session.key"
        keys, errors = _at_once(path)
        assert errors == [] and len(set(keys)) == 1 and _key_bytes(keys[0]) >= MIN_SECRET_BYTES
        assert path.read_text().strip() == keys[0]


def test_an_unreadable_key_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "dashboard-session.key"
    path.mkdir()  # not a file: neither readable nor replaceable
    with pytest.raises(ConfigError, match=f"dashboard session key {path}"):
        session_secret(path)


def test_the_login_limiter_holds_a_bounded_number_of_short_keys() -> None:
    limiter = LoginLimiter(max_failures=5, window_s=300, max_keys=100)
    for i in range(1000):  # a user name of 10 kB each time, from ever new addresses
        assert limiter.attempt(*limiter.keys(f"10.0.{i // 250}.{i % 250}", f"{i}-" + "x" * 10_000))
    assert len(limiter) <= 100
    assert all(len(k) <= 80 for k in limiter._attempts)
    keys = limiter.keys("10.9.9.9", "alice")
    assert [limiter.attempt(*keys) for _ in range(6)] == [True] * 5 + [False]  # the newest keys still count
    limiter.succeeded(*keys)
    assert limiter.attempt(*keys)
