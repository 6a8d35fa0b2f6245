"""The model contract shared with the trainer, and the ONNX Runtime session.

ONNX input ``image`` float32 ``[N, S, S, 1]``, grayscale in [0, 1]; outputs
``probability`` ``[N, 1]`` and ``gradcam`` ``[N, h, w]`` >= 0 (raw, not
normalised). ``metadata_props`` carry the keys in :data:`REQUIRED_METADATA`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worker.errors import ModelError

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
PROBABILITY_OUTPUT = "probability"
GRADCAM_OUTPUT = "gradcam"
REQUIRED_METADATA = ("name", "version", "input_size", "threshold", "weights_sha256")


@dataclass(frozen=True)
class ModelInfo:
    """What the worker needs to know about a model, read from its metadata."""

    name: str
    version: str
    input_size: int
    threshold: float
    weights_sha256: str
    labels: list[str] = field(default_factory=lambda: ["No Finding", "Pneumonia"])
    feature_layer: str = ""
    intended_use: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str) -> ModelInfo:
        missing = [k for k in REQUIRED_METADATA if k not in meta]
        if missing:
            raise ModelError(f"{source}: metadata_props lack {', '.join(missing)}")
        try:
            size = int(meta["input_size"])
            threshold = float(meta["threshold"])
        except ValueError:
            raise ModelError(
                f"{source}: input_size={meta['input_size']!r} / threshold={meta['threshold']!r} "
                "are not numbers"
            ) from None
        if size < 32 or not 0.0 <= threshold <= 1.0:
            raise ModelError(f"{source}: input_size={size} or threshold={threshold} out of range")
        labels = json.loads(meta["labels"]) if "labels" in meta else ["No Finding", "Pneumonia"]
        known = set(REQUIRED_METADATA) | {"labels", "feature_layer", "intended_use"}
        return cls(
            name=meta["name"],
            version=meta["version"],
            input_size=size,
            threshold=threshold,
            weights_sha256=meta["weights_sha256"],
            labels=list(labels),
            feature_layer=meta.get("feature_layer", ""),
            intended_use=meta.get("intended_use", ""),
            extra={k: v for k, v in meta.items() if k not in known},
        )


@dataclass(frozen=True)
class Prediction:
    """One image's answer: probability of pneumonia and raw Grad-CAM map."""

    probability: float
    gradcam: np.ndarray[Any, Any]


def choose_providers(available: list[str], preference: str = "auto") -> list[str]:
    """CUDA when present (and not switched off), CPU always as the fallback."""
    if preference == "cpu":
        return ["CPUExecutionProvider"]
    if preference == "cuda" and "CUDAExecutionProvider" not in available:
        raise ModelError("execution provider 'cuda' requested but ONNX Runtime has no CUDA provider")
    providers = [p for p in ("CUDAExecutionProvider",) if p in available]
    return providers + ["CPUExecutionProvider"]


class OnnxModel:
    """An ONNX Runtime session that returns probability and Grad-CAM in one run."""

    def __init__(self, path: str | Path, *, providers: str = "auto", threads: int = 0) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # onnxruntime-gpu lists CUDA even where its libraries are missing; keep its
        # failed-load message out of the log (we log the providers actually used).
        ort.set_default_logger_severity(4)
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=choose_providers(ort.get_available_providers(), providers)
            )
        except Exception as exc:
            raise ModelError(f"{path}: ONNX Runtime cannot load it: {exc}") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if INPUT_NAME not in inputs or not {PROBABILITY_OUTPUT, GRADCAM_OUTPUT} <= outputs:
            raise ModelError(
                f"{path}: expected input {INPUT_NAME!r} and outputs {PROBABILITY_OUTPUT!r}, "
                f"{GRADCAM_OUTPUT!r}; received inputs={sorted(inputs)} outputs={sorted(outputs)}"
            )
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.info = ModelInfo.from_metadata(meta, str(path))
        self.providers = self.session.get_providers()
        self.path = path

    def predict(self, batch: np.ndarray[Any, Any]) -> list[Prediction]:
        """Run one batch ``[N, S, S, 1]`` and split it into per-image predictions."""
        size = self.info.input_size
        if batch.ndim != 4 or batch.shape[1:] != (size, size, 1):
            raise ModelError(f"batch shape {batch.shape} does not match [N, {size}, {size}, 1]")
        prob, cam = self.session.run(
            [PROBABILITY_OUTPUT, GRADCAM_OUTPUT], {INPUT_NAME: batch.astype(np.float32, copy=False)}
        )
        return [Prediction(float(p[0]), c) for p, c in zip(prob, cam, strict=True)]
