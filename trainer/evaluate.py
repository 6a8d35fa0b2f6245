"""``cxr-train evaluate``: the paper's metrics with confidence intervals, plus how
well the Grad-CAM heatmaps point at expert regions.

Threshold rule (documented in the README): the decision threshold is chosen on the
validation split, by Youden's J (maximal TPR - FPR) unless the config says
``threshold_rule = "fixed"``, and then applied unchanged to the evaluated split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import keras
import numpy as np
import tensorflow as tf
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from trainer.config import TrainConfig
from trainer.data import Box, Dataset, Record, load_dataset, read_boxes, require_split
from trainer.errors import DataError, TrainerError
from trainer.fit import MODEL_FILE, RUN_CONFIG, load_image, make_dataset
from trainer.model import gradcam_forward


def load_run(run: Path) -> tuple[keras.Model, TrainConfig, dict[str, Any]]:
    """The trained model, its config, and the run info."""
    if not (run / MODEL_FILE).is_file() or not (run / RUN_CONFIG).is_file():
        raise TrainerError(f"{run} holds no trained model: run 'cxr-train fit --out {run}' first")
    info = json.loads((run / RUN_CONFIG).read_text())
    cfg = TrainConfig.model_validate(info["config"])
    return keras.models.load_model(run / MODEL_FILE), cfg, info


def predict(model: keras.Model, records: list[Record], cfg: TrainConfig) -> np.ndarray[Any, Any]:
    """Probabilities for a split, in record order."""
    ds = make_dataset(records, cfg, training=False, cache=False)
    return np.asarray(model.predict(ds, verbose=0), dtype=np.float64).ravel()


def choose_threshold(y: np.ndarray[Any, Any], p: np.ndarray[Any, Any], cfg: TrainConfig) -> float:
    """Youden's J on validation, or the configured fixed threshold."""
    if cfg.evaluate.threshold_rule == "fixed":
        return cfg.evaluate.fixed_threshold
    fpr, tpr, thresholds = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(np.clip(thresholds[best], 0.0, 1.0))


def point_metrics(y: np.ndarray[Any, Any], p: np.ndarray[Any, Any], threshold: float) -> dict[str, float]:
    """Accuracy, precision, recall, specificity, F1 at the threshold, and ROC AUC."""
    pred = p >= threshold
    tp = float(np.sum(pred & (y == 1)))
    tn = float(np.sum(~pred & (y == 0)))
    fp = float(np.sum(pred & (y == 0)))
    fn = float(np.sum(~pred & (y == 1)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / len(y),
        "precision": precision,
        "recall": recall,
        "specificity": tn / (tn + fp) if tn + fp else 0.0,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "auc": float(roc_auc_score(y, p)) if len(set(y.tolist())) == 2 else float("nan"),
    }


def bootstrap_ci(
    y: np.ndarray[Any, Any], p: np.ndarray[Any, Any], threshold: float, n: int, seed: int
) -> dict[str, list[float]]:
    """95% percentile bootstrap intervals, resampling images with replacement."""
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if len(set(y[idx].tolist())) < 2:
            continue
        for k, v in point_metrics(y[idx], p[idx], threshold).items():
            samples.setdefault(k, []).append(v)
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in samples.items()}


