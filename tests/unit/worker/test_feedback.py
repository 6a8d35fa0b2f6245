"""``cxr-worker feedback export`` on a real SQLite results store: de-identified, keyed, expired previews named."""

from __future__ import annotations

import json
import stat
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxr_contract.feedback import key_fingerprint, read_export
from worker.cli import main
from worker.dashboard.accounts import Accounts
from worker.errors import ConfigError
from worker.feedback import export_feedback, load_or_create_key, parse_since
from worker.store import NewResult, ResultStore, sqlite_url

#: What the store holds about each patient and what must never reach the export.
PHI = {"name": "Doe^Jane^Q", "pid": "MRN-4711-XYZ", "acc": "ACC-99887766", "study": "1.2.826.0.1.3680043.9.7.4711",
       "reader": "dr_alice", "comment": "called Mrs Doe back"}


@pytest.fixture
def store(tmp_path: Path) -> ResultStore:
    s = ResultStore(sqlite_url(tmp_path / "spool" / "results" / "results.db"), tmp_path / "spool" / "results" / "media")
    accounts = Accounts(s)
    alice = accounts.add_user(PHI["reader"], "reader", "correct horse")
    bob = accounts.add_user("bob", "reader", "battery staple")
    for n, (prob, labels) in enumerate([(0.9, ["pneumonia", "pneumonia"]), (0.2, ["no_pneumonia", "pneumonia"]),
                                        (0.6, [])]):
        rid = s.record(NewResult(
            study_instance_uid=PHI["study"], series_instance_uid=f"{PHI['study']}.1",
            sop_instance_uid=f"{PHI['study']}.1.{n}", probability=prob,
            decision="positive" if prob > 0.5 else "negative",
            threshold=0.5, model_name="cxr", model_version="test-1", accession_number=PHI["acc"],
            patient_id=PHI["pid"] if n < 2 else "OTHER-1", patient_name=PHI["name"], study_date=date(1970, 1, 1),
            answered_at=datetime.now(UTC) - timedelta(days=3 - n)),
            np.linspace(0, 1, 1200 * 1000, dtype=np.float32).reshape(1200, 1000), np.ones((4, 4)))
        assert rid is not None
        for user, label in zip((alice, bob), labels, strict=False):
            s.add_feedback(rid, user.id, label == "pneumonia" and prob > 0.5, "uncertain", PHI["comment"])
            s.add_feedback(rid, user.id, label == ("pneumonia" if prob > 0.5 else "no_pneumonia"), label,
                           PHI["comment"])  # changed their mind: only this row is current
    return s


def _all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_the_export_holds_current_labels_and_no_phi(tmp_path: Path, store: ResultStore) -> None:
    key = load_or_create_key(tmp_path / "key")
    report = export_feedback(store, tmp_path / "fb", key)
    fb = read_export(tmp_path / "fb")
    assert (report.results, report.labels, report.images) == (2, 4, 2) and not report.skipped
    assert sorted(lab.label for lab in fb.labels) == ["no_pneumonia", "pneumonia", "pneumonia", "pneumonia"]
    assert len({lab.patient_key for lab in fb.labels}) == 1 and len({lab.reader for lab in fb.labels}) == 2
    assert fb.manifest.key_fingerprint == key_fingerprint(key)
    image = cv2.imread(str(fb.image_file(fb.labels[0])), -1)
    assert image is not None and image.dtype == np.uint8 and image.shape == (1024, 853)  # the preview the reader saw
    blob = _all_bytes(tmp_path / "fb")
    for value in (*PHI.values(), "19700101", "1970-01-01", "MRN", "OTHER-1"):
        assert value.encode() not in blob, value
    # The same key file gives the same pseudonyms in a later export; another key does not.
    export_feedback(store, tmp_path / "again", load_or_create_key(tmp_path / "key"))
    assert {lab.patient_key for lab in read_export(tmp_path / "again").labels} == {fb.labels[0].patient_key}
    export_feedback(store, tmp_path / "other", load_or_create_key(tmp_path / "key2"))
    assert fb.labels[0].patient_key not in {lab.patient_key for lab in read_export(tmp_path / "other").labels}


def test_the_key_file_is_created_private_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "deep" / "key")
    assert len(key) == 32 and stat.S_IMODE((tmp_path / "deep" / "key").stat().st_mode) == 0o600
    assert load_or_create_key(tmp_path / "deep" / "key") == key
    (tmp_path / "bad").write_text("not hex")
    with pytest.raises(ConfigError, match="bad: not a hex key"):
        load_or_create_key(tmp_path / "bad")


