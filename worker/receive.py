"""Receive: C-ECHO and C-STORE SCP that writes each instance durably into the spool.

The C-STORE handler only writes and returns a status; it never raises and never
opens an association. The success status goes back only after the instance has been
fsynced and renamed into ``queue/``.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from typing import Any

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
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from worker.config import Settings
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

    def __init__(self, settings: Settings, spool: Spool, on_stored: Callable[[], None]) -> None:
        self.settings = settings
        self.spool = spool
        self.on_stored = on_stored
        self.server: Any = None

    def handle_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def handle_store(self, event: evt.Event) -> int:
        """Spool one instance; return a named status, never raise."""
        uid = str(getattr(event.request, "AffectedSOPInstanceUID", ""))
        calling = event.assoc.requestor.ae_title
        try:
            if self.spool.free_mb() < self.settings.spool.reserve_mb:
                logger.error("spool below reserve: refusing instance", extra={
                    "sop_instance_uid": uid, "calling_ae": calling, "status": "out of resources"})
                return OUT_OF_RESOURCES
            self.spool.accept(event.dataset_path)
        except OSError as exc:
            logger.error("cannot spool instance: %s", type(exc).__name__,
                         extra={"sop_instance_uid": uid, "calling_ae": calling})
            return OUT_OF_RESOURCES
        except Exception as exc:  # the handler must answer, whatever happened
            logger.error("cannot understand instance: %s", type(exc).__name__,
                         extra={"sop_instance_uid": uid, "calling_ae": calling})
            return CANNOT_UNDERSTAND
        logger.info("received", extra={"sop_instance_uid": uid, "calling_ae": calling})
        self.on_stored()
        return SUCCESS

    def make_ae(self) -> AE:
        d = self.settings.dicom
        ae = AE(ae_title=d.ae_title)
        ae.maximum_associations = d.max_associations
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

    def start(self) -> None:
        """Start serving in background threads."""
        # pynetdicom writes chunked datasets with NamedTemporaryFile in the default
        # temp dir: put that inside the spool so accept() is a same-disk rename.
        tempfile.tempdir = str(self.spool.incoming)
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.LOG_HANDLER_LEVEL = "none"
        d = self.settings.dicom
        self.server = self.make_ae().start_server(
            (d.bind, d.port),
            block=False,
            evt_handlers=[(evt.EVT_C_ECHO, self.handle_echo), (evt.EVT_C_STORE, self.handle_store)],
        )
        logger.info("listening", extra={"ae_title": d.ae_title, "bind": d.bind, "port": d.port})

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
