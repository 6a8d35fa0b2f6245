"""The result as an HL7 v2.5.1 ORU^R01 for the RIS: one builder, with hl7apy.

hl7apy builds the message from the standard's own structure tables and validates it strictly
(segments, groups, cardinality, data types and lengths of v2.5.1) before it is queued; values
taken from the image are set component by component, so hl7apy escapes the delimiters they
hold. A message that fails validation is never sent: the builder raises.

What a receiver reads (docs/conformance.md): PID from the image's patient, ORC-3 and OBR-3
the accession number (the filler order number the RIS knows the study by), OBR-4 the imaging
procedure, OBR-25 "P" (preliminary: a machine's reading awaiting a radiologist), an NTE saying
it is AI-generated, TQ1-9 the priority ("S" stat when the probability reaches
``hl7.triage_threshold``, else "R" routine), and one OBX per item, the finding's OBX-8 "A"
(abnormal) when it reaches the triage threshold.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException
from hl7apy.factories import datatype_factory
from pydicom import Dataset

from cxr_contract.model import ModelInfo
from cxr_contract.prevalence import decision_digits
from worker.config import Hl7Section, OutputSection
from worker.errors import UnsupportedInput
from worker.outputs.codes import (
    ABSENT,
    CHEST_XR_SINGLE_VIEW,
    NO_OOD_EVIDENCE,
    NOT_EVALUATED,
    OUTSIDE_DISTRIBUTION,
    PNEUMONIA,
    PNEUMONIA_PROBABILITY,
    PRESENT,
    TRAINING_DISTRIBUTION,
)
from worker.outputs.common import OutputUIDs, Trust, check_probability, decision, device_uid

#: Concepts of the ORU that the SR does not carry as codes.
THRESHOLD = ("DECISION-THRESHOLD", "Decision threshold", "99CXR")
ALGORITHM_NAME = ("111001", "Algorithm Name", "DCM")
ALGORITHM_VERSION = ("111003", "Algorithm Version", "DCM")
UNITLESS = ("1", "no units", "UCUM")
#: HL7 table 0485 (Extended Priority Codes).
STAT, ROUTINE = ("S", "Stat", "HL70485"), ("R", "Routine", "HL70485")
AI_NOTE = "AI-generated preliminary result (cxr-gradcam); not for diagnostic use; awaits a radiologist's report"


def control_id(uids: OutputUIDs) -> str:
    """MSH-10: the same for a resend of the same answer (so a RIS can drop the duplicate), 20
    characters (the field's v2.5.1 length)."""
    return hashlib.sha256(uids.sr_instance.encode()).hexdigest()[:20]


def _date(value: object) -> str:
    text = str(value or "").strip()
    return text if text.isdigit() and len(text) in (4, 6, 8) else ""


def build_oru(source: Dataset, probability: float, model: ModelInfo, uids: OutputUIDs, output: OutputSection,
              hl7: Hl7Section, *, trust: Trust | None = None, now: datetime | None = None) -> bytes:
    """An ORU^R01 (v2.5.1) for one answered or withheld image, validated, as ER7 bytes.

    Args:
        source: The image (its header: patient, accession number, study date).
        probability: Model output in [0, 1]; ``model.threshold`` makes the decision.
        model, uids, output: The model, the output UIDs (MSH-10), the output settings (device UID).
        hl7: Application names and the triage threshold.
        trust: Gate of this answer: withheld gives a Not Evaluated finding and no probability.
        now: MSH-7 (now when None).

    Raises:
        UnsupportedInput: the image's values do not fit v2.5.1 (e.g. a Patient ID longer than
            CX.1 allows); the message names the field, never the value.
    """
    trust = trust or Trust()
    check_probability(probability, model.threshold)
    triage = hl7.triage_threshold if hl7.triage_threshold is not None else model.threshold
    urgent = not trust.withheld and probability >= triage
    try:
        msg = Message("ORU_R01", version="2.5.1", validation_level=VALIDATION_LEVEL.STRICT)
        msg.msh.msh_3.hd_1 = hl7.sending_application
        msg.msh.msh_4.hd_1 = hl7.sending_facility
        msg.msh.msh_5.hd_1 = hl7.receiving_application
        msg.msh.msh_6.hd_1 = hl7.receiving_facility
        msg.msh.msh_7 = (now or datetime.now()).strftime("%Y%m%d%H%M%S")
        msg.msh.msh_9 = "ORU^R01^ORU_R01"
        msg.msh.msh_10 = control_id(uids)
        msg.msh.msh_11 = "P"
        msg.msh.msh_12 = "2.5.1"
        result = msg.add_group("ORU_R01_PATIENT_RESULT")
        pid = result.add_group("ORU_R01_PATIENT").pid
        pid.pid_1 = "1"
        pid.pid_3.cx_1 = str(source.get("PatientID") or "")
        issuer = str(source.get("IssuerOfPatientID") or "")
        if issuer:
            pid.pid_3.cx_4.hd_1 = issuer
        name = source.get("PatientName")
        if name:
            pid.pid_5.xpn_1.fn_1 = str(name.family_name)
            if name.given_name:
                pid.pid_5.xpn_2 = str(name.given_name)
        if _date(source.get("PatientBirthDate")):
            pid.pid_7 = _date(source.get("PatientBirthDate"))
        if str(source.get("PatientSex") or "") in ("M", "F", "O"):
            pid.pid_8 = str(source.PatientSex)
        order = result.add_group("ORU_R01_ORDER_OBSERVATION")
        accession = str(source.get("AccessionNumber") or "")
        order.orc.orc_1 = "RE"  # observations to follow
        obr = order.obr
        obr.obr_1 = "1"
        if accession:
            order.orc.orc_3.ei_1 = accession
            obr.obr_3.ei_1 = accession
        obr.obr_4 = "^".join(_code(CHEST_XR_SINGLE_VIEW))
        study = _date(source.get("StudyDate"))
        if study:
            obr.obr_7 = study + _date(str(source.get("StudyTime") or "").split(".")[0])[:6]
        obr.obr_25 = "P"
        note = order.add_segment("NTE")
        note.nte_1 = "1"
        note.nte_3 = AI_NOTE
        order.add_group("ORU_R01_TIMING_QTY").tq1.tq1_9 = "^".join(STAT if urgent else ROUTINE)
        rows: list[tuple[str, tuple[str, str, str], str, tuple[str, str, str] | None, str]] = []
        digits = decision_digits(probability, model.threshold, minimum=4)  # the side of the threshold shows
        if not trust.withheld:
            rows.append(("NM", PNEUMONIA_PROBABILITY_CODE, f"{probability:.{digits}f}", UNITLESS,
                         "A" if urgent else "N"))
        presence = NOT_EVALUATED if trust.withheld else PRESENT if decision(probability, model.threshold) else ABSENT
        rows += [
            ("CWE", _code(PNEUMONIA), "^".join(_code(presence)), None, "A" if urgent else ""),
            ("NM", THRESHOLD, f"{model.threshold:.{digits}f}", UNITLESS, ""),
        ]
        if trust.gate is not None or model.has_ood_gate:
            status = OUTSIDE_DISTRIBUTION if trust.gate is not None else NO_OOD_EVIDENCE
            rows.append(("CWE", _code(TRAINING_DISTRIBUTION), "^".join(_code(status)), None, ""))
        rows += [("ST", ALGORITHM_NAME, model.name, None, ""), ("ST", ALGORITHM_VERSION, model.version, None, "")]
        for i, (kind, concept, value, unit, flag) in enumerate(rows, start=1):
            obx = order.add_group("ORU_R01_OBSERVATION").obx
            obx.obx_1 = str(i)
            obx.obx_2 = kind
            obx.obx_3 = "^".join(concept)
            # OBX-5's type varies with OBX-2, so it is given as ER7; free text escaped by hl7apy's ST.
            obx.obx_5 = datatype_factory("ST", value, version="2.5.1").to_er7() if kind == "ST" else value
            if unit is not None:
                obx.obx_6 = "^".join(unit)
            if flag:
                obx.obx_8 = flag
            obx.obx_11 = "P"
            obx.obx_18 = f"{device_uid(model, output)}^^{device_uid(model, output)}^ISO"
        msg.validate()
        return msg.to_er7().encode()
    except HL7apyException as exc:
        raise UnsupportedInput(f"ORU^R01 does not validate against HL7 v2.5.1: {type(exc).__name__}: "
                               f"{_field_only(exc)}") from None


def _code(code: object) -> tuple[str, str, str]:
    return (str(code.value), str(code.meaning), str(code.scheme_designator))  # type: ignore[attr-defined]


PNEUMONIA_PROBABILITY_CODE = _code(PNEUMONIA_PROBABILITY)


def _field_only(exc: Exception) -> str:
    """hl7apy's messages quote the offending value; keep the words before any quote (no PHI)."""
    text = str(exc)
    for quote in ("'", '"'):
        text = text.split(quote, 1)[0]
    return text.strip() or "invalid value"
