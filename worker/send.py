"""Send: C-STORE SCU, or STOW-RS (:mod:`worker.dicomweb`), from a persistent outbox, with exponential backoff.

Each result is a ``.dcm`` file (``.hl7`` for an HL7 message, :mod:`worker.mllp`) in
``outbox/<destination key>/`` beside a ``.json``
state (destination, attempts, first and next attempt). Transient failures (no
association, abort, timeout, 0xA7xx out of resources) are retried with backoff
until ``retry_horizon_h``, counted from the object's first real attempt; permanent
ones (association rejected permanently, 0xA9xx, 0xCxxx, 0x0122) go to ``dead/`` at
once. The state survives restarts; in memory it is an index (a heap by next attempt per
destination), so a round reads no state file.

One stuck object must not hold up the others: in a round the objects never tried go
first and the ones that failed before go last, and when an association is lost mid-round
only the object in flight is charged; the objects after it were never attempted.
"""

from __future__ import annotations

import contextlib
import copy
import heapq
import itertools
import json
import logging
import os
import socket
import ssl
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from worker import compat
from worker.audit import AuditTrail
from worker.config import Destination, DicomWebDestination, Hl7Destination, SecuritySection, SendSection
from worker.dicomweb import StowClient
from worker.errors import SendError
from worker.metrics import Metrics
from worker.mllp import MllpClient
from worker.spool import Spool, fsync, key
from worker.status import REJECTED_PERMANENT, AuditOutcome, is_permanent, stored

logger = logging.getLogger(__name__)


@dataclass
class OutboxState:
    destination: str
    sop_instance_uid: str
    attempts: int = 0
    first_attempt: float = 0.0
    next_attempt: float = 0.0
    last_error: str = ""
    study_instance_uid: str = ""
    sop_class_uid: str = ""

    @classmethod
    def from_json(cls, text: str) -> OutboxState:
        """Read a state file; keys of a newer or older version are ignored or defaulted."""
        raw = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def destination_key(dest: Destination | DicomWebDestination | Hl7Destination) -> str:
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
        if UID(syntax).is_compressed:  # a PACS that takes no JPEG gets the same pixels uncompressed
            ae.add_requested_context(sop_class, list(UNCOMPRESSED))
    answer: dict[str, int] = {}
    compat.keep_responses_for_the_sender()

    def on_acse(event: evt.Event) -> None:
        # pynetdicom does not keep the A-ASSOCIATE-RJ result on the association.
        result = getattr(getattr(event, "primitive", None), "result", None)
        if isinstance(result, int):
            answer["result"] = int(result)

    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                         evt_handlers=[(evt.EVT_ACSE_RECV, on_acse), (evt.EVT_CONN_OPEN, no_delay)],
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
            if not assoc.is_established:  # lost with an earlier object: this one was never tried
                results.append(SendError(f"{dest}: association lost before this object", attempted=False))
                continue
            try:
                status = assoc.send_c_store(as_accepted(ds, assoc))
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


def no_delay(event: evt.Event) -> None:
    """EVT_CONN_OPEN: switch Nagle's algorithm off on the association's socket, as Orthanc and
    DCMTK's ``TCP_NODELAY=1`` do: a C-STORE is several PDUs, and with Nagle on the last one waits
    for the PACS's delayed ACK (~40 ms per object on Linux). Safe only with
    :func:`compat.keep_responses_for_the_sender`, since the faster answers otherwise race
    pynetdicom's reactor (docs/benchmarks.md, "End to end")."""
    sock = compat.raw_socket(event.assoc)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


#: Proposed beside a compressed object's own transfer syntax, for a PACS that accepts no other.
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def as_accepted(ds: Any, assoc: Any) -> Any:
    """``ds`` as the association can carry it: itself when the PACS accepted its transfer
    syntax (or it is uncompressed), else a decompressed copy when the PACS accepted only an
    uncompressed one for its SOP class (the file in the outbox is left as it is)."""
    syntax = UID(str(ds.file_meta.TransferSyntaxUID))
    accepted = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
                if str(cx.abstract_syntax) == str(ds.SOPClassUID)}
    if not syntax.is_compressed or syntax in accepted or not accepted & set(UNCOMPRESSED):
        return ds
    plain = copy.deepcopy(ds)
    # pylibjpeg / Pillow; YBR becomes RGB, Lossy Image Compression stays "01". The same
    # instance in another encoding keeps its UID (pydicom would make a new one: the SR and
    # the outbox name this one).
    plain.decompress(generate_instance_uid=False)
    return plain


