"""Audit trail: one JSON object per line, modelled on DICOM PS3.15 A.5 audit messages.

Events: DICOM Instances Transferred (received / sent), Security Alert (rejected
associations, TLS failures), Application Activity (start / stop). Participant
objects carry UIDs only; no patient name, ID or birth date is ever written.

As PS3.15 A.5.3.2 requires, the participant object of a transfer is the study:
ParticipantObjectIDTypeCode (110180, DCM, "Study Instance UID"), ParticipantObjectID the
Study Instance UID, and the SOP Class and SOP Instance UIDs in its
ParticipantObjectDescription. DCMR has no ID type code for a SOP Instance UID (110181 is
"SOP Class UID").
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from worker.status import AuditOutcome

# PS3.15 A.5.3 / DCM codes: (code, meaning)
INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
INSTANCES_ACCESSED = ("110103", "DICOM Instances Accessed")
SECURITY_ALERT = ("110113", "Security Alert")
APPLICATION_ACTIVITY = ("110100", "Application Activity")
APPLICATION_START = ("110120", "Application Start")
APPLICATION_STOP = ("110121", "Application Stop")
NODE_AUTHENTICATION = ("110126", "Node Authentication")
NETWORK_ENTRY = ("110108", "Network Entry")  # A-ASSOCIATE refused
USER_AUTHENTICATION = ("110114", "User Authentication")  # the dashboard's logins (PS3.15 A.5.3.11)
LOGIN = ("110122", "Login")
LOGOUT = ("110123", "Logout")
QUERY = ("110112", "Query")  # the dashboard's worklist views and searches (PS3.15 A.5.3.10)

STUDY_INSTANCE_UID = ("110180", "Study Instance UID")


def study_object(study_uid: str, sop_class: str, sop_instance: str) -> dict[str, Any]:
    """The Participant Object of a transfer (PS3.15 A.5.3.2): the study, its instance inside."""
    return {
        "ParticipantObjectTypeCode": 2,  # system object
        "ParticipantObjectTypeCodeRole": 3,  # report
        "ParticipantObjectIDTypeCode": {"code": STUDY_INSTANCE_UID[0], "scheme": "DCM",
                                        "meaning": STUDY_INSTANCE_UID[1]},
        "ParticipantObjectID": study_uid,
        "ParticipantObjectDescription": {"SOPClass": [{"UID": sop_class, "NumberOfInstances": 1,
                                                       "Instance": [{"UID": sop_instance}]}]},
    }


def study_uid_of(path: Path) -> str:
    """The Study Instance UID in a received file's header, "" when it cannot be read cheaply.

    A deflated data set is not inflated here (that is the processing stage's job, under
    its limits); its study stays unnamed in the receive record.
    """
    from pydicom import dcmread
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    try:
        meta = dcmread(path, stop_before_pixels=True, specific_tags=["TransferSyntaxUID"])
        if meta.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            return ""
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"], defer_size=1024)
        return str(ds.get("StudyInstanceUID", ""))
    except Exception:  # a receive record must be written whatever the file holds
        return ""


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
        self._write(APPLICATION_ACTIVITY, "E", AuditOutcome.SUCCESS,
                    [{"UserID": self.source["AuditSourceID"], "UserIsRequestor": False}],
                    type_code=APPLICATION_START if start else APPLICATION_STOP)

    def instance_received(self, sop_class: str, sop_instance: str, calling_ae: str, address: str,
                          called_ae: str, outcome: int, detail: str = "", study_uid: str = "") -> None:
        self._write(INSTANCES_TRANSFERRED, "C", outcome,
                    [self._node(calling_ae, address, True), self._node(called_ae, "local", False)],
                    [study_object(study_uid, sop_class, sop_instance)], detail=detail)

    def instance_sent(self, sop_class: str, sop_instance: str, study_uid: str, destination: str,
                      calling_ae: str, outcome: int, detail: str = "") -> None:
        self._write(INSTANCES_TRANSFERRED, "R", outcome,
                    [self._node(calling_ae, "local", True), self._node(destination, destination, False)],
                    [study_object(study_uid, sop_class, sop_instance)], detail=detail)

    def instance_gated(self, sop_class: str, sop_instance: str, study_uid: str, reason: str,
                       withheld: bool) -> None:
        """The model read an instance outside its training distribution (minor failure)."""
        self._write(INSTANCES_ACCESSED, "R", AuditOutcome.MINOR_FAILURE,
                    [{"UserID": self.source["AuditSourceID"], "UserIsRequestor": True}],
                    [study_object(study_uid, sop_class, sop_instance)],
                    detail=f"outside the model's training distribution ({reason}); "
                           f"{'answer withheld' if withheld else 'answer flagged'}")

    def security_alert(self, kind: tuple[str, str], ae: str, address: str, detail: str) -> None:
        self._write(SECURITY_ALERT, "E", AuditOutcome.MINOR_FAILURE, [self._node(ae, address, True)], type_code=kind,
                    detail=detail)

    # -- the dashboard (worker.dashboard): people, not nodes --------------------------------
    def user_authentication(self, user: str, address: str, login: bool, success: bool, detail: str = "") -> None:
        """A reader logged in or out, or failed to (PS3.15 A.5.3.11 User Authentication)."""
        self._write(USER_AUTHENTICATION, "E", AuditOutcome.SUCCESS if success else AuditOutcome.MINOR_FAILURE,
                    [{"UserID": user, "NetworkAccessPointID": address, "UserIsRequestor": True},
                     {"UserID": self.source["AuditSourceID"], "UserIsRequestor": False}],
                    type_code=LOGIN if login else LOGOUT, detail=detail)

    def query(self, user: str, address: str, query: dict[str, Any], detail: str = "") -> None:
        """A reader listed or searched results (PS3.15 A.5.3.10 Query). ``query`` must hold no PHI:
        the caller replaces a search term by a keyed digest."""
        text = json.dumps(query, sort_keys=True, ensure_ascii=True)
        self._write(QUERY, "E", AuditOutcome.SUCCESS,
                    [{"UserID": user, "NetworkAccessPointID": address, "UserIsRequestor": True},
                     {"UserID": self.source["AuditSourceID"], "UserIsRequestor": False}],
                    [{"ParticipantObjectTypeCode": 2, "ParticipantObjectTypeCodeRole": 3,
                      "ParticipantObjectIDTypeCode": {"code": "worklist", "scheme": "cxr-gradcam",
                                                      "meaning": "dashboard worklist"},
                      "ParticipantObjectID": "worklist",
                      "ParticipantObjectQuery": base64.b64encode(text.encode()).decode("ascii")}],
                    detail=detail)

    def instances_viewed(self, user: str, address: str, study_uid: str, sop_class: str, sop_instance: str,
                         action: str = "R", detail: str = "") -> None:
        """A reader opened a result (action R) or recorded feedback on it (action U)
        (PS3.15 A.5.3.2 DICOM Instances Accessed)."""
        self._write(INSTANCES_ACCESSED, action, AuditOutcome.SUCCESS,
                    [{"UserID": user, "NetworkAccessPointID": address, "UserIsRequestor": True}],
                    [study_object(study_uid, sop_class, sop_instance)], detail=detail)


class Repeats:
    """Which of a key's repeated events to write: the 1st, 10th, 100th, 1,000th... of each window.

    A client refused again and again (wrong passwords, a script) writes a handful of records
    an hour, each with its count, instead of one each: the audit file is shared with the
    worker and must not fill its disk. At most ``max_keys`` keys are remembered.
    """

    def __init__(self, window_s: float = 3600.0, max_keys: int = 10_000) -> None:
        self.window_s, self.max_keys = window_s, max_keys
        self._seen: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._lock = threading.Lock()

    def note(self, key: str) -> int | None:
        """Count one event of ``key``; its number in the window when it is to be written, else None."""
        now = time.monotonic()
        with self._lock:
            start, count = self._seen.pop(key, (now, 0))
            if now - start > self.window_s:
                start, count = now, 0
            count += 1
            self._seen[key] = (start, count)
            while len(self._seen) > self.max_keys:
                self._seen.popitem(last=False)
        return count if count == 10 ** (len(str(count)) - 1) else None
