"""Outputs every PACS and viewer takes: the compressed SC, the SR checked against its
templates and rendered by DCMTK, sources without patient/study attributes, and why there is no
Parametric Map of a radiograph."""

from __future__ import annotations

import copy
import html
import io
import re
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom._standard_utils import ModuleUsageValues, get_module_usage  # the standard's module tables
from PIL import Image, JpegImagePlugin
from pydantic import ValidationError
from pydicom import Dataset
from pydicom.encaps import generate_frames
from pydicom.sr.codedict import codes
from pydicom.uid import (
    JPEG2000,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    ParametricMapStorage,
)

from tests.dicom_outputs import MODEL, MODEL_V2, de_identified, hot_gradcam, real_cr, synthetic_cr
from tests.helpers import dciodvfy_errors, require_tool
from tests.sr_templates import check_measurement_report
from worker.config import Settings
from worker.decode import dataset_to_unit_image
from worker.model import GATE_OOD_SCORE
from worker.outputs import (
    PATIENT_STUDY_TYPE2,
    BuildSettings,
    Trust,
    build_report,
    build_secondary_capture,
    output_uids,
    render_heatmap_overlay,
    render_withheld,
)

pytestmark = [pytest.mark.tool, pytest.mark.filterwarnings("ignore:The string \"ward\":UserWarning")]
PROBABILITY = 0.8734



def build(source: Dataset, folder: Path, settings: BuildSettings | None = None, *, trust: Trust | None = None,
          model: Any = MODEL) -> tuple[Path, Path, np.ndarray[Any, Any]]:
    """SC and SR as the pipeline builds them, saved; the overlay the SC encodes."""
    settings = settings or BuildSettings()
    trust = trust or Trust()
    unit = dataset_to_unit_image(source)
    if trust.withheld:
        rgb = render_withheld(unit, reason=trust.gate_line(model), model_name=model.name,
                              model_version=model.version)
    else:
        rgb = render_heatmap_overlay(unit, hot_gradcam(), probability=PROBABILITY, threshold=model.threshold,
                                     model_name=model.name, model_version=model.version,
                                     heatmap_scale=model.heatmap_scale)
    uids = output_uids(source, model.version)
    sc = build_secondary_capture(source, rgb, uids, model, settings, trust=trust)
    sr = build_report(source, sc, PROBABILITY, model, uids, settings, trust=trust)
    folder.mkdir(parents=True, exist_ok=True)
    sc_path, sr_path = folder / "sc.dcm", folder / "sr.dcm"
    sc.save_as(sc_path, enforce_file_format=True)
    sr.save_as(sr_path, enforce_file_format=True)
    return sc_path, sr_path, rgb


def psnr(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# -- 1. compressed Secondary Capture ---------------------------------------------------------------

@pytest.fixture(scope="module")
def rg1_outputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray[Any, Any]]:
    """RG1 answered with the default settings: a JPEG SC."""
    return build(real_cr(), tmp_path_factory.mktemp("rg1"))


def test_default_sc_is_jpeg_baseline_labelled_lossy(rg1_outputs: tuple[Path, Path, Any]) -> None:
    sc_path, _, rgb = rg1_outputs
    sc = pydicom.dcmread(sc_path)
    assert sc.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert sc.PhotometricInterpretation == "YBR_FULL_422" and sc.BitsAllocated == 8
    assert sc.LossyImageCompression == "01" and sc.LossyImageCompressionMethod == "ISO_10918_1"
    frame = next(generate_frames(sc.PixelData, number_of_frames=1))
    assert float(sc.LossyImageCompressionRatio) == pytest.approx(rgb.nbytes / len(frame), rel=0.01)
    jpeg = Image.open(io.BytesIO(frame))
    assert jpeg.format == "JPEG" and JpegImagePlugin.get_sampling(jpeg) == 1  # 4:2:2, as YBR_FULL_422 says
    assert sc_path.stat().st_size <= 1_000_000  # 10.8 MB uncompressed
    assert dciodvfy_errors(sc_path) == []


