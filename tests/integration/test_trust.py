"""Answers that say how far to trust them, with the real model (ONNX Runtime) and real peers:
the out-of-distribution gate withholds what the model cannot read, an in-distribution phantom
is answered with its heatmap faithfulness, each from at most one extra batched run.

Most tests need a contract-v2 model (outputs ``logit`` and ``ood_score``): the ``onnx_model``
fixture exports one from ``cxr-train export``. With an older model they skip and say so.
The fixture is a weak model (64 px, one epoch), so the inputs it must gate are certainly
out of distribution: uniform noise and a constant image, not a real chest.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from cxr_contract import faithfulness as faithfulness_module
from tests.helpers import (
    dciodvfy_errors,
    free_port,
    http,
    log_records,
    metric,
    phantom_file,
    sr_finding,
    storescu,
    wait_for,
    walk,
)
from trainer.dicom_phantoms import cr_dataset
from worker.config import Settings
from worker.model import GATE_OOD_SCORE, OnnxModel, outside_distribution
from worker.pipeline import Processor, process_files

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture(scope="module")
def model(onnx_model: Path) -> OnnxModel:
    return OnnxModel(onnx_model, providers="cpu")


@pytest.fixture(scope="module")
def v2(model: OnnxModel) -> OnnxModel:
    if not model.info.has_ood_gate:
        pytest.skip(f"the test model is contract version {model.info.contract_version}: no ood_score/logit "
                    "outputs (cxr-train export writes contract version 2)")
    return model


def noise_file(path: Path, seed: int = 0) -> Dataset:
    """Uniform noise in a CR chest header: nothing like a radiograph, whatever the model."""
    ds = cr_dataset(np.random.default_rng(seed).integers(0, 256, (128, 128)).astype(np.uint8))
    ds.save_as(path, enforce_file_format=True)
    return ds


def constant_file(path: Path) -> Dataset:
    ds = cr_dataset(np.full((128, 128), 120, np.uint8))
    ds.save_as(path, enforce_file_format=True)
    return ds


def inputs(folder: Path) -> dict[str, Dataset]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {f"phantom{i}": phantom_file(folder / f"phantom{i}.dcm", bool(i % 2), 500 + i) for i in range(3)}
    out["noise"] = noise_file(folder / "noise.dcm")
    out["constant"] = constant_file(folder / "constant.dcm")
    return out


class CountingSession:
    """The real ONNX Runtime session, with the batch size of every run recorded."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.runs: list[int] = []

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> Any:
        self.runs.append(len(next(iter(feeds.values()))))
        return self.session.run(outputs, feeds)


def settings(**model: Any) -> Settings:
    return Settings(select={"min_size": 32}, model=model)


def test_v2_model_gives_logit_and_ood_score_in_the_same_run(v2: OnnxModel, tmp_path: Path) -> None:
    processor = Processor(settings(), v2)
    files = inputs(tmp_path)
    decoded = [processor.decode(tmp_path / f"{name}.dcm") for name in files]
    batch = np.stack([d.model_input for d in decoded if not isinstance(d, str)])
    predictions = v2.predict(batch)
    for p in predictions:
        assert p.logit is not None and p.ood_score is not None and math.isfinite(p.ood_score)
        assert 1 / (1 + math.exp(-p.logit)) == pytest.approx(p.probability, abs=1e-4)
    noise = predictions[list(files).index("noise")]
    assert outside_distribution(noise, v2.info), (noise.ood_score, v2.info.ood_threshold)


@pytest.mark.parametrize(("faithfulness", "paint_negative"), [(True, False), (True, True), (False, True)])
def test_faithfulness_runs_only_over_the_images_whose_heatmap_is_shown(
    v2: OnnxModel, tmp_path: Path, faithfulness: bool, paint_negative: bool,
) -> None:
    if v2.info.faithfulness_cutoff is None:
        pytest.skip("the test model was exported before the faithfulness cut-off (CXR_TEST_MODEL): export it again")
    processor = Processor(Settings(select={"min_size": 32}, model={"faithfulness": faithfulness},
                                   output={"heatmap_for_negative": paint_negative}), v2)
    files = inputs(tmp_path)
    decoded = [processor.decode(tmp_path / f"{name}.dcm") for name in files]
    counting = CountingSession(v2.session)
    v2.session = counting
    try:
        results = processor.infer_and_build([d for d in decoded if not isinstance(d, str)])
    finally:
        v2.session = counting.session
    by_name = dict(zip(files, results, strict=True))
    answered = [r for r in results if not isinstance(r, Exception) and not r.withheld]
    shown = [r for r in answered if r.positive or paint_negative]
    assert not isinstance(by_name["noise"], Exception) and by_name["noise"].withheld
    assert not isinstance(by_name["constant"], Exception) and by_name["constant"].gate == "uniform"
    if faithfulness and shown:
        # One run for the batch, then the perturbed images (the hot region and its moved copies
        # removed, per shown map) and nothing else, batch_size at a time on the CPU.
        perturbed = faithfulness_module.INPUTS_PER_IMAGE * len(shown)
        batch = v2.cpu_chunk or perturbed
        assert counting.runs == [len(files)] + [batch] * (perturbed // batch) + (
            [perturbed % batch] if perturbed % batch else [])
        assert all(r.faithfulness is not None and math.isfinite(r.faithfulness) for r in shown)
    else:
        assert counting.runs == [len(files)]
    # No heatmap, no statement about it: a negative drawn without colour is not scored.
    shown_ids = {id(r) for r in shown}
    assert all(r.faithfulness is None for r in answered if id(r) not in shown_ids)


