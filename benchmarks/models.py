"""The models the Grad-CAM and GPU benchmarks time: the trainer's 224-px ResNet-50 with RANDOM
weights (only the cost is measured, never an answer), exported through the trainer's own
``to_onnx`` as a contract-v2 model with its metadata, and the same graph without its Grad-CAM
output. Needs TensorFlow (the ``train`` or ``train-gpu`` extra)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

SIZE = 224
FEATURE_LAYER = "conv5_block3_out"


def export_random(work: Path, size: int = SIZE) -> tuple[Path, Path, Any]:
    """``(full, no_gradcam, keras_model)``: the contract-v2 ONNX model and the same weights with
    ``probability``, ``logit`` and ``ood_score`` only (the Grad-CAM branch pruned away)."""
    import onnx

    from cxr_contract import faithfulness
    from cxr_contract.model import CONTRACT_VERSION, LABELS, Meta
    from trainer.config import ModelSection
    from trainer.export import prune_to_contract, to_onnx, weights_sha256
    from trainer.model import build_model
    from trainer.ood import fit_gate

    model = build_model(ModelSection(image_size=size, weights="none"))
    pooled = np.random.default_rng(0).random((64, 2048))
    gate = fit_gate(pooled, np.arange(64) % 2)
    full = prune_to_contract(to_onnx(model, FEATURE_LAYER, size, gate))
    meta = {Meta.CONTRACT_VERSION: str(CONTRACT_VERSION), Meta.NAME: "bench-resnet50-random-weights",
            Meta.VERSION: "bench", Meta.INPUT_SIZE: str(size), Meta.THRESHOLD: "0.5",
            Meta.WEIGHTS_SHA256: weights_sha256(model), Meta.LABELS: json.dumps(list(LABELS)),
            Meta.FEATURE_LAYER: FEATURE_LAYER, Meta.OOD_THRESHOLD: "1e30", Meta.HEATMAP_SCALE: "1",
            Meta.PRECISION: "fp32",
            # Heatmap faithfulness as an exported model has it (a cut-off and the healthy
            # reference it fills from), so the worker pays its whole cost; the value means nothing.
            Meta.FAITHFULNESS_CUTOFF: "1",
            Meta.FAITHFULNESS_REFERENCE: faithfulness.encode_reference(faithfulness.reference_image(images(16, size)))}
    onnx.helper.set_model_props(full, meta)
    path = work / "gradcam-fp32.onnx"
    path.write_bytes(full.SerializeToString())
    return path, without_gradcam(path, work / "no-gradcam-fp32.onnx"), model


def without_gradcam(path: Path, out: Path) -> Path:
    """The model at ``path`` (one of ours) with ``probability``, ``logit`` and ``ood_score`` only:
    its Grad-CAM branch pruned away, so that the two differ by the Grad-CAM's cost alone. Needs
    ``onnx`` only (no TensorFlow), so a GPU machine can time a model exported elsewhere."""
    import onnx
    from onnx.utils import Extractor

    from cxr_contract.model import GRADCAM_OUTPUT, INPUT_NAME

    full = onnx.load(str(path))
    keep = [o.name for o in full.graph.output if o.name != GRADCAM_OUTPUT]
    plain = Extractor(full).extract_model([INPUT_NAME], keep)
    plain.opset_import.extend([o for o in full.opset_import if o not in plain.opset_import])
    plain.ir_version = full.ir_version
    out.write_bytes(plain.SerializeToString())
    return out


def images(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray[Any, Any]:
    """Random ``[n, S, S, 1]`` inputs in [0, 1] (random weights make content irrelevant)."""
    return np.random.default_rng(seed).random((n, size, size, 1), dtype=np.float32)
