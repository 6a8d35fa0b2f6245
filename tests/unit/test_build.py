"""The SC and SR builders: dciodvfy-clean objects that say what the model said."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

from cxr_contract.model import ModelInfo
from tests.helpers import dciodvfy_errors
from worker.build import (
    BuildSettings,
    build_report,
    build_secondary_capture,
    decision,
    output_uids,
    render_heatmap_overlay,
)
from worker.decode import dataset_to_unit_image
from worker.errors import UnsupportedInput

MODEL = ModelInfo(
    name="test-model", version="1.2.3", input_size=64, threshold=0.5, weights_sha256="ab" * 32
)
SETTINGS = BuildSettings()
# RG1's Referring Physician "ward" is a one-component name; highdicom says so on every build.
pytestmark = pytest.mark.filterwarnings("ignore:The string \"ward\":UserWarning")


def real_cr() -> Dataset:
    """RG1_UNCR: a real CR chest PA, MONOCHROME1, 15 bits, Pixel Spacing 0\\0."""
    return pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))


def synthetic_cr() -> Dataset:
    """A 64 x 64 MONOCHROME2 CR with only Imager Pixel Spacing, no orientation, no body part."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Synthetic^Chest"
    ds.PatientID = "SYN-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate, ds.StudyTime = "20240102", "101500"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "ACC1", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CR", 1, 1
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    y, x = np.mgrid[0:64, 0:64]
    ds.PixelData = ((x + y) * 32).astype(np.uint16).tobytes()
    return ds


SOURCES = {"real": real_cr, "synthetic": synthetic_cr}


def hot_gradcam() -> np.ndarray[Any, Any]:
    """An 8 x 8 map that is hot only in the bottom-right quadrant, away from the burn-in."""
    cam = np.zeros((8, 8), np.float32)
    cam[4:, 4:] = 4.0
    return cam


def build_both(source: Dataset, probability: float, folder: Path) -> tuple[Path, Path]:
    uids = output_uids(source, MODEL.version)
    rgb = render_heatmap_overlay(
        dataset_to_unit_image(source),
        hot_gradcam(),
        probability=probability,
        threshold=MODEL.threshold,
        model_name=MODEL.name,
        model_version=MODEL.version,
        opacity=SETTINGS.opacity,
    )
    sc = build_secondary_capture(source, rgb, uids, MODEL, SETTINGS)
    sr = build_report(source, sc, probability, MODEL, uids, SETTINGS)
    sc_path, sr_path = folder / "sc.dcm", folder / "sr.dcm"
    sc.save_as(sc_path, enforce_file_format=True)
    sr.save_as(sr_path, enforce_file_format=True)
    return sc_path, sr_path


@pytest.fixture(scope="module", params=[(s, p) for s in SOURCES for p in (0.9, 0.1)],
                ids=lambda sp: f"{sp[0]}-p{sp[1]}")
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
    tuple[Dataset, float, Path, Path]
]:
    name, probability = request.param
    source = SOURCES[name]()
    sc_path, sr_path = build_both(source, probability, tmp_path_factory.mktemp(name))
    yield source, probability, sc_path, sr_path


def walk(items: Any) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from walk(item.get("ContentSequence", []))


def code_of(item: Dataset, sequence: str) -> str:
    return str(item[sequence][0].CodeValue) if sequence in item else ""


@pytest.mark.tool
@pytest.mark.parametrize("which", ["sc", "sr"])
def test_dciodvfy_reports_no_errors(built: tuple[Dataset, float, Path, Path], which: str) -> None:
    _, _, sc_path, sr_path = built
    path = sc_path if which == "sc" else sr_path
    assert dciodvfy_errors(path) == []


def test_sc_is_in_the_source_study_and_references_it(
    built: tuple[Dataset, float, Path, Path],
) -> None:
    source, _, sc_path, _ = built
    sc = pydicom.dcmread(sc_path)
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.PatientID == source.PatientID
    assert (sc.Rows, sc.Columns) == (source.Rows, source.Columns)
    assert sc.SamplesPerPixel == 3 and sc.PhotometricInterpretation == "RGB"
    assert sc.BurnedInAnnotation == "YES"
    assert list(sc.ImageType) == ["DERIVED", "SECONDARY"]
    assert "Grad-CAM" in sc.DerivationDescription and "test-model 1.2.3" in sc.DerivationDescription
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
    assert sc.SeriesDescription == SETTINGS.sc_series_description
    assert sc.ContentDate and sc.ContentTime


def test_sc_hot_quadrant_is_red(built: tuple[Dataset, float, Path, Path]) -> None:
    _, _, sc_path, _ = built
    px = pydicom.dcmread(sc_path).pixel_array.astype(np.float64)
    half_r, half_c = px.shape[0] // 2, px.shape[1] // 2

    def redness(block: np.ndarray[Any, Any]) -> float:
        return float(block[..., 0].mean() - block[..., 2].mean())

    hot, opposite = px[half_r:, half_c:], px[:half_r, :half_c]
    assert redness(hot) > redness(opposite) + 10, (redness(hot), redness(opposite))


