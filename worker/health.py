"""When the service is ready, and whether its destinations answer.

Readiness (``/readyz``) says whether *this* worker can accept and process studies: the
model answered, the spool is writable and above its reserve, every thread is running.
It does no network I/O, so it answers well within a probe's 1 s. Whether a PACS answers
is not readiness (the outbox keeps results until it is back): a background thread
C-ECHOes each destination (QIDO-RS for DICOMweb) and reports it in ``cxr_destination_up``
and ``/healthz``.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from worker.config import Destination, DicomWebDestination, Hl7Destination, SecuritySection, SendSection
from worker.dicomweb import StowClient
from worker.metrics import Metrics
from worker.mllp import MllpClient
from worker.send import echo
from worker.spool import Spool

logger = logging.getLogger(__name__)


def readiness(spool: Spool, room_for_a_data_set: bool, model_answered: bool, threads_alive: bool
              ) -> dict[str, bool]:
    """The checks behind ``/readyz``; ready when all are true.

    ``room_for_a_data_set``: the spool can take the largest data set the receiver accepts and
    stay above its reserve (:meth:`worker.receive.Receiver.room_for_a_data_set`); a worker
    reporting ready below that would answer the next C-STORE with A700.
    """
    return {
        "model_answered": model_answered,
        "spool_writable": spool.writable(),
        "disk_above_reserve": room_for_a_data_set,
        "threads_alive": threads_alive,
    }


class DestinationMonitor:
    """Check every destination every ``interval_s`` in a thread of its own: C-ECHO, or for a
    DICOMweb destination one QIDO-RS ``/studies?limit=1`` (it proves the server answers and
    takes our credentials, and costs the server one small query)."""

    def __init__(self, destinations: list[Destination | DicomWebDestination | Hl7Destination], calling_ae: str,
                 metrics: Metrics,
                 interval_s: float, tls: ssl.SSLContext | None = None, timeout_s: float = 5.0,
                 security: SecuritySection | None = None) -> None:
        self.destinations = destinations
        web = SendSection(acse_timeout=timeout_s, dimse_timeout=timeout_s)
        self.web = {str(d): StowClient(d, web, security or SecuritySection()) for d in destinations
                    if isinstance(d, DicomWebDestination)}
        self.calling_ae = calling_ae
        self.metrics = metrics
        self.interval_s = max(interval_s, 1.0)
        self.tls = tls
        self.timeout_s = timeout_s
        self.status: dict[str, dict[str, Any]] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="destinations", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()

    def check_all(self) -> None:
        for dest in self.destinations:
            name = str(dest)
            try:
                if isinstance(dest, DicomWebDestination):
                    self.web[name].check()
                    up, error = True, ""
                elif isinstance(dest, Hl7Destination):  # a connection (and TLS handshake) is all MLLP offers
                    MllpClient(dest.model_copy(update={"timeout_s": self.timeout_s})).check()
                    up, error = True, ""
                else:
                    up, error = echo(dest, self.calling_ae, timeout=self.timeout_s, tls=self.tls) == 0, ""
            except Exception as exc:  # unreachable, refused, TLS failure: all mean "down"
                up, error = False, f"{type(exc).__name__}: {exc}"
            was = self.status.get(name, {}).get("up")
            if was is not None and was != up:
                logger.warning("destination %s", "up" if up else "down", extra={"destination": name})
            self.status[name] = {"up": up, "checked": datetime.now(UTC).isoformat(timespec="seconds"),
                                 **({"error": error} if error else {})}
            self.metrics.destination_up.labels(name).set(1 if up else 0)

    def detail(self) -> dict[str, Any]:
        """For ``/healthz``: each destination's last check."""
        return {"destinations": dict(self.status)}

    def _run(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            self.check_all()
            self.stopping.wait(max(0.0, self.interval_s - (time.monotonic() - started)))


def all_alive(threads: list[threading.Thread], *others: Callable[[], bool]) -> bool:
    return all(t.is_alive() for t in threads) and all(check() for check in others)
