"""GPU benchmark (not a test): the worker's CUDA path (:class:`worker.model.OnnxModel` with the
CUDA provider, I/O binding and padded batches) on the trainer's 224-px ResNet-50 with RANDOM
weights: images/s at batch 1, 8 and 64 and per-run latency for probability + Grad-CAM (and the
contract's logit and out-of-distribution score), fp32 and fp16 (``trainer.quantize.convert_fp16``).

Design goal (issue 12): >= 2,000 images/s at batch 64 on an H100. Where ONNX Runtime cannot run
on a GPU it prints "no GPU", writes nothing and exits 0. Needs the ``gpu`` extra and, to export
the model, TensorFlow (``train`` or ``train-gpu``).

Usage: python benchmarks/bench_gpu.py [--repeat N]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from benchmarks.common import report, summary, timed  # noqa: E402
from benchmarks.models import export_random, images  # noqa: E402

BATCHES = (1, 8, 64)
GOAL_H100_B64 = 2000.0


def gpu_unusable() -> str | None:
    """Why ONNX Runtime cannot run on a GPU here, or None where it can: a one-node graph tells
    in a second, before any model is exported."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from worker.model import CUDA, preload_cuda_libraries, quiet_provider_probe

    if CUDA not in ort.get_available_providers():
        return "this ONNX Runtime has no CUDA provider (install the gpu extra: README \"GPU\")"
    preload_cuda_libraries(ort)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    probe.ir_version = 8
    with quiet_provider_probe(ort):
        session = ort.InferenceSession(probe.SerializeToString(), providers=[CUDA, "CPUExecutionProvider"])
    if CUDA not in session.get_providers():
        return "the CUDA provider did not start (no GPU visible, or CUDA/cuDNN libraries missing)"
    return None


def card() -> str:
    """The GPU's name as nvidia-smi reports it."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown GPU"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown GPU"


def bench_model(path: Path, repeat: int, batches: tuple[int, ...] = BATCHES, *, smoke: bool = False) -> dict[str, Any]:
    """The worker's own model object on CUDA, one batch size at a time (padded to itself);
    ``smoke`` runs the same path (bound, padded) on the CPU provider, to check this script."""
    from worker.model import OnnxModel

    out: dict[str, Any] = {}
    for b in batches:
        model = (OnnxModel(path, providers="cpu", batch_size=b, io_binding="on", pad_batches="on") if smoke
                 else OnnxModel(path, providers="cuda", batch_size=b))
        if not (model.on_cuda or smoke):
            raise SystemExit(f"{path.name}: the CUDA provider did not start; see the log above")
        x = images(b)
        seconds = timed(lambda m=model, x=x: m.predict(x), repeat, warmup=3)
        out[f"b{b}"] = {**summary(seconds), "images_per_s": b / statistics.median(seconds),
                        "execution": model.execution}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=50, help="timed runs per batch size")
    parser.add_argument("--smoke-on-cpu", action="store_true",
                        help="check this script without a GPU: the same path on the CPU, batch 1 and 8, "
                             "2 runs each; prints, writes no JSON (its numbers are no GPU's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    why = None if args.smoke_on_cpu else gpu_unusable()
    if why is not None:
        print(f"no GPU: {why}; nothing measured")
        return
    batches, repeat = ((1, 8), 2) if args.smoke_on_cpu else (BATCHES, args.repeat)
    data: dict[str, Any] = {"gpu": "none: --smoke-on-cpu" if args.smoke_on_cpu else card(),
                            "weights": "random (cost only)", "batches": list(batches)}
    with tempfile.TemporaryDirectory() as tmp:
        fp32, _, _ = export_random(Path(tmp))
        data["fp32"] = bench_model(fp32, repeat, batches, smoke=args.smoke_on_cpu)
        try:
            from trainer.quantize import convert_fp16

            fp16 = convert_fp16(fp32, Path(tmp) / "fp16.onnx")
            data["fp16"] = bench_model(fp16, repeat, batches, smoke=args.smoke_on_cpu)
        except Exception as exc:  # the fp32 numbers still stand; the table says why fp16 has none
            data["fp16"] = f"not measured: {type(exc).__name__}: {exc}"
    rows = [("GPU", data["gpu"])]
    for precision in ("fp32", "fp16"):
        got = data[precision]
        for b in batches:
            cell = (f"{got[f'b{b}']['images_per_s']:8.0f} images/s   p50 {got[f'b{b}']['p50_ms']:7.2f} ms   "
                    f"p95 {got[f'b{b}']['p95_ms']:7.2f} ms per run" if isinstance(got, dict) else got)
            rows.append((f"{precision} batch {b}", cell))
    rows.append(("design goal", f">= {GOAL_H100_B64:,.0f} images/s at batch 64 on an H100"))
    data["goal"] = rows[-1][1]
    if args.smoke_on_cpu:
        for k, v in rows:
            print(f"{k:<16}  {v}")
        return
    report("bench_gpu", rows, data)


if __name__ == "__main__":
    main()
