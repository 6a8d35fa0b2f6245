"""The results database's schema: tables, the SQLite settings, and the Alembic migrations.

One SQLAlchemy 2 model, two back ends: an embedded SQLite file (WAL, so the worker writes
while the dashboard reads) under the spool folder by default, or PostgreSQL by URL
(``postgresql+psycopg://...``) when several workers share one database. The schema is
created and upgraded by the Alembic migrations packaged in ``worker/migrations``, run at
start-up, so a wheel install needs no ``alembic`` command. A new column is a new revision in
``worker/migrations/versions/``.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, date, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from worker.errors import WorkerError

logger = logging.getLogger(__name__)

#: Reader labels (the export's vocabulary too).
LABELS = ("pneumonia", "no_pneumonia", "uncertain")
DECISIONS = ("positive", "negative", "withheld")


class StoreError(WorkerError):
    """The results database or its files could not be read or written."""


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every back end (SQLite has no time zone type)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime refused (UTC expected). Received: {value!r}")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class User(Base):
    """A dashboard account; the password is stored as an Argon2id hash only."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(8))
    password_hash: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Sessions carry the generation they began in; a change of account or a logout raises it,
    #: and every older session ends at its next request (a signed cookie cannot be revoked otherwise).
    session_generation: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class StoredResult(Base):
    """One answered instance: identifiers (PHI), the answer, the model, timings, image files."""

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "model_version", name="uq_results_instance_model"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64), default="")
    review_key: Mapped[str] = mapped_column(String(16), default="", index=True)
    accession_number: Mapped[str] = mapped_column(String(64), default="", index=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="", index=True)
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    study_date: Mapped[date | None] = mapped_column(nullable=True)
    received_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    answered_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    probability: Mapped[float] = mapped_column(Float)
    decision: Mapped[str] = mapped_column(String(16), index=True)
    threshold: Mapped[float] = mapped_column(Float)
    ood_gate: Mapped[str | None] = mapped_column(String(128), nullable=True)
    ood_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    faithfulness: Mapped[float | None] = mapped_column(Float, nullable=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64), index=True)
    heatmap_scale: Mapped[float | None] = mapped_column(Float, nullable=True)
    decode_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    infer_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    build_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    sc_sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    sr_sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    preview_path: Mapped[str] = mapped_column(String(512))
    grid_path: Mapped[str] = mapped_column(String(512))
    feedback: Mapped[list[Feedback]] = relationship(back_populates="result", cascade="all, delete-orphan",
                                                    passive_deletes=True, order_by="Feedback.id")

    @property
    def ood(self) -> bool:
        return self.ood_gate is not None

    @property
    def latency_s(self) -> float | None:
        """Received to answered, seconds."""
        return None if self.received_at is None else (self.answered_at - self.received_at).total_seconds()


class Feedback(Base):
    """One reader's answer about one result; a change is a new row (history is kept)."""

    __tablename__ = "feedback"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    agree: Mapped[bool] = mapped_column(Boolean)
    label: Mapped[str] = mapped_column(String(16))
    comment: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    result: Mapped[StoredResult] = relationship(back_populates="feedback")
    user: Mapped[User] = relationship(lazy="joined")



def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL: the worker writes while the dashboard reads; busy_timeout waits out the other's lock.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")  # WAL stays consistent; the last commit may be lost on power loss
    # Deleted rows (PHI past retention) are overwritten, not left in free pages: not every
    # platform's SQLite is built with SQLITE_SECURE_DELETE.
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.close()


def _migrations_dir() -> str:
    return str(resources.files("worker") / "migrations")


def head_revision() -> str:
    """The newest Alembic revision packaged with this worker: what :func:`migrate` brings a database to."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", _migrations_dir())
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


_MIGRATING = threading.Lock()  # Alembic's `context` and `op` are module globals: one migration per process


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (idempotent; safe from several processes)."""
    with _MIGRATING:
        _migrate(engine)


def _migrate(engine: Engine) -> None:
    from alembic import command
    from alembic.config import Config

    logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines say nothing an operator needs
    cfg = Config()
    cfg.set_main_option("script_location", _migrations_dir())
    for attempt in range(5):
        try:
            with engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
            return
        except SQLAlchemyError:  # another process migrating at the same moment: its schema is ours
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))



def run_migrations_online(connection: Connection) -> None:  # used by migrations/env.py
    from alembic import context

    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":  # several workers starting at once migrate one at a time
            from sqlalchemy import text

            connection.execute(text("SELECT pg_advisory_xact_lock(740613)"))
        context.run_migrations()

