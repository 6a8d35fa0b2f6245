"""Receive: C-ECHO and C-STORE SCP that writes each instance durably into the spool.

The C-STORE handler only writes and returns a status; it never raises and never
opens an association. The success status goes back only after the instance has been
fsynced and renamed into ``queue/``.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from pydicom import Dataset, dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import _config, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from worker import compat
from worker.audit import NETWORK_ENTRY, NODE_AUTHENTICATION, AuditTrail, study_uid_of
from worker.config import Settings
from worker.metrics import Metrics
from worker.security import (
    AllowList,
    GuardedAE,
    GuardedServer,
    TransportLimits,
    install_acceptor_guards,
    server_context,
)
from worker.selection import invalid_uid
from worker.spool import Spool
from worker.status import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS, AuditOutcome

logger = logging.getLogger(__name__)

#: Transfer syntaxes we accept: uncompressed, RLE, JPEG, JPEG-LS, JPEG 2000.
ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
]


class Refused(Exception):
    """An instance refused at receive: its status and the reason the peer is told."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _meta_end(path: Path) -> int:
    """Offset of the data set after the File Meta Information (its group length, PS3.10 7.1)."""
    with open(path, "rb") as f:
        f.seek(132)
        head = f.read(12)
    if len(head) < 12 or head[:8] != b"\x02\x00\x00\x00UL\x04\x00":
        raise Refused(CANNOT_UNDERSTAND, "file meta without its group length")
    return 144 + int(struct.unpack("<I", head[8:12])[0])


def inflate(path: Path, limit: int) -> Path:
    """Rewrite a Deflated Explicit VR Little Endian file beside itself as Explicit VR Little
    Endian, refusing it as soon as the inflated data set passes ``limit`` bytes.

    A deflate stream inflates up to ~1000x: pydicom would inflate it whole, in memory,
    when the instance is processed. Here memory stays at one chunk.
    """
    start = _meta_end(path)
    meta = read_file_meta_info(path)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    target = path.with_name(path.name + ".inflated")
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total, chunk = 0, 1 << 20
    try:
        with open(path, "rb") as src, open(target, "wb") as out:
            out.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(out, meta, enforce_standard=True)  # type: ignore[arg-type]  # any binary file
            src.seek(start)
            pending = b""
            while True:
                if not pending:
                    pending = src.read(chunk)
                    if not pending:
                        break
                piece = inflater.decompress(pending, chunk)
                pending = inflater.unconsumed_tail
                total += len(piece)
                if total > limit:
                    raise Refused(CANNOT_UNDERSTAND, f"inflated data set over {limit >> 20} MB")
                out.write(piece)
                if inflater.eof:
                    break
            if not inflater.eof:
                raise Refused(CANNOT_UNDERSTAND, "deflated data set ends inside its deflate stream")
    except zlib.error as exc:
        target.unlink(missing_ok=True)
        raise Refused(CANNOT_UNDERSTAND, f"deflated data set cannot be inflated: {exc}") from None
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    path.unlink(missing_ok=True)
    return target


