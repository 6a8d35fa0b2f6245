"""Grad-CAM benchmark (not a test): what a user would pick against ours, per image at batch 1
and 8 on the CPU, in one run, 224 px, RANDOM weights (only the cost is measured):

- pytorch-grad-cam on torchvision's ResNet-50, in its own virtualenv (``grad-cam``, ``torch``,
  ``torchvision`` are installed there on the first run: gigabytes, from PyPI);
- TensorFlow GradientTape Grad-CAM compiled with ``tf.function`` (the fair TF baseline: the
  Keras example runs it eagerly) on the trainer's Keras model;
- our ONNX Runtime fp32 model with the in-graph Grad-CAM (what ``cxr-train export`` writes);
- our int8 model (``trainer.quantize.quantize_int8``, calibrated on random images) in each
  variant export can choose (``trainer.quantize.INT8_VARIANTS``): export tries
  ``trainer.quantize.int8_variants()`` on the CPU at hand, fastest first, and keeps the first
  that passes its verification against fp32 on the trained model's test split. Random weights
  cannot be verified (no labels, no trained answer to keep), so every variant is timed and the
  JSON names the order export would try here (``int8``);
- the same fp32 model without the Grad-CAM output (what Grad-CAM costs).

Every framework gets the same intra-op threads (``--threads``, default all cores): ONNX Runtime's
session option, ``torch.set_num_threads`` and TensorFlow's intra-op pool; the JSON records the
counts each then reports.

Goals: int8 (export's first choice on this CPU) >= 15x faster than pytorch-grad-cam per image at
batch 8; the Grad-CAM output costs <= 2 % over the model without it. The machine may be shared:
the load average is recorded beside each measurement, and the ratios compare numbers of the same run.

Usage: python benchmarks/bench_gradcam.py [--repeat N] [--threads N] [--venv DIR] [--skip-torch]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import venv
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from benchmarks.common import report, summary, timed  # noqa: E402
from benchmarks.models import FEATURE_LAYER, SIZE, export_random, images  # noqa: E402

HERE = Path(__file__).resolve().parent
BATCHES = (1, 8)
TORCH_PACKAGES = ("grad-cam", "torch", "torchvision")
GOAL_INT8_VS_PYTORCH = 15.0
GOAL_GRADCAM_COST = 0.02


def load() -> float:
    """The 1-minute load average: how busy the shared machine was."""
    return round(os.getloadavg()[0], 2)


def torch_venv(where: Path) -> Path:
    """The virtualenv's python, created and filled on first use."""
    python = where / "bin" / "python"
    if not python.is_file():
        print(f"creating {where} with {', '.join(TORCH_PACKAGES)} (first run only; gigabytes)", flush=True)
        venv.create(where, with_pip=True)
    probe = subprocess.run([str(python), "-c", "import torch, torchvision, pytorch_grad_cam"], capture_output=True)
    if probe.returncode:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *TORCH_PACKAGES], check=True)
    return python


