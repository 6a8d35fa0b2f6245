"""Nagle's algorithm is off on the worker's DICOM sockets, as requestor and as acceptor
(``worker.compat.no_delay``; why: its docstring). Real pynetdicom associations on loopback."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.helpers import free_port, phantom_file
from worker import compat
from worker.config import SendSection, parse_destination
from worker.send import store


def _option(assoc: Any) -> int:
    return int(compat.raw_socket(assoc).getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


@pytest.mark.parametrize("tuned", [True, False])
def test_no_delay_on_both_ends_of_an_association(tuned: bool) -> None:
    seen: list[int] = []

    def on_echo(event: Any) -> int:
        seen.append(_option(event.assoc))
        return 0x0000

    handlers: list[Any] = [(evt.EVT_CONN_OPEN, compat.no_delay)] if tuned else []
    scp = AE("SCP")
    scp.add_supported_context(Verification)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[*handlers, (evt.EVT_C_ECHO, on_echo)])
    try:
        scu = AE("SCU")
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", port, ae_title="SCP", evt_handlers=handlers)
        assert assoc.is_established
        requestor = _option(assoc)
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        server.shutdown()
    assert (requestor, seen) == ((1, [1]) if tuned else (0, [0]))


def test_the_sender_switches_nagle_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``worker.send.store`` registers the handler (its effect on its socket, seen as it opens)."""
    opened: list[int] = []
    original = compat.no_delay

    def watched(event: Any) -> None:
        original(event)
        opened.append(_option(event.assoc))

    monkeypatch.setattr(compat, "no_delay", watched)
    ds = phantom_file(tmp_path / "x.dcm", True, 1)
    scp = AE("PACS")
    scp.add_supported_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    try:
        assert store(parse_destination(f"PACS@127.0.0.1:{port}"), [tmp_path / "x.dcm"], SendSection(), "CXR") == [None]
    finally:
        server.shutdown()
    assert opened == [1]
