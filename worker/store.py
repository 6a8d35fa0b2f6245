"""The results database: what the worker answered, what readers said about it, who they are.

The worker records every answered instance (:meth:`ResultStore.record`); the dashboard
(:mod:`worker.dashboard`) reads the results and records reader feedback; ``cxr-worker
feedback export`` reads both through :meth:`ResultStore.results_with_feedback`.

One SQLAlchemy 2 model, two back ends: an embedded SQLite file (WAL, so the worker writes
while the dashboard reads) under the spool folder by default, or PostgreSQL by URL
(``postgresql+psycopg://...``) when several workers share one database. The schema is
created and upgraded by the Alembic migrations packaged in ``worker/migrations``, run at
start-up, so a wheel install needs no ``alembic`` command.

Images are files beside the database (``media_dir``): an 8-bit PNG preview of the input as
the model saw it (windowed, long side 1024 px) and the raw Grad-CAM grid as ``.npy``
(float16). Rows hold their paths relative to ``media_dir``; the retention sweep deletes
rows and files together. Feedback is never updated in place: each change is a new row,
and a reader's latest row is their current answer.

This module holds PHI (patient name and ID): it never logs them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
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
    create_engine,
    event,
    func,
    or_,
    select,
)
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from worker.errors import WorkerError
from worker.links import review_key

logger = logging.getLogger(__name__)

#: Reader labels (the export's vocabulary too).
LABELS = ("pneumonia", "no_pneumonia", "uncertain")
ROLES = ("reader", "admin")
DECISIONS = ("positive", "negative", "withheld")
#: Long side of the stored preview: enough to read a chest film on a screen, small to store.
PREVIEW_LONG_SIDE = 1024


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


class Result(Base):
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
    result: Mapped[Result] = relationship(back_populates="feedback")
    user: Mapped[User] = relationship(lazy="joined")


@dataclass(frozen=True)
class NewResult:
    """What the worker hands to :meth:`ResultStore.record` (everything but the images)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    probability: float
    decision: Literal["positive", "negative", "withheld"]
    threshold: float
    model_name: str
    model_version: str
    sop_class_uid: str = ""
    accession_number: str = ""
    patient_id: str = ""
    patient_name: str = ""
    study_date: date | None = None
    received_at: datetime | None = None
    answered_at: datetime | None = None
    ood_gate: str | None = None
    ood_score: float | None = None
    faithfulness: float | None = None
    heatmap_scale: float | None = None
    decode_ms: float | None = None
    infer_ms: float | None = None
    build_ms: float | None = None
    sc_sop_instance_uid: str = ""
    sr_sop_instance_uid: str = ""


@dataclass
class ReviewedResult:
    """A result with the current feedback of each reader who gave some (oldest reader first)."""

    result: Result
    feedback: list[Feedback]
    preview_path: Path
    grid_path: Path


@dataclass
class Worklist:
    """Filters of the worklist page; empty values do not filter."""

    decision: str = ""
    date_from: date | None = None
    date_to: date | None = None
    model_version: str = ""
    ood: Literal["", "yes", "no"] = ""
    feedback: Literal["", "none", "reviewed", "disagreed"] = ""
    search: str = ""
    limit: int = 100
    offset: int = 0


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL: the worker writes while the dashboard reads; busy_timeout waits out the other's lock.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")  # WAL stays consistent; the last commit may be lost on power loss
    cursor.close()


def _migrations_dir() -> str:
    return str(resources.files("worker") / "migrations")


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


def _hasher() -> Any:
    from argon2 import PasswordHasher

    return PasswordHasher()  # argon2-cffi's default is Argon2id with RFC 9106's low-memory parameters


