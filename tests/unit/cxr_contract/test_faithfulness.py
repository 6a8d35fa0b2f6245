"""The per-image heatmap-faithfulness test carries information: maps that know nothing about
the image are "not above chance" on nearly every image, a map of what the model really uses is
"above chance", and nothing in it depends on the map's float noise.

The model here is a plain function whose logit is the brightness of one fixed region (lower
left), where the "positive" phantoms carry a bright opacity: what it depends on is known
exactly, so the verdicts can be checked against the truth.
"""

from __future__ import annotations

import numpy as np
import pytest

from cxr_contract import faithfulness as f

SIZE, GRID = 64, (8, 8)
#: The region the model's logit depends on: the lower-left 3x3 block of grid cells.
EVIDENCE = np.zeros((SIZE, SIZE), bool)
EVIDENCE[40:64, 0:24] = True


def logit_of(x: np.ndarray) -> np.ndarray:
    """Logit = 20 x (mean brightness inside EVIDENCE - 0.5), and nothing else."""
    return 20 * (x[:, EVIDENCE, 0].mean(axis=1) - 0.5)


def phantoms(n: int, seed: int) -> np.ndarray:
    """Smooth random backgrounds in [0, 0.5] with a bright opacity inside EVIDENCE, ``[n, SIZE, SIZE, 1]``."""
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image = cv2.GaussianBlur(rng.random((SIZE, SIZE)).astype(np.float32), (0, 0), 3) * 0.5
        cy, cx = rng.integers(46, 58), rng.integers(6, 18)
        yy, xx = np.mgrid[0:SIZE, 0:SIZE]
        image += 0.8 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 6.0**2))
        out.append(np.clip(image, 0, 1))
    return np.stack(out)[..., None].astype(np.float32)


def evidence_map() -> np.ndarray:
    """A Grad-CAM-like bump on the evidence (grid cell (6, 1))."""
    yy, xx = np.mgrid[0:GRID[0], 0:GRID[1]]
    return np.exp(-((yy - 6) ** 2 + (xx - 1) ** 2) / 2.0)


@pytest.fixture(scope="module")
def null() -> dict:
    return f.null_cutoff(logit_of, phantoms(60, seed=1), GRID)


def test_knowledge_free_maps_are_not_above_chance_and_the_true_map_is(null: dict) -> None:
    test = phantoms(100, seed=2)
    cutoff = null["cutoff"]
    rates = {}
    for name, maps in {"random": f.random_maps(100, *GRID, seed=99), "centre": f.centre_map(*GRID),
                       "constant": np.ones(GRID), "evidence": evidence_map()}.items():
        z = f.scores(logit_of, test, maps)
        rates[name] = float(np.mean([f.above_chance(v, cutoff) for v in z]))
    assert rates["random"] <= 0.05 and rates["centre"] <= 0.05 and rates["constant"] <= 0.05, rates
    assert rates["evidence"] >= 0.7, rates
    assert null["rate"] == f.NULL_RATE and null["images"] == 60
    assert set(null["per_family"]) == {"random_map", "centre_map", "constant_map"}


def test_the_old_single_draw_margin_at_zero_called_a_random_map_faithful_half_the_time(null: dict) -> None:
    """Why the null cut-off: at a cut-off of 0 (the old "high"), a random map passes often."""
    z = f.scores(logit_of, phantoms(40, seed=3), f.random_maps(40, *GRID, seed=5))
    assert np.mean(z > 0) > 0.2
    assert np.mean(z > null["cutoff"]) <= 0.05


def test_moved_regions_keep_shape_and_area_and_do_not_depend_on_the_map_values() -> None:
    cam = np.random.default_rng(0).random(GRID)
    hot = f.ranked_cell_mask(cam, SIZE)
    regions = f.moved_regions(hot)
    assert len(regions) == f.N_RANDOM
    for r in regions:
        assert r.sum() == hot.sum()
        assert (r & hot).sum() <= f.MAX_OVERLAP * hot.sum()
    # The same hottest cells, whatever the values (a float-noise or precision change): the same inputs.
    noisy = cam * 1.37 + 1e-6
    image = phantoms(1, 0)[0]
    np.testing.assert_array_equal(f.perturbed_inputs(image, cam), f.perturbed_inputs(image, noisy))
    # The first copies do not change when more are asked for (each is the next acceptable offset).
    more = f.moved_regions(hot, 2 * f.N_RANDOM)
    assert all((a == b).all() for a, b in zip(regions, more[:f.N_RANDOM], strict=True))
    # A large hot region (over half the image wide) still gets its N_RANDOM copies.
    big = np.zeros((SIZE, SIZE), bool)
    big[:, :40] = True
    assert len(f.moved_regions(big)) == f.N_RANDOM
    # A 2x2 grid (64-px model) still gets N_RANDOM regions, moved by pixels rather than cells.
    coarse = f.moved_regions(f.ranked_cell_mask(np.array([[0.0, 1.0], [0.0, 0.0]]), SIZE))
    assert len(coarse) == f.N_RANDOM and len({r.tobytes() for r in coarse}) == f.N_RANDOM


