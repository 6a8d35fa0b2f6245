"""Send: HL7 v2 messages over MLLP (optionally inside TLS), for :class:`worker.send.Outbox`.

MLLP frames a message as ``<VT> message <FS><CR>`` (HL7 v2.5.1 Appendix C); the receiver
answers each one with an ACK whose MSA-1 says what it did: AA (accepted), AE (error) or AR
(rejected). Only an AA for our own MSH-10 counts as delivered: an AE or AR is retried with the
outbox's backoff and dead-lettered when ``send.retry_horizon_h`` has passed, like a DICOM
destination's transient failures. The ACK is parsed with hl7apy; no message content is logged.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from worker.config import Hl7Destination
from worker.errors import SendError

START, END = b"\x0b", b"\x1c\r"
#: An ACK is a few hundred bytes; a receiver that sends more without a frame end is broken.
MAX_ACK = 1 << 20


def frame(message: bytes) -> bytes:
    return START + message + END


def control_id_of(message: bytes) -> str:
    """MSH-10 of an ER7 message (the field separator is MSH's fourth character)."""
    first = message.split(b"\r", 1)[0].decode("utf-8", "replace")
    fields = first.split(first[3:4] or "|")
    return fields[9] if len(fields) > 9 else ""


class MllpClient:
    """One HL7 destination: a connection per round, each message sent and acknowledged in turn."""

    def __init__(self, dest: Hl7Destination) -> None:
        self.dest = dest
        self._tls: ssl.SSLContext | None = None
        if dest.tls:
            self._tls = ssl.create_default_context(cafile=str(dest.tls_ca) if dest.tls_ca else None)
            self._tls.minimum_version = ssl.TLSVersion.TLSv1_2  # BCP 195, as for DICOM TLS

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.dest.host, self.dest.port), timeout=self.dest.timeout_s)
        if self._tls is None:
            return sock
        try:
            return self._tls.wrap_socket(sock, server_hostname=self.dest.host)
        except BaseException:
            sock.close()
            raise

    def check(self) -> None:
        """Open and close a connection (TLS handshake included): the destination is up.

        Raises:
            OSError: unreachable, refused, or the TLS handshake failed.
        """
        self._connect().close()

    def store(self, paths: list[Path]) -> list[SendError | None]:
        """Send each file's message and wait for its ACK, over one connection.

        Returns:
            One entry per path: None when acknowledged AA, else the SendError (transient, except
            for a file that cannot be read). After a lost connection the rest are not attempted.
        """
        results: list[SendError | None] = []
        try:
            sock = self._connect()
        except OSError as exc:
            failed: list[SendError | None] = [SendError(f"{self.dest}: no connection ({type(exc).__name__})")]
            return failed + [SendError(f"{self.dest}: not tried", attempted=False)] * (len(paths) - 1)
        with sock:
            lost = False
            for path in paths:
                if lost:
                    results.append(SendError(f"{self.dest}: connection lost before this message", attempted=False))
                    continue
                try:
                    message = path.read_bytes()
                except OSError as exc:
                    results.append(SendError(f"{self.dest}: unreadable message file ({type(exc).__name__})",
                                             permanent=True))
                    continue
                try:
                    sock.sendall(frame(message))
                    ack = self._read_frame(sock)
                except (OSError, SendError) as exc:
                    lost = True
                    results.append(exc if isinstance(exc, SendError)
                                   else SendError(f"{self.dest}: connection failed ({type(exc).__name__})"))
                    continue
                results.append(self._judge(ack, control_id_of(message)))
        return results

    def _read_frame(self, sock: socket.socket) -> bytes:
        buffer = b""
        while END not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                raise SendError(f"{self.dest}: connection closed before the ACK")
            buffer += chunk
            if len(buffer) > MAX_ACK:
                raise SendError(f"{self.dest}: ACK longer than {MAX_ACK} bytes without a frame end")
        start = buffer.find(START)
        return buffer[start + 1 if start >= 0 else 0 : buffer.index(END)]

    def _judge(self, ack: bytes, control_id: str) -> SendError | None:
        """None for an AA to ``control_id`` (or a CA: a receiver in enhanced mode has committed it
        to safe storage, and a resend would only duplicate it); otherwise why not (all retried)."""
        try:
            parsed = parse_message(ack.decode("utf-8", "replace").replace("\n", "\r").strip("\r"),
                                   validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
            code, about = str(parsed.msa.msa_1.value), str(parsed.msa.msa_2.value)
        except Exception as exc:  # hl7apy raises many types on a malformed ACK
            return SendError(f"{self.dest}: unreadable ACK ({type(exc).__name__})")
        if about != control_id:
            return SendError(f"{self.dest}: ACK for another message (MSA-2 does not match MSH-10)")
        if code in ("AA", "CA"):
            return None
        return SendError(f"{self.dest}: acknowledged {code or 'without MSA-1'}")
