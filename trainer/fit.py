"""``cxr-train fit``: the paper's fine-tuning recipe with a resumable run folder."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import keras
import numpy as np
import tensorflow as tf

from cxr_contract.pixels import resize_for_model, to_unit_range
from trainer.config import TrainConfig, resolved_bn
from trainer.data import Record, load_dataset, require_split
from trainer.errors import DataError, TrainerError
from trainer.model import build_model

RUN_CONFIG = "config.json"
MODEL_FILE = "model.keras"


def load_image(path: str, size: int) -> np.ndarray[Any, Any]:
    """An 8/16-bit grayscale PNG (or an RSNA DICOM) -> ``[size, size, 1]`` float32, exactly as the worker
    brings a DICOM image to the model (the shared steps of :mod:`cxr_contract.pixels`)."""
    img: np.ndarray[Any, Any] | None
    if str(path).lower().endswith(".dcm"):  # RSNA's images (trainer.rsna)
        from trainer.rsna import dicom_pixels

        img = dicom_pixels(path)
    else:
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(f"{path}: not a readable image")
    if img.ndim == 3:
        img = cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2GRAY)
    return resize_for_model(to_unit_range(img), size)[..., None]


def make_dataset(
    records: list[Record], cfg: TrainConfig, *, training: bool, cache: bool | None = None
) -> tf.data.Dataset:
    """A tf.data pipeline: parallel decode, optional cache, augmentation, batch, prefetch."""
    size = cfg.model.image_size
    paths = [r.path for r in records]
    labels = np.array([r.label for r in records], np.float32)[:, None]

    def decode(path: tf.Tensor) -> tf.Tensor:
        img = tf.numpy_function(lambda p: load_image(p.decode(), size), [path], tf.float32)
        img.set_shape((size, size, 1))
        return img

    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    ds = ds.map(lambda p, y: (decode(p), y), num_parallel_calls=tf.data.AUTOTUNE)
    if cfg.train.cache if cache is None else cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(min(len(records), 4096), seed=cfg.train.seed, reshuffle_each_iteration=True)
        augment = augmentation(cfg)
        if augment is not None:
            ds = ds.map(lambda x, y: (tf.clip_by_value(augment(x, training=True), 0.0, 1.0), y),
                        num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(cfg.train.batch_size).prefetch(tf.data.AUTOTUNE)


def augmentation(cfg: TrainConfig) -> keras.Sequential | None:
    """The paper's augmentations, each switchable in ``[augment]``."""
    a, seed = cfg.augment, cfg.train.seed
    layers: list[keras.layers.Layer] = []
    if a.rotation_degrees:
        layers.append(keras.layers.RandomRotation(a.rotation_degrees / 360.0, fill_mode="constant", seed=seed))
    if a.zoom:
        layers.append(keras.layers.RandomZoom(a.zoom, fill_mode="constant", seed=seed))
    if a.horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if a.contrast:
        layers.append(keras.layers.RandomContrast(a.contrast, value_range=(0.0, 1.0), seed=seed))
    return keras.Sequential(layers, name="augment") if layers else None


def class_weights(records: list[Record], mode: str) -> dict[int, float] | None:
    """Balanced class weights when the classes differ in size (``mode == 'auto'``)."""
    n1 = sum(r.label for r in records)
    n0 = len(records) - n1
    if mode == "none" or n0 == n1 or not n0 or not n1:
        return None
    n = len(records)
    return {0: n / (2 * n0), 1: n / (2 * n1)}


def versions() -> dict[str, str]:
    """Library versions and the git commit, for the run folder."""
    import onnx  # noqa: F401  (recorded because export needs it)

    out = {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
           "numpy": np.__version__}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent)
        out["git_commit"] = commit.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = "unknown"
    return out


class ResumableEarlyStopping(keras.callbacks.Callback):
    """Early stopping on validation loss whose state survives an interrupted run.

    Writes ``checkpoints/state.json`` after each epoch (after the checkpoints), so a
    resumed run continues the same patience count and best value.
    """

    def __init__(self, run: Path, patience: int) -> None:
        super().__init__()
        self.path = run / "checkpoints" / "state.json"
        self.patience = patience
        state = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.epoch = int(state.get("epoch", 0))
        self.best = float(state.get("best_val_loss", np.inf))
        self.wait = int(state.get("wait", 0))

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        loss = float((logs or {}).get("val_loss", np.inf))
        improved = loss < self.best
        if improved:
            self.best, self.wait = loss, 0
            self.model.save(self.path.parent / "best.keras")
        else:
            self.wait += 1
        self.model.save(self.path.parent / "last.keras")
        self.epoch = epoch + 1
        self.path.write_text(json.dumps({"epoch": self.epoch, "best_val_loss": self.best, "wait": self.wait}))
        if self.patience and self.wait >= self.patience:
            self.model.stop_training = True


def compile_model(model: keras.Model, cfg: TrainConfig) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(cfg.train.learning_rate),
        loss="binary_crossentropy",
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
    )


