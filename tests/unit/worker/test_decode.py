"""Pixel steps: the trainer's PNG path and the worker's DICOM path give one tensor,
and every unsupported pixel format is refused with a reason."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from cxr_contract.pixels import to_unit_range
from trainer.dicom_phantoms import cr_dataset
from trainer.fit import load_image
from trainer.phantoms import make_phantom
from worker.decode import dataset_to_model_input, dataset_to_unit_image
from worker.errors import DecodeError, UnsupportedInput


@pytest.fixture
def phantom() -> np.ndarray:
    image, _ = make_phantom(np.random.default_rng(7), 200, True)
    return image


def test_png_and_dicom_of_the_same_pixels_give_the_same_tensor(tmp_path: Path, phantom: np.ndarray) -> None:
    png = tmp_path / "p.png"
    cv2.imwrite(str(png), phantom)
    ds = cr_dataset(phantom, bits_stored=8)
    ds.BitsAllocated = 8
    ds.HighBit = 7
    ds.PixelData = phantom.tobytes()
    path = tmp_path / "p.dcm"
    ds.save_as(path, enforce_file_format=True)
    from_png = load_image(str(png), 64)
    from_dicom = dataset_to_model_input(pydicom.dcmread(path), 64)
    assert from_png.shape == from_dicom.shape == (64, 64, 1)
    assert from_png.dtype == from_dicom.dtype == np.float32
    np.testing.assert_array_equal(from_png, from_dicom)


def test_monochrome1_12bit_shows_the_same_picture_as_monochrome2(phantom: np.ndarray) -> None:
    m2 = dataset_to_unit_image(cr_dataset(phantom, photometric="MONOCHROME2"))
    m1 = dataset_to_unit_image(cr_dataset(phantom, photometric="MONOCHROME1"))
    np.testing.assert_allclose(m1, m2, atol=1e-6)
    np.testing.assert_allclose(m2, to_unit_range(phantom), atol=1e-3)


def test_first_window_is_applied_when_several_are_given(phantom: np.ndarray) -> None:
    ds = cr_dataset(phantom)  # 12-bit: values 0..4095
    ds.WindowCenter = [1024, 3000]
    ds.WindowWidth = [1024, 2000]
    out = dataset_to_unit_image(ds)
    stored = ds.pixel_array.astype(float)
    assert out[stored <= 512].max() == 0.0  # below the first window: black
    assert out[stored >= 1536].min() == 1.0  # above it: white


def test_rescale_and_padding(phantom: np.ndarray) -> None:
    ds = cr_dataset(phantom)
    arr = ds.pixel_array.copy()
    arr[:10, :] = 4095
    ds.PixelData = arr.tobytes()
    ds.PixelPaddingValue = 4095
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    out = dataset_to_unit_image(ds)
    # Padding takes the darkest real value, so the body keeps its contrast.
    assert out[:10].max() == 0.0
    body = phantom[10:].astype(float)
    masked = np.vstack([np.full((10, body.shape[1]), body.min()), body])
    np.testing.assert_allclose(out[10:], to_unit_range(masked)[10:], atol=2e-3)


def test_without_a_window_one_outlier_pixel_does_not_set_the_contrast(phantom: np.ndarray) -> None:
    ds = cr_dataset(phantom)  # 12-bit, no window
    clean = dataset_to_unit_image(ds)
    arr = ds.pixel_array.copy()
    arr[0, 0] = 4095  # a dead-bright pixel far above the anatomy
    ds.PixelData = arr.tobytes()
    out = dataset_to_unit_image(ds)
    assert out[0, 0] == 1.0
    # Min-max would squeeze the phantom into the bottom of the range; percentiles keep it.
    assert abs(float(np.median(out)) - float(np.median(clean))) < 0.02
    assert float(np.percentile(out, 99)) > 0.9


def test_percentile_clipping_is_shared_and_min_max_is_kept_for_windowed_images() -> None:
    ramp = np.arange(1000, dtype=float)
    clipped = to_unit_range(ramp)
    assert clipped[:5].max() == 0.0 and clipped[-5:].min() == 1.0  # 0.5 % at each end
    np.testing.assert_allclose(to_unit_range(ramp, clip=False), ramp / 999, atol=1e-6)


def test_real_cr_chest_monochrome1_is_displayed_with_bright_bone() -> None:
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    unit = dataset_to_unit_image(ds)
    assert unit.shape == (ds.Rows, ds.Columns)
    assert unit.min() >= 0.0 and unit.max() <= 1.0
    # The mediastinum (centre column band) is brighter than the lung fields beside it.
    rows, cols = unit.shape
    centre = unit[rows // 3 : 2 * rows // 3, cols // 2 - 50 : cols // 2 + 50].mean()
    lung = unit[rows // 3 : 2 * rows // 3, cols // 4 - 50 : cols // 4 + 50].mean()
    assert centre > lung


@pytest.mark.parametrize("name", ["RG1_J2KR.dcm", "RG1_J2KI.dcm"])
def test_jpeg2000_decodes_like_the_uncompressed_original(name: str) -> None:
    ref = dataset_to_model_input(pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm")), 64)
    out = dataset_to_model_input(pydicom.dcmread(get_testdata_file(name)), 64)
    assert np.abs(out - ref).max() < (1e-6 if name.endswith("J2KR.dcm") else 0.05)


def _bad(change: str) -> pydicom.Dataset:
    ds = cr_dataset(np.zeros((32, 32), np.uint8) + 10)
    if change == "no pixel data":
        del ds.PixelData
    elif change == "ybr":
        ds.PhotometricInterpretation = "YBR_FULL_422"
    elif change == "palette":
        ds.PhotometricInterpretation = "PALETTE COLOR"
    elif change == "rgb samples":
        ds.SamplesPerPixel = 3
    elif change == "multi-frame":
        ds.NumberOfFrames = 2
    elif change == "bits allocated 12":
        ds.BitsAllocated = 12
    elif change == "bits stored > allocated":
        ds.BitsStored = 17
    elif change == "too large":
        ds.Rows = ds.Columns = 65535
    elif change == "zero rows":
        ds.Rows = 0
    return ds


@pytest.mark.parametrize("change", ["no pixel data", "ybr", "palette", "rgb samples", "multi-frame",
                                    "bits allocated 12", "bits stored > allocated", "too large", "zero rows"])
def test_unsupported_pixel_formats_are_refused_before_decoding(change: str) -> None:
    with pytest.raises(UnsupportedInput):
        dataset_to_unit_image(_bad(change), max_pixels=10_000_000)


def test_truncated_pixel_data_is_a_decode_error() -> None:
    ds = cr_dataset(np.zeros((32, 32), np.uint8))
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(DecodeError, match="pixel data"):
        dataset_to_unit_image(ds)


def test_constant_image_maps_to_zeros() -> None:
    assert not to_unit_range(np.full((4, 4), 7)).any()


def _pixel_by_pixel(ds: pydicom.Dataset) -> np.ndarray:
    """The DICOM pixel steps applied to the whole array, one after the other."""
    from pydicom.pixels.processing import apply_modality_lut

    from worker.decode import apply_voi, invert_monochrome1, mask_padding, read_pixels

    arr = apply_modality_lut(mask_padding(read_pixels(ds), ds), ds)
    return invert_monochrome1(apply_voi(arr, ds), ds)


def _variants(phantom: np.ndarray) -> dict[str, pydicom.Dataset]:
    out = {name: pydicom.dcmread(get_testdata_file(name)) for name in ("RG1_UNCR.dcm", "CT_small.dcm")}
    out["MONOCHROME1, no window"] = cr_dataset(phantom, photometric="MONOCHROME1")
    rescaled = cr_dataset(phantom)
    arr = rescaled.pixel_array.copy()
    arr[:4] = 4095
    rescaled.PixelData = arr.tobytes()
    rescaled.PixelPaddingValue, rescaled.RescaleSlope, rescaled.RescaleIntercept = 4095, 0.37, -100
    out["rescale and padding"] = rescaled
    windows = cr_dataset(phantom)
    windows.WindowCenter, windows.WindowWidth = [1024, 3000], [1024, 2000]
    out["two windows"] = windows
    return out


def test_table_of_stored_levels_gives_the_pixel_by_pixel_image(phantom: np.ndarray) -> None:
    for name, ds in _variants(phantom).items():  # CT_small: signed 16-bit with a rescale
        np.testing.assert_array_equal(dataset_to_unit_image(ds), _pixel_by_pixel(ds), err_msg=name)


def test_percentile_of_counts_is_numpys_percentile() -> None:
    from worker.decode import percentile_of_counts

    rng = np.random.default_rng(11)
    for _ in range(100):
        arr = rng.integers(-50, int(rng.integers(-40, 5000)), size=int(rng.integers(1, 4000))).astype(float)
        values, counts = np.unique(arr, return_counts=True)
        shuffled = rng.permutation(len(values))  # the table's order need not be sorted
        got = percentile_of_counts(values[shuffled], counts[shuffled], (0.5, 50, 99.5))
        assert got == list(np.percentile(arr, (0.5, 50, 99.5)))
