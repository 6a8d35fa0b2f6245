"""The worker's ONNX Runtime session: loading quiets ONNX Runtime only while it probes providers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[3]

PROBE_THEN_LOAD = """
import sys
import onnxruntime as ort
from worker.errors import ModelError
from worker.model import OnnxModel
try:
    OnnxModel(sys.argv[1], providers="auto")
except ModelError as exc:  # the probe ran; this tiny model is not a pneumonia model
    print("refused:", exc)
ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
"""


def test_loading_a_model_leaves_onnx_runtime_logging_on(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    # ONNX Runtime warns (default logger, WARNING) about an initializer that no node uses.
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                              [helper.make_tensor("unused", TensorProto.FLOAT, [1], [0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "tiny.onnx")
    out = subprocess.run([sys.executable, "-c", PROBE_THEN_LOAD, str(tmp_path / "tiny.onnx")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "refused:" in out.stdout and "tiny.onnx" in out.stdout  # one line naming the model
    # Once per session: the worker's own load is quiet, the later session is heard.
    assert out.stderr.count("Removing initializer 'unused'") == 1, out.stderr
    # onnxruntime-gpu without CUDA libraries logs a failed CUDA load during the probe: hidden.
    assert "CUDAExecutionProvider" not in out.stderr, out.stderr


@pytest.mark.parametrize("score", [float("nan"), float("inf"), float("-inf")])
def test_a_score_that_is_not_finite_is_outside_the_distribution(score: float) -> None:
    from cxr_contract.model import ModelInfo
    from worker.model import Prediction, outside_distribution

    info = ModelInfo(name="m", version="1", input_size=64, threshold=0.5, weights_sha256="ab" * 32,
                     contract_version=2, ood_threshold=10.0, heatmap_scale=1.0)
    assert outside_distribution(Prediction(0.5, np.zeros((2, 2)), 0.0, score), info)
    assert not outside_distribution(Prediction(0.5, np.zeros((2, 2)), 0.0, 9.0), info)