def region_mask(record: Record, boxes: list[Box], size: int) -> np.ndarray[Any, Any] | None:
    """The expert region at the model's input size: the phantom mask, else the boxes."""
    if record.mask:
        m = cv2.imread(record.mask, cv2.IMREAD_GRAYSCALE)
        if m is None:
            raise DataError(f"mask not readable: {record.mask}")
        return cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST) > 0
    if not boxes:
        return None
    img = cv2.imread(record.path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(f"image not readable: {record.path}")
    sy, sx = size / img.shape[0], size / img.shape[1]
    m = np.zeros((size, size), bool)
    for b in boxes:
        m[int(b.y * sy) : int(np.ceil((b.y + b.h) * sy)), int(b.x * sx) : int(np.ceil((b.x + b.w) * sx))] = True
    return m


def centre_prior(size: int) -> np.ndarray[Any, Any]:
    """The baseline heatmap: a Gaussian at the image centre (sigma = size / 4)."""
    yy, xx = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2
    return np.exp(-((xx - c) ** 2 + (yy - c) ** 2) / (2 * (size / 4) ** 2))


#: Pointing-game tolerance of Zhang et al. (2016): 15 px at 224 px, scaled to the input size.
POINTING_TOLERANCE_AT_224 = 15.0


def localisation(cam: np.ndarray[Any, Any], region: np.ndarray[Any, Any]) -> tuple[bool, float]:
    """Pointing game and energy for one raw (feature-resolution) heatmap.

    The pointing game hits when the heatmap's maximum lies within the tolerance
    (:data:`POINTING_TOLERANCE_AT_224`, scaled) of the region. A bilinear upsampling
    peaks at a feature-cell centre and is flat towards the border, where a plain
    argmax would pick the corner, so the maximum is the centre of the hottest cell.
    Energy is the fraction of the upsampled heatmap inside the region.
    """
    size = region.shape[0]
    if float(cam.max()) <= 0:
        return False, 0.0
    i, j = np.unravel_index(int(np.argmax(cam)), cam.shape)
    y = (i + 0.5) * size / cam.shape[0]
    x = (j + 0.5) * size / cam.shape[1]
    tolerance = POINTING_TOLERANCE_AT_224 * size / 224
    ys, xs = np.nonzero(region)
    hit = bool(np.min((ys - y) ** 2 + (xs - x) ** 2) <= tolerance**2) if len(ys) else False
    up = cv2.resize(cam.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    return hit, float(up[region].sum() / up.sum())


def heatmaps(model: keras.Model, cfg: TrainConfig, images: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Raw Grad-CAM maps at the feature resolution, one per image."""
    fn = tf.function(gradcam_forward(model, cfg.model.feature_layer))
    cams = [fn(tf.convert_to_tensor(images[i : i + 16]))[1].numpy() for i in range(0, len(images), 16)]
    return np.concatenate(cams)


def upsample(cam: np.ndarray[Any, Any], size: int) -> np.ndarray[Any, Any]:
    return cv2.resize(cam.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)


def evaluate(run: Path, split: str = "test", boxes_file: Path | None = None) -> dict[str, Any]:
    """Evaluate a run on one split and write metrics.json and the figures into the run."""
    model, cfg, info = load_run(run)
    dataset: Dataset = load_dataset(Path(info["data"]))
    boxes = read_boxes(boxes_file) if boxes_file else dataset.boxes
    val = require_split(dataset, "val")
    records = require_split(dataset, split)
    y_val = np.array([r.label for r in val])
    threshold = choose_threshold(y_val, predict(model, val, cfg), cfg)
    y = np.array([r.label for r in records])
    p = predict(model, records, cfg)
    metrics = point_metrics(y, p, threshold)
    ci = bootstrap_ci(y, p, threshold, cfg.evaluate.bootstrap, cfg.train.seed)

    size = cfg.model.image_size
    located: list[tuple[Record, np.ndarray[Any, Any]]] = []
    for r in records:
        m = region_mask(r, boxes.get(r.image_id, []), size) if r.label == 1 else None
        if m is not None and m.any():
            located.append((r, m))
    loc: dict[str, Any] = {"n": len(located)}
    if located:
        imgs = np.stack([load_image(r.path, size) for r, _ in located])
        cams = heatmaps(model, cfg, imgs)
        prior = centre_prior(size)
        ours = [localisation(c, m) for c, (_, m) in zip(cams, located, strict=True)]
        base = [localisation(prior, m) for _, m in located]
        loc.update({
            "pointing_game": float(np.mean([h for h, _ in ours])),
            "energy_in_region": float(np.mean([e for _, e in ours])),
            "centre_prior_pointing_game": float(np.mean([h for h, _ in base])),
            "centre_prior_energy_in_region": float(np.mean([e for _, e in base])),
            "regions": "phantom masks" if located[0][0].mask else "expert boxes",
        })
    cm = confusion_matrix(y, p >= threshold, labels=[0, 1])
    result = {
        "split": split,
        "n": len(y),
        "positives": int(y.sum()),
        "threshold": threshold,
        "threshold_rule": cfg.evaluate.threshold_rule + " on validation",
        "metrics": metrics,
        "ci95": ci,
        "bootstrap": cfg.evaluate.bootstrap,
        "confusion_matrix": cm.tolist(),
        "localisation": loc,
        "synthetic": bool(json.loads((run / "data_summary.json").read_text()).get("synthetic"))
        if (run / "data_summary.json").is_file() else None,
    }
    (run / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    _figures(run, y, p, threshold, cm, result, model, cfg, records)
    return result


def _figures(run: Path, y: Any, p: Any, threshold: float, cm: Any, result: dict[str, Any],
             model: keras.Model, cfg: TrainConfig, records: list[Record]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="black", fontsize=14)
    ax.set_xticks([0, 1], ["No Finding", "Pneumonia"])
    ax.set_yticks([0, 1], ["No Finding", "Pneumonia"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"threshold {threshold:.3f}")
    fig.tight_layout()
    fig.savefig(run / "confusion-matrix.png", dpi=100)
    plt.close(fig)

    fpr, tpr, _ = roc_curve(y, p)
    lo, hi = result["ci95"].get("auc", [float("nan")] * 2)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"AUC {result['metrics']['auc']:.3f} (95% CI {lo:.3f}-{hi:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC, {result['split']} split (n={len(y)})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(run / "roc.png", dpi=100)
    plt.close(fig)

    pred = p >= threshold
    groups = {
        "true positive": [i for i in range(len(y)) if y[i] == 1 and pred[i]],
        "false positive": [i for i in range(len(y)) if y[i] == 0 and pred[i]],
        "false negative": [i for i in range(len(y)) if y[i] == 1 and not pred[i]],
    }
    size = cfg.model.image_size
    fig, axes = plt.subplots(3, 4, figsize=(10, 7.8))
    for row, (name, idx) in enumerate(groups.items()):
        chosen = sorted(idx, key=lambda i: -p[i])[:4]
        cams: Any = []
        if chosen:
            cams = heatmaps(model, cfg, np.stack([load_image(records[i].path, size) for i in chosen]))
        for col in range(4):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(chosen):
                i = chosen[col]
                ax.imshow(load_image(records[i].path, size)[..., 0], cmap="gray")
                cam = upsample(cams[col], size)
                ax.imshow(cam / cam.max() if cam.max() > 0 else cam, cmap="jet", alpha=0.4)
                ax.set_title(f"{name}\np={p[i]:.2f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(run / "gallery.png", dpi=90)
    plt.close(fig)
