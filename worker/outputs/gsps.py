"""The Grad-CAM outline over the original image: one Grayscale Softcopy Presentation State, as
:mod:`highdicom.pr`.

A viewer that supports GSPS shows the radiologist's own image with the hot region outlined and
the result written beside it, in graphic layers the reader switches off like any annotation.
The Secondary Capture stays for viewers without GSPS.
"""

from __future__ import annotations

from typing import Any

import contourpy
import cv2
import highdicom as hd
import numpy as np
from pydicom import Dataset

from cxr_contract.model import ModelInfo
from worker.errors import UnsupportedInput, WorkerError
from worker.outputs.common import (
    BuildSettings,
    OutputUIDs,
    Trust,
    add_contributing_equipment,
    as_reference,
    check_probability,
    decision,
)
from worker.outputs.render import faithfulness_line, probability_lines

#: Outline levels as fractions of the model's fixed heatmap scale (the SC's colour bar):
#: 0.5 is the SC's green-yellow, 0.75 its orange-red.
LEVELS = (0.5, 0.75)
#: Contours are traced on the map resized to at most this many cells along the longer side:
#: bilinear in between, so a 7 x 7 Grad-CAM grid gives curves, not the staircase of its cells.
GRID = 128
#: At most this many points per contour (DICOM allows more; viewers draw fewer faster).
MAX_POINTS = 300
HEATMAP_LAYER = "AI HEATMAP"
TEXT_LAYER = "AI RESULT"
#: CIELab display colours (PS3.3 C.10.7.1.1): yellow for the outline, white for the text.
_YELLOW = hd.color.CIELabColor(97.1, -21.6, 94.5)
_WHITE = hd.color.CIELabColor(100.0, 0.0, 0.0)


def heat_contours(gradcam: np.ndarray[Any, Any], rows: int, columns: int, heatmap_scale: float | None,
                  levels: tuple[float, ...] = LEVELS) -> list[tuple[float, np.ndarray[Any, Any]]]:
    """Closed contours of the Grad-CAM map stretched over the whole source image.

    The decoder neither crops nor pads: the model saw the whole image squeezed to its input
    size, so the map covers the source edge to edge, as on the SC.

    Args:
        gradcam: Raw Grad-CAM map [h, w] >= 0 at the model's feature resolution.
        rows, columns: The source's Rows and Columns.
        heatmap_scale: The raw value drawn as full colour on the SC; None: the map's own peak.
        levels: Fractions of ``heatmap_scale`` to outline.

    Returns:
        (level, points) pairs; points are float [n, 2] (column, row) in the source's pixel
        coordinates (PS3.3 C.10.5.1.2: 0\\0 is the image's top left corner, the first pixel's
        centre is 0.5\\0.5), first point equal to the last, at most :data:`MAX_POINTS`.
    """
    cam = np.nan_to_num(np.asarray(gradcam, np.float32), nan=0.0, posinf=0.0).clip(min=0.0)
    if cam.ndim != 2 or 0 in cam.shape or rows < 1 or columns < 1:
        raise UnsupportedInput(f"expected a 2-D Grad-CAM map and an image size. Received: gradcam shape={cam.shape}, "
                               f"rows={rows}, columns={columns}")
    scale = heatmap_scale if heatmap_scale is not None else float(cam.max())
    if not scale > 0:
        return []
    factor = min(1.0, GRID / max(rows, columns))
    grid_h, grid_w = max(2, round(rows * factor)), max(2, round(columns * factor))
    heat = cv2.resize(cam / scale, (grid_w, grid_h), interpolation=cv2.INTER_LINEAR)
    # A cold border closes every contour that reaches the image's edge.
    padded = np.pad(heat, 1, constant_values=-1.0).astype(np.float64)
    generator = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate)
    cell_x, cell_y = columns / grid_w, rows / grid_h
    out = []
    for level in levels:
        lines: list[np.ndarray[Any, Any]] = generator.lines(level)  # type: ignore[assignment]  # LineType.Separate
        for line in lines:
            # Grid cell i's centre is pixel coordinate (i + 0.5) * cell; the pad shifts i by one.
            points = np.column_stack([(line[:, 0] - 0.5) * cell_x, (line[:, 1] - 0.5) * cell_y])
            points[:, 0] = points[:, 0].clip(0.0, columns)
            points[:, 1] = points[:, 1].clip(0.0, rows)
            simple = _simplify(points, max(cell_x, cell_y) * 0.25)
            if len(simple) >= 4:  # a triangle at least, closed
                out.append((level, simple))
    return out


def _simplify(points: np.ndarray[Any, Any], epsilon: float) -> np.ndarray[Any, Any]:
    """Douglas-Peucker (OpenCV) within ``epsilon`` pixels, coarser until :data:`MAX_POINTS` fit."""
    ring = points[:-1].astype(np.float32).reshape(-1, 1, 2)
    while True:
        simple = cv2.approxPolyDP(ring, epsilon, closed=True).reshape(-1, 2)
        if len(simple) < MAX_POINTS:
            return np.vstack([simple, simple[:1]]).astype(np.float64)
        epsilon *= 2