def bench_pytorch(python: Path, repeat: int, threads: int) -> dict[str, Any]:
    out = subprocess.run([str(python), str(HERE / "gradcam_torch.py"), "--threads", str(threads), str(SIZE),
                          str(repeat), *map(str, BATCHES)], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    rows = {f"b{b}": per_image(got[f"b{b}"], b) for b in BATCHES}
    return {**rows, "versions": {k: got[k] for k in ("torch", "torchvision")}, "threads": got["threads"]}


def tape_function(model: Any) -> Any:
    """Grad-CAM as the Keras example computes it, with GradientTape, traced once by tf.function."""
    import tensorflow as tf

    from trainer.model import feature_model, split_head

    head = split_head(model, FEATURE_LAYER)
    features = feature_model(model, FEATURE_LAYER)

    @tf.function(input_signature=[tf.TensorSpec([None, SIZE, SIZE, 1], tf.float32)], reduce_retracing=True)
    def gradcam(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            a = features(image, training=False)
            tape.watch(a)
            h = a
            for layer in head.body:
                h = layer(h, training=False)
            logit = tf.matmul(h, head.score.kernel) + (head.score.bias if head.score.use_bias else 0.0)
        grads = tape.gradient(logit, a)  # each image's logit depends on its own maps only
        alpha = tf.reduce_mean(grads, axis=[1, 2])
        return tf.sigmoid(logit), tf.nn.relu(tf.einsum("nhwc,nc->nhw", a, alpha))

    return gradcam


def per_image(seconds: list[float], batch: int) -> dict[str, float]:
    """The median per image, and the least disturbed run's (on a shared machine the steadier one)."""
    return {**summary(seconds), "ms_per_image": 1000 * statistics.median(seconds) / batch,
            "ms_per_image_min": 1000 * min(seconds) / batch, "load_avg": load()}


def bench_onnx(paths: dict[str, Path], repeat: int, threads: int) -> dict[str, dict[str, Any]]:
    """Our models, their runs interleaved (one of each in turn), so that a change of the
    machine's load falls on all of them alike: the Grad-CAM cost is a difference of a few %."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    sessions = {k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                for k, p in paths.items()}
    out: dict[str, dict[str, Any]] = {k: {} for k in paths}
    for b in BATCHES:
        x = images(b)
        seconds: dict[str, list[float]] = {k: [] for k in paths}
        for i in range(repeat):
            for key, session in sessions.items():
                seconds[key] += timed(lambda s=session, x=x: s.run(None, {"image": x}), 1, warmup=0 if i else 1)
        for key in paths:
            out[key][f"b{b}"] = per_image(seconds[key], b)
    return out


def bench_tape(model: Any, repeat: int) -> dict[str, Any]:
    import tensorflow as tf

    tape = tape_function(model)
    out: dict[str, Any] = {"tensorflow": tf.__version__}
    for b in BATCHES:
        x = tf.constant(images(b))
        out[f"b{b}"] = per_image(timed(lambda x=x: [t.numpy() for t in tape(x)], repeat), b)
    return out


def quantize_all(full: Path, work: Path, data: dict[str, Any]) -> dict[str, Path]:
    """``{"onnx_int8_<variant>": path}`` for every int8 variant export can choose; a variant ONNX
    Runtime cannot quantize is named in ``data`` with why, and the others still stand."""
    from trainer.quantize import INT8_VARIANTS, VNNI_ORDER, has_vnni, int8_variants, quantize_int8

    order = int8_variants()
    data["int8"] = {"cpu_vnni": has_vnni(), "export_tries": list(order), "export_first_choice": order[0],
                    "rule": "export keeps the first variant, in this order, that passes its verification "
                            "against fp32 on the trained model's test split; random weights cannot be "
                            "verified, so every variant is timed"}
    out = {}
    for variant in [*VNNI_ORDER, *(v for v in INT8_VARIANTS if v not in VNNI_ORDER)]:
        key = f"onnx_int8_{variant}"
        try:
            # 8 calibration images: only the cost is measured (and an early quantize_int8 held every
            # intermediate tensor of all of them: 32 images took 11 GB)
            out[key] = quantize_int8(full, images(8, seed=1), work / f"gradcam-int8-{variant}.onnx", variant=variant)
        except Exception as exc:  # the other rows still stand; the JSON says why this one has none
            data[key] = f"not measured: {type(exc).__name__}: {exc}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per batch size and framework")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="intra-op threads for every framework (default: all cores)")
    parser.add_argument("--venv", type=Path, default=HERE / ".venv-gradcam", help="pytorch-grad-cam's virtualenv")
    parser.add_argument("--skip-torch", action="store_true", help="leave pytorch-grad-cam out")
    args = parser.parse_args()
    import tensorflow as tf

    # Before TensorFlow's runtime starts (export_random builds the Keras model).
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    data: dict[str, Any] = {"size": SIZE, "weights": "random (cost only)", "batches": list(BATCHES),
                            "load_avg_start": load(), "repeat": args.repeat,
                            "threads": {"onnxruntime": args.threads,
                                        "tensorflow": tf.config.threading.get_intra_op_parallelism_threads()}}
    with tempfile.TemporaryDirectory() as tmp:
        full, plain, model = export_random(Path(tmp))
        int8 = quantize_all(full, Path(tmp), data)
        if not args.skip_torch:
            data["pytorch_grad_cam"] = bench_pytorch(torch_venv(args.venv), args.repeat, args.threads)
            data["threads"]["torch"] = data["pytorch_grad_cam"]["threads"]
        data["tf_gradienttape_tf_function"] = bench_tape(model, args.repeat)
        data.update(bench_onnx({"onnx_fp32": full, "onnx_fp32_no_gradcam": plain, **int8}, args.repeat, args.threads))
    data["load_avg_end"] = load()

    def ms(key: str, b: int, field: str = "ms_per_image") -> float | None:
        row = data.get(key)
        return row[f"b{b}"].get(field) if isinstance(row, dict) and f"b{b}" in row else None

    first = f"onnx_int8_{data['int8']['export_first_choice']}"
    variants = [k for k in data if k.startswith("onnx_int8_")]
    ratios: dict[str, Any] = {}
    for b in BATCHES:
        torch_ms, fp32_ms, plain_ms = (ms(k, b) for k in ("pytorch_grad_cam", "onnx_fp32", "onnx_fp32_no_gradcam"))
        for key in variants:
            for suffix, field in (("", "ms_per_image"), ("_min", "ms_per_image_min")):
                theirs, int8_ms = ms("pytorch_grad_cam", b, field), ms(key, b, field)
                if theirs and int8_ms:
                    ratios[f"{key.removeprefix('onnx_')}_speedup_vs_pytorch_b{b}{suffix}"] = theirs / int8_ms
                    if key == first:  # the headline: the variant export tries first on this CPU
                        ratios[f"int8_speedup_vs_pytorch_b{b}{suffix}"] = theirs / int8_ms
        if torch_ms and fp32_ms:
            ratios[f"fp32_speedup_vs_pytorch_b{b}"] = torch_ms / fp32_ms
        if fp32_ms and plain_ms:
            ratios[f"gradcam_cost_b{b}"] = fp32_ms / plain_ms - 1
    data["ratios"] = ratios
    data["goals"] = {"int8_speedup_vs_pytorch_b8": f">= {GOAL_INT8_VS_PYTORCH:g} (export's first choice)",
                     "gradcam_cost": f"<= {GOAL_GRADCAM_COST:.0%} (b1 and b8)"}

    labels = {"pytorch_grad_cam": "pytorch-grad-cam (torchvision ResNet-50)",
              "tf_gradienttape_tf_function": "TF GradientTape, tf.function",
              "onnx_fp32": "ours: ONNX Runtime fp32, in-graph Grad-CAM",
              **{k: f"ours: ONNX Runtime int8 {k.removeprefix('onnx_int8_')}"
                    + (" (export's first try here)" if k == first else "") for k in variants},
              "onnx_fp32_no_gradcam": "same fp32 model without Grad-CAM"}
    rows = []
    for key, label in labels.items():
        cells = [f"{ms(key, b):8.1f} ({ms(key, b, 'ms_per_image_min'):6.1f})" if ms(key, b) else f"{'-':>17}"
                 for b in BATCHES]
        rows.append((label, "  ".join(cells) + "   ms/image at batch " + "/".join(map(str, BATCHES))
                     + ", median (least disturbed run)"))
    for name, value in ratios.items():
        goal = f"   (goal >= {GOAL_INT8_VS_PYTORCH:g}x)" if name == "int8_speedup_vs_pytorch_b8" else ""
        rows.append((name, (f"{value:.3f}" if "cost" in name else f"{value:.1f}x") + goal))
    rows.append(("threads (onnxruntime, torch, tensorflow)", ", ".join(
        str(data["threads"].get(k, "-")) for k in ("onnxruntime", "torch", "tensorflow"))))
    rows.append(("int8 variants export tries here, in order", ", ".join(data["int8"]["export_tries"])))
    rows.append(("load average (start, end)", f"{data['load_avg_start']}, {data['load_avg_end']}"))
    report("bench_gradcam", rows, data)


if __name__ == "__main__":
    main()
