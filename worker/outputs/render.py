"""The pixels of the Secondary Capture: the gray image, the Jet heatmap blended over it, and the
burned-in text and colour bar."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from cxr_contract import faithfulness as faith
from cxr_contract.prevalence import format_pair, percent
from worker.errors import UnsupportedInput, WorkerError
from worker.outputs.common import check_probability, decision

#: The first line of a withheld SC, and what the SR says in words.
WITHHELD_TEXT = "Outside the model's training distribution - no result"

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_BLACK = (0, 0, 0)

def faithfulness_line(value: float, cutoff: float) -> str:
    """Whether the model depends on the highlighted region more than on other regions of its
    shape (:mod:`cxr_contract.faithfulness`): never a claim that the region is the disease."""
    digits = 2  # enough for the printed score and cut-off to differ as the verdict says they do
    while digits < 6 and f"{value:.{digits}f}" == f"{cutoff:.{digits}f}" and value != cutoff:
        digits += 1
    return (f"Heatmap faithfulness: {faith.verdict(value, cutoff)} "
            f"(logit drop {value:+.{digits}f}, cut-off {cutoff:.{digits}f})")


def probability_lines(probability: float, threshold: float, prevalence: float | None) -> tuple[str, str]:
    """The probability line and the decision line's threshold, printed at the precision that
    shows on which side of the threshold the image lies (:func:`cxr_contract.prevalence.format_pair`)."""
    p, t = format_pair(probability, threshold)
    assumed = f" (assuming {percent(prevalence)} prevalence)" if prevalence is not None else ""
    return f"P(pneumonia) = {p}{assumed}", t


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


@dataclass(frozen=True)
class Layout:
    """Where :func:`_burn_in` puts things: text items (text, x, baseline y) at ``scale``, and the
    colour bar as (x0, y0, width, height), None when there is no bar or no room for one."""

    scale: float
    block: list[tuple[str, int, int]]
    labels: list[tuple[str, int, int]]
    bar: tuple[int, int, int, int] | None


def _ink_box(text: str, x: int, y: int, scale: float) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) holding the text's ink and halo as :func:`_draw_text` draws it."""
    thickness = max(1, round(scale * 1.5))
    reach = max(1, round(scale * 1.5)) + 2 * thickness + 2
    (w, h), base = cv2.getTextSize(text, _FONT, scale, thickness)
    return x - reach, y - h - reach, x + w + reach, y + base + reach


def layout(shape: tuple[int, ...], lines: list[str], *, bar: bool = True) -> Layout:
    """Lay the text block (top left) and the colour bar with its labels (top right) out so
    that they never overlap, at any size and aspect ratio.

    The text is about 2.5 % of the image height, shrunk (not below a legible 0.3) until every
    line, measured with its halo, ends left of the bar's labels. Where it still reaches them
    (narrow images), the bar starts below the last line that does; with no room left there,
    the bar is left out (the text says what the image shows; the bar only scales it).
    """
    rows, cols = shape[:2]
    margin = max(2, round(min(rows, cols) * 0.015))
    bar_w, bar_h = max(3, round(cols * 0.025)), min(max(8, round(rows * 0.3)), rows - 2 * margin)
    height_1 = cv2.getTextSize("Pg", _FONT, 1.0, 1)[0][1]
    scale = max(0.3, rows * 0.025 / height_1)
    bar_x = cols - margin - bar_w

    def place(scale: float) -> tuple[list[tuple[str, int, int]], int, int]:
        text_h, line_h = round(height_1 * scale), round(height_1 * scale * 1.7)
        items = [(t, margin, margin + text_h + i * line_h) for i, t in enumerate(lines)]
        label_w = max(_ink_box(t, 0, 0, scale)[2] - _ink_box(t, 0, 0, scale)[0] for t in ("high", "low"))
        return items, text_h, bar_x - margin - label_w

    items, text_h, column = place(scale)
    while bar and scale > 0.3 and max(_ink_box(*i, scale)[2] for i in items) > column:
        scale = max(0.3, scale * 0.9)
        items, text_h, column = place(scale)
    if not bar or bar_x <= 0:
        return Layout(scale, items, [], None)
    # Below every line that reaches into the bar's column (none, on most images).
    top = max([_ink_box(*i, scale)[3] for i in items if _ink_box(*i, scale)[2] > column], default=0)
    label_x = column - _ink_box("high", 0, 0, scale)[0]  # the label's ink box starts at ``column``
    high_box = _ink_box("high", label_x, 0, scale)
    y0 = max(margin, top + margin + (0 - high_box[1]) - text_h)  # the "high" box's top at ``top``
    low_box = _ink_box("low", label_x, 0, scale)
    room = rows - low_box[3] - y0  # the "low" label's bottom inside the image
    bar_h = min(bar_h, room)
    # The two labels apart: "low" below the bottom of "high".
    if bar_h < max(8, (high_box[3] - high_box[1]) + text_h):
        return Layout(scale, items, [], None)
    labels = [("high", label_x, y0 + text_h), ("low", label_x, y0 + bar_h)]
    return Layout(scale, items, labels, (bar_x, y0, bar_w, bar_h))


