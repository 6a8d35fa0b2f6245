"""The Grad-CAM outline as a Grayscale Softcopy Presentation State, and the IHE AIR Evidence
Creator items every output object carries (Contributing Equipment against the SR's TID 4019)."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import Dataset

from tests.dicom_outputs import MODEL, MODEL_V2, hot_gradcam, real_cr, synthetic_cr
from tests.helpers import dciodvfy_errors, require_tool
from trainer.phantoms import make_phantom
from worker import __version__
from worker.config import Settings
from worker.errors import WorkerError
from worker.model import GATE_OOD_SCORE
from worker.outputs import (
    BuildSettings,
    Trust,
    build_presentation_state,
    build_report,
    build_secondary_capture,
    output_uids,
    render_heatmap_overlay,
)
from worker.outputs.gsps import HEATMAP_LAYER, LEVELS, MAX_POINTS, heat_contours

pytestmark = [pytest.mark.tool, pytest.mark.filterwarnings("ignore:The string \"ward\":UserWarning")]
SETTINGS = BuildSettings()


def phantom_cr(rows: int, cols: int, *, monochrome1: bool = False) -> tuple[Dataset, np.ndarray[Any, Any]]:
    """A phantom with one opacity in one lung, as a CR of ``rows`` x ``cols``; its opacity mask."""
    for seed in range(200):
        image, mask = make_phantom(np.random.default_rng(seed), 128, True)
        xs = np.nonzero(mask)[1]
        if mask.sum() > 60 and (xs.max() < 64 or xs.min() >= 64):  # the whole opacity on one side
            break
    image = cv2.resize(image, (cols, rows), interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask.astype(np.uint8), (cols, rows), interpolation=cv2.INTER_NEAREST).astype(bool)
    ds = synthetic_cr()
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    if monochrome1:
        image = 255 - image
        ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PixelData = image.tobytes()
    return ds, mask


def found(mask: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The 7 x 7 Grad-CAM map of a model that found the opacity: its cover of each cell,
    at full colour (MODEL_V2's fixed heatmap scale) where a cell is half covered."""
    cover = cv2.resize(mask.astype(np.float32), (7, 7), interpolation=cv2.INTER_AREA)
    return (cover * 2.0).clip(0, 1) * MODEL_V2.heatmap_scale  # type: ignore[operator]