def test_an_expired_preview_is_named_and_skipped(tmp_path: Path, store: ResultStore) -> None:
    first = next(store.results_with_feedback())
    first.preview_path.unlink()
    report = export_feedback(store, tmp_path / "fb", load_or_create_key(tmp_path / "key"))
    assert report.skipped == [f"result {first.result.id}: preview {first.preview_path.name} is gone "
                              "(deleted by the retention sweep?): skipped"]
    assert (report.results, report.labels) == (1, 2) and read_export(tmp_path / "fb").manifest.images == 1


def test_since_selects_recent_results() -> None:
    assert parse_since("2026-01-31") == datetime(2026, 1, 31, tzinfo=UTC)
    assert parse_since("2026-01-31T12:00:00+01:00").hour == 12


def test_the_command_exports_once_and_names_a_folder_in_use(tmp_path: Path, store: ResultStore,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(f'[spool]\ndir = "{tmp_path / "spool"}"\n[audit]\npath = "{tmp_path / "audit.jsonl"}"\n'
                      f'[feedback]\npseudonym_key_file = "{tmp_path / "site.key"}"\n')
    since = (datetime.now(UTC) - timedelta(days=2, hours=12)).isoformat()
    assert main(["feedback", "export", "--config", str(config), "--out", str(tmp_path / "fb"), "--since", since]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["results"], out["labels"]) == (1, 2)  # the oldest result is before --since
    assert (tmp_path / "site.key").is_file()
    audit = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert audit["EventIdentification"]["EventID"]["code"] == "110106"
    assert main(["feedback", "export", "--config", str(config), "--out", str(tmp_path / "fb")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cxr-worker feedback: error: {tmp_path / 'fb'}: exists and is not an empty folder; "
                   "feedback exports never mix"]
    assert main(["feedback", "export", "--config", str(config), "--out", str(tmp_path / "x"), "--since", "May"]) == 1


def test_the_export_holds_the_worker_s_uint8_image_as_shown(tmp_path: Path) -> None:
    # The worker records Result.unit_image, the SC's uint8 0-255 image, at a real CR/DX size:
    # the training PNG is its INTER_AREA reduction, not a saturated white.
    s = ResultStore(sqlite_url(tmp_path / "r.db"), tmp_path / "media")
    image = np.tile(np.linspace(0, 255, 1800).round().astype(np.uint8), (2048, 1))
    rid = s.record(NewResult(study_instance_uid="1.2.3", series_instance_uid="1.2.3.1", sop_instance_uid="1.2.3.1.1",
                             probability=0.9, decision="positive", threshold=0.5, model_name="cxr",
                             model_version="test-1"), image, np.ones((4, 4)))
    assert rid is not None
    s.add_feedback(rid, Accounts(s).add_user("alice", "reader", "correct horse").id, True, "pneumonia")
    export_feedback(s, tmp_path / "fb", load_or_create_key(tmp_path / "key"))
    fb = read_export(tmp_path / "fb")
    exported = cv2.imread(str(fb.image_file(fb.labels[0])), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(exported, cv2.resize(image, (900, 1024), interpolation=cv2.INTER_AREA))


def test_label_times_are_months_and_no_cell_is_a_formula(tmp_path: Path) -> None:
    s = ResultStore(sqlite_url(tmp_path / "r.db"), tmp_path / "media")
    reader = Accounts(s).add_user("r", "reader", "long enough")
    versions = ["=HYPERLINK(\"http://x\")", "+1", "-1", "@SUM(A1)", "'quoted", "plain"]
    for n, version in enumerate(versions):
        rid = s.record(NewResult(study_instance_uid="1.2.3", series_instance_uid="1.2.3.1",
                                 sop_instance_uid=f"1.2.3.1.{n}", probability=0.5, decision="positive",
                                 threshold=0.5, model_name="cxr", model_version=version),
                       np.zeros((16, 16)), np.zeros((2, 2)))
        assert rid is not None
        s.add_feedback(rid, reader.id, True, "pneumonia")
    export_feedback(s, tmp_path / "out", b"k" * 32)
    cells = [c for line in (tmp_path / "out" / "labels.csv").read_text().splitlines()[1:] for c in line.split(",")]
    assert not any(c.lstrip('"').startswith(("=", "+", "-", "@")) for c in cells)
    labels = read_export(tmp_path / "out").labels
    assert sorted(lab.model_version for lab in labels) == sorted(versions)  # the trainer reads them back
    for lab in labels:  # to the month: the exact time of a label is a date of care
        at = lab.recorded_at
        assert (at.day, at.hour, at.minute, at.second, at.microsecond) == (1, 0, 0, 0, 0)
