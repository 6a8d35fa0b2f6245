"""Faults for real: a full spool disk, SIGTERM in the middle of a burst, kill -9 while
results are being exported to a slow PACS."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    Storescp,
    connections_to,
    free_port,
    logged,
    phantom_file,
    read_all,
    require_tool,
    wait_for,
)

pytestmark = pytest.mark.integration


def storescu_cmd(port: int, files: list[Path]) -> list[str]:
    return [require_tool("/usr/bin/storescu"), "-aet", "HOSPITAL", "-aec", "CXR-GRADCAM", "127.0.0.1", str(port),
            *map(str, files)]


def test_spool_below_reserve_answers_out_of_resources(make_worker: Any, pacs: Any, tmp_path: Path) -> None:
    worker = make_worker([f"PACS@127.0.0.1:{pacs.port}"], extra="")
    worker.stop()
    # Restart with a reserve larger than any disk: every C-STORE must be refused.
    config = worker.config.read_text().replace("reserve_mb = 0", "reserve_mb = 1000000000")
    worker.config.write_text(config)
    worker.start()
    image = tmp_path / "x.dcm"
    phantom_file(image, True, 1)
    out = subprocess.run(storescu_cmd(worker.port, [image])[:1] + ["-v"] + storescu_cmd(worker.port, [image])[1:],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "refused: outofresources" in (out.stdout + out.stderr).lower(), out.stdout + out.stderr
    assert not any((worker.spool / "queue").iterdir())
    assert not any((worker.spool / "incoming").iterdir())
    assert logged(worker, "refused instance")
    assert worker.stop() == 0


def test_sigterm_mid_burst_finishes_cleanly_and_loses_nothing(make_worker: Any, pacs: Any, tmp_path: Path) -> None:
    dest = [f"PACS@127.0.0.1:{pacs.port}"]
    worker = make_worker(dest)
    folder = tmp_path / "burst"
    folder.mkdir()
    for i in range(30):
        phantom_file(folder / f"{i:02d}.dcm", bool(i % 2), 200 + i)
    sender = subprocess.Popen(storescu_cmd(worker.port, sorted(folder.iterdir())), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    wait_for(lambda: len(logged(worker, "received")) >= 3, 60, "the burst to start")
    # stop() allows 60 s, then dumps the worker's threads; exit code 0 means it finished cleanly.
    assert worker.stop(signal.SIGTERM) == 0
    sender.wait(60)
    # After the stop, new associations are refused.
    late = subprocess.run(storescu_cmd(worker.port, [folder / "00.dcm"]), capture_output=True, timeout=60)
    assert late.returncode != 0
    acknowledged = {r["sop_instance_uid"] for r in logged(worker, "received")}
    assert acknowledged
    worker = make_worker(dest, port=worker.port)
    wait_for(lambda: {str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) for ds in read_all(pacs.files())
                      if "SourceImageSequence" in ds} >= acknowledged, 180, "every acknowledged instance answered")
    assert worker.stop() == 0


def test_kill_9_during_export_delivers_one_sc_and_one_sr(make_worker: Any, tmp_path: Path) -> None:
    port = free_port()
    slow = subprocess.Popen([require_tool("/usr/bin/storescp"), "--sleep-during", "3", "-uf", "-od",
                             str(tmp_path / "slow"), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (tmp_path / "slow").mkdir()
    dest = [f"PACS@127.0.0.1:{port}"]
    worker = make_worker(dest)
    image = tmp_path / "e.dcm"
    source = phantom_file(image, True, 77)
    subprocess.run(storescu_cmd(worker.port, [image]), check=True, capture_output=True, timeout=60)
    wait_for(lambda: bool(logged(worker, "processed")), 60, "processing")
    wait_for(lambda: connections_to(port) > 0, 60, "the worker's association to the slow PACS")
    worker.stop(signal.SIGKILL)
    slow.kill()
    slow.wait(10)
    pacs = Storescp(port, tmp_path / "pacs")
    pacs.start()
    try:
        worker = make_worker(dest, port=worker.port)
        wait_for(lambda: not any((worker.spool / "outbox").glob("*/*.dcm")), 120, "the outbox to drain")
        received = read_all(pacs.files()) + read_all(sorted((tmp_path / "slow").iterdir()))
        uids = {str(ds.SOPInstanceUID) for ds in received}
        assert len(uids) == 2  # one SC and one SR, whatever was re-sent
        assert {ds.Modality for ds in received} >= {"SR"}
        assert all(str(ds.StudyInstanceUID) == source.StudyInstanceUID for ds in received)
        assert worker.stop() == 0
    finally:
        pacs.stop()


def test_kill_9_during_an_association_loses_only_the_unacknowledged(make_worker: Any, pacs: Any,
                                                                      tmp_path: Path) -> None:
    from pydicom import dcmread
    from pynetdicom import AE

    dest = [f"PACS@127.0.0.1:{pacs.port}"]
    worker = make_worker(dest)
    sources = [phantom_file(tmp_path / f"{i}.dcm", bool(i % 2), 300 + i) for i in range(4)]
    sender = AE(ae_title="HOSPITAL")
    sender.add_requested_context(sources[0].SOPClassUID, sources[0].file_meta.TransferSyntaxUID)
    assoc = sender.associate("127.0.0.1", worker.port, ae_title="CXR-GRADCAM")
    assert assoc.is_established
    for ds in sources[:3]:
        assert assoc.send_c_store(dcmread(tmp_path / f"{sources.index(ds)}.dcm")).Status == 0
    worker.stop(signal.SIGKILL)  # the association is still open
    try:  # the sender sees the failure: no response, or the association already gone
        status = assoc.send_c_store(dcmread(tmp_path / "3.dcm"))
        assert "Status" not in status or status.Status != 0
    except RuntimeError:
        assert not assoc.is_established
    assoc.abort()
    worker = make_worker(dest, port=worker.port)
    acknowledged = {ds.SOPInstanceUID for ds in sources[:3]}
    wait_for(lambda: {str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) for ds in read_all(pacs.files())
                      if "SourceImageSequence" in ds} >= acknowledged, 180, "every acknowledged instance answered")
    assert not any((worker.spool / "incoming").iterdir())  # partial temp files swept at start
    assert not any((worker.spool / "quarantine").iterdir())  # no partial file was processed
    assert worker.stop() == 0


def test_dataset_values_never_become_paths(make_worker: Any, pacs: Any, tmp_path: Path) -> None:
    import re

    worker = make_worker([f"PACS@127.0.0.1:{pacs.port}"])
    evil = tmp_path / "evil.dcm"
    ds = phantom_file(evil, True, 5)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "../../../../../../tmp/cxr-evil"
    ds.SeriesInstanceUID = "../../outbox/x"
    ds.save_as(evil, enforce_file_format=True)
    subprocess.run(storescu_cmd(worker.port, [evil]), capture_output=True, timeout=60)
    # Such UIDs are refused at receive now (C000); whatever the outcome, no path may come of them.
    wait_for(lambda: bool(logged(worker, "refused instance") or logged(worker, "processed")
                          or logged(worker, "quarantined")), 60, "an outcome")
    assert not Path("/tmp/cxr-evil").exists()
    safe = re.compile(r"^[0-9a-f]{32}(\.dcm|\.json|\.reason|-[0-9a-f]{32}\.(dcm|json))?$|^[0-9a-f]{32}$")
    # The results store (worker/store.py) names its own files: a database and hash-named images.
    store = re.compile(r"^results/(results\.db(-wal|-shm)?|media/\d{4}/\d{2}/\d{2}/[0-9a-f]{20}\.(png|npy))$")
    for path in worker.spool.rglob("*"):
        if path.is_file():
            assert safe.match(path.name) or store.match(path.relative_to(worker.spool).as_posix()), path
    assert worker.stop() == 0
