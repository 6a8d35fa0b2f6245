"""End to end with real peers: DCMTK storescu sends to ``cxr-worker serve``, DCMTK
storescp stands in for the PACS, dciodvfy validates everything we produce."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file

from tests.helpers import (
    CANARY_BIRTH,
    CANARY_ID,
    CANARY_NAME,
    dciodvfy_errors,
    log_records,
    phantom_file,
    read_all,
    sr_finding,
    storescu,
    wait_for,
    walk,
)

pytestmark = pytest.mark.integration

def test_real_cr_chest_round_trip(make_worker: Any, pacs: Any, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # The phantom-trained model gates the real chest (tests/integration/test_trust.py); answered
    # and flagged here, so that the decision and probability round trip can be checked.
    monkeypatch.setenv("CXR_MODEL__OOD_ACTION", "flag")
    worker = make_worker([f"PACS@127.0.0.1:{pacs.port}"])
    names = ["RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm", "RG3_UNCR.dcm"]
    sources = {n: Path(get_testdata_file(n)) for n in names}
    storescu(worker.port, [sources["RG1_UNCR.dcm"], sources["RG3_UNCR.dcm"]])
    # Sent as they are stored: JPEG 2000 lossless (-xv) and lossy (-xw), not transcoded.
    storescu(worker.port, [sources["RG1_J2KR.dcm"]], True, "-xv")
    storescu(worker.port, [sources["RG1_J2KI.dcm"]], True, "-xw")
    wait_for(lambda: len(pacs.files()) >= 6, 180, "3 SC + 3 SR at the PACS")
    received = read_all(pacs.files())
    assert len(received) == 6
    by_ref: dict[str, dict[str, Dataset]] = {}
    for ds in received:
        ref = ds.SourceImageSequence[0] if "SourceImageSequence" in ds else None
        kind = "sc" if ds.Modality == "OT" or "SourceImageSequence" in ds else "sr"
        if kind == "sr":
            ref_uid = next(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                           for i in walk(ds.ContentSequence) if "ReferencedSOPSequence" in i
                           and i.ReferencedSOPSequence[0].ReferencedSOPClassUID != "1.2.840.10008.5.1.4.1.1.7")
        else:
            ref_uid = ref.ReferencedSOPInstanceUID
        by_ref.setdefault(str(ref_uid), {})[kind] = ds
    for name in names[:3]:
        src = pydicom.dcmread(sources[name])
        out = by_ref[str(src.SOPInstanceUID)]
        sc, sr = out["sc"], out["sr"]
        assert sc.StudyInstanceUID == src.StudyInstanceUID == sr.StudyInstanceUID
        assert sc.PatientID == src.PatientID
        assert (sc.Rows, sc.Columns) == (src.Rows, src.Columns)
        assert sc.SamplesPerPixel == 3 and sc.BurnedInAnnotation == "YES"
        assert sc.SeriesDescription == "AI Grad-CAM Pneumonia"
        presence, probability = sr_finding(sr)
        assert presence in ("Present", "Absent")
        assert 0.0 <= probability <= 1.0
        assert (presence == "Present") == (probability >= 0.5)  # the test model's threshold
        assert sr.VerificationFlag == "UNVERIFIED"
        evidence = {r.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                    for series in s.ReferencedSeriesSequence for r in series.ReferencedSOPSequence}
        assert {src.SOPInstanceUID, sc.SOPInstanceUID} <= evidence
        processed = [r for r in log_records(worker) if r.get("message") == "processed"
                     and r.get("sop_instance_uid") == src.SOPInstanceUID]
        assert processed and abs(processed[0]["probability"] - probability) < 1e-3
    for path in pacs.files():
        assert dciodvfy_errors(path) == [], path
    rg3 = pydicom.dcmread(sources["RG3_UNCR.dcm"])
    skipped = [r for r in log_records(worker) if r.get("message", "").startswith("skipped")]
    assert any(r.get("sop_instance_uid") == rg3.SOPInstanceUID and "EXTREMITY" in r["message"] for r in skipped)
    assert worker.stop() == 0


BAD_INPUTS = {
    "ybr": {"PhotometricInterpretation": "YBR_FULL_422"},
    "palette": {"PhotometricInterpretation": "PALETTE COLOR"},
    "multi-frame": {"NumberOfFrames": 3},
    "bits-allocated-12": {"BitsAllocated": 12},
    "huge": {"Rows": 65535, "Columns": 65535},
    "no-pixel-data": {"PixelData": None},
    "truncated-pixels": {"truncate": True},
    # highdicom refuses to copy it, quoting the value in its exception.
    "invalid-birth-date": {"PatientBirthDate": "03.02.1901"},
}


def make_bad(path: Path, change: dict[str, Any], seed: int) -> Dataset:
    ds = phantom_file(path, True, seed)
    for key, value in change.items():
        if key == "truncate":
            ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
        elif value is None:
            del ds[key]
        else:
            setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_bad_inputs_are_quarantined_and_the_rest_is_processed(make_worker: Any, pacs: Any, tmp_path: Path) -> None:
    worker = make_worker([f"PACS@127.0.0.1:{pacs.port}"])
    folder = tmp_path / "send"
    folder.mkdir()
    bad = {name: make_bad(folder / f"bad-{name}.dcm", change, i) for i, (name, change) in enumerate(BAD_INPUTS.items())}
    good = phantom_file(folder / "good.dcm", True, 99)
    # MONOCHROME1 without a window is valid DICOM: it is inverted and processed.
    mono1 = phantom_file(folder / "mono1.dcm", False, 98, photometric="MONOCHROME1")
    storescu(worker.port, sorted(folder.iterdir()))
    wait_for(lambda: len(pacs.files()) >= 4, 120, "results for the two good images")
    wait_for(lambda: len(list((worker.spool / "quarantine").glob("*.dcm"))) == len(bad), 60, "quarantine")
    delivered = {str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
                 for ds in read_all(pacs.files()) if "SourceImageSequence" in ds}
    assert delivered == {good.SOPInstanceUID, mono1.SOPInstanceUID}
    reasons = "\n".join(p.read_text() for p in (worker.spool / "quarantine").glob("*.reason"))
    records = log_records(worker)
    for name, ds in bad.items():
        assert ds.SOPInstanceUID in reasons, name
        assert any(r.get("message", "").startswith("quarantined") and r.get("sop_instance_uid") == ds.SOPInstanceUID
                   for r in records), name
    text = "\n".join(worker.log_lines())
    for canary in (CANARY_NAME, "Canary", "Zebedee", CANARY_ID, CANARY_BIRTH, "03.02.1901"):
        assert canary not in text
    assert worker.proc.poll() is None  # still serving
    assert worker.stop() == 0


def test_unknown_transfer_syntax_is_refused_at_negotiation_and_service_continues(
    make_worker: Any, pacs: Any, tmp_path: Path
) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]

    worker = make_worker([f"PACS@127.0.0.1:{pacs.port}"])
    sender = AE(ae_title="HOSPITAL")
    # HTJ2K and a made-up syntax: neither is among those the worker decodes.
    sender.add_requested_context(ComputedRadiographyImageStorage, ["1.2.840.10008.1.2.4.201", "1.2.3.4.5.6"])
    assoc = sender.associate("127.0.0.1", worker.port, ae_title="CXR-GRADCAM")
    accepted = assoc.accepted_contexts if assoc.is_established else []
    if assoc.is_established:
        assoc.release()
    assert accepted == []
    good = tmp_path / "good.dcm"
    phantom_file(good, False, 6)
    storescu(worker.port, [good])
    wait_for(lambda: len(pacs.files()) >= 2, 120, "results for the good image")
    assert worker.stop() == 0


def test_restart_mid_processing_delivers_each_result_exactly_once(
    make_worker: Any, pacs: Any, tmp_path: Path
) -> None:
    dest = [f"PACS@127.0.0.1:{pacs.port}"]
    worker = make_worker(dest)
    assert worker.stop() == 0
    # Acknowledged but unfinished: two claimed by a processor that died, two queued,
    # and one received twice (the sender retried after a lost response).
    for i in range(4):
        phantom_file(tmp_path / f"s{i}.dcm", bool(i % 2), 40 + i)
        folder = worker.spool / ("work" if i < 2 else "queue")
        shutil.copy(tmp_path / f"s{i}.dcm", folder / f"{os.urandom(8).hex()}.dcm")
    shutil.copy(tmp_path / "s3.dcm", worker.spool / "queue" / f"{os.urandom(8).hex()}.dcm")
    (worker.spool / "incoming" / "tmpabc.dcm").write_bytes(b"partial")
    worker = make_worker(dest, port=worker.port)
    wait_for(lambda: len(pacs.files()) >= 8, 120, "8 results")
    wait_for(lambda: not any((worker.spool / "outbox").glob("*/*.dcm")), 30, "empty outbox")
    uids = [str(ds.SOPInstanceUID) for ds in read_all(pacs.files())]
    assert len(uids) == len(set(uids)) == 8
    assert not any((worker.spool / "incoming").iterdir())
    assert not any((worker.spool / "work").iterdir()) and not any((worker.spool / "queue").iterdir())
    assert any("duplicate" in r.get("message", "") for r in log_records(worker))
    assert worker.stop() == 0


def test_kill_9_then_restart_loses_nothing(make_worker: Any, pacs: Any, tmp_path: Path) -> None:
    import signal

    dest = [f"PACS@127.0.0.1:{pacs.port}"]
    worker = make_worker(dest)
    folder = tmp_path / "burst"
    folder.mkdir()
    sources = [phantom_file(folder / f"b{i}.dcm", bool(i % 2), 60 + i) for i in range(6)]
    storescu(worker.port, sorted(folder.iterdir()))  # every instance acknowledged
    worker.stop(signal.SIGKILL)
    worker = make_worker(dest, port=worker.port)
    wait_for(lambda: len({str(pydicom.dcmread(p).SOPInstanceUID) for p in pacs.files()}) >= 12, 180,
             "12 distinct results")
    wait_for(lambda: not any((worker.spool / "outbox").glob("*/*.dcm")), 30, "empty outbox")
    received = read_all(pacs.files())
    referenced = {str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) for ds in received
                  if "SourceImageSequence" in ds}
    assert referenced == {ds.SOPInstanceUID for ds in sources}
    # Processed exactly once across the kill and the restart (one log file for both runs).
    processed = [r["sop_instance_uid"] for r in log_records(worker) if r.get("message") == "processed"]
    assert sorted(processed) == sorted(ds.SOPInstanceUID for ds in sources)
    assert worker.stop() == 0
