"""Build the two answers to one chest X-ray: a Grad-CAM Secondary Capture and a TID 1500 SR.

One builder per output object, as in :mod:`highdicom.sc` and :mod:`highdicom.sr`: each takes
the source dataset, rejects bad input before building anything, and returns an object that
dciodvfy accepts without errors.
"""

from __future__ import annotations

import copy
import functools
import io
import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import cv2
import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from PIL import Image
from pydicom import Dataset
from pydicom.encaps import encapsulate
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import JPEG2000, PYDICOM_ROOT_UID, ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from pydicom.valuerep import DA, TM

from cxr_contract import faithfulness as faith
from cxr_contract.model import ModelInfo
from worker.config import OutputSection
from worker.errors import UnsupportedInput, WorkerError
from worker.input_check import CLIPPED, UNIFORM, describe
from worker.model import GATE_OOD_SCORE

#: The model reads one frontal view, so the procedure is a single-view chest radiograph.
CHEST_XR_SINGLE_VIEW = Code("36554-4", "LN", "XR Chest Single view")
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("2667000", "SCT", "Absent")
#: No standard concept names "probability of pneumonia"; a "99" scheme is private by
#: definition (PS3.3 8.2) and is declared in the SR's Coding Scheme Identification Sequence.
PRIVATE_SCHEME = "99CXR"
PNEUMONIA_PROBABILITY = Code("PNEUMONIA-PROB", PRIVATE_SCHEME, "Probability of pneumonia")
#: The finding's value when the model is not asked: SNOMED CT's qualifier "Indeterminate".
INDETERMINATE = Code("82334004", "SCT", "Indeterminate")
#: Whether the image is inside what the model was trained on. No standard concept exists for
#: an algorithm's training distribution, so these are private (scheme 99CXR, see docs/conformance.md);
#: a viewer shows the value's meaning, which is the sentence itself.
TRAINING_DISTRIBUTION = Code("OOD-STATUS", PRIVATE_SCHEME, "Relation to model's training distribution")
OUTSIDE_DISTRIBUTION = Code("OOD-OUTSIDE", PRIVATE_SCHEME, "Outside the model's training distribution")
WITHIN_DISTRIBUTION = Code("OOD-WITHIN", PRIVATE_SCHEME, "Within the model's training distribution")
OOD_EVIDENCE = Code("OOD-REASON", PRIVATE_SCHEME, "Out-of-distribution evidence")
OOD_REASONS = {
    GATE_OOD_SCORE: Code("OOD-SCORE-HIGH", PRIVATE_SCHEME, "Feature density score above threshold"),
    UNIFORM: Code("INPUT-UNIFORM", PRIVATE_SCHEME, "Image nearly uniform"),
    CLIPPED: Code("INPUT-CLIPPED", PRIVATE_SCHEME, "Image mostly black or white"),
}
OOD_SCORE = Code("OOD-SCORE", PRIVATE_SCHEME, "Out-of-distribution score")
OOD_THRESHOLD = Code("OOD-THRESHOLD", PRIVATE_SCHEME, "Out-of-distribution threshold")
#: cxr_contract.faithfulness: logit drop for the heatmap's hottest cells minus that for random cells.
HEATMAP_FAITHFULNESS = Code("HEATMAP-FAITH", PRIVATE_SCHEME, "Heatmap faithfulness")
#: The first line of a withheld SC, and what the SR says in words.
WITHHELD_TEXT = "Outside the model's training distribution - no result"

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_BLACK = (0, 0, 0)
_ORIENTATION = re.compile(r"[APRLHF]{1,3}")


@dataclass(frozen=True)
class OutputUIDs:
    """UIDs of the two output series and instances for one source image."""

    sc_series: str
    sc_instance: str
    sr_series: str
    sr_instance: str


#: Site choices for the output objects: the ``[output]`` section of the config itself.
BuildSettings = OutputSection