def preview_of(unit_image: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The stored preview: 8-bit, long side at most PREVIEW_LONG_SIDE (never upscaled).

    A uint8 image (the worker's ``Result.unit_image``, the SC's 0-255 display image) is
    resized as it is and never scaled; one that already fits is returned unchanged (the
    recorder makes the preview on the worker's thread and hands it over). A float unit
    image in [0, 1] (the store's own callers and tests) becomes 0-255.
    """
    import cv2

    img: np.ndarray[Any, Any] = np.asarray(unit_image)
    is_uint8 = img.dtype == np.uint8
    if not is_uint8:
        img = np.asarray(img, np.float32)
    rows, cols = img.shape[:2]
    if max(rows, cols) > PREVIEW_LONG_SIDE:
        f = PREVIEW_LONG_SIDE / max(rows, cols)
        img = cv2.resize(img, (max(1, round(cols * f)), max(1, round(rows * f))), interpolation=cv2.INTER_AREA)
    if is_uint8:
        return img
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


class Recorder:
    """Writes results on its own thread, so the worker's processing thread only hands over.

    The worker's cost per image is :func:`preview_of` (a resize) and a queue put; the PNG,
    the grid and the row are written here. A full queue (the database or disk too slow)
    drops the record rather than wait: the outputs matter, the dashboard's copy does not.

    The database is opened on this thread too, so a PostgreSQL server that is down or slow to
    answer never holds up the DICOM service's start: the recorder retries every ``retry_s``
    meanwhile, and what the full queue cannot hold is dropped and counted.

    Args:
        store: Where results go, or a function that opens it (called on the recorder's thread).
        on_error: Called once per result not recorded, and per failed opening (the worker counts them).
        capacity: Results waiting at most (each holds a preview of up to 1 MB).
        retry_s: Time between attempts to open the store.
    """

    def __init__(self, store: ResultStore | Callable[[], ResultStore], on_error: Any = lambda: None,
                 capacity: int = 64, retry_s: float = 60.0) -> None:
        import queue

        self.store: ResultStore | None = store if isinstance(store, ResultStore) else None
        self._open = None if isinstance(store, ResultStore) else store
        self.on_error = on_error
        self.retry_s = retry_s
        self._closing = threading.Event()
        self._queue: queue.Queue[tuple[NewResult, np.ndarray[Any, Any], np.ndarray[Any, Any]] | None] = (
            queue.Queue(capacity))
        self._thread = threading.Thread(target=self._run, name="results-store", daemon=True)
        self._thread.start()

    def submit(self, new: NewResult, unit_image: np.ndarray[Any, Any], gradcam: np.ndarray[Any, Any]) -> None:
        """Queue one result (never blocks). Raises StoreError when the queue is full."""
        import queue

        try:
            self._queue.put_nowait((new, preview_of(unit_image), np.array(gradcam, np.float32)))
        except queue.Full:
            raise StoreError("results store queue full (the database or disk is too slow)") from None

    def _run(self) -> None:
        while self.store is None and self._open is not None:
            try:
                self.store = self._open()
            except Exception as exc:  # any error: a dead thread would count every record as "queue full"
                self.on_error()
                # A StoreError's message names the URL without its password; of anything else, the type only.
                why = str(exc) if isinstance(exc, StoreError) else type(exc).__name__
                logger.error("results are not recorded for the dashboard (retrying in %.0f s): %s", self.retry_s, why)
                if self._closing.wait(self.retry_s):
                    return
        while (item := self._queue.get()) is not None:
            try:
                assert self.store is not None
                self.store.record(*item)
            except Exception as exc:  # never PHI: the type and the UID only
                self.on_error()
                logger.error("result not recorded for the dashboard: %s", type(exc).__name__,
                             extra={"sop_instance_uid": item[0].sop_instance_uid})
            finally:
                self._queue.task_done()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued is written; False when the time ran out."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def close(self, timeout: float = 10.0) -> None:
        if self.store is not None:
            self.flush(timeout)
        self._closing.set()
        with contextlib.suppress(Exception):
            self._queue.put_nowait(None)
        self._thread.join(timeout=1.0)


class ResultStore:
    """The results database and its image files.

    Args:
        url: SQLAlchemy URL: ``sqlite:///PATH`` or ``postgresql+psycopg://USER@HOST/DB``.
        media_dir: Where previews and Grad-CAM grids are written (shared by every worker
            and the dashboard when the database is shared); default, for SQLite only,
            ``media`` beside the database file.

    Raises:
        StoreError: the database cannot be opened or migrated.
    """

    def __init__(self, url: str, media_dir: Path | None = None) -> None:
        if media_dir is None:
            if not url.startswith("sqlite:///"):
                raise StoreError(f"results database {self.engine_name(url)}: media_dir is needed beside a server")
            media_dir = Path(url.removeprefix("sqlite:///")).parent / "media"
        self.media_dir = Path(media_dir)
        try:
            self.media_dir.mkdir(parents=True, exist_ok=True)
            if url.startswith("sqlite:///"):
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            # A server that does not answer is an error after 10 s, not a hang (libpq waits forever).
            server = {"connect_timeout": 10} if url.startswith("postgresql") else {}
            self.engine = create_engine(url, pool_pre_ping=True, connect_args=server)
            if self.engine.dialect.name == "sqlite":
                event.listen(self.engine, "connect", _sqlite_pragmas)
            migrate(self.engine)
        except Exception as exc:  # e.g. Alembic's "Can't locate revision" after a newer worker migrated
            # Opening and migrating touch the schema only, never a patient's row: the first
            # line names the cause (a driver's later lines may hold SQL parameters).
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise StoreError(f"results database {self.engine_name(url)}: {type(exc).__name__}: {first}") from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any) -> ResultStore:
        """The store a worker.config.Settings names (``[dashboard]`` database_url and media_dir)."""
        d, spool = settings.dashboard, settings.spool.dir
        return cls(d.store_url(spool), d.store_media(spool))

    @staticmethod
    def engine_name(url: str) -> str:
        """The URL without its password, for messages."""
        from sqlalchemy.engine import make_url

        try:
            return make_url(url).render_as_string(hide_password=True)
        except Exception:
            return "(unparsable URL)"

    def session(self) -> Session:
        return self._sessions()

    def close(self) -> None:
        self.engine.dispose()

    # -- the worker's side -------------------------------------------------------------

    def record(self, new: NewResult, unit_image: np.ndarray[Any, Any], gradcam: np.ndarray[Any, Any]) -> int | None:
        """Write the preview, the Grad-CAM grid and the row of one answered instance.

        Args:
            new: The answer and its identifiers.
            unit_image: The windowed grayscale image the SC was drawn on: uint8 0-255 (the
                worker's) or float in [0, 1]; or its :func:`preview_of` already made.
            gradcam: The raw Grad-CAM grid [h, w] at the model's feature resolution.

        Returns:
            The row's id; None when this instance was already recorded for this model version.
        """
        import cv2

        preview = preview_of(unit_image)
        stem = hashlib.sha1(f"{new.sop_instance_uid}|{new.model_version}".encode()).hexdigest()[:20]
        answered = new.answered_at or utcnow()
        folder = Path(answered.strftime("%Y/%m/%d"))
        preview_rel, grid_rel = folder / f"{stem}.png", folder / f"{stem}.npy"
        with self.session() as s:
            if s.scalar(select(Result.id).where(Result.sop_instance_uid == new.sop_instance_uid,
                                                Result.model_version == new.model_version)) is not None:
                return None
        (self.media_dir / folder).mkdir(parents=True, exist_ok=True)
        # Level 1: a few ms for 1024 px; higher levels save little on radiographs and cost 5x.
        if not cv2.imwrite(str(self.media_dir / preview_rel), preview, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
            raise StoreError(f"cannot write preview {self.media_dir / preview_rel}")
        np.save(self.media_dir / grid_rel, np.nan_to_num(np.asarray(gradcam, np.float32)).astype(np.float16))
        values = {k: getattr(new, k) for k in NewResult.__dataclass_fields__}
        values["answered_at"] = answered
        values["review_key"] = review_key(new.sop_instance_uid, new.model_version)
        row = Result(**values, preview_path=preview_rel.as_posix(), grid_path=grid_rel.as_posix())
        with self.session() as s, s.begin():
            s.add(row)
        return row.id

    # -- the dashboard's side ----------------------------------------------------------

    def get(self, result_id: int) -> Result | None:
        with self.session() as s:
            return s.get(Result, result_id)

    def by_review_key(self, key: str) -> Result | None:
        """The newest result a review link names (worker.links.review_key)."""
        with self.session() as s:
            return s.scalars(select(Result).where(Result.review_key == key).order_by(Result.id.desc())).first()

    def worklist(self, w: Worklist) -> tuple[list[Result], int]:
        """Results for the worklist, newest first, and how many match in all.

        Every value reaches the database as a bound parameter, never as SQL text.
        """
        q = select(Result)
        if w.decision in DECISIONS:
            q = q.where(Result.decision == w.decision)
        if w.date_from is not None:
            q = q.where(Result.answered_at >= datetime.combine(w.date_from, datetime.min.time(), UTC))
        if w.date_to is not None:
            q = q.where(Result.answered_at < datetime.combine(w.date_to + timedelta(days=1),
                                                              datetime.min.time(), UTC))
        if w.model_version:
            q = q.where(Result.model_version == w.model_version)
        if w.ood == "yes":
            q = q.where(Result.ood_gate.is_not(None))
        elif w.ood == "no":
            q = q.where(Result.ood_gate.is_(None))
        has_feedback = select(Feedback.id).where(Feedback.result_id == Result.id).exists()
        if w.feedback == "none":
            q = q.where(~has_feedback)
        elif w.feedback == "reviewed":
            q = q.where(has_feedback)
        elif w.feedback == "disagreed":
            q = q.where(Result.id.in_(self._current_feedback_ids_query(agree=False)))
        if w.search.strip():
            term = w.search.strip()
            q = q.where(or_(Result.accession_number == term, Result.patient_id == term))
        with self.session() as s:
            total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
            rows = s.scalars(q.order_by(Result.answered_at.desc(), Result.id.desc())
                             .limit(w.limit).offset(w.offset)).all()
        return list(rows), total

    @staticmethod
    def _current_feedback_ids_query(agree: bool) -> Any:
        """result ids whose current feedback (latest row per reader) has ``agree``."""
        latest = (select(func.max(Feedback.id)).group_by(Feedback.result_id, Feedback.user_id)).scalar_subquery()
        return select(Feedback.result_id).where(Feedback.id.in_(latest), Feedback.agree.is_(agree))

    def model_versions(self) -> list[str]:
        with self.session() as s:
            return list(s.scalars(select(Result.model_version).distinct().order_by(Result.model_version)))

    def add_feedback(self, result_id: int, user_id: int, agree: bool, label: str, comment: str = "") -> Feedback:
        """Record one reader's answer (a new row even when it changes an earlier one)."""
        if label not in LABELS:
            raise StoreError(f"label must be one of {', '.join(LABELS)}. Received: label={label!r}")
        with self.session() as s, s.begin():
            if s.get(Result, result_id) is None:
                raise StoreError(f"no result {result_id}")
            row = Feedback(result_id=result_id, user_id=user_id, agree=agree, label=label,
                           comment=comment[:4000], created_at=utcnow())
            s.add(row)
        return row

    def feedback_history(self, result_id: int) -> list[Feedback]:
        """Every feedback row of a result, oldest first."""
        with self.session() as s:
            return list(s.scalars(select(Feedback).where(Feedback.result_id == result_id).order_by(Feedback.id)))

    @staticmethod
    def current(history: Sequence[Feedback]) -> list[Feedback]:
        """The latest row of each reader, in the order readers first answered."""
        latest: dict[int, Feedback] = {}
        for row in sorted(history, key=lambda r: r.id):
            latest[row.user_id] = row
        return sorted(latest.values(), key=lambda r: min(h.id for h in history if h.user_id == r.user_id))

    def current_feedback(self, result_id: int) -> list[Feedback]:
        return self.current(self.feedback_history(result_id))

    def feedback_summary(self, result_ids: Sequence[int]) -> dict[int, list[Feedback]]:
        """Current feedback of several results at once (the worklist's feedback column)."""
        if not result_ids:
            return {}
        with self.session() as s:
            rows = s.scalars(select(Feedback).where(Feedback.result_id.in_(list(result_ids))).order_by(Feedback.id))
            by_result: dict[int, list[Feedback]] = {}
            for r in rows:
                by_result.setdefault(r.result_id, []).append(r)
        return {k: self.current(v) for k, v in by_result.items()}

    def results_with_feedback(self, since: datetime | None = None) -> Iterator[ReviewedResult]:
        """Every result that has feedback, with each reader's current answer and its image files.

        This is the feedback export's entry point; results are yielded oldest first, in
        pages, so memory holds a page, not the whole database.
        """
        last_id = 0
        while True:
            with self.session() as s:
                q = (select(Result).where(Result.id > last_id, select(Feedback.id)
                                          .where(Feedback.result_id == Result.id).exists())
                     .order_by(Result.id).limit(200))
                if since is not None:
                    q = q.where(Result.answered_at >= since)
                page = list(s.scalars(q))
                histories = {r.id: list(r.feedback) for r in page}  # loaded inside the session
            if not page:
                return
            for r in page:
                yield ReviewedResult(r, self.current(histories[r.id]), self.media_dir / r.preview_path,
                                     self.media_dir / r.grid_path)
            last_id = page[-1].id

    def grid(self, result: Result) -> np.ndarray[Any, Any]:
        """The raw Grad-CAM grid of a result (float32)."""
        try:
            return np.load(self.media_dir / result.grid_path).astype(np.float32)
        except (OSError, ValueError) as exc:
            raise StoreError(f"result {result.id}: Grad-CAM grid unreadable: {type(exc).__name__}") from None

    def results_since(self, since: datetime) -> list[Result]:
        """Results answered since a time (the operations page's statistics)."""
        with self.session() as s:
            return list(s.scalars(select(Result).where(Result.answered_at >= since).order_by(Result.answered_at)))

    def current_feedback_since(self, since: datetime) -> list[tuple[str, bool]]:
        """(model version, agree) of every reader's current answer on results since a time."""
        latest = select(func.max(Feedback.id)).group_by(Feedback.result_id, Feedback.user_id).scalar_subquery()
        q = (select(Result.model_version, Feedback.agree).join(Feedback, Feedback.result_id == Result.id)
             .where(Feedback.id.in_(latest), Result.answered_at >= since))
        with self.session() as s:
            return [(v, bool(a)) for v, a in s.execute(q)]

    # -- accounts --------------------------------------------------------------------

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
            else:
                user.role, user.password_hash, user.disabled = role, hashed, False
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

    def get_user(self, user_id: int) -> User | None:
        with self.session() as s:
            return s.get(User, user_id)

    def users(self) -> list[User]:
        with self.session() as s:
            return list(s.scalars(select(User).order_by(User.name)))

    # -- retention -------------------------------------------------------------------

    def sweep(self, retention_days: float, now: datetime | None = None) -> int:
        """Delete results older than the retention, their feedback, previews and grids.

        Rows go first (one transaction), then their files; image files older than the
        retention that no row names (left by a crash between the two) go too.

        Returns:
            How many results were deleted.
        """
        now = now or utcnow()
        cutoff = now - timedelta(days=retention_days)
        with self.session() as s, s.begin():
            old = list(s.scalars(select(Result).where(Result.answered_at < cutoff)))
            files = [(r.preview_path, r.grid_path) for r in old]
            for r in old:
                s.delete(r)  # feedback goes with it (cascade)
        for pair in files:
            for rel in pair:
                (self.media_dir / rel).unlink(missing_ok=True)
        stamp = cutoff.timestamp()
        for path in self.media_dir.rglob("*"):
            if path.is_file() and path.suffix in (".png", ".npy") and path.stat().st_mtime < stamp:
                path.unlink(missing_ok=True)
        # The recorder makes the day's folder, then writes into it: today's (and, for a record
        # begun just before midnight, yesterday's) folder stays even when empty.
        days = [self.media_dir / (now - timedelta(days=d)).strftime("%Y/%m/%d") for d in (0, 1)]
        keep = {folder for day in days for folder in (day, day.parent, day.parent.parent)}
        for folder in sorted((p for p in self.media_dir.rglob("*") if p.is_dir()), reverse=True):
            if folder not in keep:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only empty day folders go
        if old:
            logger.info("retention sweep", extra={"results_deleted": len(old), "retention_days": retention_days})
        return len(old)


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


def run_migrations_online(connection: Connection) -> None:  # used by migrations/env.py
    from alembic import context

    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":  # several workers starting at once migrate one at a time
            from sqlalchemy import text

            connection.execute(text("SELECT pg_advisory_xact_lock(740613)"))
        context.run_migrations()
