"""Answering in several processes (``processing.workers``): every core busy.

Decode, infer + Grad-CAM and the SC and SR builds hold the GIL for most of an image's CPU
time, so threads cannot use a second core. :class:`AnswerPool` runs N processes, each with its
own ONNX Runtime session (on the CPU) and its own :class:`~worker.pipeline.Processor`; the
service hands each a claimed batch and gets back, per file, what :class:`worker.batch.BatchHandler`
does with it. Only the service's process moves spool files (claim, finish, quarantine,
requeue, done markers), so the spool's guarantees are the ones of a single process: an answer
process that dies takes no file with it; its batch is requeued and counted as a crash.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.config import Settings
from worker.errors import InfrastructureError, WorkerError
from worker.faults import Fault, RemoteFailure
from worker.pipeline import Decoded, Processor, Result, Skipped, uid_of
from worker.spool import key

logger = logging.getLogger(__name__)


@dataclass
class Duplicate:
    """The instance was answered before (a done/ marker) or twice in this batch."""

    sop_instance_uid: str


@dataclass
class Answered:
    item: Decoded
    result: Result | RemoteFailure  # a failure to build this image's outputs
    decode_seconds: float
    per_image_seconds: float


Outcome = Skipped | Duplicate | RemoteFailure | Answered

_processor: Processor | None = None


def _start(settings: Settings, model_path: Path, threads: int) -> None:
    """In each answer process: die with the service, log as it does, load the model once."""
    global _processor
    if sys.platform == "linux":  # a service killed with -9 must not leave answer processes behind
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    # The service stops them when its own batches are done: a SIGTERM or Ctrl-C sent to the whole
    # group (systemd's control group, a terminal) must not cut a batch short.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    from worker.logs import configure
    from worker.model import OnnxModel

    configure(settings.log.level, settings.log.format)
    m = settings.model
    # The model the service loaded (the fallback, when the configured one failed its probe check
    # on this machine): same hardware, so its probes are not run again.
    # The site's prevalence and operating point as in the service's model (cli._load_model):
    # every process must report the same probability and decide at the same threshold.
    model = OnnxModel(model_path, providers=m.providers, threads=m.threads or threads, io_binding=m.io_binding,
                      batch_size=m.batch_size, pad_batches=m.pad_batches, probe_check=False,
                      site_prevalence=m.site_prevalence, target_sensitivity=m.target_sensitivity)
    _processor = Processor(settings, model, build_threads=1)


def _warm_up() -> tuple[float, float | None]:
    """Answer a blank image; return the threshold and prevalence this process reports at."""
    assert _processor is not None
    info = _processor.model.info
    _processor.model.predict(np.zeros((1, info.input_size, info.input_size, 1), np.float32))
    return info.threshold, info.assumed_prevalence


def _answer(paths: list[Path], done: Path) -> tuple[list[Outcome], bool]:
    """In an answer process: decode, infer and build one batch. Returns each file's outcome
    and whether the model answered. An infrastructure fault of the model run raises."""
    assert _processor is not None
    processor, version = _processor, _processor.model.info.version
    outcomes: dict[Path, Outcome] = {}
    ready: list[Decoded] = []
    seconds: dict[Path, float] = {}
    markers: set[str] = set()
    for path in paths:
        started = time.perf_counter()
        try:
            decoded = processor.decode(path)
        except Exception as exc:
            outcomes[path] = RemoteFailure.of(exc, "decode")
            continue
        if isinstance(decoded, Skipped):
            outcomes[path] = decoded
            continue
        marker = key(uid_of(decoded.ds), version)
        if marker in markers or (done / marker).exists():
            outcomes[path] = Duplicate(uid_of(decoded.ds))
            continue
        markers.add(marker)
        ready.append(decoded)
        seconds[path] = time.perf_counter() - started
    if ready:
        started = time.perf_counter()
        try:
            results = processor.infer_and_build(ready)
        except Exception as exc:
            failure = RemoteFailure.of(exc, "infer")
            if failure.fault is Fault.INFRASTRUCTURE:
                raise InfrastructureError(f"infer: {failure.text}") from None
            outcomes.update({d.path: failure for d in ready})
            return [outcomes[p] for p in paths], False
        per_image = (time.perf_counter() - started) / len(ready)
        for item, result in zip(ready, results, strict=True):
            item.model_input = np.empty(0, np.float32)  # not needed back: less to copy between processes
            if isinstance(result, Result):
                result.rgb = np.empty(0, np.uint8)  # drawn into the SC, which is encoded already
                answer: Result | RemoteFailure = result
            else:
                answer = RemoteFailure.of(result, "build")
            outcomes[item.path] = Answered(item, answer, seconds[item.path], per_image)
    return [outcomes[p] for p in paths], bool(ready)


class AnswerPool:
    """N answer processes; :meth:`answer` runs one batch in one of them."""

    def __init__(self, settings: Settings, processes: int, model_path: Path,
                 reporting: tuple[float, float | None] | None = None) -> None:
        self.settings = settings
        self.model_path = Path(model_path)
        self.processes = processes
        #: The threshold and prevalence the service's own model reports at; every answer process
        #: is checked against it at start.
        self.reporting = reporting
        # ONNX Runtime's intra-op threads: the cores shared out, so N sessions do not oversubscribe.
        self.threads = max(1, _cores() // processes)
        self._pool: ProcessPoolExecutor | None = None
        self._restart = threading.Lock()

    def start(self) -> None:
        """Start the processes and have each load the model and answer a blank image.

        Raises:
            BaseException: a process could not load the model or run it.
        """
        # spawn: a fork would copy the service's threads' locks (pynetdicom, ONNX Runtime) mid-use.
        self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start, initargs=(self.settings, self.model_path, self.threads))
        for f in [self._pool.submit(_warm_up) for _ in range(self.processes)]:
            reporting = f.result(timeout=300)
            if self.reporting is not None and reporting != self.reporting:
                raise WorkerError(f"an answer process reports at threshold and prevalence {reporting}, the service "
                                  f"at {self.reporting}: they must decide alike")

    def answer(self, paths: list[Path], done: Path) -> tuple[list[Outcome], bool]:
        """One batch's outcomes (see :func:`_answer`).

        Raises:
            BrokenProcessPool: an answer process died (out of memory, a crash in a library):
                the pool is started again; the caller requeues the batch as suspects.
            InfrastructureError: the model run failed.
        """
        pool = self._pool
        assert pool is not None
        try:
            return pool.submit(_answer, paths, done).result()
        except BrokenProcessPool:
            with self._restart:  # the other batches in flight broke with it: one restart
                if self._pool is pool:
                    logger.error("an answer process died; starting them again")
                    pool.shutdown(wait=False, cancel_futures=True)
                    self.start()
            raise

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
