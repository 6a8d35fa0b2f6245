"""Bounded fuzzing (about two minutes in all): malformed files through the reader and
pixel decoder, and malformed PDUs against a live worker. Any crash, hang or
exception other than the worker's own errors fails the run."""

from __future__ import annotations

import io
import socket
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless

from tests.helpers import require_tool, wait_for
from trainer.dicom_phantoms import cr_dataset
from trainer.phantoms import make_phantom
from worker.config import Settings
from worker.errors import WorkerError
from worker.model import OnnxModel
from worker.pipeline import Decoded, Processor

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def processor(onnx_model: Path) -> Processor:
    settings = Settings(select={"min_size": 32, "max_pixels": 20_000_000})
    return Processor(settings, OnnxModel(onnx_model, providers="cpu"))


def phantom_bytes(compressed: bool = False) -> bytes:
    image, _ = make_phantom(np.random.default_rng(1), 64, True)
    ds = cr_dataset(image)
    if compressed:
        ds.compress(JPEG2000Lossless)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


SEEDS = {"plain": phantom_bytes(), "j2k": phantom_bytes(compressed=True)}


def check(processor: Processor, path: Path) -> str:
    """The decode stage answers with a model-ready image, a reason, or a WorkerError with
    one line of explanation; any other exception escapes and fails the test."""
    try:
        out = processor.decode(path)
    except WorkerError as exc:
        message = str(exc)
        assert message.strip() and "\n" not in message and "Traceback" not in message, repr(message)
        return f"refused: {type(exc).__name__}"
    if isinstance(out, Decoded):
        size = processor.model.info.input_size
        assert out.model_input.shape == (size, size, 1), out.model_input.shape
        assert np.isfinite(out.model_input).all() and 0.0 <= out.model_input.min() <= out.model_input.max() <= 1.0
        return "decoded"
    reason = out.reason  # Skipped: why the instance is not eligible
    assert reason.strip(), "skipped without a reason"
    return "skipped"


def nested_sequences(depth: int) -> bytes:
    """A dataset of ``depth`` nested sequences (implicit VR, undefined lengths)."""
    body = b""
    for _ in range(depth):
        body += struct.pack("<HHI", 0x0008, 0x1115, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    for _ in range(depth):
        body += struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    ds = cr_dataset(np.zeros((8, 8), np.uint8))
    del ds.PixelData
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=True, little_endian=True)
    return buffer.getvalue() + body


def j2k_claiming(rows: int, cols: int, header_rows: int | None = None) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(SEEDS["j2k"]))
    data = bytearray(ds.PixelData)
    siz = data.find(b"\xff\x51")
    data[siz + 6 : siz + 14] = struct.pack(">II", cols, rows)
    ds.PixelData = bytes(data)
    if header_rows is not None:
        ds.Rows = ds.Columns = header_rows
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def modified(**changes: Any) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(SEEDS["plain"]))
    for k, v in changes.items():
        setattr(ds, k, v)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def deflated_bad_length() -> bytes:
    """File meta for Deflated Explicit VR Little Endian, then a deflate stream cut short
    and followed by an element that declares far more bytes than exist."""
    from pydicom.filewriter import write_file_meta_info

    ds = pydicom.dcmread(io.BytesIO(SEEDS["plain"]))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, ds.file_meta)
    element = struct.pack("<HH2sHI", 0x0008, 0x0016, b"UN", 0, 0x7FFFFFF0) + b"1.2.3"
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    stream = compressor.compress(element) + compressor.flush()
    return buffer.getvalue() + stream[: len(stream) // 2]


MALFORMED = {
    "empty file": lambda: b"",
    "no DICM prefix": lambda: SEEDS["plain"][132:],
    "truncated header": lambda: SEEDS["plain"][:300],
    "truncated pixel data": lambda: SEEDS["plain"][: len(SEEDS["plain"]) - 3000],
    "BitsStored > BitsAllocated": lambda: modified(BitsStored=20),
    "65535 x 65535": lambda: modified(Rows=65535, Columns=65535),
    "J2K header claims huge dimensions": lambda: j2k_claiming(65535, 65535),
    "J2K and Rows/Columns both claim huge": lambda: j2k_claiming(65535, 65535, header_rows=65535),
    "1000 nested sequences": lambda: nested_sequences(1000),
    "PALETTE COLOR without LUT": lambda: modified(PhotometricInterpretation="PALETTE COLOR"),
    "YBR_FULL_422": lambda: modified(PhotometricInterpretation="YBR_FULL_422"),
    "fewer frames than NumberOfFrames": lambda: modified(NumberOfFrames=4),
    "SOP class does not match the file meta": lambda: modified(SOPClassUID="1.2.840.10008.5.1.4.1.1.4"),
    "deflated data set with a bad length": deflated_bad_length,
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_file_is_refused_cleanly(processor: Processor, tmp_path: Path, name: str) -> None:
    path = tmp_path / "in.dcm"
    path.write_bytes(MALFORMED[name]())
    outcome = check(processor, path)
    assert outcome != "decoded", f"{name}: {outcome}"


def test_mutated_files_never_crash_the_reader(processor: Processor, tmp_path: Path) -> None:
    """Every mutated file gets exactly one answer (decoded, skipped with a reason, refused with
    one line), no other exception escapes, and the reader still decodes good files afterwards."""
    outcomes: dict[str, int] = {}

    @settings(max_examples=150, deadline=3000, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(seed=st.sampled_from(sorted(SEEDS)), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)),
                                                                max_size=8),
           cut=st.one_of(st.none(), st.floats(0, 1)))
    def fuzz(seed: str, flips: list[tuple[float, int]], cut: float | None) -> None:
        data = bytearray(SEEDS[seed])
        for where, value in flips:
            data[int(where * (len(data) - 1))] = value
        if cut is not None:
            data = data[: int(cut * len(data))]
        path = tmp_path / "fuzz.dcm"
        path.write_bytes(bytes(data))
        outcome = check(processor, path)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    fuzz()
    assert sum(outcomes.values()) >= 100, outcomes  # hypothesis ran the examples, each was answered
    assert "decoded" in outcomes and any(k.startswith("refused") for k in outcomes), outcomes
    for name, data in SEEDS.items():
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(data)
        assert check(processor, path) == "decoded", name


