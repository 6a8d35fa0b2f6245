"""How well a heatmap points at an expert region, and the baselines it must beat.

Pure numpy/OpenCV, no TensorFlow. A heatmap may have any resolution (a raw Grad-CAM grid,
or a prior at the model's input size); regions are boolean masks at the input size.

* Pointing game (Zhang et al., ECCV 2016): a hit when the heatmap's maximum lies within a
  tolerance of the region. The maximum of a grid is the centre of its hottest cell (a bilinear
  upsampling peaks there). Where several cells tie (a uniform map ties everywhere) the hit is
  the share of tied maxima that hit: the expected score of picking one at random, not the
  accident of ``argmax`` choosing the first. The tolerance is a fraction of the image side.
* Energy in region: the share of the (bilinearly upsampled, non-negative) map inside the region.
* IoU: the map, upsampled, thresholded at half its own peak, against the region.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

Array = np.ndarray[Any, Any]

#: Zhang et al. used 15 px on PASCAL VOC / COCO images (about 450 px across): 15 / 448 of the
#: side. The old 15 px at 224 (6.7% of the side) was twice as lenient.
POINTING_TOLERANCE = 15 / 448
#: A map's region, for IoU, is where it reaches this fraction of its own peak.
IOU_LEVEL = 0.5


def upsample(heatmap: Array, size: int) -> Array:
    """Bilinear upsampling to ``size x size`` (a map already that size is returned as float32)."""
    h = np.asarray(heatmap, np.float32)
    if h.shape == (size, size):
        return h
    return cv2.resize(h, (size, size), interpolation=cv2.INTER_LINEAR)


def pointing_hit(heatmap: Array, region: Array, tolerance: float) -> float:
    """1.0 when the heatmap's peak is within ``tolerance`` (fraction of the side) of the
    region, 0.0 when not; the share of hits over tied peaks; 0.0 for a map with no positive
    value (Grad-CAM found no evidence)."""
    h = np.nan_to_num(np.asarray(heatmap, np.float64))
    size = region.shape[0]
    if not region.any() or float(h.max()) <= 0:
        return 0.0
    # Distance from every pixel to the nearest region pixel (0 inside).
    dist = cv2.distanceTransform((~region).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    ii, jj = np.nonzero(h >= h.max() - 1e-12 * max(1.0, abs(float(h.max()))))
    y = ((ii + 0.5) * size / h.shape[0]).astype(int).clip(0, size - 1)
    x = ((jj + 0.5) * size / h.shape[1]).astype(int).clip(0, size - 1)
    return float(np.mean(dist[y, x] <= tolerance * size))


def energy_in_region(heatmap: Array, region: Array) -> float:
    """Share of the non-negative upsampled map inside the region (0 for an empty map)."""
    up = np.clip(upsample(heatmap, region.shape[0]), 0, None)
    total = float(up.sum())
    return float(up[region].sum() / total) if total > 0 else 0.0


def iou(heatmap: Array, region: Array, level: float = IOU_LEVEL) -> float:
    """Intersection over union of ``map >= level * peak`` (upsampled) with the region."""
    up = upsample(heatmap, region.shape[0])
    peak = float(up.max())
    if peak <= 0:
        return 0.0
    mask = up >= level * peak
    union = float(np.sum(mask | region))
    return float(np.sum(mask & region) / union) if union else 0.0


def scores(heatmap: Array, region: Array, tolerance: float = POINTING_TOLERANCE) -> dict[str, float]:
    """Every localisation score of one map: pointing game at ``tolerance`` and at zero
    tolerance (the peak inside the region), energy in region, IoU."""
    return {
        "pointing_game": pointing_hit(heatmap, region, tolerance),
        "pointing_game_zero_tolerance": pointing_hit(heatmap, region, 0.0),
        "energy_in_region": energy_in_region(heatmap, region),
        "iou": iou(heatmap, region),
    }


def centre_prior(size: int) -> Array:
    """A Gaussian at the image centre (sigma = size / 4): it points at the mediastinum."""
    yy, xx = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2
    return np.exp(-((xx - c) ** 2 + (yy - c) ** 2) / (2 * (size / 4) ** 2))


def uniform_prior(size: int) -> Array:
    """A flat map: its energy in a region is the region's share of the image."""
    return np.ones((size, size), np.float64)


def data_prior(regions: list[Array]) -> Array | None:
    """The mean of the training split's regions: where opacities usually are, per pixel.

    A method that does not beat it has learnt where pneumonia tends to be, not where it is
    in this image.
    """
    if not regions:
        return None
    return np.mean(np.stack([r.astype(np.float64) for r in regions]), axis=0)
