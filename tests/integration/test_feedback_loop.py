"""The feedback loop end to end: the worker answers phantom studies and records them in the
results store, readers' feedback is recorded through the store's API (the browser part is
the dashboard's own test), ``cxr-worker feedback export`` writes the de-identified folder,
``cxr-train prepare --feedback`` merges it into a phantom set, and ``fit`` (1 epoch, 64 px)
and ``evaluate`` run on the result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread

from cxr_contract.feedback import read_export
from trainer.cli import main as cxr_train
from trainer.data import SPLITS, load_dataset
from trainer.dicom_phantoms import cr_dataset
from trainer.phantoms import make_phantom
from worker.cli import main as cxr_worker
from worker.config import get_settings
from worker.dashboard.accounts import Accounts
from worker.model import OnnxModel
from worker.pipeline import Decoded, Processor, Result, process_files
from worker.store import NewResult, ResultStore

pytestmark = pytest.mark.integration

#: Four fictional patients with two films each, the first positive and the second negative.
PATIENTS = [(f"LOOP^Patient^{chr(65 + p)}", f"LOOPMRN{p:04d}") for p in range(4)]


def _studies(folder: Path) -> list[tuple[Path, int]]:
    folder.mkdir()
    rng = np.random.default_rng(21)
    files = []
    for p, (name, pid) in enumerate(PATIENTS):
        for k, label in enumerate((1, 0)):
            image, _ = make_phantom(rng, 128, bool(label))
            ds = cr_dataset(image, patient_id=pid, patient_name=name)
            ds.AccessionNumber = f"LOOPACC{p}{k}"
            path = folder / f"{p}-{k}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append((path, label))
    return files


def _record(store: ResultStore, processor: Processor, path: Path, result: Result) -> int:
    """What the worker records per answered instance (its raw Grad-CAM grid included)."""
    ds = dcmread(path)
    decoded = processor.decode(path)
    assert isinstance(decoded, Decoded)
    grid = processor.model.predict(decoded.model_input[None])[0].gradcam
    rid = store.record(NewResult(
        study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
        sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, accession_number=ds.AccessionNumber,
        patient_id=ds.PatientID, patient_name=str(ds.PatientName), probability=result.probability,
        decision="withheld" if result.withheld else "positive" if result.positive else "negative",
        threshold=processor.model.info.threshold, model_name=processor.model.info.name,
        model_version=processor.model.info.version, ood_gate=result.gate, ood_score=result.ood_score,
        faithfulness=result.faithfulness), result.unit_image, grid)
    assert rid is not None
    return rid


def _json(capsys: pytest.CaptureFixture[str]) -> Any:
    out = capsys.readouterr().out
    return out, json.loads(out[out.index("{"):])


@pytest.mark.timeout(600)
def test_worker_results_to_feedback_to_a_trained_and_evaluated_model(
        tmp_path: Path, onnx_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(f"""