def echo(dest: Destination, calling_ae: str, timeout: float = 10.0, tls: ssl.SSLContext | None = None) -> int:
    """C-ECHO ``dest``; returns the status, raises SendError when unreachable."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    compat.keep_responses_for_the_sender()
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
    """Results waiting to be delivered, one folder per destination, indexed in memory."""

    def __init__(self, spool: Spool, settings: SendSection, calling_ae: str, *, tls: ssl.SSLContext | None = None,
                 metrics: Metrics | None = None, audit: AuditTrail | None = None,
                 security: SecuritySection | None = None) -> None:
        self.spool = spool
        self.settings = settings
        self.calling_ae = calling_ae
        self.tls = tls
        self.metrics = metrics or Metrics()
        self.audit = audit
        self.destinations = {destination_key(d): d for d in settings.destinations}
        self._web = {k: StowClient(d, settings, security or SecuritySection()) for k, d in self.destinations.items()
                     if isinstance(d, DicomWebDestination)}
        self._hl7 = {k: MllpClient(d) for k, d in self.destinations.items() if isinstance(d, Hl7Destination)}
        self._lock = threading.Lock()
        self._states: dict[str, dict[str, OutboxState]] = {k: {} for k in self.destinations}
        self._due: dict[str, list[tuple[float, int, str]]] = {k: [] for k in self.destinations}
        self._seq = itertools.count()
        self.partial_files_removed = self._load()

    # -- index ------------------------------------------------------------------------
    def _load(self) -> int:
        """Read every state once, at start; remove what a crash or a full disk left half-written.

        A ``.dcm`` (``.hl7``) without its ``.json`` was never complete: its input is not marked done
        and will be processed again, so the file can go.
        """
        removed = 0
        now = time.time()
        for dkey, dest in self.destinations.items():
            folder = self.spool.outbox / dkey
            if not folder.is_dir():
                continue
            names = os.listdir(folder)
            present = set(names)
            for name in names:
                path = folder / name
                stem, _, ext = name.partition(".")
                payload = self._suffix(dkey)
                if ext in ("part", "json.tmp") or (f".{ext}" == payload and f"{stem}.json" not in present) or \
                        (ext == "json" and f"{stem}{payload}" not in present):
                    path.unlink(missing_ok=True)
                    removed += 1
                    continue
                if ext != "json":
                    continue
                try:
                    state = OutboxState.from_json(path.read_text())
                except (OSError, ValueError, TypeError):
                    # A state file we cannot read must not leave its result unsent and unseen.
                    logger.error("unreadable outbox state: result re-queued with a fresh state",
                                 extra={"destination": str(dest)})
                    state = OutboxState(str(dest), "unknown", next_attempt=now)
                    self._write_state(path, state)
                self._index(dkey, stem, state)
        return removed

    def _suffix(self, dkey: str) -> str:
        """The payload file's suffix: ``.hl7`` for an HL7 message, ``.dcm`` for a DICOM object."""
        return ".hl7" if dkey in self._hl7 else ".dcm"

    def _index(self, dkey: str, name: str, state: OutboxState) -> None:
        self._states[dkey][name] = state
        heapq.heappush(self._due[dkey], (state.next_attempt, next(self._seq), name))

    def depth(self) -> int:
        with self._lock:
            return sum(len(s) for s in self._states.values())

    def due(self, now: float, batch: int = 32) -> dict[str, list[tuple[Path, OutboxState]]]:
        """Up to ``batch`` due items per destination: never-tried first, then by next attempt."""
        out: dict[str, list[tuple[Path, OutboxState]]] = {}
        with self._lock:
            for dkey, heap in self._due.items():
                picked: list[tuple[str, OutboxState]] = []
                while heap and heap[0][0] <= now and len(picked) < batch:
                    when, _, name = heapq.heappop(heap)
                    state = self._states[dkey].get(name)
                    if state is None or state.next_attempt != when or any(n == name for n, _ in picked):
                        continue  # an entry left behind by a reschedule or a delivery
                    picked.append((name, state))
                if picked:
                    picked.sort(key=lambda item: (item[1].attempts, item[1].next_attempt))
                    folder = self.spool.outbox / dkey
                    out[dkey] = [(folder / f"{name}{self._suffix(dkey)}", state) for name, state in picked]
        return out

    # -- write ------------------------------------------------------------------------
    def put(self, name: str, data: bytes, sop_instance_uid: str, *, study_instance_uid: str = "",
            sop_class_uid: str = "", hl7: bool = False) -> None:
        """Queue one encoded result for every destination of its kind, durably: a DICOM object
        for the C-STORE and DICOMweb destinations, an HL7 message (``hl7``) for the HL7 ones.

        ``name`` is derived from the deterministic output UID, so a re-run after a
        crash overwrites rather than duplicates.

        Raises:
            OSError: the disk is full or failing; nothing half-written is left behind.
        """
        written: list[tuple[str, OutboxState]] = []
        for dkey, dest in self.destinations.items():
            if (dkey in self._hl7) != hl7:
                continue
            folder = self.spool.outbox / dkey
            payload = folder / f"{name}{self._suffix(dkey)}"
            part = folder / f"{name}.part"
            state = OutboxState(str(dest), sop_instance_uid, next_attempt=time.time(),
                                study_instance_uid=study_instance_uid, sop_class_uid=sop_class_uid)
            try:
                folder.mkdir(exist_ok=True)
                part.write_bytes(data)
                fsync(part)
                os.replace(part, payload)
                self._write_state(folder / f"{name}.json", state)
                fsync(folder)
            except OSError:
                part.unlink(missing_ok=True)
                (folder / f"{name}.json.tmp").unlink(missing_ok=True)
                if not (folder / f"{name}.json").exists():
                    payload.unlink(missing_ok=True)
                raise
            written.append((dkey, state))
        with self._lock:
            for dkey, state in written:
                self._index(dkey, name, state)

    @staticmethod
    def _write_state(path: Path, state: OutboxState) -> None:
        """Write a state file atomically (temp, fsync, rename)."""
        tmp = path.with_suffix(".json.tmp")
        try:
            tmp.write_text(json.dumps(asdict(state)))
            fsync(tmp)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    # -- send -------------------------------------------------------------------------
    def _dead(self, dkey: str, path: Path, state: OutboxState, why: str) -> None:
        state.last_error = why
        target = self.spool.dead / f"{path.parent.name}-{path.name}"
        os.replace(path, target)
        self._write_state(target.with_suffix(".json"), state)
        path.with_suffix(".json").unlink(missing_ok=True)
        with self._lock:
            self._states[dkey].pop(path.stem, None)
        self.metrics.dead_letters.labels(state.destination).inc()
        logger.error("dead letter: %s", why, extra={"sop_instance_uid": state.sop_instance_uid,
                                                     "destination": state.destination})

    def _reschedule(self, dkey: str, path: Path, state: OutboxState) -> None:
        with self._lock:
            if path.stem in self._states[dkey]:
                heapq.heappush(self._due[dkey], (state.next_attempt, next(self._seq), path.stem))

    def send_due(self, now: float | None = None, batch: int = 32) -> int:
        """Try every due item once (up to ``batch`` per destination); returns how many were delivered.

        Destinations are served side by side, one thread each, so that one that stalls until
        its timeout does not hold up the others.
        """
        now = time.time() if now is None else now
        due = self.due(now, batch)
        if len(due) <= 1:
            return sum(self._send_to(dkey, items, now) for dkey, items in due.items())
        counts: dict[str, int] = {}

        def run(dkey: str, items: list[tuple[Path, OutboxState]]) -> None:
            try:
                counts[dkey] = self._send_to(dkey, items, now)
            except Exception:  # a bug: the service's loop logs it; here it must not end the others
                logger.exception("internal error sending to a destination",
                                 extra={"destination": str(self.destinations[dkey])})
                self.metrics.internal_errors.labels("send").inc()

        threads = [threading.Thread(target=run, args=item, name="send-destination", daemon=True)
                   for item in due.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(counts.values())

    def _store(self, dkey: str, paths: list[Path]) -> list[SendError | None]:
        dest = self.destinations[dkey]
        if isinstance(dest, DicomWebDestination):
            return self._web[dkey].store(paths)
        if isinstance(dest, Hl7Destination):
            return self._hl7[dkey].store(paths)
        return store(dest, paths, self.settings, self.calling_ae, self.tls)

    def _send_to(self, dkey: str, items: list[tuple[Path, OutboxState]], now: float) -> int:
        """One destination's share of a round; returns how many were delivered."""
        dest = self.destinations[dkey]
        delivered = 0
        started = time.perf_counter()
        try:
            results = self._store(dkey, [p for p, _ in items])
        except Exception as exc:  # unreadable file, socket error: retry later
            results = [SendError(f"{dest}: {type(exc).__name__}: {exc}")] * len(items)
        for (path, state), err in zip(items, results, strict=True):
            if err is not None and not err.attempted:
                self._reschedule(dkey, path, state)  # still due: the next round tries it
                continue
            self._audit(state, str(dest), err)
            try:
                if err is None:
                    self._delivered(dkey, path, state)
                    delivered += 1
                else:
                    self._failed(dkey, path, state, err, now)
            except OSError as exc:  # a full or failing disk: keep the item scheduled, retry later
                logger.error("outbox not writable: %s", type(exc).__name__,
                             extra={"sop_instance_uid": state.sop_instance_uid})
                self._reschedule(dkey, path, state)
        self.metrics.stage_seconds.labels("send").observe((time.perf_counter() - started) / max(1, len(items)))
        return delivered

    def _delivered(self, dkey: str, path: Path, state: OutboxState) -> None:
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)
        with self._lock:
            self._states[dkey].pop(path.stem, None)
        dest = self.destinations[dkey]
        self.metrics.sent.labels(str(dest)).inc()
        logger.info("sent", extra={"sop_instance_uid": state.sop_instance_uid, "destination": str(dest)})

    def _failed(self, dkey: str, path: Path, state: OutboxState, err: SendError, now: float) -> None:
        dest = self.destinations[dkey]
        self.metrics.send_failures.labels(str(dest)).inc()
        state.attempts += 1
        state.first_attempt = state.first_attempt or now
        state.last_error = str(err)
        if err.permanent:
            self._dead(dkey, path, state, f"permanent failure: {err}")
            return
        if now - state.first_attempt > self.settings.retry_horizon_h * 3600:
            self._dead(dkey, path, state, f"retries exhausted after {state.attempts} attempts: {err}")
            return
        delay = min(self.settings.retry_initial_s * 2 ** min(state.attempts - 1, 32),
                    self.settings.retry_max_interval_s)
        state.next_attempt = now + delay
        self._reschedule(dkey, path, state)
        try:
            self._write_state(path.with_suffix(".json"), state)
        except OSError as exc:  # the index holds the schedule; a restart starts it afresh
            logger.error("cannot write outbox state: %s", type(exc).__name__,
                         extra={"sop_instance_uid": state.sop_instance_uid})
        logger.warning("send failed, retrying in %.0f s: %s", delay, err,
                       extra={"sop_instance_uid": state.sop_instance_uid,
                              "destination": str(dest), "attempts": state.attempts})

    def _audit(self, state: OutboxState, destination: str, err: SendError | None) -> None:
        if self.audit is None:
            return
        try:
            self.audit.instance_sent(state.sop_class_uid, state.sop_instance_uid, state.study_instance_uid,
                                     destination, self.calling_ae,
                                     AuditOutcome.SUCCESS if err is None else AuditOutcome.MINOR_FAILURE,
                                     "" if err is None else str(err))
        except OSError:
            logger.error("audit trail not writable")