def render(source: Path, pstate: Path | None, out: Path) -> np.ndarray[Any, Any]:
    """DCMTK's rendering of ``source`` under the presentation state (its default one when None)."""
    tool = require_tool("/usr/bin/dcmp2pgm")
    run = subprocess.run([tool, *(["-p", str(pstate)] if pstate else []), str(source), str(out)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return np.asarray(Image.open(out))


def drawn(gsps: Dataset, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    """The outline as a viewer draws it, one pixel wide: GraphicData (column, row) read back."""
    canvas = np.zeros(shape[:2], np.uint8)
    for annotation in gsps.GraphicAnnotationSequence:
        if annotation.GraphicLayer != HEATMAP_LAYER:
            continue
        for obj in annotation.GraphicObjectSequence:
            points = np.asarray(obj.GraphicData, np.float64).reshape(-1, 2) - 0.5  # corner -> pixel centre
            cv2.polylines(canvas, [np.rint(points).astype(np.int32)], True, 255, 1)
    return canvas > 0


@pytest.mark.parametrize("monochrome1", [False, True], ids=["monochrome2", "monochrome1"])
def test_dcmp2pgm_renders_the_source_under_the_gsps_with_the_outline_on_the_opacity(
        monochrome1: bool, tmp_path: Path) -> None:
    rows, cols = 96, 128  # not square: rows and columns must not be swapped
    source, mask = phantom_cr(rows, cols, monochrome1=monochrome1)
    source.save_as(tmp_path / "source.dcm", enforce_file_format=True)
    header = pydicom.dcmread(tmp_path / "source.dcm", stop_before_pixels=True)  # what the pipeline keeps
    cam = found(mask)
    gsps = build_presentation_state(header, cam, 0.9, MODEL_V2, output_uids(source, MODEL_V2.version), SETTINGS)
    gsps.save_as(tmp_path / "gsps.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "gsps.dcm") == []
    shown = render(tmp_path / "source.dcm", tmp_path / "gsps.dcm", tmp_path / "gsps.pgm")
    # The presentation state shows the image as its own photometric interpretation says
    # (a MONOCHROME1 source is not negated), at the source's size.
    assert shown.shape == (rows, cols)
    assert np.array_equal(shown, render(tmp_path / "source.dcm", None, tmp_path / "default.pgm"))
    outline = drawn(pydicom.dcmread(tmp_path / "gsps.dcm"), shown.shape)
    assert outline.any()
    # The outline runs where the map is hot: within a pixel of the 50 % level or above it.
    heat = cv2.resize(cam / MODEL_V2.heatmap_scale, (cols, rows), interpolation=cv2.INTER_LINEAR)
    near = cv2.dilate(heat, np.ones((3, 3), np.uint8))
    assert near[outline].min() >= min(LEVELS) - 0.05
    # ... around the opacity, and nowhere on the opposite side of the chest.
    side = np.nonzero(mask)[1].mean() < cols / 2
    ys, xs = np.nonzero(outline)
    assert ((xs < cols / 2) == side).all()
    centre = np.rint(np.argwhere(mask).mean(axis=0)).astype(int)
    inner = np.zeros_like(outline, np.uint8)
    for obj in gsps.GraphicAnnotationSequence[0].GraphicObjectSequence:
        pts = np.rint(np.asarray(obj.GraphicData, float).reshape(-1, 2) - 0.5).astype(np.int32)
        cv2.fillPoly(inner, [pts], 1)
    assert inner[centre[0], centre[1]] == 1


def test_contours_are_closed_smooth_bounded_and_in_pixel_coordinates() -> None:
    rng = np.random.default_rng(3)
    cam = cv2.GaussianBlur(rng.random((7, 7)).astype(np.float32), (0, 0), 0.8) * 4
    rows, cols = 1955, 1841  # the real CR's size: many pixels per Grad-CAM cell
    contours = heat_contours(cam, rows, cols, heatmap_scale=float(cam.max()))
    assert {level for level, _ in contours} == set(LEVELS)
    for _, points in contours:
        assert 4 <= len(points) <= MAX_POINTS and np.array_equal(points[0], points[-1])
        assert (points[:, 0] >= 0).all() and (points[:, 0] <= cols).all()
        assert (points[:, 1] >= 0).all() and (points[:, 1] <= rows).all()
        # No pixel staircase: most segments run neither along a row nor along a column.
        steps = np.diff(points, axis=0)
        assert np.mean((np.abs(steps) < 1e-6).any(axis=1)) < 0.5
    # A map below every level has nothing to outline; one that is not 2-D is refused.
    assert heat_contours(np.full((7, 7), 0.1), 64, 64, heatmap_scale=4.0) == []
    with pytest.raises(WorkerError, match="2-D"):
        heat_contours(np.zeros((2, 7, 7)), 64, 64, heatmap_scale=4.0)


def test_a_withheld_answer_gets_no_gsps() -> None:
    source = synthetic_cr()
    trust = Trust(ood_score=30.0, gate=GATE_OOD_SCORE, withheld=True)
    with pytest.raises(WorkerError, match="withheld"):
        build_presentation_state(source, hot_gradcam(), 0.9, MODEL_V2, output_uids(source, "2.0.0"), SETTINGS,
                                 trust=trust)


def test_the_text_says_what_the_sc_says_of_a_flagged_answer_and_its_faithfulness(tmp_path: Path) -> None:
    """An answer the gate flagged (``model.ood_action = "flag"``) is outlined over the reader's own
    image: the GSPS's text carries the warning, and the faithfulness verdict, as the SC does."""
    source = synthetic_cr()
    model = dataclasses.replace(MODEL_V2, faithfulness_cutoff=2.5)
    trust = Trust(ood_score=99.0, gate=GATE_OOD_SCORE, faithfulness=0.4)
    gsps = build_presentation_state(source, hot_gradcam(), 0.9, model, output_uids(source, "2"), SETTINGS,
                                    trust=trust)
    gsps.save_as(tmp_path / "gsps.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "gsps.dcm") == []
    texts = [t.UnformattedTextValue for a in pydicom.dcmread(tmp_path / "gsps.dcm").GraphicAnnotationSequence
             for t in a.get("TextObjectSequence", [])]
    assert len(texts) == 1
    assert "WARNING: outside the model's training distribution" in texts[0]
    assert "Heatmap faithfulness: not above chance" in texts[0]
    assert "AI-generated - not for diagnostic use" in texts[0]
    plain = build_presentation_state(source, hot_gradcam(), 0.9, MODEL_V2, output_uids(source, "2"), SETTINGS)
    plain_text = [t.UnformattedTextValue for a in plain.GraphicAnnotationSequence
                  for t in a.get("TextObjectSequence", [])][0]
    assert "WARNING" not in plain_text and "faithfulness" not in plain_text


def test_a_long_model_name_still_makes_a_valid_gsps(tmp_path: Path) -> None:
    """Descriptions that name the model are LO (64 characters): a long name must not break them."""
    source = synthetic_cr()
    model = dataclasses.replace(MODEL_V2, name="a-model-name-of-sixty-four-characters-".ljust(64, "x"))
    gsps = build_presentation_state(source, hot_gradcam(), 0.9, model, output_uids(source, "2"), SETTINGS)
    gsps.save_as(tmp_path / "gsps.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "gsps.dcm") == []


def test_gsps_is_on_by_default_and_can_be_turned_off() -> None:
    assert Settings().output.gsps is True
    assert Settings(output={"gsps": False}).output.gsps is False


# -- IHE AIR: Contributing Equipment on every object, equal to the SR's TID 4019 ----------------

def outputs(source: Dataset, model: Any, folder: Path) -> dict[str, Dataset]:
    uids = output_uids(source, model.version)
    rgb = render_heatmap_overlay(np.full((int(source.Rows), int(source.Columns)), 0.5), hot_gradcam(),
                                 probability=0.9, threshold=model.threshold, model_name=model.name,
                                 model_version=model.version, heatmap_scale=model.heatmap_scale)
    sc = build_secondary_capture(source, rgb, uids, model, SETTINGS)
    built = {"sc": sc, "sr": build_report(source, sc, 0.9, model, uids, SETTINGS),
             "gsps": build_presentation_state(source, hot_gradcam(), 0.9, model, uids, SETTINGS)}
    for name, ds in built.items():  # read back as a receiver sees them
        ds.save_as(folder / f"{name}.dcm", enforce_file_format=True)
        assert dciodvfy_errors(folder / f"{name}.dcm") == [], name
    return {name: pydicom.dcmread(folder / f"{name}.dcm") for name in built}


def tid_4019(sr: Dataset) -> dict[str, str]:
    """Algorithm Name (111001) and Version (111003) of the SR's measurement group, and the
    observer Device UID (121012)."""
    values: dict[str, str] = {}

    def walk(items: Any) -> None:
        for item in items:
            code = item.ConceptNameCodeSequence[0].CodeValue
            if code in ("111001", "111003", "121012"):
                values[code] = str(item.get("TextValue") or item.get("UID"))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return values


@pytest.mark.parametrize("make", [real_cr, synthetic_cr], ids=["rg1", "synthetic"])
def test_every_object_names_the_algorithm_as_its_tid_4019_does(make: Any, tmp_path: Path) -> None:
    built = outputs(make(), MODEL_V2, tmp_path)
    algorithm = tid_4019(built["sr"])
    assert algorithm["111001"] == MODEL_V2.name and algorithm["111003"] == MODEL_V2.version
    for name, ds in built.items():
        (equipment,) = ds.ContributingEquipmentSequence
        purpose = equipment.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM"), name
        assert equipment.Manufacturer == SETTINGS.manufacturer
        assert equipment.ManufacturerModelName == algorithm["111001"], name
        assert list(equipment.SoftwareVersions) == [algorithm["111003"], f"cxr-gradcam {__version__}"], name
        assert equipment.DeviceUID == algorithm["121012"], name  # the SR's observer device


def test_the_device_uid_changes_with_the_model_and_only_with_it(tmp_path: Path) -> None:
    source = synthetic_cr()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    v1 = outputs(source, MODEL, tmp_path / "a")["sr"].ContributingEquipmentSequence[0].DeviceUID
    v2 = outputs(source, MODEL_V2, tmp_path / "b")["sr"].ContributingEquipmentSequence[0].DeviceUID
    again = outputs(synthetic_cr(), MODEL_V2, tmp_path / "b")["sc"].ContributingEquipmentSequence[0].DeviceUID
    assert v1 != v2 and v2 == again
