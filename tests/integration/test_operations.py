"""Operating the worker: allow-list, DICOM TLS, metrics and health, audit trail.
Peers are DCMTK's echoscu/storescu and storescp; certificates come from openssl."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port, http, make_pki, metric, phantom_file, require_tool, wait_for, wait_port

pytestmark = pytest.mark.integration


def echoscu(port: int, *options: str, calling: str = "HOSPITAL") -> subprocess.CompletedProcess[str]:
    tool = require_tool("/usr/bin/echoscu")
    return subprocess.run([tool, *options, "-aet", calling, "-aec", "CXR-GRADCAM", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)


def audit(worker: Any) -> list[dict[str, Any]]:
    path = worker.config.parent / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def alerts(worker: Any) -> list[dict[str, Any]]:
    return [a for a in audit(worker) if a["EventIdentification"]["EventID"]["code"] == "110113"]


def test_allow_list_by_ae_title_and_network(make_worker: Any, pacs: Any) -> None:
    worker = make_worker([f"PACS@127.0.0.1:{pacs.port}"],
                         extra='[security]\nallowed = ["HOSPITAL@127.0.0.0/24", "REMOTE@10.9.9.0/24"]\n')
    assert echoscu(worker.port).returncode == 0
    stranger = echoscu(worker.port, calling="STRANGER")
    assert stranger.returncode != 0 and "calling ae title not recognized" in stranger.stderr.lower()
    # A known AE title calling from an address its entry does not cover.
    remote = echoscu(worker.port, calling="REMOTE")
    assert remote.returncode != 0 and "calling ae title not recognized" in remote.stderr.lower()
    wait_for(lambda: len(alerts(worker)) >= 2, 10, "two security alerts")
    users = {a["ActiveParticipant"][0]["UserID"] for a in alerts(worker)}
    assert users == {"STRANGER", "REMOTE"}
    assert worker.stop() == 0


def test_unlisted_address_gets_no_association(make_worker: Any, pacs: Any) -> None:
    worker = make_worker([f"PACS@127.0.0.1:{pacs.port}"], extra='[security]\nallowed = ["HOSPITAL@127.0.0.9/32"]\n')
    out = echoscu(worker.port)
    assert out.returncode != 0
    assert "association rejected" not in out.stderr.lower()  # dropped before any A-ASSOCIATE
    wait_for(lambda: bool(alerts(worker)), 10, "a security alert")
    assert alerts(worker)[0]["ActiveParticipant"][0]["NetworkAccessPointID"] == "127.0.0.1"
    assert worker.proc.poll() is None
    assert worker.stop() == 0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_dicom_tls(make_worker: Any, pacs: Any, pki: Path, tmp_path: Path) -> None:
    tls_port = free_port()
    worker = make_worker([f"PACS@127.0.0.1:{pacs.port}"], extra=f"""[security]
