"""The Grad-CAM Secondary Capture: one builder, as :mod:`highdicom.sc`."""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom import Dataset
from pydicom.encaps import encapsulate
from pydicom.sr.codedict import codes
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, JPEGBaseline8Bit

from cxr_contract.model import ModelInfo
from worker.errors import UnsupportedInput, WorkerError
from worker.outputs.common import (
    BuildSettings,
    OutputUIDs,
    Trust,
    add_contributing_equipment,
    as_reference,
    patient_orientation,
    stamp_dates,
)


def _pixel_spacing(source: Dataset) -> tuple[float, float] | None:
    """Pixel Spacing, else Imager Pixel Spacing, only when both values are positive.

    Uncalibrated projection radiographs carry the detector-plane spacing (PS3.3 10.7.1);
    zeros (as in some CR) mean "unknown" and must not be passed on as a size.
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            row, col = (float(v) for v in source.get(keyword))
        except (TypeError, ValueError):
            continue
        if row > 0 and col > 0 and math.isfinite(row + col):
            return row, col
    return None


#: PS3.3 C.7.6.1.1.5, Lossy Image Compression Method.
LOSSY_METHOD = {"jpeg": "ISO_10918_1", "jpeg2000": "ISO_15444_1"}

def _values(ds: Dataset, keyword: str) -> list[str]:
    raw = ds.get(keyword)
    if raw is None or raw == "":
        return []
    return [str(v) for v in raw] if not isinstance(raw, str | float | int) else [str(raw)]



def _compress(sc: Dataset, rgb: np.ndarray[Any, Any], source: Dataset, compression: str, quality: int) -> None:
    """Encode the SC's pixels in place and say so in the Lossy Image Compression attributes.

    JPEG Baseline with 4:2:2 chroma subsampling, which is what YBR_FULL_422 declares
    (PS3.5 8.2.1; Pillow's default is 4:2:0). JPEG 2000 with the irreversible colour transform
    (YBR_ICT, PS3.5 8.2.4), aiming at ``quality / 2`` dB PSNR.
    """
    if compression == "none":
        return
    if compression == "jpeg":
        buffer = io.BytesIO()
        Image.fromarray(rgb, "RGB").save(buffer, format="JPEG", quality=quality, subsampling=1)
        frame = buffer.getvalue()
        sc.PixelData = encapsulate([frame])
        sc["PixelData"].VR = "OB"
        sc.PhotometricInterpretation = "YBR_FULL_422"
        sc.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        size = len(frame)
    elif compression == "jpeg2000":
        sc.PhotometricInterpretation = "YBR_ICT"
        sc.compress(JPEG2000, rgb, encoding_plugin="pylibjpeg", j2k_psnr=[quality / 2])
        size = len(sc.PixelData)
    else:
        raise WorkerError(f"unknown SC compression. Received: sc_compression={compression!r}")
    # Lossy once, lossy for every derivative: the source's own lossy steps come first (C.7.6.1.1.5).
    ratios, methods = [], []
    if source.get("LossyImageCompression") == "01":
        ratios, methods = _values(source, "LossyImageCompressionRatio"), _values(source, "LossyImageCompressionMethod")
        if len(ratios) != len(methods):
            ratios, methods = [], []
    sc.LossyImageCompression = "01"
    sc.LossyImageCompressionRatio = [*ratios, f"{rgb.nbytes / size:.2f}"]
    sc.LossyImageCompressionMethod = [*methods, LOSSY_METHOD[compression]]


def build_secondary_capture(
    source: Dataset, rgb: np.ndarray[Any, Any], uids: OutputUIDs, model: ModelInfo,
    settings: BuildSettings, *, trust: Trust | None = None,
) -> hd.sc.SCImage:
    """The overlay as an RGB Secondary Capture in the source's study, referencing the source.

    Compressed as ``settings.sc_compression`` says (JPEG Baseline by default); patient and
    study attributes the source lacks are sent empty (:func:`as_reference`).

    Args:
        source: The image the overlay was computed on.
        rgb: Output of :func:`render_heatmap_overlay` (or :func:`render_withheld` when
            ``trust.withheld``), uint8 [Rows, Columns, 3].
        uids, model, settings: Output UIDs, the model that made the map, site choices.
        trust: Gate and faithfulness of this answer; its derivation is described.
    """
    rows, cols = int(source.Rows), int(source.Columns)
    # The overlay may be the source shrunk to a bounded size (decode.fit_dimension): the
    # same aspect to the rounding of a pixel per side; the pixel spacing grows to match.
    height, width = (rgb.shape[0], rgb.shape[1]) if rgb.ndim == 3 else (0, 0)
    shrunk = 0 < max(height, width) < max(rows, cols) and abs(rows * width - cols * height) <= max(rows, cols)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or not ((height, width) == (rows, cols) or shrunk):
        raise UnsupportedInput(
            f"overlay must be uint8 [{rows}, {cols}, 3] like the source, or that shrunk. "
            f"Received: dtype={rgb.dtype}, shape={rgb.shape}"
        )
    spacing = _pixel_spacing(source)
    if spacing is not None and shrunk:
        spacing = (spacing[0] * rows / height, spacing[1] * cols / width)
    orientation = patient_orientation(source)
    laterality = str(source.get("Laterality") or "")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=as_reference(source), pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", transfer_syntax_uid=ExplicitVRLittleEndian,
        series_instance_uid=uids.sc_series, series_number=settings.sc_series_number,
        sop_instance_uid=uids.sc_instance, instance_number=1, manufacturer=settings.manufacturer,
        series_description=settings.sc_series_description,
        institution_name=settings.institution_name,
        pixel_spacing=spacing,  # type: ignore[arg-type]  # hd hints int
        laterality=laterality if laterality in ("R", "L") else None,
        # highdicom requires a value and knows single letters only; the real value
        # (possibly compound, or empty when unknown) is written back below.
        patient_orientation=("L", "F"),
    )
    sc.PatientOrientation = orientation
    if "BodyPartExamined" in source:
        sc.BodyPartExamined = source.BodyPartExamined
    # A de-identified source stays labelled so in what is derived from it (PS3.3 C.7.1.1).
    for keyword in ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence"):
        if keyword in source and keyword not in sc:
            sc[keyword] = copy.deepcopy(source[keyword])
    if source.get("ImageLaterality") in ("R", "L", "U", "B"):
        sc.ImageLaterality = source.ImageLaterality
    # Laterality is Type 2C (PS3.3 C.7.3.1): a value for a paired body part, absent for an
    # unpaired one such as the chest. When neither the side nor a chest is known, send it
    # empty, which the standard reserves for "unknown" (dciodvfy: a warning, not an error).
    chest = str(source.get("BodyPartExamined", "")).upper() == "CHEST"
    if "Laterality" not in sc and "ImageLaterality" not in sc and not chest:
        sc.Laterality = ""
    if source.get("LossyImageCompression") == "01":  # lossy once, lossy for every derivative
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in source:
                sc[keyword] = source[keyword]
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    if trust is not None and trust.withheld:
        sc.DerivationDescription = (
            f"Source image without a result: outside the training distribution of {model.name} "
            f"{model.version} ({trust.gate_line(model)}); no heatmap. AI-generated, not for diagnostic use."
        )
    else:
        sc.DerivationDescription = (
            f"Grad-CAM heatmap of {model.name} {model.version} (pneumonia) blended over the source "
            "image; probability and decision burned in. AI-generated, not for diagnostic use."
        )
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    purpose = codes.DCM.SourceImageForImageProcessingOperation
    reference.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(purpose)]
    sc.SourceImageSequence = [reference]
    sc.SecondaryCaptureDeviceManufacturer = settings.manufacturer
    sc.SecondaryCaptureDeviceManufacturerModelName = model.name
    sc.SecondaryCaptureDeviceSoftwareVersions = model.version
    add_contributing_equipment(sc, model, settings)
    stamp_dates(sc)
    _compress(sc, np.ascontiguousarray(rgb), source, settings.sc_compression, settings.sc_quality)
    return sc

