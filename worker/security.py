"""Access control and DICOM TLS for the receiving side.

* An allow-list of calling AE titles, each optionally tied to an IP network. A peer
  whose address no entry covers is disconnected before any PDU is read; a listed AE
  title calling from an address its entry does not cover is rejected with
  A-ASSOCIATE-RJ "calling AE title not recognized" (PS3.8 9.3.4), before any data set.
* TLS per BCP 195 (TLS 1.2 or newer), optionally requiring a client certificate from
  the configured CA. The handshake runs in the association's own thread, so a slow or
  failing handshake never blocks the accept loop, and a failure is audited.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer

from worker import compat
from worker.config import SecuritySection

logger = logging.getLogger(__name__)

#: An AE title no peer can send (backslash is not allowed in AE values, PS3.5 6.2).
_NOBODY = "\\"


@dataclass(frozen=True)
class AllowEntry:
    ae_title: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None


class AllowList:
    """Calling AE titles, each optionally limited to a network; empty allows everyone."""

    def __init__(self, entries: list[str]) -> None:
        self.entries = []
        for entry in entries:
            ae, sep, net = entry.partition("@")
            self.entries.append(AllowEntry(ae.strip(), ipaddress.ip_network(net, strict=False) if sep else None))

    def __bool__(self) -> bool:
        return bool(self.entries)

    def _covers(self, entry: AllowEntry, address: str) -> bool:
        if entry.network is None:
            return True
        try:
            return ipaddress.ip_address(address) in entry.network
        except ValueError:
            return False

    def address_allowed(self, address: str) -> bool:
        return not self.entries or any(self._covers(e, address) for e in self.entries)

    def titles_for(self, address: str) -> list[str]:
        return [e.ae_title for e in self.entries if self._covers(e, address)]


def server_context(cfg: SecuritySection) -> ssl.SSLContext:
    """The TLS server context: TLS 1.2+, our certificate, optional client verification."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
    if cfg.tls_ca is not None:
        ctx.load_verify_locations(str(cfg.tls_ca))
    ctx.verify_mode = ssl.CERT_REQUIRED if cfg.tls_require_client_cert else ssl.CERT_OPTIONAL if cfg.tls_ca \
        else ssl.CERT_NONE
    return ctx


