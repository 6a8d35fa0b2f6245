"""Per-image heatmap faithfulness: does the model depend on the region its heatmap points at
more than on other regions of the same shape?

A ROAD-style deletion test (Rong et al., "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ICML 2022). The hottest cells of the Grad-CAM grid, :data:`FRACTION` of
the image, form the *hot region*. It is removed, and so, one at a time, are :data:`N_RANDOM`
copies of the same region moved to other places on the image (shifted, wrapping at the edges,
not overlapping it), so the comparison is between regions of the same shape and area: a blob
against blobs, never a blob against scattered cells.

Removal fills the region with what that place looks like on an average negative training image
(the model's *healthy reference*, stored in its metadata), brought to this image's brightness
and contrast, plus ROAD's small noise term (:data:`NOISE`). An average of the neighbouring
pixels, ROAD's own fill, is the wrong counterfactual on a chest radiograph: a dark lung field
is bordered by bright chest wall and mediastinum, so the average paints a new opacity where one
was removed (on the phantoms it raised the logit whatever was removed).

The score is the difference, in the model's calibrated logit, between removing the moved copies
(on average) and removing the hot region:

    faithfulness = mean(logit with a moved copy removed) - logit with the hot region removed

Positive: removing the highlighted region lowers the pneumonia logit more than removing the
same shape elsewhere, by that many logits. The logit is the graph's calibrated ``logit`` output
(``evaluate`` divides by the same temperature), so the worker, ``evaluate`` and ``export``
compute the same number for the same image; a site's prevalence adds a constant to the logit,
which cancels in the difference.

"Above chance" needs a null: maps that know nothing about the image (uniform random grids, a
centred Gaussian and a constant map) are scored the same way on validation images at export, and
the cut-off is the split-conformal quantile of their scores at :data:`NULL_RATE` (the largest of
the three families'), stored in the model's metadata (``Meta.FAITHFULNESS_CUTOFF``). A map above the
cut-off shows a region the model depends on more than a knowledge-free map's region would, on
all but about :data:`NULL_RATE` of images; it does NOT show that the region is the disease.
A knowledge-free map's region sometimes lands on the opacity by luck, and then it is as good as
any map: those lucky hits set the cut-off, which is why the hot region is small (a lucky hit is
rarer).

Every random choice here has a fixed seed and none depends on the map's values, so the same
image gets the same regions in TensorFlow and in ONNX Runtime at any precision; the only
float-noise dependence left is a near-tie in which cells are hottest.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from cxr_contract.pixels import finite_or_ends

Array = np.ndarray[Any, Any]

#: Fraction of the image's cells in the hot region (rounded to whole Grad-CAM cells, at least one):
#: small, so that a knowledge-free map's region seldom covers an opacity by luck.
FRACTION = 0.1
#: Moved copies of the hot region each image is compared with (the score's null sample).
N_RANDOM = 8
#: A moved copy may overlap the hot region by at most this fraction of its area: none, so that
#: removing a copy never removes part of what the hot region removes.
MAX_OVERLAP = 0.0
#: Width (Gaussian sigma, pixels) of the edge over which a reference fill blends into the image.
FEATHER_PX = 2.0
#: ROAD's noise term: standard deviation of the noise added to imputed pixels (image in [0, 1]).
NOISE = 0.01
#: Share of knowledge-free maps allowed above the cut-off on validation images.
NULL_RATE = 0.03
#: Uniform random grids scored per validation image for the null (beside one centred Gaussian
#: and one constant map).
NULL_RANDOM_MAPS = 4
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



#: Training negatives averaged into the reference image at most (a seeded sample beyond that).
REFERENCE_MAX_IMAGES = 2000


def reference_image(images: Array) -> Array:
    """The healthy reference a removed region is filled from: the pixel-wise mean of negative
    training images (``[N, S, S]`` or ``[N, S, S, 1]`` in [0, 1]) as ``[S, S]`` float32, rounded
    to the 16 bits it is stored in, so whoever computes it and whoever reads it back from a
    model's metadata fill with the same numbers."""
    arr = np.asarray(images, np.float64)
    if arr.ndim == 4:
        arr = arr[..., 0]
    if arr.ndim != 3 or not len(arr):
        raise ValueError("a faithfulness reference needs at least one [S, S] image")
    mean = np.clip(finite_or_ends(arr, 0.0, 1.0).mean(axis=0), 0.0, 1.0)
    return (np.round(mean * 65535.0) / 65535.0).astype(np.float32)


