"""The one place that wires the stages together:

receive -> spool -> decode -> infer + Grad-CAM -> build SC/SR -> send.

No stage imports another one downstream of it; this module imports them all.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import dcmwrite

from cxr_contract.pixels import resize_for_model
from worker.audit import AuditTrail
from worker.build import (
    BuildSettings,
    Trust,
    build_report,
    build_secondary_capture,
    decision,
    output_uids,
    render_heatmap_overlay,
    render_withheld,
)
from worker.config import Settings
from worker.decode import dataset_to_unit_image
from worker.errors import DecodeError, UnsupportedInput, WorkerError
from worker.input_check import input_problem
from worker.metrics import HealthServer, Metrics
from worker.model import GATE_OOD_SCORE, OnnxModel, Prediction, outside_distribution
from worker.receive import Receiver
from worker.security import client_context
from worker.selection import ineligible_reason
from worker.send import Outbox, echo
from worker.spool import Spool, key

logger = logging.getLogger(__name__)


@dataclass
class Decoded:
    """An eligible instance, decoded and ready for the model."""

    path: Path
    ds: Dataset
    unit_image: np.ndarray[Any, Any]
    model_input: np.ndarray[Any, Any]
    #: What the input checks found (worker.input_check), None when it passed them.
    input_problem: str | None = None


class Skipped(str):
    """Why an instance is not eligible (the text), with its SOP Instance UID for the log."""

    sop_instance_uid: str

    def __new__(cls, reason: str, sop_instance_uid: str) -> Skipped:
        obj = super().__new__(cls, reason)
        obj.sop_instance_uid = sop_instance_uid
        return obj


@dataclass
class Result:
    """What the worker answered for one instance."""

    sop_instance_uid: str
    probability: float
    positive: bool
    sc: Dataset
    sr: Dataset
    unit_image: np.ndarray[Any, Any]
    rgb: np.ndarray[Any, Any]
    infer_seconds: float = 0.0
    #: Why the image is outside the model's training distribution (metric label), None when inside.
    gate: str | None = None
    #: The gate fired and no answer was given (``model.ood_action = "withhold"``).
    withheld: bool = False
    ood_score: float | None = None
    faithfulness: float | None = None


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

    def __init__(self, settings: Settings, model: OnnxModel) -> None:
        self.settings = settings
        self.model = model
        o = settings.output
        self.build_settings = BuildSettings(
            manufacturer=o.manufacturer,
            sc_series_number=o.sc_series_number,
            sc_series_description=o.sc_series_description,
            sr_series_number=o.sr_series_number,
            sr_series_description=o.sr_series_description,
            opacity=o.opacity,
            uid_prefix=o.uid_prefix,
            institution_name=o.institution_name,
        )
        self.paint_negative = o.heatmap_for_negative
        self.withhold = settings.model.ood_action == "withhold"
        self.faithfulness = settings.model.faithfulness and model.has_logit

    def decode(self, path: Path) -> Decoded | Skipped:
        """Read, select and decode one file.

        Returns:
            The decoded instance, or the reason it is not eligible.

        Raises:
            DecodeError, UnsupportedInput: the instance belongs in quarantine.
        """
        try:
            ds = read_dataset(path)
            reason = ineligible_reason(ds, self.settings.select)
            if reason is not None:
                return Skipped(reason, uid_of(ds))
            unit = dataset_to_unit_image(ds, max_pixels=self.settings.select.max_pixels)
        except WorkerError:
            raise
        except (Exception, RecursionError) as exc:  # a malformed file can break any reader
            raise DecodeError(f"{type(exc).__name__}: {exc}") from None
        model_input = resize_for_model(unit, self.model.info.input_size)[..., None]
        return Decoded(path, ds, unit, model_input, input_problem(unit))

    def gate(self, item: Decoded, pred: Prediction) -> str | None:
        """Why the image is outside the training distribution: the input checks first
        (they catch what the feature density cannot), then the model's own score."""
        if item.input_problem is not None:
            return item.input_problem
        return GATE_OOD_SCORE if outside_distribution(pred, self.model.info) else None

    def infer_and_build(self, batch: list[Decoded]) -> list[Result | WorkerError]:
        """One ONNX Runtime run for the batch, at most one more for the heatmap faithfulness
        of every answered image, then an SC and an SR per image."""
        started = time.perf_counter()
        inputs = np.stack([d.model_input for d in batch])
        predictions = self.model.predict(inputs)
        gates = [self.gate(item, pred) for item, pred in zip(batch, predictions, strict=True)]
        answered = [i for i, g in enumerate(gates) if g is None or not self.withhold]
        faith: dict[int, float] = {}
        if self.faithfulness and answered:
            try:
                scores = self.model.faithfulness(inputs[answered], [predictions[i].gradcam for i in answered])
                faith = {i: v for i, v in zip(answered, scores, strict=True) if math.isfinite(v)}
            except Exception as exc:  # the answers stand without it; the SR then has no such measurement
                logger.warning("heatmap faithfulness not computed: %s", type(exc).__name__)
        infer_seconds = (time.perf_counter() - started) / len(batch)
        out: list[Result | WorkerError] = []
        for i, (item, pred) in enumerate(zip(batch, predictions, strict=True)):
            ood = pred.ood_score if pred.ood_score is not None and math.isfinite(pred.ood_score) else None
            trust = Trust(ood_score=ood, gate=gates[i], withheld=gates[i] is not None and self.withhold,
                          faithfulness=faith.get(i))
            try:
                sc, sr, rgb = self._build(item, pred, trust)
            except WorkerError as exc:
                out.append(exc)
                continue
            except Exception as exc:  # highdicom refuses odd headers with many types
                out.append(UnsupportedInput(f"cannot build outputs: {type(exc).__name__}: {exc}"))
                continue
            positive = not trust.withheld and decision(pred.probability, self.model.info.threshold)
            out.append(Result(uid_of(item.ds), pred.probability, positive, sc, sr, item.unit_image, rgb,
                              infer_seconds, gate=trust.gate, withheld=trust.withheld, ood_score=ood,
                              faithfulness=trust.faithfulness))
        return out

    def _build(self, item: Decoded, pred: Prediction, trust: Trust) -> tuple[Dataset, Dataset, np.ndarray[Any, Any]]:
        info = self.model.info
        uids = output_uids(item.ds, info.version, self.build_settings.uid_prefix)
        notice = info.intended_use if info.synthetic else ""
        if trust.withheld:
            rgb = render_withheld(item.unit_image, reason=trust.gate_line(info), model_name=info.name,
                                  model_version=info.version, notice=notice)
        else:
            flag = ["WARNING: outside the model's training distribution", trust.gate_line(info)] if trust.gate else []
            rgb = render_heatmap_overlay(
                item.unit_image, pred.gradcam, probability=pred.probability,
                threshold=info.threshold, model_name=info.name, model_version=info.version,
                opacity=self.build_settings.opacity, notice=notice, heatmap_scale=info.heatmap_scale,
                paint_negative=self.paint_negative, faithfulness=trust.faithfulness, warning=flag,
            )
        sc = build_secondary_capture(item.ds, rgb, uids, info, self.build_settings, trust=trust)
        sr = build_report(item.ds, sc, pred.probability, info, uids, self.build_settings, trust=trust)
        return sc, sr, rgb


