"""DICOMweb destinations against a real Orthanc with its DICOMweb plugin and basic auth: the
worker's results go out by STOW-RS, come back by WADO-RS equal to what the worker built (its
C-STORE copy), survive a restart while the server is down, and a destination that refuses
or is down holds up no other."""

from __future__ import annotations

import io
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient

from cxr_demo.orthanc import DICOMWEB_PLUGIN, OrthancPACS
from tests.dicom_outputs import MODEL_V2, hot_gradcam
from tests.helpers import (
    Storescp,
    free_port,
    http,
    log_records,
    make_pki,
    metric,
    phantom_file,
    require_tool,
    storescu,
    wait_for,
    wait_port,
)
from trainer.dicom_phantoms import cr_dataset
from worker.config import SecuritySection, SendSection
from worker.outputs import BuildSettings, build_presentation_state, output_uids
from worker.pipeline import encode
from worker.send import Outbox
from worker.spool import Spool

pytestmark = pytest.mark.integration

USER, PASSWORD = "cxr", "Stow-Secret-4711"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPACS]:
    """One Orthanc for the module, not yet started: the restart test starts it late."""
    require_tool("/usr/sbin/Orthanc")
    require_tool(DICOMWEB_PLUGIN)
    pacs = OrthancPACS(tmp_path_factory.mktemp("orthanc"), "CXR-GRADCAM", free_port(), dicomweb=True,
                       users={USER: PASSWORD})
    yield pacs
    pacs.stop()


def running(orthanc: OrthancPACS) -> OrthancPACS:
    if orthanc.proc is None:
        orthanc.start()
    return orthanc


def web_client(orthanc: OrthancPACS) -> DICOMwebClient:
    session = requests.Session()
    session.auth = (USER, PASSWORD)
    return DICOMwebClient(orthanc.dicomweb_url, session=session)


