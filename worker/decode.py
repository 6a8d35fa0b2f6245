"""Pixel steps from a stored image to the model's input tensor.

Every step is a pure function ``(arr, ds) -> arr`` or ``arr -> arr``, as in
:mod:`pydicom.pixels.processing`. The last steps (:func:`~cxr_contract.pixels.to_unit_range`,
:func:`~cxr_contract.pixels.resize_for_model`) are shared with the trainer's PNG path, so a
PNG through the trainer and a DICOM through the worker give the same tensor.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from pydicom import Dataset
from pydicom.pixels import get_decoder
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    UID,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from cxr_contract.pixels import CLIP_PERCENTILES, finite_or_ends, resize_for_model, to_unit_range
from worker.errors import DecodeError, UnsupportedInput

SUPPORTED_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")

#: 5000 x 5000: a 43 x 43 cm detector at 86 um, above every chest radiograph we know of
#: (4300 x 4300 at 100 um is the largest common flat panel).
MAX_PIXELS = 25_000_000


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


def _first_frame(ds: Dataset) -> bytes:
    from pydicom.encaps import generate_frames

    try:
        return next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception as exc:
        raise DecodeError(f"encapsulated pixel data cannot be read: {type(exc).__name__}: {exc}") from None


def compressed_frame_size(ds: Dataset) -> tuple[int, int] | None:
    """(rows, columns) that a JPEG, JPEG-LS or JPEG 2000 frame's own header claims.

    A codec allocates what its codestream declares, not what Rows/Columns say, so a
    crafted header could claim 20000 x 20000 pixels behind Rows/Columns of 512. The
    codec libraries' own header parsers read it (the whole frame: a JPEG may put its
    SOF after any number of APP segments; a JPEG 2000 frame may come in JP2 boxes).
    None for syntaxes whose frames declare no size (uncompressed, RLE).

    Raises:
        DecodeError: the frame's header cannot be read.
    """
    syntax = UID(ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian))
    if syntax in JPEG2000TransferSyntaxes:
        import openjpeg

        parse: Any = openjpeg.get_parameters
    elif syntax in JPEGTransferSyntaxes or syntax in JPEGLSTransferSyntaxes:
        import libjpeg

        parse = libjpeg.get_parameters
    else:
        return None
    frame = _first_frame(ds)
    try:
        params = parse(frame)
        return int(params["rows"]), int(params["columns"])
    except Exception as exc:  # the libraries raise RuntimeError, or KeyError for odd streams
        raise DecodeError(f"compressed frame header cannot be read: {type(exc).__name__}: {exc}") from None


def read_pixels(ds: Dataset) -> np.ndarray[Any, Any]:
    """Decode the stored values of a single-frame grayscale image, after checking that
    a compressed frame declares the size that Rows/Columns do.

    Every syntax decodes at full size: pylibjpeg-openjpeg 2.x exposes no reduction
    level, so a JPEG 2000 frame cannot be decoded at a lower resolution here; memory
    per image is bounded by ``max_pixels`` instead.
    """
    claimed = compressed_frame_size(ds)
    rows, cols = int(ds.Rows), int(ds.Columns)
    if claimed is not None and claimed != (rows, cols):
        raise DecodeError(f"compressed frame claims {claimed[0]}x{claimed[1]} pixels but Rows/Columns are "
                          f"{rows}x{cols}")
    try:
        # The decoder, not ds.pixel_array: that caches the full array on the dataset, which
        # the batch keeps until its outputs are built.
        arr, _ = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds, index=0)
    except Exception as exc:  # pydicom raises many types for broken pixel data
        raise DecodeError(f"pixel data cannot be decoded: {exc}") from None
    if arr.ndim != 2 or arr.shape != (rows, cols):
        raise DecodeError(f"decoded pixel array has shape {arr.shape}, expected ({rows}, {cols})")
    return arr


def fit_dimension(arr: np.ndarray[Any, Any], max_dimension: int | None) -> np.ndarray[Any, Any]:
    """Shrink (area average) so that neither side exceeds ``max_dimension``; the Secondary
    Capture is built at this size, so it stays bounded whatever the source's size."""
    if not max_dimension or max(arr.shape) <= max_dimension:
        return arr
    scale = max_dimension / max(arr.shape)
    size = (max(1, round(arr.shape[1] * scale)), max(1, round(arr.shape[0] * scale)))
    return np.asarray(cv2.resize(arr, size, interpolation=cv2.INTER_AREA))


