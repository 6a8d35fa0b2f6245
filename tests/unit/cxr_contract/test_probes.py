"""The probe record a reduced-precision model carries for the worker's load-time check."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_contract.probes import Probes, as_probe_inputs

LIMITS = {"probability_max_abs_diff": ("max", 0.02), "gradcam_mean_pearson": ("min", 0.95),
          "ood_score_max_rel_diff": ("max", 0.25), "auc_abs_diff": ("max", 0.005)}


def _probes() -> Probes:
    rng = np.random.default_rng(0)
    inputs = as_probe_inputs(rng.random((3, 32, 32, 1)))
    return Probes(inputs, np.array([0.1, 0.5, 0.9]), rng.random((3, 2, 2)), np.array([50.0, 60.0, 70.0]), LIMITS)


def test_probes_survive_their_json_exactly() -> None:
    probes = _probes()
    back = Probes.from_json(probes.to_json())
    np.testing.assert_array_equal(back.inputs, probes.inputs)  # the 256 levels the model ran on
    np.testing.assert_allclose(back.gradcam, probes.gradcam, atol=1e-7)
    assert back.limits == LIMITS and list(back.probability) == [0.1, 0.5, 0.9]


def test_the_checked_limits_name_each_miss() -> None:
    probes = _probes()
    same = probes.differences(probes.probability, probes.gradcam, probes.ood_score, 1.0)
    assert same == {"probability_max_abs_diff": 0.0, "gradcam_mean_pearson": pytest.approx(1.0),
                    "ood_score_max_rel_diff": 0.0} and probes.failures(same) == []
    off = probes.differences(probes.probability + 0.05, -probes.gradcam, probes.ood_score * 1.5, 1.0)
    assert probes.failures(off) == ["probability_max_abs_diff 0.05 (limit <= 0.02)",
                                    "gradcam_mean_pearson -1 (limit >= 0.95)",
                                    "ood_score_max_rel_diff 0.5 (limit <= 0.25)"]
    nan = probes.differences(probes.probability, probes.gradcam, np.full(3, np.nan), 1.0)
    assert probes.failures(nan) == ["ood_score_max_rel_diff nan (limit <= 0.25)"]


@pytest.mark.parametrize("text", ["", "{}", '{"shape": [1, 2, 2], "inputs_uint8_zlib_b64": "eJw="}', "[1]"])
def test_a_broken_probe_record_is_one_clear_error(text: str) -> None:
    with pytest.raises(ValueError, match="^probes metadata"):
        Probes.from_json(text)
