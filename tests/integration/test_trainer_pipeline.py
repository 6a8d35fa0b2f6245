"""The five trainer commands in sequence on phantoms: the model learns, its heatmaps
point at the opacities better than a centre prior, and the exported ONNX model is
verified and carries its metadata. Also: an interrupted fit resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent.parent


def cxr_train(*args: str) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-m", "trainer.cli", *args], capture_output=True, text=True,
                         timeout=900, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout[out.stdout.index("{"):])


def test_phantom_run_learns_localises_and_exports(tmp_path: Path) -> None:
    data, run, model = tmp_path / "data", tmp_path / "run", tmp_path / "model.onnx"
    # 160 px gives a 5x5 Grad-CAM grid whose fourth row lies in the lower lung zones, where
    # the phantoms' opacities are; at 128 px the bottom row's centres fall below the lungs.
    cxr_train("phantoms", "--out", str(data), "--n", "300", "--size", "160", "--seed", "4")
    cxr_train("fit", "--data", str(data), "--out", str(run), "--config", str(ROOT / "config" / "demo-train.toml"),
              "--image-size", "160")
    for name in ("model.keras", "config.json", "data_summary.json", "history.csv", "training-curves.png"):
        assert (run / name).is_file(), name
    info = json.loads((run / "config.json").read_text())
    assert info["versions"]["tensorflow"] and info["config"]["model"]["image_size"] == 160

    val = cxr_train("evaluate", "--run", str(run), "--split", "val")
    assert val["metrics"]["auc"] >= 0.9, val
    test = cxr_train("evaluate", "--run", str(run))
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("accuracy", "precision", "recall", "specificity", "f1", "auc"):
        lo, hi = metrics["ci95"][key]
        assert lo <= metrics["metrics"][key] <= hi, key
    loc = test["localisation"]
    assert loc["n"] > 10 and loc["regions"] == "phantom masks"
    assert loc["pointing_game"] >= loc["centre_prior_pointing_game"] + 0.15, loc
    for name in ("roc.png", "confusion-matrix.png", "gallery.png"):
        assert (run / name).stat().st_size > 1000, name

    exported = cxr_train("export", "--run", str(run), "--out", str(model))
    assert exported["verification"]["gradcam_max_rel_error"] <= 1e-4
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["input_size"] == "160" and meta["feature_layer"] == "conv5_block3_out"
    assert float(meta["threshold"]) == pytest.approx(metrics["threshold"], abs=1e-6)
    assert len(meta["weights_sha256"]) == 64
    assert "synthetic" in meta["intended_use"]
    assert json.loads(meta["test_metrics"])["metrics"]["auc"] == pytest.approx(metrics["metrics"]["auc"])
    assert json.loads(meta["training_data"])["synthetic"] is True
    images = np.random.default_rng(0).random((3, 160, 160, 1), dtype=np.float32)
    prob, cam = session.run(["probability", "gradcam"], {"image": images})
    assert prob.shape == (3, 1) and cam.shape == (3, 5, 5) and (cam >= 0).all()


def test_failed_verification_writes_no_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer import export as export_module
    from trainer.config import load_config
    from trainer.errors import ExportError
    from trainer.fit import fit
    from trainer.phantoms import write_phantoms

    write_phantoms(tmp_path / "d", 12, size=64)
    fit(tmp_path / "d", tmp_path / "r", load_config(None, {"model": {"image_size": 64, "weights": "none"},
                                                           "train": {"epochs": 1, "batch_size": 8}}), verbose=0)
    real_tape = export_module.gradcam_tape
    from trainer.evaluate import load_run

    keras_model, cfg, _ = load_run(tmp_path / "r")
    proto = export_module.to_onnx(keras_model, "conv5_block3_out", 64)  # convert once, verify twice
    monkeypatch.setattr(export_module, "to_onnx", lambda *a: proto)

    def off_by(dp: float, dcam: float):  # type: ignore[no-untyped-def]
        def tape(*args: object) -> tuple[np.ndarray, np.ndarray]:
            prob, cam = real_tape(*args)
            cam = cam.copy()
            cam[0, 0, 0] += dcam
            return prob + dp, cam
        return tape

    for dp, dcam in ((1e-3, 0.0), (0.0, 1.0)):
        monkeypatch.setattr(export_module, "gradcam_tape", off_by(dp, dcam))
        with pytest.raises(ExportError, match="does not match TensorFlow"):
            export_module.export(tmp_path / "r", tmp_path / "m.onnx", threshold=0.5)
        assert not (tmp_path / "m.onnx").exists()
        assert not list(tmp_path.glob("*.tmp"))


def test_interrupted_fit_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    from trainer.config import load_config
    from trainer.fit import fit
    from trainer.phantoms import write_phantoms

    write_phantoms(tmp_path / "d", 24, size=64)
    cfg = load_config(None, {"model": {"image_size": 64, "weights": "none"},
                             "train": {"epochs": 1, "batch_size": 8}})
    run = tmp_path / "r"
    fit(tmp_path / "d", run, cfg, verbose=0)
    # Interrupted after epoch 1 of 2: the final model was never written.
    (run / "model.keras").unlink()
    info = json.loads((run / "config.json").read_text())
    info["config"]["train"]["epochs"] = 2
    (run / "config.json").write_text(json.dumps(info))
    result = fit(tmp_path / "d", run, cfg, verbose=0)
    assert result["epochs"] == 2
    epochs = [line.split(",")[0] for line in (run / "history.csv").read_text().splitlines()[1:]]
    assert epochs == ["0", "1"]
    assert (run / "model.keras").is_file()
