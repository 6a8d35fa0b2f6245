"""A minimal receiving SCP for the demo when Orthanc is not installed: stores every
instance it receives as ``<folder>/<uuid>.dcm``."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from worker.status import SUCCESS


def main(folder: str, port: str) -> None:
    out = Path(folder)

    def on_store(event: evt.Event) -> int:
        event.dataset.file_meta = event.file_meta
        event.dataset.save_as(out / f"{uuid.uuid4().hex}.dcm", enforce_file_format=True)
        return SUCCESS

    ae = AE(ae_title="DEMO-PACS")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    ae.start_server(("127.0.0.1", int(port)), evt_handlers=[(evt.EVT_C_STORE, on_store)])


if __name__ == "__main__":
    main(*sys.argv[1:3])
