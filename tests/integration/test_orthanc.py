"""Orthanc as the PACS: it routes a stable CR study to the worker by Lua, and the
worker's SC, SR and GSPS land back in the same study, viewable through Orthanc; the RIS gets
the ORU^R01 over MLLP."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEGBaseline8Bit

from cxr_demo.orthanc import OrthancPACS
from tests.helpers import Ris, dciodvfy_errors, free_port, require_tool, sr_finding, storescu, wait_for
from tests.sr_templates import check_measurement_report

pytestmark = pytest.mark.integration


@pytest.fixture
def orthanc(tmp_path: Path) -> Any:
    require_tool("/usr/sbin/Orthanc")
    worker_port = free_port()
    pacs = OrthancPACS(tmp_path / "orthanc", "CXR-GRADCAM", worker_port)
    pacs.start()
    yield pacs
    pacs.stop()


def test_orthanc_routes_study_and_receives_sc_sr_and_gsps_and_the_ris_an_oru(
        orthanc: OrthancPACS, make_worker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The phantom-trained model must gate this real chest; answer it, flagged, and paint the
    # heatmap whatever the decision, so that Orthanc has colour to render.
    monkeypatch.setenv("CXR_MODEL__OOD_ACTION", "flag")
    monkeypatch.setenv("CXR_OUTPUT__HEATMAP_FOR_NEGATIVE", "true")
    ris_port = free_port()
    ris = Ris(ris_port, ["AA"]).__enter__()
    worker = make_worker([f"{orthanc.ae_title}@127.0.0.1:{orthanc.dicom_port}", f"mllp://127.0.0.1:{ris_port}"],
                         port=orthanc.worker_port, gsps=True)
    source = Path(get_testdata_file("RG1_UNCR.dcm"))
    src = pydicom.dcmread(source)
    # The hospital's modality stores into the PACS with DCMTK storescu.
    out = storescu(orthanc.dicom_port, [source], False)
    assert out.returncode == 0, out.stdout + out.stderr

    def series() -> list[dict[str, Any]]:
        return orthanc.series_of_study(str(src.StudyInstanceUID))

    wait_for(lambda: len(series()) >= 4, 180, "the SC, SR and GSPS series in the study")
    series_list = series()
    assert len(series_list) == 4
    sc_series = next(s for s in series_list if s["MainDicomTags"].get("SeriesDescription") == "AI Grad-CAM Pneumonia")
    sr_series = next(s for s in series_list if s["MainDicomTags"].get("Modality") == "SR")
    sc_id = sc_series["Instances"][0]
    png = orthanc.get(f"/instances/{sc_id}/preview")
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[2] == 3
    # Orthanc renders the burned-in colour: at least the Jet colour bar is saturated.
    saturated = np.abs(image[..., 2].astype(int) - image[..., 0].astype(int)) > 100
    assert int(saturated.sum()) > 1000
    # The SC is JPEG Baseline (output.sc_compression's default), and DCMTK decodes what the PACS stored.
    sc_path = tmp_path / "sc.dcm"
    sc_path.write_bytes(orthanc.get(f"/instances/{sc_id}/file"))
    assert pydicom.dcmread(sc_path, stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    decoded = subprocess.run([require_tool("/usr/bin/dcmdjpeg"), str(sc_path), str(tmp_path / "raw.dcm")],
                             capture_output=True, text=True)
    assert decoded.returncode == 0, decoded.stderr
    assert dciodvfy_errors(sc_path) == []
    # Both series carry a date and time, so Orthanc Explorer does not group them under "?".
    for s in (sc_series, sr_series):
        assert s["MainDicomTags"].get("SeriesDate") and s["MainDicomTags"].get("SeriesTime"), s["MainDicomTags"]
    sr_bytes = orthanc.get(f"/instances/{sr_series['Instances'][0]}/file")
    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(sr_bytes)
    presence, probability = sr_finding(pydicom.dcmread(sr_path))
    assert check_measurement_report(pydicom.dcmread(sr_path)) == [] and dciodvfy_errors(sr_path) == []
    logged = [json.loads(line) for line in worker.log_lines() if line.startswith("{")]
    processed = [r for r in logged if r.get("message") == "processed"]
    assert len(processed) == 1 and processed[0]["sop_instance_uid"] == src.SOPInstanceUID
    assert abs(processed[0]["probability"] - probability) < 1e-3
    assert presence == ("Present" if processed[0]["decision"] == "positive" else "Absent")
    # The GSPS is stored as a presentation state on the source, and is valid as stored.
    pr_series = next(s for s in series_list if s["MainDicomTags"].get("Modality") == "PR")
    pr_path = tmp_path / "gsps.dcm"
    pr_path.write_bytes(orthanc.get(f"/instances/{pr_series['Instances'][0]}/file"))
    gsps = pydicom.dcmread(pr_path)
    assert gsps.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert dciodvfy_errors(pr_path) == []
    # The RIS acknowledged one ORU^R01 for the study's accession number.
    wait_for(lambda: len(ris.received) >= 1, 60, "the ORU^R01 at the RIS")
    ris.__exit__()
    (oru,) = ris.received
    assert str(oru.segment("OBR")[3]) == str(src.AccessionNumber) and str(oru.segment("OBR")[25]) == "P"
    assert worker.stop() == 0
    sent = [r for r in logged + [json.loads(line) for line in worker.log_lines() if line.startswith("{")]
            if r.get("message") == "sent" and r.get("destination") == f"mllp://127.0.0.1:{ris_port}"]
    assert sent
    log = "\n".join(worker.log_lines())  # the ORU carried the patient; the log names none of it
    assert str(src.PatientName.family_name) not in log and str(src.PatientBirthDate) not in log
