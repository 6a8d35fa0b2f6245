"""The Mahalanobis gate: its graph ops equal the textbook distance, and the conformal
threshold holds its false-gate rate on fresh in-distribution draws."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from sklearn.covariance import LedoitWolf

from trainer.errors import ExportError
from trainer.ood import conformal_threshold, fit_gate


def features(rng: np.random.Generator, n: int, c: int = 40) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 2, n)
    mix = rng.normal(size=(c, c)) / np.sqrt(c)  # correlated features
    x = rng.normal(size=(n, c)) @ mix + 3.0 * y[:, None] * (np.arange(c) < 5)
    return x, y


def test_score_is_the_smallest_class_mahalanobis_distance_in_graph_and_numpy() -> None:
    rng = np.random.default_rng(0)
    x, y = features(rng, 300)
    gate = fit_gate(x, y)
    means = np.stack([x[y == k].mean(0) for k in (0, 1)])
    cov = LedoitWolf(assume_centered=True).fit(x - means[y]).covariance_
    precision = np.linalg.inv(cov)
    probe = np.concatenate([x[:5], rng.normal(size=(5, 40)) * 4])
    expected = np.sqrt(np.min([np.einsum("nc,cd,nd->n", probe - m, precision, probe - m) for m in means], axis=0))
    np.testing.assert_allclose(gate.score(probe), expected, rtol=1e-8)
    graph = tf.function(gate.tf_score)(tf.constant(probe, tf.float32)).numpy()
    np.testing.assert_allclose(graph, expected, rtol=1e-4)
    assert 0 < gate.shrinkage < 1 and gate.n_train == 300


def test_far_features_score_higher_than_held_out_ones() -> None:
    rng = np.random.default_rng(1)
    x, y = features(rng, 400)
    gate = fit_gate(x[:300], y[:300])
    held_out = gate.score(x[300:])
    assert (gate.score(x[300:] + 5.0) > held_out.max()).all()
    assert (gate.score(np.zeros((1, 40)) - 10) > held_out.max()).all()


def test_conformal_threshold_keeps_its_false_gate_rate() -> None:
    rng = np.random.default_rng(2)
    gated = []
    for _ in range(400):
        thr, bound = conformal_threshold(rng.normal(size=99), 0.05)
        assert bound == 0.05
        gated.append(np.mean(rng.normal(size=200) > thr))
    # Expected rate 1 - 95/100 = 0.05 exactly for continuous exchangeable scores.
    assert 0.04 < np.mean(gated) <= 0.055


def test_too_few_scores_fall_back_to_the_maximum_and_say_so() -> None:
    thr, bound = conformal_threshold(np.arange(10.0), 0.01)
    assert thr == 9.0 and bound == pytest.approx(1 / 11)
    thr, _ = conformal_threshold(np.arange(199.0), 0.05)
    assert thr == 189.0  # ceil(200 * 0.95) = 190th smallest


def test_constant_features_are_refused() -> None:
    with pytest.raises(ExportError, match="constant"):
        fit_gate(np.zeros((20, 8)), np.arange(20) % 2)
