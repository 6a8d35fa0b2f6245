"""The results database on SQLite: record, feedback history, worklist filters, accounts, retention."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest

from worker.dashboard.accounts import Accounts
from worker.store import NewResult, Recorder, ResultStore, StoreError, Worklist, preview_of, sqlite_url
from worker.store.schema import head_revision


def new(uid: str, decision: str = "positive", version: str = "1.0", **kw: object) -> NewResult:
    base = dict(study_instance_uid="1.2.3", series_instance_uid="1.2.3.4", sop_instance_uid=uid, probability=0.8,
                decision=decision, threshold=0.5, model_name="cxr", model_version=version,
                accession_number=f"ACC{uid[-1]}", patient_id=f"PID{uid[-1]}", patient_name="Doe^Jane")
    base.update(kw)
    return NewResult(**base)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> ResultStore:
    return ResultStore(sqlite_url(tmp_path / "results.db"), tmp_path / "media")


def test_record_writes_preview_grid_and_row(store: ResultStore) -> None:
    image = np.linspace(0, 1, 3000 * 2000, dtype=np.float32).reshape(3000, 2000)
    cam = np.arange(64, dtype=np.float32).reshape(8, 8)
    rid = store.record(new("1.9.1"), image, cam)
    assert rid is not None
    row = store.get(rid)
    assert row is not None and row.patient_id == "PID1" and row.decision == "positive"
    preview = cv2.imread(str(store.media_dir / row.preview_path), cv2.IMREAD_UNCHANGED)
    assert preview.dtype == np.uint8 and preview.shape == (1024, 683)  # long side 1024, aspect kept
    assert preview[0, 0] == 0 and preview[-1, -1] == 255  # windowed as the model saw it, full 8-bit range
    np.testing.assert_allclose(store.grid(row), cam, rtol=1e-3)
    assert store.record(new("1.9.1"), image, cam) is None  # the same instance and model: recorded once
    assert store.record(new("1.9.1", version="2.0"), image[:100, :100], cam) is not None


def test_migrations_are_idempotent_and_the_schema_is_alembics(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "r.db")
    ResultStore(url, tmp_path / "m").record(new("1.9.1"), np.zeros((10, 10)), np.zeros((2, 2)))
    again = ResultStore(url, tmp_path / "m")  # a second process opening the same database
    with again.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == head_revision()
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    assert again.worklist(Worklist())[1] == 1


def test_feedback_history_is_kept_and_the_latest_row_is_current(store: ResultStore) -> None:
    rid = store.record(new("1.9.1"), np.zeros((10, 10)), np.zeros((2, 2)))
    other = store.record(new("1.9.2", decision="negative"), np.zeros((10, 10)), np.zeros((2, 2)))
    assert rid is not None and other is not None
    a = Accounts(store).add_user("alice", "reader", "correct horse")
    b = Accounts(store).add_user("bob", "reader", "battery staple")
    store.add_feedback(rid, a.id, False, "no_pneumonia", "first look")
    store.add_feedback(rid, b.id, True, "pneumonia")
    store.add_feedback(rid, a.id, True, "pneumonia", "changed my mind")
    assert [f.comment for f in store.feedback_history(rid)] == ["first look", "", "changed my mind"]
    current = store.current_feedback(rid)
    assert [(f.user.name, f.agree, f.label) for f in current] == [("alice", True, "pneumonia"),
                                                                  ("bob", True, "pneumonia")]
    assert store.worklist(Worklist(feedback="disagreed"))[1] == 0  # alice's disagreement is history
    store.add_feedback(other, b.id, False, "uncertain")
    assert [r.id for r in store.worklist(Worklist(feedback="disagreed"))[0]] == [other]
    assert store.worklist(Worklist(feedback="none"))[1] == 0
    reviewed = list(store.results_with_feedback())
    assert [r.result.id for r in reviewed] == [rid, other]
    assert all(r.preview_path.is_file() and r.grid_path.is_file() for r in reviewed)
    assert [f.label for f in reviewed[1].feedback] == ["uncertain"]
    with pytest.raises(StoreError, match="label must be one of"):
        store.add_feedback(rid, a.id, True, "maybe")


def test_worklist_filters_and_search_take_values_as_data(store: ResultStore) -> None:
    store.record(new("1.9.1"), np.zeros((10, 10)), np.zeros((2, 2)))
    store.record(new("1.9.2", decision="withheld", ood_gate="ood_score", version="2.0"),
                 np.zeros((10, 10)), np.zeros((2, 2)))
    assert store.worklist(Worklist(decision="withheld"))[1] == 1
    assert store.worklist(Worklist(ood="yes"))[0][0].sop_instance_uid == "1.9.2"
    assert store.worklist(Worklist(model_version="1.0"))[1] == 1
    assert store.worklist(Worklist(search="ACC2"))[1] == 1 and store.worklist(Worklist(search="PID1"))[1] == 1
    for attack in ("' OR '1'='1", "PID1' OR 1=1 --", "x'; DROP TABLE results; --"):
        assert store.worklist(Worklist(search=attack))[1] == 0
    assert store.worklist(Worklist())[1] == 2  # the table survived
    assert store.model_versions() == ["1.0", "2.0"]


def test_passwords_are_argon2id_and_wrong_ones_fail(store: ResultStore) -> None:
    user = Accounts(store).add_user("carol", "admin", "s3cret-pass")
    assert user.password_hash.startswith("$argon2id$")
    assert Accounts(store).authenticate("carol", "s3cret-pass") is not None
    assert Accounts(store).authenticate("carol", "wrong-pass") is None
    assert Accounts(store).authenticate("nobody", "s3cret-pass") is None
    with pytest.raises(StoreError, match="role must be one of"):
        Accounts(store).add_user("dave", "root", "long enough")
    with pytest.raises(StoreError, match="at least 8"):
        Accounts(store).add_user("dave", "reader", "short")


def test_retention_sweep_deletes_rows_feedback_and_files_together(store: ResultStore) -> None:
    now = datetime.now(UTC)
    old = store.record(new("1.9.1", answered_at=now - timedelta(days=40)), np.zeros((10, 10)), np.zeros((2, 2)))
    fresh = store.record(new("1.9.2"), np.zeros((10, 10)), np.zeros((2, 2)))
    assert old is not None and fresh is not None
    user = Accounts(store).add_user("alice", "reader", "correct horse")
    store.add_feedback(old, user.id, True, "pneumonia")
    old_row = store.get(old)
    assert old_row is not None
    files = [store.media_dir / old_row.preview_path, store.media_dir / old_row.grid_path]
    assert all(f.is_file() for f in files)
    assert store.sweep(30) == 1
    assert store.get(old) is None and store.feedback_history(old) == []
    assert not any(f.exists() for f in files)
    kept = store.get(fresh)
    assert kept is not None and (store.media_dir / kept.preview_path).is_file()
    assert store.sweep(30) == 0


def test_the_store_opens_from_settings_with_media_beside_sqlite(tmp_path: Path) -> None:
    from worker.config import get_settings

    settings = get_settings(None, {"spool": {"dir": tmp_path / "spool"}})
    store = ResultStore.from_settings(settings)
    assert store.media_dir == tmp_path / "spool" / "results" / "media"
    assert ResultStore(sqlite_url(tmp_path / "x" / "r.db")).media_dir == (tmp_path / "x" / "media").resolve()
    with pytest.raises(StoreError, match="media_dir is needed"):
        ResultStore("postgresql+psycopg://cxr@db/cxr")


def test_an_unreachable_database_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"results database postgresql\+psycopg://cxr:\*\*\*@127.0.0.1:1/cxr"):
        ResultStore("postgresql+psycopg://cxr:secret@127.0.0.1:1/cxr?connect_timeout=2", tmp_path / "m")


def test_the_recorder_writes_on_its_own_thread_and_never_blocks(store: ResultStore) -> None:
    errors: list[int] = []
    recorder = Recorder(store, on_error=lambda: errors.append(1), capacity=2)
    image = np.full((2048, 1024), 0.5, np.float32)
    recorder.submit(new("1.9.1"), image, np.ones((3, 3)))
    assert recorder.flush(30)
    rows, total = store.worklist(Worklist())
    assert total == 1 and cv2.imread(str(store.media_dir / rows[0].preview_path)).shape[:2] == (1024, 512)
    # A row the database refuses (a study date that is no date) is counted, not raised; the
    # thread goes on with the next one.
    recorder.submit(new("1.9.2", study_date="not a date"), image, np.ones((3, 3)))  # type: ignore[arg-type]
    recorder.submit(new("1.9.3"), image, np.ones((3, 3)))
    assert recorder.flush(30)
    assert errors == [1] and store.worklist(Worklist())[1] == 2
    recorder.close()


def test_the_recorder_opens_the_store_on_its_thread_and_retries(store: ResultStore) -> None:
    attempts: list[int] = []
    errors: list[int] = []

    def opener() -> ResultStore:
        attempts.append(1)
        if len(attempts) == 1:  # the database is down when the worker starts
            raise StoreError("results database postgresql+psycopg://cxr@db/cxr: OperationalError")
        return store

    recorder = Recorder(opener, on_error=lambda: errors.append(1), retry_s=0.05)
    recorder.submit(new("1.9.1"), np.zeros((10, 10)), np.zeros((2, 2)))  # queued while it cannot open
    assert recorder.flush(30)
    assert len(attempts) == 2 and errors == [1] and store.worklist(Worklist())[1] == 1
    recorder.close()


def test_a_full_recorder_queue_refuses_at_once(store: ResultStore) -> None:
    recorder = Recorder(store, capacity=1)
    recorder._queue.put(None)  # noqa: SLF001 (the writer stops: the queue stays full)
    recorder._thread.join(5)  # noqa: SLF001
    recorder._queue.put_nowait((new("1.9.1"), preview_of(np.zeros((4, 4))), np.zeros((2, 2))))  # noqa: SLF001
    with pytest.raises(StoreError, match="queue full"):
        recorder.submit(new("1.9.2"), np.zeros((4, 4)), np.zeros((2, 2)))


def test_a_large_uint8_image_is_previewed_as_it_is_shown_not_scaled_again(store: ResultStore) -> None:
    # What the worker hands over: Result.unit_image, the SC's uint8 0-255 display image, at a
    # real CR/DX size (the 128-px test images never reached the resize).
    image = np.tile(np.linspace(0, 255, 1800).round().astype(np.uint8), (2048, 1))
    expected = cv2.resize(image, (900, 1024), interpolation=cv2.INTER_AREA)
    preview = preview_of(image)
    assert preview.dtype == np.uint8 and preview.shape == (1024, 900)
    np.testing.assert_array_equal(preview, expected)
    assert (preview == 255).mean() < 0.01  # not saturated white
    rid = store.record(new("1.9.1"), image, np.zeros((2, 2)))
    row = store.get(rid) if rid is not None else None
    assert row is not None
    np.testing.assert_array_equal(cv2.imread(str(store.media_dir / row.preview_path), cv2.IMREAD_UNCHANGED), expected)


def test_a_database_migrated_by_a_newer_worker_is_a_store_error_and_the_recorder_lives(tmp_path: Path) -> None:
    import sqlite3
    import time

    # A newer worker migrated the shared database: this one's Alembic cannot locate the revision.
    db = tmp_path / "r.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        conn.execute("INSERT INTO alembic_version VALUES ('9999_newer')")
    with pytest.raises(StoreError, match=r"results database sqlite:///.*r\.db: CommandError"):
        ResultStore(sqlite_url(db), tmp_path / "m")
    errors: list[int] = []
    attempts: list[int] = []

    def opener() -> ResultStore:
        attempts.append(1)
        if len(attempts) == 1:  # an error the store does not wrap: the thread must survive it too
            raise RuntimeError("unexpected")
        return ResultStore(sqlite_url(db), tmp_path / "m")

    recorder = Recorder(opener, on_error=lambda: errors.append(1), retry_s=0.05)
    deadline = time.monotonic() + 30
    while len(errors) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(errors) >= 3 and recorder._thread.is_alive()  # noqa: SLF001 (it retries, it does not die)
    recorder.close()
    assert not recorder._thread.is_alive()  # noqa: SLF001


def test_the_retention_sweep_keeps_today_s_empty_folder(store: ResultStore) -> None:
    # The recorder makes the day's folder, then writes into it: a sweep in between must not
    # take the folder away (that record would be lost). Empty folders of past days go.
    now = datetime.now(UTC)
    today = store.media_dir / now.strftime("%Y/%m/%d")
    old = store.media_dir / (now - timedelta(days=40)).strftime("%Y/%m/%d")
    today.mkdir(parents=True)
    old.mkdir(parents=True)
    store.sweep(30, now=now)
    assert today.is_dir() and not old.exists()


def test_deleted_rows_are_overwritten_whatever_sqlite_s_build(store: ResultStore, tmp_path: Path) -> None:
    import sqlite3

    from worker.store.schema import sqlite_pragmas

    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA secure_delete").scalar() == 1
    raw = sqlite3.connect(tmp_path / "built-without.db")  # as a build without SQLITE_SECURE_DELETE opens it
    raw.execute("PRAGMA secure_delete=OFF")
    sqlite_pragmas(raw, None)
    assert raw.execute("PRAGMA secure_delete").fetchone()[0] == 1
    raw.close()
