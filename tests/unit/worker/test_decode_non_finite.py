"""NaN and infinities in the worker's pixel steps: each replaces them before any OpenCV kernel
sees them, so its output is defined (and the same on AVX2 and AVX-512 CPUs): NaN and -inf count
as the darkest value, +inf as the brightest."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from worker.decode import apply_voi, fit_dimension, unit_table

BAD = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}


def _ramp(n: int = 64) -> np.ndarray:
    return np.tile(np.linspace(100.0, 900.0, n), (n, 1))


def _with(arr: np.ndarray, value: float) -> np.ndarray:
    out = arr.copy()
    out[5, 7] = value
    out[40:44, 20:24] = value
    return out


def _windowed() -> Dataset:
    ds = Dataset()
    ds.WindowCenter, ds.WindowWidth = 500, 400
    ds.PhotometricInterpretation, ds.BitsStored, ds.PixelRepresentation = "MONOCHROME2", 16, 0
    return ds


@pytest.mark.parametrize("name", BAD)
@pytest.mark.parametrize("windowed", [True, False], ids=["window", "percentiles"])
def test_decode_float_path_gives_a_finite_unit_image(name: str, windowed: bool) -> None:
    image = _with(_ramp(), BAD[name])
    out = apply_voi(image, _windowed() if windowed else Dataset())
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    assert (out[40:44, 20:24] == (1.0 if name == "+inf" else 0.0)).all()
    shrunk = fit_dimension(out, 16)
    assert shrunk.shape == (16, 16) and np.isfinite(shrunk).all()


@pytest.mark.parametrize("slope", ["inf", "-inf", "nan"])
def test_decode_table_path_with_a_non_finite_rescale_gives_a_finite_table(slope: str) -> None:
    ds = Dataset()
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = float(slope), 0.0, "US"
    ds.PhotometricInterpretation = "MONOCHROME2"
    domain = np.arange(0, 16, dtype=np.uint16)
    table = unit_table(domain, np.ones(16, np.int64), ds)
    assert table.dtype == np.float32 and np.isfinite(table).all()
