"""Worker errors are one line, even when the library error they quote is not."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames

from worker.decode import read_pixels
from worker.errors import DecodeError, SendError


def test_a_broken_jpeg2000_frame_is_one_line() -> None:
    ds = pydicom.dcmread(get_testdata_file("RG1_J2KR.dcm"))
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    cod = frame.find(b"\xff\x52")  # the coding-style segment, after a valid SIZ
    frame[cod + 4 : cod + 14] = b"\xff" * 10
    ds.PixelData = encapsulate([bytes(frame)])
    with pytest.raises(DecodeError) as err:
        read_pixels(ds)
    message = str(err.value)
    # The codec's own header parser refuses it before any decoding.
    assert message.startswith("compressed frame header cannot be read")
    assert "\n" not in message and "  " not in message


def test_a_multi_line_library_message_is_folded_not_dropped() -> None:
    err = DecodeError("pixel data cannot be decoded: all plugins failed:\n  pylibjpeg: bad COD\n  gdcm: missing")
    assert str(err) == "pixel data cannot be decoded: all plugins failed: pylibjpeg: bad COD gdcm: missing"


def test_subclasses_keep_their_fields() -> None:
    err = SendError("PACS@h:104:\n status 0xA900", permanent=True)
    assert str(err) == "PACS@h:104: status 0xA900" and err.permanent


def test_a_failure_in_an_answer_process_keeps_its_kind_across_processes() -> None:
    """An answer process sorts its failure where the traceback is (a bug in our code, a bad input,
    the infrastructure) and sends it back pickled; the service's process sorts it the same way."""
    import pickle

    from worker.faults import Fault, RemoteFailure, fault_of
    from worker.spool import key

    try:
        key(1)  # type: ignore[arg-type]  # a TypeError raised in worker/: a bug of ours
    except TypeError as exc:
        bug = pickle.loads(pickle.dumps(RemoteFailure.of(exc, "build")))
    assert (fault_of(bug), bug.stage) == (Fault.BUG, "build") and bug.text.startswith("TypeError: ")
    assert "worker/spool.py" in bug.trace
    bad = pickle.loads(pickle.dumps(RemoteFailure.of(DecodeError("not a readable DICOM file"), "decode")))
    assert fault_of(bad) is Fault.INPUT and bad.trace == ""
    full = pickle.loads(pickle.dumps(RemoteFailure.of(MemoryError(), "infer")))
    assert fault_of(full) is Fault.INFRASTRUCTURE
