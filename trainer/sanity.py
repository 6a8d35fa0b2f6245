"""Saliency sanity check at export: cascading model-parameter randomization.

Adebayo et al., "Sanity checks for saliency maps" (NeurIPS 2018): re-initialise the
weights from the output backwards and watch the maps. A map that explains the model must
change once the weights that made the decision are gone; one that stays the same shows
the image (edges, brightness), not the model. Stages, cumulative: the head (every layer
with weights after the feature layer), then ``conv5_block3``, then the rest of ``conv5``.
After each stage the Grad-CAM of the same validation images is compared with the trained
model's by Spearman rank correlation, per image, on the raw feature-resolution map.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from scipy.stats import spearmanr

from trainer.errors import ExportError
from trainer.model import gradcam_tape, head_layers

#: (stage name, predicate on a layer name); the head stage is added from the model.
BACKBONE_STAGES: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("conv5_block3", lambda name: name.startswith("conv5_block3_")),
    ("conv5", lambda name: name.startswith("conv5_")),
)


def rank_correlation(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> float:
    """Spearman's rho of two maps. Two constant maps are the same map (1); one constant
    map against a varying one shares no ordering with it (0)."""
    fa, fb = np.ravel(a), np.ravel(b)
    flat_a, flat_b = bool(np.ptp(fa) == 0), bool(np.ptp(fb) == 0)
    if flat_a or flat_b:
        return 1.0 if flat_a and flat_b else 0.0
    return float(spearmanr(fa, fb).statistic)


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
    """Mean (and per-image) Spearman correlation of Grad-CAM with the trained model's,
    after each cumulative stage; the model's weights are restored afterwards."""
    _, reference = gradcam_tape(model, feature_layer, images)
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
            _, cam = gradcam_tape(model, feature_layer, images)
            rhos = [rank_correlation(r, c) for r, c in zip(reference, cam, strict=True)]
            results.append({"stage": name, "layers": len(layers), "spearman_mean": float(np.mean(rhos)),
                            "spearman": [round(r, 4) for r in rhos]})
    finally:
        for w, value in zip(model.weights, saved, strict=True):
            w.assign(value)
    return results


def sanity_check(
    model: keras.Model, feature_layer: str, images: np.ndarray[Any, Any], limit: float, *, seed: int = 0
) -> dict[str, Any]:
    """The check export records: passed when the fully randomised stage's mean
    correlation is at most ``limit``."""
    stages = cascading_randomization(model, feature_layer, images, seed=seed)
    final = stages[-1]["spearman_mean"]
    return {
        "method": "cascading model-parameter randomization (Adebayo et al. 2018), Spearman rank "
                  "correlation of Grad-CAM with the trained model's",
        "images": len(images),
        "stages": [{k: v for k, v in st.items() if k != "spearman"} for st in stages],
        "per_image": {st["stage"]: st["spearman"] for st in stages},
        "limit": limit,
        "passed": bool(final <= limit),
    }
