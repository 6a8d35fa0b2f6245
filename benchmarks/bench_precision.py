"""int8 against fp32 (and fp16) on ONNX Runtime's CPU provider: ms/image at batch 1 and 8 for
the contract's whole graph (probability, logit, Grad-CAM, ood_score), and optionally the
verification numbers of a trained model.

    python benchmarks/bench_precision.py                      # 224-px ResNet-50, random weights
    python benchmarks/bench_precision.py --verify RUN FP32_ONNX   # + limits on RUN's test split
    python benchmarks/bench_precision.py --model FP32_ONNX      # time an exported model instead
    python benchmarks/bench_precision.py --variants             # each int8 variant (s8s8, u8s8, u8u8)

Building the random model converts it with tf2onnx, which peaked above 9 GB of memory at 224 px
here; ``--model`` skips that with any contract-v2 fp32 model that names its feature layer.

Random weights are fine for speed: the graph and its shapes are the trained model's. The int8
model comes from :func:`trainer.quantize.quantize_int8`, calibrated on 32 phantoms.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from benchmarks.common import report, summary  # noqa: E402
from cxr_contract.model import INPUT_NAME, Meta, required_outputs  # noqa: E402


def random_model(size: int, out: Path) -> Path:
    """A 224-px ResNet-50 with the paper's head, random weights, exported like ``cxr-train
    export`` does (Grad-CAM and a Mahalanobis gate fitted on random features in the graph)."""
    import onnx

    from trainer.config import ModelSection
    from trainer.export import prune_to_contract, to_onnx
    from trainer.model import build_model
    from trainer.ood import fit_gate

    cfg = ModelSection(image_size=size, weights="none")
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    gate = fit_gate(rng.random((64, 2048)), np.arange(64) % 2)
    proto = prune_to_contract(to_onnx(model, cfg.feature_layer, size, gate))
    onnx.helper.set_model_props(proto, {Meta.CONTRACT_VERSION: "2", Meta.NAME: "random", Meta.VERSION: "bench",
                                        Meta.INPUT_SIZE: str(size), Meta.THRESHOLD: "0.5",
                                        Meta.WEIGHTS_SHA256: "0" * 64, Meta.FEATURE_LAYER: cfg.feature_layer,
                                        Meta.OOD_THRESHOLD: "1", Meta.HEATMAP_SCALE: "1", Meta.PRECISION: "fp32"})
    onnx.save(proto, str(out))
    return out


def phantoms(size: int, n: int, seed: int) -> np.ndarray[Any, Any]:
    from trainer.phantoms import make_phantom

    rng = np.random.default_rng(seed)
    return np.stack([make_phantom(rng, size, bool(i % 2))[0] for i in range(n)])[..., None].astype(np.float32)


def per_image_ms(paths: dict[str, Path], images: np.ndarray[Any, Any], batch: int, repeat: int,
                 threads: int) -> dict[str, dict[str, float]]:
    """ms per image of each model, the models timed in turn within each round: on a machine
    shared with other work, load then falls on all of them alike. ``min_ms`` is the least
    disturbed round."""
    import time

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    sessions = {k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    feed = {INPUT_NAME: images[:batch]}
    outputs = list(required_outputs(2))
    seconds: dict[str, list[float]] = {k: [] for k in sessions}
    for i in range(repeat + 2):  # two warm-up rounds
        for k, session in sessions.items():
            t = time.perf_counter()
            session.run(outputs, feed)
            if i >= 2:
                seconds[k].append(time.perf_counter() - t)
    out = {}
    for k, s in seconds.items():
        stats = summary(s)
        out[k] = {**{m: (v / batch if m.endswith("_ms") else v) for m, v in stats.items()},
                  "min_ms": 1000 * min(s) / batch}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    p.add_argument("--fp16", action="store_true", help="also time the fp16 model on the CPU (slow: no fp16 kernels)")
    p.add_argument("--model", type=Path, default=None, help="an exported fp32 model to time instead of a random one")
    p.add_argument("--variants", action="store_true",
                   help="time every int8 variant (signedness of activations/weights), not only the one "
                        "export would choose on this CPU")
    p.add_argument("--verify", nargs=2, metavar=("RUN", "FP32_ONNX"),
                   help="also the limits' numbers of int8 and fp16 against FP32_ONNX on RUN's test split")
    args = p.parse_args()
    from trainer.quantize import INT8_VARIANTS, convert_fp16, has_vnni, int8_variants, quantize_int8

    data: dict[str, Any] = {"size": args.size, "threads": args.threads or "all",
                            "model": str(args.model) if args.model else "random weights (speed only)"}
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is not None:
            import onnx

            meta = {p.key: p.value for p in onnx.load(str(args.model), load_external_data=False).metadata_props}
            args.size = data["size"] = int(meta[Meta.INPUT_SIZE])
        fp32 = args.model or random_model(args.size, Path(tmp) / "fp32.onnx")
        calibration = phantoms(args.size, 32, 1)
        data["cpu_vnni"] = has_vnni()
        # Without --variants, the variant export tries first on this CPU.
        variants = list(INT8_VARIANTS) if args.variants else [int8_variants()[0]]
        models = {"fp32": fp32}
        for v in variants:
            name = f"int8 {v}" if args.variants else "int8"
            models[name] = quantize_int8(fp32, calibration, Path(tmp) / f"int8-{v}.onnx", variant=v)
        data["int8_variants"] = variants
        if args.fp16:
            models["fp16"] = convert_fp16(fp32, Path(tmp) / "fp16.onnx")
        images = phantoms(args.size, 8, 2)
        for batch in (1, 8):
            timings = per_image_ms(models, images, batch, args.repeat, args.threads)
            for name, t in timings.items():
                data[f"{name}_batch{batch}"] = t
                rows.append((f"{name} batch {batch} ms/image (p50, min)", f"{t['p50_ms']:.1f}, {t['min_ms']:.1f}"))
            for name in (k for k in models if k.startswith("int8")):
                key = name.replace(" ", "_")
                speedup = timings["fp32"]["p50_ms"] / timings[name]["p50_ms"]
                data[f"{key}_speedup_batch{batch}"] = speedup
                data[f"{key}_speedup_batch{batch}_min"] = timings["fp32"]["min_ms"] / timings[name]["min_ms"]
                rows.append((f"{name} speed-up at batch {batch} (p50, min)",
                             f"{speedup:.2f}x, {data[f'{key}_speedup_batch{batch}_min']:.2f}x"))
        data["model_mb"] = {k: round(v.stat().st_size / 2**20, 1) for k, v in models.items()}
        rows.append(("model size MB", ", ".join(f"{k} {v}" for k, v in data["model_mb"].items())))

        if args.verify:
            import json

            from trainer.data import load_dataset, require_split
            from trainer.export import calibration_records, reduce_and_verify

            run, model = Path(args.verify[0]), Path(args.verify[1])
            info = json.loads((run / "config.json").read_text())
            ds = load_dataset(Path(info["data"]))
            val, test = require_split(ds, "val"), require_split(ds, "test")
            for precision in ("int8", "fp16"):
                _, check = reduce_and_verify(model, precision, calibration_records(val, 0), test, Path(tmp),
                                             validation=val)
                data[f"verify_{precision}"] = check
                rows.append((f"{precision} vs fp32 on {check['images']} test images",
                             f"max|dp| {check['probability_max_abs_diff']:.4f}, Grad-CAM r "
                             f"{check['gradcam_mean_pearson']:.4f}, dAUC {check['auc_abs_diff']}, decisions "
                             f"{check['decision_agreement']:.3f}, OOD verdicts {check['ood_verdict_agreement']:.3f}"
                             f", passed {check['passed']}"))
    report("bench_precision_int8_variants" if args.variants else "bench_precision", rows, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
