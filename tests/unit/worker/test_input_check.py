"""What the worker refuses before the model: DX For Processing images, and images whose
histogram shows there is nothing to read (worker.input_check)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import DigitalXRayImageStorageForPresentation, DigitalXRayImageStorageForProcessing

from trainer.dicom_phantoms import cr_dataset
from trainer.phantoms import make_phantom
from worker.config import Settings
from worker.decode import dataset_to_unit_image
from worker.input_check import CLIPPED, UNIFORM, clipped_fraction, dominant_bin_fraction, input_problem
from worker.selection import ineligible_reason


def dx(for_processing: bool) -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    ds.Modality = "DX"
    ds.SOPClassUID = DigitalXRayImageStorageForProcessing if for_processing else DigitalXRayImageStorageForPresentation
    ds.PresentationIntentType = "FOR PROCESSING" if for_processing else "FOR PRESENTATION"
    return ds


def test_dx_for_processing_is_skipped_unless_configured() -> None:
    rules = Settings().select
    assert rules.skip_for_processing
    assert "For Processing" in str(ineligible_reason(dx(True), rules))
    assert ineligible_reason(dx(False), rules) is None
    # A For Presentation SOP class that still says FOR PROCESSING is raw data, too.
    odd = dx(False)
    odd.PresentationIntentType = "FOR PROCESSING"
    assert "For Processing" in str(ineligible_reason(odd, rules))
    allowed = Settings(select={"skip_for_processing": False}).select
    assert ineligible_reason(dx(True), allowed) is None


def test_min_patient_age_skips_younger_patients_with_the_reason() -> None:
    ds = dx(False)
    assert ineligible_reason(ds, Settings().select) is None  # off by default
    rules = Settings(select={"min_patient_age": 18}).select
    for age, skipped in (("006M", True), ("017Y", True), ("018Y", False), ("052Y", False), ("", False),
                         ("garbage", False)):
        with pydicom.config.disable_value_validation():  # a malformed age, as a sender may write one
            ds.PatientAge = age
        reason = ineligible_reason(ds, rules)
        assert (reason is not None) == skipped, (age, reason)
    ds.PatientAge = "010W"
    assert ineligible_reason(ds, rules) == "patient age below select.min_patient_age 18"  # never the age itself


@pytest.mark.parametrize("seed", range(6))
def test_phantoms_pass_the_input_checks(seed: int) -> None:
    image, _ = make_phantom(np.random.default_rng(seed), 256, bool(seed % 2))
    unit = dataset_to_unit_image(cr_dataset(image))
    assert input_problem(unit) is None, (dominant_bin_fraction(unit), clipped_fraction(unit))


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG3_UNCR.dcm"])
def test_real_radiographs_pass_the_input_checks(name: str) -> None:
    # Real radiographs (a chest, and a hand the model must still gate by its own score).
    unit = dataset_to_unit_image(pydicom.dcmread(get_testdata_file(name)))
    assert input_problem(unit) is None, (dominant_bin_fraction(unit), clipped_fraction(unit))


def test_a_constant_or_blank_image_is_uniform() -> None:
    assert input_problem(dataset_to_unit_image(cr_dataset(np.full((256, 256), 90, np.uint8)))) == UNIFORM
    blank = np.full((256, 256), 0.3, np.float32)
    blank[:10, :40] = 1.0  # a burnt-in label on an unexposed plate
    assert input_problem(blank) == UNIFORM


def test_an_image_mostly_at_black_or_white_is_clipped() -> None:
    rng = np.random.default_rng(1)
    unit = rng.random((256, 256)).astype(np.float32)
    unit[:, :80] = 0.0
    unit[:, 176:] = 1.0  # 62 % of the pixels at the limits: a burnt-out exposure
    assert input_problem(unit) == CLIPPED
    unit[:, 60:80] = rng.random((256, 20))  # 55 %: still more than half
    assert clipped_fraction(unit) > 0.5 and input_problem(unit) == CLIPPED
    unit[:, :80] = rng.random((256, 80))  # only the right third at white: a readable image
    assert input_problem(unit) is None
