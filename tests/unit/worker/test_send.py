"""The sender's half of pynetdicom: a response its association reactor polls while the sender
waits goes back to the sender (pynetdicom drops it, and the sender waits out its DIMSE
timeout and resends what the PACS stored), and Nagle's algorithm is off on its sockets."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_ECHO, C_STORE

from worker import compat, send


def _association(mode: str) -> Association:
    compat.keep_responses_for_the_sender()
    return Association(AE(ae_title="CXR"), mode)


def _store_response() -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 1
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    rsp.AffectedSOPInstanceUID = generate_uid()
    rsp.Status = 0x0000
    return rsp


def test_a_response_the_reactor_polls_while_the_sender_waits_goes_back_to_the_sender() -> None:
    assoc = _association("requestor")
    assoc._reactor_checkpoint.clear()  # what send_c_store does before sending, until its response
    rsp = _store_response()
    assoc._serve_request(rsp, 3)  # what the reactor does with what it polled in the race's window
    assert assoc.dimse.msg_queue.get_nowait() == (3, rsp)


def test_otherwise_the_reactor_handles_what_it_polls_as_pynetdicom_does(caplog: pytest.LogCaptureFixture) -> None:
    assoc = _association("requestor")
    assoc._serve_request(_store_response(), 3)  # nobody waiting (reactor running): dropped, with pynetdicom's warning
    assert assoc.dimse.msg_queue.empty()
    assert "Received unexpected C-STORE service message" in caplog.text
    waiting = _association("requestor")
    waiting._reactor_checkpoint.clear()
    request = C_ECHO()
    request.MessageID = 7
    request.AffectedSOPClassUID = "1.2.840.10008.1.1"
    waiting._serve_request(request, 1)  # a request is the reactor's to serve, never the sender's
    assert waiting.dimse.msg_queue.empty()
    acceptor = _association("acceptor")
    acceptor._reactor_checkpoint.clear()
    acceptor._serve_request(_store_response(), 1)
    assert acceptor.dimse.msg_queue.empty()


def test_the_senders_connections_have_nagle_off() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        send.no_delay(SimpleNamespace(assoc=SimpleNamespace(dul=SimpleNamespace(socket=SimpleNamespace(socket=sock)))))
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