class FailingExtraRun(CountingSession):
    """The real session, whose second run (the faithfulness run) fails as an out-of-memory would."""

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> Any:
        if self.runs:
            raise RuntimeError("injected failure of the faithfulness run")
        return super().run(outputs, feeds)


def test_a_failed_faithfulness_run_leaves_the_answers_standing(v2: OnnxModel, tmp_path: Path) -> None:
    processor = Processor(Settings(select={"min_size": 32}, output={"heatmap_for_negative": True}), v2)
    files = inputs(tmp_path)
    decoded = [processor.decode(tmp_path / f"{name}.dcm") for name in files]
    failing = FailingExtraRun(v2.session)
    v2.session = failing
    try:
        results = processor.infer_and_build([d for d in decoded if not isinstance(d, str)])
    finally:
        v2.session = failing.session
    assert not any(isinstance(r, Exception) for r in results)
    assert all(r.faithfulness is None for r in results if not isinstance(r, Exception))


def v1_copy(source: Path, target: Path) -> Path:
    """The same network as a contract-v1 model: without logit, ood_score and the v2 metadata."""
    onnx = pytest.importorskip("onnx")
    m = onnx.load(str(source))
    keep = [o for o in m.graph.output if o.name in ("probability", "gradcam")]
    del m.graph.output[:]
    m.graph.output.extend(keep)
    props = [p for p in m.metadata_props if p.key not in ("contract_version", "ood_threshold", "ood_method",
                                                           "heatmap_scale", "calibration", "sanity_check")]
    del m.metadata_props[:]
    m.metadata_props.extend(props)
    onnx.save(m, str(target))
    return target


def test_v1_model_still_answers_without_a_gate_and_says_so_at_start(
    onnx_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    path = onnx_model if OnnxModel(onnx_model).info.contract_version == 1 else v1_copy(
        onnx_model, tmp_path / "v1.onnx")
    with caplog.at_level("WARNING", logger="worker.model"):
        model = OnnxModel(path, providers="cpu")
    assert any("no out-of-distribution gate" in r.getMessage() for r in caplog.records)
    assert model.info.ood_threshold is None and not model.has_logit
    processor = Processor(settings(), model)
    files = inputs(tmp_path / "in")
    results = dict(process_files([tmp_path / "in" / f"{n}.dcm" for n in files], processor))
    noise = results[tmp_path / "in" / "noise.dcm"]
    assert not isinstance(noise, (str, Exception))
    assert not noise.withheld and noise.ood_score is None and noise.faithfulness is None
    constant = results[tmp_path / "in" / "constant.dcm"]
    assert not isinstance(constant, (str, Exception)) and constant.withheld  # the input check still works
    names = {i.ConceptNameCodeSequence[0].CodeValue for i in walk(noise.sr.ContentSequence)
             if "ConceptNameCodeSequence" in i}
    assert not {"OOD-STATUS", "OOD-SCORE", "HEATMAP-FAITH"} & names


def sc_has_colour(sc: Dataset) -> bool:
    # Beyond JPEG's rounding: a gray SC decodes with channels a unit or two apart.
    px = sc.pixel_array.astype(int)
    return bool(np.abs(px[..., 0] - px[..., 2]).max() > 8 or np.abs(px[..., 0] - px[..., 1]).max() > 8)


def sr_codes(sr: Dataset) -> dict[str, str]:
    return {str(i.ConceptNameCodeSequence[0].CodeValue): str(i.ConceptCodeSequence[0].CodeMeaning)
            for i in walk(sr.ContentSequence) if i.ValueType == "CODE"}


def check_outputs(name: str, sc: Dataset, sr: Dataset, states_faithfulness: bool = True) -> bool:
    """Assert what the SC and SR of one input say; True when it was answered. A model without a
    faithfulness cut-off (exported before it) states no faithfulness."""
    presence, probability = sr_finding(sr)
    codes = sr_codes(sr)
    if name in ("noise", "constant"):
        assert presence == "Not Evaluated" and math.isnan(probability), name
        assert codes["OOD-STATUS"] == "Outside the model's training distribution", name
        assert not sc_has_colour(sc), name
        assert "without a result" in sc.DerivationDescription
        return False
    assert presence in ("Present", "Absent", "Not Evaluated"), name
    if presence == "Not Evaluated":  # a weak model may gate a phantom now and then
        return False
    assert codes["OOD-STATUS"] == "No out-of-distribution evidence detected", name
    # Faithfulness describes a drawn heatmap: a positive answer's (negatives are drawn without colour).
    faith = any(i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "HEATMAP-FAITH"
                for i in walk(sr.ContentSequence))
    assert faith == (presence == "Present" and states_faithfulness), name
    if faith:
        assert codes["FAITH-VERDICT"] in ("Above chance", "Not above chance"), name
    return True


def test_serve_withholds_out_of_distribution_inputs_and_answers_phantoms(
    v2: OnnxModel, make_worker: Any, pacs: Any, tmp_path: Path,
) -> None:
    mport = free_port()
    worker = make_worker([f"PACS@127.0.0.1:{pacs.port}"], metrics_port=mport)
    files = inputs(tmp_path / "in")
    storescu(worker.port, sorted((tmp_path / "in").iterdir()))
    wait_for(lambda: len(pacs.files()) >= 2 * len(files), 180, "an SC and an SR per input at the PACS")
    received = [pydicom.dcmread(p) for p in pacs.files()]
    by_uid: dict[str, dict[str, Dataset]] = {}
    for ds in received:
        if "SourceImageSequence" in ds:
            by_uid.setdefault(str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID), {})["sc"] = ds
        else:
            src = next(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in walk(ds.ContentSequence)
                       if "ReferencedSOPSequence" in i
                       and i.ReferencedSOPSequence[0].ReferencedSOPClassUID != "1.2.840.10008.5.1.4.1.1.7")
            by_uid.setdefault(str(src), {})["sr"] = ds
    states = v2.info.faithfulness_cutoff is not None
    answered = sum(check_outputs(name, by_uid[ds.SOPInstanceUID]["sc"], by_uid[ds.SOPInstanceUID]["sr"], states)
                   for name, ds in files.items())
    assert answered >= 2, "the phantoms (3) should mostly pass the gate"
    for path in pacs.files():
        assert dciodvfy_errors(path) == [], path
    _, text = http(mport, "/metrics")
    assert metric(text, 'cxr_instances_gated_total{reason="ood_score"}') >= 1
    assert metric(text, 'cxr_instances_gated_total{reason="uniform"}') == 1
    records = log_records(worker)
    noise_log = [r for r in records if r.get("message") == "processed"
                 and r.get("sop_instance_uid") == files["noise"].SOPInstanceUID]
    assert noise_log[0]["decision"] == "withheld" and noise_log[0]["gate"] == GATE_OOD_SCORE
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    gated = [a for a in audit if a["EventIdentification"]["EventID"]["code"] == "110103"]
    described = [a["ParticipantObjectIdentification"][0]["ParticipantObjectDescription"] for a in gated]
    assert {d["SOPClass"][0]["Instance"][0]["UID"] for d in described} >= {
        files["noise"].SOPInstanceUID, files["constant"].SOPInstanceUID}
    assert all("answer withheld" in a["EventIdentification"]["EventOutcomeDescription"] for a in gated)
    assert worker.stop() == 0


