"""The one place that touches private parts of pynetdicom.

pynetdicom has no public hooks for what a hardened acceptor needs: a bound on what
one PDU read may hold, a bound on the DIMSE message it is assembling, and a way to
end an association thread whose peer has gone before asking for anything. Each use
below says which private name it touches and why; pyproject.toml pins pynetdicom with
``~=`` so that an upgrade that moves one of them is a deliberate change, caught by the
tests in tests/integration/test_hardening.py.

pydicom and pylibjpeg are used through public functions only (``openjpeg.get_parameters``,
``libjpeg.get_parameters``, ``pydicom.encaps.generate_frames``).
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pynetdicom import dimse_messages
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.transport import AssociationSocket

RecvGuard = Callable[[Any, Any, int, Callable[[int], bytearray]], bytearray]
ReceiveGuard = Callable[[Any, Any, Callable[[Any], None]], None]  # (dimse, primitive, original)

_original_recv: Callable[..., bytearray] | None = None
_original_receive: Callable[..., None] | None = None


def install_acceptor_guards(recv_guard: RecvGuard, receive_guard: ReceiveGuard) -> None:
    """Route every socket read and every P-DATA primitive of an association through a guard.

    Private: ``AssociationSocket.recv`` (reads one PDU; pynetdicom buffers whatever
    length the peer declares) and ``DIMSEServiceProvider.receive_primitive`` (appends
    P-DATA fragments to the message being assembled, in memory unless it is a C-STORE
    data set). Patched on the classes, once per process; each guard is called with the
    association and decides for itself (acceptors of a GuardedAE only).
    """
    global _original_recv, _original_receive
    if _original_recv is not None:
        return
    _original_recv = original_recv = AssociationSocket.recv
    _original_receive = original_receive = DIMSEServiceProvider.receive_primitive

    def recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
        return recv_guard(self, getattr(self, "_assoc", None), nr_bytes,
                          functools.partial(original_recv, self))

    def receive_primitive(self: DIMSEServiceProvider, primitive: Any) -> None:
        receive_guard(self, primitive, functools.partial(original_receive, self))

    AssociationSocket.recv = recv  # type: ignore[method-assign]
    DIMSEServiceProvider.receive_primitive = receive_primitive  # type: ignore[assignment,method-assign]


_original_serve: Callable[..., None] | None = None


def keep_responses_for_the_sender() -> None:
    """Give a DIMSE response that pynetdicom's association reactor took back to the sender
    waiting for it (once per process).

    pynetdicom's ``send_c_store`` pauses the association's reactor before sending and takes
    the response off the DIMSE queue itself. The pause is a flag the reactor sets just
    before it blocks, so a sender can see it set while the reactor has passed the block and
    is about to poll the queue: a response that arrives within that window (about a
    millisecond: a PACS that answers at once, Nagle off) is taken by the reactor, which
    drops it as an "unexpected service message", and the sender waits out its DIMSE
    timeout, aborts and resends an object the PACS has stored (4 in 1,800 associations under
    load without this, none with it: ``benchmarks/bench_send_race.py``).

    Private: ``Association._serve_request`` (where the reactor hands what it polled) and
    ``_reactor_checkpoint`` (cleared while a sender waits for its response).
    """
    global _original_serve
    if _original_serve is not None:
        return
    from pynetdicom.association import Association

    _original_serve = original = Association._serve_request

    def serve(self: Association, msg: Any, context_id: int) -> None:
        if (self.is_requestor and not self._reactor_checkpoint.is_set()
                and not msg.is_valid_request and msg.is_valid_response):
            self.dimse.msg_queue.put((context_id, msg))
            return
        original(self, msg, context_id)

    Association._serve_request = serve  # type: ignore[method-assign]


def chunk_files_in(folder: Path) -> None:
    """Write pynetdicom's streamed C-STORE data sets into ``folder``.

    Private: ``dimse_messages.NamedTemporaryFile`` (pynetdicom creates the file in the
    default temp dir). Rebinding that one name keeps the spool's rename on one disk
    without changing ``tempfile.tempdir`` for the whole process.
    """
    dimse_messages.NamedTemporaryFile = functools.partial(  # type: ignore[attr-defined,assignment]
        tempfile.NamedTemporaryFile, dir=str(folder))


@dataclass(frozen=True)
class Pending:
    """What the DIMSE provider holds for the message being assembled."""

    command_bytes: int
    memory_bytes: int  # data set bytes held in memory (anything but a streamed C-STORE)
    file: Path | None  # the streamed C-STORE data set, when one is open
    file_bytes: int


def pending(dimse: Any) -> Pending:
    """Private: ``DIMSEMessage.encoded_command_set``, ``data_set`` (BytesIO buffers) and
    ``_data_set_file`` / ``_data_set_path`` (the open temp file of a C-STORE)."""
    message = getattr(dimse, "message", None)
    if message is None:
        return Pending(0, 0, None, 0)
    command = message.encoded_command_set
    data = message.data_set
    handle = getattr(message, "_data_set_file", None)
    path = getattr(message, "_data_set_path", None)
    return Pending(
        command_bytes=command.tell() if isinstance(command, BytesIO) else 0,
        memory_bytes=data.tell() if isinstance(data, BytesIO) else 0,
        file=Path(path) if isinstance(path, str | Path) else None,
        file_bytes=handle.tell() if handle is not None and not handle.closed else 0,
    )


def drop_pending(dimse: Any) -> None:
    """Forget the message being assembled (its buffers are freed now, not at thread end).
    Private: ``DIMSEServiceProvider.message``."""
    dimse.message = None


def abort_as_invalid(assoc: Any) -> None:
    """Abort the association as pynetdicom does for an invalid DIMSE message: Evt19,
    so its state machine sends A-ABORT, tells the association thread and starts ARTIM.
    Private: ``dul.event_queue`` (the state machine's input)."""
    assoc.dul.event_queue.put("Evt19")


def end_before_request(assoc: Any) -> bool:
    """End an acceptor thread that waits for an A-ASSOCIATE-RQ that can no longer come.

    Private: ``dul.to_user_queue`` and ``requestor.primitive``. pynetdicom's acceptor
    waits ``acse_timeout`` for the request even when the transport has closed; a None
    on that queue is what its own timeout produces, so the thread ends the same way,
    now. Returns whether it did.
    """
    dul = getattr(assoc, "dul", None)
    if dul is None or assoc.requestor.primitive is not None or assoc.is_established:
        return False
    with dul.to_user_queue.mutex:
        if dul.to_user_queue.queue:
            return False  # a request or an abort is already there: the thread wakes anyway
    dul.to_user_queue.put(None)
    return True


def dul_state(assoc: Any) -> str:
    """The upper-layer state (PS3.8 9.2), e.g. "Sta2" before a request. Private: ``dul.state_machine``."""
    return str(getattr(getattr(getattr(assoc, "dul", None), "state_machine", None), "current_state", ""))


def raw_socket(assoc: Any) -> Any:
    """The association's socket object, or None. Private: ``dul.socket.socket``."""
    return getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)


def register_server(ae: Any, server: Any) -> None:
    """Make the AE count a server made with ``make_server`` (its associations, its shutdown).

    Private: ``AE._servers``; ``start_server`` appends there itself, but it cannot take
    our server class and TLS hand-off together with a thread we own.
    """
    ae._servers.append(server)