tls_port = {tls_port}
tls_cert = "{pki / 'server.crt'}"
tls_key = "{pki / 'server.key'}"
tls_ca = "{pki / 'ca.crt'}"
tls_require_client_cert = true
""")
    wait_port(tls_port)  # the TLS listener starts just after the plain one
    good = ("+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt"))
    assert echoscu(tls_port, *good).returncode == 0
    assert echoscu(tls_port).returncode != 0  # plain to the TLS port
    assert echoscu(worker.port, *good).returncode != 0  # TLS to the plain port
    rogue = ("+tls", str(pki / "rogue.key"), str(pki / "rogue.crt"), "+cf", str(pki / "ca.crt"))
    assert echoscu(tls_port, *rogue).returncode != 0  # client certificate from an unknown CA
    # A TLS client that offers no certificate at all.
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.check_hostname = False
    with pytest.raises((ssl.SSLError, OSError)), socket.create_connection(("127.0.0.1", tls_port), 5) as raw, \
            ctx.wrap_socket(raw) as s:
        s.sendall(b"\x01\x00")  # TLS 1.3 reports the missing certificate on first use
        assert s.recv(1) != b""
    wait_for(lambda: sum("TLS" in a["EventIdentification"].get("EventOutcomeDescription", "")
                         for a in alerts(worker)) >= 2, 15, "TLS failures in the audit trail")
    # A real study over TLS.
    image = tmp_path / "tls.dcm"
    phantom_file(image, True, 3)
    out = subprocess.run([require_tool("/usr/bin/storescu"), *good, "-aet", "HOSPITAL", "-aec", "CXR-GRADCAM",
                          "127.0.0.1", str(tls_port), str(image)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: len(pacs.files()) >= 2, 120, "results of the TLS study")
    assert worker.stop() == 0


def test_bad_tls_config_is_refused_at_start(tmp_path: Path) -> None:
    from worker.config import get_settings
    from worker.errors import ConfigError

    cfg = tmp_path / "w.toml"
    cfg.write_text("[security]\ntls_port = 2762\n")
    with pytest.raises(ConfigError, match="TLS needs tls_cert and tls_key"):
        get_settings(cfg)
    cfg.write_text(f'[security]\ntls_port = 2762\ntls_cert = "{tmp_path}/no.crt"\ntls_key = "{tmp_path}/no.key"\n')
    with pytest.raises(ConfigError, match="file not found"):
        get_settings(cfg)




def test_metrics_health_readiness_and_audit(make_worker: Any, pacs: Any, tmp_path: Path) -> None:
    mport = free_port()
    worker = make_worker([f"PACS@127.0.0.1:{pacs.port}"], metrics_port=mport)
    image = tmp_path / "m.dcm"
    source = phantom_file(image, True, 8)
    subprocess.run([require_tool("/usr/bin/storescu"), "-aet", "HOSPITAL", "-aec", "CXR-GRADCAM", "127.0.0.1",
                    str(worker.port), str(image)], check=True, capture_output=True, timeout=60)
    wait_for(lambda: len(pacs.files()) >= 2, 120, "results")
    wait_for(lambda: metric(http(mport, "/metrics")[1], "cxr_objects_sent_total") >= 2, 30, "sent metric")
    code, text = http(mport, "/metrics")
    assert code == 200
    assert metric(text, "cxr_instances_received_total") == 1
    assert metric(text, "cxr_instances_processed_total") == 1
    assert metric(text, "cxr_predicted_probability_count") == 1
    assert metric(text, 'cxr_stage_seconds_count{stage="infer"}') == 1
    assert 'cxr_model_info{' in text and 'version="test-1"' in text
    assert metric(text, "cxr_queue_depth") == 0 and metric(text, "cxr_outbox_depth") == 0
    assert http(mport, "/healthz")[0] == 200
    code, body = http(mport, "/readyz")
    assert code == 200 and json.loads(body)["ready"] is True
    assert set(json.loads(body)["checks"]) == {"model_answered", "spool_writable", "disk_above_reserve",
                                               "threads_alive"}
    assert metric(text, f'cxr_destination_up{{destination="PACS@127.0.0.1:{pacs.port}"}}') == 1
    pacs.stop()
    code, body = http(mport, "/readyz")  # the PACS is not part of readiness: the outbox keeps results
    assert code == 200
    events = audit(worker)
    kinds = [(e["EventIdentification"]["EventID"]["code"], e["EventIdentification"]["EventActionCode"]) for e in events]
    assert ("110100", "E") in kinds  # application start
    received = [e for e in events if e["EventIdentification"]["EventActionCode"] == "C"]
    # PS3.15 A.5.3.2: the participant object is the study; the instance is described inside it.
    study = received[0]["ParticipantObjectIdentification"][0]
    assert study["ParticipantObjectIDTypeCode"]["code"] == "110180"
    assert study["ParticipantObjectID"] == source.StudyInstanceUID
    [sop_class] = study["ParticipantObjectDescription"]["SOPClass"]
    assert sop_class["UID"] == source.SOPClassUID and sop_class["Instance"] == [{"UID": source.SOPInstanceUID}]
    sent = [e["ParticipantObjectIdentification"][0] for e in events
            if e["EventIdentification"]["EventActionCode"] == "R"]
    assert {o["ParticipantObjectID"] for o in sent} == {source.StudyInstanceUID}  # SC and SR join the study
    assert received[0]["ActiveParticipant"][0]["UserID"] == "HOSPITAL"
    assert sum(e["EventIdentification"]["EventActionCode"] == "R" for e in events) == 2  # SC and SR sent
    assert "Canary" not in json.dumps(events) and "CANARY-7731" not in json.dumps(events)
    assert worker.stop() == 0
    stop = audit(worker)[-1]["EventIdentification"]
    assert stop["EventTypeCode"]["code"] == "110121"  # application stop


def test_readiness_does_not_depend_on_the_destination(make_worker: Any) -> None:
    """A PACS that is down is reported in /healthz and cxr_destination_up, never in /readyz:
    the worker still accepts and processes (the outbox keeps the results), and the probe
    must not wait on a network peer."""
    mport = free_port()
    dest = f"PACS@127.0.0.1:{free_port()}"
    worker = make_worker([dest], metrics_port=mport)
    code, body = http(mport, "/readyz")
    assert code == 200, body
    assert all(json.loads(body)["checks"].values())
    wait_for(lambda: dest in json.loads(http(mport, "/healthz")[1]).get("destinations", {}), 30,
             "the background C-ECHO")
    code, body = http(mport, "/healthz")
    assert code == 200 and json.loads(body)["destinations"][dest]["up"] is False
    assert metric(http(mport, "/metrics")[1], f'cxr_destination_up{{destination="{dest}"}}') == 0
    assert worker.stop() == 0


class Trickler:
    """A hostile peer: declares a PDU of ``length`` bytes, then sends one byte a second."""

    def __init__(self, port: int, source: str, length: int) -> None:
        self.sock = socket.socket()
        self.sock.bind((source, 0))
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(bytes([0x01, 0x00]) + length.to_bytes(4, "big"))
        self.closed_after: float | None = None
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self) -> None:
        try:
            for _ in range(60):
                self.sock.sendall(b"\x00")
                time.sleep(1.0)
        except OSError:
            self.closed_after = time.monotonic() - self.started
        finally:
            self.sock.close()


@pytest.mark.parametrize("declared, pdu_deadline_s", [(64 * 2**20, 60.0), (1000, 3.0)],
                         ids=["64MiB-declared", "slow-small-pdu"])
def test_trickling_peers_cannot_hold_the_service(make_worker: Any, pacs: Any, tmp_path: Path, declared: int,
                                                 pdu_deadline_s: float) -> None:
    worker = make_worker([f"PACS@127.0.0.1:{pacs.port}"], dicom_extra="max_associations = 3\n"
                         f"max_associations_per_peer = 2\npdu_deadline_s = {pdu_deadline_s}\nacse_timeout = 60.0\n")
    attackers = [Trickler(worker.port, f"127.0.0.{i}", declared) for i in (2, 3)]
    image = tmp_path / "real.dcm"
    phantom_file(image, False, 12)
    out = subprocess.run([require_tool("/usr/bin/storescu"), "-aet", "HOSPITAL", "-aec", "CXR-GRADCAM",
                          "127.0.0.1", str(worker.port), str(image)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: all(a.closed_after is not None for a in attackers), 40, "the tricklers to be cut off")
    # Each trickle would last 60 s, and every other limit is 60 s too: a cut within 30 s can only
    # come from the size cap (64 MiB declared) or the 3 s PDU deadline. The margin is for a loaded machine.
    assert all(a.closed_after is not None and a.closed_after < 30 for a in attackers), \
        [a.closed_after for a in attackers]
    wait_for(lambda: len(pacs.files()) >= 2, 120, "results for the real sender")
    assert worker.stop() == 0


def test_per_peer_association_limit(make_worker: Any, pacs: Any) -> None:
    worker = make_worker([f"PACS@127.0.0.1:{pacs.port}"], dicom_extra="max_associations_per_peer = 2\n"
                         "pdu_deadline_s = 20.0\n")
    held = [Trickler(worker.port, "127.0.0.5", 1000) for _ in range(2)]
    time.sleep(0.5)
    third = Trickler(worker.port, "127.0.0.5", 1000)
    wait_for(lambda: third.closed_after is not None, 10, "the third association from one peer to be refused")
    assert all(h.closed_after is None for h in held)
    assert echoscu(worker.port).returncode == 0  # another peer is unaffected
    wait_for(lambda: any("limit" in a["EventIdentification"].get("EventOutcomeDescription", "")
                         for a in alerts(worker)), 10, "a security alert for the limit")
    assert worker.stop() == 0


def test_outgoing_c_store_over_tls(make_worker: Any, pki: Path, tmp_path: Path) -> None:
    """The PACS is DCMTK storescp speaking TLS; the worker verifies it against the CA."""
    port = free_port()
    out = tmp_path / "tls-pacs"
    out.mkdir()
    pacs = subprocess.Popen([require_tool("/usr/bin/storescp"), "+tls", str(pki / "server.key"),
                             str(pki / "server.crt"), "+cf", str(pki / "ca.crt"), "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        worker = make_worker([f"PACS@127.0.0.1:{port}"], extra=f"""[security]
send_tls = true
tls_cert = "{pki / 'client.crt'}"
tls_key = "{pki / 'client.key'}"
tls_ca = "{pki / 'ca.crt'}"
""")
        image = tmp_path / "o.dcm"
        phantom_file(image, False, 4)
        subprocess.run([require_tool("/usr/bin/storescu"), "-aec", "CXR-GRADCAM", "127.0.0.1", str(worker.port),
                        str(image)], check=True, capture_output=True, timeout=60)
        wait_for(lambda: len(list(out.iterdir())) >= 2, 120, "results delivered over TLS")
        assert worker.stop() == 0
    finally:
        pacs.terminate()
        pacs.wait(10)
