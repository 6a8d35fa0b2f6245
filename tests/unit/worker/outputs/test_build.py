"""The SC and SR builders: dciodvfy-clean objects that say what the model said."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import UID

from cxr_contract.model import ModelInfo
from tests.dicom_outputs import MODEL, MODEL_V2, hot_gradcam, real_cr, synthetic_cr
from tests.helpers import dciodvfy_errors
from worker.decode import dataset_to_unit_image
from worker.errors import UnsupportedInput, WorkerError
from worker.input_check import UNIFORM
from worker.model import GATE_OOD_SCORE
from worker.outputs import (
    WITHHELD_TEXT,
    BuildSettings,
    Trust,
    build_report,
    build_secondary_capture,
    decision,
    faithfulness_line,
    output_uids,
    render_heatmap_overlay,
    render_withheld,
)

#: Uncompressed, so that the pixel tests below can compare exact values; the compressed SC
#: (the default) has its own tests in test_outputs.py.
SETTINGS = BuildSettings(sc_compression="none")
# RG1's Referring Physician "ward" is a one-component name; highdicom says so on every build.
pytestmark = pytest.mark.filterwarnings("ignore:The string \"ward\":UserWarning")


SOURCES = {"real": real_cr, "synthetic": synthetic_cr}


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


def redness(block: np.ndarray[Any, Any]) -> float:
    block = block.astype(np.float64)
    return float(block[..., 0].mean() - block[..., 2].mean())


def test_sc_hot_quadrant_is_red_and_a_negative_decision_has_no_colour(
    built: tuple[Dataset, float, Path, Path],
) -> None:
    _, probability, sc_path, _ = built
    px = pydicom.dcmread(sc_path).pixel_array.astype(np.float64)
    half_r, half_c = px.shape[0] // 2, px.shape[1] // 2
    hot, opposite = px[half_r:, half_c:], px[:half_r, :half_c]
    if probability >= MODEL.threshold:
        assert redness(hot) > redness(opposite) + 10, (redness(hot), redness(opposite))
    else:  # output.heatmap_for_negative = false: gray, no colour bar
        assert np.array_equal(px[..., 0], px[..., 2]) and np.array_equal(px[..., 0], px[..., 1])


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
    # The content tree references the image the model read; the SC is evidence only.
    assert images == {source.SOPInstanceUID}
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
    assert len(set(values)) == 6  # SC, SR and GSPS series and instances
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


# -- how far to trust an answer: the gate, the heatmap's scale, its faithfulness ---------------

def sr_items(sr: Dataset) -> list[Dataset]:
    return list(walk(sr.ContentSequence))


def coded(sr: Dataset, name: str) -> list[str]:
    """Meanings of the values of the CODE items named ``name`` (a viewer shows these words)."""
    return [str(i.ConceptCodeSequence[0].CodeMeaning) for i in sr_items(sr)
            if i.ValueType == "CODE" and code_of(i, "ConceptNameCodeSequence") == name]


def numbers(sr: Dataset, name: str) -> list[float]:
    return [float(i.MeasuredValueSequence[0].NumericValue) for i in sr_items(sr)
            if i.ValueType == "NUM" and code_of(i, "ConceptNameCodeSequence") == name]


def texts(sr: Dataset, name: str) -> list[str]:
    return [str(i.TextValue) for i in sr_items(sr)
            if i.ValueType == "TEXT" and code_of(i, "ConceptNameCodeSequence") == name]


def build_with(source: Dataset, probability: float, model: ModelInfo, trust: Trust, folder: Path,
               rgb: np.ndarray[Any, Any] | None = None) -> tuple[Dataset, Dataset, np.ndarray[Any, Any]]:
    """SC and SR as the pipeline builds them, saved and read back."""
    uids = output_uids(source, model.version)
    unit = dataset_to_unit_image(source)
    if rgb is None and trust.withheld:
        rgb = render_withheld(unit, reason=trust.gate_line(model), model_name=model.name,
                              model_version=model.version)
    elif rgb is None:
        rgb = render_heatmap_overlay(unit, hot_gradcam(), probability=probability, threshold=model.threshold,
                                     model_name=model.name, model_version=model.version,
                                     heatmap_scale=model.heatmap_scale, faithfulness=trust.faithfulness)
    sc = build_secondary_capture(source, rgb, uids, model, SETTINGS, trust=trust)
    sr = build_report(source, sc, probability, model, uids, SETTINGS, trust=trust)
    sc_path, sr_path = folder / "sc.dcm", folder / "sr.dcm"
    sc.save_as(sc_path, enforce_file_format=True)
    sr.save_as(sr_path, enforce_file_format=True)
    assert dciodvfy_errors(sc_path) == [] and dciodvfy_errors(sr_path) == []
    return pydicom.dcmread(sc_path), pydicom.dcmread(sr_path), rgb


@pytest.mark.parametrize("source", list(SOURCES))
def test_withheld_answer_has_no_heatmap_and_an_indeterminate_finding(source: str, tmp_path: Path) -> None:
    trust = Trust(ood_score=27.5, gate=GATE_OOD_SCORE, withheld=True)
    sc, sr, rgb = build_with(SOURCES[source](), 0.97, MODEL_V2, trust, tmp_path)
    px = sc.pixel_array
    # No colour anywhere: no heatmap, no colour bar; only the gray image and the text.
    assert np.array_equal(px[..., 0], px[..., 1]) and np.array_equal(px[..., 1], px[..., 2])
    gray = np.rint(dataset_to_unit_image(SOURCES[source]()) * 255).astype(np.uint8)
    assert not np.array_equal(px[..., 0], gray)  # the text is burned in
    assert WITHHELD_TEXT == "Outside the model's training distribution - no result"
    assert trust.gate_line(MODEL_V2) == "OOD score 27.5 > threshold 10"
    assert "without a result" in sc.DerivationDescription
    # The SR neither asserts nor denies pneumonia, and gives no probability.
    # Not Evaluated (373121007): the model's answer was not given, not an equivocal finding.
    assert coded(sr, "233604007") == ["Not Evaluated"]
    assert code_of(next(i for i in sr_items(sr) if code_of(i, "ConceptNameCodeSequence") == "233604007"),
                   "ConceptCodeSequence") == "373121007"
    assert numbers(sr, "PNEUMONIA-PROB") == []
    assert coded(sr, "OOD-STATUS") == ["Outside the model's training distribution"]
    assert coded(sr, "OOD-REASON") == ["Feature density score above threshold"]
    assert numbers(sr, "OOD-SCORE") == [pytest.approx(27.5)]
    assert numbers(sr, "OOD-THRESHOLD") == [pytest.approx(10.0)]
    assert numbers(sr, "HEATMAP-FAITH") == []


def test_input_check_gate_is_named_in_the_sr(tmp_path: Path) -> None:
    trust = Trust(gate=UNIFORM, withheld=True)  # a v1 model: no score, the input check alone
    _, sr, _ = build_with(synthetic_cr(), 0.4, MODEL, trust, tmp_path)
    assert coded(sr, "233604007") == ["Not Evaluated"]
    assert coded(sr, "OOD-STATUS") == ["Outside the model's training distribution"]
    assert coded(sr, "OOD-REASON") == ["Image nearly uniform"]
    assert numbers(sr, "OOD-SCORE") == []


def test_flagged_answer_keeps_the_finding_and_says_outside(tmp_path: Path) -> None:
    trust = Trust(ood_score=12.0, gate=GATE_OOD_SCORE, withheld=False, faithfulness=0.8)
    _, sr, _ = build_with(synthetic_cr(), 0.9, MODEL_V2, trust, tmp_path)
    assert coded(sr, "233604007") == ["Present"]
    assert numbers(sr, "PNEUMONIA-PROB") == [pytest.approx(0.9)]
    assert coded(sr, "OOD-STATUS") == ["Outside the model's training distribution"]
    assert numbers(sr, "HEATMAP-FAITH") == [pytest.approx(0.8)]
    assert coded(sr, "FAITH-VERDICT") == ["Not above chance"]


@pytest.mark.parametrize("source", list(SOURCES))
def test_answer_carries_heatmap_faithfulness_and_the_gate_it_passed(source: str, tmp_path: Path) -> None:
    trust = Trust(ood_score=3.25, faithfulness=-0.42)
    _, sr, _ = build_with(SOURCES[source](), 0.1, MODEL_V2, trust, tmp_path)
    assert coded(sr, "233604007") == ["Absent"]
    assert numbers(sr, "HEATMAP-FAITH") == [pytest.approx(-0.42)]
    assert numbers(sr, "FAITH-CUTOFF") == [pytest.approx(1.25)]
    assert coded(sr, "FAITH-VERDICT") == ["Not above chance"]
    # A passed gate says what it saw, not that the image is like the training data.
    assert coded(sr, "OOD-STATUS") == ["No out-of-distribution evidence detected"]
    assert texts(sr, "OOD-STATEMENT") == ["No out-of-distribution evidence detected (score 3.25, threshold 10)"]
    assert numbers(sr, "OOD-SCORE") == [pytest.approx(3.25)] and numbers(sr, "OOD-THRESHOLD") == [10.0]
    names = {code_of(i, "ConceptNameCodeSequence") for i in sr_items(sr)}
    assert "HEATMAP-FAITH" in names and "OOD-REASON" not in names


def test_v1_model_report_says_nothing_about_a_gate(tmp_path: Path) -> None:
    _, sr, _ = build_with(synthetic_cr(), 0.9, MODEL, Trust(), tmp_path)
    names = {code_of(i, "ConceptNameCodeSequence") for i in sr_items(sr)}
    assert not {"OOD-STATUS", "OOD-REASON", "OOD-SCORE", "OOD-THRESHOLD", "HEATMAP-FAITH"} & names
    assert coded(sr, "233604007") == ["Present"]


def test_trust_refuses_what_cannot_be_reported() -> None:
    with pytest.raises(WorkerError, match="withheld"):
        Trust(withheld=True)
    with pytest.raises(WorkerError, match="gate='why'"):
        Trust(gate="why")
    with pytest.raises(WorkerError, match="faithfulness=nan"):
        Trust(faithfulness=float("nan"))


def one_cell(value: float) -> np.ndarray[Any, Any]:
    cam = np.zeros((8, 8), np.float32)
    cam[6, 6] = value
    return cam


def test_fixed_heatmap_scale_keeps_a_barely_positive_cell_cold() -> None:
    image = np.full((256, 256), 0.5, np.float32)
    kw: dict[str, Any] = {"probability": 0.9, "threshold": 0.5, "model_name": "m", "model_version": "v"}
    cell = (slice(200, 216), slice(200, 216))  # the hot cell at [6, 6] of an 8 x 8 grid
    per_image = render_heatmap_overlay(image, one_cell(0.01), **kw)
    fixed = render_heatmap_overlay(image, one_cell(0.01), heatmap_scale=4.0, **kw)
    full = render_heatmap_overlay(image, one_cell(4.0), heatmap_scale=4.0, **kw)
    assert redness(per_image[cell]) > 40  # scaled by its own peak: drawn full red
    assert abs(redness(fixed[cell])) < 3  # 0.01 of a scale of 4: stays gray-blue, not red
    assert redness(full[cell]) > 40


def test_negative_decision_is_painted_only_when_configured() -> None:
    image = np.full((256, 256), 0.5, np.float32)
    kw: dict[str, Any] = {"probability": 0.2, "threshold": 0.5, "model_name": "m", "model_version": "v",
                          "heatmap_scale": 4.0}
    plain = render_heatmap_overlay(image, hot_gradcam(), **kw)
    painted = render_heatmap_overlay(image, hot_gradcam(), paint_negative=True, **kw)
    assert np.array_equal(plain[..., 0], plain[..., 2])
    assert redness(painted[160:, 160:]) > 10


def test_faithfulness_is_printed_beside_the_probability() -> None:
    image = np.full((256, 512), 0.5, np.float32)
    kw: dict[str, Any] = {"probability": 0.9, "threshold": 0.5, "model_name": "m", "model_version": "v",
                          "heatmap_scale": 4.0}
    without = render_heatmap_overlay(image, hot_gradcam(), **kw)
    with_it = render_heatmap_overlay(image, hot_gradcam(), faithfulness=1.5, faithfulness_cutoff=1.2, **kw)
    assert not np.array_equal(without, with_it)
    # No cut-off (a model exported before it): no statement, rather than an uncalibrated one.
    assert np.array_equal(without, render_heatmap_overlay(image, hot_gradcam(), faithfulness=1.5, **kw))
    assert faithfulness_line(1.5, 1.2) == "Heatmap faithfulness: above chance (z +1.50, cut-off 1.20)"
    assert faithfulness_line(-0.2, 1.2) == "Heatmap faithfulness: not above chance (z -0.20, cut-off 1.20)"
    # Printed at a precision that shows the side of the cut-off the verdict is on.
    assert faithfulness_line(1.2004, 1.2) == "Heatmap faithfulness: above chance (z +1.2004, cut-off 1.2000)"


# -- the probability at a prevalence, and a gate that says what it knows ------------------------

def test_sr_gives_the_prevalence_the_probability_assumes(tmp_path: Path) -> None:
    model = dataclasses.replace(MODEL_V2, prevalence=0.5, reported_prevalence=0.1, threshold=0.1234)
    _, sr, _ = build_with(synthetic_cr(), 0.12345, model, Trust(ood_score=1.0), tmp_path)
    assert numbers(sr, "PNEUMONIA-PROB") == [pytest.approx(0.12345)]
    assert numbers(sr, "PREVALENCE") == [pytest.approx(10.0)]
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []


def test_model_without_known_prevalence_states_none(tmp_path: Path) -> None:
    _, sr, _ = build_with(synthetic_cr(), 0.7, MODEL, Trust(), tmp_path)
    assert numbers(sr, "PREVALENCE") == [] and texts(sr, "OOD-STATEMENT") == []


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_ood_score_is_said_on_the_sc_and_in_the_sr(value: str, tmp_path: Path) -> None:
    trust = Trust(gate=GATE_OOD_SCORE, withheld=True, ood_not_finite=value)
    assert trust.gate_line(MODEL_V2) == f"OOD score not finite ({value}): the input could not be scored"
    _, sr, _ = build_with(synthetic_cr(), 0.4, MODEL_V2, trust, tmp_path)
    assert texts(sr, "OOD-STATEMENT") == [
        f"Out-of-distribution score not finite ({value}): the input could not be scored, so it is treated as "
        "outside the model's training distribution"]
    assert coded(sr, "233604007") == ["Not Evaluated"] and numbers(sr, "OOD-SCORE") == []


def test_ood_numbers_printed_apart_when_close() -> None:
    trust = Trust(ood_score=10.0004, gate=GATE_OOD_SCORE)
    assert trust.gate_line(MODEL_V2) == "OOD score 10.0004 > threshold 10"
