"""Which received instances the model is applied to.

Ineligible instances (lateral views, extremities, our own SC/SR coming back, a
presentation state) are acknowledged to the sender and skipped with a reason.
"""

from __future__ import annotations

from pydicom import Dataset
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)

from worker.config import SelectSection

#: The radiograph SOP classes the model is applied to.
RADIOGRAPH_SOP_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)


#: UIDs that the outputs copy or reference: an invalid one would make an invalid SC or SR.
COPIED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


def invalid_uid(ds: Dataset) -> str | None:
    """Which copied UID is not a valid UID (PS3.5 9.1: digits and dots, at most 64), or None.

    The value itself is not quoted: it may hold control characters or a path.
    """
    for keyword in COPIED_UIDS:
        value = ds.get(keyword)
        if value is not None and not UID(str(value)).is_valid:
            return f"{keyword} is not a valid UID ({len(str(value))} characters)"
    return None


def ineligible_reason(ds: Dataset, rules: SelectSection) -> str | None:
    """Why the model is not applied to ``ds``, or None when it is eligible.

    Only header attributes are read; pixel data is not touched here.
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in RADIOGRAPH_SOP_CLASSES:
        return f"SOP class {sop_class or 'missing'} is not CR or DX"
    for_processing = (sop_class == DigitalXRayImageStorageForProcessing
                      or str(ds.get("PresentationIntentType", "")).upper() == "FOR PROCESSING")
    if for_processing and rules.skip_for_processing:
        # Raw detector values, before the vendor's processing: not what the model was trained on.
        return "DX For Processing (raw detector data) is not what the model was trained on"
    modality = str(ds.get("Modality", "")).upper()
    if modality not in {m.upper() for m in rules.modalities}:
        return f"modality {modality or 'missing'} not in {rules.modalities}"
    body_part = str(ds.get("BodyPartExamined", "")).upper()
    if body_part:
        if body_part not in {b.upper() for b in rules.body_parts}:
            return f"body part {body_part} not in {rules.body_parts}"
    elif not rules.allow_missing_body_part:
        return "BodyPartExamined missing"
    view = str(ds.get("ViewPosition", "")).upper()
    if view:
        if view not in {v.upper() for v in rules.view_positions}:
            return f"view position {view} not in {rules.view_positions}"
    elif not rules.allow_missing_view_position:
        return "ViewPosition missing"
    image_type = {str(v).upper() for v in ds.get("ImageType", [])}
    excluded = image_type & {t.upper() for t in rules.excluded_image_types}
    if excluded:
        return f"image type {'/'.join(sorted(excluded))} excluded"
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if min(rows, cols) < rules.min_size:
        return f"{rows}x{cols} is smaller than the minimum {rules.min_size} px"
    if rules.min_patient_age is not None:
        age = patient_age_years(ds.get("PatientAge"))
        if age is not None and age < rules.min_patient_age:
            # The reason goes to the log and the audit trail: the rule, never the patient's age.
            return f"patient age below select.min_patient_age {rules.min_patient_age:g}"
    return None


#: Days in each unit of an Age String (PS3.5 6.2, AS: nnnD, nnnW, nnnM or nnnY).
_AGE_UNIT_DAYS = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}


def patient_age_years(value: object) -> float | None:
    """An Age String (``045Y``, ``006M``) in years; None when absent or malformed."""
    text = str(value or "").strip().upper()
    if len(text) != 4 or not text[:3].isdigit() or text[3] not in _AGE_UNIT_DAYS:
        return None
    return int(text[:3]) * _AGE_UNIT_DAYS[text[3]] / 365.25
