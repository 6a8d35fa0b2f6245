"""The pieces of the limits against hostile input, without a live worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless

from tests.helpers import jp2_claiming
from trainer.dicom_phantoms import cr_dataset
from worker.decode import compressed_frame_size, fit_dimension, held_pixels
from worker.errors import DecodeError
from worker.receive import Refused, inflate
from worker.selection import invalid_uid


def test_jp2_boxes_are_read_by_openjpeg_itself() -> None:
    ds = cr_dataset(np.zeros((512, 512), np.uint16))
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([jp2_claiming(20000, 20000)])
    assert compressed_frame_size(ds) == (20000, 20000)


def test_an_unreadable_frame_header_is_a_decode_error() -> None:
    ds = cr_dataset(np.zeros((64, 64), np.uint16))
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 10])
    with pytest.raises(DecodeError, match="frame header cannot be read"):
        compressed_frame_size(ds)


def test_fit_dimension_keeps_the_aspect() -> None:
    out = fit_dimension(np.ones((4300, 3500), np.float32), 2048)
    assert out.shape == (2048, round(3500 * 2048 / 4300))
    small = np.ones((100, 80), np.float32)
    assert fit_dimension(small, 2048) is small
    ds = cr_dataset(np.zeros((64, 64), np.uint16))
    ds.Rows, ds.Columns = 4300, 4300
    assert held_pixels(ds, 2048) == 2048 * 2048


def deflated_file(path: Path, padding: int) -> None:
    ds = cr_dataset(np.zeros((64, 64), np.uint16))
    ds.add_new(0x00090010, "LO", "PAD")
    ds.add_new(0x00091010, "OB", b"\0" * padding)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def test_inflate_refuses_past_the_limit_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "bomb.dcm"
    deflated_file(path, 8 * 2**20)
    with pytest.raises(Refused, match="inflated data set over 4 MB"):
        inflate(path, 4 * 2**20)
    assert [p.name for p in tmp_path.iterdir()] == ["bomb.dcm"]


def test_inflate_within_the_limit_gives_the_same_data_set(tmp_path: Path) -> None:
    path = tmp_path / "ok.dcm"
    deflated_file(path, 2**20)
    original = pydicom.dcmread(path)
    out = inflate(path, 4 * 2**20)
    assert not path.exists()
    again = pydicom.dcmread(out)
    assert again.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert again.SOPInstanceUID == original.SOPInstanceUID
    assert again.PixelData == original.PixelData


@pytest.mark.parametrize(("damage", "message"), [
    (lambda data: data[:-40], "ends inside its deflate stream"),
    (lambda data: data[:400] + b"\xff" * 64 + data[464:], "cannot be inflated"),
])
def test_a_broken_deflate_stream_is_refused(tmp_path: Path, damage: Any, message: str) -> None:
    path = tmp_path / "broken.dcm"
    deflated_file(path, 1024)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(Refused, match=message):
        inflate(path, 2**20)
    assert [p.name for p in tmp_path.iterdir()] == ["broken.dcm"]


@pytest.mark.parametrize(("value", "bad"), [
    ("1.2.840.10008.5.1.4.1.1.1", False),
    ("1.2.840.10008.\x01.5", True),
    ("../../etc/passwd", True),
    ("1." + "2" * 70, True),
    ("1.02.3", True),
])
def test_invalid_uids_are_named_without_their_value(value: str, bad: bool) -> None:
    ds = cr_dataset(np.zeros((8, 8), np.uint16))
    ds.SeriesInstanceUID = value
    reason = invalid_uid(ds)
    assert (reason is not None) == bad
    if reason:
        assert reason.startswith("SeriesInstanceUID is not a valid UID") and value not in reason
