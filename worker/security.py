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
                    self._handshaking[address] -= 1
        super().process_request_thread(request, client_address)


@dataclass(frozen=True)
class TransportLimits:
    """Limits on what one peer can make the acceptor hold.

    pynetdicom applies its network timeout to each recv() and buffers whatever PDU
    length the peer declares, so a peer declaring a huge PDU and trickling one byte a
    second holds an association slot indefinitely. These limits bound that.
    """

    max_pdu_bytes: int  # 0: no cap
    pdu_deadline_s: float
    association_deadline_s: float


_limits: TransportLimits | None = None
_original_recv: Callable[..., bytearray] | None = None


def _guarded_recv(self: Any, nr_bytes: int) -> bytearray:
    """AssociationSocket.recv with a PDU size cap and absolute deadlines (acceptor side)."""
    assert _original_recv is not None
    limits = _limits
    assoc = getattr(self, "_assoc", None)
    if limits is None or assoc is None or not assoc.is_acceptor:
        return _original_recv(self, nr_bytes)
    now = time.monotonic()
    opened = getattr(self, "_cxr_opened", None)
    if opened is None:
        opened = self._cxr_opened = now
    sock = self.socket
    if sock is None:
        return bytearray()
    if limits.max_pdu_bytes and nr_bytes > limits.max_pdu_bytes:
        _cut(sock)
        raise OSError(f"declared PDU length {nr_bytes} exceeds the cap of {limits.max_pdu_bytes} bytes")
    deadline = min(now + limits.pdu_deadline_s, opened + limits.association_deadline_s)
    data = bytearray()
    while len(data) < nr_bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _cut(sock)
            raise TimeoutError("PDU or association deadline passed")
        sock.settimeout(min(remaining, assoc.network_timeout or remaining))
        chunk = sock.recv(min(65536, nr_bytes - len(data)))
        if not chunk:
            break
        data.extend(chunk)
    return data


def _connected(assoc: Any) -> bool:
    """Whether the peer of an association still holds its connection; if it has gone,
    shut our side down so the association ends now rather than at its timeout."""
    raw = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
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


def install_transport_limits(limits: TransportLimits) -> None:
    """Install the limits on pynetdicom's acceptor sockets (process-wide, once)."""
    global _limits, _original_recv
    from pynetdicom.transport import AssociationSocket

    _limits = limits
    if _original_recv is None:
        _original_recv = AssociationSocket.recv
        AssociationSocket.recv = _guarded_recv  # type: ignore[method-assign]
