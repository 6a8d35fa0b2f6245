"""Faults sorted by kind against a live ``cxr-worker serve``: an instance the worker dies
on (poison pill), a destination that stalls on one object (head-of-line blocking), a
spool disk that fills up while outputs are written, and an ONNX Runtime error."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from tests.helpers import free_port, logged, storescu, wait_for
from trainer.dicom_phantoms import cr_dataset
from trainer.phantoms import make_phantom
from worker.batch import BatchHandler
from worker.config import SendSection, Settings
from worker.errors import InfrastructureError
from worker.faults import Fault, fault_of
from worker.metrics import Metrics
from worker.model import OnnxModel
from worker.pipeline import Processor
from worker.send import Outbox
from worker.spool import Spool

pytestmark = pytest.mark.integration


def phantom(path: Path, seed: int, size: int = 128) -> pydicom.Dataset:
    image, _ = make_phantom(np.random.default_rng(seed), size, bool(seed % 2))
    ds = cr_dataset(image)
    ds.save_as(path, enforce_file_format=True)
    return ds


def referenced(files: list[Path]) -> set[str]:
    """The input SOP Instance UIDs that the received Secondary Captures answer."""
    out = set()
    for p in files:
        try:
            ds = pydicom.dcmread(p)
        except (pydicom.errors.InvalidDicomError, EOFError, OSError):
            continue  # storescp is still writing it: read on the next poll
        if "SourceImageSequence" in ds:
            out.add(str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID))
    return out


# -- poison pill ---------------------------------------------------------------------------
def test_an_instance_the_worker_dies_on_is_quarantined_after_three_crashes(make_worker: Any, pacs: Any,
                                                                            tmp_path: Path) -> None:
    """The worker is killed (as the OOM killer would) each time it processes one large
    instance; after ``spool.max_crashes`` (3) that instance is quarantined with a reason,
    and the instances batched with it the first time are answered."""
    dest = [f"PACS@127.0.0.1:{pacs.port}"]
    worker = make_worker(dest)
    # 4000 x 4000 (a real detector's size): seconds of decode and full-resolution overlay.
    poison_path = tmp_path / "poison.dcm"
    big = np.kron(make_phantom(np.random.default_rng(5), 128, True)[0], np.ones((32, 32), np.uint8))[:4000, :4000]
    poison = cr_dataset(big.astype(np.uint16) * 16)
    poison.save_as(poison_path, enforce_file_format=True)
    good = [phantom(tmp_path / f"good{i}.dcm", 20 + i) for i in range(2)]
    storescu(worker.port, [poison_path, tmp_path / "good0.dcm", tmp_path / "good1.dcm"])

    def poison_in_work() -> bool:
        try:
            return any(p.stat().st_size > 10 * 2**20 for p in (worker.spool / "work").iterdir())
        except FileNotFoundError:  # moved while we looked
            return False

    for _crash in range(3):
        wait_for(poison_in_work, 120, "the large instance being processed", interval=0.01)
        worker.stop(signal.SIGKILL)
        assert not any(p.suffix == ".reason" for p in (worker.spool / "quarantine").iterdir())
        worker = make_worker(dest, port=worker.port)
    wait_for(lambda: any((worker.spool / "quarantine").glob("*.reason")), 60, "the poison pill in quarantine")
    [reason] = list((worker.spool / "quarantine").glob("*.reason"))
    assert reason.read_text().startswith(str(poison.SOPInstanceUID))
    assert "stopped 3 times" in reason.read_text()
    wait_for(lambda: referenced(pacs.files()) >= {str(ds.SOPInstanceUID) for ds in good}, 120,
             "the instances batched with it answered")
    assert str(poison.SOPInstanceUID) not in referenced(pacs.files())
    assert not any((worker.spool / "queue").iterdir()) and not any((worker.spool / "work").iterdir())
    assert logged(worker, "quarantined")
    assert worker.stop() == 0


# -- head-of-line blocking ---------------------------------------------------------------------
@dataclasses.dataclass
class StallingPacs:
    """A pynetdicom Storage SCP that hangs, past the worker's DIMSE timeout, on the first
    object it is sent, every time it is sent again; it stores everything else."""

    stall_s: float
    stalled_uid: str = ""
    stalls: int = 0
    stored: set[str] = dataclasses.field(default_factory=set)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()

    def on_store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self.lock:
            self.stalled_uid = self.stalled_uid or uid
            stall = uid == self.stalled_uid
            self.stalls += stall
        if stall:
            time.sleep(self.stall_s)
            return 0xA700
        with self.lock:
            self.stored.add(uid)
        return 0x0000


@pytest.fixture
def stalling_pacs() -> Iterator[tuple[StallingPacs, int]]:
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    scp = StallingPacs(stall_s=4.0)
    ae = AE(ae_title="PACS")
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, scp.on_store)])
    yield scp, port
    server.shutdown()


def test_an_object_the_destination_stalls_on_backs_off_alone(make_worker: Any, tmp_path: Path,
                                                             stalling_pacs: tuple[StallingPacs, int]) -> None:
    """Every other result is delivered while one object times out each time it is sent;
    nothing that was never tried is dead-lettered, even with a 15 s horizon."""
    scp, port = stalling_pacs
    worker = make_worker([f"PACS@127.0.0.1:{port}"],
                         extra="dimse_timeout = 1.5\nretry_horizon_h = 0.004\n")  # [send]: 1.5 s, 14 s
    files = [tmp_path / f"h{i}.dcm" for i in range(4)]
    for i, f in enumerate(files):
        phantom(f, 50 + i)
    storescu(worker.port, files)
    wait_for(lambda: len(scp.stored) >= 7, 90, "the 7 results that do not stall")
    assert scp.stalled_uid not in scp.stored
    wait_for(lambda: scp.stalls >= 2, 30, "the stalled object retried")
    dead = [json.loads(p.read_text()) for p in (worker.spool / "dead").glob("*.json")]
    assert {d["sop_instance_uid"] for d in dead} <= {scp.stalled_uid}  # never a result that was not tried
    assert worker.stop() == 0


# -- full disk ---------------------------------------------------------------------------
@pytest.fixture
def small_spool(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs mounted where the worker's spool goes (root only; skipped otherwise)."""
    spool = tmp_path / "spool"
    spool.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(spool)], capture_output=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {out.stderr.decode().strip()}")
    try:
        yield spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


