"""Wrap synthetic phantoms as DICOM CR instances, for the demo and the tests.

The patient is fictional and named as such, so nothing here can be mistaken for a
real study.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid


def cr_dataset(
    pixels: np.ndarray[Any, Any],
    *,
    patient_id: str = "PHANTOM-0001",
    patient_name: str = "Phantom^Synthetic",
    study_uid: str | None = None,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    view: str = "PA",
    body_part: str = "CHEST",
) -> Dataset:
    """A CR Image Storage dataset holding ``pixels`` (uint8 or uint16, 2-D).

    8-bit input is scaled to ``bits_stored`` (16-bit allocation); MONOCHROME1 stores
    the inverted values, so a viewer shows the same picture.
    """
    arr = np.asarray(pixels)
    if arr.ndim != 2:
        raise ValueError(f"pixels must be 2-D. Received: shape={arr.shape}")
    top = (1 << bits_stored) - 1
    if arr.dtype == np.uint8:
        arr = np.rint(arr.astype(np.float64) * top / 255.0).astype(np.uint16)
    arr = arr.astype(np.uint16)
    if photometric == "MONOCHROME1":
        arr = (top - arr).astype(np.uint16)
    now = datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CR", 1, 1
    ds.Manufacturer = "cxr-gradcam synthetic phantom"
    ds.BodyPartExamined, ds.ViewPosition = body_part, view
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.PixelData = arr.tobytes()
    return ds
