"""The ONNX Runtime session that answers for a model following :mod:`cxr_contract.model`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr_contract.model import (
    GRADCAM_OUTPUT,
    INPUT_NAME,
    PROBABILITY_OUTPUT,
    ContractError,
    ModelInfo,
)
from worker.errors import ModelError

logger = logging.getLogger(__name__)

#: ONNX Runtime's default logger severity (2, WARNING). It has no getter, so this is
#: what a quieted probe restores.
ORT_DEFAULT_SEVERITY = 2
_ORT_FATAL = 4


@contextmanager
def quiet_provider_probe(ort: Any) -> Iterator[None]:
    """Hide ONNX Runtime's own log while a session probes its execution providers.

    onnxruntime-gpu lists CUDA even where its libraries are missing, and logs the failed
    load as an error although it falls back to the CPU (we log the providers in use).
    The default logger is process-wide, so it is restored as soon as the probe ends.
    """
    ort.set_default_logger_severity(_ORT_FATAL)
    try:
        yield
    finally:
        ort.set_default_logger_severity(ORT_DEFAULT_SEVERITY)


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
        try:
            with quiet_provider_probe(ort):
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
        try:
            self.info = ModelInfo.from_metadata(meta, str(path))
        except ContractError as exc:
            raise ModelError(str(exc)) from None
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
