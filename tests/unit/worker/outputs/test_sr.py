"""The SR builder: a TID 1500 report that says what the model said, how far to trust it, and
at which prevalence."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from tests.dicom_outputs import MODEL, MODEL_V2, synthetic_cr
from tests.helpers import dciodvfy_errors
from tests.unit.worker.outputs.builders import (
    SETTINGS,
    SOURCES,
    build_with,
    code_of,
    coded,
    numbers,
    sr_items,
    texts,
    walk,
)
from worker.decode import dataset_to_unit_image
from worker.input_check import UNIFORM
from worker.model import GATE_OOD_SCORE
from worker.outputs import (
    WITHHELD_TEXT,
    Trust,
)

# RG1's Referring Physician "ward" is a one-component name; highdicom says so on every build.
pytestmark = pytest.mark.filterwarnings("ignore:The string \"ward\":UserWarning")


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
