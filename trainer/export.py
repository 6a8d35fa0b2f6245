"""``cxr-train export``: one ONNX model returning ``probability`` and ``gradcam``.

The exported graph is verified against TensorFlow's GradientTape Grad-CAM with
ONNX Runtime before it is written; a model that does not verify is not written.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from cxr_contract.model import (
    GRADCAM_OUTPUT,
    INPUT_NAME,
    LABELS,
    PROBABILITY_OUTPUT,
    RESEARCH_USE,
    SYNTHETIC_USE,
    Meta,
)
from trainer import __version__
from trainer.data import load_dataset
from trainer.errors import DataError, ExportError, TrainerError
from trainer.evaluate import load_run
from trainer.fit import load_image
from trainer.model import gradcam_forward, gradcam_tape

OPSET = 17
PROB_TOL = 1e-4
CAM_REL_TOL = 1e-4


def weights_sha256(model: keras.Model) -> str:
    """sha256 over every weight array in model order: stable across file formats."""
    h = hashlib.sha256()
    for w in model.weights:
        h.update(w.path.encode())
        h.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w), dtype=np.float32).tobytes())
    return h.hexdigest()


def to_onnx(model: keras.Model, feature_layer: str, size: int) -> Any:
    """Convert the forward-only probability + Grad-CAM function with tf2onnx."""
    import tf2onnx

    forward = gradcam_forward(model, feature_layer)
    spec = (tf.TensorSpec([None, size, size, 1], tf.float32, name=INPUT_NAME),)

    @tf.function(input_signature=spec)
    def serve(image: tf.Tensor) -> dict[str, tf.Tensor]:
        prob, cam = forward(image)
        return {PROBABILITY_OUTPUT: prob, GRADCAM_OUTPUT: cam}

    try:
        proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=OPSET)
    except Exception as exc:
        raise ExportError(f"tf2onnx could not convert the model: {exc}") from None
    return proto


def verify(proto: Any, model: keras.Model, feature_layer: str, images: np.ndarray[Any, Any]) -> dict[str, float]:
    """ONNX Runtime against GradientTape Grad-CAM; raises ExportError past tolerance."""
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    prob, cam = session.run([PROBABILITY_OUTPUT, GRADCAM_OUTPUT], {INPUT_NAME: images.astype(np.float32)})
    ref_prob, ref_cam = gradcam_tape(model, feature_layer, images)
    prob_err = float(np.abs(prob - ref_prob).max())
    scale = np.maximum(ref_cam.reshape(len(images), -1).max(axis=1), 1e-12)[:, None, None]
    cam_err = float((np.abs(cam - ref_cam) / scale).max())
    if cam.shape != ref_cam.shape or prob_err > PROB_TOL or cam_err > CAM_REL_TOL:
        raise ExportError(
            f"exported model does not match TensorFlow: probability error {prob_err:.2e} (limit {PROB_TOL}), "
            f"Grad-CAM relative error {cam_err:.2e} (limit {CAM_REL_TOL}), shapes {cam.shape} vs "
            f"{ref_cam.shape}; no model written"
        )
    return {"probability_max_abs_error": prob_err, "gradcam_max_rel_error": cam_err, "images": len(images)}


def sample_images(info: dict[str, Any], size: int, n: int = 8, seed: int = 0) -> np.ndarray[Any, Any]:
    """Up to ``n`` real images from the run's test split, else seeded noise.

    Raises:
        DataError: a test image cannot be read (named); only a run whose data folder is
            not on this machine is verified on noise.
    """
    try:
        records = load_dataset(Path(info["data"])).splits["test"][:n]
    except DataError:
        records = []
    images = [load_image(r.path, size) for r in records]
    rng = np.random.default_rng(seed)
    while len(images) < 2:
        images.append(rng.random((size, size, 1), dtype=np.float32))
    return np.stack(images).astype(np.float32)


def export(run: Path, out: Path, *, threshold: float | None = None, version: str | None = None) -> dict[str, Any]:
    """Export, verify, attach metadata, and write ``out`` atomically."""
    import onnx

    model, cfg, info = load_run(run)
    metrics_path = run / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    if threshold is None:
        if metrics is None:
            raise TrainerError(f"{run} has no metrics.json: run 'cxr-train evaluate --run {run}' or pass --threshold")
        threshold = float(metrics["threshold"])
    if not 0.0 <= threshold <= 1.0:
        raise TrainerError(f"threshold must be in [0, 1]. Received: threshold={threshold}")
    size, layer = cfg.model.image_size, cfg.model.feature_layer
    samples = sample_images(info, size)  # before the slow conversion: a bad image fails fast
    proto = to_onnx(model, layer, size)
    check = verify(proto, model, layer, samples)
    summary_path = run / "data_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    created = info.get("created", datetime.now(UTC).isoformat())
    meta = {
        Meta.NAME: cfg.model.name,
        Meta.VERSION: version or f"{__version__}+{created[:19].replace('-', '').replace(':', '')}",
        Meta.INPUT_SIZE: str(size),
        Meta.LABELS: json.dumps(list(LABELS)),
        Meta.THRESHOLD: f"{threshold:.6f}",
        Meta.FEATURE_LAYER: layer,
        Meta.TRAINING_DATA: json.dumps(summary, separators=(",", ":")),
        Meta.TEST_METRICS: json.dumps({k: metrics[k] for k in ("split", "n", "metrics", "ci95", "localisation")}
                                      if metrics else {}, separators=(",", ":")),
        Meta.WEIGHTS_SHA256: weights_sha256(model),
        Meta.INTENDED_USE: SYNTHETIC_USE if summary.get("synthetic") else RESEARCH_USE,
        Meta.GRADCAM: "ReLU(sum_k alpha_k A_k), alpha_k = mean_ij d(logit)/dA_ijk; raw, not normalised",
        Meta.EXPORTED: datetime.now(UTC).isoformat(timespec="seconds"),
        Meta.TENSORFLOW: tf.__version__,
        Meta.GIT_COMMIT: info.get("versions", {}).get("git_commit", "unknown"),
    }
    onnx.helper.set_model_props(proto, meta)
    proto.doc_string = f"{cfg.model.name}: pneumonia probability and Grad-CAM at {layer}. {meta[Meta.INTENDED_USE]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".onnx.tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(proto.SerializeToString())
    os.replace(tmp, out)
    kept = (Meta.NAME, Meta.VERSION, Meta.THRESHOLD, Meta.INPUT_SIZE)
    return {"model": str(out), "metadata": {k: meta[k] for k in kept},
            "verification": check}
