"""DICOM codes named once: which C-STORE answers mean stored, which make a resend pointless,
and the audit outcome indicators that land in the trail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pynetdicom.status import STATUS_FAILURE, code_to_category

from worker.audit import AuditTrail
from worker.status import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    SUCCESS,
    AuditOutcome,
    is_permanent,
    stored,
)


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xB006, 0xB007, 0x0107, 0x0116])
def test_success_and_every_warning_mean_stored(status: int) -> None:
    assert stored(status)


@pytest.mark.parametrize("status, permanent", [
    (0xA700, False), (0xA7FF, False), (0x0110, False), (0x0122, True), (0xA900, True), (0xA9FF, True),
    (0xC000, True), (0xCFFF, True),
])
def test_failures_are_not_stored_and_only_some_are_permanent(status: int, permanent: bool) -> None:
    assert not stored(status)
    assert is_permanent(status) is permanent


def test_our_refusals_are_failures_to_the_peer() -> None:
    assert stored(SUCCESS)
    assert code_to_category(OUT_OF_RESOURCES) == code_to_category(CANNOT_UNDERSTAND) == STATUS_FAILURE


def test_audit_outcome_is_written_as_the_ps315_number(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "audit.jsonl", "CXR")
    trail.application(start=True)
    trail.security_alert(("110126", "Node Authentication"), "EVIL", "10.0.0.1", "bad certificate")
    outcomes = [json.loads(line)["EventIdentification"]["EventOutcomeIndicator"]
                for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert outcomes == [0, 4] == [AuditOutcome.SUCCESS, AuditOutcome.MINOR_FAILURE]
    assert all(type(o) is int for o in outcomes)
