"""Dashboard accounts: who may read results and give feedback, and their passwords.

Passwords are stored as Argon2id hashes only (argon2-cffi's defaults, RFC 9106's low-memory
parameters); an unknown name costs the same verification time as a known one. The ``users``
table lives in the results database (:mod:`worker.store.schema`), beside the feedback that
names its readers.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update

from worker.store import ResultStore, StoreError, User, utcnow

ROLES = ("reader", "admin")


def _hasher() -> Any:
    from argon2 import PasswordHasher

    return PasswordHasher()  # argon2-cffi's default is Argon2id with RFC 9106's low-memory parameters


class _DummyHash:
    """A hash of a random password, made once, for verifying unknown user names."""

    def __init__(self) -> None:
        self._value: str | None = None

    def get(self, hasher: Any) -> str:
        if self._value is None:
            import secrets

            self._value = hasher.hash(secrets.token_hex(16))
        return self._value


_DUMMY = _DummyHash()


class Accounts:
    """The dashboard's accounts, in a results store's database."""

    def __init__(self, store: ResultStore) -> None:
        self.session = store.session

    def add_user(self, name: str, role: str, password: str) -> User:
        """Create an account, or reset its role and password when it exists."""
        if role not in ROLES:
            raise StoreError(f"role must be one of {', '.join(ROLES)}. Received: role={role!r}")
        if not name or len(name) > 64 or not name.isprintable() or name != name.strip():
            raise StoreError(f"user name must be 1-64 printable characters. Received: name={name!r}")
        if len(password) < 8:
            raise StoreError("password must have at least 8 characters")
        hashed = _hasher().hash(password)
        with self.session() as s, s.begin():
            user = s.scalar(select(User).where(User.name == name))
            if user is None:
                user = User(name=name, role=role, password_hash=hashed, created_at=utcnow())
                s.add(user)
            else:  # a new password or role: the sessions begun before it end
                user.role, user.password_hash, user.disabled = role, hashed, False
                user.session_generation += 1
        return user

    def authenticate(self, name: str, password: str) -> User | None:
        """The user whose password this is; None otherwise (same cost whether the name exists)."""
        from argon2.exceptions import InvalidHashError, VerificationError

        hasher = _hasher()
        with self.session() as s:
            user = s.scalar(select(User).where(User.name == name))
        # Hash against a dummy for an unknown name, so timing does not tell which names exist.
        target = user.password_hash if user is not None and not user.disabled else _DUMMY.get(hasher)
        try:
            hasher.verify(target, password)
        except (VerificationError, InvalidHashError):
            return None
        if user is None or user.disabled:
            return None
        if hasher.check_needs_rehash(user.password_hash):
            with self.session() as s, s.begin():
                row = s.get(User, user.id)
                if row is not None:
                    row.password_hash = hasher.hash(password)
        return user

    def set_disabled(self, name: str, disabled: bool) -> None:
        """Disable an account (its logins end at their next request) or enable it again.

        Raises:
            StoreError: no account has this name.
        """
        with self.session() as s, s.begin():
            user = s.scalar(select(User).where(User.name == name))
            if user is None:
                raise StoreError(f"no dashboard account named {name!r}")
            user.disabled = disabled
            # Enabling raises it too: a cookie taken before the disable must not work again.
            user.session_generation += 1

    def end_sessions(self, user_id: int) -> None:
        """End every session of this account (a logout): they began in an older generation."""
        with self.session() as s, s.begin():
            s.execute(update(User).where(User.id == user_id)
                      .values(session_generation=User.session_generation + 1))

    def exists(self, name: str) -> bool:
        """Whether an account has this name (the audit trail names only real accounts)."""
        with self.session() as s:
            return s.scalar(select(User.id).where(User.name == name)) is not None

    def get_user(self, user_id: int) -> User | None:
        with self.session() as s:
            return s.get(User, user_id)

    def users(self) -> list[User]:
        with self.session() as s:
            return list(s.scalars(select(User).order_by(User.name)))

