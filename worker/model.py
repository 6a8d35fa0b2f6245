"""The ONNX Runtime session that answers for a model following :mod:`cxr_contract.model`."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
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
    Meta,
    ModelInfo,
    required_outputs,
)
from cxr_contract.prevalence import log_odds
from cxr_contract.probes import Probes
from worker.errors import ModelError, ModelProbeMismatch

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


def _graph_logit(probability: float) -> float:
    """A v1 model's logit, from its probability (which float32 saturates at 0 and 1)."""
    p = min(max(probability, 1e-7), 1 - 1e-7)
    return log_odds(p)


def outside_distribution(prediction: Prediction, info: ModelInfo) -> bool:
    """The model's gate: ``ood_score > ood_threshold`` (never for a v1 model, which has none).
    A score that is not finite counts as outside: nothing can vouch for that input."""
    if prediction.ood_score is None or info.ood_threshold is None:
        return False
    score = prediction.ood_score
    return not (math.isfinite(score) and score <= info.ood_threshold)


CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: The distributions that install the ``onnxruntime`` package folder: two at once overwrite each other.
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")
#: What docs/install.md ("GPU") tells a user with both installed to run.
ORT_SWAP = "pip uninstall -y onnxruntime && pip install --force-reinstall --no-deps onnxruntime-gpu"


def choose_providers(available: list[str], preference: str = "auto") -> list[str]:
    """CUDA when ONNX Runtime has it (and it is not switched off), CPU always as the fallback.

    ``cuda`` where ONNX Runtime has no CUDA provider gets the CPU too: :class:`OnnxModel`
    says so in one warning rather than refusing to start (a GPU node that lost its driver
    keeps answering, slower)."""
    if preference == "cpu" or CUDA not in available:
        return [CPU]
    return [CUDA, CPU]


def clashing_onnxruntime(installed: Iterable[str]) -> str | None:
    """One warning line when more than one ONNX Runtime build is installed, else None.

    ``onnxruntime`` and ``onnxruntime-gpu`` write the same package folder, so which one runs
    is whichever pip wrote last, and uninstalling either breaks the other."""
    both = sorted({d.lower() for d in installed} & set(ORT_DISTRIBUTIONS))
    if len(both) < 2:
        return None
    return (f"both {' and '.join(both)} are installed and share one package folder; for the CUDA provider "
            f"run: {ORT_SWAP} (docs/install.md#gpu)")


def _installed_onnxruntimes() -> list[str]:
    from importlib import metadata

    found = []
    for name in ORT_DISTRIBUTIONS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            metadata.version(name)
            found.append(name)
    return found