def test_score_is_the_logit_drop_beyond_the_moved_copies_mean() -> None:
    # hot removal drops the logit to 0, the moved ones leave it at 2 on average
    moved = [1, 2, 3, 1, 2, 3, 2, 2]
    assert f.score(np.array([0.0, *moved])) == pytest.approx(2.0)
    # a site's prevalence adds a constant to every logit: the score does not move
    assert f.score(np.array([0.0, *moved]) + 1.7) == pytest.approx(2.0)
    assert f.verdict(2.0, 1.5) == "above chance" and f.verdict(1.5, 1.5) == "not above chance"


def chest(opacity: bool) -> tuple[np.ndarray, np.ndarray]:
    """A dark "lung field" (0.2) in a bright "chest wall" (0.8), with or without a bright
    opacity in the lung near its edge; and the opacity's mask."""
    image = np.full((SIZE, SIZE), 0.8, np.float32)
    image[8:56, 12:40] = 0.2
    mask = np.zeros((SIZE, SIZE), bool)
    mask[16:32, 14:26] = True
    if opacity:
        image[mask] = 0.55
    return image[..., None], mask


def test_a_reference_fill_removes_an_opacity_where_the_neighbours_mean_paints_one() -> None:
    """Why the healthy reference: ROAD's local mean pulls the bright wall into the dark lung."""
    healthy, mask = chest(False)
    sick, _ = chest(True)
    reference = f.reference_image(healthy[None] * 0.9 + 0.05)  # another exposure of the same anatomy
    by_reference = f.impute(sick, mask, reference=reference, noise=0)
    by_neighbours = f.impute(sick, mask, noise=0)
    assert abs(float(by_reference[mask].mean()) - 0.2) < 0.01  # healthy lung again
    # brighter than lung, up to twice as bright next to the wall: a new opacity
    assert float(by_neighbours[mask].mean()) > 0.27 and float(by_neighbours[mask].max()) > 0.4
    # Outside the feathered edge (a 2-pixel Gaussian, 8 pixels of support) the image is untouched.
    grown = np.zeros_like(mask)
    grown[8:40, 6:34] = True
    np.testing.assert_array_equal(by_reference[~grown], sick[~grown])


def test_the_reference_round_trips_through_the_metadata_text_exactly() -> None:
    ref = f.reference_image(phantoms(5, seed=4))
    assert ref.shape == (SIZE, SIZE) and ref.dtype == np.float32
    np.testing.assert_array_equal(f.decode_reference(f.encode_reference(ref), SIZE), ref)
    with pytest.raises(ValueError, match="not a 32x32 16-bit PNG"):
        f.decode_reference(f.encode_reference(ref), 32)
    with pytest.raises(ValueError, match="not base64"):
        f.decode_reference("@@@", SIZE)
    with pytest.raises(ValueError, match="at least one"):
        f.reference_image(np.zeros((0, SIZE, SIZE)))


def test_a_reference_of_another_size_is_refused() -> None:
    image, mask = chest(True)
    with pytest.raises(ValueError, match="reference is"):
        f.impute(image, mask, reference=np.zeros((32, 32), np.float32))


def test_imputation_adds_roads_noise_deterministically() -> None:
    image = np.full((SIZE, SIZE, 1), 0.5, np.float32)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[10:30, 10:30] = True
    a, b = f.impute(image, mask), f.impute(image, mask)
    np.testing.assert_array_equal(a, b)
    assert 0.005 < float(a[mask].std()) < 0.02  # the noise term
    np.testing.assert_array_equal(a[~mask], image[~mask])
    assert f.impute(image, mask, noise=0)[mask].std() < 1e-6
