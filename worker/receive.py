"""Receive: C-ECHO and C-STORE SCP that writes each instance durably into the spool.

The C-STORE handler only writes and returns a status; it never raises and never
opens an association. The success status goes back only after the instance has been
fsynced and renamed into ``queue/``.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from pydicom.uid import (
    JPEG2000,
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

from worker.audit import NETWORK_ENTRY, NODE_AUTHENTICATION, AuditTrail, study_uid_of
from worker.config import Settings
from worker.metrics import Metrics
from worker.security import (
    AllowList,
    GuardedAE,
    GuardedServer,
    TransportLimits,
    install_transport_limits,
    server_context,
)
from worker.spool import Spool

logger = logging.getLogger(__name__)

# DIMSE statuses (PS3.4 Annex B.2.3, PS3.7 C.4.2), named once.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000

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

    def handle_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def handle_store(self, event: evt.Event) -> int:
        """Spool one instance; return a named status, never raise."""
        started = time.perf_counter()
        uid = str(getattr(event.request, "AffectedSOPInstanceUID", ""))
        sop_class = str(getattr(event.request, "AffectedSOPClassUID", ""))
        calling = event.assoc.requestor.ae_title
        address = str(event.assoc.requestor.address)
        status, detail, study_uid = SUCCESS, "", ""
        try:
            if self.spool.free_mb() < self.settings.spool.reserve_mb:
                status, detail = OUT_OF_RESOURCES, "spool below reserve"
            elif event.dataset_path.stat().st_size > self.settings.dicom.max_dataset_mb * 2**20:
                status, detail = CANNOT_UNDERSTAND, f"data set over {self.settings.dicom.max_dataset_mb} MB"
            else:
                study_uid = study_uid_of(event.dataset_path)  # for the audit record, before it is queued
                self.spool.accept(event.dataset_path)
        except OSError as exc:
            status, detail = OUT_OF_RESOURCES, f"cannot spool: {type(exc).__name__}"
        except Exception as exc:  # the handler must answer, whatever happened
            status, detail = CANNOT_UNDERSTAND, f"cannot understand: {type(exc).__name__}"
        extra = {"sop_instance_uid": uid, "calling_ae": calling, "peer": address}
        if self.audit is not None:
            try:
                self.audit.instance_received(sop_class, uid, calling, address, self.settings.dicom.ae_title,
                                             0 if status == SUCCESS else 8, detail, study_uid=study_uid)
            except OSError:
                logger.exception("audit trail not writable")
        if status != SUCCESS:
            self.metrics.refused.labels(f"0x{status:04X}").inc()
            logger.error("refused instance: %s", detail, extra={**extra, "status": f"0x{status:04X}"})
            return status
        self.metrics.received.inc()
        self.metrics.stage_seconds.labels("receive").observe(time.perf_counter() - started)
        logger.info("received", extra=extra)
        self.on_stored()
        return SUCCESS

    def handle_rejected(self, event: evt.Event) -> None:
        """An association refused by the allow-list (or the association limit)."""
        self._refused("association", str(event.assoc.requestor.address),
                      "A-ASSOCIATE-RJ", event.assoc.requestor.ae_title)

    def _refused(self, kind: str, address: str, detail: str, ae: str = "") -> None:
        self.metrics.rejected.labels(kind).inc()
        logger.warning("association refused: %s", detail, extra={"reason": kind, "peer": address, "calling_ae": ae})
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
                          (evt.EVT_REJECTED, self.handle_rejected)],
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
        ae._servers.append(server)
        self.servers.append(server)
        logger.info("listening", extra={"ae_title": d.ae_title, "bind": d.bind, "port": port, "tls": tls})

    def start(self) -> None:
        """Start serving in background threads: plain and/or TLS listeners."""
        # pynetdicom writes chunked datasets with NamedTemporaryFile in the default
        # temp dir: put that inside the spool so accept() is a same-disk rename.
        tempfile.tempdir = str(self.spool.incoming)
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.LOG_HANDLER_LEVEL = "none"
        sec, d = self.settings.security, self.settings.dicom
        install_transport_limits(TransportLimits(
            # A peer must keep P-DATA within the max PDU we announce; an A-ASSOCIATE-RQ is
            # far below 64 KiB. Anything declaring more is refused before it is buffered.
            max_pdu_bytes=max(d.max_pdu, 65536) + 6 if d.max_pdu else 0,
            pdu_deadline_s=d.pdu_deadline_s,
            association_deadline_s=d.association_deadline_s,
        ))
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
