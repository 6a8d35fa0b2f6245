"""Results and reader feedback: what the worker answered and what readers said about it.

The worker records every answered instance (:meth:`ResultStore.record`, from its own thread
through :class:`Recorder`); the dashboard (:mod:`worker.dashboard`) reads the results and
records reader feedback; ``cxr-worker feedback export`` reads both through
:meth:`ResultStore.results_with_feedback`. Feedback is never updated in place: each change is
a new row, and a reader's latest row is their current answer.

This module holds PHI (patient name and ID): it never logs them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
from sqlalchemy import (
    create_engine,
    event,
    func,
    or_,
    select,
)
from sqlalchemy.orm import Session, sessionmaker

from worker.links import review_key
from worker.store.media import PRIVATE_FILE, MediaFiles, preview_of, private_dir
from worker.store.schema import DECISIONS, LABELS, Feedback, StoredResult, StoreError, migrate, sqlite_pragmas, utcnow

logger = logging.getLogger(__name__)


def _private_sqlite(path: Path) -> None:
    """The database file made 0600 before SQLite opens it: SQLite gives its -wal and -shm files the
    database file's mode, so all three hold patient data for the service's user only."""
    private_dir(path.parent)
    if path.name == ":memory:":
        return
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, PRIVATE_FILE)
    try:
        with contextlib.suppress(OSError):  # a database someone else owns is left as it is
            os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)
    for side in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(OSError):  # left by an older version under a wider umask
            side.chmod(PRIVATE_FILE)


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

    result: StoredResult
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
            self.media = MediaFiles(self.media_dir)
            if url.startswith("sqlite:///"):
                _private_sqlite(Path(url.removeprefix("sqlite:///")))
            # A server that does not answer is an error after 10 s, not a hang (libpq waits forever).
            server = {"connect_timeout": 10} if url.startswith("postgresql") else {}
            self.engine = create_engine(url, pool_pre_ping=True, connect_args=server)
            if self.engine.dialect.name == "sqlite":
                event.listen(self.engine, "connect", sqlite_pragmas)
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
        preview = preview_of(unit_image)
        stem = hashlib.sha1(f"{new.sop_instance_uid}|{new.model_version}".encode()).hexdigest()[:20]
        answered = new.answered_at or utcnow()
        with self.session() as s:
            if s.scalar(select(StoredResult.id).where(StoredResult.sop_instance_uid == new.sop_instance_uid,
                                                StoredResult.model_version == new.model_version)) is not None:
                return None
        preview_rel, grid_rel = self.media.write(stem, answered, preview, gradcam)
        values = {k: getattr(new, k) for k in NewResult.__dataclass_fields__}
        values["answered_at"] = answered
        values["review_key"] = review_key(new.sop_instance_uid, new.model_version)
        row = StoredResult(**values, preview_path=preview_rel, grid_path=grid_rel)
        with self.session() as s, s.begin():
            s.add(row)
        return row.id

    # -- the dashboard's side ----------------------------------------------------------

    def get(self, result_id: int) -> StoredResult | None:
        with self.session() as s:
            return s.get(StoredResult, result_id)

    def by_review_key(self, key: str) -> StoredResult | None:
        """The newest result a review link names (worker.links.review_key)."""
        with self.session() as s:
            q = select(StoredResult).where(StoredResult.review_key == key).order_by(StoredResult.id.desc())
            return s.scalars(q).first()

    def worklist(self, w: Worklist) -> tuple[list[StoredResult], int]:
        """Results for the worklist, newest first, and how many match in all.

        Every value reaches the database as a bound parameter, never as SQL text.
        """
        q = select(StoredResult)
        if w.decision in DECISIONS:
            q = q.where(StoredResult.decision == w.decision)
        if w.date_from is not None:
            q = q.where(StoredResult.answered_at >= datetime.combine(w.date_from, datetime.min.time(), UTC))
        if w.date_to is not None:
            q = q.where(StoredResult.answered_at < datetime.combine(w.date_to + timedelta(days=1),
                                                              datetime.min.time(), UTC))
        if w.model_version:
            q = q.where(StoredResult.model_version == w.model_version)
        if w.ood == "yes":
            q = q.where(StoredResult.ood_gate.is_not(None))
        elif w.ood == "no":
            q = q.where(StoredResult.ood_gate.is_(None))
        has_feedback = select(Feedback.id).where(Feedback.result_id == StoredResult.id).exists()
        if w.feedback == "none":
            q = q.where(~has_feedback)
        elif w.feedback == "reviewed":
            q = q.where(has_feedback)
        elif w.feedback == "disagreed":
            q = q.where(StoredResult.id.in_(self._current_feedback_ids_query(agree=False)))
        if w.search.strip():
            term = w.search.strip()
            q = q.where(or_(StoredResult.accession_number == term, StoredResult.patient_id == term))
        with self.session() as s:
            total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
            rows = s.scalars(q.order_by(StoredResult.answered_at.desc(), StoredResult.id.desc())
                             .limit(w.limit).offset(w.offset)).all()
        return list(rows), total

    @staticmethod
    def _current_feedback_ids_query(agree: bool) -> Any:
        """result ids whose current feedback (latest row per reader) has ``agree``."""
        latest = (select(func.max(Feedback.id)).group_by(Feedback.result_id, Feedback.user_id)).scalar_subquery()
        return select(Feedback.result_id).where(Feedback.id.in_(latest), Feedback.agree.is_(agree))

    def model_versions(self) -> list[str]:
        with self.session() as s:
            return list(s.scalars(select(StoredResult.model_version).distinct().order_by(StoredResult.model_version)))

    def add_feedback(self, result_id: int, user_id: int, agree: bool, label: str, comment: str = "") -> Feedback:
        """Record one reader's answer (a new row even when it changes an earlier one)."""
        if label not in LABELS:
            raise StoreError(f"label must be one of {', '.join(LABELS)}. Received: label={label!r}")
        with self.session() as s, s.begin():
            if s.get(StoredResult, result_id) is None:
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
                q = (select(StoredResult).where(StoredResult.id > last_id, select(Feedback.id)
                                          .where(Feedback.result_id == StoredResult.id).exists())
                     .order_by(StoredResult.id).limit(200))
                if since is not None:
                    q = q.where(StoredResult.answered_at >= since)
                page = list(s.scalars(q))
                histories = {r.id: list(r.feedback) for r in page}  # loaded inside the session
            if not page:
                return
            for r in page:
                yield ReviewedResult(r, self.current(histories[r.id]), self.media_dir / r.preview_path,
                                     self.media_dir / r.grid_path)
            last_id = page[-1].id

    def grid(self, result: StoredResult) -> np.ndarray[Any, Any]:
        """The raw Grad-CAM grid of a result (float32)."""
        try:
            return self.media.grid(result.grid_path)
        except (OSError, ValueError) as exc:
            raise StoreError(f"result {result.id}: Grad-CAM grid unreadable: {type(exc).__name__}") from None

    def results_since(self, since: datetime) -> list[StoredResult]:
        """Results answered since a time (the operations page's statistics)."""
        with self.session() as s:
            q = select(StoredResult).where(StoredResult.answered_at >= since).order_by(StoredResult.answered_at)
            return list(s.scalars(q))

    def current_feedback_since(self, since: datetime) -> list[tuple[str, bool]]:
        """(model version, agree) of every reader's current answer on results since a time."""
        latest = select(func.max(Feedback.id)).group_by(Feedback.result_id, Feedback.user_id).scalar_subquery()
        q = (select(StoredResult.model_version, Feedback.agree).join(Feedback, Feedback.result_id == StoredResult.id)
             .where(Feedback.id.in_(latest), StoredResult.answered_at >= since))
        with self.session() as s:
            return [(v, bool(a)) for v, a in s.execute(q)]

    # -- accounts --------------------------------------------------------------------
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
            old = list(s.scalars(select(StoredResult).where(StoredResult.answered_at < cutoff)))
            files = [(r.preview_path, r.grid_path) for r in old]
            for r in old:
                s.delete(r)  # feedback goes with it (cascade)
        self.media.remove(rel for pair in files for rel in pair)
        self.media.sweep(cutoff, now)
        if old:
            logger.info("retention sweep", extra={"results_deleted": len(old), "retention_days": retention_days})
        return len(old)