[spool]
dir = "{tmp_path / 'spool'}"
reserve_mb = 0
[model]
path = "{onnx_model}"
[select]
min_size = 32
[audit]
path = "{tmp_path / 'audit.jsonl'}"
[feedback]
pseudonym_key_file = "{tmp_path / 'keys' / 'feedback.key'}"
""")
    settings = get_settings(config)
    studies = _studies(tmp_path / "studies")
    truth = {path: label for path, label in studies}
    processor = Processor(settings, OnnxModel(onnx_model))
    store = ResultStore(settings.dashboard.store_url(settings.spool.dir),
                        settings.dashboard.store_media(settings.spool.dir))
    results = {}
    for path, result in process_files([p for p, _ in studies], processor):
        assert isinstance(result, Result), f"{path}: {result}"
        results[path] = _record(store, processor, path, result)

    # Readers: both call the first film of patient A differently (a tie), both are unsure of
    # the second; every other film gets the right label, one after a change of mind.
    accounts = Accounts(store)
    r1 = accounts.add_user("reader.one", "reader", "correct horse")
    r2 = accounts.add_user("reader.two", "reader", "pw" * 5)
    paths = [p for p, _ in studies]
    names = {1: "pneumonia", 0: "no_pneumonia"}
    store.add_feedback(results[paths[0]], r1.id, True, "pneumonia", "looks like LOOP^Patient^A's old film")
    store.add_feedback(results[paths[0]], r2.id, False, "no_pneumonia")
    store.add_feedback(results[paths[1]], r1.id, False, "uncertain")
    store.add_feedback(results[paths[1]], r2.id, False, "uncertain")
    store.add_feedback(results[paths[2]], r1.id, False, "uncertain")  # r1 changes their mind below
    for path in paths[2:]:
        for reader in (r1, r2):
            store.add_feedback(results[path], reader.id, True, names[truth[path]])
    store.close()

    fb = tmp_path / "export"
    assert cxr_worker(["feedback", "export", "--config", str(config), "--out", str(fb)]) == 0
    _out, report = _json(capsys)
    assert (report["results"], report["labels"], report["images"], report["skipped"]) == (8, 16, 8, 0)
    export = read_export(fb)
    assert len({lab.patient_key for lab in export.labels}) == 4
    blob = b"".join(p.read_bytes() for p in fb.rglob("*") if p.is_file())
    phi = {"19700101", "reader.one", "reader.two", *(v for pair in PATIENTS for v in pair), *(
        str(getattr(dcmread(p), tag)) for p in paths
        for tag in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "AccessionNumber", "StudyDate"))}
    leaked = [v for v in phi if v.encode() in blob]
    assert not leaked, f"PHI in the export: {leaked}"

    base, merged, run = tmp_path / "base", tmp_path / "merged", tmp_path / "run"
    assert cxr_train(["phantoms", "--out", str(base), "--n", "16", "--size", "128", "--seed", "5"]) == 0
    capsys.readouterr()
    assert cxr_train(["prepare", "--base", str(base), "--feedback", str(fb), "--out", str(merged)]) == 0
    out, _splits = _json(capsys)
    assert out.startswith("feedback: 16 labels by 2 readers on 8 images from 1 export(s): 0 dataset labels "
                          "overridden, 0 confirmed, 6 images added"), out
    assert "2 excluded (1 readers tied, 1 uncertain majority; 0 removed from the set)" in out
    ds = load_dataset(merged)
    added = [(name, r) for name in SPLITS for r in ds.splits[name] if r.path.startswith(str(merged.resolve()))]
    assert len(added) == 6 and sorted(r.label for _, r in added) == [0, 0, 0, 1, 1, 1]
    for key in {r.patient_id for _, r in added}:
        assert len({name for name, r in added if r.patient_id == key}) == 1  # one split per patient
    assert "test" in {name for name, _ in added}  # so evaluate scores feedback images too

    (tmp_path / "train.toml").write_text('[model]\nimage_size = 64\nweights = "none"\n'
                                         '[train]\nepochs = 1\nbatch_size = 8\n[evaluate]\nbootstrap = 10\n')
    assert cxr_train(["fit", "--data", str(merged), "--out", str(run), "--config", str(tmp_path / "train.toml")]) == 0
    _out, fitted = _json(capsys)
    assert (run / "model.keras").is_file(), fitted
    trained_on = json.loads((run / "data_summary.json").read_text())
    assert trained_on["splits"]["train"]["images"] == len(ds.splits["train"])
    assert cxr_train(["evaluate", "--run", str(run)]) == 0
    _out, evaluated = _json(capsys)
    metrics = json.loads((run / "metrics.json").read_text())
    test = ds.splits["test"]
    assert (metrics["n"], metrics["patients"]) == (len(test), len({r.patient_id for r in test}))
    assert set(evaluated["metrics"]) >= {"auc", "accuracy"}
