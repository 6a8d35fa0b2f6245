"""Audit records name the study as PS3.15 A.5.3.2 requires, with the instance inside it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydicom.uid import DeflatedExplicitVRLittleEndian

from trainer.dicom_phantoms import cr_dataset
from worker.audit import AuditTrail, study_uid_of


def test_transfer_records_identify_the_study_and_describe_the_instance(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "audit.jsonl", "CXR")
    trail.instance_received("1.2.840.10008.5.1.4.1.1.1", "1.2.3.4", "HOSPITAL", "127.0.0.1", "CXR", 0,
                            study_uid="1.2.3")
    trail.instance_sent("1.2.840.10008.5.1.4.1.1.7", "1.2.3.5", "1.2.3", "PACS@h:104", "CXR", 0)
    for line, sop_class, instance in zip((tmp_path / "audit.jsonl").read_text().splitlines(),
                                         ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.7"),
                                         ("1.2.3.4", "1.2.3.5"), strict=True):
        [obj] = json.loads(line)["ParticipantObjectIdentification"]
        assert obj["ParticipantObjectIDTypeCode"] == {"code": "110180", "scheme": "DCM",
                                                      "meaning": "Study Instance UID"}
        assert obj["ParticipantObjectID"] == "1.2.3"
        assert (obj["ParticipantObjectTypeCode"], obj["ParticipantObjectTypeCodeRole"]) == (2, 3)
        assert obj["ParticipantObjectDescription"]["SOPClass"] == [
            {"UID": sop_class, "NumberOfInstances": 1, "Instance": [{"UID": instance}]}]


def test_the_study_is_read_from_the_header_but_a_deflated_file_is_not_inflated(tmp_path: Path) -> None:
    ds = cr_dataset(np.zeros((8, 8), np.uint8), study_uid="1.2.826.0.1.3680043.2.1")
    ds.save_as(tmp_path / "plain.dcm", enforce_file_format=True)
    assert study_uid_of(tmp_path / "plain.dcm") == "1.2.826.0.1.3680043.2.1"
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    assert study_uid_of(tmp_path / "deflated.dcm") == ""
    (tmp_path / "junk").write_bytes(b"junk")
    assert study_uid_of(tmp_path / "junk") == ""
