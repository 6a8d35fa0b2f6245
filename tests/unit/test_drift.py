"""Drift references and statistics (cxr_contract.drift), the model metadata that carries them,
and the worker's sliding window (worker.drift)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cxr_contract.drift import DriftReference, binomial_sf, bins_of, psi, reference_of
from cxr_contract.model import ContractError, Meta, ModelInfo
from worker.config import DriftSection
from worker.drift import DriftMonitor
from worker.metrics import Metrics

META = {Meta.NAME: "m", Meta.VERSION: "2.0", Meta.INPUT_SIZE: "64", Meta.THRESHOLD: "0.5",
        Meta.WEIGHTS_SHA256: "0" * 64, Meta.CONTRACT_VERSION: "2", Meta.OOD_THRESHOLD: "70",
        Meta.HEATMAP_SCALE: "1", Meta.OOD_METHOD: json.dumps({"false_gate_bound": 0.01})}


def test_binomial_tail_matches_the_direct_sum() -> None:
    for n, k, p in ((10, 3, 0.01), (500, 12, 0.01), (60, 20, 0.111), (5, 0, 0.3), (5, 6, 0.3)):
        direct = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))
        assert binomial_sf(k, n, p) == pytest.approx(direct, rel=1e-9, abs=1e-300)
    assert binomial_sf(0, 0, 0.5) == 1.0


def test_psi_is_small_for_the_same_distribution_and_large_for_a_shifted_one() -> None:
    rng = np.random.default_rng(0)
    ref = bins_of(rng.beta(2, 5, 2000))
    assert len(ref.fractions) == 10 and sum(ref.fractions) == pytest.approx(1.0)
    assert psi(ref, rng.beta(2, 5, 500)) < 0.05
    assert psi(ref, rng.beta(5, 2, 500)) > 1.0
    # one value per bin at least, even for a tiny validation split; ties merge into one bin
    assert len(bins_of(np.arange(8.0)).fractions) == 2
    assert bins_of(np.zeros(50)).edges == (0.0,)


def test_reference_round_trips_through_model_metadata() -> None:
    rng = np.random.default_rng(1)
    ref = reference_of(rng.random(300), rng.gamma(20, 3, 300))
    info = ModelInfo.from_metadata({**META, Meta.DRIFT_REFERENCE: ref.to_json()}, "m.onnx")
    assert info.drift_reference == DriftReference.from_json(ref.to_json()) and info.drift_reference.n == 300
    assert info.false_gate_rate == 0.01


def test_older_models_load_without_a_reference_and_a_bad_one_is_named() -> None:
    old = {k: v for k, v in META.items() if k != Meta.OOD_METHOD}
    info = ModelInfo.from_metadata(old, "old.onnx")
    assert info.drift_reference is None and info.false_gate_rate is None
    with pytest.raises(ContractError, match="bad.onnx: drift_reference is not a drift reference"):
        ModelInfo.from_metadata({**META, Meta.DRIFT_REFERENCE: '{"n": 3}'}, "bad.onnx")


def test_monitor_alarms_on_a_gated_third_and_says_no_reference() -> None:
    info = ModelInfo.from_metadata(META, "m.onnx")  # no reference: the PSI stays None
    monitor = DriftMonitor(info, DriftSection(window=60, min_images=10))
    states = [monitor.observe(0.3, ood_gated=i % 3 == 2) for i in range(60)]
    first = next(i for i, s in enumerate(states) if s.gated_alarm) + 1
    assert first <= 12 and states[-1].gated == 20 and states[-1].psi is None
    assert monitor.describe()["reference"] == "no reference"
    quiet = DriftMonitor(info, DriftSection(window=60, min_images=10))
    assert not any(quiet.observe(0.3, ood_gated=False).gated_alarm for _ in range(200))


def test_metrics_export_the_window_and_nan_without_a_reference() -> None:
    info = ModelInfo.from_metadata(META, "m.onnx")
    metrics, settings = Metrics(ood_threshold=70.0), DriftSection()
    metrics.drift_limits("2.0", settings, has_reference=False, false_gate_rate=info.false_gate_rate)
    metrics.drift("2.0", DriftMonitor(info, settings).observe(0.4, ood_gated=True))
    text = metrics.exposition().decode()
    assert 'cxr_drift_reference{model_version="2.0"} 0.0' in text
    assert 'cxr_drift_psi{model_version="2.0"} NaN' in text
    assert 'cxr_drift_gated_pvalue{model_version="2.0"} 0.01' in text
    assert 'cxr_ood_score_bucket{le="70.0",model_version="2.0"}' not in text  # no observation yet
    metrics.ood_score.labels("2.0").observe(71.0)
    assert 'cxr_ood_score_bucket{le="77.0",model_version="2.0"} 1.0' in metrics.exposition().decode()
