"""Per-image heatmap faithfulness: does the model depend on the region its heatmap points at
more than on other regions of the same shape?

A ROAD-style deletion test (Rong et al., "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ICML 2022). The hottest cells of the Grad-CAM grid, :data:`FRACTION` of
the image, form the *hot region*. It is removed, and so, one at a time, are :data:`N_RANDOM`
copies of the same region moved to other places on the image (shifted, wrapping at the
edges), so the comparison is between regions of the same shape and area: a blob against
blobs, never a blob against scattered cells. Removal is ROAD's noisy linear imputation: each
removed pixel becomes a Gaussian-weighted mean of the kept pixels around it plus a little
noise (:data:`NOISE`), which adds no edges for the model to react to.

The score is a z-score of the hot region's removal against the moved regions':

    faithfulness = (mean(logit_moved_removed) - logit_hot_removed) / max(sd(logit_moved_removed), SD_FLOOR)

Positive: removing the hot region lowers the pneumonia logit more than removing the same shape
elsewhere. A z-score is free of the logit's scale; where the logit is used it is the
model's calibrated logit (the worker's ``logit`` output; ``evaluate`` divides by the same
temperature), so the worker and ``evaluate`` compute the same number for the same image.

"Above chance" needs a null: maps that know nothing about the image (uniform random grids and
a centred Gaussian) are scored the same way on validation images at export, and the cut-off is
the split-conformal quantile of their scores at :data:`NULL_RATE` (the larger of the two
families'), stored in the model's metadata (``Meta.FAITHFULNESS_CUTOFF``). A map above the
cut-off shows a region the model depends on more than a knowledge-free map's region would, on
all but about :data:`NULL_RATE` of images; it does NOT show that the region is the disease.

Every random choice here has a fixed seed and none depends on the map's values, so the same
image gets the same regions in TensorFlow and in ONNX Runtime at any precision; the only
float-noise dependence left is a near-tie in which cells are hottest.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from cxr_contract.pixels import finite_or_ends

Array = np.ndarray[Any, Any]

#: Fraction of the image's cells in the hot region (rounded to whole Grad-CAM cells, at least one).
FRACTION = 0.2
#: Moved copies of the hot region each image is compared with (the score's null sample).
N_RANDOM = 8
#: A moved copy may overlap the hot region by at most this fraction of its area.
MAX_OVERLAP = 0.5
#: ROAD's noise term: standard deviation of the noise added to imputed pixels (image in [0, 1]).
NOISE = 0.01
#: The z-score's denominator is at least this many logits: where no removal changes the
#: answer, float noise must not turn into a large z.
SD_FLOOR = 0.05
#: Share of knowledge-free maps allowed above the cut-off on validation images.
NULL_RATE = 0.02
#: Uniform random grids scored per validation image for the null (beside one centred Gaussian).
NULL_RANDOM_MAPS = 2
#: Seeds: fixed, so the regions and noise never depend on the map's (backend-specific) values.
OFFSET_SEED, NOISE_SEED, NULL_SEED = 20240607, 7, 11
#: Model inputs per image: the hot region removed, then each moved copy removed.
INPUTS_PER_IMAGE = 1 + N_RANDOM


def cells_to_remove(gradcam: Array, fraction: float = FRACTION) -> int:
    return max(1, round(fraction * gradcam.size))


def ranked_cell_mask(gradcam: Array, size: int, fraction: float = FRACTION, *,
                     most_relevant: bool = True) -> Array:
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


def random_cell_mask(gradcam: Array, size: int, fraction: float = FRACTION, seed: int = NULL_SEED) -> Array:
    """As many cells as :func:`ranked_cell_mask` removes, scattered at random (the deletion
    curves' random order; seeded, never from the map's values)."""
    rng = np.random.default_rng(seed)
    k = cells_to_remove(gradcam, fraction)
    cells = np.zeros(gradcam.size, np.uint8)
    cells[rng.choice(gradcam.size, size=k, replace=False)] = 1
    return _upsample_cells(cells.reshape(gradcam.shape), size)


def _upsample_cells(cells: Array, size: int) -> Array:
    return cv2.resize(cells, (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)


def moved_regions(hot: Array, n: int = N_RANDOM) -> list[Array]:
    """``n`` copies of the boolean mask ``hot``, each shifted by an offset from a fixed seeded
    sequence (wrapping at the edges: same shape, same area), keeping those that overlap
    ``hot`` by at most :data:`MAX_OVERLAP`; the least overlapping ones fill up when too few do."""
    size_y, size_x = hot.shape
    area = max(int(hot.sum()), 1)
    rng = np.random.default_rng(OFFSET_SEED)
    kept: list[Array] = []
    overlapping: list[tuple[float, int, Array]] = []
    for dy, dx in rng.integers(0, (size_y, size_x), size=(16 * n, 2)):
        moved = np.roll(hot, (int(dy), int(dx)), axis=(0, 1))
        overlap = float(np.logical_and(moved, hot).sum()) / area
        if overlap <= MAX_OVERLAP:
            kept.append(moved)
            if len(kept) == n:
                return kept
        else:
            overlapping.append((overlap, len(overlapping), moved))
    overlapping.sort(key=lambda c: (c[0], c[1]))
    return kept + [c[2] for c in overlapping[:n - len(kept)]]



def impute(image: Array, mask: Array, noise: float = NOISE) -> Array:
    """Fill ``mask`` with a weighted mean of the pixels around it plus ROAD's noise, in a
    ``[S, S]`` or ``[S, S, 1]`` float image in [0, 1]; same shape, float32.

    Like ROAD's noisy linear imputation, each removed pixel becomes a smooth average of its
    kept neighbours (normalised convolution with a Gaussian), so the fill adds no edges for
    the model to react to; the noise (seeded, the same for every image of a size) keeps the
    fill from being a perfectly smooth, recognisable patch. NaN and -inf count as 0, +inf as 1
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
    if noise > 0:
        fill = fill + np.random.default_rng(NOISE_SEED).normal(0.0, noise, plane.shape).astype(np.float32)
    filled = np.where(mask, fill, plane).astype(np.float32)
    return filled[..., None] if arr.ndim == 3 else filled


