"""How a batch is processed: the claimed files in, an outcome for each out.

Each claimed instance ends in exactly one place: answered (SC and SR in the outbox, a
done/ marker), skipped, a duplicate, quarantined, or back in the queue. Failures are
sorted once, in :meth:`BatchHandler.handle`, by :func:`worker.faults.fault_of`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import Dataset, dcmread

from worker.audit import AuditTrail
from worker.drift import DriftMonitor
from worker.errors import InfrastructureError
from worker.faults import Fault, RemoteFailure, fault_of
from worker.metrics import Metrics
from worker.model import GATE_OOD_SCORE
from worker.pipeline import Decoded, Processor, Result, Skipped, encode, uid_of, withhold_values
from worker.send import Outbox
from worker.spool import Spool, key

if TYPE_CHECKING:
    from worker.parallel import AnswerPool, Outcome
    from worker.store import Recorder

logger = logging.getLogger(__name__)


class BatchHandler:
    """Decode, infer, build and queue the outputs of one claimed batch."""

    def __init__(self, processor: Processor, spool: Spool, outbox: Outbox, metrics: Metrics,
                 output_reserve_mb: float, max_crashes: int = 3, on_output: Callable[[], None] = lambda: None,
                 audit: AuditTrail | None = None, store: Recorder | None = None,
                 drift: DriftMonitor | None = None, pool: AnswerPool | None = None) -> None:
        self.processor = processor
        #: Answer processes (``processing.workers`` > 1); None: this process answers.
        self.pool = pool
        # Batches are handled side by side with a pool: the done/ check and mark of one
        # instance must not interleave with another batch's (a resend claimed meanwhile).
        self._answering = threading.Lock()
        self.store = store  # the dashboard's database; None when not recording
        self.drift = drift
        self._decode_seconds: dict[Path, float] = {}  # of the batches being handled only
        self.audit = audit
        self.max_crashes = max_crashes  # 0 = never give up on an instance the worker died on
        self.on_output = on_output  # wakes the sending thread
        self.spool = spool
        self.outbox = outbox
        self.metrics = metrics
        #: outputs are not written below this much free space (half the receive reserve:
        #: the queue still drains, and frees space, while receiving is refused)
        self.output_reserve_mb = output_reserve_mb
        self.model_answered = False  # set by each run of the model: readiness reads it

    def handle(self, claimed: list[Path]) -> None:
        """Give every claimed file an outcome.

        Raises:
            InfrastructureError: the files still pending went back to the queue; the
                caller backs off before the next batch.
        """
        if self.pool is not None:
            return self._handle_in_pool(claimed)
        pending = list(claimed)
        stage = "output"
        try:
            self._check_reserve()
            stage = "decode"
            ready = self._decode_all(claimed, pending)
            if not ready:
                return
            stage = "infer"
            started = time.perf_counter()
            results = self.processor.infer_and_build(ready)
            self.model_answered = True
            per_image = (time.perf_counter() - started) / len(ready)
            stage = "output"
            for item, result in zip(ready, results, strict=True):
                try:
                    if isinstance(result, Result):
                        self._answer(item, result, per_image)
                    else:
                        self._failed([item.path], item.ds, result, "build")
                except Exception as exc:
                    if fault_of(exc) is Fault.INFRASTRUCTURE:
                        raise  # this item and the rest go back to the queue
                    self._failed([item.path], item.ds, exc, stage)
                pending.remove(item.path)
        except Exception as exc:
            if fault_of(exc) is not Fault.INFRASTRUCTURE:
                self._failed(pending, None, exc, stage)
                return
            if stage == "infer":
                self.model_answered = False
            # Out of memory may be this input's doing: count it like a crash, so that the
            # instance is tried alone next and quarantined after spool.max_crashes.
            self.spool.requeue(pending, suspect=isinstance(exc, MemoryError))
            self.metrics.infrastructure_errors.labels(stage).inc()
            raise InfrastructureError(f"{stage}: {type(exc).__name__}: {exc}") from exc
        finally:
            # Decode times live for one batch: an item quarantined, failed to build or
            # requeued never reaches _record's pop, and a long-running worker must not keep them.
            self._forget_decode_seconds(claimed)
            self.on_output()

    def _check_reserve(self) -> None:
        if self.spool.free_mb() < self.output_reserve_mb:  # no work that could not be written
            raise InfrastructureError(f"spool below reserve ({self.spool.free_mb():.0f} MB free, "
                                      f"outputs need {self.output_reserve_mb:.0f} MB)")

    def _forget_decode_seconds(self, claimed: list[Path]) -> None:
        for path in claimed:
            self._decode_seconds.pop(path, None)

    def _handle_in_pool(self, claimed: list[Path]) -> None:
        """:meth:`handle` with the decoding, inference and builds in an answer process; what
        happens to each file (the spool's moves, the outbox, metrics, log) happens here."""
        assert self.pool is not None
        pending = list(claimed)
        stage = "output"
        try:
            self._check_reserve()
            to_answer = [path for path in claimed if not self._poisoned(path, pending)]
            if not to_answer:
                return
            stage = "infer"
            outcomes, answered = self.pool.answer(to_answer, self.spool.done)
            if answered:
                self.model_answered = True
            stage = "output"
            for path, outcome in zip(to_answer, outcomes, strict=True):
                try:
                    self._apply(path, outcome)
                except Exception as exc:
                    if fault_of(exc) is Fault.INFRASTRUCTURE:
                        raise  # this item and the rest go back to the queue
                    self._failed([path], None, exc, stage)
                pending.remove(path)
        except BrokenProcessPool:
            # The process died on this batch (out of memory, a crash in a library): like a
            # crash of the worker, each instance is tried alone next, quarantined at max_crashes.
            self.spool.requeue(pending, suspect=True)
            self.metrics.infrastructure_errors.labels(stage).inc()
            raise InfrastructureError("infer: an answer process died; batch requeued") from None
        except Exception as exc:
            if fault_of(exc) is not Fault.INFRASTRUCTURE:
                self._failed(pending, None, exc, stage)
                return
            self._requeue(pending, exc, stage)
        finally:
            self._forget_decode_seconds(claimed)
            self.on_output()

    def _requeue(self, pending: list[Path], exc: Exception, stage: str) -> None:
        if stage == "infer":
            self.model_answered = False
        self.spool.requeue(pending, suspect=isinstance(exc, MemoryError))
        self.metrics.infrastructure_errors.labels(stage).inc()
        raise InfrastructureError(f"{stage}: {type(exc).__name__}: {exc}") from exc

    def _apply(self, path: Path, outcome: Outcome) -> None:
        """What one file's outcome from an answer process means for the spool."""
        from worker.parallel import Answered, Duplicate

        if isinstance(outcome, Skipped):
            self.metrics.skipped.inc()
            logger.info("skipped: %s", outcome, extra={"sop_instance_uid": outcome.sop_instance_uid})
            self.spool.finish(path)
        elif isinstance(outcome, Duplicate):
            self.metrics.duplicates.inc()
            logger.info("duplicate: already processed", extra={"sop_instance_uid": outcome.sop_instance_uid})
            self.spool.finish(path)
        elif isinstance(outcome, RemoteFailure):
            self._failed([path], None, outcome, outcome.stage)
        else:
            assert isinstance(outcome, Answered)
            self._decode_seconds[path] = outcome.decode_seconds
            self.metrics.stage_seconds.labels("decode").observe(outcome.decode_seconds)
            if isinstance(outcome.result, RemoteFailure):
                self._failed([path], outcome.item.ds, outcome.result, outcome.result.stage)
            else:
                self._answer(outcome.item, outcome.result, outcome.per_image_seconds)

    def _poisoned(self, path: Path, pending: list[Path]) -> bool:
        """Quarantine an instance the worker died on ``max_crashes`` times; whether it was."""
        crashes = self.spool.crashes_of(path)
        if not (self.max_crashes and crashes >= self.max_crashes):
            return False
        self.metrics.poisoned.inc()
        self.quarantine(path, None, f"the worker stopped {crashes} times while processing this instance "
                        "(out of memory or a crash); not retried")
        pending.remove(path)
        return True

    def _decode_all(self, claimed: list[Path], pending: list[Path]) -> list[Decoded]:
        version = self.processor.model.info.version
        ready: list[Decoded] = []
        in_batch: set[str] = set()
        for path in claimed:
            if self._poisoned(path, pending):
                continue
            started = time.perf_counter()
            try:
                decoded = self.processor.decode(path)
            except Exception as exc:  # decode reports a bad file as DecodeError; out of memory is not one
                self._failed([path], None, exc, "decode")
                pending.remove(path)
                continue
            if isinstance(decoded, Skipped):
                self.metrics.skipped.inc()
                logger.info("skipped: %s", decoded, extra={"sop_instance_uid": decoded.sop_instance_uid})
                self.spool.finish(path)
                pending.remove(path)
                continue
            marker = key(uid_of(decoded.ds), version)
            if marker in in_batch or self.spool.is_done(marker):
                self.metrics.duplicates.inc()
                logger.info("duplicate: already processed", extra={"sop_instance_uid": uid_of(decoded.ds)})
                self.spool.finish(path)
                pending.remove(path)
                continue
            in_batch.add(marker)
            ready.append(decoded)
            self._decode_seconds[path] = time.perf_counter() - started
            self.metrics.stage_seconds.labels("decode").observe(self._decode_seconds[path])
        return ready

    def _answer(self, item: Decoded, result: Result, per_image: float) -> None:
        """Queue the SC, SR and GSPS for sending, then mark the input done and drop it."""
        encoded = result.encoded or tuple(encode(obj) for obj in result.objects)
        marker = key(result.sop_instance_uid, self.processor.model.info.version)
        with self._answering:
            if self.spool.is_done(marker):  # a copy in another batch was answered meanwhile
                self.metrics.duplicates.inc()
                logger.info("duplicate: already processed", extra={"sop_instance_uid": result.sop_instance_uid})
                self.spool.finish(item.path)
                return
            for obj, data in zip(result.objects, encoded, strict=True):
                self.outbox.put(key(str(obj.SOPInstanceUID)), data, str(obj.SOPInstanceUID),
                                study_instance_uid=str(obj.get("StudyInstanceUID", "")),
                                sop_class_uid=str(obj.SOPClassUID))
            if result.oru is not None:  # named after the SR it summarises: a re-run overwrites it
                self.outbox.put(key(f"oru-{result.sr.SOPInstanceUID}"), result.oru, result.sop_instance_uid,
                                study_instance_uid=str(item.ds.get("StudyInstanceUID", "")), hl7=True)
            self.spool.mark_done(marker)
        # Said as soon as the answer is committed: a kill -9 during the slower steps below (the
        # results store, the audit trail) must not leave a delivered answer without its log line.
        logger.info("processed", extra={
            "sop_instance_uid": result.sop_instance_uid, "probability": round(result.probability, 4),
            "decision": "withheld" if result.withheld else "positive" if result.positive else "negative",
            "gate": result.gate, "ood_score": result.ood_score, "faithfulness": result.faithfulness,
            "sc_sop_instance_uid": str(result.sc.SOPInstanceUID),
            "sr_sop_instance_uid": str(result.sr.SOPInstanceUID),
            "gsps_sop_instance_uid": str(result.gsps.SOPInstanceUID) if result.gsps is not None else None})
        received = self._received_at(item.path)
        self.spool.finish(item.path)
        self._record(item, result, per_image, received)
        self.metrics.processed.inc()
        if result.gate is not None:  # out of distribution: counted, and audited with what we did
            self.metrics.gated.labels(result.gate).inc()
            if self.audit is not None:
                try:
                    self.audit.instance_gated(str(item.ds.get("SOPClassUID", "")), result.sop_instance_uid,
                                              str(item.ds.get("StudyInstanceUID", "")), result.gate,
                                              result.withheld)
                except OSError:
                    logger.error("audit trail not writable")
        self._observe(result)
        self.metrics.stage_seconds.labels("infer").observe(result.infer_seconds)
        self.metrics.stage_seconds.labels("build").observe(max(0.0, per_image - result.infer_seconds))

    def _observe(self, result: Result) -> None:
        """The per-model-version distributions, and the drift window."""
        version = self.processor.model.info.version
        self.metrics.probability.labels(version).observe(result.probability)
        if result.ood_score is not None:
            self.metrics.ood_score.labels(version).observe(result.ood_score)
        if result.faithfulness is not None:
            self.metrics.faithfulness.labels(version).observe(result.faithfulness)
        # The gated-rate test is about the ood_score gate alone (its conformal rate says nothing of
        # blank or clipped images), and their probabilities are no evidence of drift either.
        if self.drift is not None and result.gate in (None, GATE_OOD_SCORE):
            self.metrics.drift(version, self.drift.observe(result.probability, result.gate == GATE_OOD_SCORE))

    @staticmethod
    def _received_at(path: Path) -> datetime | None:
        try:  # the spool file's time: when the receiver renamed it into the queue
            return datetime.fromtimestamp(path.stat().st_mtime, UTC)
        except OSError:
            return None

    def _record(self, item: Decoded, result: Result, per_image: float, received: datetime | None) -> None:
        """Hand the result to the dashboard's recorder (it writes on its own thread); a failure
        is logged and counted, never raised: the outputs are on their way and the DICOM service
        must go on."""
        decode_s = self._decode_seconds.pop(item.path, None)
        if self.store is None or result.gradcam is None:
            return
        started = time.perf_counter()
        try:
            from worker.store import NewResult

            ds, info = item.ds, self.processor.model.info
            new = NewResult(
                study_instance_uid=str(ds.get("StudyInstanceUID", "")),
                series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
                sop_instance_uid=result.sop_instance_uid, sop_class_uid=str(ds.get("SOPClassUID", "")),
                accession_number=str(ds.get("AccessionNumber", "") or ""),
                patient_id=str(ds.get("PatientID", "") or ""), patient_name=str(ds.get("PatientName", "") or ""),
                study_date=_dicom_date(ds.get("StudyDate")), received_at=received,
                probability=float(result.probability),
                decision="withheld" if result.withheld else "positive" if result.positive else "negative",
                threshold=info.threshold, ood_gate=result.gate, ood_score=result.ood_score,
                faithfulness=result.faithfulness, model_name=info.name, model_version=info.version,
                heatmap_scale=info.heatmap_scale, decode_ms=None if decode_s is None else decode_s * 1000,
                infer_ms=result.infer_seconds * 1000, build_ms=max(0.0, per_image - result.infer_seconds) * 1000,
                sc_sop_instance_uid=str(result.sc.SOPInstanceUID), sr_sop_instance_uid=str(result.sr.SOPInstanceUID))
            self.store.submit(new, result.unit_image, result.gradcam)
        except Exception as exc:  # never PHI in the log: the type and the UID only
            self.metrics.store_errors.inc()
            logger.error("result not recorded for the dashboard: %s", type(exc).__name__,
                         extra={"sop_instance_uid": result.sop_instance_uid})
        finally:
            self.metrics.stage_seconds.labels("record").observe(time.perf_counter() - started)  # the hand-over

    def _failed(self, paths: list[Path], ds: Dataset | None, exc: Exception, stage: str) -> None:
        """Quarantine for a bad input or a bug; an infrastructure fault re-raises (requeue)."""
        kind = fault_of(exc)
        if kind is Fault.INFRASTRUCTURE:
            raise exc
        remote = isinstance(exc, RemoteFailure)
        reason = exc.text if isinstance(exc, RemoteFailure) else f"{type(exc).__name__}: {exc}"
        if kind is Fault.BUG:
            self.metrics.internal_errors.labels(stage).inc()
            trace = "\n" + withhold_values(exc.trace) if isinstance(exc, RemoteFailure) else ""
            logger.error("internal error in %s: %s%s", stage, withhold_values(reason), trace,
                         exc_info=None if remote else exc)
            reason = f"internal error in {stage} (a bug, not a bad input): {reason}"
        for path in paths:
            self.quarantine(path, ds if len(paths) == 1 else None, reason, count_failed=kind is Fault.INPUT)

    def quarantine(self, path: Path, ds: Dataset | None, reason: str, count_failed: bool = True) -> None:
        if ds is None:
            try:
                ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            except Exception:
                ds = None
        uid = uid_of(ds)
        self.spool.quarantine(path, f"{uid}\t{reason}")  # the full text stays beside the data
        if count_failed:
            self.metrics.failed.inc()
        logger.error("quarantined: %s", withhold_values(reason), extra={"sop_instance_uid": uid})


def _dicom_date(value: object) -> date | None:
    """A DA value as a date; None when absent or not a valid date."""
    text = str(value or "").strip()
    try:
        return datetime.strptime(text[:8], "%Y%m%d").date() if len(text) >= 8 else None
    except ValueError:
        return None
