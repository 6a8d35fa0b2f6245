"""The evaluation's statistics, on data whose answer is known (pure numpy, no TensorFlow)."""

from __future__ import annotations

import numpy as np
import pytest

from trainer import localise, stats


def test_bootstrap_resamples_patients_with_all_their_images() -> None:
    # 60 patients with 1..8 images each; every resample must hold whole patients.
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 9, 60)
    pids = [f"p{k}" for k, s in enumerate(sizes) for _ in range(s)]
    groups = {pid: [i for i, q in enumerate(pids) if q == pid] for pid in set(pids)}
    seen = []

    def stat(idx: np.ndarray) -> dict[str, float]:
        counts = np.bincount(idx, minlength=len(pids))
        for members in groups.values():
            assert len(set(counts[members].tolist())) == 1  # a patient comes whole or not at all
        seen.append(len(idx))
        return {"n": float(len(idx))}

    stats.cluster_bootstrap(pids, stat, 50, seed=1)
    assert len(set(seen)) > 1  # patient resampling changes the number of images


def test_patient_bootstrap_is_wider_than_image_bootstrap_when_images_are_correlated() -> None:
    # 100 patients, 10 identical images each: there are 100 independent observations, not 1000.
    rng = np.random.default_rng(2)
    per_patient = rng.normal(size=100)
    values = np.repeat(per_patient, 10)
    pids = [str(k) for k in np.repeat(np.arange(100), 10)]
    clustered = stats.mean_with_ci(values, pids, 2000, seed=3)["ci95"]
    one_each = stats.mean_with_ci(per_patient, [str(k) for k in range(100)], 2000, seed=3)["ci95"]
    as_images = stats.mean_with_ci(values, [str(k) for k in range(1000)], 2000, seed=3)["ci95"]

    def width(ci: list[float]) -> float:
        return ci[1] - ci[0]

    assert width(clustered) == pytest.approx(width(one_each), rel=0.15)
    assert width(clustered) > 2.5 * width(as_images)  # sqrt(10) ~ 3.2


def test_temperature_recovers_an_overconfident_scale() -> None:
    rng = np.random.default_rng(4)
    z_true = rng.normal(0, 2, 20000)
    y = (rng.random(20000) < stats.sigmoid(z_true)).astype(int)
    t = stats.fit_temperature(y, 3.0 * z_true)
    assert t == pytest.approx(3.0, rel=0.05)
    assert stats.nll(y, 3.0 * z_true, t) < stats.nll(y, 3.0 * z_true, 1.0)
    with pytest.raises(ValueError, match="both classes"):
        stats.fit_temperature(np.ones(5), np.zeros(5))


def test_ece_and_brier_on_known_values() -> None:
    y = np.array([0, 1] * 50)
    assert stats.expected_calibration_error(y, np.full(100, 0.9)) == pytest.approx(0.4)
    assert stats.brier(y, np.full(100, 0.5)) == pytest.approx(0.25)
    assert stats.brier(y, y.astype(float)) == 0.0
    rng = np.random.default_rng(5)
    p = rng.random(200000)
    calibrated = (rng.random(200000) < p).astype(int)
    assert stats.expected_calibration_error(calibrated, p) < 0.01
    r = stats.reliability(y, np.full(100, 0.9))
    assert r["count"].sum() == 100 and r["count"][13] == 100  # 0.9 is in (13/15, 14/15]


