"""Pixel steps from a stored image to the model's input tensor.

Every step is a pure function ``(arr, ds) -> arr`` or ``arr -> arr``, as in
:mod:`pydicom.pixels.processing`. The last steps (:func:`~cxr_contract.pixels.to_unit_range`,
:func:`~cxr_contract.pixels.resize_for_model`) are shared with the trainer's PNG path, so a
PNG through the trainer and a DICOM through the worker give the same tensor.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.uid import UID

from cxr_contract.pixels import resize_for_model, to_unit_range
from worker.errors import DecodeError, UnsupportedInput

SUPPORTED_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")


def check_pixel_module(ds: Dataset, *, max_pixels: int) -> None:
    """Reject, before decoding, images the model cannot be applied to.

    Checks the Image Pixel Module (PS3.3 C.7.6.3) attributes so that nothing
    large or odd is decoded at all.
    """
    if "PixelData" not in ds:
        raise UnsupportedInput("no Pixel Data (7FE0,0010)")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in SUPPORTED_PHOTOMETRIC:
        raise UnsupportedInput(
            f"PhotometricInterpretation {photometric!r} is not grayscale "
            f"(expected one of {', '.join(SUPPORTED_PHOTOMETRIC)})"
        )
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise UnsupportedInput(f"SamplesPerPixel {ds.SamplesPerPixel} is not 1")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise UnsupportedInput(f"multi-frame image ({frames} frames)")
    bits_allocated = ds.get("BitsAllocated")
    if bits_allocated not in (8, 16):
        raise UnsupportedInput(f"BitsAllocated {bits_allocated!r} is not 8 or 16")
    bits_stored = ds.get("BitsStored", bits_allocated)
    if not isinstance(bits_stored, int) or not 1 <= bits_stored <= bits_allocated:
        raise UnsupportedInput(f"BitsStored {bits_stored!r} does not fit BitsAllocated {bits_allocated}")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise UnsupportedInput("Rows or Columns missing or zero")
    if int(rows) * int(cols) > max_pixels:
        raise UnsupportedInput(f"{rows}x{cols} pixels is over the limit of {max_pixels}")


def compressed_frame_size(ds: Dataset) -> tuple[int, int] | None:
    """(rows, columns) that a JPEG or JPEG 2000 frame's own header claims, if it can be read.

    A codec allocates what its codestream declares, not what Rows/Columns say, so a
    crafted header could claim 65535 x 65535 pixels behind a small Rows/Columns.
    """
    if not ds.file_meta.get("TransferSyntaxUID", UID("1.2.840.10008.1.2")).is_compressed:
        return None
    from pydicom.encaps import generate_frames
    from pydicom.pixels.utils import _get_jpg_parameters

    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception as exc:
        raise DecodeError(f"encapsulated pixel data cannot be read: {type(exc).__name__}: {exc}") from None
    head = bytes(frame[:4096])
    siz = head.find(b"\xff\x51")
    if head.startswith(b"\xff\x4f") and siz >= 0 and len(head) >= siz + 22:
        x, y, x0, y0 = struct.unpack(">IIII", head[siz + 6 : siz + 22])  # ISO 15444-1 A.5.1
        return int(y) - int(y0), int(x) - int(x0)
    params = _get_jpg_parameters(head + bytes(frame[4096:65536]))
    if "height" in params and "width" in params:
        return int(params["height"]), int(params["width"])
    return None


def read_pixels(ds: Dataset) -> np.ndarray[Any, Any]:
    """Decode the stored values of a single-frame grayscale image."""
    claimed = compressed_frame_size(ds)
    if claimed is not None and claimed != (ds.Rows, ds.Columns):
        raise DecodeError(f"compressed frame claims {claimed[0]}x{claimed[1]} pixels but Rows/Columns are "
                          f"{ds.Rows}x{ds.Columns}")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for broken pixel data
        raise DecodeError(f"pixel data cannot be decoded: {exc}") from None
    if arr.ndim != 2 or arr.shape != (ds.Rows, ds.Columns):
        raise DecodeError(f"decoded pixel array has shape {arr.shape}, expected ({ds.Rows}, {ds.Columns})")
    return arr


def mask_padding(arr: np.ndarray[Any, Any], ds: Dataset) -> np.ndarray[Any, Any]:
    """Replace Pixel Padding Value pixels (PS3.3 C.7.5.1.1.2) by the image's minimum
    real value, so padding neither sets the intensity range nor looks like tissue."""
    padding = ds.get("PixelPaddingValue")
    if padding is None:
        return arr
    limit = ds.get("PixelPaddingRangeLimit", padding)
    lo, hi = sorted((int(padding), int(limit)))
    pad = (arr >= lo) & (arr <= hi)
    if pad.all() or not pad.any():
        return arr
    out = arr.copy()
    out[pad] = arr[~pad].min()
    return out


def has_voi(ds: Dataset) -> bool:
    return "VOILUTSequence" in ds or "WindowCenter" in ds


def apply_voi(arr: np.ndarray[Any, Any], ds: Dataset) -> np.ndarray[Any, Any]:
    """Apply the default VOI transform (PS3.3 C.11.2.1.2: when several are given, the first
    is the default) and map the result to [0, 1]: the first VOI LUT, else the first window,
    min-max of its output; without either, the range between the percentiles
    :data:`~cxr_contract.pixels.CLIP_PERCENTILES` (the step the trainer applies to a PNG),
    so that one outlier pixel does not set the contrast."""
    if has_voi(ds):
        try:
            windowed = np.asarray(apply_voi_lut(arr, ds, index=0, prefer_lut=True), dtype=np.float64)
        except Exception as exc:
            raise DecodeError(f"VOI LUT / window cannot be applied: {exc}") from None
        return to_unit_range(windowed, clip=False)
    return to_unit_range(arr.astype(np.float64))


def invert_monochrome1(arr: np.ndarray[Any, Any], ds: Dataset) -> np.ndarray[Any, Any]:
    """MONOCHROME1 shows low values bright; flip a [0, 1] image so bone is bright."""
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        return (1.0 - arr).astype(np.float32)
    return arr


def dataset_to_unit_image(ds: Dataset, *, max_pixels: int = 50_000_000) -> np.ndarray[Any, Any]:
    """Stored pixels -> display-ready grayscale in [0, 1] at the source's resolution."""
    check_pixel_module(ds, max_pixels=max_pixels)
    arr = read_pixels(ds)
    arr = mask_padding(arr, ds)
    try:
        arr = apply_modality_lut(arr, ds)
    except Exception as exc:
        raise DecodeError(f"modality LUT / rescale cannot be applied: {exc}") from None
    arr = apply_voi(arr, ds)
    return invert_monochrome1(arr, ds)


def dataset_to_model_input(ds: Dataset, size: int, *, max_pixels: int = 50_000_000) -> np.ndarray[Any, Any]:
    """The model input ``[size, size, 1]`` float32 for one dataset."""
    return resize_for_model(dataset_to_unit_image(ds, max_pixels=max_pixels), size)[..., None]