def secret_file(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def outbox_states(spool: Path, url: str) -> list[dict[str, Any]]:
    return [s for s in (json.loads(p.read_text()) for p in (spool / "outbox").glob("*/*.json"))
            if s["destination"] == url]


def test_worker_stows_results_that_wado_returns_as_built_through_a_restart_and_refusals(
        orthanc: OrthancPACS, make_worker: Any, pacs: Storescp, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    orthanc.stop()  # down while the first worker runs
    good = {"url": orthanc.dicomweb_url, "auth": "basic",
            "credentials_file": str(secret_file(tmp_path / "good.cred", f"{USER}:{PASSWORD}"))}
    rotated = tmp_path / "rotated.cred"
    # The same server under another name, as a second DICOMweb destination.
    stale = {"url": f"http://localhost:{orthanc.http_port}/dicom-web", "auth": "basic",
             "credentials_file": str(secret_file(rotated, f"{USER}:expired-password"))}
    wrong_root = {"url": orthanc.url + "/no-dicom-web-here", "auth": "basic", "credentials_env": "CXR_TEST_CREDS"}
    monkeypatch.setenv("CXR_TEST_CREDS", f"{USER}:{PASSWORD}")
    dests = [f"PACS@127.0.0.1:{pacs.port}", good, stale, wrong_root]
    monkeypatch.setenv("CXR_SEND__DESTINATIONS", json.dumps(dests))
    good_url, stale_url, wrong_url = good["url"], stale["url"], wrong_root["url"]
    web_urls = (good_url, stale_url, wrong_url)
    mport = free_port()

    # 1. Every DICOMweb destination is down: the C-STORE copy goes out regardless.
    worker = make_worker([], metrics_port=mport)
    source = tmp_path / "in.dcm"
    phantom_file(source, True, seed=3)
    storescu(worker.port, [source])
    wait_for(lambda: len(pacs.files()) == 2, 120, "the SC and SR at the C-STORE destination")

    def attempted() -> list[dict[str, Any]]:
        return [s for url in web_urls for s in outbox_states(worker.spool, url) if s["attempts"] >= 1]

    wait_for(lambda: len(attempted()) == 6, 60, "failed attempts at each DICOMweb destination")
    assert {s["last_error"].split(": ")[1] for s in attempted()} == {"ConnectionError"}
    assert worker.stop() == 0

    # 2. Orthanc is up; a new worker on the same spool delivers what was queued.
    running(orthanc)
    worker = make_worker([], metrics_port=mport)
    built = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in pacs.files()}
    client = web_client(orthanc)

    def stored() -> list[str]:
        return [str(s["0020000D"]["Value"][0]) for s in client.search_for_studies()]

    wait_for(lambda: not outbox_states(worker.spool, good_url), 60, "the good destination's queue to drain")
    for uid, ds in built.items():
        # WADO-RS: the object the PACS holds is the one the worker built, element for element.
        back = client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, uid)
        assert back == ds, f"{uid}: retrieved object differs from the built one"
    assert next(iter(built.values())).StudyInstanceUID in stored()

    # A 4xx other than 401/403/408/429 refuses for good: dead letters at once, per object.
    wait_for(lambda: len(list((worker.spool / "dead").glob("*.json"))) == 2, 30, "two dead letters")
    dead = [json.loads(p.read_text()) for p in (worker.spool / "dead").glob("*.json")]
    assert {d["destination"] for d in dead} == {wrong_url}
    assert all("HTTP 404" in d["last_error"] for d in dead)
    # Stale credentials (401) are retried, and the destination is reported down with the reason.
    wait_for(lambda: all("HTTP 401" in s["last_error"] for s in outbox_states(worker.spool, stale_url)), 30,
             "a 401 from the stale credentials")
    assert len(outbox_states(worker.spool, stale_url)) == 2
    wait_for(lambda: json.loads(http(mport, "/healthz")[1])["destinations"].get(wrong_url, {}).get("up") is False,
             30, "the wrong root reported down")
    health = json.loads(http(mport, "/healthz")[1])["destinations"]
    assert health[good_url]["up"] is True and health[f"PACS@127.0.0.1:{pacs.port}"]["up"] is True
    assert health[stale_url]["up"] is False and "HTTP 401" in health[stale_url]["error"]
    text = http(mport, "/metrics")[1]
    assert metric(text, f'cxr_objects_sent_total{{destination="{good_url}"}}') == 2
    assert metric(text, f'cxr_dead_letters_total{{destination="{wrong_url}"}}') == 2
    assert metric(text, f'cxr_destination_up{{destination="{wrong_url}"}}') == 0

    # 3. The credentials are rotated in their file: the next retry takes them, no restart.
    secret_file(rotated, f"{USER}:{PASSWORD}")
    wait_for(lambda: not outbox_states(worker.spool, stale_url), 30, "delivery with the rotated credentials")
    assert worker.stop() == 0
    log = "\n".join(worker.log_lines())
    assert PASSWORD not in log and "expired-password" not in log and "a-token-orthanc" not in log
    sent = [r for r in log_records(worker) if r.get("message") == "sent"]
    assert len(sent) == 2 + 2 + 2  # C-STORE, good, and rotated (the second worker's log appends to the first's)


def test_an_object_the_server_refuses_fails_alone(orthanc: OrthancPACS, tmp_path: Path) -> None:
    """Orthanc lists an object it cannot index in the STOW-RS Failed SOP Sequence (reason C000):
    that object is dead-lettered, the ones sent beside it (an image and its GSPS) are stored."""
    running(orthanc)
    cred = secret_file(tmp_path / "cred", f"{USER}:{PASSWORD}")
    settings = SendSection(destinations=[{"url": orthanc.dicomweb_url, "auth": "basic", "credentials_file": cred}],
                           acse_timeout=5, dimse_timeout=20)
    outbox = Outbox(Spool(tmp_path / "spool"), settings, "CXR-GRADCAM")
    good = cr_dataset(np.full((64, 64), 100, np.uint8))
    bad = cr_dataset(np.full((64, 64), 50, np.uint8))
    del bad.SeriesInstanceUID  # Orthanc cannot index an instance without its series
    outbox.put("a-bad", encode(bad), str(bad.SOPInstanceUID))
    outbox.put("b-good", encode(good), str(good.SOPInstanceUID))
    gsps = build_presentation_state(good, hot_gradcam(), 0.9, MODEL_V2, output_uids(good, MODEL_V2.version),
                                    BuildSettings())
    outbox.put("c-gsps", encode(gsps), str(gsps.SOPInstanceUID))
    assert outbox.send_due() == 2
    assert outbox.depth() == 0
    [dead] = [json.loads(p.read_text()) for p in outbox.spool.dead.glob("*.json")]
    assert dead["sop_instance_uid"] == bad.SOPInstanceUID and "failure reason 0xC000" in dead["last_error"]
    back = web_client(orthanc).retrieve_instance(good.StudyInstanceUID, good.SeriesInstanceUID, good.SOPInstanceUID)
    assert back.PixelData == good.PixelData
    assert web_client(orthanc).retrieve_instance(gsps.StudyInstanceUID, gsps.SeriesInstanceUID,
                                                 gsps.SOPInstanceUID) == pydicom.dcmread(io.BytesIO(encode(gsps)))


