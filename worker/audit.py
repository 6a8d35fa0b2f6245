"""Audit trail: one JSON object per line, modelled on DICOM PS3.15 A.5 audit messages.

Events: DICOM Instances Transferred (received / sent), Security Alert (rejected
associations, TLS failures), Application Activity (start / stop). Participant
objects carry UIDs only; no patient name, ID or birth date is ever written.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# PS3.15 A.5.3 / DCM codes: (code, meaning)
INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
INSTANCES_ACCESSED = ("110103", "DICOM Instances Accessed")
SECURITY_ALERT = ("110113", "Security Alert")
APPLICATION_ACTIVITY = ("110100", "Application Activity")
APPLICATION_START = ("110120", "Application Start")
APPLICATION_STOP = ("110121", "Application Stop")
NODE_AUTHENTICATION = ("110126", "Node Authentication")
NETWORK_ENTRY = ("110108", "Network Entry")  # A-ASSOCIATE refused

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = 0, 4, 8


class AuditTrail:
    """Append-only JSON-lines audit file, safe to call from any thread."""

    def __init__(self, path: Path, source_ae: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.source = {"AuditSourceID": f"{source_ae}@{socket.gethostname()}"}
        self._lock = threading.Lock()

    def _write(self, event: tuple[str, str], action: str, outcome: int, participants: list[dict[str, Any]],
               objects: list[dict[str, Any]] | None = None, type_code: tuple[str, str] | None = None,
               detail: str = "") -> None:
        record: dict[str, Any] = {
            "EventIdentification": {
                "EventID": {"code": event[0], "scheme": "DCM", "meaning": event[1]},
                "EventActionCode": action,
                "EventDateTime": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "EventOutcomeIndicator": outcome,
            },
            "ActiveParticipant": participants,
            "AuditSourceIdentification": self.source,
        }
        if type_code:
            record["EventIdentification"]["EventTypeCode"] = {"code": type_code[0], "scheme": "DCM",
                                                              "meaning": type_code[1]}
        if detail:
            record["EventIdentification"]["EventOutcomeDescription"] = detail
        if objects:
            record["ParticipantObjectIdentification"] = objects
        line = json.dumps(record) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def _node(ae: str, address: str, requestor: bool) -> dict[str, Any]:
        return {"UserID": ae, "NetworkAccessPointID": address, "UserIsRequestor": requestor}

    def application(self, start: bool) -> None:
        self._write(APPLICATION_ACTIVITY, "E", SUCCESS,
                    [{"UserID": self.source["AuditSourceID"], "UserIsRequestor": False}],
                    type_code=APPLICATION_START if start else APPLICATION_STOP)

    def instance_received(self, sop_class: str, sop_instance: str, calling_ae: str, address: str,
                          called_ae: str, outcome: int, detail: str = "") -> None:
        self._write(INSTANCES_TRANSFERRED, "C", outcome,
                    [self._node(calling_ae, address, True), self._node(called_ae, "local", False)],
                    [{"ParticipantObjectTypeCode": 2, "ParticipantObjectIDTypeCode": "110180",
                      "SOPClass": sop_class, "SOPInstanceUID": sop_instance}], detail=detail)

    def instance_sent(self, sop_instance: str, destination: str, calling_ae: str, outcome: int,
                      detail: str = "") -> None:
        self._write(INSTANCES_TRANSFERRED, "R", outcome,
                    [self._node(calling_ae, "local", True), self._node(destination, destination, False)],
                    [{"ParticipantObjectTypeCode": 2, "ParticipantObjectIDTypeCode": "110180",
                      "SOPInstanceUID": sop_instance}], detail=detail)

    def instance_gated(self, sop_instance: str, reason: str, withheld: bool) -> None:
        """The model read an instance outside its training distribution (minor failure)."""
        self._write(INSTANCES_ACCESSED, "R", MINOR_FAILURE,
                    [{"UserID": self.source["AuditSourceID"], "UserIsRequestor": True}],
                    [{"ParticipantObjectTypeCode": 2, "ParticipantObjectIDTypeCode": "110180",
                      "SOPInstanceUID": sop_instance}],
                    detail=f"outside the model's training distribution ({reason}); "
                           f"{'answer withheld' if withheld else 'answer flagged'}")

    def security_alert(self, kind: tuple[str, str], ae: str, address: str, detail: str) -> None:
        self._write(SECURITY_ALERT, "E", MINOR_FAILURE, [self._node(ae, address, True)], type_code=kind,
                    detail=detail)