@pytest.mark.parametrize("action", ["withhold", "flag"])
def test_process_gates_like_serve(v2: OnnxModel, onnx_model: Path, tmp_path: Path, action: str) -> None:
    files = inputs(tmp_path / "in")
    # A dashboard URL is configured, but offline answers are never recorded: no review link.
    env = {**os.environ, "CXR_SELECT__MIN_SIZE": "32", "CXR_MODEL__OOD_ACTION": action,
           "CXR_DASHBOARD__PUBLIC_URL": "https://dashboard.example.org"}
    out = subprocess.run([sys.executable, "-m", "worker.cli", "process", str(tmp_path / "in"), "--out",
                          str(tmp_path / "out"), "--model", str(onnx_model)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {Path(r["input"]).stem: r for r in json.loads(out.stdout)}
    assert set(rows) == set(files)
    for name in files:
        sc = pydicom.dcmread(tmp_path / "out" / f"{name}.sc.dcm")
        sr = pydicom.dcmread(tmp_path / "out" / f"{name}.sr.dcm")
        assert dciodvfy_errors(tmp_path / "out" / f"{name}.sc.dcm") == []
        assert dciodvfy_errors(tmp_path / "out" / f"{name}.sr.dcm") == []
        assert b"dashboard.example.org" not in (tmp_path / "out" / f"{name}.sr.dcm").read_bytes()
        if action == "withhold":
            check_outputs(name, sc, sr, v2.info.faithfulness_cutoff is not None)
        elif name in ("noise", "constant"):
            # Flagged: answered, and labelled as outside the training distribution.
            assert rows[name]["decision"] in ("positive", "negative") and rows[name]["gate"]
            assert sr_finding(sr)[0] in ("Present", "Absent")
            assert sr_codes(sr)["OOD-STATUS"] == "Outside the model's training distribution"
    assert rows["noise"]["gate"] == GATE_OOD_SCORE and rows["constant"]["gate"] == "uniform"
    answered = [n for n, r in rows.items() if n.startswith("phantom") and r["decision"] != "withheld"]
    assert len(answered) >= 2
    # Faithfulness describes a drawn heatmap: positives only (output.heatmap_for_negative is off).
    states = v2.info.faithfulness_cutoff is not None
    assert all((rows[n]["faithfulness"] is not None) == (states and rows[n]["decision"] == "positive")
               for n in answered)
