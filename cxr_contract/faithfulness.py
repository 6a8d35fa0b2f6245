"""Per-image heatmap faithfulness: does removing what the heatmap points at change the answer?

A ROAD-style deletion test (Rong et al., "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ICML 2022; pytorch-grad-cam's ``ROADMostRelevantFirst`` and
confidence-drop metrics follow it). The hottest cells of the Grad-CAM grid, a fixed fraction of
the image, are removed and filled in by an imputation that does not create new edges
(a Gaussian-weighted mean of the kept neighbours, ROAD's linear imputation without its noise
term, which is deterministic and about a millisecond at 224 px); so are the same number of cells
chosen at random. The score is how much more the logit drops for the
heatmap's region than for the random one:

    faithfulness = (logit - logit_hot_removed) - (logit - logit_random_removed)
                 = logit_random_removed - logit_hot_removed

in logit units. Positive: the heatmap points at evidence the model uses ("high"); zero or
negative: removing the highlighted area changes the answer no more than removing any area
("low"). Both sides call these functions, so the worker's per-image number and ``evaluate``'s
test-split number are the same metric.
"""

from __future__ import annotations

import hashlib
from typing import Any

import cv2
import numpy as np

from cxr_contract.pixels import finite_or_ends

#: Fraction of the image's cells removed (rounded to whole Grad-CAM cells, at least one).
FRACTION = 0.2
#: A score above this margin (logit units) is reported as "high".
HIGH_MARGIN = 0.0


def cells_to_remove(gradcam: np.ndarray[Any, Any], fraction: float = FRACTION) -> int:
    return max(1, round(fraction * gradcam.size))


def ranked_cell_mask(gradcam: np.ndarray[Any, Any], size: int, fraction: float = FRACTION, *,
                     most_relevant: bool = True) -> np.ndarray[Any, Any]:
    """Boolean ``[size, size]`` mask of the ``fraction`` hottest (or coldest) Grad-CAM cells.

    Ties are broken by cell index, so a flat map still removes exactly that many cells. A NaN
    cell counts as 0, +inf as the hottest and -inf as the coldest.
    """
    k = cells_to_remove(gradcam, fraction)
    flat = np.nan_to_num(np.asarray(gradcam, np.float64)).ravel()  # +-inf: +-the largest float
    order = np.argsort(-flat if most_relevant else flat, kind="stable")[:k]
    cells = np.zeros(flat.size, np.uint8)
    cells[order] = 1
    return _upsample_cells(cells.reshape(gradcam.shape), size)


def random_cell_mask(gradcam: np.ndarray[Any, Any], size: int, fraction: float = FRACTION,
                     seed: int | None = None) -> np.ndarray[Any, Any]:
    """As many cells as :func:`ranked_cell_mask` removes, chosen at random.

    Without a seed the choice is derived from the map's bytes: the same image gives the
    same score in the worker and in ``evaluate``.
    """
    if seed is None:
        seed = int.from_bytes(hashlib.sha256(np.ascontiguousarray(gradcam, np.float32).tobytes()).digest()[:8])
    rng = np.random.default_rng(seed)
    k = cells_to_remove(gradcam, fraction)
    cells = np.zeros(gradcam.size, np.uint8)
    cells[rng.choice(gradcam.size, size=k, replace=False)] = 1
    return _upsample_cells(cells.reshape(gradcam.shape), size)


def _upsample_cells(cells: np.ndarray[Any, Any], size: int) -> np.ndarray[Any, Any]:
    return cv2.resize(cells, (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)


def impute(image: np.ndarray[Any, Any], mask: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Fill ``mask`` with a weighted mean of the pixels around it (normalised convolution with a
    Gaussian), in a ``[S, S]`` or ``[S, S, 1]`` float image in [0, 1]; same shape, float32.

    Like ROAD's linear imputation, each removed pixel becomes a smooth average of its kept
    neighbours, so the fill adds no edges for the model to react to; unlike an inpainting
    solver it costs about a millisecond at 224 px. NaN and -inf count as 0, +inf as 1
    (:func:`~cxr_contract.pixels.finite_or_ends`): a blur would spread a NaN over its whole
    kernel.
    """
    arr = finite_or_ends(np.asarray(image, np.float32), 0.0, 1.0)
    plane = arr[..., 0] if arr.ndim == 3 else arr
    if not mask.any():
        return arr.copy()
    keep = (~mask).astype(np.float32)
    sigma = max(2.0, plane.shape[0] / 16)
    num = cv2.GaussianBlur(plane * keep, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    den = cv2.GaussianBlur(keep, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    fill = np.where(den > 1e-6, num / np.maximum(den, 1e-6), float(plane[~mask].mean()) if keep.any() else 0.0)
    filled = np.where(mask, fill, plane).astype(np.float32)
    return filled[..., None] if arr.ndim == 3 else filled


def perturbed_inputs(image: np.ndarray[Any, Any], gradcam: np.ndarray[Any, Any],
                     fraction: float = FRACTION) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The model inputs with the hottest cells removed and with as many random cells removed."""
    size = int(image.shape[0])
    hot = impute(image, ranked_cell_mask(gradcam, size, fraction))
    rand = impute(image, random_cell_mask(gradcam, size, fraction))
    return hot, rand


def score(logit_hot_removed: float, logit_random_removed: float) -> float:
    """Faithfulness in logit units (see the module docstring)."""
    return float(logit_random_removed - logit_hot_removed)


def is_high(value: float) -> bool:
    return value > HIGH_MARGIN
