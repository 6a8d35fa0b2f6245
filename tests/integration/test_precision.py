"""``cxr-train export --precision int8|fp16`` on the shared 64-px test run: each reduced model
is compared with the fp32 graph on the test split and written only within the limits; the
worker loads the int8 model, says so, and answers phantoms with it; a quantization that also
reduces the head, the gradient rule and the Mahalanobis score misses a limit and is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from cxr_contract.model import Meta
from cxr_contract.probes import Probes
from trainer import export as export_module
from trainer.dicom_phantoms import cr_dataset
from trainer.errors import ExportError
from trainer.phantoms import make_phantom
from trainer.quantize import LIMITS, failures, has_vnni, int8_variants, quantize_int8
from worker.config import Settings
from worker.model import OnnxModel
from worker.pipeline import Processor, Result, process_files

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent.parent


def _meta(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _export(run: Path, out: Path, precision: str) -> dict:
    return export_module.export(run, out, threshold=0.5, version="test-1", allow_insensitive_saliency=True,
                                precision=precision)


@pytest.fixture(scope="module")
def int8_model(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("int8") / "model-int8.onnx"
    return out, _export(trained_run, out, "int8")


@pytest.fixture(scope="module")
def fp32_model(onnx_model: Path, trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's fp32 test model, exported from :func:`trained_run` (a fresh export only
    where ``CXR_TEST_PRECISION`` made the session's model a reduced one)."""
    if _meta(onnx_model).get(Meta.PRECISION, "fp32") == "fp32":
        return onnx_model
    out = tmp_path_factory.mktemp("fp32") / "model.onnx"
    _export(trained_run, out, "fp32")
    return out


def _phantom_files(folder: Path, n: int) -> list[Path]:
    files = []
    for i in range(n):
        image, _ = make_phantom(np.random.default_rng(100 + i), 128, bool(i % 2))
        cr_dataset(image).save_as(folder / f"{i}.dcm", enforce_file_format=True)
        files.append(folder / f"{i}.dcm")
    return files