def test_jpeg_sc_decodes_with_dcmtk_and_keeps_the_burn_in_legible(rg1_outputs: tuple[Path, Path, Any],
                                                                   tmp_path: Path) -> None:
    sc_path, _, rgb = rg1_outputs
    out = tmp_path / "decoded.dcm"
    run = subprocess.run([require_tool("/usr/bin/dcmdjpeg"), str(sc_path), str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    decoded = pydicom.dcmread(out)
    assert decoded.file_meta.TransferSyntaxUID != JPEGBaseline8Bit
    px = decoded.pixel_array
    if decoded.PhotometricInterpretation != "RGB":  # dcmdjpeg keeps YCbCr unless told otherwise
        px = pydicom.pixels.convert_color_space(px, decoded.PhotometricInterpretation, "RGB")
    assert px.shape == rgb.shape and psnr(px, rgb) > 38
    # The text block (top left) and the colour bar (top right): sharp edges survive 4:2:2 at quality 90.
    rows, cols = rgb.shape[:2]
    text, bar = (slice(0, rows // 5), slice(0, cols // 2)), (slice(0, rows // 3), slice(cols - cols // 10, cols))
    assert psnr(px[text], rgb[text]) > 33 and psnr(px[bar], rgb[bar]) > 33


@pytest.mark.parametrize(("compression", "syntax", "photometric"), [
    ("jpeg", JPEGBaseline8Bit, "YBR_FULL_422"), ("jpeg2000", JPEG2000, "YBR_ICT"),
    ("none", ExplicitVRLittleEndian, "RGB"),
])
def test_sc_compression_setting(compression: str, syntax: str, photometric: str, tmp_path: Path) -> None:
    sc_path, _, rgb = build(synthetic_cr(), tmp_path, BuildSettings(sc_compression=compression))
    sc = pydicom.dcmread(sc_path)
    assert sc.file_meta.TransferSyntaxUID == syntax and sc.PhotometricInterpretation == photometric
    assert ("LossyImageCompression" in sc) == (compression != "none")
    assert psnr(sc.pixel_array, rgb) > (30 if compression != "none" else 1000)
    assert dciodvfy_errors(sc_path) == []


@pytest.mark.parametrize("output", [{"sc_compression": "png"}, {"sc_quality": 0}, {"sc_quality": 101}])
def test_bad_compression_settings_are_refused(output: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match=next(iter(output))):
        Settings(output=output)


def test_lower_quality_gives_a_smaller_sc(tmp_path: Path) -> None:
    small = build(synthetic_cr(), tmp_path / "q30", BuildSettings(sc_quality=30))[0].stat().st_size
    large = build(synthetic_cr(), tmp_path / "q95", BuildSettings(sc_quality=95))[0].stat().st_size
    assert small < large


def test_a_lossy_source_keeps_its_compression_history(tmp_path: Path) -> None:
    source = synthetic_cr()
    source.LossyImageCompression, source.LossyImageCompressionRatio = "01", "8.5"
    source.LossyImageCompressionMethod = "ISO_10918_1"
    sc = pydicom.dcmread(build(source, tmp_path)[0])
    assert list(sc.LossyImageCompressionMethod) == ["ISO_10918_1", "ISO_10918_1"]
    assert float(sc.LossyImageCompressionRatio[0]) == 8.5 and float(sc.LossyImageCompressionRatio[1]) > 1


# -- 2. SR that follows its templates --------------------------------------------------------------

def dcmtk(tool: str, path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool(f"/usr/bin/{tool}"), *options, str(path)], capture_output=True, text=True,
                          timeout=60)


def synthetic_dx() -> Dataset:
    ds = synthetic_cr()
    ds.SOPClassUID, ds.Modality = DigitalXRayImageStorageForPresentation, "DX"
    return ds


SR_CASES = {
    "rg1-answered": (real_cr, MODEL, Trust()),
    "dx-answered": (synthetic_dx, MODEL, Trust()),
    "synthetic-withheld": (synthetic_cr, MODEL_V2, Trust(ood_score=27.5, gate=GATE_OOD_SCORE, withheld=True)),
    "synthetic-flagged": (synthetic_cr, MODEL_V2, Trust(ood_score=12.0, gate=GATE_OOD_SCORE, faithfulness=0.8)),
}


@pytest.mark.parametrize("case", list(SR_CASES))
def test_sr_follows_tid_1500_1501_1600_and_dcmtk_reads_it_strictly(case: str, tmp_path: Path) -> None:
    make, model, trust = SR_CASES[case]
    source = make()
    _, sr_path, _ = build(source, tmp_path, trust=trust, model=model)
    sr = pydicom.dcmread(sr_path)
    assert check_measurement_report(sr) == []
    # The Image Library lists the image the model read, with its acquisition modality.
    library = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111028")
    entry = library.ContentSequence[0].ContentSequence[0]
    assert entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    modality = next(i for i in entry.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121139")
    assert modality.ConceptCodeSequence[0].CodeValue == source.Modality
    # DCMTK in its default (strict) mode: no invalid items accepted, every string VR-checked.
    for tool, options in (("dsrdump", ("-v",)), ("dsr2xml", ("-v",))):
        out = dcmtk(tool, sr_path, *options)
        assert out.returncode == 0 and not re.search(r"^[WE]: ", out.stderr, re.M), (tool, out.stderr)
    assert dciodvfy_errors(sr_path) == []


def test_checker_finds_an_sc_coded_ot_in_the_image_library(tmp_path: Path) -> None:
    """The SR as once built: the SC, coded OT, in the Image Library."""
    source = synthetic_cr()
    _, sr_path, _ = build(source, tmp_path)
    sr = pydicom.dcmread(sr_path)
    library = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111028")
    entry = library.ContentSequence[0].ContentSequence[0]
    modality = next(i for i in entry.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121139")
    modality.ConceptCodeSequence[0].CodeValue = "OT"
    stray = copy.deepcopy(modality)
    stray.RelationshipType = "CONTAINS"
    library.ContentSequence[0].ContentSequence.append(stray)
    problems = check_measurement_report(sr)
    assert "TID 1602: Modality OT is not in CID 29" in problems
    assert any("TID 1601 group: CONTAINS CODE" in p and "is in no row" in p for p in problems)


def viewer_text(sr_path: Path) -> str:
    out = dcmtk("dsr2html", sr_path)
    assert out.returncode == 0, out.stderr
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", out.stdout)))


def test_dsr2html_shows_the_finding_probability_algorithm_and_unverified(rg1_outputs: tuple[Path, Path, Any]) -> None:
    text = viewer_text(rg1_outputs[1])
    assert "Pneumonia" in text and "Present" in text
    assert "0.8734" in text
    assert MODEL.name in text and MODEL.version in text
    assert "UNVERIFIED" in text


def test_dsr2html_of_a_withheld_answer_says_not_evaluated_without_probability(tmp_path: Path) -> None:
    make, model, trust = SR_CASES["synthetic-withheld"]
    text = viewer_text(build(make(), tmp_path, trust=trust, model=model)[1])
    assert "Not Evaluated" in text and "Outside the model's training distribution" in text
    assert "0.8734" not in text and "UNVERIFIED" in text


# -- 3. sources without patient and study attributes ------------------------------------------------

def check_outputs_of(source: Dataset, folder: Path) -> tuple[Dataset, Dataset]:
    """Build both outputs; each copies what the source has, leaves empty what it lacks, and
    carries Series and Content Date/Time; the source is left as it was."""
    before = copy.deepcopy(source)
    sc_path, sr_path, _ = build(source, folder)
    assert source == before and set(source.keys()) == set(before.keys())
    outputs = pydicom.dcmread(sc_path), pydicom.dcmread(sr_path)
    for ds, path in zip(outputs, (sc_path, sr_path), strict=True):
        for keyword in PATIENT_STUDY_TYPE2:
            assert keyword in ds, (path.name, keyword)
            assert str(ds[keyword].value or "") == str(source.get(keyword) or ""), (path.name, keyword)
        assert ds.SeriesDate and ds.SeriesTime and ds.ContentDate and ds.ContentTime
        assert (ds.SeriesDate, ds.SeriesTime) == (ds.ContentDate, ds.ContentTime)
        assert dciodvfy_errors(path) == [], path.name
    return outputs


@pytest.mark.parametrize("keyword", PATIENT_STUDY_TYPE2)
def test_each_missing_type2_attribute_is_sent_empty(keyword: str, tmp_path: Path) -> None:
    source = synthetic_cr()
    source.ReferringPhysicianName = "Doe^Jane"
    del source[keyword]
    sc, sr = check_outputs_of(source, tmp_path)
    assert sc[keyword].value in (None, "") and sr[keyword].value in (None, "")


def test_empty_type2_values_stay_empty(tmp_path: Path) -> None:
    source = synthetic_cr()
    for keyword in PATIENT_STUDY_TYPE2:
        setattr(source, keyword, None)
    check_outputs_of(source, tmp_path)


def test_de_identified_rg1_gets_both_outputs(tmp_path: Path) -> None:
    sc, sr = check_outputs_of(de_identified(real_cr()), tmp_path)
    assert check_measurement_report(sr) == []
    assert "PatientAge" not in sc and "StudyDescription" not in sr  # Type 3: absent, not invented
    assert sc.PatientIdentityRemoved == "YES" == sr.PatientIdentityRemoved


# -- 5. Parametric Map ----------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Arguments 'window_center'")
def test_parametric_map_of_a_radiograph_is_impossible_with_highdicom() -> None:
    """docs/conformance.md, "Parametric Map": the Parametric Map IOD needs a Frame of Reference and plane
    geometry that a CR or DX does not have, and highdicom cannot build one without them. When
    this test fails, highdicom has learnt to: implement ``output.parametric_map``."""
    # highdicom's table of PS3.3 A.75: Frame of Reference is Mandatory in a Parametric Map
    # (it is User Optional in a Segmentation); a CR or DX has none to copy.
    assert get_module_usage("frame-of-reference", ParametricMapStorage) == ModuleUsageValues.MANDATORY
    source = synthetic_cr()
    heat = np.zeros((int(source.Rows), int(source.Columns)), np.uint8)
    mapping = hd.pm.RealWorldValueMapping(lut_label="GRADCAM", lut_explanation="Grad-CAM", unit=codes.UCUM.NoUnits,
                                          value_range=(0, 255), slope=1 / 255, intercept=0.0)
    assert "FrameOfReferenceUID" not in source
    with pytest.raises(RuntimeError, match="mismatch between dimension index values"):
        hd.pm.ParametricMap([source], heat, hd.UID(), 9003, hd.UID(), 1, "cxr-gradcam", "m", "1", "0",
                            contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
                            window_center=127.5, window_width=256.0)


def test_the_review_link_is_printed_only_when_results_are_recorded() -> None:
    from worker.config import get_settings
    from worker.links import review_url
    from worker.pipeline import review_link

    url = "https://cxr.example.org"
    on = get_settings(None, {"dashboard": {"public_url": url}})
    assert review_link(on, "1.2.3.4", "v1") == review_url(url, "1.2.3.4", "v1")
    # Not recorded: a link would lead readers to a result the dashboard never stored.
    assert review_link(get_settings(None, {"dashboard": {"public_url": url, "record": False}}), "1.2.3.4", "v1") == ""
    assert review_link(get_settings(None, {}), "1.2.3.4", "v1") == ""
