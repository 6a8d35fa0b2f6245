"""The per-instance stages wired together: decode -> infer + Grad-CAM -> build SC/SR/GSPS
(and the ORU^R01 when an HL7 destination takes it).

:class:`Processor` answers instances; :func:`process_files` runs it offline
(``cxr-worker process``). The service around it lives in :mod:`worker.service` (life
cycle), :mod:`worker.batch` (how a claimed batch is processed) and :mod:`worker.health`
(when the service is ready). No stage imports another one downstream of it.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import dcmwrite

from cxr_contract.pixels import resize_for_model
from worker.config import Hl7Destination, Settings
from worker.decode import dataset_to_unit_image
from worker.errors import DecodeError, UnsupportedInput, WorkerError
from worker.faults import Fault, fault_of
from worker.input_check import input_problem
from worker.links import review_url
from worker.model import GATE_OOD_SCORE, OnnxModel, Prediction, outside_distribution
from worker.outputs import (
    BuildSettings,
    Trust,
    build_presentation_state,
    build_report,
    build_secondary_capture,
    decision,
    display_gray,
    output_uids,
    render_heatmap_overlay,
    render_withheld,
)
from worker.outputs.oru import build_oru
from worker.selection import ineligible_reason, invalid_uid

logger = logging.getLogger(__name__)


@dataclass
class Decoded:
    """An eligible instance, decoded and ready for the model.

    The image is decoded once: the model input and the input checks come from the float
    unit image; what is kept to draw the SC on is its uint8 rendering
    (:func:`worker.outputs.render.display_gray`, a quarter of the memory a batch holds per image).
    ``ds`` keeps the header only.
    """

    path: Path
    ds: Dataset
    #: The image the SC is drawn on: uint8 [Rows, Columns], the unit image times 255.
    unit_image: np.ndarray[Any, Any]
    model_input: np.ndarray[Any, Any]
    #: What the input checks found (worker.input_check), None when it passed them.
    input_problem: str | None = None


@dataclass(frozen=True)
class Skipped:
    """Why an instance is not eligible, with its SOP Instance UID for the log."""

    reason: str
    sop_instance_uid: str

    def __str__(self) -> str:
        return self.reason


@dataclass
class Result:
    """What the worker answered for one instance."""

    sop_instance_uid: str
    probability: float
    positive: bool
    sc: Dataset
    sr: Dataset
    #: The source as drawn under the heatmap: uint8 [Rows, Columns] (see :class:`Decoded`).
    unit_image: np.ndarray[Any, Any]
    rgb: np.ndarray[Any, Any]
    infer_seconds: float = 0.0
    #: Why the image is outside the model's training distribution (metric label), None when inside.
    gate: str | None = None
    #: The gate fired and no answer was given (``model.ood_action = "withhold"``).
    withheld: bool = False
    ood_score: float | None = None
    faithfulness: float | None = None
    #: The raw Grad-CAM grid at the model's feature resolution (recorded for the dashboard).
    gradcam: np.ndarray[Any, Any] | None = None
    #: The outline over the source (``output.gsps``), None when off or no heatmap is drawn.
    gsps: Dataset | None = None
    #: The ORU^R01 for the RIS (ER7 bytes), None without an HL7 destination.
    oru: bytes | None = None
    #: :attr:`objects` as sent (:func:`encode`), written while the batch was built.
    encoded: tuple[bytes, ...] | None = None

    @property
    def objects(self) -> tuple[Dataset, ...]:
        """What is sent for this instance: the SC, the SR and, when built, the GSPS."""
        return (self.sc, self.sr) if self.gsps is None else (self.sc, self.sr, self.gsps)


def read_dataset(path: Path) -> Dataset:
    """Read a DICOM file; a clear DecodeError for anything that is not one."""
    try:
        return dcmread(path)
    except (InvalidDicomError, EOFError, ValueError, OSError, KeyError, TypeError) as exc:
        raise DecodeError(f"not a readable DICOM file: {type(exc).__name__}: {exc}") from None


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def withhold_values(text: str) -> str:
    """Replace quoted substrings: library exceptions quote attribute values (a birth date
    in 'Unable to convert ... to DA'), which must not reach the log."""
    return _QUOTED.sub("<value withheld>", text)


def uid_of(ds: Dataset | None) -> str:
    return str(ds.get("SOPInstanceUID", "unknown")) if ds is not None else "unknown"


class Processor:
    """Decode, infer and build for batches of instances."""

    def __init__(self, settings: Settings, model: OnnxModel, build_threads: int | None = None) -> None:
        self.settings = settings
        self.model = model
        self.build_settings: BuildSettings = settings.output
        o = settings.output
        self.paint_negative = o.heatmap_for_negative
        self.withhold = settings.model.ood_action == "withhold"
        self.faithfulness = settings.model.faithfulness and model.states_faithfulness
        if settings.model.faithfulness and model.has_logit and not model.states_faithfulness:
            logger.warning("model has no heatmap faithfulness cut-off with its healthy reference in its metadata "
                           "(exported before this version's faithfulness score): no faithfulness is stated; "
                           "export the run again for it")
        #: An ORU^R01 per answered or withheld image, when an HL7 destination will take it.
        self.oru = any(isinstance(d, Hl7Destination) for d in settings.send.destinations)
        #: Images of one batch built at the same time (the machine's cores, at most 4).
        self.build_threads = build_threads if build_threads is not None else min(4, os.cpu_count() or 1)

    def decode(self, path: Path) -> Decoded | Skipped:
        """Read, select and decode one file.

        Returns:
            The decoded instance, or the reason it is not eligible.

        Raises:
            DecodeError, UnsupportedInput: the instance belongs in quarantine.
        """
        try:
            ds = read_dataset(path)
            bad_uid = invalid_uid(ds)  # receive refuses these; a file given to `process` may have one
            if bad_uid:
                raise UnsupportedInput(bad_uid)
            reason = ineligible_reason(ds, self.settings.select)
            if reason is not None:
                return Skipped(reason, uid_of(ds))
            unit = dataset_to_unit_image(ds, max_pixels=self.settings.select.max_pixels,
                                         max_dimension=self.settings.output.sc_max_dimension)
        except (WorkerError, MemoryError):  # out of memory: the machine's limit, sorted by the caller
            raise
        except (Exception, RecursionError) as exc:  # a malformed file can break any reader
            raise DecodeError(f"{type(exc).__name__}: {exc}") from None
        model_input = resize_for_model(unit, self.model.info.input_size)[..., None]
        problem = input_problem(unit)
        # Decoded: the outputs need the header only, and a batch holds every image it claimed.
        del ds.PixelData
        return Decoded(path, ds, display_gray(unit), model_input, problem)

    def gate(self, item: Decoded, pred: Prediction) -> str | None:
        """Why the image is outside the training distribution: the input checks first
        (they catch what the feature density cannot), then the model's own score."""
        if item.input_problem is not None:
            return item.input_problem
        return GATE_OOD_SCORE if outside_distribution(pred, self.model.info) else None

    def infer_and_build(self, batch: list[Decoded]) -> list[Result | Exception]:
        """One ONNX Runtime run for the batch, at most one more for the heatmap faithfulness
        of every answered image whose heatmap is shown, then an SC and an SR per image.

        A failure of the first run raises (the whole batch shares it); a failure to build one
        image's outputs is returned in its place, to be sorted by :func:`worker.faults.fault_of`.
        """
        started = time.perf_counter()
        inputs = np.stack([d.model_input for d in batch])
        predictions = self.model.predict(inputs)
        gates = [self.gate(item, pred) for item, pred in zip(batch, predictions, strict=True)]
        answered = [i for i, g in enumerate(gates) if g is None or not self.withhold]
        # Faithfulness describes a heatmap: only where one is drawn (a positive answer, or a
        # negative one with output.heatmap_for_negative); each costs 1 + N_RANDOM model inputs.
        shown = [i for i in answered if self.paint_negative
                 or decision(predictions[i].probability, self.model.info.threshold)]
        faith: dict[int, float] = {}
        if self.faithfulness and shown:
            try:
                scores = self.model.faithfulness(inputs[shown], [predictions[i].gradcam for i in shown])
                faith = {i: v for i, v in zip(shown, scores, strict=True) if math.isfinite(v)}
            except Exception as exc:  # the answers stand without it; the SR then has no such measurement
                logger.warning("heatmap faithfulness not computed: %s", type(exc).__name__)
        infer_seconds = (time.perf_counter() - started) / len(batch)
        jobs = [(item, pred, gates[i], faith.get(i), infer_seconds)
                for i, (item, pred) in enumerate(zip(batch, predictions, strict=True))]
        if len(jobs) == 1 or self.build_threads <= 1:
            return [self._answer_one(*job) for job in jobs]
        # Both cores: drawing, compositing and encoding an SC are numpy and OpenCV work that
        # releases the GIL, so one image's drawing runs beside another's highdicom build.
        with ThreadPoolExecutor(min(self.build_threads, len(jobs)), thread_name_prefix="build") as pool:
            return list(pool.map(lambda job: self._answer_one(*job), jobs))

    def _answer_one(self, item: Decoded, pred: Prediction, gate: str | None, faithfulness: float | None,
                    infer_seconds: float) -> Result | Exception:
        ood = pred.ood_score if pred.ood_score is not None and math.isfinite(pred.ood_score) else None
        not_finite = str(pred.ood_score) if pred.ood_score is not None and ood is None else ""
        try:
            trust = Trust(ood_score=ood, gate=gate, withheld=gate is not None and self.withhold,
                          faithfulness=faithfulness, ood_not_finite=not_finite)
            sc, sr, gsps, rgb = self._build(item, pred, trust)
            encoded = tuple(encode(ds) for ds in (sc, sr, gsps) if ds is not None)
            oru = self._oru(item, pred, trust) if self.oru else None
        except Exception as exc:  # highdicom refuses odd headers with many types; sorted by the caller
            return exc
        positive = not trust.withheld and decision(pred.probability, self.model.info.threshold)
        return Result(uid_of(item.ds), pred.probability, positive, sc, sr, item.unit_image, rgb,
                      infer_seconds, gate=trust.gate, withheld=trust.withheld, ood_score=ood,
                      faithfulness=trust.faithfulness, gsps=gsps, oru=oru, encoded=encoded, gradcam=pred.gradcam)

    def _oru(self, item: Decoded, pred: Prediction, trust: Trust) -> bytes | None:
        """The ORU^R01; None, logged, when the image's values do not make a valid v2.5.1 message
        (the DICOM outputs still go out)."""
        info = self.model.info
        try:
            return build_oru(item.ds, pred.probability, info,
                             output_uids(item.ds, info.version, self.build_settings.uid_prefix),
                             self.build_settings, self.settings.hl7, trust=trust)
        except UnsupportedInput as exc:  # its message names the field, never the value
            logger.error("ORU^R01 not built: %s", exc, extra={"sop_instance_uid": uid_of(item.ds)})
            return None

    def _build(self, item: Decoded, pred: Prediction, trust: Trust
               ) -> tuple[Dataset, Dataset, Dataset | None, np.ndarray[Any, Any]]:
        info = self.model.info
        uids = output_uids(item.ds, info.version, self.build_settings.uid_prefix)
        notice = info.intended_use if info.synthetic else ""
        link = review_link(self.settings, uid_of(item.ds), info.version)
        if trust.withheld:
            rgb = render_withheld(item.unit_image, reason=trust.gate_line(info), model_name=info.name,
                                  model_version=info.version, notice=notice, link=link)
        else:
            flag = ["WARNING: outside the model's training distribution", trust.gate_line(info)] if trust.gate else []
            rgb = render_heatmap_overlay(
                item.unit_image, pred.gradcam, probability=pred.probability,
                threshold=info.threshold, model_name=info.name, model_version=info.version,
                opacity=self.build_settings.opacity, notice=notice, heatmap_scale=info.heatmap_scale,
                paint_negative=self.paint_negative, faithfulness=trust.faithfulness,
                faithfulness_cutoff=info.faithfulness_cutoff, warning=flag, link=link,
                prevalence=info.assumed_prevalence,
            )
        sc = build_secondary_capture(item.ds, rgb, uids, info, self.build_settings, trust=trust)
        sr = build_report(item.ds, sc, pred.probability, info, uids, self.build_settings, trust=trust,
                          review_url=link or None)
        # The outline only where the SC draws a heatmap: never for a withheld answer, and for a
        # negative decision only when the site paints those too.
        drawn = not trust.withheld and (self.paint_negative or decision(pred.probability, info.threshold))
        gsps = None
        if self.build_settings.gsps and drawn:
            try:
                gsps = build_presentation_state(item.ds, pred.gradcam, pred.probability, info, uids,
                                                self.build_settings, trust=trust)
            except Exception as exc:  # the SC and SR stand without it; never a value in the log
                logger.warning("GSPS not built: %s", type(exc).__name__, extra={"sop_instance_uid": uid_of(item.ds)})
        return sc, sr, gsps, rgb


