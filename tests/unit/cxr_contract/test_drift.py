"""Drift references and statistics (cxr_contract.drift) and the model metadata that carries them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cxr_contract.drift import DriftReference, binomial_sf, bins_of, psi, reference_of
from cxr_contract.model import ContractError, Meta, ModelInfo

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
