"""The ONNX Runtime session that answers for a model following :mod:`cxr_contract.model`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr_contract import faithfulness
from cxr_contract.model import (
    GRADCAM_OUTPUT,
    INPUT_NAME,
    LOGIT_OUTPUT,
    OOD_SCORE_OUTPUT,
    PROBABILITY_OUTPUT,
    ContractError,
    ModelInfo,
    required_outputs,
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


#: Why an image is gated when the model's own score says so (a metric label, too).
GATE_OOD_SCORE = "ood_score"


@dataclass(frozen=True)
class Prediction:
    """One image's answer: probability of pneumonia and raw Grad-CAM map; a contract-v2
    model adds the logit and the out-of-distribution score (None for a v1 model)."""

    probability: float
    gradcam: np.ndarray[Any, Any]
    logit: float | None = None
    ood_score: float | None = None


def outside_distribution(prediction: Prediction, info: ModelInfo) -> bool:
    """The model's gate: ``ood_score > ood_threshold`` (never for a v1 model, which has none).
    A score that is not finite counts as outside: nothing can vouch for that input."""
    if prediction.ood_score is None or info.ood_threshold is None:
        return False
    return not prediction.ood_score <= info.ood_threshold


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
        # Idle intra-op threads sleep instead of spinning: they share the cores with the
        # worker's own receive, build and send threads, which a spinning pool starves.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            with quiet_provider_probe(ort):
                self.session = ort.InferenceSession(
                    str(path), options, providers=choose_providers(ort.get_available_providers(), providers)
                )
        except Exception as exc:
            raise ModelError(f"{path}: ONNX Runtime cannot load it: {exc}") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        try:
            self.info = ModelInfo.from_metadata(meta, str(path))
        except ContractError as exc:
            raise ModelError(str(exc)) from None
        required = required_outputs(self.info.contract_version)
        if INPUT_NAME not in inputs or not set(required) <= outputs:
            raise ModelError(
                f"{path}: contract version {self.info.contract_version} expects input {INPUT_NAME!r} and "
                f"outputs {', '.join(map(repr, required))}; received inputs={sorted(inputs)} "
                f"outputs={sorted(outputs)}"
            )
        #: Outputs read on every run: the v2 ones only where the contract promises them.
        self.outputs = list(required)
        self.providers = self.session.get_providers()
        self.path = path
        if not self.info.has_ood_gate:
            logger.warning("model has no out-of-distribution gate (contract version %d): every image that "
                           "passes the input checks gets an answer, and no heatmap faithfulness is computed",
                           self.info.contract_version)

    @property
    def has_logit(self) -> bool:
        """Whether heatmap faithfulness can be computed (it needs the unsaturated logit)."""
        return LOGIT_OUTPUT in self.outputs

    def _check(self, batch: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        size = self.info.input_size
        if batch.ndim != 4 or batch.shape[1:] != (size, size, 1):
            raise ModelError(f"batch shape {batch.shape} does not match [N, {size}, {size}, 1]")
        return batch.astype(np.float32, copy=False)

    def predict(self, batch: np.ndarray[Any, Any]) -> list[Prediction]:
        """Run one batch ``[N, S, S, 1]`` and split it into per-image predictions."""
        got = dict(zip(self.outputs, self.session.run(self.outputs, {INPUT_NAME: self._check(batch)}),
                       strict=True))
        n = len(batch)
        logits = got[LOGIT_OUTPUT].reshape(n) if LOGIT_OUTPUT in got else [None] * n
        ood = got[OOD_SCORE_OUTPUT].reshape(n) if OOD_SCORE_OUTPUT in got else [None] * n
        return [
            Prediction(float(p[0]), c, None if lg is None else float(lg), None if o is None else float(o))
            for p, c, lg, o in zip(got[PROBABILITY_OUTPUT], got[GRADCAM_OUTPUT], logits, ood, strict=True)
        ]

    def faithfulness(self, inputs: np.ndarray[Any, Any], gradcams: list[np.ndarray[Any, Any]]) -> list[float]:
        """Heatmap faithfulness (:mod:`cxr_contract.faithfulness`) of each image, from ONE extra run
        over the 2N perturbed inputs (hottest cells removed, as many random cells removed).

        Raises:
            ModelError: the model has no ``logit`` output (contract version 1).
        """
        if not self.has_logit:
            raise ModelError("heatmap faithfulness needs the model's logit output (contract version 2)")
        inputs = self._check(inputs)
        if len(inputs) != len(gradcams):
            raise ModelError(f"{len(inputs)} inputs but {len(gradcams)} Grad-CAM maps")
        if not len(inputs):
            return []
        pairs = [faithfulness.perturbed_inputs(x, cam) for x, cam in zip(inputs, gradcams, strict=True)]
        stacked = np.stack([hot for hot, _ in pairs] + [rand for _, rand in pairs]).astype(np.float32)
        (logit,) = self.session.run([LOGIT_OUTPUT], {INPUT_NAME: stacked})
        logit = logit.reshape(-1)
        n = len(pairs)
        return [faithfulness.score(float(logit[i]), float(logit[n + i])) for i in range(n)]
