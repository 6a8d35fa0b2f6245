"""Trainer benchmark (not a test): training throughput and export time.

Trains ResNet-50 (random init, the paper's head) for a few steps on phantoms at each
size and reports images/s for the fit step, next to plain Keras ``model.fit`` on the same
data held in memory (what a user would write without our tf.data pipeline), and the time
to export and verify the ONNX model. Runs on the GPU when TensorFlow sees one.

Usage: python benchmarks/bench_trainer.py [--sizes 128,224] [--steps 6]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from benchmarks.common import report  # noqa: E402


def main() -> None:
    import keras
    import tensorflow as tf

    from trainer.config import load_config
    from trainer.data import load_dataset
    from trainer.export import sample_images, to_onnx, verify
    from trainer.fit import make_dataset
    from trainer.model import build_model
    from trainer.ood import fit_gate
    from trainer.phantoms import write_phantoms

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="128,224")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    gpus = tf.config.list_physical_devices("GPU")
    results: dict[str, dict[str, float]] = {}
    rows = [("device", f"{len(gpus)} GPU(s)" if gpus else "CPU only")]
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            n = args.batch_size * (args.steps + 2)
            data = Path(tmp) / f"d{size}"
            write_phantoms(data, max(n, 12), size=size, seed=1)
            cfg = load_config(None, {"model": {"image_size": size, "weights": "none"},
                                     "train": {"batch_size": args.batch_size, "epochs": 1}})
            records = load_dataset(data).splits["train"]
            model = build_model(cfg.model)
            model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy")
            ds = make_dataset(records, cfg, training=True).repeat()
            model.fit(ds, steps_per_epoch=1, epochs=1, verbose=0)  # build and trace
            t = time.perf_counter()
            model.fit(ds, steps_per_epoch=args.steps, epochs=1, verbose=0)
            ours = args.steps * args.batch_size / (time.perf_counter() - t)
            x = np.random.default_rng(0).random((args.steps * args.batch_size, size, size, 1), dtype=np.float32)
            y = (np.arange(len(x)) % 2).astype(np.float32)[:, None]
            model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy")  # fresh trace
            model.fit(x[: args.batch_size], y[: args.batch_size], batch_size=args.batch_size, verbose=0)
            t = time.perf_counter()
            model.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=0)
            plain = len(x) / (time.perf_counter() - t)
            t = time.perf_counter()
            # the out-of-distribution gate's cost shape (export fits it on the training features)
            gate = fit_gate(np.random.default_rng(0).random((64, 2048)), np.arange(64) % 2)
            proto = to_onnx(model, "conv5_block3_out", size, gate)
            convert = time.perf_counter() - t
            t = time.perf_counter()
            verify(proto, model, "conv5_block3_out", sample_images({"data": str(data)}, size), gate)
            check = time.perf_counter() - t
            results[str(size)] = {"train_images_per_s": ours, "keras_numpy_fit_images_per_s": plain,
                                  "export_convert_s": convert, "export_verify_s": check}
            rows += [(f"{size}px fit, tf.data pipeline (augmented)", f"{ours:.1f} images/s"),
                     (f"{size}px fit, plain model.fit on numpy", f"{plain:.1f} images/s"),
                     (f"{size}px export: tf2onnx convert", f"{convert:.1f} s"),
                     (f"{size}px export: verify vs GradientTape", f"{check:.1f} s")]
    report("bench_trainer", rows, {"gpus": len(gpus), "batch_size": args.batch_size, "steps": args.steps,
                                   "results": results})


if __name__ == "__main__":
    main()
