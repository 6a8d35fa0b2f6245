"""The comparison of a reduced-precision model with its fp32 model: each number and each
limit, on outputs built by hand so the expected values are known."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.errors import ExportError
from trainer.quantize import LIMITS, check_limits, compare, failures, map_pearson


def _outputs(p: list[float], ood: list[float], cams: np.ndarray) -> dict[str, np.ndarray]:
    return {"probability": np.array(p, np.float32), "ood_score": np.array(ood, np.float32), "gradcam": cams}


def test_pearson_of_maps_and_the_rule_for_maps_without_variance() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((3, 4, 4))
    assert map_pearson(a, 2 * a + 1, 1.0) == pytest.approx([1, 1, 1])
    assert map_pearson(a, -a, 1.0) == pytest.approx([-1, -1, -1])
    zero = np.zeros((2, 2, 2))
    # All zero in both: the same picture. A 0.5%-of-scale speck is invisible, 5% is not.
    speck = zero.copy()
    speck[1, 0, 0] = 0.05
    assert list(map_pearson(zero, zero, 1.0)) == [1.0, 1.0]
    assert list(map_pearson(zero, speck, 10.0)) == [1.0, 1.0]
    assert list(map_pearson(zero, speck, 1.0)) == [1.0, 0.0]


def test_compare_counts_decisions_verdicts_and_auc() -> None:
    cams = np.random.default_rng(1).random((4, 2, 2))
    ref = _outputs([0.1, 0.45, 0.6, 0.9], [1.0, 2.0, 3.0, 9.0], cams)
    got = _outputs([0.11, 0.51, 0.6, 0.9], [1.0, 2.0, 3.5, float("nan")], cams)
    n = compare(ref, got, np.array([0, 0, 1, 1]), threshold=0.5, ood_threshold=3.2, heatmap_scale=1.0)
    assert n["images"] == 4 and n["probability_max_abs_diff"] == pytest.approx(0.06, abs=1e-6)
    assert n["decision_agreement"] == 0.75  # 0.45 -> 0.51 crosses the threshold
    assert n["ood_verdict_agreement"] == 0.75  # 3.0 -> 3.5 crosses; NaN is outside, as 9.0 was
    assert n["auc_fp32"] == n["auc"] == 1.0 and n["auc_abs_diff"] == 0.0
    assert n["gradcam_mean_pearson"] == pytest.approx(1.0)
    bad = failures(n)
    assert bad == ["probability_max_abs_diff 0.06 (limit <= 0.02)", "decision_agreement 0.75 (limit >= 0.99)",
                   "ood_verdict_agreement 0.75 (limit >= 0.99)"]
    with pytest.raises(ExportError, match=r"^int8 model differs from the fp32 model on 4 test images: "
                                          r"probability_max_abs_diff 0.06 .*; no model written$"):
        check_limits(n, "int8")


def test_limits_are_the_issues_and_missing_auc_is_not_a_failure() -> None:
    assert LIMITS == {"probability_max_abs_diff": ("max", 0.02), "gradcam_mean_pearson": ("min", 0.95),
                      "auc_abs_diff": ("max", 0.005), "decision_agreement": ("min", 0.99),
                      "ood_verdict_agreement": ("min", 0.99)}
    numbers = {"images": 3, "probability_max_abs_diff": 0.01, "gradcam_mean_pearson": 0.99, "auc_abs_diff": None,
               "decision_agreement": 1.0, "ood_verdict_agreement": 1.0}
    assert failures(numbers) == []
    check_limits(numbers, "fp16")
    assert failures({**numbers, "gradcam_mean_pearson": float("nan")}) == [
        "gradcam_mean_pearson nan (limit >= 0.95)"]
