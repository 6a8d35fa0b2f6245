"""GPU benchmark (not a test): the worker's CUDA path (:class:`worker.model.OnnxModel` with the
CUDA provider, I/O binding and padded batches) on the trainer's 224-px ResNet-50 with RANDOM
weights: images/s at batch 1, 8 and 64 and per-run latency for probability + Grad-CAM (and the
contract's logit and out-of-distribution score), then the same with the worker's heatmap
faithfulness run added (its per-batch model work), fp32 and fp16 (``trainer.quantize.convert_fp16``).
In the same run, on the same GPU: the Grad-CAM's cost (the same graph without it) and
pytorch-grad-cam on torchvision's ResNet-50, the alternative a user would pick.

Design goal: >= 2,000 images/s at batch 64 on an H100. Where ONNX Runtime cannot run
on a GPU it prints "no GPU", writes nothing and exits 0. Needs the ``gpu`` extra and, to export
the model, TensorFlow (``train`` or ``train-gpu``); ``--model`` times a model of ours exported
elsewhere instead (ONNX Runtime and ``onnx`` alone). pytorch-grad-cam runs in the interpreter
``--torch-python`` names (default: bench_gradcam.py's virtualenv, where it exists).

Usage: python benchmarks/bench_gpu.py [--repeat N] [--model FP32.onnx] [--torch-python PYTHON]
"""

from __future__ import annotations

import argparse
import functools
import json
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

import numpy as np  # noqa: E402

from benchmarks.common import report, summary, timed  # noqa: E402
from benchmarks.models import SIZE, export_random, images, without_gradcam  # noqa: E402

HERE = Path(__file__).resolve().parent
BATCHES = (1, 8, 64)
GOAL_H100_B64 = 2000.0