def preload_cuda_libraries(ort: Any) -> str:
    """Load CUDA and cuDNN from the nvidia-* wheels that ``cxr-gradcam[gpu]`` installs, so the
    CUDA provider finds them without a system CUDA install or LD_LIBRARY_PATH.

    Returns:
        What ONNX Runtime said while preloading (it prints rather than logs), for the debug log;
        empty where it said nothing or has no ``preload_dlls`` (before 1.21).
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return ""
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        try:
            preload()
        except Exception as exc:  # a missing library shows again, clearly, when the session starts
            print(f"{type(exc).__name__}: {exc}")
    return " ".join(said.getvalue().split())


_imputer_pool: ThreadPoolExecutor | None = None
_imputer_lock = threading.Lock()


def _imputers() -> ThreadPoolExecutor:
    """The threads the faithfulness imputation runs on: one pool per process, whatever the
    number of models loaded (a reload, the tests)."""
    global _imputer_pool
    with _imputer_lock:
        if _imputer_pool is None:
            _imputer_pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="cxr-impute")
        return _imputer_pool


def padded_length(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``: the batch shapes a padded run uses."""
    return -(-n // multiple) * multiple if n else 0


class OnnxModel:
    """An ONNX Runtime session that returns probability and Grad-CAM in one run."""

    def __init__(self, path: str | Path, *, providers: str = "auto", threads: int = 0,
                 io_binding: str = "auto", batch_size: int = 8, pad_batches: str = "auto",
                 probe_check: bool = True, site_prevalence: float | None = None,
                 target_sensitivity: float | None = None) -> None:
        """Load and check the model.

        Args:
            path: the ONNX file.
            providers: ``auto`` (CUDA where usable), ``cuda`` (warns when it falls back) or ``cpu``.
            threads: ONNX Runtime's intra-op threads; 0 = its default.
            io_binding: ``auto`` (on with CUDA), ``on`` or ``off``: run through an I/O binding,
                the input handed to the device once and the outputs copied back once.
            batch_size: the batch the worker assembles; padded runs use multiples of it.
            pad_batches: ``auto`` (on with CUDA), ``on`` or ``off``: run every batch at exactly
                ``batch_size`` (shorter ones padded, longer ones in chunks), so the CUDA provider
                sees one input shape and chooses its cuDNN convolution algorithms once, at load.
            probe_check: run the probe inputs a reduced-precision model carries and compare its
                answers with the fp32 model's stored ones (:meth:`check_probes`).
            site_prevalence: report the probability at this prevalence (the prior-shift
                correction of :mod:`cxr_contract.prevalence`); None = the model's own (or its
                site calibration's). The threshold moves with it, so decisions do not change.
            target_sensitivity: choose the threshold for this sensitivity instead of keeping
                the model's operating point.

        Raises:
            ModelProbeMismatch: the probe check found answers outside the export's limits.
        """
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        clash = clashing_onnxruntime(_installed_onnxruntimes())
        if clash:
            logger.warning(clash)
        available = ort.get_available_providers()
        chosen = choose_providers(available, providers)
        if CUDA in chosen:
            said = preload_cuda_libraries(ort)
            if said:
                logger.debug("ONNX Runtime's CUDA preload: %s", said)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # Idle intra-op threads sleep instead of spinning: they share the cores with the
        # worker's own receive, build and send threads, which a spinning pool starves.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            with quiet_provider_probe(ort):
                self.session = ort.InferenceSession(str(path), options, providers=chosen)
        except Exception as exc:
            raise ModelError(f"{path}: ONNX Runtime cannot load it: {exc}") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        try:
            exported = ModelInfo.from_metadata(meta, str(path))
            #: Graph logit -> reported logit (site calibration, prevalence); None: as exported.
            self.adjustment = exported.adjustment(site_prevalence, target_sensitivity)
        except ContractError as exc:
            raise ModelError(str(exc)) from None
        #: The model as exported: the graph's threshold and prevalence.
        self.exported_info = exported
        #: The model as reported: threshold and prevalence of the probabilities :meth:`predict` returns.
        self.info = exported.reporting(self.adjustment)
        # Decoded once: every faithfulness run fills removed regions from it.
        self._faith_reference = (faithfulness.decode_reference(self.info.faithfulness_reference, self.info.input_size)
                                 if self.info.faithfulness_reference else None)
        required = required_outputs(self.info.contract_version)
        if INPUT_NAME not in inputs or not set(required) <= outputs:
            raise ModelError(
                f"{path}: contract version {self.info.contract_version} expects input {INPUT_NAME!r} and "
                f"outputs {', '.join(map(repr, required))}; received inputs={sorted(inputs)} "
                f"outputs={sorted(outputs)}"
            )
        #: Outputs read on every run: the v2 ones only where the contract promises them.
        self.outputs = list(required)
        #: The providers the session really runs on (CUDA drops out where it cannot start).
        self.providers = self.session.get_providers()
        self.on_cuda = CUDA in self.providers
        self.io_binding = io_binding == "on" or (io_binding == "auto" and self.on_cuda)
        self.pad_to = batch_size if pad_batches == "on" or (pad_batches == "auto" and self.on_cuda) else 0
        # On the CPU a longer run (the faithfulness run's 9N inputs) goes in chunks of batch_size:
        # per image it is as fast, and ONNX Runtime's arena keeps the largest run's activations
        # (the worker's peak RSS was 1.82 GiB with runs of 72 inputs of 224 px, 0.82 in chunks of 8).
        self.cpu_chunk = 0 if self.on_cuda else batch_size
        self._ort = ort
        self.path = path
        #: The model this one replaced after that one failed its probe check (set by the loader).
        self.fell_back_from: str | None = None
        if CUDA in chosen and not self.on_cuda:
            logger.log(logging.WARNING if providers == "cuda" else logging.INFO,
                       "CUDA provider present but unusable (no GPU visible, or its CUDA/cuDNN libraries are "
                       "missing: `pip install cxr-gradcam[gpu]` brings them, docs/install.md#gpu); running on the CPU")
        elif providers == "cuda" and not self.on_cuda:
            logger.warning("execution provider 'cuda' requested but this ONNX Runtime has no CUDA provider (the CPU "
                           "build is installed: `pip install cxr-gradcam[gpu]`, docs/install.md#gpu); "
                           "running on the CPU")
        if self.on_cuda:
            # The first run of each input shape chooses cuDNN's algorithms (seconds): do it
            # before the worker reports ready rather than on the first study.
            size = self.info.input_size
            self._run(self.outputs, np.zeros((max(self.pad_to, 1), size, size, 1), np.float32))
        #: The load-time probe check: ``status`` none (the model carries no probes), off, or
        #: passed with the numbers.
        self.probe_check: dict[str, Any] = self.check_probes(meta.get(Meta.PROBES)) if probe_check else {
            "status": "off"}
        if not self.info.has_ood_gate:
            logger.warning("model has no out-of-distribution gate (contract version %d): every image that "
                           "passes the input checks gets an answer, and no heatmap faithfulness is computed",
                           self.info.contract_version)

    def check_probes(self, stored: str | None) -> dict[str, Any]:
        """Run the probe inputs stored at export and compare the answers with the fp32 model's,
        on this machine's CPU or GPU, against the export's limits.

        Raises:
            ModelProbeMismatch: outside the limits (every missed limit named).
            ModelError: the probes metadata cannot be read.
        """
        if stored is None:
            return {"status": "none"}
        try:
            probes = Probes.from_json(stored)
        except ValueError as exc:
            raise ModelError(f"{self.path}: {exc}") from None
        if probes.inputs.shape[1:] != (self.info.input_size, self.info.input_size, 1):
            raise ModelError(f"{self.path}: probe inputs are {probes.inputs.shape[1:]}, the model takes "
                             f"{self.info.input_size} px")
        got = dict(zip(self.outputs, self._run(self.outputs, probes.inputs), strict=True))
        if OOD_SCORE_OUTPUT not in got:
            raise ModelError(f"{self.path}: the model carries probes but has no {OOD_SCORE_OUTPUT!r} output")
        numbers = probes.differences(got[PROBABILITY_OUTPUT], got[GRADCAM_OUTPUT], got[OOD_SCORE_OUTPUT],
                                     self.info.heatmap_scale or 1.0)
        bad = probes.failures(numbers)
        if bad:
            raise ModelProbeMismatch(
                f"{self.path}: this {self.info.precision} model answers its {len(probes.inputs)} probe images on "
                f"this machine ({','.join(self.providers)}) outside the limits its export verified against fp32: "
                f"{', '.join(bad)} (export it on this kind of machine, or set model.probe_check = \"fallback\" "
                "with an fp32 model.fallback_path; docs/export.md)")
        return {"status": "passed", "images": len(probes.inputs), **{k: round(v, 6) for k, v in numbers.items()}}

    @property
    def execution(self) -> dict[str, str]:
        """How runs execute, for the "model loaded" log line and the model info metric."""
        return {"providers": ",".join(self.providers), "io_binding": "on" if self.io_binding else "off",
                "batch_padding": f"multiples of {self.pad_to}" if self.pad_to else "off"}

    def _run(self, names: list[str], batch: np.ndarray[Any, Any]) -> list[np.ndarray[Any, Any]]:
        """Session runs over ``batch`` (padded and bound as configured), outputs cut back to it.

        Padded, a batch longer than ``batch_size`` (the faithfulness run's 9N) runs in chunks of
        ``batch_size``, so the CUDA provider only ever sees one input shape: at each change of
        shape it rebuilds every convolution's cuDNN plan, which cost ~250 ms per batch on an H100
        when inference and the faithfulness run alternated between N and 2N (docs/install.md, "GPU").
        On the CPU provider it runs in chunks of ``batch_size`` too, to bound memory.
        """
        step = self.pad_to or self.cpu_chunk
        if step and len(batch) > step:
            parts = [self._run(names, batch[i:i + step]) for i in range(0, len(batch), step)]
            return [np.concatenate(outs) for outs in zip(*parts, strict=True)]
        n = len(batch)
        if self.pad_to and n % self.pad_to:
            pad = np.zeros((padded_length(n, self.pad_to) - n, *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, pad])
        if not self.io_binding:
            got = self.session.run(names, {INPUT_NAME: batch})
        else:
            binding = self.session.io_binding()
            device = "cuda" if self.on_cuda else "cpu"
            # One copy to the device, done here; the outputs land in host memory that ORT allocates.
            value = self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(batch), device, 0)
            binding.bind_ortvalue_input(INPUT_NAME, value)
            for name in names:
                binding.bind_output(name, "cpu")
            self.session.run_with_iobinding(binding)
            got = binding.copy_outputs_to_cpu()
        return [out[:n] for out in got]

    @property
    def has_logit(self) -> bool:
        """Whether heatmap faithfulness can be computed (it needs the unsaturated logit)."""
        return LOGIT_OUTPUT in self.outputs

    @property
    def states_faithfulness(self) -> bool:
        """Whether a faithfulness verdict can be stated: the logit, and the null cut-off that
        export stores (a model without it makes no statement rather than an uncalibrated one)."""
        return self.has_logit and self.info.faithfulness_cutoff is not None

    def _check(self, batch: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        size = self.info.input_size
        if batch.ndim != 4 or batch.shape[1:] != (size, size, 1):
            raise ModelError(f"batch shape {batch.shape} does not match [N, {size}, {size}, 1]")
        return batch.astype(np.float32, copy=False)

    def predict(self, batch: np.ndarray[Any, Any]) -> list[Prediction]:
        """Run one batch ``[N, S, S, 1]`` and split it into per-image predictions."""
        got = dict(zip(self.outputs, self._run(self.outputs, self._check(batch)), strict=True))
        n = len(batch)
        logits = got[LOGIT_OUTPUT].reshape(n) if LOGIT_OUTPUT in got else [None] * n
        ood = got[OOD_SCORE_OUTPUT].reshape(n) if OOD_SCORE_OUTPUT in got else [None] * n
        out = [
            Prediction(float(p[0]), c, None if lg is None else float(lg), None if o is None else float(o))
            for p, c, lg, o in zip(got[PROBABILITY_OUTPUT], got[GRADCAM_OUTPUT], logits, ood, strict=True)
        ]
        adj = self.adjustment
        if adj is None or adj.identity:
            return out
        return [replace(pr, probability=adj.probability(z), logit=adj.logit(z) if pr.logit is not None else None)
                for pr, z in ((pr, pr.logit if pr.logit is not None else _graph_logit(pr.probability)) for pr in out)]

    def faithfulness(self, inputs: np.ndarray[Any, Any], gradcams: list[np.ndarray[Any, Any]]) -> list[float]:
        """Heatmap faithfulness (:mod:`cxr_contract.faithfulness`) of each image, from ONE extra run
        over the perturbed inputs (:data:`~cxr_contract.faithfulness.INPUTS_PER_IMAGE` per image:
        the hot region removed, then each moved copy of it), scored on the calibrated ``logit``.

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
        # The imputation (array arithmetic and a blur per perturbed image, in numpy and OpenCV,
        # which release the GIL) runs on a few threads: on a GPU it is most of the faithfulness cost.
        perturb = functools.partial(faithfulness.perturbed_inputs, reference=self._faith_reference)
        stacked = np.concatenate(list(_imputers().map(perturb, inputs, gradcams)))
        (logit,) = self._run([LOGIT_OUTPUT], stacked)
        rows = logit.reshape(len(inputs), faithfulness.INPUTS_PER_IMAGE)
        return [faithfulness.score(row) for row in rows]