# -- TLS -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


class TlsFront:
    """TLS termination in front of Orthanc's HTTP port, as a hospital's reverse proxy does
    (Debian's Orthanc 1.10 crashes serving HTTPS itself under OpenSSL 3)."""

    def __init__(self, pki: Path, backend: int) -> None:
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(pki / "server.crt", pki / "server.key")
        self.backend = backend
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError):  # a client that does not trust us hangs up in the handshake
            conn.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.backend))

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            for s in (src, dst):
                s.close()

        threading.Thread(target=pump, args=(upstream, tls), daemon=True).start()
        pump(tls, upstream)

    def close(self) -> None:
        self.sock.close()


def test_https_destination_is_verified_against_tls_ca(orthanc: OrthancPACS, pki: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Verified against ``security.tls_ca``: delivered; against the system store (which does not
    know the test CA): refused in the handshake, kept for a retry (a certificate can be fixed)."""
    import certifi

    # requests would let this override a session's CA bundle, and tls_ca with it.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    running(orthanc)
    front = TlsFront(pki, orthanc.http_port)
    try:
        url = f"https://127.0.0.1:{front.port}/dicom-web"
        cred = secret_file(tmp_path / "cred", f"{USER}:{PASSWORD}")
        settings = SendSection(destinations=[{"url": url, "auth": "basic", "credentials_file": cred}],
                               acse_timeout=5, dimse_timeout=20)
        ds = cr_dataset(np.full((64, 64), 120, np.uint8))
        untrusting = Outbox(Spool(tmp_path / "spool-1"), settings, "CXR-GRADCAM")
        untrusting.put("sc", encode(ds), str(ds.SOPInstanceUID))
        assert untrusting.send_due() == 0
        [state] = [json.loads(p.read_text()) for p in untrusting.spool.outbox.glob("*/*.json")]
        assert state["attempts"] == 1 and "CERTIFICATE_VERIFY_FAILED" in state["last_error"]
        trusting = Outbox(Spool(tmp_path / "spool-2"), settings, "CXR-GRADCAM",
                          security=SecuritySection(tls_ca=pki / "ca.crt"))
        trusting.put("sc", encode(ds), str(ds.SOPInstanceUID))
        assert trusting.send_due() == 1
        back = web_client(orthanc).retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert back.SOPInstanceUID == ds.SOPInstanceUID
    finally:
        front.close()


def test_a_stalled_dicomweb_destination_does_not_hold_up_a_c_store_one(tmp_path: Path) -> None:
    """A server that accepts the connection and never answers: the C-STORE destination's object
    is delivered while the DICOMweb request waits out its timeout in its own thread."""
    silent = socket.create_server(("127.0.0.1", 0))  # listens, never reads: the request stalls
    port = free_port()
    scp = Storescp(port, tmp_path / "pacs")
    scp.start()
    try:
        settings = SendSection(destinations=[f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web",
                                             f"PACS@127.0.0.1:{port}"],
                               acse_timeout=5, dimse_timeout=6, network_timeout=5)
        outbox = Outbox(Spool(tmp_path / "spool"), settings, "CXR-GRADCAM")
        ds = cr_dataset(np.full((64, 64), 90, np.uint8))
        outbox.put("sc", encode(ds), str(ds.SOPInstanceUID))
        done = threading.Event()
        threading.Thread(target=lambda: (outbox.send_due(), done.set()), daemon=True).start()
        wait_port(port)
        wait_for(lambda: len(scp.files()) == 1, 5, "the C-STORE delivery while the DICOMweb request stalls")
        assert not done.is_set()  # the round is still waiting on the stalled server
        assert done.wait(30)
        [state] = [json.loads(p.read_text()) for p in outbox.spool.outbox.glob("*/*.json")]
        assert state["attempts"] == 1 and "Timeout" in state["last_error"]
    finally:
        scp.stop()
        silent.close()



class _OddServer:
    """An HTTP server that answers every STOW-RS POST with a fixed status, content type and body,
    as a misconfigured proxy or a non-conformant archive might; counts the requests it got."""

    def __init__(self, status: int, content_type: str | None, body: bytes, location: str = "") -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        outer = self
        self.posts = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.posts += 1
                self.send_response(status)
                if content_type:
                    self.send_header("Content-Type", content_type)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("content_type, body", [
    ("application/dicom+json", b"{not json"),
    ("application/dicom+xml", b"<NativeDicomModel><unclosed"),
    (None, b"stored, thanks"),
])
def test_a_2xx_with_an_unreadable_answer_counts_as_stored(tmp_path: Path, content_type: str | None,
                                                          body: bytes) -> None:
    server = _OddServer(200, content_type, body)
    try:
        outbox = Outbox(Spool(tmp_path / "spool"), SendSection(destinations=[server.url], acse_timeout=5,
                                                               dimse_timeout=10), "CXR-GRADCAM")
        ds = cr_dataset(np.full((64, 64), 70, np.uint8))
        outbox.put("sc", encode(ds), str(ds.SOPInstanceUID))
        assert outbox.send_due() == 1 and outbox.depth() == 0 and server.posts == 1
    finally:
        server.close()


def test_credentials_http_cannot_carry_are_never_counted_as_stored(tmp_path: Path) -> None:
    """A password rotated to one outside Latin-1: nothing is sent, the object stays in the outbox
    with the reason, and a corrected file delivers it (the credentials are read again each round)."""
    server = _OddServer(200, None, b"")
    try:
        cred = secret_file(tmp_path / "cred", "cxr:password")
        settings = SendSection(destinations=[{"url": server.url, "auth": "basic", "credentials_file": cred}],
                               acse_timeout=5, dimse_timeout=10, retry_initial_s=0.01)
        secret_file(tmp_path / "cred", "cxr:pass€word")
        outbox = Outbox(Spool(tmp_path / "spool"), settings, "CXR-GRADCAM")
        ds = cr_dataset(np.full((64, 64), 60, np.uint8))
        outbox.put("sc", encode(ds), str(ds.SOPInstanceUID))
        assert outbox.send_due() == 0 and outbox.depth() == 1 and server.posts == 0
        [state] = [json.loads(p.read_text()) for p in outbox.spool.outbox.glob("*/*.json")]
        assert "ISO-8859-1" in state["last_error"] and "pass€word" not in state["last_error"]
        secret_file(tmp_path / "cred", "cxr:password")
        wait_for(lambda: outbox.send_due() == 1, 10, "delivery with corrected credentials")
        assert outbox.depth() == 0 and server.posts == 1
    finally:
        server.close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_failed_delivery_never_followed(tmp_path: Path, status: int) -> None:
    """A destination answering 3xx towards a host outside send.destinations: nothing goes there."""
    elsewhere = _OddServer(200, None, b"")
    server = _OddServer(status, None, b"", location=elsewhere.url + "/studies")
    try:
        outbox = Outbox(Spool(tmp_path / "spool"), SendSection(destinations=[server.url], acse_timeout=5,
                                                               dimse_timeout=10), "CXR-GRADCAM")
        ds = cr_dataset(np.full((64, 64), 80, np.uint8))
        outbox.put("sc", encode(ds), str(ds.SOPInstanceUID))
        assert outbox.send_due() == 0 and outbox.depth() == 1
        assert server.posts == 1 and elsewhere.posts == 0
        [state] = [json.loads(p.read_text()) for p in outbox.spool.outbox.glob("*/*.json")]
        assert f"HTTP {status}" in state["last_error"]
    finally:
        server.close()
        elsewhere.close()