def gpu_unusable() -> str | None:
    """Why ONNX Runtime cannot run on a GPU here, or None where it can: a one-node graph tells
    in a second, before any model is exported."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from worker.model import CUDA, preload_cuda_libraries, quiet_provider_probe

    if CUDA not in ort.get_available_providers():
        return "this ONNX Runtime has no CUDA provider (install the gpu extra: docs/install.md#gpu)"
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
    """The worker's own model object on CUDA, one batch size at a time (padded to itself):
    ``predict`` alone (the answer and its heatmap), then ``predict`` and ``faithfulness`` (the
    worker's model work per batch when heatmap faithfulness is on, its default). ``smoke`` runs
    the same path (bound, padded) on the CPU provider, to check this script."""
    from worker.model import OnnxModel

    out: dict[str, Any] = {}
    for b in batches:
        model = (OnnxModel(path, providers="cpu", batch_size=b, io_binding="on", pad_batches="on") if smoke
                 else OnnxModel(path, providers="cuda", batch_size=b))
        if not (model.on_cuda or smoke):
            raise SystemExit(f"{path.name}: the CUDA provider did not start; see the log above")
        x = images(b)

        def answer_and_faithfulness(m: OnnxModel = model, x: Any = x) -> None:
            m.faithfulness(x, [p.gradcam for p in m.predict(x)])

        seconds = timed(functools.partial(model.predict, x), repeat, warmup=3)
        with_faith = timed(answer_and_faithfulness, repeat, warmup=3)
        out[f"b{b}"] = {**summary(seconds), "images_per_s": b / statistics.median(seconds),
                        "with_faithfulness": {**summary(with_faith), "images_per_s": b / statistics.median(with_faith)},
                        "execution": model.execution}
    return out


def gradcam_cost(full: Path, repeat: int, batches: tuple[int, ...], *, smoke: bool = False) -> dict[str, Any]:
    """The model with and without its Grad-CAM branch, as the worker runs it (CUDA provider, input
    bound to the device, outputs copied back), one run of each in turn so that both see the
    same GPU clocks: the Grad-CAM's cost is the difference."""
    import onnxruntime as ort

    from worker.model import CPU, CUDA

    with tempfile.TemporaryDirectory() as tmp:
        paths = {"gradcam": full, "no_gradcam": without_gradcam(full, Path(tmp) / "no-gradcam.onnx")}
        options = ort.SessionOptions()
        options.log_severity_level = 3
        providers = [CPU] if smoke else [CUDA, CPU]
        sessions = {k: ort.InferenceSession(str(p), options, providers=providers) for k, p in paths.items()}
    device = "cpu" if smoke else "cuda"

    def run(session: Any, x: Any) -> None:
        binding = session.io_binding()
        binding.bind_ortvalue_input("image", ort.OrtValue.ortvalue_from_numpy(x, device, 0))
        for o in session.get_outputs():
            binding.bind_output(o.name, "cpu")
        session.run_with_iobinding(binding)
        binding.copy_outputs_to_cpu()

    out: dict[str, Any] = {}
    for b in batches:
        x = images(b)
        seconds: dict[str, list[float]] = {k: [] for k in sessions}
        for i in range(repeat):
            for key, session in sessions.items():
                seconds[key] += timed(functools.partial(run, session, x), 1, warmup=0 if i else 3)
        got: dict[str, Any] = {k: {**summary(v), "images_per_s": b / statistics.median(v)} for k, v in seconds.items()}
        got["cost"] = statistics.median(seconds["gradcam"]) / statistics.median(seconds["no_gradcam"]) - 1
        out[f"b{b}"] = got
    return out


def agreement(path: Path, reference: Path, *, smoke: bool = False) -> dict[str, Any]:
    """How far the CUDA path's answers (``path``, bound and padded, batch 8) are from the CPU
    provider's on ``reference`` (the fp32 model), on 16 images: the numbers export's int8/fp16
    gate limits (probability, Grad-CAM correlation), and the logit, out-of-distribution score
    and faithfulness, which random weights leave unsaturated."""
    from worker.model import OnnxModel

    x = images(16, seed=1)
    want = OnnxModel(reference, providers="cpu", io_binding="off", pad_batches="off")
    got = (OnnxModel(path, providers="cpu", batch_size=8, io_binding="on", pad_batches="on") if smoke
           else OnnxModel(path, providers="cuda", batch_size=8))
    w, g = want.predict(x), got.predict(x)
    corr = [float(np.corrcoef(a.gradcam.ravel(), b.gradcam.ravel())[0, 1]) for a, b in zip(w, g, strict=True)]
    fw = want.faithfulness(x, [p.gradcam for p in w])
    fg = got.faithfulness(x, [p.gradcam for p in g])
    pairs = list(zip(w, g, strict=True))
    return {"max_abs_probability": max(abs(a.probability - b.probability) for a, b in pairs),
            "max_abs_logit": max(abs((a.logit or 0.0) - (b.logit or 0.0)) for a, b in pairs),
            "max_rel_ood_score": max(abs((a.ood_score or 0.0) - (b.ood_score or 0.0))
                                     / max(abs(a.ood_score or 1.0), 1e-9) for a, b in pairs),
            "min_gradcam_correlation": min(corr),
            "max_abs_faithfulness": max(abs(a - b) for a, b in zip(fw, fg, strict=True)),
            "logit_range": [min(a.logit or 0.0 for a in w), max(a.logit or 0.0 for a in w)]}


def default_torch_python() -> str | None:
    """bench_gradcam.py's virtualenv where it exists (this benchmark installs nothing)."""
    python = HERE / ".venv-gradcam" / "bin" / "python"
    return str(python) if python.is_file() else None


def bench_pytorch(python: str, repeat: int, batches: tuple[int, ...], device: str) -> dict[str, Any] | str:
    """pytorch-grad-cam (``gradcam_torch.py``) in ``python``, on ``device``; a reason where it cannot run."""
    try:
        got = subprocess.run([python, str(HERE / "gradcam_torch.py"), "--device", device, str(SIZE), str(repeat),
                              *map(str, batches)], capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"not measured: {type(exc).__name__}: {exc}"
    if got.returncode:
        last = (got.stderr.strip().splitlines() or ["no output"])[-1]
        return f"not measured: {python} exited {got.returncode}: {last}"
    data = json.loads(got.stdout.strip().splitlines()[-1])
    out: dict[str, Any] = {k: data[k] for k in ("torch", "torchvision", "device_name")}
    for b in batches:
        out[f"b{b}"] = {**summary(data[f"b{b}"]), "images_per_s": b / statistics.median(data[f"b{b}"])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=50, help="timed runs per batch size")
    parser.add_argument("--model", type=Path, help="time this fp32 model of ours instead of exporting one with "
                        "random weights (needs no TensorFlow); fp16 is converted from it")
    parser.add_argument("--torch-python", default=default_torch_python(),
                        help="interpreter with torch, torchvision and grad-cam, for pytorch-grad-cam on the same GPU "
                             "(default: benchmarks/.venv-gradcam's, made by bench_gradcam.py); 'none' skips it")
    parser.add_argument("--smoke-on-cpu", action="store_true",
                        help="check this script without a GPU: the same path on the CPU, batch 1 and 8, "
                             "2 runs each; prints, writes no JSON (its numbers are no GPU's)")
    args = parser.parse_args()
    if args.model is not None and not args.model.is_file():
        parser.error(f"--model: no such file: {args.model}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    why = None if args.smoke_on_cpu else gpu_unusable()
    if why is not None:
        print(f"no GPU: {why}; nothing measured")
        return
    batches, repeat = ((1, 8), 2) if args.smoke_on_cpu else (BATCHES, args.repeat)
    data: dict[str, Any] = {"gpu": "none: --smoke-on-cpu" if args.smoke_on_cpu else card(),
                            "weights": "random (cost only)" if args.model is None else str(args.model),
                            "batches": list(batches), "repeat": repeat}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = args.model if args.model is not None else export_random(Path(tmp))[0]
        data["fp32"] = bench_model(fp32, repeat, batches, smoke=args.smoke_on_cpu)
        data["agreement_fp32"] = agreement(fp32, fp32, smoke=args.smoke_on_cpu)
        data["gradcam_cost_fp32"] = gradcam_cost(fp32, repeat, batches, smoke=args.smoke_on_cpu)
        try:
            from trainer.quantize import convert_fp16

            fp16 = convert_fp16(fp32, Path(tmp) / "fp16.onnx")
            data["fp16"] = bench_model(fp16, repeat, batches, smoke=args.smoke_on_cpu)
            data["agreement_fp16"] = agreement(fp16, fp32, smoke=args.smoke_on_cpu)
        except Exception as exc:  # the fp32 numbers still stand; the table says why fp16 has none
            data["fp16"] = f"not measured: {type(exc).__name__}: {exc}"
    torch_python = None if args.torch_python in (None, "none") else args.torch_python
    data["pytorch_grad_cam"] = (bench_pytorch(torch_python, repeat, batches, "cpu" if args.smoke_on_cpu else "cuda")
                                if torch_python else "not measured: no --torch-python (run bench_gradcam.py once "
                                "to make its virtualenv)")
    rows = [("GPU", data["gpu"])]

    def cell(got: dict[str, Any]) -> str:
        return (f"{got['images_per_s']:8.0f} images/s   p50 {got['p50_ms']:7.2f} ms   "
                f"p95 {got['p95_ms']:7.2f} ms per run")

    for precision in ("fp32", "fp16"):
        got = data[precision]
        for b in batches:
            if isinstance(got, dict):
                rows.append((f"{precision} batch {b}", cell(got[f"b{b}"])))
                rows.append(("  + faithfulness", cell(got[f"b{b}"]["with_faithfulness"])))
            else:
                rows.append((f"{precision} batch {b}", got))
    for precision in ("fp32", "fp16"):
        agree = data.get(f"agreement_{precision}")
        if agree:
            rows.append((f"{precision} vs CPU fp32", f"|dprob| {agree['max_abs_probability']:.1e}  |dlogit| "
                         f"{agree['max_abs_logit']:.1e}  Grad-CAM r >= {agree['min_gradcam_correlation']:.4f}  "
                         f"|dfaith| {agree['max_abs_faithfulness']:.1e}"))
    for b in batches:
        cost = data["gradcam_cost_fp32"][f"b{b}"]
        rows.append((f"Grad-CAM cost b{b}", f"{100 * cost['cost']:+.1f} % (fp32: "
                     f"{cost['gradcam']['p50_ms']:.2f} vs {cost['no_gradcam']['p50_ms']:.2f} ms per run)"))
    torch_got = data["pytorch_grad_cam"]
    for b in batches:
        if isinstance(torch_got, dict):
            ours = [data[p][f"b{b}"]["images_per_s"] for p in ("fp32", "fp16") if isinstance(data[p], dict)]
            rows.append((f"pytorch-grad-cam b{b}", f"{cell(torch_got[f'b{b}'])}   ours "
                         f"{max(ours) / torch_got[f'b{b}']['images_per_s']:.1f}x"))
        else:
            rows.append((f"pytorch-grad-cam b{b}", str(torch_got)))
    rows.append(("design goal", f">= {GOAL_H100_B64:,.0f} images/s at batch 64 on an H100"))
    data["goal"] = rows[-1][1]
    if args.smoke_on_cpu:
        for k, v in rows:
            print(f"{k:<22}  {v}")
        return
    report("bench_gpu", rows, data)


if __name__ == "__main__":
    main()
