"""``cxr-worker serve``: the life cycle of the service and its threads.

    receive (listener threads) -> spool -> ``process`` thread -> outbox -> ``send`` thread

* How a batch is processed: :class:`worker.batch.BatchHandler`.
* When the service is ready: :func:`worker.health.readiness`.
* How it starts and stops: :meth:`Service.start`, :meth:`Service.stop`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from worker.audit import AuditTrail
from worker.batch import BatchHandler
from worker.config import Settings
from worker.drift import DriftMonitor
from worker.errors import InfrastructureError, ModelError
from worker.health import DestinationMonitor, all_alive, readiness
from worker.metrics import HealthServer, Metrics
from worker.model import OnnxModel
from worker.parallel import AnswerPool
from worker.pipeline import Processor
from worker.receive import Receiver
from worker.security import client_context
from worker.send import Outbox
from worker.spool import Spool

if TYPE_CHECKING:
    from worker.store import Recorder

logger = logging.getLogger(__name__)

#: After an infrastructure fault the processing thread waits this long, doubling up to the cap.
BACKOFF_INITIAL_S, BACKOFF_MAX_S = 1.0, 30.0
PRUNE_EVERY_S = 3600.0


class Service:
    """The receiver, a processing thread, a sending thread and a destination monitor."""

    def __init__(self, settings: Settings, model: OnnxModel) -> None:
        self.settings = settings
        self.spool = Spool(settings.spool.dir)
        self.processor = Processor(settings, model)
        self.metrics = Metrics(ood_threshold=model.info.ood_threshold,
                               faithfulness_cutoff=model.info.faithfulness_cutoff)
        self.drift = DriftMonitor(model.info, settings.drift, getattr(model, "adjustment", None))
        self.metrics.drift_limits(model.info.version, settings.drift, self.drift.reference is not None,
                                  model.info.false_gate_rate)
        self.metrics.drift(model.info.version, self.drift.state)  # the window's series exist from the start
        self.metrics.model.info({"name": model.info.name, "version": model.info.version,
                                 "input_size": str(model.info.input_size), "threshold": str(model.info.threshold),
                                 **model.execution, "precision": model.info.precision,
                                 "probe_check": model.probe_check["status"]})
        self.metrics.model_fallback.set(1 if model.fell_back_from else 0)
        self.audit = AuditTrail(settings.audit.path, settings.dicom.ae_title)
        tls = client_context(settings.security) if settings.security.send_tls else None
        self.outbox = Outbox(self.spool, settings.send, settings.dicom.ae_title, tls=tls,
                             metrics=self.metrics, audit=self.audit, security=settings.security)
        self.wake = threading.Event()
        processes = settings.processing.count()
        # More than one: answer processes; the service's process keeps the spool, outbox and listeners.
        reporting = (model.info.threshold, model.info.assumed_prevalence)
        self.pool = AnswerPool(settings, processes, model.path, reporting) if processes > 1 else None
        self.wake_sender = threading.Event()
        self.stopping = threading.Event()
        self.handler = BatchHandler(self.processor, self.spool, self.outbox, self.metrics,
                                    output_reserve_mb=settings.spool.reserve_mb / 2,
                                    max_crashes=settings.spool.max_crashes, on_output=self.wake_sender.set,
                                    audit=self.audit, store=self._open_store(), drift=self.drift,
                                    pool=self.pool)
        self.receiver = Receiver(settings, self.spool, self.wake.set, self.metrics, self.audit)
        self.monitor = DestinationMonitor(settings.send.destinations, settings.dicom.ae_title, self.metrics,
                                          settings.metrics.echo_cache_s, tls=tls, security=settings.security)
        self.threads: list[threading.Thread] = []
        self.health: HealthServer | None = None

    def _open_store(self) -> Recorder | None:
        """The dashboard's recorder; the service runs without the database while it cannot open."""
        d = self.settings.dashboard
        if not d.record:
            return None
        from worker.store import Recorder, ResultStore

        # Opened on the recorder's thread: a database that is down never delays the DICOM service.
        return Recorder(lambda: ResultStore.from_settings(self.settings), on_error=self.metrics.store_errors.inc)

    # -- start and stop -----------------------------------------------------------------
    def start(self) -> None:
        """Recover the spool, prove the model answers, then start the threads and listeners.

        Raises:
            ModelError: the model does not answer a test input.
        """
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            logger.warning("running as root: run the worker as an unprivileged user (see deploy/)")
        self._recover()
        self._warm_up()
        self.audit.application(start=True)
        # One processing thread per answer process: each claims a batch and waits for its answers.
        loops = self.pool.processes if self.pool is not None else 1
        self.threads = [
            *(threading.Thread(target=self._process_loop, name=f"process-{i}", daemon=True) for i in range(loops)),
            threading.Thread(target=self._send_loop, name="send", daemon=True),
        ]
        for t in self.threads:
            t.start()
        self.monitor.start()
        m = self.settings.metrics
        if m.port:
            self.health = HealthServer(self.metrics, m.bind, m.port, self.alive, self.ready, self.monitor.detail,
                                       drift=self.drift.describe)
            self.health.metrics_update = self._update_gauges
            self.health.start()
        self.receiver.start()
        self.wake.set()

    def stop(self, grace_s: float | None = None) -> None:
        """Refuse new associations, let those in progress finish, then stop the threads.

        A batch still in work/ when the grace period ends counts as a crash at the next
        start (see ``spool.max_crashes``).
        """
        grace_s = self.settings.dicom.shutdown_grace_s if grace_s is None else grace_s
        self.receiver.stop()
        deadline = time.monotonic() + grace_s
        while self.receiver.busy() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.stopping.set()
        self.monitor.stop()
        self.wake.set()
        self.wake_sender.set()
        for t in self.threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        if self.pool is not None:
            self.pool.stop()
        if self.handler.store is not None:  # what the last batch queued for the dashboard
            self.handler.store.close(timeout=5.0)
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

    def _recover(self) -> None:
        """Requeue what a crash left in work/ (the batch handler quarantines a poison pill)."""
        swept, requeued = self.spool.recover()  # each requeued instance counts a crash
        partial = self.outbox.partial_files_removed
        if swept or requeued or partial:
            logger.warning("recovered spool", extra={"partial_files_removed": swept + partial, "requeued": requeued})
        self._prune_done()

    def _warm_up(self) -> None:
        """One inference on a blank image: readiness then reports a model that answered."""
        size = self.processor.model.info.input_size
        try:
            self.processor.model.predict(np.zeros((1, size, size, 1), np.float32))
            if self.pool is not None:
                self.pool.start()  # each answer process loads the model and answers a blank image
        except Exception as exc:
            raise ModelError(f"the model does not answer a test input: {type(exc).__name__}: {exc}") from None
        self.handler.model_answered = True

    def _prune_done(self) -> None:
        removed = self.spool.prune_done(self.settings.spool.done_retention_days * 86400)
        if removed:
            logger.info("pruned done markers", extra={"removed": removed})
        kept = self.spool.prune_kept(self.settings.spool.quarantine_retention_days * 86400)
        if kept:
            logger.info("deleted quarantined and dead files past their retention", extra={"removed": kept})
        if self.handler.store is not None and self.handler.store.store is not None:
            try:
                self.handler.store.store.sweep(self.settings.dashboard.retention_days)
            except Exception as exc:  # retention is retried at the next prune; the service goes on
                self.metrics.store_errors.inc()
                logger.error("retention sweep of the results database failed: %s", type(exc).__name__)

    # -- threads ------------------------------------------------------------------------
    def _claim_batch(self) -> list[Path]:
        m = self.settings.model
        claimed = self.spool.claim(m.batch_size)
        deadline = time.monotonic() + m.batch_wait_ms / 1000
        while claimed and len(claimed) < m.batch_size and time.monotonic() < deadline:
            if self.spool.crashes_of(claimed[0]):
                break  # a suspect is processed alone
            if not self.receiver.receiving():
                break  # nobody is sending: waiting would only add latency to what is here
            time.sleep(0.02)
            claimed += self.spool.claim(m.batch_size - len(claimed), suspects=False)
        return claimed

    def _process_loop(self) -> None:
        backoff = 0.0
        next_prune = time.monotonic() + PRUNE_EVERY_S
        while not self.stopping.is_set():
            if time.monotonic() >= next_prune:
                self._prune_done()
                next_prune = time.monotonic() + PRUNE_EVERY_S
            claimed = self._claim_batch()
            if not claimed:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            try:
                self.handler.handle(claimed)
                backoff = 0.0
                self.metrics.processing_paused.set(0)
            except InfrastructureError as exc:
                backoff = min(max(2 * backoff, BACKOFF_INITIAL_S), BACKOFF_MAX_S)
                self.metrics.processing_paused.set(1)
                logger.warning("processing paused for %.0f s, batch requeued: %s", backoff, exc)
                self.stopping.wait(backoff)
            except Exception:  # a bug in the handler itself: the batch must not be stranded
                logger.exception("internal error in the processing loop; batch requeued")
                self.metrics.internal_errors.labels("batch").inc()
                self.spool.requeue(claimed)
                self.stopping.wait(BACKOFF_INITIAL_S)

    def _send_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.outbox.send_due()
            except Exception:  # a bug, or a disk error writing a state: logged, the loop goes on
                logger.exception("internal error in the sending loop; continuing")
                self.metrics.internal_errors.labels("send").inc()
            self.wake_sender.wait(1.0)
            self.wake_sender.clear()

    # -- health -------------------------------------------------------------------------
    def alive(self) -> bool:
        return not self.stopping.is_set() and all_alive(self.threads, self.receiver.listening)

    def ready(self) -> dict[str, bool]:
        return readiness(self.spool, self.receiver.room_for_a_data_set(), self.handler.model_answered, self.alive())

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(self.spool.depth())
        self.metrics.outbox_depth.set(self.outbox.depth())