def test_sc_copies_geometry_and_laterality_only_when_meaningful() -> None:
    def sc_of(source: Dataset) -> Dataset:
        blank = np.zeros((source.Rows, source.Columns, 3), np.uint8)
        return build_secondary_capture(source, blank, output_uids(source, "1"), MODEL, SETTINGS)

    real, synthetic = sc_of(real_cr()), sc_of(synthetic_cr())
    # Real CR: Pixel Spacing 0\0 is "unknown", not a size; a chest is unpaired, so
    # Laterality (Type 2C) stays absent; its orientation is carried.
    assert "PixelSpacing" not in real
    assert "Laterality" not in real and real.BodyPartExamined == "CHEST"
    assert list(real.PatientOrientation) == ["L", "F"]
    # Synthetic: only Imager Pixel Spacing; no body part or orientation, so both are
    # sent empty, which is how DICOM says "unknown".
    assert [float(v) for v in synthetic.PixelSpacing] == [0.2, 0.2]
    assert synthetic.Laterality == "" and not synthetic.PatientOrientation


def test_sr_says_present_or_absent_and_the_probability(
    built: tuple[Dataset, float, Path, Path],
) -> None:
    source, probability, sc_path, sr_path = built
    sr = pydicom.dcmread(sr_path)
    items = list(walk(sr.ContentSequence))
    evaluations = [
        i for i in items
        if i.ValueType == "CODE" and code_of(i, "ConceptNameCodeSequence") == "233604007"
    ]
    assert len(evaluations) == 1
    expected = "52101004" if probability >= 0.5 else "2667000"  # SCT Present / Absent
    assert code_of(evaluations[0], "ConceptCodeSequence") == expected
    numbers = [
        i for i in items
        if i.ValueType == "NUM" and code_of(i, "ConceptNameCodeSequence") == "PNEUMONIA-PROB"
    ]
    assert len(numbers) == 1
    assert float(numbers[0].MeasuredValueSequence[0].NumericValue) == pytest.approx(
        probability, abs=1e-6
    )
    texts = {str(i.TextValue) for i in items if i.ValueType == "TEXT"}
    assert {"test-model", "1.2.3", f"weights_sha256={'ab' * 32}"} <= texts
    sc_uid = pydicom.dcmread(sc_path, stop_before_pixels=True).SOPInstanceUID
    evidence = {
        sop.ReferencedSOPInstanceUID
        for series in sr.CurrentRequestedProcedureEvidenceSequence
        for s in series.ReferencedSeriesSequence
        for sop in s.ReferencedSOPSequence
    }
    assert evidence == {source.SOPInstanceUID, sc_uid}
    images = {
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for i in items if i.ValueType == "IMAGE"
    }
    assert {source.SOPInstanceUID, sc_uid} <= images
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE" and sr.PreliminaryFlag == "PRELIMINARY"
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesDescription == SETTINGS.sr_series_description


def test_output_uids_are_deterministic_and_valid() -> None:
    source = real_cr()
    first, again = output_uids(source, "1.2.3"), output_uids(real_cr(), "1.2.3")
    other = output_uids(source, "1.2.4")
    assert first == again
    values = list(vars(first).values())
    assert len(set(values)) == 4
    assert not set(values) & set(vars(other).values())
    for uid in [*values, *vars(output_uids(source, "1.2.3", prefix="1.2.826.0.1.99.")).values()]:
        assert len(uid) <= 64 and UID(uid).is_valid, uid
    assert output_uids(source, "1.2.3", prefix="1.2.826.0.1.99.").sc_series.startswith(
        "1.2.826.0.1.99."
    )


@pytest.mark.parametrize(
    "rgb",
    [
        np.zeros((64, 64), np.uint8),
        np.zeros((63, 64, 3), np.uint8),
        np.zeros((64, 64, 4), np.uint8),
        np.zeros((64, 64, 3), np.float32),
    ],
    ids=["2d", "rows", "channels", "float"],
)
def test_wrong_overlay_is_rejected(rgb: np.ndarray[Any, Any]) -> None:
    source = synthetic_cr()
    with pytest.raises(UnsupportedInput, match=r"Received: .*shape=\(" + str(rgb.shape[0])):
        build_secondary_capture(source, rgb, output_uids(source, "1"), MODEL, SETTINGS)


def test_decision_is_at_or_above_threshold() -> None:
    assert decision(0.5, 0.5) and decision(0.9, 0.5)
    assert not decision(0.4999, 0.5)


def test_all_zero_map_adds_no_colour() -> None:
    image = np.tile(np.linspace(0, 1, 256, dtype=np.float32), (256, 1))
    rgb = render_heatmap_overlay(
        image, np.zeros((7, 7)), probability=0.2, threshold=0.5, model_name="m", model_version="v"
    )
    lower = rgb[160:].astype(int)  # below the text block and the colour bar
    assert rgb.shape == (256, 256, 3) and rgb.dtype == np.uint8
    assert np.abs(lower[..., 0] - lower[..., 2]).max() <= 1


@pytest.mark.parametrize("shape", [(1, 1), (16, 16), (64, 64), (5, 300), (300, 5)])
def test_tiny_and_odd_images_render(shape: tuple[int, int]) -> None:
    rgb = render_heatmap_overlay(
        np.full(shape, 0.5, np.float32), hot_gradcam(), probability=0.9, threshold=0.5,
        model_name="test-model", model_version="1.2.3",
    )
    assert rgb.shape == (*shape, 3) and rgb.dtype == np.uint8