def captured_association_request() -> bytes:
    """A real A-ASSOCIATE-RQ, as DCMTK's echoscu sends it."""
    tool = require_tool("/usr/bin/echoscu")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    proc = subprocess.Popen([tool, "-aet", "FUZZ", "-aec", "CXR-GRADCAM", "-to", "3", "127.0.0.1", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conn, _ = listener.accept()
    conn.settimeout(5)
    head = conn.recv(6)
    length = struct.unpack(">L", head[2:6])[0]
    body = b""
    while len(body) < length:
        body += conn.recv(length - len(body))
    conn.close()
    listener.close()
    proc.wait(10)
    return head + body


def pdu(kind: int, payload: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BBL", kind, 0, len(payload) if length is None else length) + payload


def test_malformed_pdus_never_take_the_service_down(make_worker: Any, pacs: Any, tmp_path: Path) -> None:
    worker = make_worker([f"PACS@127.0.0.1:{pacs.port}"], dicom_extra="pdu_deadline_s = 1.0\nacse_timeout = 2.0\n")
    request = captured_association_request()
    sent = {"n": 0}

    def exchange(raw: bytes) -> None:
        with socket.create_connection(("127.0.0.1", worker.port), timeout=3) as s:
            s.settimeout(1.5)
            try:
                s.sendall(raw)
                s.recv(4096)
            except OSError:
                pass
        sent["n"] += 1

    @settings(max_examples=120, deadline=None)
    @given(st.one_of(
        st.binary(max_size=512),
        st.builds(pdu, st.integers(0, 255), st.binary(max_size=512)),
        st.builds(pdu, st.integers(1, 7), st.binary(max_size=256), st.integers(0, 2**32 - 1)),
        st.builds(lambda m, cut: bytes(request[:6]) + bytes(m) + request[6 + len(m):cut],
                  st.binary(min_size=1, max_size=40), st.integers(6, len(request))),
        st.builds(lambda tail: request + tail, st.builds(pdu, st.sampled_from([4, 5, 7]), st.binary(max_size=300))),
    ))
    def fuzz(raw: bytes) -> None:
        exchange(raw)

    fuzz()
    assert sent["n"] >= 100
    assert worker.proc.poll() is None
    tool = require_tool("/usr/bin/echoscu")
    assert subprocess.run([tool, "-aec", "CXR-GRADCAM", "127.0.0.1", str(worker.port)],
                          capture_output=True, timeout=30).returncode == 0
    image = tmp_path / "after.dcm"
    image.write_bytes(SEEDS["plain"])
    subprocess.run([require_tool("/usr/bin/storescu"), "-aec", "CXR-GRADCAM", "127.0.0.1", str(worker.port),
                    str(image)], check=True, capture_output=True, timeout=60)
    wait_for(lambda: len(pacs.files()) >= 2, 120, "results after the fuzzing")
    assert worker.stop() == 0


def test_sop_class_not_matching_the_presentation_context(make_worker: Any, pacs: Any, tmp_path: Path) -> None:
    """A C-STORE under the CR context whose data set says MR: acknowledged, skipped, no crash."""
    from pynetdicom import AE, _config

    worker = make_worker([f"PACS@127.0.0.1:{pacs.port}"])
    ds = pydicom.dcmread(io.BytesIO(SEEDS["plain"]))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage, inside the data set only
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # the file meta still says CR
    path = tmp_path / "mismatch.dcm"
    ds.save_as(path, enforce_file_format=False)
    assert pydicom.dcmread(path).file_meta.MediaStorageSOPClassUID != pydicom.dcmread(path).SOPClassUID
    sender = AE(ae_title="FUZZ")
    sender.add_requested_context(ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = sender.associate("127.0.0.1", worker.port, ae_title="CXR-GRADCAM")
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file as is: the context comes from its file meta
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()
    assert status.Status == 0
    wait_for(lambda: "SOP class 1.2.840.10008.5.1.4.1.1.4" in "\n".join(worker.log_lines()), 30, "the skip")
    assert worker.proc.poll() is None
    assert worker.stop() == 0
