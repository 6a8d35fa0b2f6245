"""What every output object of one answer shares: its UIDs, the trust statement, the decision,
and the source as the builders read it."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import PYDICOM_ROOT_UID, generate_uid
from pydicom.valuerep import DA, TM

from cxr_contract.model import ModelInfo
from worker import __version__
from worker.config import OutputSection
from worker.errors import WorkerError
from worker.input_check import describe
from worker.model import GATE_OOD_SCORE
from worker.outputs.codes import OOD_REASONS

_ORIENTATION = re.compile(r"[APRLHF]{1,3}")

@dataclass(frozen=True)
class OutputUIDs:
    """UIDs of the output series and instances for one source image."""

    sc_series: str
    sc_instance: str
    sr_series: str
    sr_instance: str
    gsps_series: str = ""
    gsps_instance: str = ""


#: Site choices for the output objects: the ``[output]`` section of the config itself.
BuildSettings = OutputSection


@dataclass(frozen=True)
class Trust:
    """How far to trust one answer: what the SC and SR say beside the probability.

    Attributes:
        ood_score: The model's out-of-distribution score (None: a v1 model has none).
        gate: Why the image is outside the training distribution (``GATE_OOD_SCORE``,
            ``input_check.UNIFORM`` or ``CLIPPED``), None when it is not.
        withheld: The gate fired and the site withholds the answer (``model.ood_action``).
        faithfulness: Heatmap faithfulness, a logit drop (None: not computed).
        ood_not_finite: What the model returned instead of a finite ``ood_score`` (``nan``,
            ``inf``), "" when it was finite or absent; such an image is gated.
    """

    ood_score: float | None = None
    gate: str | None = None
    withheld: bool = False
    faithfulness: float | None = None
    ood_not_finite: str = ""

    def __post_init__(self) -> None:
        if self.gate is not None and self.gate not in OOD_REASONS:
            raise WorkerError(f"unknown gate reason. Received: gate={self.gate!r}")
        if self.withheld and self.gate is None:
            raise WorkerError("an answer can only be withheld for a gate reason. Received: gate=None")
        for name in ("ood_score", "faithfulness"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise WorkerError(f"{name} must be finite. Received: {name}={value!r}")

    def gate_line(self, model: ModelInfo) -> str:
        """Why the gate fired, in one line for the SC."""
        if self.gate == GATE_OOD_SCORE and self.ood_not_finite:
            return f"OOD score not finite ({self.ood_not_finite}): the input could not be scored"
        if self.gate == GATE_OOD_SCORE and self.ood_score is not None and model.ood_threshold is not None:
            score, threshold = _distinct(self.ood_score, model.ood_threshold)
            return f"OOD score {score} > threshold {threshold}"
        return describe(self.gate) if self.gate else ""

    def ood_statement(self, model: ModelInfo) -> str:
        """What the gate found, in a sentence for the SR; "" for a model without a gate.

        A passed gate is not called "within the training distribution": the gate bounds how
        often it fires on images like the validation split, not how much unusual input it
        catches, so it says what it saw (no evidence) with the numbers it saw it by.
        """
        if self.gate is None and not model.has_ood_gate:
            return ""
        if self.gate == GATE_OOD_SCORE and self.ood_not_finite:
            return (f"Out-of-distribution score not finite ({self.ood_not_finite}): the input could not be "
                    "scored, so it is treated as outside the model's training distribution")
        if self.gate is not None:
            return f"Out-of-distribution evidence: {self.gate_line(model)}"
        if self.ood_score is None or model.ood_threshold is None:
            return "No out-of-distribution evidence detected (no score)"
        score, threshold = _distinct(self.ood_score, model.ood_threshold)
        return f"No out-of-distribution evidence detected (score {score}, threshold {threshold})"


def _distinct(score: float, threshold: float) -> tuple[str, str]:
    """Score and threshold at 3 significant digits, more where fewer would print a score
    above the threshold as equal to it."""
    for digits in range(3, 10):
        s, t = f"{score:.{digits}g}", f"{threshold:.{digits}g}"
        if (float(s) > float(t)) == (score > threshold):
            return s, t
    return f"{score!r}", f"{threshold!r}"


def decision(probability: float, threshold: float) -> bool:
    """Whether the model calls pneumonia: at or above the threshold is positive."""
    return probability >= threshold


def derived_uid(prefix: str | None, *parts: str) -> str:
    # generate_uid ignores entropy_srcs when prefix is None (random 2.25 UID) and joins
    # the sources without a separator ("ab"+"c" == "a"+"bc"), so supply both ourselves.
    entropy = "\x1f".join(("cxr-gradcam", *parts))
    return str(generate_uid(prefix=prefix or PYDICOM_ROOT_UID, entropy_srcs=[entropy]))


def output_uids(source: Dataset, model_version: str, prefix: str | None = None) -> OutputUIDs:
    """Deterministic output UIDs, so that a resend after a crash is a recognisable duplicate.

    Args:
        source: The image the answer is about.
        model_version: Version of the model; a new version gives new objects.
        prefix: UID root ending in "."; pydicom's root when None.
    """
    series, instance = str(source.SeriesInstanceUID), str(source.SOPInstanceUID)
    return OutputUIDs(
        sc_series=derived_uid(prefix, series, model_version, "sc"),
        sc_instance=derived_uid(prefix, instance, model_version, "sc"),
        sr_series=derived_uid(prefix, series, model_version, "sr"),
        sr_instance=derived_uid(prefix, instance, model_version, "sr"),
        gsps_series=derived_uid(prefix, series, model_version, "gsps"),
        gsps_instance=derived_uid(prefix, instance, model_version, "gsps"),
    )


def device_uid(model: ModelInfo, settings: OutputSection) -> str:
    """The UID of the algorithm as a device: the same for every object one model makes, new
    with each model (name, version and the SHA-256 of its weights), under ``output.uid_prefix``.

    It is the SR's observer Device UID and every object's Contributing Equipment Device UID.
    """
    return derived_uid(settings.uid_prefix, "device", settings.manufacturer, model.name, model.version,
                       model.weights_sha256)


#: DCM 109102: the equipment that processed the source into this object (IHE AIR, PS3.16 CID 7005).
PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")


def contributing_equipment(model: ModelInfo, settings: OutputSection) -> hd.ContributingEquipment:
    """The one item of every object's Contributing Equipment Sequence (see below)."""
    item = hd.ContributingEquipment(
        manufacturer=settings.manufacturer, purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=model.name, software_versions=[model.version, f"cxr-gradcam {__version__}"],
        institution_name=settings.institution_name,
        contribution_description="AI inference: pneumonia probability and Grad-CAM heatmap",
    )
    item.DeviceUID = device_uid(model, settings)  # Type 3 of the item; highdicom has no argument for it
    return item