def perturbed_inputs(image: Array, gradcam: Array, fraction: float = FRACTION) -> Array:
    """The :data:`INPUTS_PER_IMAGE` model inputs of one image, stacked: the hot region
    removed first, then each moved copy of it removed."""
    size = int(image.shape[0])
    hot = ranked_cell_mask(gradcam, size, fraction)
    return np.stack([impute(image, m) for m in (hot, *moved_regions(hot))]).astype(np.float32)


def score(logits: Array) -> float:
    """Faithfulness z-score (see the module docstring) from one image's :data:`INPUTS_PER_IMAGE`
    logits, in :func:`perturbed_inputs` order."""
    z = np.asarray(logits, np.float64).ravel()
    hot, moved = z[0], z[1:]
    return float((moved.mean() - hot) / max(float(moved.std(ddof=1)), SD_FLOOR))


def above_chance(value: float, cutoff: float) -> bool:
    """The per-image verdict: the score exceeds the model's null cut-off."""
    return value > cutoff


def verdict(value: float, cutoff: float) -> str:
    return "above chance" if above_chance(value, cutoff) else "not above chance"


def scores(logit_of: Callable[[Array], Array], images: Array, maps: Array, batch_images: int = 8) -> Array:
    """:func:`score` of each image against its map (``[N, h, w]``, or one ``[h, w]`` map for all),
    ``logit_of`` taking ``[M, S, S, 1]`` inputs to ``M`` calibrated logits."""
    grids = np.broadcast_to(maps, (len(images), *np.shape(maps)[-2:]))
    out: list[float] = []
    for i in range(0, len(images), batch_images):
        stacked = np.concatenate([perturbed_inputs(images[k], grids[k])
                                  for k in range(i, min(i + batch_images, len(images)))])
        z = np.asarray(logit_of(stacked), np.float64).reshape(-1, INPUTS_PER_IMAGE)
        out += [score(row) for row in z]
    return np.array(out)


def centre_map(h: int, w: int) -> Array:
    """A centred Gaussian grid (sigma a quarter of the side): a map that points at the middle
    of every image."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.exp(-(((yy - (h - 1) / 2) / (h / 4)) ** 2 + ((xx - (w - 1) / 2) / (w / 4)) ** 2) / 2)


def random_maps(n: int, h: int, w: int, seed: int = NULL_SEED) -> Array:
    return np.random.default_rng(seed).random((n, h, w))


def conformal_cutoff(values: Array, rate: float) -> tuple[float, float]:
    """Split-conformal quantile of null ``values`` at ``rate``: (cut-off, bound on the share of
    exchangeable null scores above it: max(rate, 1 / (n + 1)))."""
    s = np.sort(np.asarray(values, np.float64).ravel())
    if not len(s):
        raise ValueError("no null scores to set a faithfulness cut-off from")
    k = math.ceil((len(s) + 1) * (1 - rate))
    if k > len(s):
        return float(s[-1]), 1.0 / (len(s) + 1)
    return float(s[k - 1]), float(rate)


def null_cutoff(logit_of: Callable[[Array], Array], images: Array, grid: tuple[int, int],
                rate: float = NULL_RATE) -> dict[str, Any]:
    """The "above chance" cut-off from knowledge-free maps on ``images`` (validation images):
    :data:`NULL_RANDOM_MAPS` uniform random grids per image and the centred Gaussian, each
    family's conformal quantile at ``rate``, the larger of the two kept."""
    h, w = grid
    n = len(images)
    rand = random_maps(n * NULL_RANDOM_MAPS, h, w)
    reps = np.repeat(images, NULL_RANDOM_MAPS, axis=0)
    families = {"random_map": scores(logit_of, reps, rand), "centre_map": scores(logit_of, images, centre_map(h, w))}
    cut = {name: conformal_cutoff(v, rate) for name, v in families.items()}
    worst = max(cut, key=lambda name: cut[name][0])
    return {
        "cutoff": cut[worst][0], "rate": rate, "bound": max(b for _, b in cut.values()), "images": n,
        "from": worst, "per_family": {name: {"cutoff": c, "n": len(families[name]),
                                             "mean": float(families[name].mean())} for name, (c, _) in cut.items()},
        "score": f"z of the hot region's removal against {N_RANDOM} moved copies, calibrated logit",
        "fraction": FRACTION,
    }
