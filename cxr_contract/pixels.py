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


def to_unit_range(arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Linearly map the image's own value range onto [0, 1] (float32).

    A constant image maps to zeros.
    """
    arr = np.asarray(arr, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def resize_for_model(arr: np.ndarray[Any, Any], size: int) -> np.ndarray[Any, Any]:
    """Resize a [0, 1] float image to ``size x size`` with the shared interpolation."""
    return cv2.resize(np.asarray(arr, dtype=np.float32), (size, size), interpolation=MODEL_INTERPOLATION)
