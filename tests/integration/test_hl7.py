"""ORU^R01 to a RIS over MLLP, against a real MLLP listener of another library than the sender's
(python-hl7's asyncio server; we build with hl7apy): accepted, refused then accepted, down then
up, rejected until the horizon, and inside TLS. The outbox's durability is the DICOM one."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dicom_outputs import MODEL_V2, synthetic_cr
from tests.helpers import Ris, free_port, make_pki
from worker.audit import AuditTrail
from worker.config import Hl7Section, OutputSection, SendSection
from worker.metrics import Metrics
from worker.outputs import Trust, output_uids
from worker.outputs.oru import build_oru
from worker.send import Outbox
from worker.spool import Spool

pytestmark = pytest.mark.integration


def oru(withheld: bool = False) -> tuple[bytes, str]:
    source = synthetic_cr()
    trust = Trust(ood_score=30.0, gate="ood_score", withheld=True) if withheld else Trust()
    message = build_oru(source, 0.91, MODEL_V2, output_uids(source, MODEL_V2.version), OutputSection(),
                        Hl7Section(triage_threshold=0.8, receiving_application="RIS"), trust=trust)
    return message, str(source.SOPInstanceUID)


def make_outbox(tmp_path: Path, dest: str | dict[str, Any], metrics: Metrics | None = None,
                **send: float) -> Outbox:
    settings = SendSection(destinations=[dest], **{"retry_initial_s": 10, "retry_max_interval_s": 40, **send})
    return Outbox(Spool(tmp_path / "spool"), settings, "CXR-GRADCAM", metrics=metrics,
                  audit=AuditTrail(tmp_path / "audit.jsonl", "CXR-GRADCAM"))


def states(outbox: Outbox) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in outbox.spool.outbox.glob("*/*.json")]


@pytest.fixture
def port() -> Iterator[int]:
    yield free_port()


def test_an_accepted_oru_is_delivered_once_with_what_a_ris_reads(tmp_path: Path, port: int) -> None:
    metrics = Metrics()
    outbox = make_outbox(tmp_path, f"mllp://127.0.0.1:{port}", metrics)
    message, uid = oru()
    outbox.put("oru", message, uid, hl7=True)
    outbox.put("sc", b"DICM", "1.2.3")  # a DICOM object is not for an HL7 destination
    assert outbox.depth() == 1
    with Ris(port, ["AA"]) as ris:
        assert outbox.send_due() == 1
        assert outbox.send_due(now=time.time() + 3600) == 0  # nothing left: never sent twice
    (got,) = ris.received
    assert str(got.segment("MSH")[9]) == "ORU^R01^ORU_R01" and str(got.segment("MSH")[12]) == "2.5.1"
    assert str(got.segment("OBR")[3]) == "ACC1" and str(got.segment("OBR")[25]) == "P"
    assert str(got.segment("PID")[3]) == "SYN-0001"
    assert str(got.segment("TQ1")[9]).startswith("S^")  # 0.91 >= triage threshold 0.8: stat
    observations = {str(obx[3][0][0]): obx for obx in got.segments("OBX")}
    assert str(observations["PNEUMONIA-PROB"][5]) == "0.9100" and str(observations["PNEUMONIA-PROB"][8]) == "A"
    assert str(observations["233604007"][5]).startswith("52101004")  # Present
    assert "not for diagnostic use" in str(got.segment("NTE")[3])
    assert outbox.depth() == 0 and not any(outbox.spool.dead.iterdir())
    assert metrics.sent.labels(f"mllp://127.0.0.1:{port}")._value.get() == 1
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert events and all(uid in json.dumps(e) for e in events[-1:])


def test_an_error_ack_is_retried_with_backoff_then_accepted(tmp_path: Path, port: int) -> None:
    outbox = make_outbox(tmp_path, f"mllp://127.0.0.1:{port}")
    message, uid = oru(withheld=True)  # a withheld answer is reported too
    outbox.put("oru", message, uid, hl7=True)
    t0 = time.time()
    with Ris(port, ["AE", "AA"]) as ris:
        assert outbox.send_due(now=t0) == 0
        [state] = states(outbox)
        assert state["attempts"] == 1 and "acknowledged AE" in state["last_error"]
        assert state["next_attempt"] == pytest.approx(t0 + 10)
        assert outbox.send_due(now=t0 + 5) == 0 and len(ris.received) == 1  # not due: not sent
        assert outbox.send_due(now=t0 + 10) == 1
    assert len(ris.received) == 2 and outbox.depth() == 0
    assert str(ris.received[0].segment("MSH")[10]) == str(ris.received[1].segment("MSH")[10])  # the same message
    assert str(ris.received[1].segment("TQ1")[9]).startswith("R^")  # withheld: routine
    assert "PNEUMONIA-PROB" not in str(ris.received[1])


def test_a_ris_down_then_up_gets_the_message_once_through_a_restart(tmp_path: Path, port: int) -> None:
    outbox = make_outbox(tmp_path, f"mllp://127.0.0.1:{port}")
    message, uid = oru()
    outbox.put("oru", message, uid, hl7=True)
    t0 = time.time()
    assert outbox.send_due(now=t0) == 0  # nobody listens
    assert "no connection" in states(outbox)[0]["last_error"]
    outbox = make_outbox(tmp_path, f"mllp://127.0.0.1:{port}")  # a restart keeps it
    assert outbox.depth() == 1 and states(outbox)[0]["attempts"] == 1
    with Ris(port, ["AA"]) as ris:
        assert outbox.send_due(now=t0 + 10) == 1
        assert outbox.send_due(now=t0 + 3600) == 0
    assert len(ris.received) == 1 and outbox.depth() == 0


def test_a_rejecting_ris_is_retried_until_the_horizon_then_dead_lettered(tmp_path: Path, port: int) -> None:
    outbox = make_outbox(tmp_path, f"mllp://127.0.0.1:{port}", retry_horizon_h=0.001)  # 3.6 s
    message, uid = oru()
    outbox.put("oru", message, uid, hl7=True)
    t0 = time.time()
    with Ris(port, ["AR"]) as ris:
        assert outbox.send_due(now=t0) == 0
        assert outbox.depth() == 1  # AR is retried within the horizon
        assert outbox.send_due(now=t0 + 10) == 0
    assert len(ris.received) == 2 and outbox.depth() == 0
    [dead] = [json.loads(p.read_text()) for p in outbox.spool.dead.glob("*.json")]
    assert "retries exhausted" in dead["last_error"] and "acknowledged AR" in dead["last_error"]
    assert [p.suffix for p in outbox.spool.dead.iterdir() if p.suffix != ".json"] == [".hl7"]


def test_mllp_inside_tls_is_verified_against_tls_ca(tmp_path: Path, port: int) -> None:
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(pki / "server.crt", pki / "server.key")
    message, uid = oru()
    trusted = make_outbox(tmp_path / "a", {"mllp": f"mllps://127.0.0.1:{port}", "tls_ca": str(pki / "ca.crt")})
    rogue = make_outbox(tmp_path / "b", {"mllp": f"mllps://127.0.0.1:{port}", "tls_ca": str(pki / "rogue-ca.crt")})
    for outbox in (trusted, rogue):
        outbox.put("oru", message, uid, hl7=True)
    with Ris(port, ["AA"], tls=server) as ris:
        assert trusted.send_due() == 1
        assert rogue.send_due() == 0  # a server its CA did not sign: nothing sent
    assert len(ris.received) == 1
    assert "SSLCertVerificationError" in states(rogue)[0]["last_error"]


def test_cxr_worker_echo_checks_an_hl7_destination(port: int, capsys: pytest.CaptureFixture[str]) -> None:
    from worker.cli import main

    assert main(["echo", f"mllp://127.0.0.1:{port}", "--timeout", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"MLLP mllp://127.0.0.1:{port}: no connection (ConnectionRefusedError)"
    with Ris(port, ["AA"]):
        assert main(["echo", f"mllp://127.0.0.1:{port}", "--timeout", "2"]) == 0
    assert "connected" in capsys.readouterr().out
