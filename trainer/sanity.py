"""Saliency sanity check at export: cascading model-parameter randomization.

Adebayo et al., "Sanity checks for saliency maps" (NeurIPS 2018): re-initialise the
weights from the output backwards and watch the maps. A map that explains the model must
change once the weights that made the decision are gone; one that stays the same shows
the image (edges, brightness), not the model. Stages, cumulative: the head (every layer
with weights after the feature layer), then ``conv5_block3``, then the rest of ``conv5``.
After each stage the pre-ReLU Grad-CAM (``gradcam_raw``: after the ReLU a randomised map is
often all zero, which says nothing) of the same validation images is compared with the trained
model's by the absolute Spearman rank correlation, per image, at feature resolution: an
anti-correlated map depends on the weights no less than a correlated one.

Each stage gets its own verdict: ``passed`` (mean |rho| at most the limit: the map changed),
``failed`` (it did not) or ``inconclusive`` (the grid has fewer than :data:`MIN_CELLS` cells to
rank, or most maps are constant). The check fails when any stage fails, is inconclusive when
none fails and one is inconclusive, and passes otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from scipy.stats import spearmanr

from trainer.errors import ExportError
from trainer.model import gradcam_tape_parts, head_layers

#: (stage name, predicate on a layer name); the head stage is added from the model.
BACKBONE_STAGES: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("conv5_block3", lambda name: name.startswith("conv5_block3_")),
    ("conv5", lambda name: name.startswith("conv5_")),
)


#: Fewest Grad-CAM cells a rank correlation is judged on: a 4x4 grid (128-px input at
#: ResNet-50's stride 32). On a 2x2 grid (64 px) rho takes a handful of values, and |rho| of
#: two unrelated maps exceeds 0.5 more often than not.
MIN_CELLS = 16
VERDICTS = ("passed", "failed", "inconclusive")


def rank_correlation(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> float | None:
    """Spearman's rho of two maps; None when either is constant (it has no ordering to compare)."""
    fa, fb = np.ravel(a), np.ravel(b)
    if np.ptp(fa) == 0 or np.ptp(fb) == 0:
        return None
    return float(spearmanr(fa, fb).statistic)


def stage_verdict(rhos: list[float | None], cells: int, limit: float) -> tuple[str, float | None, str]:
    """(verdict, mean |rho| over the images with a defined rho, why) of one stage."""
    defined = [abs(r) for r in rhos if r is not None]
    mean = float(np.mean(defined)) if defined else None
    if cells < MIN_CELLS:
        return "inconclusive", mean, f"a {cells}-cell grid is too coarse to rank (at least {MIN_CELLS} cells)"
    if 2 * len(defined) <= len(rhos):
        return "inconclusive", mean, f"{len(rhos) - len(defined)} of {len(rhos)} maps constant"
    assert mean is not None
    if mean <= limit:
        return "passed", mean, f"mean |rho| {mean:.3f} <= {limit:g}: the maps changed"
    return "failed", mean, f"mean |rho| {mean:.3f} > {limit:g}: the maps did not change"


def overall_verdict(stages: list[str]) -> str:
    if "failed" in stages:
        return "failed"
    return "inconclusive" if "inconclusive" in stages or not stages else "passed"


def _reinitialise(layer: keras.layers.Layer, seed: int) -> None:
    """Draw every weight of ``layer`` afresh from its own initializer (seeded)."""
    for i, w in enumerate(layer.weights):
        name = w.path.rsplit("/", 1)[-1]
        init = getattr(layer, f"{name}_initializer", None)
        if init is None:
            raise ExportError(f"sanity check: cannot re-initialise weight {w.path!r} of layer {layer.name!r} "
                              "(no initializer for it)")
        config = init.get_config()
        if "seed" in config:
            init = type(init).from_config({**config, "seed": seed + i})
        w.assign(keras.ops.cast(init(w.shape, dtype=w.dtype), w.dtype))


def cascading_randomization(
    model: keras.Model, feature_layer: str, images: np.ndarray[Any, Any], *, seed: int = 0
) -> list[dict[str, Any]]:
    """Per-image Spearman correlation (None: a constant map) of the pre-ReLU Grad-CAM with the
    trained model's, after each cumulative stage; the model's weights are restored afterwards."""
    reference = gradcam_tape_parts(model, feature_layer, images)["gradcam_raw"]
    head = [layer for layer in head_layers(model, feature_layer) if layer.weights]
    stages: list[tuple[str, list[keras.layers.Layer]]] = [("head", head)]
    done = {layer.name for layer in head}
    for name, chosen in BACKBONE_STAGES:
        layers = [layer for layer in model.layers if chosen(layer.name) and layer.weights and layer.name not in done]
        done |= {layer.name for layer in layers}
        if layers:
            stages.append((name, layers))
    saved = [keras.ops.convert_to_numpy(w) for w in model.weights]
    results = []
    try:
        for s, (name, layers) in enumerate(stages):
            for j, layer in enumerate(layers):
                _reinitialise(layer, seed + 1000 * s + 10 * j)
            cam = gradcam_tape_parts(model, feature_layer, images)["gradcam_raw"]
            rhos = [rank_correlation(r, c) for r, c in zip(reference, cam, strict=True)]
            results.append({"stage": name, "layers": len(layers), "cells": int(np.prod(cam.shape[1:])),
                            "spearman": [None if r is None else round(r, 4) for r in rhos]})
    finally:
        for w, value in zip(model.weights, saved, strict=True):
            w.assign(value)
    return results


def sanity_check(
    model: keras.Model, feature_layer: str, images: np.ndarray[Any, Any], limit: float, *, seed: int = 0
) -> dict[str, Any]:
    """The check export records: a verdict per stage (:func:`stage_verdict`) and overall."""
    stages = cascading_randomization(model, feature_layer, images, seed=seed)
    summary = []
    for st in stages:
        verdict, mean, why = stage_verdict(st["spearman"], st["cells"], limit)
        summary.append({"stage": st["stage"], "layers": st["layers"], "cells": st["cells"],
                        "abs_spearman_mean": None if mean is None else round(mean, 4),
                        "constant_maps": sum(r is None for r in st["spearman"]), "verdict": verdict, "why": why})
    verdict = overall_verdict([st["verdict"] for st in summary])
    return {
        "method": "cascading model-parameter randomization (Adebayo et al. 2018), absolute Spearman rank "
                  "correlation of the pre-ReLU Grad-CAM with the trained model's, decided per stage",
        "images": len(images),
        "min_cells": MIN_CELLS,
        "stages": summary,
        "per_image": {st["stage"]: st["spearman"] for st in stages},
        "limit": limit,
        "verdict": verdict,
        "passed": verdict == "passed",
    }
