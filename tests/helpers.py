"""Shared test helpers: real tools and peers, synthetic datasets, waits on conditions.

Test modules import helpers from here only, never from each other; fixtures live in conftest.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hl7
import hl7.mllp
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
)
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from trainer.dicom_phantoms import cr_dataset
from trainer.phantoms import make_phantom

IN_CI = os.environ.get("CI", "").lower() == "true"


def require_tool(path: str) -> str:
    """The tool's path; skip when missing on a developer machine, fail in CI."""
    found = path if Path(path).exists() else shutil.which(Path(path).name)
    if found:
        return found
    message = f"{path} is not installed (apt-get install dcmtk orthanc dicom3tools)"
    if IN_CI:
        pytest.fail(message + "; CI must install it")
    pytest.skip(message)


def dciodvfy_errors(path: Path) -> list[str]:
    """Lines of dciodvfy's report that are errors (its exit code is not reliable)."""
    tool = require_tool("/usr/bin/dciodvfy")
    out = subprocess.run([tool, "-new", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def make_pki(d: Path) -> Path:
    """In ``d``: a CA (``ca``), a server certificate for 127.0.0.1 (``server``) and a client
    certificate (``client``) signed by it, and a rogue CA (``rogue-ca``) with its own client
    (``rogue``); each as ``NAME.crt`` and ``NAME.key``. Returns ``d``."""
    openssl = require_tool("/usr/bin/openssl")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True, timeout=60)

    for ca in ("ca", "rogue-ca"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
            "-subj", f"/CN={ca}", "-days", "2")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, ca in (("server", "ca"), ("client", "ca"), ("rogue", "rogue-ca")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        san = ("-extfile", "san.ext") if name == "server" else ()
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", *san)
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def connections_to(port: int) -> int:
    """TCP connections established to local ``port`` (Linux ``/proc/net/tcp``): shows that a
    peer's association is open without a timed guess."""
    count = 0
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            count += state == "01" and int(local.rsplit(":", 1)[1], 16) == port  # 01: ESTABLISHED
    return count


def wait_port(port: int, timeout: float = 30.0) -> None:
    def is_open() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(is_open, timeout, f"port {port}")


@dataclass
class Storescp:
    """DCMTK storescp standing in for the PACS: every received object is a file."""

    port: int
    out: Path
    ae_title: str = "PACS"
    proc: subprocess.Popen[bytes] | None = None

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())

    def start(self) -> None:
        tool = require_tool("/usr/bin/storescp")
        self.out.mkdir(parents=True, exist_ok=True)
        # -uf: unique file names, so a duplicate delivery shows up as a second file.
        self.proc = subprocess.Popen([tool, "-aet", self.ae_title, "-od", str(self.out), "-uf", "+xa",
                                      str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


CANARY_NAME = "Canary^Zebedee"
CANARY_ID = "CANARY-7731"
CANARY_BIRTH = "19010203"


def storescu(port: int, files: list[Path], check: bool = True, *options: str) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu as the hospital's sender; options pick the proposed syntaxes."""
    tool = require_tool("/usr/bin/storescu")
    cmd = [tool, *options, "-aet", "HOSPITAL", "-aec", "CXR-GRADCAM", "127.0.0.1", str(port), *map(str, files)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def read_all(files: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in files]


def walk(items: Any) -> list[Dataset]:
    out = []
    for item in items:
        out.append(item)
        if "ContentSequence" in item:
            out += walk(item.ContentSequence)
    return out


def sr_finding(sr: Dataset) -> tuple[str, float]:
    """(Present/Absent/Not Evaluated, probability or NaN) read back from the SR's content tree."""
    presence, probability = "", float("nan")
    for item in walk(sr.ContentSequence):
        name = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else ""
        if name == "233604007" and item.ValueType == "CODE":
            presence = item.ConceptCodeSequence[0].CodeMeaning
        if item.ValueType == "NUM" and name == "PNEUMONIA-PROB":
            probability = float(item.MeasuredValueSequence[0].NumericValue)
    return presence, probability


def phantom_file(path: Path, positive: bool, seed: int, **kw: Any) -> Dataset:
    image, _ = make_phantom(np.random.default_rng(seed), 128, positive)
    ds = cr_dataset(image, patient_name=CANARY_NAME, patient_id=CANARY_ID, **kw)
    ds.PatientBirthDate = CANARY_BIRTH
    # highdicom warns about a one-component person name, quoting it.
    ds.ReferringPhysicianName = "Zebedee"
    ds.save_as(path, enforce_file_format=True)
    return ds
# -- a hostile peer: raw P-DATA on a real association, memory of a process ------
#: Presentation context IDs of the contexts :func:`associate` requests, in its order.
VERIFICATION_CX, CR_CX = 1, 3


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory from /proc (VmHWM: its peak so far), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def associate(port: int, source: str = "127.0.0.1", calling: str = "HOSTILE") -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(ComputedRadiographyImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(ComputedRadiographyImageStorage, [DeflatedExplicitVRLittleEndian])
    ae.add_requested_context(ComputedRadiographyImageStorage, [JPEG2000Lossless])
    ae.add_requested_context(ComputedRadiographyImageStorage, [JPEGBaseline8Bit])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae.associate("127.0.0.1", port, ae_title="CXR-GRADCAM", bind_address=(source, 0))


def raw(assoc: Any) -> socket.socket:
    """The established association's socket: the tests write P-DATA-TF PDUs on it themselves."""
    return assoc.dul.socket.socket  # type: ignore[no-any-return]


def p_data(context_id: int, control: int, payload: bytes) -> bytes:
    """One P-DATA-TF PDU with one PDV (PS3.8 9.3.5); control bit 0: command, bit 1: last."""
    pdv = struct.pack(">LBB", len(payload) + 2, context_id, control) + payload
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


def command(field: int, sop_class: str, data_set: bool, **extra: Any) -> bytes:
    """A DIMSE command set, Implicit VR Little Endian with its group length (PS3.7 E)."""
    ds = Dataset()
    ds.AffectedSOPClassUID = sop_class
    ds.CommandField = field
    ds.MessageID = 1
    ds.CommandDataSetType = 0x0000 if data_set else 0x0101
    for k, v in extra.items():
        setattr(ds, k, v)
    body = encode(ds, True, True)
    assert body is not None
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def c_store_rq(uid: str) -> bytes:
    return p_data(CR_CX, 0x03, command(0x0001, ComputedRadiographyImageStorage, True,
                                       AffectedSOPInstanceUID=uid, Priority=0))


def send_fragments(sock: socket.socket, pdu: bytes, total: int, stop: Any = lambda: False) -> int:
    """Send ``pdu`` until ``total`` bytes went out, the worker closes, or ``stop()``; returns bytes sent."""
    sent = 0
    try:
        while sent < total and not stop():
            sock.sendall(pdu)
            sent += len(pdu)
    except OSError:
        pass
    return sent


def jp2_claiming(rows: int, cols: int) -> bytes:
    """A JPEG 2000 frame in JP2 boxes (a 512 x 512 image) whose ihdr box and SIZ marker
    both claim ``rows`` x ``cols`` (ISO 15444-1 I.5.3.1, A.5.1)."""
    import openjpeg

    data = bytearray(openjpeg.encode(np.zeros((512, 512), np.uint16), bits_stored=12, codec_format=1))
    ihdr = data.find(b"ihdr") + 4
    data[ihdr : ihdr + 8] = struct.pack(">II", rows, cols)
    siz = data.find(b"\xff\x51")
    data[siz + 6 : siz + 14] = struct.pack(">II", cols, rows)
    return bytes(data)


# -- reading a live worker: its HTTP endpoint and its JSON log ---------------------------
def http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)]
    return sum(values)


def log_records(worker: Any) -> list[dict[str, Any]]:
    out = []
    for line in worker.log_lines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def logged(worker: Any, message: str) -> list[dict[str, Any]]:
    """A live worker's JSON log records whose message starts with ``message``."""
    return [r for r in log_records(worker) if isinstance(r, dict) and str(r.get("message", "")).startswith(message)]


class Ris:
    """An MLLP listener that parses every message (python-hl7) and answers with the next of
    ``answers`` (the last one repeats)."""

    def __init__(self, port: int, answers: list[str], tls: ssl.SSLContext | None = None) -> None:
        self.port, self.answers, self.tls = port, list(answers), tls
        self.received: list[hl7.Message] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: Any = None

    async def _handle(self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        try:
            while not reader.at_eof():
                message = await reader.readmessage()
                self.received.append(message)
                code = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
                writer.writemessage(message.create_ack(code))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    def __enter__(self) -> Ris:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            hl7.mllp.start_hl7_server(self._handle, "127.0.0.1", self.port, ssl=self.tls), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# -- a load balancer in front of several workers ------------------------------------------
@dataclass
class HAProxy:
    """HAProxy (Debian ``haproxy``) as the one address of several workers: TCP round robin,
    each worker checked with ``GET /readyz`` on its metrics port, as a Kubernetes Service's
    readiness gate does. ``servers`` maps a name to (DICOM port, metrics port)."""

    port: int
    servers: dict[str, tuple[int, int]]
    folder: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.folder / "haproxy.sock"

    def config(self) -> str:
        backends = "\n".join(f"  server {name} 127.0.0.1:{dicom} check port {metrics}"
                             for name, (dicom, metrics) in self.servers.items())
        # redispatch + retries: a connection refused by a worker that died before its check
        # failed goes to the next one, so a sender sees no error for a replica it never reached.
        return f"""global
  stats socket {self.socket_path} mode 600 level admin
defaults
  mode tcp
  timeout connect 2s
  timeout client 120s
  timeout server 120s
  retries 3
  option redispatch
frontend dicom
  bind 127.0.0.1:{self.port}
  default_backend workers
backend workers
  balance roundrobin
  option httpchk GET /readyz
  http-check expect status 200
  default-server inter 250ms fall 2 rise 1
{backends}
"""

    def start(self) -> None:
        tool = require_tool("/usr/sbin/haproxy")
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg = self.folder / "haproxy.cfg"
        cfg.write_text(self.config())
        check = subprocess.run([tool, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        self.proc = subprocess.Popen([tool, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def status(self) -> dict[str, str]:
        """Each server's state as the load balancer sees it (``UP``, ``DOWN``...), from its stats socket."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.socket_path))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {r["svname"]: r["status"].split()[0] for r in rows if r["svname"] in self.servers}

    def wait_status(self, server: str, state: str, timeout: float = 30.0) -> None:
        wait_for(lambda: self.status().get(server) == state, timeout, f"load balancer to see {server} {state}",
                 interval=0.1)