def client_context(cfg: SecuritySection) -> ssl.SSLContext:
    """The TLS client context for outgoing C-STORE: verify the PACS against ``tls_ca``."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cfg.tls_ca) if cfg.tls_ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # DICOM nodes are named by AE title and IP, rarely by DNS name
    if cfg.tls_cert and cfg.tls_key:
        ctx.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
    return ctx


class GuardedAE(AE):
    """An AE whose calling-AE check depends on the peer address of the association
    being negotiated (pynetdicom negotiates inside the Association's own thread)."""

    allow: AllowList = AllowList([])
    limits: TransportLimits | None = None
    on_abort: Callable[[Any, str], None] = staticmethod(lambda assoc, reason: None)

    @property  # type: ignore[override]
    def require_calling_aet(self) -> list[str]:
        assoc = threading.current_thread()
        if not self.allow or not isinstance(assoc, Association):
            return []
        return self.allow.titles_for(str(assoc.requestor.address)) or [_NOBODY]

    @require_calling_aet.setter
    def require_calling_aet(self, value: list[str]) -> None:
        return  # the allow-list is the only source


class GuardedServer(ThreadedAssociationServer):
    """Refuses unlisted addresses at accept and performs the TLS handshake per thread."""

    on_refused: Callable[[str, str, str], None] = staticmethod(lambda kind, address, detail: None)
    allow: AllowList = AllowList([])
    handshake_timeout: float = 10.0
    # The service's own stop() waits for established associations (with a grace period);
    # socketserver must not also block on every request thread, idle ones included.
    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._lock = threading.Lock()
        self._handshaking: dict[str, int] = {}
        super().__init__(*args, **kwargs)
    max_associations: int = 10
    max_per_peer: int = 4

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Refuse at accept, before any PDU: unlisted addresses, and peers over the limits."""
        address = str(client_address[0])
        if not self.allow.address_allowed(address):
            self.on_refused("address", address, "no allow-list entry covers this address")
            return False
        # pynetdicom's threads outlive their associations (after an invalid PDU it waits
        # for ARTIM even when the peer has gone): count only those with a live transport.
        active = [a for a in self.active_associations
                  if a.is_alive() and not (a.is_released or a.is_aborted or a.is_rejected) and _connected(a)]
        if len(active) >= self.max_associations:
            self.on_refused("limit", address, f"{len(active)} associations open (limit {self.max_associations})")
            return False
        # Connections still in their TLS handshake are not associations yet: count them too.
        with self._lock:
            handshaking = self._handshaking.get(address, 0)
        mine = sum(str(a.requestor.address) == address for a in active) + handshaking
        if mine >= self.max_per_peer:
            self.on_refused("limit", address, f"{mine} associations open from this peer (limit {self.max_per_peer})")
            return False
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            address = str(client_address[0])
            with self._lock:
                self._handshaking[address] = self._handshaking.get(address, 0) + 1
            try:
                request.settimeout(self.handshake_timeout)
                request.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                try:
                    self.on_refused("tls", address, f"TLS handshake failed: {type(exc).__name__}: "
                                    f"{getattr(exc, 'reason', None) or exc}")
                finally:
                    self.shutdown_request(request)
                return
            finally:
                with self._lock:
                    # Drop the entry at zero: every address that ever connected would stay otherwise.
                    left = self._handshaking.pop(address) - 1
                    if left:
                        self._handshaking[address] = left
        super().process_request_thread(request, client_address)


@dataclass(frozen=True)
class TransportLimits:
    """Limits on what one peer can make the acceptor hold.

    pynetdicom applies its network timeout to each recv() and buffers whatever PDU
    length the peer declares, and it assembles every DIMSE message in memory except a
    C-STORE data set: a peer declaring a huge PDU, trickling one byte a second, or
    sending fragments that never complete a message would hold memory or a slot
    without end. These limits bound that.
    """

    max_pdu_bytes: int  # 0: no cap
    pdu_deadline_s: float
    association_deadline_s: float
    max_buffer_bytes: int = 1 << 20  # command set, and any data set that is not streamed to disk
    max_dataset_bytes: int = 512 << 20  # a streamed C-STORE data set; beyond it, the rest is not written


def _limits_of(assoc: Any) -> TransportLimits | None:
    """The limits of an acceptor of a GuardedAE; None leaves pynetdicom as it is (our SCU side)."""
    if assoc is None or not getattr(assoc, "is_acceptor", False) or not isinstance(assoc.ae, GuardedAE):
        return None
    return assoc.ae.limits


def _guarded_recv(sock: Any, assoc: Any, nr_bytes: int, original: Callable[[int], bytearray]) -> bytearray:
    """AssociationSocket.recv with a PDU size cap and absolute deadlines (acceptor side)."""
    limits = _limits_of(assoc)
    if limits is None:
        return original(nr_bytes)
    raw = sock.socket
    if raw is None:
        return bytearray()
    if getattr(assoc, "_cxr_abort", "") and compat.dul_state(assoc) == "Sta13":
        # Our A-ABORT has gone out: whatever else the peer sends is not read, the connection ends now.
        _cut(raw)
        raise OSError(f"association aborted: {assoc._cxr_abort}")
    now = time.monotonic()
    opened = getattr(sock, "_cxr_opened", None)
    if opened is None:
        opened = sock._cxr_opened = now
    if limits.max_pdu_bytes and nr_bytes > limits.max_pdu_bytes:
        _cut(raw)
        raise OSError(f"declared PDU length {nr_bytes} exceeds the cap of {limits.max_pdu_bytes} bytes")
    deadline = min(now + limits.pdu_deadline_s, opened + limits.association_deadline_s)
    data = bytearray()
    while len(data) < nr_bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _cut(raw)
            raise TimeoutError("PDU or association deadline passed")
        raw.settimeout(min(remaining, assoc.network_timeout or remaining))
        chunk = raw.recv(min(65536, nr_bytes - len(data)))
        if not chunk:
            break
        data.extend(chunk)
    return data


def _guarded_receive(dimse: Any, primitive: Any, original: Callable[[Any], None]) -> None:
    """DIMSEServiceProvider.receive_primitive within the limits (acceptor side).

    * command fragments, and data fragments that pynetdicom would hold in memory (any
      data set but a C-STORE's, or data before its command), beyond ``max_buffer_bytes``:
      the association is aborted (A-ABORT), audited and counted;
    * a C-STORE data set beyond ``max_dataset_bytes``: the rest of it is read but not
      written, and the C-STORE handler answers it with a failure status.
    """
    assoc = dimse.assoc
    limits = _limits_of(assoc)
    if limits is None:
        return original(primitive)
    if getattr(assoc, "_cxr_abort", ""):
        return None  # aborting: nothing more is assembled
    held = compat.pending(dimse)
    items = list(primitive.presentation_data_value_list)
    command = sum(len(d) - 1 for _, d in items if d and d[0] & 1)
    data = sum(len(d) - 1 for _, d in items if d and not d[0] & 1)
    reason = ""
    if held.command_bytes + command > limits.max_buffer_bytes:
        reason = f"command set over {limits.max_buffer_bytes} bytes without its last fragment"
    elif held.file is None and held.memory_bytes + data > limits.max_buffer_bytes:
        reason = (f"{held.memory_bytes + data} bytes of a data set that is not a C-STORE's "
                  f"(limit {limits.max_buffer_bytes})")
    if reason:
        assoc._cxr_abort = reason
        compat.drop_pending(dimse)
        if held.file is not None:
            held.file.unlink(missing_ok=True)
        compat.abort_as_invalid(assoc)
        assoc.ae.on_abort(assoc, reason)
        return None
    if held.file is not None and held.file_bytes > limits.max_dataset_bytes:
        # Keep each fragment's control byte, so the message still ends where the peer ends it.
        primitive.presentation_data_value_list = [[cx, d[:1] if d and not d[0] & 1 else d] for cx, d in items]
    original(primitive)
    assoc._cxr_partial = compat.pending(dimse).file  # None once the message is complete
    return None


def _connected(assoc: Any) -> bool:
    """Whether the peer of an association still holds its connection; if it has gone,
    shut our side down so the association ends now rather than at its timeout."""
    raw = compat.raw_socket(assoc)
    if raw is None or raw.fileno() < 0:
        return False
    if isinstance(raw, ssl.SSLSocket):
        return True  # no MSG_PEEK through TLS; its deadlines still apply
    try:
        readable, _, _ = select.select([raw], [], [], 0)
        if readable and not raw.recv(1, socket.MSG_PEEK):
            _cut(raw)
            return False
    except (OSError, ValueError, ssl.SSLError):
        return False
    return True


def _cut(sock: socket.socket) -> None:
    """Close the connection now: pynetdicom's state machine does not close the socket
    on a transport error before an association is established (AA-5 only stops ARTIM)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def install_acceptor_guards() -> None:
    """Route pynetdicom's reads and DIMSE assembly through the guards above (once)."""
    compat.install_acceptor_guards(_guarded_recv, _guarded_receive)
