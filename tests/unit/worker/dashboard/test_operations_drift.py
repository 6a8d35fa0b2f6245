"""The operations page's drift index and gated-rate test, read from a real worker endpoint
(worker.metrics.HealthServer serving a DriftMonitor's /drift) by the dashboard's snapshot."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cxr_contract.drift import reference_of
from cxr_contract.model import Meta, ModelInfo
from worker.config import DriftSection, get_settings
from worker.dashboard import operations
from worker.dashboard.app import Dashboard
from worker.drift import DriftMonitor
from worker.metrics import HealthServer, Metrics
from worker.store import ResultStore

META = {Meta.NAME: "m", Meta.VERSION: "2.0", Meta.INPUT_SIZE: "64", Meta.THRESHOLD: "0.5",
        Meta.WEIGHTS_SHA256: "0" * 64, Meta.CONTRACT_VERSION: "2", Meta.OOD_THRESHOLD: "70",
        Meta.HEATMAP_SCALE: "1", Meta.OOD_METHOD: json.dumps({"false_gate_bound": 0.01})}


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[Dashboard]:
    config = tmp_path / "worker.toml"
    config.write_text(f'[spool]\ndir = "{tmp_path / "spool"}"\n[audit]\npath = "{tmp_path / "audit.jsonl"}"\n')
    settings = get_settings(config)
    store = ResultStore.from_settings(settings)
    yield Dashboard(settings, store)
    store.close()


def serve(monitor: DriftMonitor) -> HealthServer:
    server = HealthServer(Metrics(), "127.0.0.1", 0, lambda: True, dict, drift=monitor.describe)
    server.start()
    return server


def page(d: Dashboard, snap: operations.Snapshot) -> str:
    return d.templates.get_template("operations.html").render(s=snap, names=operations.WORKER_METRICS, user=None,
                                                             csrf="", path="/operations")


def test_the_page_shows_the_gated_rate_alarm_and_no_reference(dashboard: Dashboard) -> None:
    monitor = DriftMonitor(ModelInfo.from_metadata(META, "m.onnx"), DriftSection(window=60, min_images=10))
    for i in range(30):
        monitor.observe(0.3, ood_gated=i % 3 == 2)
    server = serve(monitor)
    try:
        snap = operations.snapshot(dashboard.store, f"http://127.0.0.1:{server.port}/metrics")
    finally:
        server.stop()
    assert snap.drift_now["gated_alarm"] and snap.drift["reference"] == "no reference"
    html = page(dashboard, snap)
    assert 'class="tile alert" id="drift-gated"' in html and "ALARM: 10 of 30 gated" in html
    assert "no reference" in html
    assert b"no reference" in operations.plot_psi(snap)
    assert b"<svg" in operations.plot_gated(snap) and b"no images yet" not in operations.plot_gated(snap)


def test_the_page_plots_the_drift_index_once_the_window_fills(dashboard: Dashboard) -> None:
    rng = np.random.default_rng(0)
    ref = reference_of(rng.beta(2, 5, 400), rng.gamma(20, 3, 400))
    info = ModelInfo.from_metadata({**META, Meta.DRIFT_REFERENCE: ref.to_json()}, "m.onnx")
    monitor = DriftMonitor(info, DriftSection(window=100, min_images=50))
    for p in rng.beta(5, 2, 120):  # a shifted population: the index passes its limit
        monitor.observe(float(p), ood_gated=False)
    server = serve(monitor)
    try:
        snap = operations.snapshot(dashboard.store, f"http://127.0.0.1:{server.port}/metrics")
    finally:
        server.stop()
    assert snap.drift_now["psi_alarm"] and not snap.drift_now["gated_alarm"]
    assert 'class="tile alert" id="drift-psi"' in page(dashboard, snap)
    assert b"collecting" not in operations.plot_psi(snap)


def test_without_the_worker_the_page_says_so(dashboard: Dashboard) -> None:
    snap = operations.snapshot(dashboard.store, None)
    assert snap.drift == {} and "Drift index" in page(dashboard, snap)
    assert b"worker not reachable" in operations.plot_psi(snap)
