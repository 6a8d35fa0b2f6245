"""The Secondary Capture builder: the overlay in the source's study, referencing it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from tests.dicom_outputs import MODEL, real_cr, synthetic_cr
from tests.unit.worker.outputs.builders import (
    SETTINGS,
    redness,
)
from worker.errors import UnsupportedInput
from worker.outputs import (
    build_secondary_capture,
    output_uids,
)

# RG1's Referring Physician "ward" is a one-component name; highdicom says so on every build.
pytestmark = pytest.mark.filterwarnings("ignore:The string \"ward\":UserWarning")


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