@dataclass(frozen=True)
class Trust:
    """How far to trust one answer: what the SC and SR say beside the probability.

    Attributes:
        ood_score: The model's out-of-distribution score (None: a v1 model has none).
        gate: Why the image is outside the training distribution (``GATE_OOD_SCORE``,
            ``input_check.UNIFORM`` or ``CLIPPED``), None when it is not.
        withheld: The gate fired and the site withholds the answer (``model.ood_action``).
        faithfulness: Heatmap faithfulness in logit units (None: not computed).
    """

    ood_score: float | None = None
    gate: str | None = None
    withheld: bool = False
    faithfulness: float | None = None

    def __post_init__(self) -> None:
        if self.gate is not None and self.gate not in OOD_REASONS:
            raise WorkerError(f"unknown gate reason. Received: gate={self.gate!r}")
        if self.withheld and self.gate is None:
            raise WorkerError("an answer can only be withheld for a gate reason. Received: gate=None")
        for name in ("ood_score", "faithfulness"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise WorkerError(f"{name} must be finite. Received: {name}={value!r}")

    def gate_line(self, model: ModelInfo) -> str:
        """Why the gate fired, in one line for the SC."""
        if self.gate == GATE_OOD_SCORE and self.ood_score is not None and model.ood_threshold is not None:
            return f"OOD score {self.ood_score:.3g} > threshold {model.ood_threshold:.3g}"
        return describe(self.gate) if self.gate else ""


def faithfulness_line(value: float) -> str:
    return f"Heatmap faithfulness: {'high' if faith.is_high(value) else 'low'} ({value:+.2f})"


def decision(probability: float, threshold: float) -> bool:
    """Whether the model calls pneumonia: at or above the threshold is positive."""
    return probability >= threshold


def _derived_uid(prefix: str | None, *parts: str) -> str:
    # generate_uid ignores entropy_srcs when prefix is None (random 2.25 UID) and joins
    # the sources without a separator ("ab"+"c" == "a"+"bc"), so supply both ourselves.
    entropy = "\x1f".join(("cxr-gradcam", *parts))
    return str(generate_uid(prefix=prefix or PYDICOM_ROOT_UID, entropy_srcs=[entropy]))


def output_uids(source: Dataset, model_version: str, prefix: str | None = None) -> OutputUIDs:
    """Deterministic output UIDs, so that a resend after a crash is a recognisable duplicate.

    Args:
        source: The image the answer is about.
        model_version: Version of the model; a new version gives new objects.
        prefix: UID root ending in "."; pydicom's root when None.
    """
    series, instance = str(source.SeriesInstanceUID), str(source.SOPInstanceUID)
    return OutputUIDs(
        sc_series=_derived_uid(prefix, series, model_version, "sc"),
        sc_instance=_derived_uid(prefix, instance, model_version, "sc"),
        sr_series=_derived_uid(prefix, series, model_version, "sr"),
        sr_instance=_derived_uid(prefix, instance, model_version, "sr"),
    )


def _check_probability(probability: float, threshold: float) -> None:
    for name, value in (("probability", probability), ("threshold", threshold)):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise WorkerError(f"{name} must be in [0, 1]. Received: {name}={value!r}")


def _jet(heat: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """[0, 1] heat -> uint8 RGB with Jet (red = high); OpenCV colour maps are BGR."""
    bgr = cv2.applyColorMap(np.rint(np.clip(heat, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _text_boxes(rgb_shape: tuple[int, ...], items: list[tuple[str, int, int]], scale: float,
                thickness: int, reach: int) -> list[tuple[int, int, int, int]]:
    """Disjoint boxes (x0, y0, x1, y1), inside the image, that hold every item's ink and halo.

    Boxes that touch are merged, so no pixel's halo or ink is drawn twice.
    """
    rows, cols = rgb_shape[:2]
    boxes = []
    for text, x, y in items:
        (w, h), base = cv2.getTextSize(text, _FONT, scale, thickness)
        boxes.append([x - reach, y - h - reach, x + w + reach, y + base + reach])
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                if a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]:
                    boxes[i] = [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])]
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    out = []
    for x0, y0, x1, y1 in boxes:
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(cols, x1), min(rows, y1)
        if x1 > x0 and y1 > y0:
            out.append((x0, y0, x1, y1))
    return out


def _draw_text(rgb: np.ndarray[Any, Any], items: list[tuple[str, int, int]], scale: float) -> None:
    """White text with a dark halo, in place; items are (text, x, baseline y).

    Drawn only inside the boxes around the text (a few percent of a radiograph): every
    pixel outside them would come out unchanged, and the float blend below is the most
    expensive step of an SC when run over the whole image.
    """
    thickness = max(1, round(scale * 1.5))
    # The halo is a dilated mask, not a thicker black pass: OpenCV 5 draws Hershey names with
    # a vector font whose outline ignores thickness. It makes the text read on bone and heat.
    radius = max(1, round(scale * 1.5))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    # Anti-aliased strokes reach about a thickness past the size getTextSize reports.
    for x0, y0, x1, y1 in _text_boxes(rgb.shape, items, scale, thickness, reach=radius + 2 * thickness + 2):
        region = rgb[y0:y1, x0:x1]
        mask = np.zeros(region.shape[:2], np.uint8)
        for text, x, y in items:
            cv2.putText(mask, text, (x - x0, y - y0), _FONT, scale, 255, thickness, cv2.LINE_AA)
        halo = cv2.dilate(mask, kernel)[..., None].astype(np.float32) / 255.0
        ink = mask[..., None].astype(np.float32) / 255.0
        out = region.astype(np.float32) * (1.0 - 0.85 * halo)
        region[...] = np.rint(out * (1.0 - ink) + 255.0 * ink).astype(np.uint8)


def _burn_in(rgb: np.ndarray[Any, Any], lines: list[str], *, bar: bool = True) -> None:
    """Draw the text block (top left) and, with ``bar``, the heat colour bar (top right) in place."""
    rows, cols = rgb.shape[:2]
    margin = max(2, round(min(rows, cols) * 0.015))
    bar_w, bar_h = max(3, round(cols * 0.025)), min(max(8, round(rows * 0.3)), rows - 2 * margin)
    if not bar:
        bar_w, bar_h = 0, 0
    # Text about 2.5 % of the image height, shrunk until the widest line and the bar labels
    # fit side by side; tiny images clip the text rather than fail.
    height_1 = cv2.getTextSize("Pg", _FONT, 1.0, 1)[0][1]
    width_1 = max(cv2.getTextSize(t, _FONT, 1.0, 1)[0][0] for t in lines)
    label_1 = cv2.getTextSize("high", _FONT, 1.0, 1)[0][0]
    fit = (cols - bar_w - 4 * margin) / (width_1 + (label_1 if bar else 0))
    scale = max(0.3, min(rows * 0.025 / height_1, fit))
    text_h, line_h = round(height_1 * scale), round(height_1 * scale * 1.7)
    items = [(t, margin, margin + text_h + i * line_h) for i, t in enumerate(lines)]
    x0, y0 = cols - margin - bar_w, margin
    if bar and x0 > 0 and bar_h >= 2:
        ramp = _jet(np.linspace(1.0, 0.0, bar_h, dtype=np.float32)[:, None])  # [bar_h, 1, 3]
        rgb[y0 : y0 + bar_h, x0 : x0 + bar_w] = ramp
        cv2.rectangle(rgb, (x0 - 1, y0 - 1), (x0 + bar_w, y0 + bar_h), _BLACK, 1)
        label_x = x0 - margin - round(label_1 * scale)
        items += [("high", label_x, y0 + text_h), ("low", label_x, y0 + bar_h)]
    _draw_text(rgb, items, scale)


def display_gray(unit_image: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The SC's gray background, uint8 [Rows, Columns]: a unit image in [0, 1] times 255,
    rounded (NaN and below 0 black, above 1 white); a uint8 image is taken as it is."""
    arr = np.asarray(unit_image)
    if arr.dtype == np.uint8:
        return arr
    # Three passes (threshold, min, a saturating conversion) where numpy's clip, nan_to_num,
    # multiply and rint make five full-size float copies.
    _, clipped = cv2.threshold(np.asarray(arr, np.float32), 0.0, 0.0, cv2.THRESH_TOZERO)  # NaN fails "> 0"
    np.minimum(clipped, 1.0, out=clipped)  # +inf too: OpenCV's conversion would wrap it to 0
    return np.asarray(cv2.convertScaleAbs(clipped, alpha=255.0))


@functools.lru_cache(maxsize=8)
def _blend_table(opacity: float) -> np.ndarray[Any, Any]:
    """Every blend of a gray level under a heat level, packed RGBx in uint32, indexed by
    ``heat * 256 + gray``: the overlay becomes one table lookup per pixel."""
    heat = np.arange(256, dtype=np.float32) / 255.0
    alpha = (opacity * heat)[:, None, None]
    gray = np.arange(256, dtype=np.float32)[None, :, None]
    colour = _jet(heat[:, None])[:, None, 0, :].astype(np.float32)  # [256, 1, 3]
    rgb = np.rint(gray * (1.0 - alpha) + colour * alpha).astype(np.uint8).reshape(-1, 3)
    packed = np.zeros((256 * 256, 4), np.uint8)
    packed[:, :3] = rgb
    table: np.ndarray[Any, Any] = packed.view(np.uint32).reshape(-1)
    table.setflags(write=False)
    return table


def _check_image(unit_image: np.ndarray[Any, Any], gradcam: np.ndarray[Any, Any] | None = None) -> None:
    shapes = unit_image.shape + (gradcam.shape if gradcam is not None else (1, 1))
    if unit_image.ndim != 2 or (gradcam is not None and gradcam.ndim != 2) or 0 in shapes:
        raise UnsupportedInput(
            f"expected 2-D image and Grad-CAM map. Received: image shape={unit_image.shape}, "
            f"gradcam shape={None if gradcam is None else gradcam.shape}"
        )


def render_heatmap_overlay(
    unit_image: np.ndarray[Any, Any],
    gradcam: np.ndarray[Any, Any],
    *,
    probability: float,
    threshold: float,
    model_name: str,
    model_version: str,
    opacity: float = 0.4,
    notice: str = "",
    heatmap_scale: float | None = None,
    paint_negative: bool = False,
    faithfulness: float | None = None,
    warning: list[str] | None = None,
    link: str = "",
) -> np.ndarray[Any, Any]:
    """Blend the Grad-CAM map over the image at the source resolution and burn in the result.

    Args:
        unit_image: Display-ready grayscale [Rows, Columns]: in [0, 1] (decode.py's unit
            image), or already uint8 0-255 (:func:`display_gray`, decode.py's display image).
        gradcam: Raw Grad-CAM map [h, w] >= 0 at the model's feature resolution.
        probability, threshold: Model output and operating point, both in [0, 1].
        model_name, model_version: Burned in with the result.
        opacity: Colour weight where the map is hottest; cold areas stay grayscale.
        notice: An extra line, e.g. the model's intended use when it is a demo model.
        heatmap_scale: The raw Grad-CAM value drawn as full colour, fixed per model
            (``Meta.HEATMAP_SCALE``), so that a barely positive cell stays cold. None (a v1
            model): each map is scaled by its own peak, and the SC says so.
        paint_negative: Colour a negative decision's map too (and say what it shows); by
            default a negative decision is drawn without colour.
        faithfulness: Heatmap faithfulness, printed below the probability when a map is drawn.
        warning: Lines printed first, e.g. that the image is outside the training distribution.
        link: The dashboard's review link (``dashboard.public_url``), printed last.

    Returns:
        uint8 RGB [Rows, Columns, 3].
    """
    _check_image(unit_image, gradcam)
    if not 0.0 <= opacity <= 1.0:
        raise WorkerError(f"opacity must be in [0, 1]. Received: opacity={opacity!r}")
    if heatmap_scale is not None and not (math.isfinite(heatmap_scale) and heatmap_scale > 0):
        raise WorkerError(f"heatmap_scale must be > 0. Received: heatmap_scale={heatmap_scale!r}")
    _check_probability(probability, threshold)
    rows, cols = unit_image.shape
    positive = decision(probability, threshold)
    painted = positive or paint_negative
    cam = np.nan_to_num(np.asarray(gradcam, np.float32), nan=0.0, posinf=0.0).clip(min=0.0)
    scale = heatmap_scale if heatmap_scale is not None else float(cam.max())
    heat = cam / scale if scale > 0 and painted else np.zeros_like(cam)  # an all-zero map adds no colour
    gray = display_gray(unit_image)
    if painted and float(heat.max()) > 0:
        # Bilinear at full size, then 256 levels (the colour map has no more; saturating at
        # 255 is the clip to 1), then one lookup of the precomputed blend per pixel: within
        # one level of the float blend.
        level = cv2.convertScaleAbs(cv2.resize(heat, (cols, rows), interpolation=cv2.INTER_LINEAR), alpha=255.0)
        index = np.left_shift(level, 8, dtype=np.uint16)
        np.bitwise_or(index, gray, out=index)
        rgbx = _blend_table(float(opacity))[index]
        rgb = np.asarray(cv2.cvtColor(rgbx.view(np.uint8).reshape(rows, cols, 4), cv2.COLOR_RGBA2RGB))
    else:
        rgb = np.asarray(cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB))
    lines = [*(warning or []), f"P(pneumonia) = {probability:.3f}"]
    if painted and faithfulness is not None:
        lines.append(faithfulness_line(faithfulness))
    lines.append(f"Pneumonia: {'POSITIVE' if positive else 'NEGATIVE'} (threshold {threshold:.2f})")
    if not painted:
        lines.append("No heatmap for a negative decision")
    else:
        if not positive:
            lines.append("Heatmap: evidence for pneumonia, below the threshold")
        if heatmap_scale is None:
            lines.append("Heatmap scaled to its own peak (model has no fixed scale)")
    _burn_in(rgb, [
        *lines,
        f"Model: {model_name} {model_version}",
        "AI-generated - not for diagnostic use",
        *([notice] if notice else []),
        *([f"Review: {link}"] if link else []),
    ], bar=painted)
    return rgb


def render_withheld(
    unit_image: np.ndarray[Any, Any], *, reason: str, model_name: str, model_version: str, notice: str = "",
    link: str = "",
) -> np.ndarray[Any, Any]:
    """The source image in gray, without any heatmap, saying why there is no result.

    Args:
        unit_image: Display-ready grayscale [Rows, Columns], in [0, 1] or uint8.
        reason: One line, e.g. ``Trust.gate_line``.
        model_name, model_version, notice: As for :func:`render_heatmap_overlay`.
    """
    _check_image(unit_image)
    rgb = np.asarray(cv2.cvtColor(display_gray(unit_image), cv2.COLOR_GRAY2RGB))
    _burn_in(rgb, [
        WITHHELD_TEXT,
        *([reason] if reason else []),
        f"Model: {model_name} {model_version}",
        "AI-generated - not for diagnostic use",
        *([notice] if notice else []),
        *([f"Review: {link}"] if link else []),
    ], bar=False)
    return rgb


def _pixel_spacing(source: Dataset) -> tuple[float, float] | None:
    """Pixel Spacing, else Imager Pixel Spacing, only when both values are positive.

    Uncalibrated projection radiographs carry the detector-plane spacing (PS3.3 10.7.1);
    zeros (as in some CR) mean "unknown" and must not be passed on as a size.
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            row, col = (float(v) for v in source.get(keyword))
        except (TypeError, ValueError):
            continue
        if row > 0 and col > 0 and math.isfinite(row + col):
            return row, col
    return None


def _patient_orientation(source: Dataset) -> list[str]:
    """The source's Patient Orientation when well-formed, else [] (Type 2: unknown)."""
    raw = source.get("PatientOrientation") or []
    values = [str(raw)] if isinstance(raw, str) else [str(v) for v in raw]
    ok = len(values) == 2 and all(_ORIENTATION.fullmatch(v) for v in values)
    return values if ok else []


#: Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1) that
#: highdicom copies from the source. De-identified or hand-made images often lack them; the
#: outputs then carry them empty, which is how DICOM says "unknown". Nothing is invented.
PATIENT_STUDY_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
    "ReferringPhysicianName", "StudyID", "StudyDate", "StudyTime",
)
#: PS3.3 C.7.6.1.1.5, Lossy Image Compression Method.
LOSSY_METHOD = {"jpeg": "ISO_10918_1", "jpeg2000": "ISO_15444_1"}


def as_reference(source: Dataset) -> Dataset:
    """The source as the builders read it: every :data:`PATIENT_STUDY_TYPE2` attribute present,
    empty where the source lacks it.

    A new dataset holding the source's own elements, so the source (the stored input) is
    never modified.
    """
    missing = [keyword for keyword in PATIENT_STUDY_TYPE2 if keyword not in source]
    if not missing:
        return source
    reference = Dataset()
    reference.update(source)
    if hasattr(source, "file_meta"):
        reference.file_meta = source.file_meta
    for keyword in missing:
        setattr(reference, keyword, None)  # zero-length value
    return reference


def _stamp_dates(ds: Dataset) -> None:
    """Content and Series Date/Time: when this object was made. Series Date/Time are Type 3,
    but PACS and viewers group and sort series by them ("?" without)."""
    now = datetime.now()
    if not ds.get("ContentDate") or not ds.get("ContentTime"):
        ds.ContentDate, ds.ContentTime = DA(now.date()), TM(now.time())
    ds.SeriesDate, ds.SeriesTime = ds.ContentDate, ds.ContentTime


def _values(ds: Dataset, keyword: str) -> list[str]:
    raw = ds.get(keyword)
    if raw is None or raw == "":
        return []
    return [str(v) for v in raw] if not isinstance(raw, str | float | int) else [str(raw)]


def _compress(sc: Dataset, rgb: np.ndarray[Any, Any], source: Dataset, compression: str, quality: int) -> None:
    """Encode the SC's pixels in place and say so in the Lossy Image Compression attributes.

    JPEG Baseline with 4:2:2 chroma subsampling, which is what YBR_FULL_422 declares
    (PS3.5 8.2.1; Pillow's default is 4:2:0). JPEG 2000 with the irreversible colour transform
    (YBR_ICT, PS3.5 8.2.4), aiming at ``quality / 2`` dB PSNR.
    """
    if compression == "none":
        return
    if compression == "jpeg":
        buffer = io.BytesIO()
        Image.fromarray(rgb, "RGB").save(buffer, format="JPEG", quality=quality, subsampling=1)
        frame = buffer.getvalue()
        sc.PixelData = encapsulate([frame])
        sc["PixelData"].VR = "OB"
        sc.PhotometricInterpretation = "YBR_FULL_422"
        sc.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        size = len(frame)
    elif compression == "jpeg2000":
        sc.PhotometricInterpretation = "YBR_ICT"
        sc.compress(JPEG2000, rgb, encoding_plugin="pylibjpeg", j2k_psnr=[quality / 2])
        size = len(sc.PixelData)
    else:
        raise WorkerError(f"unknown SC compression. Received: sc_compression={compression!r}")
    # Lossy once, lossy for every derivative: the source's own lossy steps come first (C.7.6.1.1.5).
    ratios, methods = [], []
    if source.get("LossyImageCompression") == "01":
        ratios, methods = _values(source, "LossyImageCompressionRatio"), _values(source, "LossyImageCompressionMethod")
        if len(ratios) != len(methods):
            ratios, methods = [], []
    sc.LossyImageCompression = "01"
    sc.LossyImageCompressionRatio = [*ratios, f"{rgb.nbytes / size:.2f}"]
    sc.LossyImageCompressionMethod = [*methods, LOSSY_METHOD[compression]]


def build_secondary_capture(
    source: Dataset, rgb: np.ndarray[Any, Any], uids: OutputUIDs, model: ModelInfo,
    settings: BuildSettings, *, trust: Trust | None = None,
) -> hd.sc.SCImage:
    """The overlay as an RGB Secondary Capture in the source's study, referencing the source.

    Compressed as ``settings.sc_compression`` says (JPEG Baseline by default); patient and
    study attributes the source lacks are sent empty (:func:`as_reference`).

    Args:
        source: The image the overlay was computed on.
        rgb: Output of :func:`render_heatmap_overlay` (or :func:`render_withheld` when
            ``trust.withheld``), uint8 [Rows, Columns, 3].
        uids, model, settings: Output UIDs, the model that made the map, site choices.
        trust: Gate and faithfulness of this answer; its derivation is described.
    """
    rows, cols = int(source.Rows), int(source.Columns)
    # The overlay may be the source shrunk to a bounded size (decode.fit_dimension): the
    # same aspect to the rounding of a pixel per side; the pixel spacing grows to match.
    height, width = (rgb.shape[0], rgb.shape[1]) if rgb.ndim == 3 else (0, 0)
    shrunk = 0 < max(height, width) < max(rows, cols) and abs(rows * width - cols * height) <= max(rows, cols)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or not ((height, width) == (rows, cols) or shrunk):
        raise UnsupportedInput(
            f"overlay must be uint8 [{rows}, {cols}, 3] like the source, or that shrunk. "
            f"Received: dtype={rgb.dtype}, shape={rgb.shape}"
        )
    spacing = _pixel_spacing(source)
    if spacing is not None and shrunk:
        spacing = (spacing[0] * rows / height, spacing[1] * cols / width)
    orientation = _patient_orientation(source)
    laterality = str(source.get("Laterality") or "")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=as_reference(source), pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", transfer_syntax_uid=ExplicitVRLittleEndian,
        series_instance_uid=uids.sc_series, series_number=settings.sc_series_number,
        sop_instance_uid=uids.sc_instance, instance_number=1, manufacturer=settings.manufacturer,
        series_description=settings.sc_series_description,
        institution_name=settings.institution_name,
        pixel_spacing=spacing,  # type: ignore[arg-type]  # hd hints int
        laterality=laterality if laterality in ("R", "L") else None,
        # highdicom requires a value and knows single letters only; the real value
        # (possibly compound, or empty when unknown) is written back below.
        patient_orientation=("L", "F"),
    )
    sc.PatientOrientation = orientation
    if "BodyPartExamined" in source:
        sc.BodyPartExamined = source.BodyPartExamined
    # A de-identified source stays labelled so in what is derived from it (PS3.3 C.7.1.1).
    for keyword in ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence"):
        if keyword in source and keyword not in sc:
            sc[keyword] = copy.deepcopy(source[keyword])
    if source.get("ImageLaterality") in ("R", "L", "U", "B"):
        sc.ImageLaterality = source.ImageLaterality
    # Laterality is Type 2C (PS3.3 C.7.3.1): a value for a paired body part, absent for an
    # unpaired one such as the chest. When neither the side nor a chest is known, send it
    # empty, which the standard reserves for "unknown" (dciodvfy: a warning, not an error).
    chest = str(source.get("BodyPartExamined", "")).upper() == "CHEST"
    if "Laterality" not in sc and "ImageLaterality" not in sc and not chest:
        sc.Laterality = ""
    if source.get("LossyImageCompression") == "01":  # lossy once, lossy for every derivative
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in source:
                sc[keyword] = source[keyword]
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    if trust is not None and trust.withheld:
        sc.DerivationDescription = (
            f"Source image without a result: outside the training distribution of {model.name} "
            f"{model.version} ({trust.gate_line(model)}); no heatmap. AI-generated, not for diagnostic use."
        )
    else:
        sc.DerivationDescription = (
            f"Grad-CAM heatmap of {model.name} {model.version} (pneumonia) blended over the source "
            "image; probability and decision burned in. AI-generated, not for diagnostic use."
        )
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    purpose = codes.DCM.SourceImageForImageProcessingOperation
    reference.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(purpose)]
    sc.SourceImageSequence = [reference]
    sc.SecondaryCaptureDeviceManufacturer = settings.manufacturer
    sc.SecondaryCaptureDeviceManufacturerModelName = model.name
    sc.SecondaryCaptureDeviceSoftwareVersions = model.version
    _stamp_dates(sc)
    _compress(sc, np.ascontiguousarray(rgb), source, settings.sc_compression, settings.sc_quality)
    return sc


def _trust_content(model: ModelInfo, trust: Trust) -> tuple[list[hd.sr.QualitativeEvaluation],
                                                             list[hd.sr.Measurement]]:
    """The SR items that say how far to trust the answer (codes: docs/conformance.md)."""
    evaluations, measurements = [], []
    if trust.gate is not None or model.has_ood_gate:
        outside = trust.gate is not None
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=TRAINING_DISTRIBUTION, value=OUTSIDE_DISTRIBUTION if outside else WITHIN_DISTRIBUTION))
        if trust.gate is not None:
            evaluations.append(hd.sr.QualitativeEvaluation(name=OOD_EVIDENCE, value=OOD_REASONS[trust.gate]))
    if trust.ood_score is not None and model.ood_threshold is not None:
        measurements += [
            hd.sr.Measurement(name=OOD_SCORE, value=trust.ood_score, unit=codes.UCUM.NoUnits),
            hd.sr.Measurement(name=OOD_THRESHOLD, value=model.ood_threshold, unit=codes.UCUM.NoUnits),
        ]
    if trust.faithfulness is not None and not trust.withheld:
        measurements.append(hd.sr.Measurement(
            name=HEATMAP_FAITHFULNESS, value=trust.faithfulness, unit=codes.UCUM.NoUnits))
    return evaluations, measurements


