"""DICOM codes the worker answers with or records, named once.

DIMSE statuses: PS3.7 Annex C (general) and PS3.4 B.2.3 (Storage). Whether a peer's
status means "stored" comes from pynetdicom's own categories; which failures make a
resend pointless is our rule, written down here. Audit outcomes: PS3.15 A.5.3
(EventOutcomeIndicator).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

# What our C-STORE SCP answers (PS3.4 B.2.3) and a C-ECHO returns (PS3.7 9.3.5).
SUCCESS: Final = 0x0000
#: Refused: Out of Resources (A7xx): the spool is below its reserve or cannot be written.
OUT_OF_RESOURCES: Final = 0xA700
#: Error: Cannot understand (Cxxx): the data set is too large or could not be read.
CANNOT_UNDERSTAND: Final = 0xC000

# What a PACS may answer our C-STORE with, after which a resend cannot succeed.
#: Refused: SOP Class not supported (PS3.7 C.5.20).
SOP_CLASS_NOT_SUPPORTED: Final = 0x0122
#: Error: Data Set does not match SOP Class (A9xx).
DATA_SET_DOES_NOT_MATCH: Final = 0xA900
#: A-ASSOCIATE-RJ result (PS3.8 9.3.4): 1 rejected-permanent, 2 rejected-transient.
REJECTED_PERMANENT: Final = 0x01


def stored(status: int) -> bool:
    """Whether a C-STORE response means the peer kept the instance.

    Success and every Warning (PS3.4 B.2.3: B000 coercion of data elements, B007 data set
    does not match SOP class, B006 elements discarded, and the general warnings) do.
    """
    return code_to_category(status) in (STATUS_SUCCESS, STATUS_WARNING)


def is_permanent(status: int) -> bool:
    """Whether a failed C-STORE would fail again when resent (A9xx, Cxxx, 0122).

    Other failures (A7xx out of resources, 0110 processing failure) may pass later.
    """
    return (status == SOP_CLASS_NOT_SUPPORTED or (status & 0xFF00) == DATA_SET_DOES_NOT_MATCH
            or (status & 0xF000) == CANNOT_UNDERSTAND)


class AuditOutcome(IntEnum):
    """EventOutcomeIndicator of an audit message (PS3.15 A.5.3, RFC 3881)."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12