def held_pixels(ds: Dataset, max_dimension: int | None) -> int:
    """Pixels one decoded image holds in a batch (its unit image after :func:`fit_dimension`):
    what a batcher should sum to size a batch by pixels rather than by count."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if max_dimension and max(rows, cols) > max_dimension:
        scale = max_dimension / max(rows, cols)
        rows, cols = round(rows * scale), round(cols * scale)
    return rows * cols


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


#: Stored values spanning at most this many levels are mapped through a per-value table.
TABLE_MAX_LEVELS = 1 << 16


def percentile_of_counts(values: np.ndarray[Any, Any], counts: np.ndarray[Any, Any],
                         q: tuple[float, ...]) -> list[float]:
    """``np.percentile(a, q)`` (linear method) of the array ``a`` holding each ``values[i]``
    ``counts[i]`` times, without expanding it: the same order statistics, the same
    interpolation as numpy's ``_lerp``."""
    order = np.argsort(values, kind="stable")
    sorted_values = np.asarray(values, np.float64)[order]
    ends = np.cumsum(np.asarray(counts, np.int64)[order])  # rank of the last copy of each value, plus one
    n = int(ends[-1])
    out = []
    for p in q:
        virtual = (n - 1) * (np.float64(p) / 100)
        below = np.floor(virtual)
        t = virtual - below
        k = int(below)
        a = sorted_values[np.searchsorted(ends, k, side="right")]
        b = sorted_values[np.searchsorted(ends, min(k + 1, n - 1), side="right")]
        diff = b - a
        out.append(float(b - diff * (1 - t) if t >= 0.5 else a + diff * t))
    return out


def _levels(arr: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None:
    """(offset index of each pixel, domain of stored values) for an integer image whose values
    span at most :data:`TABLE_MAX_LEVELS` levels; None otherwise."""
    if arr.dtype.kind not in "ui" or not arr.size:
        return None
    lo, hi = int(arr.min()), int(arr.max())
    if hi - lo >= TABLE_MAX_LEVELS:
        return None
    if arr.dtype.kind == "u" and arr.dtype.itemsize <= 2:
        index = np.subtract(arr, arr.dtype.type(lo), dtype=np.uint16)
    else:
        index = (arr.astype(np.int64) - lo).astype(np.uint16)
    return index, np.arange(lo, hi + 1, dtype=np.int64).astype(arr.dtype)


def unit_table(domain: np.ndarray[Any, Any], counts: np.ndarray[Any, Any], ds: Dataset) -> np.ndarray[Any, Any]:
    """The unit image's value (float32) for each stored value in ``domain``: the modality
    LUT, the VOI transform, the map to [0, 1] and the MONOCHROME1 flip, value by value.

    Each step is element-wise except the range of the map to [0, 1], which is taken over
    the values present (``counts > 0``), so ``table[stored - lo]`` equals the steps applied
    to the whole image.
    """
    try:
        values = apply_modality_lut(domain, ds)
    except Exception as exc:
        raise DecodeError(f"modality LUT / rescale cannot be applied: {exc}") from None
    # A rescale slope or intercept that is not finite makes values that are not: the same
    # darkest/brightest rule as the float path (to_unit_range) applies to them.
    values = finite_or_ends(np.asarray(values, np.float64))
    present = counts > 0
    if has_voi(ds):
        try:
            windowed = np.asarray(apply_voi_lut(values, ds, index=0, prefer_lut=True), dtype=np.float64)
        except Exception as exc:
            raise DecodeError(f"VOI LUT / window cannot be applied: {exc}") from None
        windowed = finite_or_ends(windowed)
        lo, hi = float(windowed[present].min()), float(windowed[present].max())
        unit = (np.zeros(windowed.shape, np.float32) if hi <= lo
                else ((windowed - lo) / (hi - lo)).astype(np.float32))
    else:
        values = np.asarray(values, np.float64)
        lo, hi = percentile_of_counts(values[present], counts[present], CLIP_PERCENTILES)
        if hi > lo:  # to_unit_range(clip=True), value by value
            unit = ((np.clip(values, lo, hi) - lo) / (hi - lo)).astype(np.float32)
        else:
            lo, hi = float(values[present].min()), float(values[present].max())
            unit = (np.zeros(values.shape, np.float32) if hi <= lo
                    else ((values - lo) / (hi - lo)).astype(np.float32))
    return invert_monochrome1(unit, ds)


def dataset_to_unit_image(ds: Dataset, *, max_pixels: int = MAX_PIXELS,
                          max_dimension: int | None = None) -> np.ndarray[Any, Any]:
    """Stored pixels -> display-ready grayscale in [0, 1], at the source's resolution or,
    with ``max_dimension``, shrunk so that neither side exceeds it.

    Integer images (every modality we take) go through a table of the at most 65,536
    stored levels (:func:`unit_table`): the same values as the steps applied pixel by
    pixel, at the cost of one lookup per pixel instead of several float64 passes.
    """
    check_pixel_module(ds, max_pixels=max_pixels)
    arr = mask_padding(read_pixels(ds), ds)
    levels = _levels(arr)
    if levels is not None:
        index, domain = levels
        counts = np.bincount(index.ravel(), minlength=len(domain))
        return fit_dimension(unit_table(domain, counts, ds)[index], max_dimension)
    try:
        arr = apply_modality_lut(arr, ds)
    except Exception as exc:
        raise DecodeError(f"modality LUT / rescale cannot be applied: {exc}") from None
    arr = apply_voi(arr, ds)
    return fit_dimension(invert_monochrome1(arr, ds), max_dimension)


def dataset_to_model_input(ds: Dataset, size: int, *, max_pixels: int = MAX_PIXELS) -> np.ndarray[Any, Any]:
    """The model input ``[size, size, 1]`` float32 for one dataset."""
    return resize_for_model(dataset_to_unit_image(ds, max_pixels=max_pixels), size)[..., None]

