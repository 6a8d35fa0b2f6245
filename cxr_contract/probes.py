"""Probe inputs and the fp32 model's outputs on them, carried in a reduced-precision model's
metadata (``Meta.PROBES``), so that the host that serves the model can check it answers like
the fp32 model on its own CPU or GPU: int8 kernels differ between instruction sets (with and
without VNNI), and a model verified where it was exported can answer differently elsewhere.

The inputs are stored as uint8 (the model sees ``value / 255``, so the stored inputs are
exactly what was run), zlib-compressed, base64; the outputs as JSON numbers; the limits are the
export's own (:data:`trainer.quantize.LIMITS`), written beside them.
"""

from __future__ import annotations

import base64
import json
import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]

#: The limits checked at load: the continuous numbers, since a decision or a verdict on a few
#: probes follows from them (``max`` upper bounds, ``min`` lower bounds).
CHECKED = ("probability_max_abs_diff", "gradcam_mean_pearson", "ood_score_max_rel_diff")


def as_probe_inputs(images: Array) -> Array:
    """Images ``[N, S, S, 1]`` in [0, 1] rounded to the 256 levels a probe is stored with."""
    return (np.rint(np.clip(np.asarray(images, np.float64), 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def map_pearson(ref: Array, got: Array, scale: float) -> Array:
    """Pearson correlation of each pair of maps. A map with no variance (all zero after the
    ReLU, or a 1x1 grid) has none: the pair counts 1 when the maps differ nowhere by more than
    1% of ``scale`` (the value drawn as full colour), else 0."""
    n = len(ref)
    a = np.asarray(ref).reshape(n, -1).astype(np.float64)
    b = np.asarray(got).reshape(n, -1).astype(np.float64)
    a_c, b_c = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a_c**2).sum(axis=1) * (b_c**2).sum(axis=1))
    flat = den <= 1e-12 * max(scale, 1e-12) ** 2
    r = np.where(flat, 0.0, (a_c * b_c).sum(axis=1) / np.where(flat, 1.0, den))
    same = np.abs(a - b).max(axis=1) <= 0.01 * scale
    return np.where(flat, same.astype(np.float64), r)


@dataclass(frozen=True)
class Probes:
    """Probe inputs ``[N, S, S, 1]`` and the fp32 model's outputs on them."""

    inputs: Array
    probability: Array
    gradcam: Array
    ood_score: Array
    limits: dict[str, tuple[str, float]]

    def to_json(self) -> str:
        levels = np.rint(self.inputs[..., 0] * 255.0).astype(np.uint8)
        return json.dumps({
            "shape": list(levels.shape),
            "inputs_uint8_zlib_b64": base64.b64encode(zlib.compress(levels.tobytes(), 9)).decode(),
            "probability": [float(v) for v in self.probability.reshape(-1)],
            "gradcam": np.asarray(self.gradcam, np.float64).round(7).tolist(),
            "ood_score": [float(v) for v in self.ood_score.reshape(-1)],
            "limits": {k: [kind, bound] for k, (kind, bound) in self.limits.items()},
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Probes:
        """Raises ValueError (with what is wrong) for anything that is not a probe record."""
        try:
            raw = json.loads(text)
            shape = tuple(int(v) for v in raw["shape"])
            levels = np.frombuffer(zlib.decompress(base64.b64decode(raw["inputs_uint8_zlib_b64"])), np.uint8)
            inputs = (levels.reshape(shape).astype(np.float32) / 255.0)[..., None]
            limits = {k: (str(kind), float(bound)) for k, (kind, bound) in raw["limits"].items()}
            probes = cls(inputs, np.asarray(raw["probability"], np.float64), np.asarray(raw["gradcam"], np.float64),
                         np.asarray(raw["ood_score"], np.float64), limits)
        except (KeyError, TypeError, ValueError, zlib.error) as exc:
            raise ValueError(f"probes metadata cannot be read: {type(exc).__name__}: {exc}") from None
        if not (len(probes.probability) == len(probes.ood_score) == len(probes.gradcam) == shape[0]):
            raise ValueError(f"probes metadata: {shape[0]} inputs but {len(probes.probability)} outputs")
        return probes

    def differences(self, probability: Array, gradcam: Array, ood_score: Array,
                    heatmap_scale: float) -> dict[str, float]:
        """The checked numbers of outputs on :attr:`inputs` against the stored ones."""
        ref, got = self.ood_score, np.asarray(ood_score, np.float64).reshape(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = np.where(ref == got, 0.0, np.abs(got - ref) / np.maximum(np.abs(ref), 1e-12))
        return {
            "probability_max_abs_diff": float(np.abs(np.asarray(probability, np.float64).reshape(-1)
                                                     - self.probability).max()),
            "gradcam_mean_pearson": float(map_pearson(self.gradcam, gradcam, heatmap_scale).mean()),
            "ood_score_max_rel_diff": float(rel.max()),
        }

    def failures(self, numbers: dict[str, float]) -> list[str]:
        """Each checked limit ``numbers`` miss, as ``name value (limit op bound)``; NaN misses."""
        bad = []
        for key in CHECKED:
            if key not in self.limits or key not in numbers:
                continue
            kind, bound = self.limits[key]
            value = numbers[key]
            ok = value <= bound if kind == "max" else value >= bound
            if not ok or not math.isfinite(value):
                bad.append(f"{key} {value:.4g} (limit {'<=' if kind == 'max' else '>='} {bound:g})")
        return bad