def fill_disk(folder: Path) -> Path:
    """Write until the file system has no space left."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while f.write(b"\0" * 2**20):
                pass
        except OSError:
            pass
    return filler


def partial_files(spool: Path) -> list[Path]:
    return [p for p in spool.rglob("*") if p.name.endswith((".part", ".tmp"))]


def test_full_disk_while_writing_outputs_backs_off_and_resumes(make_worker: Any, pacs: Any, tmp_path: Path,
                                                               small_spool: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_SPOOL__RESERVE_MB", "8")  # outputs wait below 4 MB free
    dest = [f"PACS@127.0.0.1:{pacs.port}"]
    worker = make_worker(dest)
    assert worker.stop() == 0
    sources = [phantom(tmp_path / f"d{i}.dcm", 70 + i) for i in range(3)]
    queue = Spool(small_spool)
    for i in range(3):
        shutil.copy(tmp_path / f"d{i}.dcm", small_spool / "incoming" / f"d{i}")
        queue.accept(small_spool / "incoming" / f"d{i}")  # acknowledged before the disk filled up
    filler = fill_disk(small_spool)
    worker = make_worker(dest, port=worker.port)
    wait_for(lambda: len(logged(worker, "processing paused")) >= 3, 60, "the worker to back off three times")
    paused = logged(worker, "processing paused")
    assert "below reserve" in paused[0]["message"]
    assert not partial_files(small_spool), partial_files(small_spool)
    assert not any((small_spool / "quarantine").iterdir())  # good input is never quarantined
    assert len(list((small_spool / "queue").iterdir())) == 3
    filler.unlink()  # space comes back: the worker resumes by itself
    wait_for(lambda: referenced(pacs.files()) >= {str(ds.SOPInstanceUID) for ds in sources}, 90,
             "every instance answered")
    wait_for(lambda: not any((small_spool / "outbox").glob("*/*.dcm")), 30, "the outbox to drain")
    assert not partial_files(small_spool)
    assert worker.stop() == 0


def test_a_result_that_does_not_fit_leaves_no_partial_file(small_spool: Path) -> None:
    outbox = Outbox(Spool(small_spool), SendSection(destinations=["PACS@127.0.0.1:1"]), "CXR-GRADCAM")
    filler = fill_disk(small_spool)
    with pytest.raises(OSError):
        outbox.put("a" * 32, b"\0" * 2**20, "1.2.3")
    assert not partial_files(small_spool)
    assert not list((small_spool / "outbox").glob("*/*")) and outbox.depth() == 0
    filler.unlink()
    outbox.put("a" * 32, b"\0" * 2**20, "1.2.3")  # space is back: the same call succeeds
    assert outbox.depth() == 1


# -- ONNX Runtime error ---------------------------------------------------------------------
def test_an_onnx_runtime_error_requeues_the_batch(onnx_model: Path, tmp_path: Path) -> None:
    """A real ONNX Runtime failure (the session is fed a tensor of the wrong size) sends the
    batch back to the queue and is counted; nothing is quarantined. Fixed, it is answered."""
    settings = Settings(select={"min_size": 32}, send={"destinations": ["PACS@127.0.0.1:1"]})
    model = OnnxModel(onnx_model, providers="cpu")
    spool = Spool(tmp_path / "spool")
    metrics = Metrics()
    handler = BatchHandler(Processor(settings, model), spool, Outbox(spool, settings.send, "CXR"), metrics,
                           output_reserve_mb=0)
    for i in range(2):
        phantom(spool.incoming / f"{i}", 90 + i)
        spool.accept(spool.incoming / f"{i}")
    info = model.info
    model.info = dataclasses.replace(info, input_size=info.input_size // 2)
    with pytest.raises(InfrastructureError) as raised:
        handler.handle(spool.claim(8))
    assert fault_of(raised.value.__cause__) is Fault.INFRASTRUCTURE  # type: ignore[arg-type]
    assert type(raised.value.__cause__).__module__.startswith("onnxruntime")
    assert len(list(spool.queue.iterdir())) == 2 and not any(spool.quarantined.iterdir())
    assert metrics.infrastructure_errors.labels("infer")._value.get() == 1
    assert not handler.model_answered
    assert handler._decode_seconds == {}  # noqa: SLF001 (a requeued batch leaves no decode time behind)
    model.info = info
    handler.handle(spool.claim(8))
    assert handler.model_answered and metrics.processed._value.get() == 2 and spool.depth() == 0


def test_an_instance_that_fails_to_build_is_quarantined_and_leaves_no_decode_time(onnx_model: Path,
                                                                                   tmp_path: Path) -> None:
    """A header that decodes but that highdicom refuses to copy (a StudyDate of four digits)
    is quarantined; its decode time is dropped with it (a long-running worker must not
    keep one per failed instance)."""
    settings = Settings(select={"min_size": 32}, send={"destinations": ["PACS@127.0.0.1:1"]})
    spool, metrics = Spool(tmp_path / "spool"), Metrics()
    handler = BatchHandler(Processor(settings, OnnxModel(onnx_model, providers="cpu")), spool,
                           Outbox(spool, settings.send, "CXR"), metrics, output_reserve_mb=0)
    phantom(spool.incoming / "good", 94)
    bad = phantom(spool.incoming / "bad", 95)
    bad.StudyDate = "2020"
    bad.save_as(spool.incoming / "bad", enforce_file_format=True)
    for name in ("good", "bad"):
        spool.accept(spool.incoming / name)
    handler.handle(spool.claim(8))
    assert metrics.processed._value.get() == 1 and metrics.failed._value.get() == 1
    assert len(list(spool.quarantined.iterdir())) >= 1
    assert handler._decode_seconds == {}  # noqa: SLF001


def test_a_bug_in_our_code_is_not_called_bad_input(tmp_path: Path) -> None:
    import io

    with pytest.raises(AttributeError) as bug:
        Spool(tmp_path).requeue(["not a path"])  # type: ignore[list-item]
    assert fault_of(bug.value) is Fault.BUG
    with pytest.raises(Exception) as bad:  # noqa: PT011 (pydicom's own type)
        pydicom.dcmread(io.BytesIO(b"not DICOM at all"))
    assert fault_of(bad.value) is Fault.INPUT
    assert fault_of(OSError(28, "No space left on device")) is Fault.INFRASTRUCTURE


def test_readiness_reports_a_model_that_answered_a_test_inference(onnx_model: Path, tmp_path: Path) -> None:
    from worker.errors import ModelError
    from worker.service import Service

    settings = Settings(spool={"dir": tmp_path / "spool"}, audit={"path": tmp_path / "audit.jsonl"},
                        metrics={"port": 0}, send={"destinations": ["PACS@127.0.0.1:1"]})
    model = OnnxModel(onnx_model, providers="cpu")
    service = Service(settings, model)
    assert service.ready()["model_answered"] is False  # loaded is not enough
    service._warm_up()
    assert service.ready()["model_answered"] is True
    model.info = dataclasses.replace(model.info, input_size=model.info.input_size // 2)
    with pytest.raises(ModelError, match="does not answer a test input"):
        Service(settings, model)._warm_up()
