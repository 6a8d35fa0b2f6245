"""The ORU^R01 for the RIS: valid HL7 v2.5.1 (hl7apy, strict), escaped values from the image, the
triage flag, and the hl7 destination's settings."""

from __future__ import annotations

from pathlib import Path

import hl7
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydantic import ValidationError

from tests.dicom_outputs import MODEL_V2, real_cr, synthetic_cr
from worker.config import Hl7Destination, Hl7Section, OutputSection, Settings, parse_destination
from worker.model import GATE_OOD_SCORE
from worker.outputs import Trust, output_uids
from worker.outputs.common import device_uid
from worker.outputs.oru import build_oru


def oru(source: object = None, probability: float = 0.7, **hl7_settings: object) -> hl7.Message:
    source = source or synthetic_cr()
    message = build_oru(source, probability, MODEL_V2, output_uids(source, MODEL_V2.version), OutputSection(),
                        Hl7Section(**hl7_settings))
    # Strictly valid v2.5.1 when read back by hl7apy, and readable by another library.
    parse_message(message.decode(), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True).validate()
    return hl7.parse(message.decode())


def obx(message: hl7.Message, code: str) -> hl7.Segment:
    return next(s for s in message.segments("OBX") if str(s[3][0][0]) == code)


@pytest.mark.parametrize("make", [real_cr, synthetic_cr], ids=["rg1", "synthetic"])
def test_oru_is_valid_v251_with_identifiers_units_and_model(make: object) -> None:
    source = make()  # type: ignore[operator]
    message = oru(source)
    assert str(message.segment("PID")[3]) == str(source.PatientID)
    assert str(message.segment("OBR")[3]) == str(source.AccessionNumber) == str(message.segment("ORC")[3])
    assert str(message.segment("OBR")[4]) == "36554-4^XR Chest Single view^LN"
    assert str(message.segment("OBR")[25]) == "P"
    assert str(obx(message, "PNEUMONIA-PROB")[6]) == "1^no units^UCUM"
    assert str(obx(message, "DECISION-THRESHOLD")[5]) == "0.5000"
    assert str(obx(message, "111001")[5]) == MODEL_V2.name and str(obx(message, "111003")[5]) == MODEL_V2.version
    assert str(obx(message, "111001")[18][0][0]) == device_uid(MODEL_V2, OutputSection())
    assert all(str(s[11]) == "P" for s in message.segments("OBX"))


def test_triage_threshold_sets_priority_and_abnormal_flag() -> None:
    below, above = oru(probability=0.7, triage_threshold=0.8), oru(probability=0.85, triage_threshold=0.8)
    assert str(below.segment("TQ1")[9]).startswith("R^") and str(obx(below, "PNEUMONIA-PROB")[8]) == "N"
    assert str(above.segment("TQ1")[9]).startswith("S^") and str(obx(above, "PNEUMONIA-PROB")[8]) == "A"
    # Unset: the model's own threshold (0.5), so a positive is urgent.
    assert str(oru(probability=0.6).segment("TQ1")[9]).startswith("S^")


def test_delimiters_in_image_values_are_escaped_not_injected() -> None:
    source = synthetic_cr()
    source.PatientName = "O|Brien^Jo"
    source.AccessionNumber = "A^1|OBX"
    message = oru(source)
    assert len(message.segments("PID")) == 1 and message.unescape(str(message.segment("PID")[5][0][0])) == "O|Brien"
    assert len(message.segments("OBX")) == 6 and message.unescape(str(message.segment("OBR")[3])) == "A^1|OBX"


def test_a_withheld_answer_is_indeterminate_without_probability() -> None:
    source = synthetic_cr()
    message = build_oru(source, 0.9, MODEL_V2, output_uids(source, "2"), OutputSection(), Hl7Section(),
                        trust=Trust(ood_score=30.0, gate=GATE_OOD_SCORE, withheld=True)).decode()
    parsed = hl7.parse(message)
    assert "PNEUMONIA-PROB" not in message and str(parsed.segment("TQ1")[9]).startswith("R^")
    assert str(obx(parsed, "233604007")[5]).startswith("373121007")  # Not Evaluated
    assert str(obx(parsed, "OOD-STATUS")[5]).startswith("OOD-OUTSIDE")


@pytest.mark.parametrize("text, error", [
    ("mllp://ris", "mllp://HOST:PORT"), ("mllp://ris:99999", "mllp://HOST:PORT"),
    ("mllp://user@ris:2575", "mllp://HOST:PORT"), ("mllp://ris:2575/path", "mllp://HOST:PORT"),
])
def test_bad_hl7_destinations_are_refused_in_one_line(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_destination(text)
    with pytest.raises(ValidationError, match=error):
        Settings(send={"destinations": [text]})


def test_hl7_destinations_parse_as_strings_and_tables() -> None:
    settings = Settings(send={"destinations": ["PACS@127.0.0.1:104", "MLLPS://ris.example.org:2576",
                                               {"mllp": "mllp://ris:2575", "timeout_s": 5}]})
    _, tls, plain = settings.send.destinations
    assert isinstance(tls, Hl7Destination) and tls.tls and str(tls) == "mllps://ris.example.org:2576"
    assert isinstance(plain, Hl7Destination) and not plain.tls and plain.port == 2575
    with pytest.raises(ValidationError, match="use mllps://"):
        Hl7Destination(mllp="mllp://ris:2575", tls_ca="/etc/ca.pem")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="triage_threshold"):
        Settings(hl7={"triage_threshold": 1.5})


def test_a_missing_or_bad_tls_ca_is_a_config_error_naming_it(tmp_path: Path) -> None:
    """Named when the settings are read, not a traceback from the outbox's TLS context at start."""
    with pytest.raises(ValidationError, match="tls_ca file not found"):
        Hl7Destination(mllp="mllps://ris:2576", tls_ca=tmp_path / "missing.pem")  # type: ignore[arg-type]
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ValidationError, match="is not a PEM CA bundle"):
        Hl7Destination(mllp="mllps://ris:2576", tls_ca=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("code", "delivered"), [("AA", True), ("CA", True), ("AE", False), ("AR", False),
                                                 ("CE", False), ("CR", False)])
def test_an_accept_or_commit_accept_is_delivered_anything_else_is_retried(code: str, delivered: bool) -> None:
    from worker.mllp import MllpClient

    client = MllpClient(Hl7Destination(mllp="mllp://127.0.0.1:2575"))
    ack = f"MSH|^~\\&|RIS|H|CXR|H|20261206120000||ACK^R01^ACK|A1|P|2.5.1\rMSA|{code}|MSG1\r".encode()
    assert (client._judge(ack, "MSG1") is None) is delivered
    assert client._judge(ack, "OTHER") is not None  # an answer about another message never counts