def result_text(probability: float, model: ModelInfo, trust: Trust | None = None) -> str:
    """The text object: what the SC says beside its heatmap, in one line: probability (at the
    prevalence it assumes), decision, the gate's warning on a flagged answer, the faithfulness
    verdict where one is stated, the model and the AI nature."""
    call = "POSITIVE" if decision(probability, model.threshold) else "NEGATIVE"
    line, t = probability_lines(probability, model.threshold, model.assumed_prevalence)
    parts = [f"{line}; {call} (threshold {t})"]
    if trust is not None and trust.gate is not None:
        parts.append(f"WARNING: outside the model's training distribution ({trust.gate_line(model)})")
    if trust is not None and trust.faithfulness is not None and model.faithfulness_cutoff is not None:
        parts.append(faithfulness_line(trust.faithfulness, model.faithfulness_cutoff))
    parts += [f"model {model.name} {model.version}", "AI-generated - not for diagnostic use"]
    return "; ".join(parts)


def build_presentation_state(
    source: Dataset, gradcam: np.ndarray[Any, Any], probability: float, model: ModelInfo, uids: OutputUIDs,
    settings: BuildSettings, *, trust: Trust | None = None,
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """A GSPS on the source that outlines the Grad-CAM map at :data:`LEVELS` and states the result.

    Args:
        source: The image the model read (its header is enough: no pixels are read).
        gradcam: Raw Grad-CAM map [h, w] >= 0 at the model's feature resolution.
        probability: Model output in [0, 1].
        model, uids, settings: The model, output UIDs (``gsps_*``), site choices.
        trust: Gate of this answer; a withheld answer has no heatmap, hence no GSPS.

    Raises:
        WorkerError: a withheld answer, a probability outside [0, 1] or UIDs without GSPS ones.
        UnsupportedInput: a map that is not 2-D.
    """
    trust = trust or Trust()
    check_probability(probability, model.threshold)
    if trust.withheld:
        raise WorkerError("a withheld answer has no heatmap to outline. Received: trust.withheld=True")
    if not uids.gsps_series or not uids.gsps_instance:
        raise WorkerError("output UIDs without GSPS UIDs. Received: gsps_instance=''")
    rows, cols = int(source.Rows), int(source.Columns)
    reference = as_reference(source)
    contours = heat_contours(gradcam, rows, cols, model.heatmap_scale)
    heat_layer = hd.pr.GraphicLayer(
        layer_name=HEATMAP_LAYER, order=1, display_color=_YELLOW,
        description=f"AI Grad-CAM heatmap at {' and '.join(f'{v:.0%}' for v in LEVELS)} of its scale",
    )
    text_layer = hd.pr.GraphicLayer(layer_name=TEXT_LAYER, order=2, display_color=_WHITE,
                                     description="AI result: probability and decision")
    margin = max(2.0, round(min(rows, cols) * 0.015))
    text = hd.pr.TextObject(
        text_value=result_text(probability, model, trust), units=hd.pr.AnnotationUnitsValues.PIXEL,
        bounding_box=(margin, margin, cols - margin, margin + max(8.0, rows * 0.06)),
    )
    annotations = [hd.pr.GraphicAnnotation(referenced_images=[reference], graphic_layer=text_layer,
                                           text_objects=[text])]
    if contours:
        annotations.insert(0, hd.pr.GraphicAnnotation(
            referenced_images=[reference], graphic_layer=heat_layer,
            graphic_objects=[hd.pr.GraphicObject(graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                                                 graphic_data=points, units=hd.pr.AnnotationUnitsValues.PIXEL)
                             for _, points in contours],
        ))
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[reference], series_instance_uid=uids.gsps_series, series_number=settings.gsps_series_number,
        sop_instance_uid=uids.gsps_instance, instance_number=1, manufacturer=settings.manufacturer,
        manufacturer_model_name=model.name, software_versions=model.version,
        device_serial_number="", content_label="AI_HEATMAP",
        content_description=f"AI Grad-CAM outline, {model.name} {model.version}"[:64],  # LO: 64 characters
        graphic_annotations=annotations, graphic_layers=[heat_layer, text_layer],
        institution_name=settings.institution_name,
        # P-values run dark to light; a MONOCHROME1 source runs light to dark, so its
        # presentation LUT inverts (PS3.3 C.11.6.1.2). highdicom's default would show it negated.
        presentation_lut_transformation=hd.PresentationLUTTransformation(
            presentation_lut_shape=hd.PresentationLUTShapeValues.INVERSE
            if source.get("PhotometricInterpretation") == "MONOCHROME1" else hd.PresentationLUTShapeValues.IDENTITY),
    )
    gsps.SeriesDescription = settings.gsps_series_description
    # Laterality is Type 2C in General Series (PS3.3 C.7.3.1): the source's side when it has one,
    # absent for an unpaired body part such as the chest (said by Body Part Examined), else
    # empty, which the standard reserves for "unknown".
    laterality = str(source.get("Laterality") or "")
    if "BodyPartExamined" in source:
        gsps.BodyPartExamined = source.BodyPartExamined
    if laterality in ("R", "L"):
        gsps.Laterality = laterality
    elif str(source.get("BodyPartExamined", "")).upper() != "CHEST":
        gsps.Laterality = ""
    add_contributing_equipment(gsps, model, settings)
    # A presentation state has no Content Date/Time; Series Date/Time (Type 3) say when it was made.
    gsps.SeriesDate, gsps.SeriesTime = gsps.PresentationCreationDate, gsps.PresentationCreationTime
    return gsps
