"""Send: C-STORE SCU from a persistent outbox, with exponential backoff.

Each result is a ``.dcm`` file in ``outbox/<destination key>/`` beside a ``.json``
state (destination, attempts, first and next attempt). Transient failures (no
association, abort, timeout, 0xA7xx out of resources) are retried with backoff
until ``retry_horizon_h``; permanent ones (association rejected permanently,
0xA9xx, 0xCxxx, 0x0122) go to ``dead/`` at once. The state survives restarts.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from worker.audit import AuditTrail
from worker.codes import REJECTED_PERMANENT, AuditOutcome, is_permanent, stored
from worker.config import Destination, SendSection
from worker.errors import SendError
from worker.metrics import Metrics
from worker.spool import Spool, fsync, key

logger = logging.getLogger(__name__)


@dataclass
class OutboxState:
    destination: str
    sop_instance_uid: str
    attempts: int = 0
    first_attempt: float = 0.0
    next_attempt: float = 0.0
    last_error: str = ""


def destination_key(dest: Destination) -> str:
    return key(str(dest))


def store(dest: Destination, paths: list[Path], settings: SendSection, calling_ae: str,
          tls: ssl.SSLContext | None = None) -> list[SendError | None]:
    """C-STORE ``paths`` to ``dest`` over one association.

    Returns:
        One entry per path: None when stored, else the SendError. A file that cannot be
        read, or whose SOP class the PACS did not accept, fails alone and permanently.
    """
    datasets: list[Any] = []
    for p in paths:
        try:
            datasets.append(dcmread(p))
        except Exception as exc:
            datasets.append(SendError(f"{dest}: unreadable result file ({type(exc).__name__})", permanent=True))
    readable = [ds for ds in datasets if not isinstance(ds, SendError)]
    if not readable:
        return list(datasets)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    for sop_class, syntax in {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in readable}:
        ae.add_requested_context(sop_class, syntax)
    answer: dict[str, int] = {}

    def on_acse(event: evt.Event) -> None:
        # pynetdicom does not keep the A-ASSOCIATE-RJ result on the association.
        result = getattr(getattr(event, "primitive", None), "result", None)
        if isinstance(result, int):
            answer["result"] = int(result)

    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=[(evt.EVT_ACSE_RECV, on_acse)],
                         tls_args=(tls, dest.host) if tls is not None else None)
    if not assoc.is_established:
        permanent = answer.get("result") == REJECTED_PERMANENT
        why = ("rejected (permanent)" if permanent else "rejected (transient)") if "result" in answer and \
            answer["result"] else "aborted" if assoc.is_aborted else "no association"
        return [ds if isinstance(ds, SendError) else SendError(f"{dest}: association {why}", permanent=permanent)
                for ds in datasets]
    results: list[SendError | None] = []
    try:
        for ds in datasets:
            if isinstance(ds, SendError):
                results.append(ds)
                continue
            if not assoc.is_established:
                results.append(SendError(f"{dest}: association lost"))
                continue
            try:
                status = assoc.send_c_store(ds)
            except ValueError:  # the PACS accepted no presentation context for this SOP class
                results.append(SendError(f"{dest}: SOP class {ds.SOPClassUID} not accepted", permanent=True))
                continue
            code = int(status.Status) if "Status" in status else None
            if code is None:
                results.append(SendError(f"{dest}: no response (timeout or abort)"))
            elif stored(code):
                results.append(None)
            else:
                results.append(SendError(f"{dest}: status 0x{code:04X}", permanent=is_permanent(code)))
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def echo(dest: Destination, calling_ae: str, timeout: float = 10.0, tls: ssl.SSLContext | None = None) -> int:
    """C-ECHO ``dest``; returns the status, raises SendError when unreachable."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                         tls_args=(tls, dest.host) if tls is not None else None)
    if not assoc.is_established:
        raise SendError(f"{dest}: association {'rejected' if assoc.is_rejected else 'failed'}")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in status:
        raise SendError(f"{dest}: no C-ECHO response")
    return int(status.Status)


