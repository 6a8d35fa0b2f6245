"""The worker's choices about the CUDA provider that need no model: which providers a session
asks for, the warning when two ONNX Runtime builds are installed, and the padded batch shapes."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from worker.model import (
    CPU,
    CUDA,
    ORT_SWAP,
    choose_providers,
    clashing_onnxruntime,
    padded_length,
    preload_cuda_libraries,
)


@pytest.mark.parametrize(("available", "preference", "chosen"), [
    ([CUDA, CPU], "auto", [CUDA, CPU]),
    ([CUDA, CPU], "cuda", [CUDA, CPU]),
    ([CUDA, CPU], "cpu", [CPU]),
    (["TensorrtExecutionProvider", CUDA, CPU], "auto", [CUDA, CPU]),  # TensorRT builds engines: not asked for
    ([CPU], "auto", [CPU]),
    ([CPU], "cuda", [CPU]),  # falls back (OnnxModel warns) rather than refusing to start
])
def test_providers_asked_for(available: list[str], preference: str, chosen: list[str]) -> None:
    assert choose_providers(available, preference) == chosen


def test_two_onnx_runtime_builds_installed_get_one_line_with_the_fix() -> None:
    assert clashing_onnxruntime(["onnxruntime"]) is None
    assert clashing_onnxruntime(["onnxruntime-gpu", "numpy"]) is None
    line = clashing_onnxruntime(["onnxruntime-gpu", "onnxruntime"])
    assert line is not None and "\n" not in line
    assert "onnxruntime and onnxruntime-gpu" in line and ORT_SWAP in line


def test_padded_runs_use_multiples_of_the_batch_size() -> None:
    assert [padded_length(n, 8) for n in (0, 1, 7, 8, 9, 16, 17)] == [0, 8, 8, 8, 16, 16, 24]
    # predict (N <= 8) and faithfulness (2N <= 16) between them see two shapes
    assert {padded_length(n, 8) for n in range(1, 9)} | {padded_length(2 * n, 8) for n in range(1, 9)} == {8, 16}


def test_cuda_preload_never_raises_and_reports_what_onnx_runtime_printed(capsys: pytest.CaptureFixture[str]) -> None:
    said = preload_cuda_libraries(ort)  # here: no GPU, maybe no nvidia-* wheels; on a GPU node: quiet
    assert isinstance(said, str) and "\n" not in said
    assert capsys.readouterr().out == ""  # ONNX Runtime's prints go to the debug log, not stdout