def acquisition_modality(source: Dataset) -> Code:
    """The source's Modality as a CID 29 (Acquisition Modality) code; from its SOP class when
    the attribute is not a CID 29 value."""
    value = str(source.get("Modality", ""))
    for keyword in codes.cid29.dir():
        code = getattr(codes.cid29, keyword)
        if code.value == value:
            return Code(code.value, code.scheme_designator, code.meaning)
    coded = hd.sr.templates._get_coded_modality(source.SOPClassUID)  # noqa: SLF001  # highdicom's own map
    return Code(coded.value, coded.scheme_designator, coded.meaning)


def _image_library(source: Dataset) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library with one TID 1601 entry: the image the model read.

    highdicom's :class:`~highdicom.sr.ImageLibrary` demands TID 1603's Imager Pixel Spacing of
    a CR or DX, which many lack; this entry carries the TID 1602/1603 descriptors the source has
    values for, and its real acquisition modality (CID 29). The SC is not an acquired image
    (its Modality "OT" is not in CID 29); it is listed in the evidence instead.
    """
    acq = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
    pixels = hd.sr.CodedConcept(value="{pixels}", meaning="Pixels", scheme_designator="UCUM")
    descriptors: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(name=codes.DCM.Modality, value=acquisition_modality(source), relationship_type=acq),
        hd.sr.NumContentItem(name=codes.DCM.PixelDataRows, value=int(source.Rows), unit=pixels,
                             relationship_type=acq),
        hd.sr.NumContentItem(name=codes.DCM.PixelDataColumns, value=int(source.Columns), unit=pixels,
                             relationship_type=acq),
    ]
    orientation = _patient_orientation(source)
    if orientation:
        descriptors += [
            hd.sr.TextContentItem(name=codes.DCM.PatientOrientationRow, value=orientation[0], relationship_type=acq),
            hd.sr.TextContentItem(name=codes.DCM.PatientOrientationColumn, value=orientation[1],
                                  relationship_type=acq),
        ]
    try:
        row, col = (float(v) for v in source.get("ImagerPixelSpacing"))
    except (TypeError, ValueError):
        row = col = 0.0
    if row > 0 and col > 0 and math.isfinite(row + col):
        descriptors += [
            hd.sr.NumContentItem(name=codes.DCM.HorizontalPixelSpacing, value=col, unit=codes.UCUM.Millimeter,
                                 relationship_type=acq),
            hd.sr.NumContentItem(name=codes.DCM.VerticalPixelSpacing, value=row, unit=codes.UCUM.Millimeter,
                                 relationship_type=acq),
        ]
    image = hd.sr.ImageContentItem(
        name=hd.sr.CodedConcept(value="260753009", meaning="Source", scheme_designator="SCT"),
        referenced_sop_class_uid=source.SOPClassUID, referenced_sop_instance_uid=source.SOPInstanceUID,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    image.ContentSequence = hd.sr.ContentSequence(descriptors)
    group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup,
                                       relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    group.ContentSequence = hd.sr.ContentSequence([image])
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary,
                                         relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


#: The SR's TEXT item carrying the dashboard link (worker.links.review_url).
REVIEW_LINK = hd.sr.CodedConcept("REVIEW-LINK", PRIVATE_SCHEME, "Review in the dashboard")


def build_report(
    source: Dataset, sc: Dataset, probability: float, model: ModelInfo, uids: OutputUIDs,
    settings: BuildSettings, *, trust: Trust | None = None, review_url: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 Measurement Report: the probability, the decision and the model identity.

    Args:
        source: The image the model read.
        sc: The overlay from :func:`build_secondary_capture`; evidence and Image Library.
        probability: Model output in [0, 1]; ``model.threshold`` makes the decision.
        model, uids, settings: The model, output UIDs, site choices.
        trust: Out-of-distribution gate and heatmap faithfulness. When ``trust.withheld``
            the finding is Indeterminate and no probability is reported.
        review_url: The dashboard's link to this result, carried as a TEXT item of the group.
    """
    trust = trust or Trust()
    _check_probability(probability, model.threshold)
    if sc.StudyInstanceUID != source.StudyInstanceUID:
        raise WorkerError(
            f"SC and source must share a study. Received: {sc.StudyInstanceUID} "
            f"and {source.StudyInstanceUID}"
        )
    prefix = settings.uid_prefix
    presence = INDETERMINATE if trust.withheld else PRESENT if decision(probability, model.threshold) else ABSENT
    evaluations, measurements = _trust_content(model, trust)
    if not trust.withheld:
        measurements.insert(0, hd.sr.Measurement(
            name=PNEUMONIA_PROBABILITY, value=probability, unit=codes.UCUM.NoUnits))
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_derived_uid(prefix, "device", settings.manufacturer, model.name, model.version),
            name=model.name,
            manufacturer_name=settings.manufacturer,
        ),
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_derived_uid(prefix, "tracking", uids.sr_instance), identifier="Pneumonia"
        ),
        finding_type=PNEUMONIA,
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=model.name,
            version=model.version,
            parameters=[f"weights_sha256={model.weights_sha256}", f"threshold={model.threshold}"],
        ),
        # Name = the finding, value = Present/Absent/Indeterminate: one item a reader cannot misread.
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=PNEUMONIA, value=presence), *evaluations],
        measurements=measurements,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    if review_url:  # a PACS viewer shows it as text; the reader opens the case in the dashboard
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=REVIEW_LINK, value=review_url, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=CHEST_XR_SINGLE_VIEW,
        imaging_measurements=[group],
    )
    root = report[0]
    # TID 1500 row 5 (Image Library) comes before row 6 (Imaging Measurements).
    position = next(i for i, item in enumerate(root.ContentSequence)
                    if item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ImagingMeasurements.value)
    root.ContentSequence.insert(position, _image_library(source))
    # The SC was made for this request: Current Requested Procedure Evidence (PS3.3 C.17.2.3)
    # lists it beside the source, which the content tree references.
    sr = hd.sr.Comprehensive3DSR(
        evidence=[as_reference(source), sc], content=root,
        series_instance_uid=uids.sr_series, series_number=settings.sr_series_number,
        sop_instance_uid=uids.sr_instance, instance_number=1, manufacturer=settings.manufacturer,
        series_description=settings.sr_series_description,
        institution_name=settings.institution_name,
        # PRELIMINARY and UNVERIFIED: a machine reading that awaits a human's report.
        is_complete=True, is_final=False, is_verified=False,
        coding_schemes=[CodingSchemeIdentificationItem(
            PRIVATE_SCHEME, name="cxr-gradcam concepts",
            responsible_organization=settings.manufacturer,
        )],
    )
    _stamp_dates(sr)
    return sr
