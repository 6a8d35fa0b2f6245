"""A hostile or broken peer against a live ``cxr-worker serve`` on loopback.

Each test sends what an attacker (or a buggy modality) could, bounded in count and
time, and checks that the worker refuses it within its limits, says so to the peer,
audits and counts it, and keeps serving everyone else.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom import _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.helpers import (
    CR_CX,
    VERIFICATION_CX,
    associate,
    c_store_rq,
    command,
    free_port,
    jp2_claiming,
    p_data,
    raw,
    require_tool,
    rss_kb,
    send_fragments,
    wait_for,
)
from trainer.dicom_phantoms import cr_dataset
from trainer.phantoms import make_phantom

pytestmark = pytest.mark.integration

#: A destination nobody listens on: results stay in the outbox, which these tests do not look at.
NOWHERE = [f"PACS@127.0.0.1:{free_port()}"]
FRAGMENT = 200_000


def metric(worker: Any, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def audit_details(worker: Any) -> list[str]:
    path = worker.config.parent / "audit.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r["EventIdentification"].get("EventOutcomeDescription", "") for r in records]


def image_dataset(seed: int = 1) -> Dataset:
    image, _ = make_phantom(np.random.default_rng(seed), 64, True)
    return cr_dataset(image)


def aborted(assoc: Any) -> bool:
    return bool(assoc.is_aborted or not assoc.is_established)


ECHO_WITH_DATA = command(0x0030, Verification, True)

NEVER_COMPLETE = {
    "data fragments with no command": [p_data(CR_CX, 0x00, b"\0" * FRAGMENT)],
    "command fragments that never end": [p_data(VERIFICATION_CX, 0x01, b"\0" * FRAGMENT)],
    "a C-ECHO that announces a data set": [p_data(VERIFICATION_CX, 0x03, ECHO_WITH_DATA),
                                           p_data(VERIFICATION_CX, 0x00, b"\0" * FRAGMENT)],
}


@pytest.mark.parametrize("case", NEVER_COMPLETE)
def test_fragments_that_never_complete_a_message_abort_the_association(make_worker: Any, case: str) -> None:
    worker = make_worker(NOWHERE, metrics_port=free_port())
    warm = rss_kb(worker.proc.pid)
    assoc = associate(worker.port)
    assert assoc.is_established
    *first, repeated = NEVER_COMPLETE[case]
    for pdu in first:
        raw(assoc).sendall(pdu)
    sent = send_fragments(raw(assoc), repeated, 64 * 2**20, stop=lambda: aborted(assoc))
    wait_for(lambda: aborted(assoc), 30, "the worker to abort the association")
    assert sent < 16 * 2**20, f"{sent} bytes went in before the abort (limit max_buffer_kb = 1024)"
    assert rss_kb(worker.proc.pid, "VmHWM") - warm < 256 * 1024
    wait_for(lambda: metric(worker, "cxr_associations_aborted_total") >= 1, 10, "the abort in the metrics")
    assert any("association aborted" in d for d in audit_details(worker))
    ok = associate(worker.port, calling="HOSPITAL")
    assert ok.is_established and ok.send_c_echo().Status == 0
    ok.release()
    assert worker.stop() == 0


def store(port: int, path: Path, source: str = "127.0.0.1") -> Dataset:
    """C-STORE a file as it is (its own transfer syntax), returning the response."""
    assoc = associate(port, source, calling="HOSPITAL")
    assert assoc.is_established
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        return assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()


def test_deflate_bomb_is_refused_by_its_inflated_size(make_worker: Any, tmp_path: Path) -> None:
    worker = make_worker(NOWHERE, metrics_port=free_port(), dicom_extra="max_dataset_mb = 8\n")
    ds = image_dataset()
    ds.add_new(0x00091010, "OB", b"\0" * (64 * 2**20))  # a private element of zeros: ~1000:1
    ds.add_new(0x00090010, "LO", "BOMB")
    path = tmp_path / "bomb.dcm"
    ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
    deflated = tmp_path / "deflated.dcm"
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(deflated, enforce_file_format=True)
    assert deflated.stat().st_size < 2**20
    warm = rss_kb(worker.proc.pid)
    status = store(worker.port, deflated)
    assert status.Status == 0xC000
    assert "inflated data set over 8 MB" in status.get("ErrorComment", "")
    assert rss_kb(worker.proc.pid, "VmHWM") - warm < 128 * 1024
    # A deflated data set within the limit is still taken, and stored inflated.
    small = image_dataset(2)
    small.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ok = tmp_path / "ok.dcm"
    small.save_as(ok, enforce_file_format=True)
    assert store(worker.port, ok).Status == 0
    assert metric(worker, 'cxr_c_store_refused_total{status="0xC000"}') == 1
    assert not list((worker.spool / "incoming").iterdir())
    assert worker.stop() == 0


@pytest.mark.parametrize("deflated", [False, True], ids=["plain", "deflated"])
@pytest.mark.parametrize("bad", ["1.2.840.10008.\x01.5", "../../etc/passwd", "1." + "2" * 70])
def test_invalid_uids_are_refused_at_receive(make_worker: Any, tmp_path: Path, bad: str, deflated: bool) -> None:
    worker = make_worker(NOWHERE)
    ds = image_dataset()
    ds.StudyInstanceUID = bad
    if deflated:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "bad-uid.dcm"
    ds.save_as(path, enforce_file_format=True)
    status = store(worker.port, path)
    assert status.Status == 0xC000
    assert "StudyInstanceUID is not a valid UID" in status.get("ErrorComment", "")
    assert not list((worker.spool / "queue").iterdir())
    assert not list((worker.spool / "incoming").iterdir())
    assert bad not in (worker.config.parent / "audit.jsonl").read_text()
    assert worker.stop() == 0


def test_c_store_over_max_dataset_mb_is_not_written_past_it(make_worker: Any) -> None:
    worker = make_worker(NOWHERE, dicom_extra="max_dataset_mb = 1\n")
    incoming = worker.spool / "incoming"
    biggest = {"bytes": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            with contextlib.suppress(FileNotFoundError):  # renamed or removed while listed
                biggest["bytes"] = max([biggest["bytes"], *(p.stat().st_size for p in incoming.iterdir())])
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assoc = associate(worker.port)
    raw(assoc).sendall(c_store_rq(generate_uid()))
    fragment = p_data(CR_CX, 0x00, b"\0" * FRAGMENT)
    for _ in range(100):  # 20 MB, against a limit of 1 MB
        raw(assoc).sendall(fragment)
    raw(assoc).sendall(p_data(CR_CX, 0x02, b"\0" * 16))
    wait_for(lambda: any("data set over 1 MB" in d for d in audit_details(worker)), 60, "the refusal")
    done.set()
    watcher.join()
    assert 0 < biggest["bytes"] <= 2**20 + 2 * FRAGMENT, biggest
    assoc.release()
    assert worker.stop() == 0


def test_receive_cut_off_leaves_no_partial_file(make_worker: Any) -> None:
    worker = make_worker(NOWHERE)
    incoming = worker.spool / "incoming"
    assoc = associate(worker.port)
    raw(assoc).sendall(c_store_rq(generate_uid()))
    for _ in range(5):
        raw(assoc).sendall(p_data(CR_CX, 0x00, b"\0" * FRAGMENT))
    wait_for(lambda: any(p.stat().st_size >= 5 * FRAGMENT for p in incoming.iterdir()), 30, "the partial file")
    raw(assoc).shutdown(socket.SHUT_RDWR)  # the sender dies mid data set
    wait_for(lambda: not list(incoming.iterdir()), 20, "the partial file to be removed")
    assert worker.stop() == 0


def test_empty_connections_from_one_address_do_not_lock_out_another(make_worker: Any) -> None:
    """Connect and close with no bytes, 80 times in a few seconds (pynetdicom's own
    backstop is 4 x max_associations = 40), then a PACS on another address associates."""
    worker = make_worker(NOWHERE)
    for _ in range(80):
        with socket.create_connection(("127.0.0.1", worker.port), timeout=5):
            pass
        time.sleep(0.02)
    pacs = associate(worker.port, source="127.0.0.2", calling="PACS")
    assert pacs.is_established, "a PACS on another address was refused during the flood"
    assert pacs.send_c_echo().Status == 0
    pacs.release()
    again = associate(worker.port, source="127.0.0.1", calling="HOSPITAL")
    assert again.is_established
    again.release()
    assert worker.stop() == 0


def test_idle_http_connections_are_closed(make_worker: Any) -> None:
    worker = make_worker(NOWHERE, metrics_port=free_port())
    idle = [socket.create_connection(("127.0.0.1", worker.metrics_port), timeout=30) for _ in range(20)]
    started = time.monotonic()
    for s in idle:
        assert s.recv(1) == b""  # the server hangs up on a connection that sends nothing
        s.close()
    assert time.monotonic() - started < 25
    assert metric(worker, "cxr_associations_aborted_total") == 0  # the endpoint still answers
    assert worker.stop() == 0


def test_tls_handshake_bookkeeping_forgets_each_address(tmp_path: Path) -> None:
    """GuardedServer counts connections still in their TLS handshake per address; the
    count must drop back to nothing, or every address that ever called stays in memory."""
    from worker.compat import register_server
    from worker.security import GuardedAE, GuardedServer

    openssl = require_tool("/usr/bin/openssl")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "k.pem", "-out", "c.pem",
                    "-subj", "/CN=worker", "-days", "1"], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    ae = GuardedAE(ae_title="CXR-GRADCAM")
    ae.add_supported_context(Verification)
    server: Any = ae.make_server(("127.0.0.1", 0), ssl_context=ctx, server_class=GuardedServer)
    register_server(ae, server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = ssl.create_default_context()
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    try:
        for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
            with socket.create_connection(server.server_address, 10, source_address=(source, 0)) as s, \
                    client.wrap_socket(s) as tls:
                tls.do_handshake()
        wait_for(lambda: not server._handshaking, 10, "the handshake counts to be dropped")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def jpeg_with_late_sof(rows: int, cols: int) -> bytes:
    """A baseline JPEG (a 64 x 64 image) whose SOF0, claiming ``rows`` x ``cols``, follows
    66 KB of APP1 segments (ISO 10918-1 B.2.2)."""
    import cv2

    ok, encoded = cv2.imencode(".jpg", np.full((64, 64), 128, np.uint8))
    assert ok
    data = bytearray(encoded.tobytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", rows, cols)
    app = b"".join(b"\xff\xe1" + struct.pack(">H", 33_002) + b"\0" * 33_000 for _ in range(2))
    return bytes(data[:2] + app + data[2:])


def encapsulated(frame: bytes, syntax: str, rows: int, cols: int, bits: int) -> Dataset:
    from pydicom.encaps import encapsulate

    ds = image_dataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = (8, 8, 7) if bits == 8 else (16, 12, 11)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01" if syntax == JPEGBaseline8Bit else "00"
    return ds


def quarantine_reasons(worker: Any) -> str:
    return "\n".join(p.read_text() for p in (worker.spool / "quarantine").glob("*.reason"))


BOMBS = {
    "JP2 boxes claiming 4096 x 4096 behind 512 x 512": lambda: encapsulated(
        jp2_claiming(4096, 4096), JPEG2000Lossless, 512, 512, 16),
    "JPEG whose SOF, claiming 4096 x 4096, follows 64 KB of APP segments": lambda: encapsulated(
        jpeg_with_late_sof(4096, 4096), JPEGBaseline8Bit, 64, 64, 8),
}


@pytest.mark.parametrize("case", BOMBS)
def test_frames_claiming_another_size_are_quarantined_before_decoding(make_worker: Any, tmp_path: Path,
                                                                      case: str) -> None:
    worker = make_worker(NOWHERE)
    path = tmp_path / "bomb.dcm"
    BOMBS[case]().save_as(path, enforce_file_format=True)
    assert store(worker.port, path).Status == 0
    wait_for(lambda: "4096x4096" in quarantine_reasons(worker), 60, "the frame to be quarantined")
    assert "compressed frame claims 4096x4096 pixels" in quarantine_reasons(worker)
    assert worker.stop() == 0


def test_large_radiographs_stay_within_memory_and_give_a_bounded_sc(make_worker: Any, pacs: Any,
                                                                    tmp_path: Path) -> None:
    """The largest detector we accept (4300 x 4300, JPEG 2000) is answered with an SC no
    side of which exceeds sc_max_dimension; a 7071 x 7071 one is over max_pixels."""
    worker = make_worker([f"PACS@127.0.0.1:{pacs.port}"], metrics_port=free_port())
    warm = rss_kb(worker.proc.pid)
    yy, xx = np.mgrid[0:4300, 0:4300]
    ds = cr_dataset(((yy + xx) % 4096).astype(np.uint16))
    ds.ImagerPixelSpacing = [0.1, 0.1]
    ds.compress(JPEG2000Lossless)
    big = tmp_path / "big.dcm"
    ds.save_as(big, enforce_file_format=True)
    del ds, yy, xx
    assert store(worker.port, big).Status == 0
    wait_for(lambda: len(pacs.files()) >= 2, 300, "the results of the 4300 x 4300 image")
    grown_mb = (rss_kb(worker.proc.pid, "VmHWM") - warm) / 1024
    print(f"4300 x 4300 JPEG 2000: worker peak RSS {grown_mb:.0f} MB above warm")
    assert grown_mb < 1536
    sc = next(d for d in map(pydicom.dcmread, pacs.files()) if d.Modality == "OT" or "PixelData" in d)
    assert max(sc.Rows, sc.Columns) == 2048
    assert abs(float(sc.PixelSpacing[0]) - 0.1 * 4300 / 2048) < 1e-3
    huge = encapsulated(jp2_claiming(7071, 7071), JPEG2000Lossless, 7071, 7071, 16)
    huge.save_as(tmp_path / "huge.dcm", enforce_file_format=True)
    assert store(worker.port, tmp_path / "huge.dcm").Status == 0
    wait_for(lambda: "over the limit of 25000000" in quarantine_reasons(worker), 60, "the 7071 x 7071 refusal")
    assert worker.stop() == 0


def test_readiness_needs_room_for_one_data_set_above_the_reserve(make_worker: Any, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Ready must mean that a C-STORE of any allowed size is taken: with less than
    reserve_mb + max_dataset_mb free, /readyz says not ready (it said ready while every
    C-STORE got A700)."""
    import shutil
    import urllib.error

    free_mb = shutil.disk_usage(tmp_path).free // 2**20
    monkeypatch.setenv("CXR_SPOOL__RESERVE_MB", str(free_mb - 256))  # the environment beats the file
    worker = make_worker(NOWHERE, metrics_port=free_port(), dicom_extra="max_dataset_mb = 512\n")
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/readyz", timeout=10)
    assert answer.value.code == 503
    assert json.loads(answer.value.read())["checks"]["disk_above_reserve"] is False
    assert worker.stop() == 0
