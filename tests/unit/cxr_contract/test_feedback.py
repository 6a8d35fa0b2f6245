"""The feedback export format: written and read back, malformed folders named, pseudonyms keyed."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxr_contract.feedback import (
    LABELS_FILE,
    MANIFEST_FILE,
    ExportWriter,
    FeedbackFormatError,
    FeedbackLabel,
    key_fingerprint,
    pseudonym,
    read_export,
    write_export,
)

KEY = b"k" * 32


def _label(image: str = "img-1", reader: str = "reader-a", label: str = "pneumonia") -> FeedbackLabel:
    return FeedbackLabel(patient_key=pseudonym("PAT-1", KEY), image_key=pseudonym(image, KEY),
                         reader=pseudonym(reader, KEY), label=label, agree=False, model_version="v1.2",
                         model_probability=0.25, recorded_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))


@pytest.fixture
def export(tmp_path: Path) -> Path:
    labels = [_label(), _label(reader="reader-b", label="uncertain"), _label("img-2", label="no_pneumonia")]
    images = {lab.image_key: np.full((40, 30), i * 50, np.uint8) for i, lab in enumerate(labels)}
    write_export(tmp_path / "fb", labels, images, KEY)
    return tmp_path / "fb"


def test_a_folder_reads_back_as_written(export: Path) -> None:
    fb = read_export(export)
    assert [(lab.label, lab.agree, lab.model_probability) for lab in fb.labels] == [
        ("pneumonia", False, 0.25), ("uncertain", False, 0.25), ("no_pneumonia", False, 0.25)]
    assert fb.labels[0].recorded_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert fb.manifest.labels == 3 and fb.manifest.images == 2
    assert fb.manifest.key_fingerprint == key_fingerprint(KEY)
    pixels = cv2.imread(str(fb.image_file(fb.labels[2])), -1)
    assert pixels is not None and pixels.dtype == np.uint8 and pixels.shape == (40, 30)


def test_the_manifest_names_the_key_by_fingerprint_only(export: Path) -> None:
    text = (export / MANIFEST_FILE).read_text()
    assert KEY.decode() not in text and key_fingerprint(KEY) in text
    assert key_fingerprint(KEY) != key_fingerprint(b"x" * 32)


def test_pseudonyms_are_stable_and_keyed() -> None:
    assert pseudonym("PAT-1", KEY) == pseudonym("PAT-1", KEY)
    assert pseudonym("PAT-1", KEY) != pseudonym("PAT-2", KEY)
    assert pseudonym("PAT-1", KEY) != pseudonym("PAT-1", b"j" * 32)
    assert len(pseudonym("PAT-1", KEY)) == 20 and "PAT" not in pseudonym("PAT-1", KEY)
    with pytest.raises(FeedbackFormatError, match="at least 16 bytes"):
        pseudonym("PAT-1", b"short")


def _rewrite(export: Path, row: int, column: str, value: str) -> None:
    path = export / LABELS_FILE
    rows = list(csv.DictReader(path.open()))
    rows[row - 2][column] = value
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.mark.parametrize(("column", "value", "words"), [
    ("label", "maybe", "label must be one of pneumonia, no_pneumonia, uncertain, received 'maybe'"),
    ("agree", "y", "agree must be yes or no"),
    ("model_probability", "high", "model_probability is not a number"),
    ("model_probability", "1.5", "model_probability must be in [0, 1]"),
    ("recorded_at", "2026-01-02", "recorded_at must be UTC"),
    ("patient_key", "Doe^John", "patient_key must be a pseudonym"),
    ("image", "images/../x.png", "image must be"),
])
def test_a_malformed_row_is_named_by_file_and_row(export: Path, column: str, value: str, words: str) -> None:
    _rewrite(export, 3, column, value)
    with pytest.raises(FeedbackFormatError) as err:
        read_export(export)
    assert str(err.value).startswith(f"{export / LABELS_FILE}:3: ") and words in str(err.value)


def test_a_missing_image_or_manifest_is_named(export: Path) -> None:
    fb = read_export(export)
    fb.image_file(fb.labels[2]).unlink()
    with pytest.raises(FeedbackFormatError, match=r"labels.csv:4: image file not found"):
        read_export(export)
    (export / MANIFEST_FILE).write_text(json.dumps({"format": "cxr-gradcam-feedback", "format_version": 9}))
    with pytest.raises(FeedbackFormatError, match="format_version 9 is not supported"):
        read_export(export)
    (export / MANIFEST_FILE).unlink()
    with pytest.raises(FeedbackFormatError, match="manifest.json: missing"):
        read_export(export)


def test_rows_missing_from_the_file_do_not_pass_unnoticed(export: Path) -> None:
    lines = (export / LABELS_FILE).read_text().splitlines(keepends=True)
    (export / LABELS_FILE).write_text("".join(lines[:-1]))
    with pytest.raises(FeedbackFormatError, match="2 label rows, the manifest says 3"):
        read_export(export)


def test_the_writer_refuses_bad_values_and_never_mixes_exports(tmp_path: Path, export: Path) -> None:
    lab = _label()
    with pytest.raises(FeedbackFormatError, match="no image given"):
        write_export(tmp_path / "a", [lab], {}, KEY)
    with pytest.raises(FeedbackFormatError, match="2-D uint8"):
        write_export(tmp_path / "b", [lab], {lab.image_key: np.zeros((4, 4), np.uint16)}, KEY)
    with pytest.raises(FeedbackFormatError, match="not an empty folder"):
        write_export(export, [lab], {lab.image_key: np.zeros((4, 4), np.uint8)}, KEY)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_export_interrupted_before_close_is_refused(tmp_path: Path) -> None:
    writer = ExportWriter(tmp_path / "fb", KEY)
    lab = _label()
    writer.add_image(lab.image_key, np.zeros((8, 8), np.uint8))
    writer.add(lab)
    with pytest.raises(FeedbackFormatError, match="manifest.json: missing"):
        read_export(tmp_path / "fb")
    assert writer.close().labels == 1 and read_export(tmp_path / "fb").labels == [
        FeedbackLabel(**{**vars(lab), "image": f"images/{lab.image_key}.png"})]


def test_labels_that_are_not_utf8_are_named_by_file_and_line(export: Path) -> None:
    path = export / LABELS_FILE
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"v1.2", b"v1.2\xff\xfe")  # line 3 of the file
    path.write_bytes(b"".join(lines))
    with pytest.raises(FeedbackFormatError) as err:
        read_export(export)
    assert str(err.value).startswith(f"{path}:3: ") and "not UTF-8" in str(err.value)


def test_a_manifest_that_is_not_utf8_is_named(export: Path) -> None:
    (export / MANIFEST_FILE).write_bytes(b'{"format": "\xff\xfe"}')
    with pytest.raises(FeedbackFormatError, match=r"manifest.json: not valid JSON"):
        read_export(export)


def test_labels_the_csv_module_cannot_parse_are_named_by_file_and_line(export: Path) -> None:
    _rewrite(export, 3, "model_version", "v" * (csv.field_size_limit() + 1))
    with pytest.raises(FeedbackFormatError) as err:
        read_export(export)
    assert str(err.value).startswith(f"{export / LABELS_FILE}:3: not valid CSV: field larger than field limit")
