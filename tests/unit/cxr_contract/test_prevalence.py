"""The probability at a site's prevalence: the prior-shift arithmetic, the contract's keys and
the printed precision."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cxr_contract.model import ContractError, Meta, ModelInfo
from cxr_contract.prevalence import (
    Adjustment,
    decision_digits,
    format_pair,
    log_odds,
    percent,
    sensitivity_curve,
    sigmoid,
    threshold_for_sensitivity,
)

BASE = {Meta.NAME: "m", Meta.VERSION: "1", Meta.INPUT_SIZE: "64", Meta.THRESHOLD: "0.4",
        Meta.WEIGHTS_SHA256: "ab" * 32}


def test_an_image_without_evidence_gets_the_prevalence() -> None:
    # Likelihood ratio 1 (probability 0.5 at 50%): at 10% prevalence it is 0.1, as Bayes says.
    adj = Adjustment(temperature=1.0, from_prevalence=0.5, to_prevalence=0.1, threshold_logit=0.0)
    assert adj.probability(0.0) == pytest.approx(0.1)
    # 0.9 at 50% (odds 9): at 10% the odds are 9 x 1/9 = 1.
    assert adj.probability(log_odds(0.9)) == pytest.approx(0.5)


def test_moving_the_threshold_with_the_shift_keeps_every_decision() -> None:
    z = np.random.default_rng(0).normal(0, 3, 2000)
    t = 0.37
    adj = Adjustment(temperature=1.0, from_prevalence=0.5, to_prevalence=0.07, threshold_logit=log_odds(t))
    before = sigmoid_all(z) >= t
    after = np.array([adj.probability(v) for v in z]) >= adj.threshold
    assert np.array_equal(before, after) and adj.threshold < t


def sigmoid_all(z: np.ndarray) -> np.ndarray:
    return np.array([sigmoid(v) for v in z])


def test_threshold_for_a_target_sensitivity() -> None:
    curve = sensitivity_curve([3.0, 2.0, 1.0, 0.0, -1.0])
    assert threshold_for_sensitivity(curve, 0.8) == 0.0
    assert threshold_for_sensitivity(curve, 1.0) == -1.0
    assert np.mean(np.array([3.0, 2.0, 1.0, 0.0, -1.0]) >= threshold_for_sensitivity(curve, 0.6)) >= 0.6


def test_printed_probability_and_threshold_show_the_decision() -> None:
    # The SC once read "P(pneumonia) = 0.499 ... POSITIVE (threshold 0.50)" for 0.49945 against 0.49918.
    assert format_pair(0.49945, 0.49918) == ("0.4995", "0.4992")
    assert format_pair(0.49918, 0.49945) == ("0.4992", "0.4995")
    assert format_pair(0.9, 0.5) == ("0.900", "0.500")
    p, t = 0.1234567891, 0.1234567890
    shown = format_pair(p, t)
    assert float(shown[0]) > float(shown[1]) and decision_digits(p, t) == 10
    assert [percent(v) for v in (0.1, 0.025, 0.004, 0.5)] == ["10%", "2.5%", "0.4%", "50%"]


def test_older_model_assumes_its_training_split_prevalence() -> None:
    data = {"splits": {"train": {"by_class": {"0": {"images": 30}, "1": {"images": 10}}}}}
    info = ModelInfo.from_metadata({**BASE, Meta.TRAINING_DATA: json.dumps(data)}, "old.onnx")
    assert info.prevalence == pytest.approx(0.25) and info.assumed_prevalence == pytest.approx(0.25)
    assert ModelInfo.from_metadata(BASE, "bare.onnx").prevalence is None
    with pytest.raises(ContractError, match="does not record the prevalence"):
        ModelInfo.from_metadata(BASE, "bare.onnx").adjustment(site_prevalence=0.1)


def test_site_prevalence_moves_the_threshold_and_a_target_sensitivity_sets_it() -> None:
    curve = sensitivity_curve([2.0, 1.0, 0.5, -0.5])
    meta = {**BASE, Meta.PREVALENCE: "0.5", Meta.OPERATING_POINT: json.dumps({"curve": curve})}
    info = ModelInfo.from_metadata(meta, "m.onnx")
    adj = info.adjustment(site_prevalence=0.1)
    assert adj is not None
    reported = info.reporting(adj)
    assert reported.assumed_prevalence == 0.1 and reported.prevalence == 0.5
    assert reported.threshold == pytest.approx(sigmoid(log_odds(0.4) + log_odds(0.1) - log_odds(0.5)))
    by_sensitivity = info.adjustment(site_prevalence=0.1, target_sensitivity=1.0)
    assert by_sensitivity is not None and by_sensitivity.threshold_logit == -0.5
    with pytest.raises(ContractError, match="sensitivity"):
        ModelInfo.from_metadata(BASE | {Meta.PREVALENCE: "0.5"}, "m.onnx").adjustment(target_sensitivity=0.9)


def test_site_calibration_is_applied_on_top_of_the_graph() -> None:
    site = {"temperature": 2.0, "prevalence": 0.1, "threshold_logit": 0.3}
    info = ModelInfo.from_metadata({**BASE, Meta.PREVALENCE: "0.5", Meta.SITE_CALIBRATION: json.dumps(site)}, "s")
    adj = info.adjustment()
    assert adj is not None and adj.to_prevalence == 0.1
    assert adj.logit(1.0) == pytest.approx(0.5 + log_odds(0.1))
    assert info.reporting(adj).threshold == pytest.approx(sigmoid(0.15 + log_odds(0.1)))
    with pytest.raises(ContractError, match="site_calibration"):
        ModelInfo.from_metadata({**BASE, Meta.SITE_CALIBRATION: json.dumps({"temperature": 1})}, "s")


def test_log_odds_refuses_certainty() -> None:
    with pytest.raises(ValueError, match="0 < p < 1"):
        log_odds(1.0)
    assert math.isclose(sigmoid(-800.0), 0.0, abs_tol=1e-300)
