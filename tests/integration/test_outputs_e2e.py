"""A de-identified chest X-ray, without any patient or study attribute a de-identification pass
removes, goes through decode, the ONNX model and both builders: it gets a JPEG SC that DCMTK
decodes and a template-clean SR, and the input file is left byte for byte as it was."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEGBaseline8Bit

from tests.dicom_outputs import de_identified, real_cr
from tests.helpers import dciodvfy_errors, require_tool
from tests.sr_templates import check_measurement_report
from worker.config import Settings
from worker.model import OnnxModel
from worker.outputs import PATIENT_STUDY_TYPE2
from worker.pipeline import Processor, Result, encode, process_files

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:The string \"ward\":UserWarning")]


def test_de_identified_rg1_is_answered_with_a_jpeg_sc_and_a_clean_sr(onnx_model: Path, tmp_path: Path) -> None:
    source = de_identified(real_cr())
    path = tmp_path / "deid.dcm"
    source.save_as(path, enforce_file_format=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    # The phantom-trained test model gates a real chest: flag it so that the answer is built in full.
    processor = Processor(Settings(model={"ood_action": "flag"}), OnnxModel(onnx_model, providers="cpu"))
    [(_, result)] = list(process_files([path], processor))
    assert isinstance(result, Result), result
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    sc_path, sr_path = tmp_path / "sc.dcm", tmp_path / "sr.dcm"
    sc_path.write_bytes(encode(result.sc))
    sr_path.write_bytes(encode(result.sr))
    sc, sr = pydicom.dcmread(sc_path), pydicom.dcmread(sr_path)
    assert sc.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    for ds in (sc, sr):
        assert all(ds[k].value in (None, "") for k in PATIENT_STUDY_TYPE2)
        assert ds.SeriesDate and ds.SeriesTime and ds.StudyInstanceUID == source.StudyInstanceUID
    decoded = subprocess.run([require_tool("/usr/bin/dcmdjpeg"), str(sc_path), str(tmp_path / "raw.dcm")],
                             capture_output=True, text=True)
    assert decoded.returncode == 0, decoded.stderr
    assert check_measurement_report(sr) == []
    assert dciodvfy_errors(sc_path) == [] and dciodvfy_errors(sr_path) == []


@pytest.mark.parametrize("gsps", [True, False], ids=["gsps-on", "gsps-off"])
def test_the_pipeline_sends_a_gsps_on_the_source_as_output_gsps_says(gsps: bool, onnx_model: Path,
                                                                     tmp_path: Path) -> None:
    path = tmp_path / "rg1.dcm"
    real_cr().save_as(path, enforce_file_format=True)
    settings = Settings(model={"ood_action": "flag"}, output={"heatmap_for_negative": True, "gsps": gsps})
    [(_, result)] = list(process_files([path], Processor(settings, OnnxModel(onnx_model, providers="cpu"))))
    assert isinstance(result, Result), result
    assert result.encoded is not None and len(result.encoded) == len(result.objects) == (3 if gsps else 2)
    if not gsps:
        assert result.gsps is None
        return
    (tmp_path / "gsps.dcm").write_bytes(result.encoded[2])
    back = pydicom.dcmread(tmp_path / "gsps.dcm")
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1" and back.PresentationLUTShape == "INVERSE"
    assert back.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == \
        real_cr().SOPInstanceUID
    assert dciodvfy_errors(tmp_path / "gsps.dcm") == []
