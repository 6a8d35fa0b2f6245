"""The outbox against DCMTK storescp: retry with backoff until the PACS is back,
dead letter on permanent refusal or after the horizon, state kept across restarts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import Storescp, free_port
from trainer.dicom_phantoms import cr_dataset
from worker.config import SendSection
from worker.pipeline import encode
from worker.send import Outbox
from worker.spool import Spool

pytestmark = pytest.mark.integration


def queue_one(outbox: Outbox) -> str:
    ds = cr_dataset(np.full((64, 64), 100, np.uint8))
    outbox.put("item", encode(ds), str(ds.SOPInstanceUID))
    return str(ds.SOPInstanceUID)


def make_outbox(tmp_path: Path, port: int, **send: float) -> Outbox:
    settings = SendSection(destinations=[f"PACS@127.0.0.1:{port}"], retry_initial_s=10, retry_max_interval_s=40,
                           acse_timeout=5, dimse_timeout=5, network_timeout=5, **send)
    return Outbox(Spool(tmp_path / "spool"), settings, "CXR-GRADCAM")


def states(outbox: Outbox) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in outbox.spool.outbox.glob("*/*.json")]


def test_pacs_down_then_back_is_retried_with_backoff_and_delivered(tmp_path: Path) -> None:
    port = free_port()
    outbox = make_outbox(tmp_path, port)
    uid = queue_one(outbox)
    t0 = time.time()
    assert outbox.send_due(now=t0) == 0
    [state] = states(outbox)
    assert state["attempts"] == 1 and state["next_attempt"] == pytest.approx(t0 + 10)
    assert outbox.send_due(now=t0 + 5) == 0  # not due yet: no attempt
    assert states(outbox)[0]["attempts"] == 1
    assert outbox.send_due(now=t0 + 10) == 0
    assert states(outbox)[0]["next_attempt"] == pytest.approx(t0 + 10 + 20)  # doubled
    # A restart: a new Outbox on the same spool keeps the state.
    outbox = make_outbox(tmp_path, port)
    assert states(outbox)[0]["attempts"] == 2
    pacs = Storescp(port, tmp_path / "pacs")
    pacs.start()
    try:
        assert outbox.send_due(now=t0 + 30) == 1
        assert outbox.depth() == 0
        import pydicom

        [received] = pacs.files()
        assert pydicom.dcmread(received).SOPInstanceUID == uid
    finally:
        pacs.stop()


@pytest.mark.parametrize("status", [0x0122, 0xA900, 0xC000])
def test_permanent_failure_status_goes_to_dead_letter_at_once(tmp_path: Path, status: int) -> None:
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    # A real SCP (pynetdicom) that answers every C-STORE with a permanent failure.
    scp = AE(ae_title="PACS")
    scp.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, lambda event: status)])
    try:
        outbox = make_outbox(tmp_path, port)
        queue_one(outbox)
        assert outbox.send_due() == 0
        assert outbox.depth() == 0
        [dead] = list(outbox.spool.dead.glob("*.json"))
        assert f"0x{status:04X}" in json.loads(dead.read_text())["last_error"]
    finally:
        server.shutdown()


def test_transient_failure_status_is_retried(tmp_path: Path) -> None:
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    scp = AE(ae_title="PACS")
    scp.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, lambda event: 0xA700)])
    try:
        outbox = make_outbox(tmp_path, port)
        queue_one(outbox)
        assert outbox.send_due() == 0
        assert outbox.depth() == 1 and states(outbox)[0]["attempts"] == 1
        assert not list(outbox.spool.dead.iterdir())
    finally:
        server.shutdown()


def test_retries_end_in_dead_letter_after_the_horizon(tmp_path: Path) -> None:
    outbox = make_outbox(tmp_path, free_port(), retry_horizon_h=0.01)  # 36 s
    queue_one(outbox)
    t0 = time.time()
    outbox.send_due(now=t0)
    assert outbox.depth() == 1
    outbox.send_due(now=t0 + 40)
    assert outbox.depth() == 0
    [dead] = list(outbox.spool.dead.glob("*.json"))
    assert "retries exhausted after 2 attempts" in json.loads(dead.read_text())["last_error"]


@pytest.mark.parametrize("fault", [["--abort-after"], ["--abort-during"], ["--sleep-during", "4"]],
                         ids=["aborting-after", "aborting-during", "stalling-past-dimse-timeout"])
def test_faulty_pacs_is_retried_and_delivered_once_back(tmp_path: Path, fault: list[str]) -> None:
    import subprocess

    import pydicom

    from tests.helpers import require_tool, wait_port

    port = free_port()
    outbox = make_outbox(tmp_path, port)
    outbox.settings = outbox.settings.model_copy(update={"dimse_timeout": 1.5})
    uid = queue_one(outbox)
    faulty = subprocess.Popen([require_tool("/usr/bin/storescp"), *fault, "-od", str(tmp_path), str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        t0 = time.time()
        assert outbox.send_due(now=t0) == 0
        [state] = states(outbox)
        assert state["attempts"] == 1 and not list(outbox.spool.dead.iterdir()), state
    finally:
        faulty.kill()
        faulty.wait(10)
    pacs = Storescp(port, tmp_path / "pacs")
    pacs.start()
    try:
        assert outbox.send_due(now=t0 + 10) == 1
        [received] = pacs.files()
        assert pydicom.dcmread(received).SOPInstanceUID == uid
    finally:
        pacs.stop()


def test_permanent_association_rejection_goes_to_dead_letter(tmp_path: Path) -> None:
    """A pynetdicom PACS that does not know our AE title rejects permanently (PS3.8 9.3.4)."""
    from pynetdicom import AE, AllStoragePresentationContexts

    scp = AE(ae_title="PACS")
    scp.supported_contexts = AllStoragePresentationContexts
    scp.require_calling_aet = ["SOMEBODY-ELSE"]
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False)
    try:
        outbox = make_outbox(tmp_path, port)
        queue_one(outbox)
        assert outbox.send_due() == 0
        assert outbox.depth() == 0
        [dead] = list(outbox.spool.dead.glob("*.json"))
        assert "rejected (permanent)" in json.loads(dead.read_text())["last_error"]
        assert outbox.metrics.dead_letters.labels(f"PACS@127.0.0.1:{port}")._value.get() == 1
    finally:
        server.shutdown()


def test_a_sop_class_the_pacs_refuses_fails_alone(tmp_path: Path) -> None:
    """A PACS that takes Secondary Captures but not SRs: the SC is delivered, the SR goes to
    dead letter at once, and neither blocks the other."""
    import pydicom
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import SecondaryCaptureImageStorage  # type: ignore[attr-defined]

    stored: list[str] = []
    scp = AE(ae_title="PACS")
    scp.add_supported_context(SecondaryCaptureImageStorage)
    port = free_port()

    def on_store(event: evt.Event) -> int:
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0

    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        outbox = make_outbox(tmp_path, port)
        sr = pydicom.Dataset()
        sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
        sr.SOPInstanceUID = "1.2.3.4.5"
        sr.file_meta = pydicom.dataset.FileMetaDataset()
        sr.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        sc = cr_dataset(np.full((64, 64), 100, np.uint8))
        sc.SOPClassUID = SecondaryCaptureImageStorage
        outbox.put("a-sr", encode(sr), "1.2.3.4.5")
        outbox.put("b-sc", encode(sc), str(sc.SOPInstanceUID))
        assert outbox.send_due() == 1
        assert stored == [str(sc.SOPInstanceUID)]
        [dead] = list(outbox.spool.dead.glob("*.json"))
        assert "not accepted" in json.loads(dead.read_text())["last_error"]
        assert outbox.depth() == 0
    finally:
        server.shutdown()


@pytest.mark.parametrize("status", [0xB000, 0xB006, 0xB007, 0x0107])
def test_a_warning_status_counts_as_delivered(tmp_path: Path, status: int) -> None:
    """PS3.4 B.2.3: the PACS kept the instance (coerced, elements discarded, ...): no resend."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    calls: list[int] = []
    scp = AE(ae_title="PACS")
    scp.supported_contexts = AllStoragePresentationContexts
    port = free_port()

    def on_store(event: evt.Event) -> int:
        calls.append(status)
        return status

    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        outbox = make_outbox(tmp_path, port)
        queue_one(outbox)
        assert outbox.send_due() == 1
        assert outbox.depth() == 0 and calls == [status]
        assert not list(outbox.spool.dead.iterdir())
    finally:
        server.shutdown()


def test_a_pacs_that_takes_no_compressed_syntax_gets_the_object_decompressed(tmp_path: Path) -> None:
    """The SC goes out compressed; a PACS that accepts only uncompressed transfer
    syntaxes for its SOP class still gets it, decompressed, with the same pixels."""
    from pydicom.uid import JPEG2000Lossless
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    received: list[object] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    scp = AE(ae_title="PACS")
    scp.supported_contexts = AllStoragePresentationContexts  # pynetdicom's default: uncompressed only
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        pixels = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
        ds = cr_dataset(pixels)
        expected = ds.pixel_array.copy()
        ds.compress(JPEG2000Lossless)
        outbox = make_outbox(tmp_path, port)
        outbox.put("item", encode(ds), str(ds.SOPInstanceUID))
        assert outbox.send_due() == 1
        assert outbox.depth() == 0 and not list(outbox.spool.dead.iterdir())
        [got] = received
        assert got.SOPInstanceUID == ds.SOPInstanceUID  # type: ignore[attr-defined]  # the same instance
        assert not got.file_meta.TransferSyntaxUID.is_compressed  # type: ignore[attr-defined]
        assert np.array_equal(got.pixel_array, expected)  # type: ignore[attr-defined]
    finally:
        server.shutdown()