def review_link(settings: Settings, sop_instance_uid: str, model_version: str) -> str:
    """The dashboard's review link the SC and SR carry: only when ``dashboard.public_url`` is
    set and ``dashboard.record`` is on (a link to a result never stored leads nowhere)."""
    d = settings.dashboard
    return review_url(d.public_url, sop_instance_uid, model_version) if d.public_url and d.record else ""


def process_files(paths: Iterable[Path], processor: Processor
                  ) -> Iterator[tuple[Path, Result | Skipped | WorkerError]]:
    """``cxr-worker process``: the same stages, offline, one batch at a time.

    Yields each file's outcome as soon as its batch is answered, so memory holds one
    batch of full-resolution images, never the whole run.

    Raises:
        Exception: a bug in our code (see :mod:`worker.faults`), with its traceback.
    """
    chunk: list[Decoded] = []
    for path in paths:
        try:
            decoded = processor.decode(path)
        except WorkerError as exc:
            yield path, exc
            continue
        if isinstance(decoded, Skipped):
            yield path, decoded
            continue
        chunk.append(decoded)
        if len(chunk) == processor.settings.model.batch_size:
            yield from _answer(chunk, processor)
            chunk = []
    if chunk:
        yield from _answer(chunk, processor)


def _answer(chunk: list[Decoded], processor: Processor) -> Iterator[tuple[Path, Result | WorkerError]]:
    for item, result in zip(chunk, processor.infer_and_build(chunk), strict=True):
        if isinstance(result, Result | WorkerError):
            yield item.path, result
        elif fault_of(result) is Fault.INPUT:
            yield item.path, UnsupportedInput(f"cannot build outputs: {type(result).__name__}: {result}")
        else:
            raise result