def test_calibration_report_after_temperature_is_better() -> None:
    rng = np.random.default_rng(6)
    z_true = rng.normal(0, 1.5, 3000)
    y = (rng.random(3000) < stats.sigmoid(z_true)).astype(int)
    z = 4 * z_true
    t = stats.fit_temperature(y[:1500], z[:1500])
    pids = [str(i // 3) for i in range(1500)]
    report = stats.calibration_report(y[1500:], z[1500:], t, pids, 200, seed=0)
    assert report["ece"]["after"]["value"] < report["ece"]["before"]["value"]
    assert report["brier"]["after"]["value"] < report["brier"]["before"]["value"]
    lo, hi = report["ece"]["before"]["ci95"]
    assert lo <= report["ece"]["before"]["value"] <= hi


def test_auc_ties_subgroups_and_view_alone() -> None:
    assert stats.auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert stats.auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5
    assert np.isnan(stats.auc(np.array([1, 1]), np.array([0.1, 0.2])))
    # Positives mostly AP, negatives mostly PA: the view alone separates them.
    y = np.array([1] * 10 + [0] * 10)
    views = ["AP"] * 6 + ["PA"] * 4 + ["AP"] * 3 + ["PA"] * 7
    pids = [str(i) for i in range(20)]
    alone = stats.view_alone_auc(y, views, pids, 100, seed=0)
    assert alone["auc"] == pytest.approx(0.5 + (0.6 - 0.3) / 2)
    score = np.where(y == 1, 0.9, 0.1)
    score[0] = 0.05  # one AP positive below every negative
    groups = stats.subgroup_aucs(y, score, pids, {"view": views, "sex": [""] * 20}, 100, seed=0)
    assert set(groups["view"]) == {"AP", "PA"} and groups["sex"] == {}
    assert groups["view"]["PA"]["auc"] == 1.0 and groups["view"]["PA"]["n"] == 11
    assert groups["view"]["AP"]["auc"] == pytest.approx(1 - 3 / 18)
    assert [stats.age_band(a) for a in ("17", "45", "061Y", "85", "x")] == ["<40", "40-59", "60-79", ">=80", ""]


def test_pointing_game_tolerance_is_a_fraction_of_the_image_and_zero_means_inside() -> None:
    region = np.zeros((100, 100), bool)
    region[40:60, 40:60] = True
    cam = np.zeros((10, 10))
    cam[3, 6] = 1.0  # centre (35, 65): 5 px above and 5 px right of the box corner (~7.1 px)
    assert localise.pointing_hit(cam, region, 0.0) == 0.0
    assert localise.pointing_hit(cam, region, 0.05) == 0.0
    assert localise.pointing_hit(cam, region, 0.08) == 1.0
    cam[3, 6], cam[5, 5] = 0.0, 1.0  # centre (55, 55): inside
    assert localise.pointing_hit(cam, region, 0.0) == 1.0
    assert localise.pointing_hit(np.zeros((10, 10)), region, 1.0) == 0.0
    # A uniform map ties everywhere: its score is the share of the image within reach.
    assert localise.pointing_hit(localise.uniform_prior(100), region, 0.0) == pytest.approx(0.04)


def test_energy_iou_and_priors() -> None:
    region = np.zeros((64, 64), bool)
    region[:, :32] = True  # left half
    assert localise.energy_in_region(localise.uniform_prior(64), region) == pytest.approx(0.5)
    assert localise.iou(localise.uniform_prior(64), region) == pytest.approx(0.5)
    assert localise.iou(region.astype(float), region) == 1.0
    assert localise.iou(np.zeros((4, 4)), region) == 0.0
    centre = localise.centre_prior(64)
    assert localise.energy_in_region(centre, region) == pytest.approx(0.5, abs=0.01)
    # A centred lesion-free box beside the mediastinum: the centre prior points at it.
    side = np.zeros((64, 64), bool)
    side[5:20, 5:20] = True
    assert localise.pointing_hit(centre, side, 0.0) == 0.0
    prior = localise.data_prior([region, side])
    assert prior is not None and prior[10, 10] == 1.0 and prior[40, 10] == 0.5 and prior[10, 40] == 0.0
    assert localise.data_prior([]) is None
    s = localise.scores(region.astype(float), region)
    assert s == {"pointing_game": 1.0, "pointing_game_zero_tolerance": 1.0, "energy_in_region": 1.0, "iou": 1.0}


def test_youden_threshold_is_always_a_validation_probability() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    separable = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    assert stats.youden_threshold(y, separable) == pytest.approx(0.6)
    # A model that ranks every positive below every negative (J <= 0 at every real threshold):
    # the stored threshold is still one of its probabilities, never 1.0 ("never positive").
    inverted = separable[::-1].copy()
    chosen = stats.youden_threshold(y, inverted)
    assert chosen in inverted and chosen < 1.0
    # All the same (a collapsed model): that value.
    assert stats.youden_threshold(y, np.full(6, 0.4666)) == pytest.approx(0.4666)


def test_group_metrics_say_too_few_below_the_minimum_and_resample_patients() -> None:
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(30), np.zeros(30)]
    p = np.clip(y * 0.6 + rng.random(60) * 0.4, 0, 1)
    pids = [f"p{i // 2}" for i in range(60)]  # two images per patient: 15 patients per class
    g = stats.group_metrics(y, p, 0.5, pids, 50, 0)
    assert g["positive_patients"] == 15 and g["sensitivity"]["value"] == 1.0
    assert set(g) >= {"specificity", "auc", "ece"} and g["auc"]["ci95"] is not None
    few = stats.group_metrics(y[:20], p[:20], 0.5, pids[:20], 50, 0)
    assert few["estimate"].startswith("too few to estimate (at least 10 patients") and "sensitivity" not in few
    sex = (["F"] * 20 + ["M"] * 10) * 2  # F: 10 patients of each class, M: 5
    by = stats.subgroup_metrics(y, p, 0.5, pids, {"sex": sex}, 20, 0)
    assert "estimate" not in by["sex"]["F"] and "estimate" in by["sex"]["M"]
