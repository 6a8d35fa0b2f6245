"""The SC's pixels: drawn the fast way (uint8 blend table, text blended only in its boxes) they
look the same as the float blend over the whole image (the text to the bit, the heatmap to one
grey level); what the heatmap and the text show, at any size."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import pytest

from tests.dicom_outputs import MODEL_V2, hot_gradcam
from tests.unit.worker.outputs.builders import one_cell, redness
from worker.model import GATE_OOD_SCORE
from worker.outputs import Trust, display_gray, faithfulness_line, render, render_heatmap_overlay, render_withheld


def _float_blend(unit: np.ndarray, heat: np.ndarray, opacity: float) -> np.ndarray:
    """The overlay as first written: every step in float at full resolution."""
    gray = np.clip(np.nan_to_num(unit.astype(np.float32)), 0.0, 1.0) * 255.0
    alpha = (opacity * heat)[..., None]
    colour = render._jet(heat).astype(np.float32)
    return np.rint(gray[..., None] * (1.0 - alpha) + colour * alpha).astype(np.uint8)


def _draw_text_everywhere(rgb: np.ndarray, items: list[tuple[str, int, int]], scale: float) -> None:
    """The text blend as first written: mask, halo and blend over the whole image."""
    mask = np.zeros(rgb.shape[:2], np.uint8)
    for text, x, y in items:
        cv2.putText(mask, text, (x, y), render._FONT, scale, 255, max(1, round(scale * 1.5)), cv2.LINE_AA)
    radius = max(1, round(scale * 1.5))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    halo = cv2.dilate(mask, kernel)[..., None].astype(np.float32) / 255.0
    ink = mask[..., None].astype(np.float32) / 255.0
    out = rgb.astype(np.float32) * (1.0 - 0.85 * halo)
    rgb[...] = np.rint(out * (1.0 - ink) + 255.0 * ink).astype(np.uint8)


@pytest.fixture(scope="module")
def chest_like() -> np.ndarray:
    rng = np.random.default_rng(5)
    base = cv2.GaussianBlur(rng.random((600, 520)).astype(np.float32), (0, 0), 9)
    return (base - base.min()) / (base.max() - base.min())


@pytest.mark.parametrize("scale", [0.3, 0.8, 1.7, 3.2])
def test_text_drawn_in_its_boxes_equals_text_drawn_over_the_whole_image(scale: float) -> None:
    rng = np.random.default_rng(int(scale * 10))
    rgb = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    # Lines close enough to share a box, one crossing the right edge, one above the top.
    items = [("P(pneumonia) = 0.870", 5, 20), ("Pneumonia: POSITIVE", 5, 44), ("high", 340, 15),
             ("low", 350, 290), ("AI-generated - not for diagnostic use", 200, 150), ("cut", 10, 2)]
    expected = rgb.copy()
    _draw_text_everywhere(expected, items, scale)
    render._draw_text(rgb, items, scale)
    np.testing.assert_array_equal(rgb, expected)


@pytest.mark.parametrize("heatmap_scale", [1.0, 0.3, None])
def test_overlay_is_the_float_blend_to_one_level(chest_like: np.ndarray, heatmap_scale: float | None) -> None:
    cam = np.zeros((7, 7), np.float32)
    cam[2:5, 1:4] = np.random.default_rng(1).random((3, 3)) * 2.0  # above the fixed scale: saturates
    cam[5, 5] = 0.25
    kw = {"probability": 0.9, "threshold": 0.5, "model_name": "m", "model_version": "v", "opacity": 0.4,
          "heatmap_scale": heatmap_scale}
    got = render_heatmap_overlay(chest_like, cam, **kw)
    scale = heatmap_scale if heatmap_scale is not None else float(cam.max())
    heat = np.clip(cv2.resize(cam / scale, chest_like.shape[::-1], interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
    expected = _float_blend(chest_like, heat, 0.4)
    lines = ["P(pneumonia) = 0.900", "Pneumonia: POSITIVE (threshold 0.500)",
             *([] if heatmap_scale else ["Heatmap scaled to its own peak (model has no fixed scale)"]),
             "Model: m v", "AI-generated - not for diagnostic use"]
    render._burn_in(expected, lines, bar=True)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    assert (got != expected).any(axis=-1).mean() < 0.5  # most pixels identical, not merely close


def test_overlay_of_the_uint8_display_is_the_overlay_of_the_unit_image(chest_like: np.ndarray) -> None:
    cam = np.random.default_rng(2).random((7, 7)).astype(np.float32)
    kw = {"probability": 0.7, "threshold": 0.5, "model_name": "m", "model_version": "v", "heatmap_scale": 1.0}
    np.testing.assert_array_equal(render_heatmap_overlay(display_gray(chest_like), cam, **kw),
                                  render_heatmap_overlay(chest_like, cam, **kw))
    withheld = {"reason": "r", "model_name": "m", "model_version": "v"}
    np.testing.assert_array_equal(render_withheld(display_gray(chest_like), **withheld),
                                  render_withheld(chest_like, **withheld))


def test_display_gray_rounds_and_clips_like_the_float_path() -> None:
    unit = np.array([[np.nan, -np.inf, -0.2, 0.0, 0.5 / 255, 1.5 / 255, 0.5, 1.0, 1.3, np.inf]], np.float32)
    expected = np.rint(np.clip(np.nan_to_num(unit, posinf=1.0, neginf=0.0), 0, 1) * 255).astype(np.uint8)
    got = display_gray(unit)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
    as_is = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert display_gray(as_is) is as_is


def test_probability_line_gives_the_prevalence_and_the_side_of_the_threshold() -> None:
    from worker.outputs.render import probability_lines

    line, threshold = probability_lines(0.49945, 0.49918, 0.1)
    assert line == "P(pneumonia) = 0.4995 (assuming 10% prevalence)" and threshold == "0.4992"
    assert probability_lines(0.2, 0.5, None) == ("P(pneumonia) = 0.200", "0.500")


SC_LINES = ["WARNING: outside the model's training distribution", "OOD score 12.3 > threshold 10",
            "P(pneumonia) = 0.900", "Heatmap faithfulness: high (+0.80)", "Pneumonia: POSITIVE (threshold 0.500)",
            "Model: cxr-resnet50 2.1.0", "AI-generated - not for diagnostic use",
            "Demo model trained on synthetic phantoms - not for clinical use"]


@pytest.mark.parametrize("rows, cols", [(1955, 1841), (700, 660), (2048, 300), (400, 64), (300, 2048), (64, 400)],
                         ids=["real-cr", "real-cr-at-700", "narrow", "very-narrow", "wide", "very-wide"])
def test_text_block_and_colour_bar_never_overlap(rows: int, cols: int) -> None:
    """The real CR's "low" label ran into the last line of the text block (1841 px wide)."""
    plan = render.layout((rows, cols), SC_LINES)
    block = [render._ink_box(*item, plan.scale) for item in plan.block]
    others = [render._ink_box(*item, plan.scale) for item in plan.labels]
    if plan.bar is not None:
        x, y, w, h = plan.bar
        others.append((x - 1, y - 1, x + w + 1, y + h + 1))  # with its black frame
        assert x >= 0 and x + w <= cols and y >= 0 and y + h <= rows
    overlaps = [(a, b) for a in block for b in others if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]]
    assert overlaps == []
    if min(rows, cols) >= 300:  # room for a bar: it is there, with both labels inside the image
        assert plan.bar is not None and len(plan.labels) == 2
        assert all(box[0] >= 0 and box[2] <= cols and box[3] <= rows for box in others)
    # What is drawn is what was laid out: the bar's Jet colours where the layout put it.
    rgb = np.full((rows, cols, 3), 128, np.uint8)
    render._burn_in(rgb, SC_LINES, bar=True)
    if plan.bar is not None:
        x, y, w, h = plan.bar
        np.testing.assert_array_equal(rgb[y:y + h, x + w // 2], render._jet(np.linspace(1.0, 0.0, h)[:, None])[:, 0])


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
    assert faithfulness_line(1.5, 1.2) == "Heatmap faithfulness: above chance (logit drop +1.50, cut-off 1.20)"
    assert faithfulness_line(-0.2, 1.2) == "Heatmap faithfulness: not above chance (logit drop -0.20, cut-off 1.20)"
    # Printed at a precision that shows the side of the cut-off the verdict is on.
    assert faithfulness_line(1.2004, 1.2) == "Heatmap faithfulness: above chance (logit drop +1.2004, cut-off 1.2000)"


def test_ood_numbers_printed_apart_when_close() -> None:
    trust = Trust(ood_score=10.0004, gate=GATE_OOD_SCORE)
    assert trust.gate_line(MODEL_V2) == "OOD score 10.0004 > threshold 10"