def add_contributing_equipment(ds: Dataset, model: ModelInfo, settings: OutputSection) -> None:
    """Contributing Equipment Sequence (0018,A001): the algorithm as the processing equipment.

    IHE AIR (Rev 1.3, table 6.5.3.1-1): Manufacturer's Model Name equals the SR's TID 4019
    Algorithm Name, and the first Software Versions value its Algorithm Version; the second
    value is this package's version.
    """
    ds.ContributingEquipmentSequence = [contributing_equipment(model, settings)]


def check_probability(probability: float, threshold: float) -> None:
    for name, value in (("probability", probability), ("threshold", threshold)):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise WorkerError(f"{name} must be in [0, 1]. Received: {name}={value!r}")

def patient_orientation(source: Dataset) -> list[str]:
    """The source's Patient Orientation when well-formed, else [] (Type 2: unknown)."""
    raw = source.get("PatientOrientation") or []
    values = [str(raw)] if isinstance(raw, str) else [str(v) for v in raw]
    ok = len(values) == 2 and all(_ORIENTATION.fullmatch(v) for v in values)
    return values if ok else []


#: Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1) that
#: highdicom copies from the source. De-identified or hand-made images often lack them; the
#: outputs then carry them empty, which is how DICOM says "unknown". Nothing is invented.
PATIENT_STUDY_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
    "ReferringPhysicianName", "StudyID", "StudyDate", "StudyTime",
)



def as_reference(source: Dataset) -> Dataset:
    """The source as the builders read it: every :data:`PATIENT_STUDY_TYPE2` attribute present,
    empty where the source lacks it.

    A new dataset holding the source's own elements, so the source (the stored input) is
    never modified.
    """
    missing = [keyword for keyword in PATIENT_STUDY_TYPE2 if keyword not in source]
    if not missing:
        return source
    reference = Dataset()
    reference.update(source)
    if hasattr(source, "file_meta"):
        reference.file_meta = source.file_meta
    for keyword in missing:
        setattr(reference, keyword, None)  # zero-length value
    return reference


def stamp_dates(ds: Dataset) -> None:
    """Content and Series Date/Time: when this object was made. Series Date/Time are Type 3,
    but PACS and viewers group and sort series by them ("?" without)."""
    now = datetime.now()
    if not ds.get("ContentDate") or not ds.get("ContentTime"):
        ds.ContentDate, ds.ContentTime = DA(now.date()), TM(now.time())
    ds.SeriesDate, ds.SeriesTime = ds.ContentDate, ds.ContentTime