def _burn_in(rgb: np.ndarray[Any, Any], lines: list[str], *, bar: bool = True) -> None:
    """Draw the text block and, with ``bar``, the heat colour bar in place, as :func:`layout` says."""
    plan = layout(rgb.shape, lines, bar=bar)
    if plan.bar is not None:
        x0, y0, bar_w, bar_h = plan.bar
        ramp = _jet(np.linspace(1.0, 0.0, bar_h, dtype=np.float32)[:, None])  # [bar_h, 1, 3]
        rgb[y0 : y0 + bar_h, x0 : x0 + bar_w] = ramp
        cv2.rectangle(rgb, (x0 - 1, y0 - 1), (x0 + bar_w, y0 + bar_h), _BLACK, 1)
    _draw_text(rgb, plan.block + plan.labels, plan.scale)


def display_gray(unit_image: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The SC's gray background, uint8 [Rows, Columns]: a unit image in [0, 1] times 255,
    rounded (NaN and below 0 black, above 1 white); a uint8 image is taken as it is."""
    arr = np.asarray(unit_image)
    if arr.dtype == np.uint8:
        return arr
    # NaN is replaced before any comparison: how a vectorised compare treats NaN differs by
    # instruction set (OpenCV's threshold kept NaN on AVX-512 and drew it white), numpy's
    # nan_to_num and clip do not. One copy, then in place; the conversion saturates at 255.
    clipped = np.array(arr, dtype=np.float32)
    np.nan_to_num(clipped, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
    np.clip(clipped, 0.0, 1.0, out=clipped)
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
    faithfulness_cutoff: float | None = None,
    warning: list[str] | None = None,
    link: str = "",
    prevalence: float | None = None,
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
        faithfulness: Heatmap faithfulness (a logit drop), printed below the probability when a map
            is drawn and the model has a ``faithfulness_cutoff`` to judge it by.
        faithfulness_cutoff: The model's null cut-off (``ModelInfo.faithfulness_cutoff``).
        warning: Lines printed first, e.g. that the image is outside the training distribution.
        link: The dashboard's review link (``dashboard.public_url``), printed last.
        prevalence: The prevalence the probability assumes (``ModelInfo.assumed_prevalence``),
            printed beside it; None (unknown) prints none.

    Returns:
        uint8 RGB [Rows, Columns, 3].
    """
    _check_image(unit_image, gradcam)
    if not 0.0 <= opacity <= 1.0:
        raise WorkerError(f"opacity must be in [0, 1]. Received: opacity={opacity!r}")
    if heatmap_scale is not None and not (math.isfinite(heatmap_scale) and heatmap_scale > 0):
        raise WorkerError(f"heatmap_scale must be > 0. Received: heatmap_scale={heatmap_scale!r}")
    check_probability(probability, threshold)
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
    probability_line, threshold_text = probability_lines(probability, threshold, prevalence)
    lines = [*(warning or []), probability_line]
    if painted and faithfulness is not None and faithfulness_cutoff is not None:
        lines.append(faithfulness_line(faithfulness, faithfulness_cutoff))
    lines.append(f"Pneumonia: {'POSITIVE' if positive else 'NEGATIVE'} (threshold {threshold_text})")
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