class Outbox:
    """Results waiting to be delivered, one folder per destination."""

    def __init__(self, spool: Spool, settings: SendSection, calling_ae: str, *, tls: ssl.SSLContext | None = None,
                 metrics: Metrics | None = None, audit: AuditTrail | None = None) -> None:
        self.spool = spool
        self.settings = settings
        self.calling_ae = calling_ae
        self.tls = tls
        self.metrics = metrics or Metrics()
        self.audit = audit
        self.destinations = {destination_key(d): d for d in settings.destinations}

    def put(self, name: str, data: bytes, sop_instance_uid: str) -> None:
        """Queue one encoded result for every destination, durably.

        ``name`` is derived from the deterministic output UID, so a re-run after a
        crash overwrites rather than duplicates.
        """
        for dkey, dest in self.destinations.items():
            folder = self.spool.outbox / dkey
            folder.mkdir(exist_ok=True)
            part = folder / f"{name}.part"
            part.write_bytes(data)
            fsync(part)
            os.replace(part, folder / f"{name}.dcm")
            self._write_state(folder / f"{name}.json", OutboxState(str(dest), sop_instance_uid,
                                                                   next_attempt=time.time()))
            fsync(folder)

    @staticmethod
    def _write_state(path: Path, state: OutboxState) -> None:
        """Write a state file atomically (temp, fsync, rename)."""
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(state)))
        fsync(tmp)
        os.replace(tmp, path)

    def depth(self) -> int:
        return sum(1 for _ in self.spool.outbox.glob("*/*.dcm"))

    def due(self, now: float) -> dict[str, list[tuple[Path, OutboxState]]]:
        out: dict[str, list[tuple[Path, OutboxState]]] = {}
        for dkey in self.destinations:
            for state_file in sorted((self.spool.outbox / dkey).glob("*.json")):
                try:
                    state = OutboxState(**json.loads(state_file.read_text()))
                except (OSError, ValueError, TypeError):
                    # A state file we cannot read must not leave its result unsent and unseen.
                    logger.error("unreadable outbox state: result re-queued with a fresh state",
                                 extra={"destination": str(self.destinations[dkey])})
                    state = OutboxState(str(self.destinations[dkey]), "unknown", next_attempt=now)
                    self._write_state(state_file, state)
                if state.next_attempt <= now and state_file.with_suffix(".dcm").is_file():
                    out.setdefault(dkey, []).append((state_file.with_suffix(".dcm"), state))
        return out

    def _dead(self, path: Path, state: OutboxState, why: str) -> None:
        state.last_error = why
        target = self.spool.dead / f"{path.parent.name}-{path.name}"
        os.replace(path, target)
        self._write_state(target.with_suffix(".json"), state)
        path.with_suffix(".json").unlink(missing_ok=True)
        self.metrics.dead_letters.inc()
        logger.error("dead letter: %s", why, extra={"sop_instance_uid": state.sop_instance_uid,
                                                     "destination": state.destination})

    def send_due(self, now: float | None = None, batch: int = 32) -> int:
        """Try every due item once; returns how many were delivered."""
        now = time.time() if now is None else now
        delivered = 0
        for dkey, items in self.due(now).items():
            dest = self.destinations[dkey]
            items = items[:batch]
            started = time.perf_counter()
            try:
                results = store(dest, [p for p, _ in items], self.settings, self.calling_ae, self.tls)
            except Exception as exc:  # unreadable file, socket error: retry later
                results = [SendError(f"{dest}: {type(exc).__name__}: {exc}")] * len(items)
            for (path, state), err in zip(items, results, strict=True):
                if self.audit is not None:
                    try:
                        self.audit.instance_sent(state.sop_instance_uid, str(dest), self.calling_ae,
                                                 AuditOutcome.SUCCESS if err is None else AuditOutcome.MINOR_FAILURE,
                                                 "" if err is None else str(err))
                    except OSError:
                        logger.error("audit trail not writable")
                if err is None:
                    path.unlink(missing_ok=True)
                    path.with_suffix(".json").unlink(missing_ok=True)
                    delivered += 1
                    self.metrics.sent.labels(str(dest)).inc()
                    logger.info("sent", extra={"sop_instance_uid": state.sop_instance_uid,
                                               "destination": str(dest)})
                    continue
                self.metrics.send_failures.labels(str(dest)).inc()
                state.attempts += 1
                state.first_attempt = state.first_attempt or now
                state.last_error = str(err)
                if err.permanent:
                    self._dead(path, state, f"permanent failure: {err}")
                elif now - state.first_attempt > self.settings.retry_horizon_h * 3600:
                    self._dead(path, state, f"retries exhausted after {state.attempts} attempts: {err}")
                else:
                    delay = min(self.settings.retry_initial_s * 2 ** min(state.attempts - 1, 32),
                                self.settings.retry_max_interval_s)
                    state.next_attempt = now + delay
                    self._write_state(path.with_suffix(".json"), state)
                    logger.warning("send failed, retrying in %.0f s: %s", delay, err,
                                   extra={"sop_instance_uid": state.sop_instance_uid,
                                          "destination": str(dest), "attempts": state.attempts})
            self.metrics.stage_seconds.labels("send").observe((time.perf_counter() - started) / max(1, len(items)))
        return delivered