class Service:
    """``cxr-worker serve``: the receiver, one processing thread and one sending thread."""

    def __init__(self, settings: Settings, model: OnnxModel) -> None:
        self.settings = settings
        self.spool = Spool(settings.spool.dir)
        self.processor = Processor(settings, model)
        self.metrics = Metrics()
        self.metrics.model.info({"name": model.info.name, "version": model.info.version,
                                 "input_size": str(model.info.input_size), "threshold": str(model.info.threshold),
                                 "providers": ",".join(model.providers)})
        self.audit = AuditTrail(settings.audit.path, settings.dicom.ae_title)
        sec = settings.security
        self.client_tls = client_context(sec) if sec.send_tls else None
        self.outbox = Outbox(self.spool, settings.send, settings.dicom.ae_title, tls=self.client_tls,
                             metrics=self.metrics, audit=self.audit)
        self.wake = threading.Event()
        self.wake_sender = threading.Event()
        self.stopping = threading.Event()
        self.receiver = Receiver(settings, self.spool, self.wake.set, self.metrics, self.audit)
        self.threads: list[threading.Thread] = []
        self.health: HealthServer | None = None
        self._echo_ok: dict[str, float] = {}

    # -- processing --------------------------------------------------------------
    def _claim_batch(self) -> list[Path]:
        m = self.settings.model
        claimed = self.spool.claim(m.batch_size)
        deadline = time.monotonic() + m.batch_wait_ms / 1000
        while claimed and len(claimed) < m.batch_size and time.monotonic() < deadline:
            time.sleep(0.02)
            claimed += self.spool.claim(m.batch_size - len(claimed))
        return claimed

    def process_claimed(self, claimed: list[Path]) -> None:
        version = self.processor.model.info.version
        ready: list[Decoded] = []
        in_batch: set[str] = set()
        for path in claimed:
            started = time.perf_counter()
            try:
                decoded = self.processor.decode(path)
            except (DecodeError, UnsupportedInput) as exc:
                self._quarantine(path, None, exc)
                continue
            except Exception as exc:  # a broken file must never stop the queue
                self._quarantine(path, None, DecodeError(f"{type(exc).__name__}: {exc}"))
                continue
            if isinstance(decoded, Skipped):
                self.metrics.skipped.inc()
                logger.info("skipped: %s", decoded, extra={"sop_instance_uid": decoded.sop_instance_uid})
                path.unlink()
                continue
            marker = key(uid_of(decoded.ds), version)
            if marker in in_batch or self.spool.is_done(marker):
                self.metrics.duplicates.inc()
                logger.info("duplicate: already processed", extra={"sop_instance_uid": uid_of(decoded.ds)})
                path.unlink()
                continue
            in_batch.add(marker)
            ready.append(decoded)
            self.metrics.stage_seconds.labels("decode").observe(time.perf_counter() - started)
        if not ready:
            return
        try:
            started = time.perf_counter()
            results = self.processor.infer_and_build(ready)
            per_image = (time.perf_counter() - started) / len(ready)
        except Exception as exc:
            for item in ready:
                self._quarantine(item.path, item.ds, WorkerError(f"inference failed: {type(exc).__name__}: {exc}"))
            return
        for item, result in zip(ready, results, strict=True):
            if isinstance(result, WorkerError):
                self._quarantine(item.path, item.ds, result)
                continue
            try:
                encoded = [(obj, encode(obj)) for obj in (result.sc, result.sr)]
            except Exception as exc:  # an output pydicom cannot write belongs in quarantine
                self._quarantine(item.path, item.ds, WorkerError(f"cannot encode outputs: {type(exc).__name__}"))
                continue
            for obj, data in encoded:
                self.outbox.put(key(str(obj.SOPInstanceUID)), data, str(obj.SOPInstanceUID))
            self.spool.mark_done(key(result.sop_instance_uid, version))
            item.path.unlink()
            self.metrics.processed.inc()
            if result.gate is not None:  # out of distribution: counted, and audited with what we did
                self.metrics.gated.labels(result.gate).inc()
                self.audit.instance_gated(result.sop_instance_uid, result.gate, result.withheld)
            self.metrics.probability.observe(result.probability)
            self.metrics.stage_seconds.labels("infer").observe(result.infer_seconds)
            self.metrics.stage_seconds.labels("build").observe(max(0.0, per_image - result.infer_seconds))
            logger.info("processed", extra={
                "sop_instance_uid": result.sop_instance_uid, "probability": round(result.probability, 4),
                "decision": "withheld" if result.withheld else "positive" if result.positive else "negative",
                "gate": result.gate, "ood_score": result.ood_score, "faithfulness": result.faithfulness,
                "sc_sop_instance_uid": str(result.sc.SOPInstanceUID),
                "sr_sop_instance_uid": str(result.sr.SOPInstanceUID)})
        self.wake_sender.set()

    def _quarantine(self, path: Path, ds: Dataset | None, exc: Exception) -> None:
        if ds is None:
            try:
                ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            except Exception:
                ds = None
        uid = uid_of(ds)
        reason = f"{type(exc).__name__}: {exc}"
        self.spool.quarantine(path, f"{uid}\t{reason}")  # the full text stays beside the data
        self.metrics.failed.inc()
        logger.error("quarantined: %s", withhold_values(reason), extra={"sop_instance_uid": uid})

    def _process_loop(self) -> None:
        while not self.stopping.is_set():
            claimed: list[Path] = []
            try:
                claimed = self._claim_batch()
                if not claimed:
                    self.wake.wait(1.0)
                    self.wake.clear()
                    continue
                self.process_claimed(claimed)
            except Exception:
                logger.exception("processing loop error; unfinished instances requeued")
                for path in claimed:  # whatever is still claimed goes back, nothing is stranded
                    if path.exists():
                        os.replace(path, self.spool.queue / path.name)
                time.sleep(1.0)

    # -- sending -----------------------------------------------------------------
    def _send_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.outbox.send_due()
            except Exception:
                logger.exception("sending loop error; continuing")
            self.wake_sender.wait(1.0)
            self.wake_sender.clear()

    # -- health --------------------------------------------------------------------
    def alive(self) -> bool:
        return (not self.stopping.is_set() and all(t.is_alive() for t in self.threads)
                and self.receiver.listening())

    def ready(self) -> dict[str, bool]:
        """Readiness: model loaded, spool writable, disk above reserve, destinations answer C-ECHO."""
        checks = {"model_loaded": self.processor.model is not None, "alive": self.alive()}
        try:
            probe = self.spool.incoming / f".ready-{threading.get_ident()}"
            probe.write_bytes(b"")
            probe.unlink()
            checks["spool_writable"] = True
        except OSError:
            checks["spool_writable"] = False
        checks["disk_above_reserve"] = self.spool.free_mb() >= self.settings.spool.reserve_mb
        now = time.monotonic()
        for dest in self.settings.send.destinations:
            name = str(dest)
            if now - self._echo_ok.get(name, -1e9) > self.settings.metrics.echo_cache_s:
                try:
                    if echo(dest, self.settings.dicom.ae_title, timeout=5.0, tls=self.client_tls) == 0:
                        self._echo_ok[name] = now
                except Exception:
                    self._echo_ok.pop(name, None)
            checks[f"destination {name}"] = now - self._echo_ok.get(name, -1e9) <= max(
                self.settings.metrics.echo_cache_s, 1.0)
        return checks

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(self.spool.depth())
        self.metrics.outbox_depth.set(self.outbox.depth())

    # -- life cycle --------------------------------------------------------------
    def start(self) -> None:
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            logger.warning("running as root: run the worker as an unprivileged user (see deploy/)")
        swept, requeued = self.spool.recover()
        if swept or requeued:
            logger.warning("recovered spool", extra={"partial_files_removed": swept, "requeued": requeued})
        self.audit.application(start=True)
        self.threads = [
            threading.Thread(target=self._process_loop, name="process", daemon=True),
            threading.Thread(target=self._send_loop, name="send", daemon=True),
        ]
        for t in self.threads:
            t.start()
        m = self.settings.metrics
        if m.port:
            self.health = HealthServer(self.metrics, m.bind, m.port, self.alive, self.ready)
            self.health.metrics_update = self._update_gauges
            self.health.start()
        self.receiver.start()
        self.wake.set()

    def stop(self, grace_s: float | None = None) -> None:
        """Refuse new associations, let those in progress finish, then stop the threads."""
        grace_s = self.settings.dicom.shutdown_grace_s if grace_s is None else grace_s
        self.receiver.stop()
        deadline = time.monotonic() + grace_s
        while self.receiver.busy() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.stopping.set()
        self.wake.set()
        self.wake_sender.set()
        for t in self.threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        if self.health is not None:
            self.health.stop()
        self.audit.application(start=False)

    def run_forever(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop cleanly."""
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        self.start()
        # Poll: a signal that lands while the main thread blocks in an untimed lock wait
        # is not always handled until the wait ends (seen as a stop that never came).
        while not done.wait(0.5):
            pass
        logger.info("stopping")
        self.stop()
        logger.info("stopped")


def process_files(paths: list[Path], processor: Processor) -> list[tuple[Path, Result | str | WorkerError]]:
    """``cxr-worker process``: the same stages, offline, for files."""
    out: list[tuple[Path, Result | str | WorkerError]] = []
    decoded: list[Decoded] = []
    for path in paths:
        try:
            d = processor.decode(path)
        except WorkerError as exc:
            out.append((path, exc))
            continue
        if isinstance(d, str):
            out.append((path, d))
        else:
            decoded.append(d)
    batch = processor.settings.model.batch_size
    for start in range(0, len(decoded), batch):
        chunk = decoded[start : start + batch]
        out += [(d.path, r) for d, r in zip(chunk, processor.infer_and_build(chunk), strict=True)]
    return out
