"""What the SC and SR share: dciodvfy-clean objects, deterministic UIDs, the decision and
the trust statement they carry."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import UID

from tests.dicom_outputs import real_cr
from tests.helpers import dciodvfy_errors
from worker.errors import WorkerError
from worker.outputs import (
    Trust,
    decision,
    output_uids,
)

# RG1's Referring Physician "ward" is a one-component name; highdicom says so on every build.
pytestmark = pytest.mark.filterwarnings("ignore:The string \"ward\":UserWarning")


@pytest.mark.tool
@pytest.mark.parametrize("which", ["sc", "sr"])
def test_dciodvfy_reports_no_errors(built: tuple[Dataset, float, Path, Path], which: str) -> None:
    _, _, sc_path, sr_path = built
    path = sc_path if which == "sc" else sr_path
    assert dciodvfy_errors(path) == []


def test_output_uids_are_deterministic_and_valid() -> None:
    source = real_cr()
    first, again = output_uids(source, "1.2.3"), output_uids(real_cr(), "1.2.3")
    other = output_uids(source, "1.2.4")
    assert first == again
    values = list(vars(first).values())
    assert len(set(values)) == 6  # SC, SR and GSPS series and instances
    assert not set(values) & set(vars(other).values())
    for uid in [*values, *vars(output_uids(source, "1.2.3", prefix="1.2.826.0.1.99.")).values()]:
        assert len(uid) <= 64 and UID(uid).is_valid, uid
    assert output_uids(source, "1.2.3", prefix="1.2.826.0.1.99.").sc_series.startswith(
        "1.2.826.0.1.99."
    )


def test_decision_is_at_or_above_threshold() -> None:
    assert decision(0.5, 0.5) and decision(0.9, 0.5)
    assert not decision(0.4999, 0.5)


def test_trust_refuses_what_cannot_be_reported() -> None:
    with pytest.raises(WorkerError, match="withheld"):
        Trust(withheld=True)
    with pytest.raises(WorkerError, match="gate='why'"):
        Trust(gate="why")
    with pytest.raises(WorkerError, match="faithfulness=nan"):
        Trust(faithfulness=float("nan"))
