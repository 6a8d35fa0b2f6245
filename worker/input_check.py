"""Cheap checks of the decoded image, before the model, for what a feature density misses.

The model's out-of-distribution score measures how far an image's features lie from the
training data; an image with almost no content (a blank or unexposed plate, a constant
test image) or one that is mostly burnt out or black (a saturated exposure, a wrong
window) can still land near the training features, because a CNN's pooled features of
"nothing" are not necessarily far from those of a chest. Both are plain to see in the
histogram of the display-ready image, so they are checked there. Pure functions of the
[0, 1] image that :mod:`worker.decode` returns.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Reasons an image is refused by these checks (also used as metric labels).
UNIFORM = "uniform"
CLIPPED = "clipped"

#: Histogram bins over [0, 1]: 64 bins of 4 grey levels (of 256) each.
BINS = 64
#: Nearly uniform when one bin holds more than this fraction of the pixels. A radiograph's
#: largest bin is its background or collimation: 2-40 % on the real CR chests and the
#: phantoms we measured, so 90 % leaves a wide margin.
MAX_DOMINANT_BIN = 0.90
#: Clipped when more than this fraction of the pixels sits at black or white (within one
#: grey level of 0 or 1). Percentile clipping (cxr_contract.pixels) clips 1 % by design and
#: a window clips the air around the body (up to ~35 % on a tightly windowed CR); an image
#: with more than half its pixels at the limits has lost its anatomy.
MAX_CLIPPED_FRACTION = 0.50
_GREY_LEVEL = 1.0 / 255.0
#: The checks read every k-th pixel so that about this many rows and columns are looked at:
#: a histogram needs no more, and a full 3000 x 3000 image would cost ~100 ms.
SAMPLE_SIDE = 256


def _sample(unit_image: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    step = max(1, max(unit_image.shape[:2]) // SAMPLE_SIDE)
    return np.asarray(unit_image)[::step, ::step]


def dominant_bin_fraction(unit_image: np.ndarray[Any, Any]) -> float:
    """Fraction of the pixels in the fullest of :data:`BINS` histogram bins."""
    arr = np.asarray(unit_image, np.float32).ravel()
    if not arr.size:
        return 1.0
    counts = np.bincount(np.clip((arr * BINS).astype(np.int64), 0, BINS - 1), minlength=BINS)
    return float(counts.max() / arr.size)


def clipped_fraction(unit_image: np.ndarray[Any, Any]) -> float:
    """Fraction of the pixels at black or white."""
    arr = np.asarray(unit_image)
    return float(np.mean((arr <= _GREY_LEVEL) | (arr >= 1.0 - _GREY_LEVEL)))


def input_problem(unit_image: np.ndarray[Any, Any]) -> str | None:
    """:data:`UNIFORM` or :data:`CLIPPED` when the image fails a check, else None."""
    sample = _sample(unit_image)
    if sample.size == 0 or dominant_bin_fraction(sample) > MAX_DOMINANT_BIN:
        return UNIFORM
    if clipped_fraction(sample) > MAX_CLIPPED_FRACTION:
        return CLIPPED
    return None


def describe(problem: str) -> str:
    """The words an SC prints for a problem."""
    return {
        UNIFORM: "Input check: image nearly uniform (no anatomy)",
        CLIPPED: "Input check: image mostly black or white (clipped)",
    }.get(problem, f"Input check: {problem}")
