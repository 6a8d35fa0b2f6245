"""Preprocessing that the trainer (PNG) and the worker (DICOM) must share exactly.

Both sides bring an image to display-ready grayscale first (the worker through the DICOM
pixel steps in :mod:`worker.decode`, the trainer by reading a PNG), then call these
functions, so a PNG and the DICOM made from it give the same model input.
"""

from __future__ import annotations

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

    A constant image maps to zeros.
    """
    arr = np.asarray(arr, dtype=np.float64)
    if clip and arr.size:
        lo, hi = (float(v) for v in np.percentile(arr, CLIP_PERCENTILES))
        if hi > lo:
            return ((np.clip(arr, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def resize_for_model(arr: np.ndarray[Any, Any], size: int) -> np.ndarray[Any, Any]:
    """Resize a [0, 1] float image to ``size x size`` with the shared interpolation."""
    return cv2.resize(np.asarray(arr, dtype=np.float32), (size, size), interpolation=MODEL_INTERPOLATION)