def encode_reference(reference: Array) -> str:
    """The reference as a base64 16-bit PNG (a model metadata value, ~50 KB at 224 px)."""
    ok, png = cv2.imencode(".png", np.round(np.clip(reference, 0, 1) * 65535.0).astype(np.uint16))
    if not ok:
        raise ValueError("could not encode the faithfulness reference as PNG")
    return base64.b64encode(png.tobytes()).decode("ascii")


def decode_reference(text: str, size: int) -> Array:
    """:func:`encode_reference`'s text back to ``[size, size]`` float32; ValueError when it is
    not a 16-bit grayscale PNG of that size."""
    try:
        raw = np.frombuffer(base64.b64decode(text, validate=True), np.uint8)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not base64 ({exc})") from None
    img = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
    if img is None or img.dtype != np.uint16 or img.shape != (size, size):
        got = "not a PNG" if img is None else f"{img.dtype} {img.shape}"
        raise ValueError(f"not a {size}x{size} 16-bit PNG ({got})")
    return (img.astype(np.float64) / 65535.0).astype(np.float32)


def _reference_fill(plane: Array, keep: Array, reference: Array) -> Array:
    """The reference brought to this image's brightness and contrast: the least-squares line
    ``a * reference + b`` through the kept pixels (exposure, gamma and windowing differ per image)."""
    ref = reference.astype(np.float64)
    if not keep.any():
        return ref
    r, v = ref[keep], plane[keep].astype(np.float64)
    var = float(r.var())
    a = float(((r - r.mean()) * (v - v.mean())).mean()) / var if var > 1e-12 else 0.0
    return a * ref + (float(v.mean()) - a * float(r.mean()))


