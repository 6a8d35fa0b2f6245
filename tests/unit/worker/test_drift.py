"""The worker's drift window (worker.drift) and the metrics it sets (worker.metrics)."""

from __future__ import annotations

import json

import numpy as np

from cxr_contract.model import Meta, ModelInfo
from worker.config import DriftSection
from worker.drift import DriftMonitor
from worker.metrics import Metrics

META = {Meta.NAME: "m", Meta.VERSION: "2.0", Meta.INPUT_SIZE: "64", Meta.THRESHOLD: "0.5",
        Meta.WEIGHTS_SHA256: "0" * 64, Meta.CONTRACT_VERSION: "2", Meta.OOD_THRESHOLD: "70",
        Meta.HEATMAP_SCALE: "1", Meta.OOD_METHOD: json.dumps({"false_gate_bound": 0.01})}


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


def test_a_reference_from_a_handful_of_validation_images_gives_no_psi() -> None:
    from cxr_contract.drift import MIN_REFERENCE, reference_of

    small = reference_of(np.linspace(0.2, 0.6, 8), np.linspace(50, 70, 8))
    info = ModelInfo.from_metadata({**META, Meta.DRIFT_REFERENCE: small.to_json()}, "m.onnx")
    monitor = DriftMonitor(info, DriftSection(window=60, min_images=10))
    states = [monitor.observe(0.9, ood_gated=False) for _ in range(30)]  # all in one bin: would alarm
    assert all(s.psi is None and not s.psi_alarm for s in states)
    assert monitor.describe()["reference"] == f"reference too small (n=8 < {MIN_REFERENCE} validation images)"
    assert monitor.describe()["has_reference"] is False


def test_the_reference_is_moved_to_the_site_s_prevalence_like_the_window() -> None:
    """The reference holds the graph's probabilities; the worker reports them moved to the site's
    prevalence. The same population must then give no drift, whichever way it is reported."""
    from cxr_contract.drift import reference_of
    from cxr_contract.prevalence import Adjustment, log_odds

    rng = np.random.default_rng(0)
    graph = 1 / (1 + np.exp(-rng.normal(0.0, 1.5, 600)))  # the graph's probabilities, one population
    reference = reference_of(graph[:300], np.full(300, 50.0))
    info = ModelInfo.from_metadata({**META, Meta.DRIFT_REFERENCE: reference.to_json()}, "m.onnx")
    site = Adjustment(temperature=1.0, from_prevalence=0.5, to_prevalence=0.05, threshold_logit=0.0)
    reported = [site.probability(log_odds(p)) for p in graph[300:]]
    settings = DriftSection(window=300, min_images=100)
    moved = DriftMonitor(info, settings, site)
    for p in reported:
        state = moved.observe(p, ood_gated=False)
    assert state.psi is not None and state.psi < 0.1 and not state.psi_alarm
    unmoved = DriftMonitor(info, settings)  # what the worker did before: graph bins, moved window
    for p in reported:
        state = unmoved.observe(p, ood_gated=False)
    assert state.psi is not None and state.psi_alarm


def test_faithfulness_buckets_are_multiples_of_the_model_s_cut_off() -> None:
    """A logit drop's scale differs by model (2.5 on one phantom model, 16 on another): the
    buckets say how far above or below "above chance" the maps fall, whatever the model."""
    metrics = Metrics(ood_threshold=70.0, faithfulness_cutoff=2.5)
    metrics.faithfulness.labels("2.0").observe(2.6)
    text = metrics.exposition().decode()
    assert 'cxr_heatmap_faithfulness_bucket{le="2.5",model_version="2.0"} 0.0' in text
    assert 'cxr_heatmap_faithfulness_bucket{le="2.75",model_version="2.0"} 1.0' in text
