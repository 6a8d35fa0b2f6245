"""Preprocessing that the trainer (PNG) and the worker (DICOM) must share exactly.

Both sides bring an image to display-ready grayscale first (the worker through the DICOM
pixel steps in :mod:`worker.decode`, the trainer by reading a PNG), then call these
functions, so a PNG and the DICOM made from it give the same model input.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

#: Interpolation used to bring any image to the model's S x S input: area
#: averaging is the anti-aliased choice when shrinking a 2-3k radiograph.
MODEL_INTERPOLATION = cv2.INTER_AREA


#: Percentiles that set the display range of an image that carries none (no VOI window,
#: a PNG): the 0.5th and 99.5th, so a few outlier pixels (a marker, a dead detector line,
#: a burnt-in label) cannot compress the anatomy into a few grey levels as min-max does.
CLIP_PERCENTILES = (0.5, 99.5)


def to_unit_range(arr: np.ndarray[Any, Any], *, clip: bool = True) -> np.ndarray[Any, Any]:
    """Linearly map the image's own value range onto [0, 1] (float32).

    Args:
        arr: A grayscale image.
        clip: Take the range between :data:`CLIP_PERCENTILES` and clip outside it (an image
            without a display range of its own); False: min-max, for an image a VOI window
            already brought to its display range.

    A constant image maps to zeros. Values that are not finite carry no intensity of their
    own: NaN and -inf count as the darkest finite value (black), +inf as the brightest
    (white); an image with no finite value maps to zeros.
    """
    arr = finite_or_ends(np.asarray(arr, dtype=np.float64))
    if clip and arr.size:
        lo, hi = (float(v) for v in np.percentile(arr, CLIP_PERCENTILES))
        if hi > lo:
            return ((np.clip(arr, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def all_finite(arr: np.ndarray[Any, Any]) -> bool:
    """Whether every value is finite, in one summing pass and no full-size temporary: a NaN
    or an infinity makes the sum non-finite (a sum that overflows only costs a needless copy
    in the callers, which then replace nothing)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(math.isfinite(float(np.add.reduce(arr, axis=None)))) if arr.size else True


def finite_or_ends(arr: np.ndarray[Any, Any], low: float | None = None,
                   high: float | None = None) -> np.ndarray[Any, Any]:
    """``arr`` with NaN and -inf replaced by ``low`` and +inf by ``high`` (default: the
    smallest and largest finite value, 0 where there is none); ``arr`` itself when all
    values are finite.

    OpenCV's vectorised kernels compare and convert NaN differently on different instruction
    sets (AVX2, AVX-512), and a NaN spreads through every blur and area average: each pixel
    step replaces them first, so its output is the same on every CPU.
    """
    arr = np.asarray(arr)
    if all_finite(arr):
        return arr
    finite = np.isfinite(arr)
    if low is None or high is None:
        some = bool(finite.any())
        low = (float(arr[finite].min()) if some else 0.0) if low is None else low
        high = (float(arr[finite].max()) if some else 0.0) if high is None else high
    return np.where(finite, arr, np.where(arr == np.inf, high, low)).astype(arr.dtype, copy=False)


def resize_for_model(arr: np.ndarray[Any, Any], size: int) -> np.ndarray[Any, Any]:
    """Resize a [0, 1] float image to ``size x size`` with the shared interpolation; NaN and
    -inf become 0, +inf 1 first (see :func:`finite_or_ends`)."""
    arr = finite_or_ends(np.asarray(arr, dtype=np.float32), 0.0, 1.0)
    return cv2.resize(arr, (size, size), interpolation=MODEL_INTERPOLATION)