def impute(image: Array, mask: Array, noise: float = NOISE, reference: Array | None = None) -> Array:
    """Fill ``mask`` in a ``[S, S]`` or ``[S, S, 1]`` float image in [0, 1]; same shape, float32.

    With a ``reference`` (the model's healthy reference, :func:`reference_image`), the region
    becomes what that place looks like on an average negative image, at this image's brightness
    and contrast (:func:`_reference_fill`), blended over a 2-pixel feathered edge: removing an
    opacity leaves healthy-looking lung, where an average of the neighbours would pull the
    bright chest wall and mediastinum into a dark lung field and paint a new opacity. Without
    one (models exported before the reference), ROAD's noisy linear imputation: each removed
    pixel becomes a smooth average of its kept neighbours (normalised convolution with a
    Gaussian). Either way ROAD's noise (seeded, the same for every image of a size) is added.
    NaN and -inf count as 0, +inf as 1 (:func:`~cxr_contract.pixels.finite_or_ends`).
    """
    arr = finite_or_ends(np.asarray(image, np.float32), 0.0, 1.0)
    plane = arr[..., 0] if arr.ndim == 3 else arr
    if not mask.any():
        return arr.copy()
    if reference is not None:
        if reference.shape != plane.shape:
            raise ValueError(f"faithfulness reference is {reference.shape}, the image {plane.shape}")
        fill = _reference_fill(plane, ~mask, reference)
        if noise > 0:
            fill = fill + np.random.default_rng(NOISE_SEED).normal(0.0, noise, plane.shape)
        weight = np.maximum(cv2.GaussianBlur(mask.astype(np.float32), (0, 0), FEATHER_PX), mask)
        blended = (weight * fill + (1.0 - weight) * plane).astype(np.float32)
        return blended[..., None] if arr.ndim == 3 else blended
    keep = (~mask).astype(np.float32)
    sigma = max(2.0, plane.shape[0] / 16)
    num = cv2.GaussianBlur(plane * keep, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    den = cv2.GaussianBlur(keep, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    fill = np.where(den > 1e-6, num / np.maximum(den, 1e-6), float(plane[~mask].mean()) if keep.any() else 0.0)
    if noise > 0:
        fill = fill + np.random.default_rng(NOISE_SEED).normal(0.0, noise, plane.shape).astype(np.float32)
    filled = np.where(mask, fill, plane).astype(np.float32)
    return filled[..., None] if arr.ndim == 3 else filled


def perturbed_inputs(image: Array, gradcam: Array, fraction: float = FRACTION,
                     reference: Array | None = None) -> Array:
    """The :data:`INPUTS_PER_IMAGE` model inputs of one image, stacked: the hot region
    removed first, then each moved copy of it removed (filled from ``reference``, see :func:`impute`)."""
    size = int(image.shape[0])
    hot = ranked_cell_mask(gradcam, size, fraction)
    return np.stack([impute(image, m, reference=reference) for m in (hot, *moved_regions(hot))]).astype(np.float32)


def score(logits: Array) -> float:
    """Faithfulness (see the module docstring), in logits, from one image's
    :data:`INPUTS_PER_IMAGE` logits in :func:`perturbed_inputs` order: how much more removing
    the hot region lowers the logit than removing a moved copy of it does, on average."""
    z = np.asarray(logits, np.float64).ravel()
    return float(z[1:].mean() - z[0])


def above_chance(value: float, cutoff: float) -> bool:
    """The per-image verdict: the score exceeds the model's null cut-off."""
    return value > cutoff


def verdict(value: float, cutoff: float) -> str:
    return "above chance" if above_chance(value, cutoff) else "not above chance"


def scores(logit_of: Callable[[Array], Array], images: Array, maps: Array, batch_images: int = 8,
           reference: Array | None = None) -> Array:
    """:func:`score` of each image against its map (``[N, h, w]``, or one ``[h, w]`` map for all),
    ``logit_of`` taking ``[M, S, S, 1]`` inputs to ``M`` calibrated logits."""
    grids = np.broadcast_to(maps, (len(images), *np.shape(maps)[-2:]))
    out: list[float] = []
    for i in range(0, len(images), batch_images):
        stacked = np.concatenate([perturbed_inputs(images[k], grids[k], reference=reference)
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
                rate: float = NULL_RATE, reference: Array | None = None) -> dict[str, Any]:
    """The "above chance" cut-off from knowledge-free maps on ``images`` (validation images):
    :data:`NULL_RANDOM_MAPS` uniform random grids per image, the centred Gaussian and a constant
    map (its ties broken by cell index: always the same corner), each family's conformal quantile
    at ``rate``, the largest of the three kept."""
    h, w = grid
    n = len(images)
    rand = random_maps(n * NULL_RANDOM_MAPS, h, w)
    reps = np.repeat(images, NULL_RANDOM_MAPS, axis=0)
    families = {"random_map": scores(logit_of, reps, rand, reference=reference),
                "centre_map": scores(logit_of, images, centre_map(h, w), reference=reference),
                "constant_map": scores(logit_of, images, np.ones((h, w)), reference=reference)}
    cut = {name: conformal_cutoff(v, rate) for name, v in families.items()}
    worst = max(cut, key=lambda name: cut[name][0])
    return {
        "cutoff": cut[worst][0], "rate": rate, "bound": max(b for _, b in cut.values()), "images": n,
        "from": worst, "per_family": {name: {"cutoff": c, "n": len(families[name]),
                                             "mean": float(families[name].mean())} for name, (c, _) in cut.items()},
        "score": f"logit drop of the hot region's removal beyond the mean of {N_RANDOM} moved copies', "
                 "calibrated logit",
        "fill": "healthy reference" if reference is not None else "local mean",
        "fraction": FRACTION,
    }
