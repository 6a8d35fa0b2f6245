"""NaN and infinities in the shared pixel steps and the faithfulness imputation: each replaces
them before any OpenCV kernel sees them, so its output is defined (and the same on AVX2 and
AVX-512 CPUs): NaN and -inf count as the darkest value, +inf as the brightest; a blur or an area
average never spreads them."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_contract import faithfulness
from cxr_contract.pixels import all_finite, finite_or_ends, resize_for_model, to_unit_range

BAD = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}


def _ramp(n: int = 64) -> np.ndarray:
    return np.tile(np.linspace(100.0, 900.0, n), (n, 1))


def _with(arr: np.ndarray, value: float) -> np.ndarray:
    out = arr.copy()
    out[5, 7] = value
    out[40:44, 20:24] = value
    return out


@pytest.mark.parametrize("name", BAD)
@pytest.mark.parametrize("clip", [True, False])
def test_to_unit_range_counts_nan_and_infinities_as_the_darkest_or_brightest_value(name: str, clip: bool) -> None:
    image = _with(_ramp(), BAD[name])
    out = to_unit_range(image, clip=clip)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert (out[40:44, 20:24] == (1.0 if name == "+inf" else 0.0)).all() and out[5, 7] == out[40, 20]
    finite = image[np.isfinite(image)]
    stand_in = finite.max() if name == "+inf" else finite.min()
    np.testing.assert_array_equal(out, to_unit_range(np.where(np.isfinite(image), image, stand_in), clip=clip))


def test_an_image_with_no_finite_value_maps_to_zeros() -> None:
    for value in BAD.values():
        assert not to_unit_range(np.full((8, 8), value)).any()
    assert not to_unit_range(np.array([[np.nan, np.inf], [-np.inf, np.nan]])).any()


@pytest.mark.parametrize("name", BAD)
def test_resize_for_model_replaces_before_the_area_average(name: str) -> None:
    unit = _with(_ramp() / 1000.0, BAD[name]).astype(np.float32)
    out = resize_for_model(unit, 16)
    assert np.isfinite(out).all()
    replaced = np.where(np.isfinite(unit), unit, 1.0 if name == "+inf" else 0.0).astype(np.float32)
    np.testing.assert_array_equal(out, resize_for_model(replaced, 16))


def test_finite_or_ends_leaves_a_finite_image_alone_and_checks_in_one_pass() -> None:
    image = _ramp().astype(np.float32)
    assert finite_or_ends(image) is image and all_finite(image) and all_finite(np.zeros(0))
    assert not all_finite(_with(image, np.nan)) and not all_finite(_with(image, -np.inf))
    # A sum that overflows float32 is not a false "all finite"; it only costs a copy.
    huge = np.full((4, 4), 3e38, np.float32)
    np.testing.assert_array_equal(finite_or_ends(huge), huge)


@pytest.mark.parametrize("name", BAD)
def test_faithfulness_imputation_does_not_spread_nan_or_infinities(name: str) -> None:
    image = (_ramp(32) / 1000.0).astype(np.float32)[..., None]
    bad = image.copy()
    bad[3, 3, 0] = BAD[name]
    mask = np.zeros((32, 32), bool)
    mask[8:16, 8:16] = True
    out = faithfulness.impute(bad, mask)
    assert out.shape == image.shape and np.isfinite(out).all()
    replaced = bad.copy()
    replaced[3, 3, 0] = 1.0 if name == "+inf" else 0.0
    np.testing.assert_array_equal(out, faithfulness.impute(replaced, mask))
    perturbed = faithfulness.perturbed_inputs(bad, np.arange(4, dtype=np.float32).reshape(2, 2))
    assert len(perturbed) == faithfulness.INPUTS_PER_IMAGE and np.isfinite(perturbed).all()
    # the healthy-reference fill fits a line through the kept pixels: one NaN must not poison it
    reference = faithfulness.reference_image(image[None])
    by_reference = faithfulness.impute(bad, mask, reference=reference)
    assert np.isfinite(by_reference).all()
    np.testing.assert_array_equal(by_reference, faithfulness.impute(replaced, mask, reference=reference))


def test_faithfulness_ranks_nan_cells_as_zero_and_infinities_at_the_ends() -> None:
    cam = np.array([[0.5, np.nan, np.inf], [-np.inf, 0.2, 0.1]], np.float32)
    # 20% of 6 cells -> 1 cell (3x2 pixels at 6 px): +inf is the hottest, -inf the coldest.
    hottest = faithfulness.ranked_cell_mask(cam, 6)
    assert hottest[:3, 4:].all() and hottest.sum() == 6
    coldest = faithfulness.ranked_cell_mask(cam, 6, most_relevant=False)
    assert coldest[3:, :2].all() and coldest.sum() == 6
    assert faithfulness.random_cell_mask(cam, 6).sum() == 6