class Receiver:
    """The SCP side: accepts, spools, acknowledges; nothing else."""

    def __init__(self, settings: Settings, spool: Spool, on_stored: Callable[[], None],
                 metrics: Metrics | None = None, audit: AuditTrail | None = None) -> None:
        self.settings = settings
        self.spool = spool
        self.on_stored = on_stored
        self.metrics = metrics or Metrics()
        self.audit = audit
        self.allow = AllowList(settings.security.allowed)
        self.servers: list[Any] = []
        self.threads: list[threading.Thread] = []
        self._stopped: list[Any] = []

    def room_for_a_data_set(self) -> bool:
        """Whether the spool can take the largest data set we accept and stay above its
        reserve: what readiness must report, or a ready worker answers C-STORE with A700."""
        s = self.settings
        try:
            return self.spool.free_mb() - s.dicom.max_dataset_mb >= s.spool.reserve_mb
        except OSError:  # the spool's volume is gone: not ready (and /readyz must still answer)
            return False

    def handle_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _check(self, path: Path, uid: str) -> Path:
        """The file to spool, after the checks that need the whole data set.

        Raises:
            Refused: with the status and the reason for the peer.
        """
        d = self.settings.dicom
        limit = d.max_dataset_mb * 2**20
        if self.spool.free_mb() < self.settings.spool.reserve_mb:
            raise Refused(OUT_OF_RESOURCES, "spool below reserve")
        if path.stat().st_size > limit:
            raise Refused(CANNOT_UNDERSTAND, f"data set over {d.max_dataset_mb} MB")
        if not UID(uid).is_valid:
            raise Refused(CANNOT_UNDERSTAND, "Affected SOP Instance UID is not a valid UID")
        received = path
        if read_file_meta_info(path).get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            path = inflate(path, limit)
        try:
            # Header only, large values left on disk: this must not cost what the data set does.
            header = dcmread(path, stop_before_pixels=True, defer_size=1024)
            bad = invalid_uid(header)
        except Exception:
            bad = None  # unreadable: acknowledged, and the processor quarantines it with the reason
        if bad:
            if path != received:
                path.unlink(missing_ok=True)  # our inflated copy; pynetdicom removes its own file
            raise Refused(CANNOT_UNDERSTAND, bad)
        return path

    def handle_store(self, event: evt.Event) -> int | Dataset:
        """Spool one instance; return a named status, never raise."""
        started = time.perf_counter()
        uid = str(getattr(event.request, "AffectedSOPInstanceUID", ""))
        sop_class = str(getattr(event.request, "AffectedSOPClassUID", ""))
        calling = event.assoc.requestor.ae_title
        address = str(event.assoc.requestor.address)
        status, detail, study_uid = SUCCESS, "", ""
        path: Path | None = None
        try:
            path = self._check(event.dataset_path, uid)
            study_uid = study_uid_of(path)  # for the audit record, before it is queued
            self.spool.accept(path)
        except Refused as exc:
            status, detail = exc.status, exc.detail
        except OSError as exc:
            status, detail = OUT_OF_RESOURCES, f"cannot spool: {type(exc).__name__}"
        except Exception as exc:  # the handler must answer, whatever happened
            status, detail = CANNOT_UNDERSTAND, f"cannot understand: {type(exc).__name__}"
        if status != SUCCESS and path is not None and path != event.dataset_path:
            path.unlink(missing_ok=True)  # our inflated copy; pynetdicom removes its own file
        shown = uid if UID(uid).is_valid else "invalid"
        extra = {"sop_instance_uid": shown, "calling_ae": calling, "peer": address}
        if self.audit is not None:
            try:
                outcome = AuditOutcome.SUCCESS if status == SUCCESS else AuditOutcome.SERIOUS_FAILURE
                self.audit.instance_received(sop_class, shown, calling, address, self.settings.dicom.ae_title,
                                             outcome, detail, study_uid=study_uid)
            except OSError:
                logger.exception("audit trail not writable")
        if status != SUCCESS:
            self.metrics.refused.labels(f"0x{status:04X}").inc()
            logger.error("refused instance: %s", detail, extra={**extra, "status": f"0x{status:04X}"})
            answer = Dataset()
            answer.Status = status
            answer.ErrorComment = detail[:64]  # LO: the peer's log shows why
            return answer
        self.metrics.received.inc()
        self.metrics.stage_seconds.labels("receive").observe(time.perf_counter() - started)
        logger.info("received", extra=extra)
        self.on_stored()
        return SUCCESS

    def handle_closed(self, event: evt.Event) -> None:
        """The association ended: remove a data set it left half received, and end an
        acceptor thread still waiting for a request from a peer that has gone."""
        assoc = event.assoc
        partial = getattr(assoc, "_cxr_partial", None)
        if partial is not None and Path(partial).exists():
            Path(partial).unlink(missing_ok=True)
            assoc._cxr_partial = None  # type: ignore[attr-defined]
            self.metrics.partial_removed.inc()
            logger.warning("removed a data set received in part", extra={"peer": str(assoc.requestor.address)})
        if event.event is evt.EVT_CONN_CLOSE and compat.dul_state(assoc) in ("Sta2", "Sta13"):
            compat.end_before_request(assoc)

    def handle_aborted_by_us(self, assoc: Any, reason: str) -> None:
        """An association aborted because it broke a limit (called from its DUL thread)."""
        self._refused("aborted", str(assoc.requestor.address), f"association aborted: {reason}",
                      assoc.requestor.ae_title or "")

    def handle_rejected(self, event: evt.Event) -> None:
        """An association refused by the allow-list (or the association limit)."""
        self._refused("association", str(event.assoc.requestor.address),
                      "A-ASSOCIATE-RJ", event.assoc.requestor.ae_title)

    def _refused(self, kind: str, address: str, detail: str, ae: str = "") -> None:
        if kind == "aborted":
            self.metrics.aborted.inc()
        else:
            self.metrics.rejected.labels(kind).inc()
        logger.warning("association %s: %s", "aborted" if kind == "aborted" else "refused", detail,
                       extra={"reason": kind, "peer": address, "calling_ae": ae})
        if self.audit is not None:
            code = NODE_AUTHENTICATION if kind == "tls" else NETWORK_ENTRY
            try:
                self.audit.security_alert(code, ae, address, detail)
            except OSError:  # called from the accept loop: it must not die of a full disk
                logger.error("audit trail not writable")

    def make_ae(self) -> GuardedAE:
        d = self.settings.dicom
        ae = GuardedAE(ae_title=d.ae_title)
        ae.allow = self.allow
        ae.limits = TransportLimits(
            # A peer must keep P-DATA within the max PDU we announce; an A-ASSOCIATE-RQ is
            # far below 64 KiB. Anything declaring more is refused before it is buffered.
            # With max_pdu 0 (unlimited) one PDU may still not exceed one data set.
            max_pdu_bytes=max(d.max_pdu, 65536) + 6 if d.max_pdu else d.max_dataset_mb * 2**20 + 6,
            pdu_deadline_s=d.pdu_deadline_s,
            association_deadline_s=d.association_deadline_s,
            max_buffer_bytes=d.max_buffer_kb * 1024,
            max_dataset_bytes=d.max_dataset_mb * 2**20,
        )
        ae.on_abort = self.handle_aborted_by_us
        # The precise limits (total and per peer) are applied at accept by GuardedServer;
        # pynetdicom's own count includes finished threads, so it is only a backstop here.
        ae.maximum_associations = 4 * d.max_associations
        ae.maximum_pdu_size = d.max_pdu
        ae.acse_timeout = d.acse_timeout
        ae.dimse_timeout = d.dimse_timeout
        ae.network_timeout = d.network_timeout
        ae.add_supported_context(Verification)
        # Every storage class: instances we do not process (SR, presentation states,
        # laterals) must still be acknowledged or the PACS resends them forever.
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        return ae

    def _serve(self, ae: GuardedAE, port: int, tls: bool) -> None:
        d, sec = self.settings.dicom, self.settings.security
        server = cast(GuardedServer, ae.make_server(
            (d.bind, port),
            ssl_context=server_context(sec) if tls else None,
            evt_handlers=[(evt.EVT_C_ECHO, self.handle_echo), (evt.EVT_C_STORE, self.handle_store),
                          (evt.EVT_REJECTED, self.handle_rejected), (evt.EVT_CONN_CLOSE, self.handle_closed),
                          (evt.EVT_ABORTED, self.handle_closed), (evt.EVT_RELEASED, self.handle_closed)],
            server_class=GuardedServer,
        ))
        server.allow = self.allow
        server.on_refused = lambda kind, address, detail: self._refused(kind, address, detail)
        server.handshake_timeout = d.acse_timeout
        server.max_associations = d.max_associations
        server.max_per_peer = d.max_associations_per_peer
        thread = threading.Thread(target=server.serve_forever, name=f"scp-{port}", daemon=True)
        thread.start()
        self.threads.append(thread)
        compat.register_server(ae, server)
        self.servers.append(server)
        logger.info("listening", extra={"ae_title": d.ae_title, "bind": d.bind, "port": port, "tls": tls})

    def start(self) -> None:
        """Start serving in background threads: plain and/or TLS listeners."""
        # C-STORE data sets stream into the spool, so accept() is a same-disk rename.
        compat.chunk_files_in(self.spool.incoming)
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.LOG_HANDLER_LEVEL = "none"
        sec = self.settings.security
        install_acceptor_guards()
        if not self.allow:
            logger.warning("no allow-list: every calling AE title is accepted ([security] allowed)")
        ae = self.make_ae()
        if not sec.tls_only:
            self._serve(ae, self.settings.dicom.port, tls=False)
        if sec.tls_port is not None or sec.tls_only:
            self._serve(ae, sec.tls_port or self.settings.dicom.port, tls=True)

    def listening(self) -> bool:
        """Whether every listener's accept loop is still running."""
        return bool(self.threads) and all(t.is_alive() for t in self.threads)

    def receiving(self) -> bool:
        """Whether a peer has an association open on a running listener: more may be coming."""
        return any(a.is_established for server in self.servers for a in server.active_associations)

    def busy(self) -> bool:
        """Whether an association is still in progress on any listener."""
        return any(a.is_established for server in self._stopped for a in server.active_associations)

    def stop(self) -> None:
        """Stop accepting; associations in progress finish in their own threads."""
        self._stopped = list(self.servers)
        for server in self.servers:
            server.shutdown()
        self.servers = []
        self.threads = []
