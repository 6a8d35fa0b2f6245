"""The probability at the hospital's prevalence, with the exported test model and ONNX Runtime:
the prior-shift correction's calibration at 10% prevalence, and a recalibration from the
dashboard's feedback that the worker loads and reports with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from pydicom import dcmread

from cxr_contract.pixels import resize_for_model, to_unit_range
from cxr_contract.prevalence import log_odds
from tests.helpers import walk
from trainer import stats
from trainer.cli import main as cxr_train
from trainer.dicom_phantoms import cr_dataset
from trainer.phantoms import make_phantom
from worker.cli import main as cxr_worker
from worker.config import get_settings
from worker.dashboard.accounts import Accounts
from worker.model import OnnxModel
from worker.pipeline import Processor, Result, process_files
from worker.store import NewResult, ResultStore

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent.parent


def phantom_inputs(n: int, positive: bool, seed: int, size: int) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(seed)
    return np.stack([resize_for_model(to_unit_range(make_phantom(rng, 128, positive)[0]), size)[..., None]
                     for _ in range(n)]).astype(np.float32)


def test_prior_shift_correction_halves_the_ece_at_ten_percent_prevalence(onnx_model: Path) -> None:
    """Calibrated on balanced phantoms (50%), scored on a 10%-prevalence set: the correction's
    ECE is at most half the uncorrected one, and the worker's corrected answers keep every decision."""
    session = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    size = session.get_inputs()[0].shape[1]

    def logits(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return session.run(["logit"], {"image": x})[0].reshape(-1).astype(np.float64)

    z_val = np.r_[logits(phantom_inputs(50, True, 1, size)), logits(phantom_inputs(50, False, 2, size))]
    temperature = stats.fit_temperature(np.r_[np.ones(50), np.zeros(50)], z_val)
    test = np.concatenate([phantom_inputs(20, True, 3, size), phantom_inputs(180, False, 4, size)])
    y, z = np.r_[np.ones(20), np.zeros(180)], logits(test)
    uncorrected = stats.sigmoid(z / temperature)
    corrected = stats.sigmoid(z / temperature + log_odds(0.1) - log_odds(0.5))
    ece_u, ece_c = stats.expected_calibration_error(y, uncorrected), stats.expected_calibration_error(y, corrected)
    print(f"\nECE at 10% prevalence (n=200, 20 positive; T={temperature:.3g}, AUC {stats.auc(y, z):.3f}): "
          f"uncorrected {ece_u:.4f}, corrected {ece_c:.4f}")
    assert ece_c <= ece_u / 2

    # The worker: the test model records no prevalence (exported with a threshold by hand), so it
    # assumes its training split's, 50%; at 10% every probability drops and no decision changes.
    plain, site = OnnxModel(onnx_model, providers="cpu"), OnnxModel(onnx_model, providers="cpu", site_prevalence=0.1)
    assert plain.info.assumed_prevalence == pytest.approx(0.5) and site.info.assumed_prevalence == 0.1
    assert site.info.threshold < plain.info.threshold
    before, after = plain.predict(test[:40]), site.predict(test[:40])
    assert [b.probability >= plain.info.threshold for b in before] == [a.probability >= site.info.threshold
                                                                      for a in after]
    assert all(a.probability < b.probability or b.probability > 0.9999 for a, b in zip(after, before, strict=True))


def _record(store: ResultStore, processor: Processor, path: Path, result: Result) -> int:
    ds = dcmread(path)
    info = processor.model.info
    rid = store.record(NewResult(
        study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
        sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, accession_number="ACC",
        patient_id=ds.PatientID, patient_name=str(ds.PatientName), probability=result.probability,
        decision="withheld" if result.withheld else "positive" if result.positive else "negative",
        threshold=info.threshold, model_name=info.name, model_version=info.version, ood_gate=result.gate,
        ood_score=result.ood_score, faithfulness=result.faithfulness), result.unit_image, result.gradcam)
    assert rid is not None
    return rid


@pytest.mark.timeout(600)
def test_recalibration_from_dashboard_feedback_is_loaded_and_reported_by_the_worker(
        tmp_path: Path, onnx_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(f"""
[spool]
dir = "{tmp_path / 'spool'}"
reserve_mb = 0
[model]
path = "{onnx_model}"
faithfulness = false
ood_action = "flag"
[select]
min_size = 32
[audit]
path = "{tmp_path / 'audit.jsonl'}"
[feedback]
pseudonym_key_file = "{tmp_path / 'keys' / 'feedback.key'}"
""")
    settings = get_settings(config)
    studies = tmp_path / "studies"
    studies.mkdir()
    rng = np.random.default_rng(5)
    truth = {}
    for i in range(44):  # 22 patients of each class: above the 20 a recalibration needs
        label = i % 2
        path = studies / f"{i}.dcm"
        cr_dataset(make_phantom(rng, 128, bool(label))[0], patient_id=f"PREV{i:04d}",
                   patient_name=f"PREV^Patient^{i}").save_as(path, enforce_file_format=True)
        truth[path] = label
    processor = Processor(settings, OnnxModel(onnx_model, providers="cpu"))
    store = ResultStore(settings.dashboard.store_url(settings.spool.dir),
                        settings.dashboard.store_media(settings.spool.dir))
    reader = Accounts(store).add_user("reader.one", "reader", "correct horse")
    for path, result in process_files(list(truth), processor):
        assert isinstance(result, Result), f"{path}: {result}"
        rid = _record(store, processor, path, result)
        label = "pneumonia" if truth[path] else "no_pneumonia"
        store.add_feedback(rid, reader.id, result.positive == bool(truth[path]), label)
    store.close()
    feedback = tmp_path / "export"
    assert cxr_worker(["feedback", "export", "--config", str(config), "--out", str(feedback)]) == 0
    capsys.readouterr()

    site_model = tmp_path / "site.onnx"
    assert cxr_train(["recalibrate", "--model", str(onnx_model), "--feedback", str(feedback), "--out", str(site_model),
                      "--prevalence", "0.1", "--model-version", "test-1+site"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):])
    assert (report["images"], report["positives"], report["prevalence"]) == (44, 22, 0.1)
    assert report["ece"]["after"]["value"] <= report["ece"]["before"]["value"] + 1e-9
    assert report["ece"]["after"]["ci95"] is not None and site_model.with_suffix(".reliability.png").is_file()
    assert json.loads(site_model.with_suffix(".recalibration.json").read_text())["version"] == "test-1+site"

    # The worker loads it: new version, same weights, the site's prevalence on the SR.
    model = OnnxModel(site_model, providers="cpu")
    original = OnnxModel(onnx_model, providers="cpu")
    assert model.info.version == "test-1+site" and model.info.weights_sha256 == original.info.weights_sha256
    assert model.info.assumed_prevalence == 0.1
    _, result = next(process_files([next(iter(truth))], Processor(settings, model)))
    assert isinstance(result, Result)
    prevalence = [float(i.MeasuredValueSequence[0].NumericValue) for i in walk(result.sr.ContentSequence)
                  if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "PREVALENCE"]
    assert prevalence == [10.0]

    # The worker's start-up log names the prevalence it reports at and the model card it has
    # (none: the test model was exported with a threshold by hand, without evaluate's card).
    env = {**os.environ, "CXR_MODEL__PATH": str(site_model), "CXR_SELECT__MIN_SIZE": "32"}
    run = subprocess.run([sys.executable, "-m", "worker.cli", "process", str(next(iter(truth))), "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = (run.stdout + run.stderr).splitlines()
    loaded = json.loads(next(line for line in lines if '"model loaded"' in line))
    assert loaded["prevalence"] == 0.1 and loaded["model_prevalence"] == 0.5 and loaded["version"] == "test-1+site"
    assert any('"model card"' in line and "exported before model cards" in line for line in lines)