def warm_up_head(model: keras.Model, cfg: TrainConfig, train: tf.data.Dataset, val: tf.data.Dataset,
                 *, callbacks: list[keras.callbacks.Callback] | None = None, verbose: int = 0) -> None:
    """Train only the layers after the feature layer for ``head_warmup_epochs``, then make
    the backbone trainable again as it was (frozen BatchNormalization stays frozen)."""
    names = [layer.name for layer in model.layers]
    backbone = model.layers[: names.index(cfg.model.feature_layer) + 1]
    was = [layer.trainable for layer in backbone]
    for layer in backbone:
        layer.trainable = False
    compile_model(model, cfg)
    model.fit(train, validation_data=val, epochs=cfg.train.head_warmup_epochs, shuffle=False,
              callbacks=callbacks or [], verbose=verbose)
    for layer, trainable in zip(backbone, was, strict=True):
        layer.trainable = trainable
    compile_model(model, cfg)  # a fresh optimizer: trainable weights changed


def _strategy() -> tf.distribute.Strategy:
    gpus = tf.config.list_physical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


def fit(data: Path, run: Path, cfg: TrainConfig, *, verbose: int | None = None) -> dict[str, Any]:
    """Train, or resume an interrupted run, and write ``RUN/model.keras``.

    Returns:
        The run's info: epochs run, best validation loss, paths.
    """
    # Mixed precision is Keras' global policy: restored afterwards, so that what the process
    # builds next (an evaluation, an export, the next test) is not silently float16.
    previous = keras.mixed_precision.global_policy()
    try:
        return _fit(data, run, cfg, verbose=verbose)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _fit(data: Path, run: Path, cfg: TrainConfig, *, verbose: int | None = None) -> dict[str, Any]:
    dataset = load_dataset(data)
    train = require_split(dataset, "train")
    val = require_split(dataset, "val")
    run.mkdir(parents=True, exist_ok=True)
    if (run / MODEL_FILE).exists():
        raise TrainerError(f"{run} already holds a trained model ({MODEL_FILE}): choose another --out")
    ckpt = run / "checkpoints"
    ckpt.mkdir(exist_ok=True)
    resuming = (ckpt / "last.keras").is_file() and (ckpt / "state.json").is_file()
    if resuming:
        saved = TrainConfig.model_validate(json.loads((run / RUN_CONFIG).read_text())["config"])
        if saved != cfg:
            print(f"resuming {run} with the configuration it was started with", file=sys.stderr)
        cfg = saved

    gpus = tf.config.list_physical_devices("GPU")
    if cfg.train.mixed_precision == "on" or (cfg.train.mixed_precision == "auto" and gpus):
        keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(cfg.train.seed)
    if cfg.train.deterministic:
        # Same data, seed and machine give the same model (slower on GPU; cheap on CPU).
        tf.config.experimental.enable_op_determinism()
    with _strategy().scope():
        if resuming:
            model = keras.models.load_model(ckpt / "last.keras")
        else:
            model = build_model(cfg.model)
            compile_model(model, cfg)
    info = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": str(Path(data).resolve()),
        "config": cfg.model_dump(),
        "versions": versions(),
        "gpus": len(gpus),
        "batchnorm": resolved_bn(cfg.model),
        "head_warmup_epochs": cfg.train.head_warmup_epochs,
    }
    if not resuming:
        (run / RUN_CONFIG).write_text(json.dumps(info, indent=2) + "\n")
        summary = dataset.root / "summary.json"
        if summary.is_file():
            (run / "data_summary.json").write_text(summary.read_text())
        if cfg.train.head_warmup_epochs:
            # Not checkpointed: an interrupted warm-up restarts with the run.
            with _strategy().scope():
                warm_up_head(model, cfg, make_dataset(train, cfg, training=True),
                             make_dataset(val, cfg, training=False),
                             callbacks=[keras.callbacks.CSVLogger(str(run / "warmup-history.csv"))],
                             verbose=verbose if verbose is not None else 2)
    stopper = ResumableEarlyStopping(run, cfg.train.patience)
    if stopper.epoch >= cfg.train.epochs or (stopper.patience and stopper.wait >= stopper.patience):
        pass  # interrupted after the last epoch but before the final save
    else:
        model.fit(
            make_dataset(train, cfg, training=True),
            validation_data=make_dataset(val, cfg, training=False),
            epochs=cfg.train.epochs,
            initial_epoch=stopper.epoch,
            shuffle=False,  # the tf.data pipeline shuffles
            class_weight=class_weights(train, cfg.train.class_weights),
            callbacks=[
                keras.callbacks.CSVLogger(str(run / "history.csv"), append=True),
                keras.callbacks.TensorBoard(str(run / "tensorboard"), write_graph=False),
                stopper,
            ],
            verbose=verbose if verbose is not None else (1 if sys.stdout.isatty() else 2),
        )
    best = keras.models.load_model(ckpt / "best.keras") if (ckpt / "best.keras").is_file() else model
    best.save(run / MODEL_FILE)
    plot_curves(run)
    return {"run": str(run), "epochs": stopper.epoch, "best_val_loss": stopper.best}


def plot_curves(run: Path) -> None:
    """training-curves.png from history.csv: loss, accuracy and AUC per epoch."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = run / "history.csv"
    if not path.is_file():
        raise DataError(f"{path} is missing: nothing to plot")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, key in zip(axes, ("loss", "accuracy", "auc"), strict=True):
        for prefix, style in (("", "-o"), ("val_", "--s")):
            if rows and prefix + key in rows[0]:
                ax.plot(epochs, [float(r[prefix + key]) for r in rows], style, label=(prefix or "train_") + key)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(run / "training-curves.png", dpi=100)
    plt.close(fig)
