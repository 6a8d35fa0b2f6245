"""Sources and models for the output builders' tests (tests/unit/worker/outputs/test_sc.py, test_sr.py,
test_outputs.py, tests/integration/test_outputs_e2e.py): a real CR, a small synthetic one, a Grad-CAM map."""

from __future__ import annotations

from typing import Any

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

from cxr_contract.model import ModelInfo

MODEL = ModelInfo(
    name="test-model", version="1.2.3", input_size=64, threshold=0.5, weights_sha256="ab" * 32
)
MODEL_V2 = ModelInfo(
    name="test-model", version="2.0.0", input_size=64, threshold=0.5, weights_sha256="cd" * 32,
    contract_version=2, ood_threshold=10.0, heatmap_scale=4.0, faithfulness_cutoff=1.25,
)
#: Type 3 attributes of the Patient, Patient Study and General Study modules a
#: de-identification pass removes (PS3.15 E.1), beside PATIENT_STUDY_TYPE2.
PATIENT_STUDY_TYPE3 = (
    "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "PatientBirthTime", "EthnicGroup",
    "PatientComments", "IssuerOfPatientID", "PatientAge", "PatientSize", "PatientWeight", "Occupation",
    "AdditionalPatientHistory", "MedicalAlerts", "Allergies", "StudyDescription", "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy", "ReferencedStudySequence", "ProcedureCodeSequence", "InstitutionName",
    "InstitutionalDepartmentName", "StationName", "ImageComments",
)


def real_cr() -> Dataset:
    """RG1_UNCR: a real CR chest PA, MONOCHROME1, 15 bits, Pixel Spacing 0\\0."""
    return pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))


def synthetic_cr() -> Dataset:
    """A 64 x 64 MONOCHROME2 CR with only Imager Pixel Spacing, no orientation, no body part."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Synthetic^Chest"
    ds.PatientID = "SYN-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate, ds.StudyTime = "20240102", "101500"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "ACC1", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CR", 1, 1
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    y, x = np.mgrid[0:64, 0:64]
    ds.PixelData = ((x + y) * 32).astype(np.uint16).tobytes()
    return ds


def hot_gradcam() -> np.ndarray[Any, Any]:
    """An 8 x 8 map that is hot only in the bottom-right quadrant, away from the burn-in."""
    cam = np.zeros((8, 8), np.float32)
    cam[4:, 4:] = 4.0
    return cam


def de_identified(source: Dataset) -> Dataset:
    """``source`` as a de-identification pass leaves it: without any Type 2 or Type 3 patient and
    study attribute, and saying so (Patient Identity Removed, with its method)."""
    from worker.outputs import PATIENT_STUDY_TYPE2

    for keyword in (*PATIENT_STUDY_TYPE2, *PATIENT_STUDY_TYPE3):
        if keyword in source:
            del source[keyword]
    source.PatientIdentityRemoved, source.DeidentificationMethod = "YES", "PS3.15 E.1 Basic Profile"
    return source