def test_int8_export_is_verified_and_the_worker_answers_with_it(int8_model: tuple[Path, dict], trained_run: Path,
                                                                tmp_path: Path) -> None:
    path, result = int8_model
    check = result["precision_check"]
    assert result["precision"] == "int8" and check["passed"] is True and check["images"] >= 10
    assert not failures(check) and set(LIMITS) <= set(check)
    assert check["probability_max_abs_diff"] <= 0.02 and check["ood_verdict_agreement"] >= 0.99
    meta = _meta(path)
    assert meta[Meta.PRECISION] == "int8"
    assert json.loads(meta[Meta.PRECISION_CHECK]) == check
    # The fastest variant this CPU passes with, fastest first: signed weights only with VNNI.
    tried = [t["variant"] for t in check["int8_tried"]]
    assert tried == list(int8_variants())[:len(tried)] and check["cpu_vnni"] == has_vnni()
    assert meta[Meta.INT8_VARIANT] == check["int8_variant"] == tried[-1] and check["int8_tried"][-1]["passed"]
    # Its own gate threshold, chosen on its own validation scores; the out-of-distribution probes
    # (noise, constant, inverted polarity, pydicom's real CR chest) are gated by both models.
    assert float(meta[Meta.OOD_THRESHOLD]) == pytest.approx(check["ood_threshold"], rel=1e-5)
    assert json.loads(meta[Meta.OOD_METHOD])["fp32_threshold"] == check["ood_threshold_fp32"]
    assert check["ood_probes"]["images"] == 4 and check["ood_probes"]["outside_fp32"] >= 3
    assert check["ood_probes"]["verdict_agreement"] == 1.0 and check["ood_score_max_rel_diff"] <= 0.25
    probes = Probes.from_json(meta[Meta.PROBES])
    assert probes.inputs.shape == (4, 64, 64, 1) and check["probes"]["probability_max_abs_diff"] <= 0.02
    assert json.loads((trained_run / "metrics.json").read_text())["precision_check"] == check
    graph = onnx.load(str(path)).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)
    # The Mahalanobis score and the Grad-CAM sum stay float32: no quantized tensor reaches them.
    producers = {o: n for n in graph.node for o in n.output}
    for output in ("ood_score", "gradcam"):
        assert producers[output].op_type not in ("DequantizeLinear", "QuantizeLinear")

    model = OnnxModel(path, providers="cpu")
    assert model.info.precision == "int8"
    processor = Processor(Settings(select={"min_size": 32}, model={"batch_size": 2}), model)
    answered = list(process_files(iter(_phantom_files(tmp_path, 4)), processor))
    assert len(answered) == 4
    for _, r in answered:
        assert isinstance(r, Result) and 0.0 <= r.probability <= 1.0 and r.sc is not None

    # The CLI's log names the precision of the model it loaded.
    env = {**os.environ, "CXR_MODEL__PATH": str(path), "CXR_SELECT__MIN_SIZE": "32"}
    out = subprocess.run([sys.executable, "-m", "worker.cli", "process", str(tmp_path / "0.dcm"),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                         env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = [line for line in (out.stdout + out.stderr).splitlines() if "model loaded" in line]
    assert loaded and '"precision": "int8"' in loaded[0], loaded


def test_fp16_export_passes_its_verification(trained_run: Path, fp32_model: Path, tmp_path: Path) -> None:
    """The fp32 steps are export's own, tested above; the reduction of an exported model
    (what ``export --precision fp16`` does after them) runs alone here, to save their minute."""
    result = export_module.export_reduced(trained_run, fp32_model, tmp_path / "model-fp16.onnx", "fp16")
    assert result["precision_check"]["passed"] is True
    meta = _meta(tmp_path / "model-fp16.onnx")
    assert meta[Meta.PRECISION] == "fp16" and json.loads(meta[Meta.PRECISION_CHECK])["precision"] == "fp16"
    model = OnnxModel(tmp_path / "model-fp16.onnx", providers="cpu")
    assert model.info.precision == "fp16"
    (p,) = model.predict(np.full((1, 64, 64, 1), 0.5, np.float32))
    assert 0.0 <= p.probability <= 1.0 and p.gradcam.dtype == np.float32
    # Far from the training data the Mahalanobis sum passes 65504: computed in float32 from end
    # to end it stays finite and the fp32 model's (the converter's float16 round trips between
    # the kept nodes made it inf).
    noise = np.random.default_rng(0).random((4, 64, 64, 1), dtype=np.float32)
    want = OnnxModel(fp32_model, providers="cpu").predict(noise)
    for w, g in zip(want, model.predict(noise), strict=True):
        assert np.isfinite(g.ood_score) and g.ood_score == pytest.approx(w.ood_score, rel=2e-3)
        assert g.logit == pytest.approx(w.logit, abs=2e-2)
    half = onnx.load(str(tmp_path / "model-fp16.onnx"))
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in half.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    to_half = [n for n in half.graph.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT16]
    round_trips = [n.name for n in to_half
                   if readers.get(n.output[0]) and all(r.op_type == "Cast" for r in readers[n.output[0]])]
    assert not round_trips


def test_quantizing_the_head_and_the_gate_too_is_refused(trained_run: Path, fp32_model: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything quantized (nothing kept float32), calibrated on one image: the
    out-of-distribution score moves by ~100% and its verdicts flip. Export names the limit."""
    real = export_module.quantize_int8
    monkeypatch.setattr(export_module, "quantize_int8",
                        lambda fp32, calibration, out, **_: real(fp32, calibration[:1], out, exclude=[]))
    with pytest.raises(ExportError, match=r"int8 model differs from the fp32 model on \d+ test images: "
                                          r".*ood_score_max_rel_diff [0-9.]+ \(limit <= 0.25\)"):
        export_module.export_reduced(trained_run, fp32_model, tmp_path / "broken.onnx", "int8")
    assert not (tmp_path / "broken.onnx").exists() and not list(tmp_path.glob("*.tmp"))
    recorded = json.loads((trained_run / "metrics.json").read_text())["precision_check"]
    assert recorded["passed"] is False and recorded["ood_score_max_rel_diff"] > 0.25


def test_unknown_precision_is_refused_before_any_work(trained_run: Path, tmp_path: Path) -> None:
    from trainer.errors import TrainerError

    with pytest.raises(TrainerError, match="precision must be one of fp32, int8, fp16. Received: precision='int4'"):
        _export(trained_run, tmp_path / "m.onnx", "int4")
    with pytest.raises(TrainerError, match="precision must be int8 or fp16. Received: precision='fp32'"):
        export_module.export_reduced(trained_run, tmp_path / "m.onnx", tmp_path / "r.onnx", "fp32")
    with pytest.raises(TrainerError, match="model file not found"):
        export_module.export_reduced(trained_run, tmp_path / "m.onnx", tmp_path / "r.onnx", "int8")
    (tmp_path / "text.onnx").write_text("not a model\n")
    with pytest.raises(TrainerError, match=r"text.onnx is not an ONNX model \(DecodeError\)"):
        export_module.export_reduced(trained_run, tmp_path / "text.onnx", tmp_path / "r.onnx", "int8")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(TrainerError, match=r"not a model 'cxr-train export' wrote: .*empty.onnx: metadata_props lack"):
        export_module.export_reduced(trained_run, tmp_path / "empty.onnx", tmp_path / "r.onnx", "int8")


def test_a_model_from_another_run_is_not_reduced_with_this_run_s_data(trained_run: Path, fp32_model: Path,
                                                                       tmp_path: Path) -> None:
    import onnx

    from trainer.errors import TrainerError

    other = onnx.load(str(fp32_model))
    meta = {p.key: p.value for p in other.metadata_props}
    onnx.helper.set_model_props(other, {**meta, "weights_sha256": "0" * 64})
    onnx.save(other, str(tmp_path / "other.onnx"))
    with pytest.raises(TrainerError, match=r"other.onnx was not exported from .*its weights differ"):
        export_module.export_reduced(trained_run, tmp_path / "other.onnx", tmp_path / "r.onnx", "int8")
    assert not (tmp_path / "r.onnx").exists()


def test_a_reduced_model_is_not_reduced_again(int8_model: tuple[Path, dict], trained_run: Path,
                                              tmp_path: Path) -> None:
    from trainer.errors import TrainerError

    with pytest.raises(TrainerError, match="is already int8: reduce the fp32 model export wrote"):
        export_module.export_reduced(trained_run, int8_model[0], tmp_path / "r.onnx", "fp16")


@pytest.fixture(scope="module")
def mismatched_model(int8_model: tuple[Path, dict], fp32_model: Path, trained_run: Path,
                     tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An int8 model that answers its probes unlike the fp32 model, as a model verified on one CPU
    can on another: everything quantized (head and gate too), carrying the verified model's probes."""
    from trainer.data import load_dataset
    from trainer.fit import load_image

    val = load_dataset(Path(json.loads((trained_run / "config.json").read_text())["data"])).splits["val"]
    out = tmp_path_factory.mktemp("mismatch") / "model-int8.onnx"
    quantize_int8(fp32_model, np.stack([load_image(r.path, 64) for r in val[:1]]), out, exclude=[])
    model = onnx.load(str(out))
    onnx.helper.set_model_props(model, {**_meta(out), Meta.PROBES: _meta(int8_model[0])[Meta.PROBES]})
    onnx.save(model, str(out))
    return out


def test_the_worker_checks_a_reduced_model_s_probes_at_load(int8_model: tuple[Path, dict],
                                                            mismatched_model: Path) -> None:
    from worker.errors import ModelProbeMismatch

    checked = OnnxModel(int8_model[0], providers="cpu").probe_check
    assert checked["status"] == "passed" and checked["images"] == 4 and checked["probability_max_abs_diff"] <= 0.02
    with pytest.raises(ModelProbeMismatch, match=r"this int8 model answers its 4 probe images on this machine "
                                                 r"\(CPUExecutionProvider\) outside the limits its export verified "
                                                 r"against fp32: .*ood_score_max_rel_diff [0-9.]+ \(limit <= 0.25\)"):
        OnnxModel(mismatched_model, providers="cpu")
    assert OnnxModel(mismatched_model, providers="cpu", probe_check=False).probe_check == {"status": "off"}


def _cli_process(model: Path, folder: Path, **env: str) -> subprocess.CompletedProcess[str]:
    image, _ = make_phantom(np.random.default_rng(3), 128, True)
    cr_dataset(image).save_as(folder / "in.dcm", enforce_file_format=True)
    return subprocess.run([sys.executable, "-m", "worker.cli", "process", str(folder / "in.dcm"), "--out",
                           str(folder / "out")], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "CXR_MODEL__PATH": str(model), "CXR_SELECT__MIN_SIZE": "32", **env})


def test_a_model_failing_its_probes_is_refused_or_replaced_by_the_fallback(mismatched_model: Path, fp32_model: Path,
                                                                            tmp_path: Path) -> None:
    from worker.cli import _load_model
    from worker.service import Service

    refused = _cli_process(mismatched_model, tmp_path)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    said = [line for line in refused.stderr.splitlines() if "probe images on this machine" in line]
    assert len(said) == 1 and 'model.probe_check = "fallback"' in said[0]

    fell_back = _cli_process(mismatched_model, tmp_path, CXR_MODEL__PROBE_CHECK="fallback",
                             CXR_MODEL__FALLBACK_PATH=str(fp32_model))
    assert fell_back.returncode == 0, fell_back.stderr[-2000:]
    log = (fell_back.stdout + fell_back.stderr).splitlines()
    warned = [line for line in log if "failed its probe check" in line]
    loaded = [line for line in log if "model loaded" in line]
    assert len(warned) == 1 and str(fp32_model) in warned[0]
    assert '"precision": "fp32"' in loaded[0] and str(mismatched_model) in loaded[0]

    settings = Settings(spool={"dir": str(tmp_path / "spool")},
                        model={"path": mismatched_model, "probe_check": "fallback", "fallback_path": fp32_model})
    model = _load_model(settings)
    assert model.path == fp32_model and model.fell_back_from == str(mismatched_model)
    assert b"cxr_model_probe_fallback 1.0" in Service(settings, model).metrics.exposition()
