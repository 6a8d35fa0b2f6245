"""Drift and gate alarms end to end: a worker fed its own phantoms stays quiet; fed a stream in
which a third of the images have inverted polarity, its gated-rate test crosses the alarm
condition within the window, and promtool's test of the shipped rule on the worker's own
numbers fires the alert."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.helpers import free_port, http, metric, phantom_file, require_tool, wait_for

pytestmark = pytest.mark.integration

RULES = Path(__file__).resolve().parent.parent.parent / "deploy" / "prometheus" / "cxr-gradcam.rules.yml"
WINDOW, QUIET, STREAM = 60, 30, 60
#: The alert rule's `for:` in minutes; the promtool test below reads one image per minute.
FOR_MINUTES = 5


def send(port: int, files: list[Path]) -> None:
    subprocess.run([require_tool("/usr/bin/storescu"), "-aet", "HOSPITAL", "-aec", "CXR-GRADCAM", "127.0.0.1",
                    str(port), *map(str, files)], check=True, capture_output=True, timeout=300)


def inverted(path: Path, seed: int) -> Path:
    """A phantom whose pixels are read with the opposite polarity (bone dark, lung bright)."""
    phantom_file(path, seed % 2 == 0, seed)
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(path, enforce_file_format=True)
    return path


def promtool_case(pvalues: list[float | None], alpha: float, fires_at: int) -> str:
    """A promtool unit test: the worker's p-value after each image, one image per minute; the
    alert's annotations as the rule writes them (Go's %.2g prints as Python's)."""
    values = " ".join("NaN" if p is None else repr(p) for p in pvalues)
    labels = '{instance="w",job="cxr",model_version="test"}'
    return json.dumps({
        "rule_files": [str(RULES)], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": [
            {"series": f"cxr_drift_gated_pvalue{labels}", "values": values},
            {"series": f"cxr_drift_gated_alpha{labels}", "values": f"{alpha}x{len(pvalues)}"}],
            "alert_rule_test": [
                {"eval_time": f"{fires_at - 1}m", "alertname": "CxrGatedRateAboveFalseGateRate", "exp_alerts": []},
                {"eval_time": f"{fires_at}m", "alertname": "CxrGatedRateAboveFalseGateRate", "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "instance": "w", "job": "cxr", "model_version": "test"},
                     "exp_annotations": {
                         "summary": "w: the out-of-distribution gate holds out more images than its false-gate "
                                    "rate explains",
                         "description": f"Model test: p = {pvalues[fires_at]:.2g} for the gated count in the drift "
                                        "window. New scanner, protocol, patient group or inverted images? The "
                                        "dashboard's operations page shows since when."}}]}]}]})


def test_quiet_on_phantoms_alarm_on_a_third_inverted(make_worker: Any, pacs: Any, tmp_path: Path) -> None:
    mport = free_port()
    # Every answer draws its heatmap, so each one is scored for faithfulness (a weak test model
    # may call every phantom negative, and only drawn heatmaps are scored).
    worker = make_worker([f"PACS@127.0.0.1:{pacs.port}"], metrics_port=mport,
                         extra=f"[drift]\nwindow = {WINDOW}\nmin_images = 20\n",
                         output_extra="heatmap_for_negative = true")
    quiet = [tmp_path / f"q{i}.dcm" for i in range(QUIET)]
    for i, path in enumerate(quiet):
        phantom_file(path, i % 2 == 0, 500 + i)
    send(worker.port, quiet)
    wait_for(lambda: metric(http(mport, "/metrics")[1], "cxr_instances_processed_total") >= QUIET, 180,
             "the phantoms answered")
    drift = json.loads(http(mport, "/drift")[1])
    state = drift["history"][-1]
    assert state["images"] == QUIET and not state["gated_alarm"] and not state["psi_alarm"], state
    assert not any(s["gated_alarm"] or s["psi_alarm"] for s in drift["history"])
    text = http(mport, "/metrics")[1]
    assert metric(text, "cxr_ood_score_count") == QUIET and metric(text, "cxr_predicted_probability_count") == QUIET
    if os.environ.get("CXR_TEST_MODEL") is None:  # the suite's own export writes the reference and cut-off
        assert drift["reference"] != "no reference"
        assert metric(text, "cxr_heatmap_faithfulness_count") > 0
    if not drift["has_reference"]:  # exported before references, or too few validation images
        assert metric(text, "cxr_drift_reference") == 0 and math.isnan(metric(text, "cxr_drift_psi"))
    else:
        assert metric(text, "cxr_drift_psi") <= drift["psi_limit"]

    # Two phantoms, one inverted, repeated: a third of the stream is out of distribution.
    stream = [inverted(tmp_path / f"s{i}.dcm", 600 + i) if i % 3 == 2 else tmp_path / f"s{i}.dcm"
              for i in range(STREAM)]
    for i, path in enumerate(stream):
        if i % 3 != 2:
            phantom_file(path, i % 2 == 0, 600 + i)
    send(worker.port, stream)
    wait_for(lambda: metric(http(mport, "/metrics")[1], "cxr_instances_processed_total") >= QUIET + STREAM, 240,
             "the stream answered")
    drift = json.loads(http(mport, "/drift")[1])
    after = drift["history"][QUIET:]
    first = next((i for i, s in enumerate(after) if s["gated_alarm"]), None)
    assert first is not None and first < WINDOW, [s["gated_p_value"] for s in after]
    print(f"\ntime to alarm: {first + 1} images into the stream (window {WINDOW}, false-gate rate "
          f"{drift['false_gate_rate']}, alpha {drift['gated_alpha']}); PSI after the phantoms: {state['psi']}, "
          f"after the stream: {after[-1]['psi']}")
    text = http(mport, "/metrics")[1]
    assert metric(text, "cxr_drift_gated_pvalue") < metric(text, "cxr_drift_gated_alpha")

    # The shipped rule, on the worker's own numbers: pending once the condition holds, firing
    # after `for:`, i.e. at the first run of FOR_MINUTES + 1 images all below alpha.
    pvalues = [s["gated_p_value"] for s in drift["history"]]
    below = [p is not None and p < drift["gated_alpha"] for p in pvalues]
    start = next(i for i in range(len(below)) if all(below[i:i + FOR_MINUTES + 1])
                 and i + FOR_MINUTES < len(below))
    case = tmp_path / "drift.test.yml"
    case.write_text(promtool_case(pvalues, drift["gated_alpha"], start + FOR_MINUTES))
    out = subprocess.run([require_tool("/usr/bin/promtool"), "test", "rules", str(case)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert worker.stop() == 0
