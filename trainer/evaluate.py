"""``cxr-train evaluate``: discrimination, calibration, heatmap faithfulness and localisation,
each with a 95% interval that resamples patients, written to ``RUN/metrics.json`` with figures.

Order of work, all choices made on the validation split and applied unchanged to the
evaluated split:

1. the model's logit ``z`` (the last Dense layer's pre-activation, read without the sigmoid so
   that it does not saturate);
2. temperature scaling: ``T`` minimises the validation NLL of ``sigmoid(z / T)``; the calibrated
   probability is what ``export`` bakes into the ONNX graph;
3. the decision threshold, on the calibrated validation probabilities, by Youden's J (maximal
   TPR - FPR) unless ``threshold_rule = "fixed"``.

The statistics themselves are pure numpy in :mod:`trainer.stats` and :mod:`trainer.localise`;
the per-image faithfulness score is :mod:`cxr_contract.faithfulness`, the worker's own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import keras
import numpy as np
import tensorflow as tf
from sklearn.metrics import confusion_matrix, roc_curve

from cxr_contract import faithfulness
from cxr_contract.prevalence import sensitivity_curve
from trainer import localise, modelcard, stats
from trainer.config import TrainConfig
from trainer.data import Box, Dataset, Record, load_dataset, read_boxes, require_split
from trainer.errors import DataError, TrainerError
from trainer.fit import MODEL_FILE, RUN_CONFIG, load_image, make_dataset
from trainer.model import as_float32, gradcam_forward, weights_sha256

Array = np.ndarray[Any, Any]
#: Fractions of the Grad-CAM cells removed for the MoRF / LeRF curves.
CURVE_FRACTIONS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
#: The deletion curves cost 3 model runs per fraction per image: a seeded sample at most this big.
CURVE_MAX_IMAGES = 200
#: Seed of the random-map baseline's grids (fixed: the baseline must not vary between runs).
RANDOM_MAP_SEED = 20240607


def load_run(run: Path) -> tuple[keras.Model, TrainConfig, dict[str, Any]]:
    """The trained model computing in float32 (as exported, whatever precision it trained in),
    its config, and the run info."""
    if not (run / MODEL_FILE).is_file() or not (run / RUN_CONFIG).is_file():
        raise TrainerError(f"{run} holds no trained model: run 'cxr-train fit --out {run}' first")
    info = json.loads((run / RUN_CONFIG).read_text())
    cfg = TrainConfig.model_validate(info["config"])
    return as_float32(keras.models.load_model(run / MODEL_FILE)), cfg, info


class LogitModel:
    """The model's pneumonia logit: a sub-model to the input of the last Dense layer (one unit),
    then that layer's affine map in float64, so that no sigmoid saturates the value."""

    def __init__(self, model: keras.Model) -> None:
        dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
        if not dense or dense[-1].units != 1:
            raise TrainerError(f"model {model.name!r}: the last Dense layer must have one unit (the pneumonia logit)")
        last = dense[-1]
        features = keras.Model(model.input, last.input)  # a tensor in, as called (see feature_model)
        # Traced once for any batch size: an eager call of a functional model runs layer by
        # layer in Python, and predict() retraces per call.
        self.features = tf.function(lambda x: features(x, training=False), reduce_retracing=True,
                                    input_signature=[tf.TensorSpec([None, *model.inputs[0].shape[1:]], tf.float32)])
        self.kernel = np.asarray(keras.ops.convert_to_numpy(last.kernel), np.float64)
        self.bias = np.asarray(keras.ops.convert_to_numpy(last.bias), np.float64) if last.use_bias else 0.0

    def _affine(self, h: Any) -> Array:
        return (np.asarray(h, np.float64) @ self.kernel + self.bias).ravel()

    def of_images(self, images: Array, batch: int = 16) -> Array:
        """Logits of ``[N, S, S, 1]`` images."""
        if len(images) == 0:
            return np.zeros(0)
        return np.concatenate([self._affine(self.features(tf.convert_to_tensor(images[i : i + batch], tf.float32)))
                               for i in range(0, len(images), batch)])

    def of_records(self, records: list[Record], cfg: TrainConfig) -> Array:
        """Logits of a split, in record order."""
        ds = make_dataset(records, cfg, training=False, cache=False)
        return np.concatenate([self._affine(self.features(x)) for x, _y in ds])


def predict(model: keras.Model, records: list[Record], cfg: TrainConfig) -> Array:
    """Uncalibrated probabilities for a split, in record order."""
    return stats.sigmoid(LogitModel(model).of_records(records, cfg))


def choose_threshold(y: Array, p: Array, cfg: TrainConfig) -> float:
    """Youden's J on validation, or the configured fixed threshold."""
    if cfg.evaluate.threshold_rule == "fixed":
        return cfg.evaluate.fixed_threshold
    return stats.youden_threshold(y, p)


def point_metrics(y: Array, p: Array, threshold: float) -> dict[str, float]:
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
        "auc": stats.auc(y, p),
    }


def bootstrap_ci(y: Array, p: Array, threshold: float, patient_ids: Sequence[str], n: int,
                 seed: int) -> dict[str, list[float]]:
    """95% percentile intervals of :func:`point_metrics`, resampling patients (all their images)."""

    def stat(idx: Array) -> dict[str, float]:
        if len(set(y[idx].tolist())) < 2:
            return {}
        return point_metrics(y[idx], p[idx], threshold)

    return stats.cluster_bootstrap(patient_ids, stat, n, seed)


def image_shape(path: str) -> tuple[int, int]:
    """Rows and columns of a stored image (a DICOM's header, or the PNG), for box scaling."""
    if path.lower().endswith(".dcm"):
        from trainer.rsna import read_header

        h = read_header(Path(path))
        return int(h["Rows"]), int(h["Columns"])
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(f"image not readable: {path}")
    return int(img.shape[0]), int(img.shape[1])


def region_mask(record: Record, boxes: list[Box], size: int) -> Array | None:
    """The expert region at the model's input size: the phantom mask, else the boxes."""
    if record.mask:
        m = cv2.imread(record.mask, cv2.IMREAD_GRAYSCALE)
        if m is None:
            raise DataError(f"mask not readable: {record.mask}")
        return cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST) > 0
    if not boxes:
        return None
    rows, cols = image_shape(record.path)
    sy, sx = size / rows, size / cols
    m = np.zeros((size, size), bool)
    for b in boxes:
        m[int(b.y * sy) : int(np.ceil((b.y + b.h) * sy)), int(b.x * sx) : int(np.ceil((b.x + b.w) * sx))] = True
    return m


def heatmaps(model: keras.Model, cfg: TrainConfig, images: Array) -> Array:
    """Raw Grad-CAM maps at the feature resolution, one per image."""
    fn = tf.function(gradcam_forward(model, cfg.model.feature_layer))
    cams = [fn(tf.convert_to_tensor(images[i : i + 16]))[1].numpy() for i in range(0, len(images), 16)]
    return np.concatenate(cams)


def upsample(cam: Array, size: int) -> Array:
    return cv2.resize(cam.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)


def _regions(records: list[Record], boxes: dict[str, list[Box]], size: int) -> list[tuple[int, Array]]:
    """(index, region) of each positive record that has a non-empty expert region."""
    out = []
    for i, r in enumerate(records):
        m = region_mask(r, boxes.get(r.image_id, []), size) if r.label == 1 else None
        if m is not None and m.any():
            out.append((i, m))
    return out


def localisation_report(cams: Array, records: list[Record], located: list[tuple[int, Array]],
                        train_regions: list[Array], tolerance: float, n_boot: int, seed: int) -> dict[str, Any]:
    """Grad-CAM beside the centre, uniform and data-derived priors, each score with n and an interval."""
    if not located:
        return {"n": 0}
    size = located[0][1].shape[0]
    pids = [records[i].patient_id for i, _ in located]
    maps: dict[str, Any] = {"gradcam": [cams[i] for i, _ in located],
                            "centre_prior": localise.centre_prior(size), "uniform_prior": localise.uniform_prior(size)}
    prior = localise.data_prior(train_regions)
    if prior is not None:
        maps["data_prior"] = prior
    methods: dict[str, Any] = {}
    for name, m in maps.items():
        per = [localise.scores(m[k] if isinstance(m, list) else m, region, tolerance)
               for k, (_, region) in enumerate(located)]
        methods[name] = {key: stats.mean_with_ci(np.array([s[key] for s in per]), pids, n_boot, seed)
                         for key in per[0]}
    g, c = methods["gradcam"], methods["centre_prior"]
    return {
        "n": len(located),
        "patients": len(set(pids)),
        "regions": "phantom masks" if records[located[0][0]].mask else "expert boxes",
        "pointing_tolerance": tolerance,
        "pointing_tolerance_px": round(tolerance * size, 2),
        "iou_level": localise.IOU_LEVEL,
        "data_prior_from": len(train_regions),
        "methods": methods,
        # The headline numbers, flat, as earlier versions wrote them.
        "pointing_game": g["pointing_game"]["value"],
        "energy_in_region": g["energy_in_region"]["value"],
        "centre_prior_pointing_game": c["pointing_game"]["value"],
        "centre_prior_energy_in_region": c["energy_in_region"]["value"],
    }


#: The healthy reference of heatmap faithfulness, written into the run by ``evaluate`` and
#: carried into the model's metadata by ``export``, so both fill removed regions alike.
REFERENCE_FILE = "faithfulness_reference.png"


def faithfulness_reference(run: Path, dataset: Dataset, size: int, seed: int) -> Array:
    """The run's healthy reference (:func:`cxr_contract.faithfulness.reference_image`): read from
    :data:`REFERENCE_FILE` when it is there at this size, else the mean of up to
    :data:`~cxr_contract.faithfulness.REFERENCE_MAX_IMAGES` negative training images (a seeded
    sample), written there."""
    path = run / REFERENCE_FILE
    if path.is_file():
        stored = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if stored is not None and stored.dtype == np.uint16 and stored.shape == (size, size):
            return (stored.astype(np.float64) / 65535.0).astype(np.float32)
    negatives = [r for r in dataset.splits.get("train", []) if r.label == 0]
    if not negatives:
        raise DataError("the training split has no negative image to build the heatmap-faithfulness "
                        "reference from")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(negatives), min(len(negatives), faithfulness.REFERENCE_MAX_IMAGES),
                               replace=False))
    total = np.zeros((size, size), np.float64)
    for k in chosen:  # a running sum: 2,000 images at 224 px would be 400 MB as one stack
        total += load_image(negatives[k].path, size)[..., 0]
    reference = faithfulness.reference_image((total / len(chosen))[None])
    cv2.imwrite(str(path), np.round(reference * 65535.0).astype(np.uint16))
    return reference


def faithfulness_report(logit_of: Callable[[Array], Array], images: Array, cams: Array, labels: Array,
                        patient_ids: Sequence[str], val_images: Array, n_boot: int, seed: int,
                        reference: Array | None = None) -> dict[str, Any]:
    """The worker's per-image faithfulness score and verdict over a split, for Grad-CAM and for
    maps that know nothing about the image (uniform random grids, a centred Gaussian, a
    constant map), against a null cut-off computed on the validation images as export does.

    ``logit_of`` gives the calibrated logit (z / T), the unit of the worker's ``logit`` output.
    """
    h, w = cams.shape[1:]
    null = faithfulness.null_cutoff(logit_of, val_images, (h, w), reference=reference)
    cutoff = null["cutoff"]
    rng = np.random.default_rng(RANDOM_MAP_SEED)
    maps: dict[str, Array] = {"gradcam": cams, "random_map": np.asarray(rng.random(cams.shape)),
                              "centre_map": faithfulness.centre_map(h, w), "constant_map": np.ones((h, w))}
    out: dict[str, Any] = {"fraction_removed": faithfulness.FRACTION, "moved_copies": faithfulness.N_RANDOM,
                           "units": "logit drop beyond moved copies (calibrated logit)", "null": null, "cutoff": cutoff}
    positive = np.asarray(labels) == 1
    for name, grids in maps.items():
        v = faithfulness.scores(logit_of, images, grids, reference=reference)
        above = np.array([faithfulness.above_chance(x, cutoff) for x in v], float)
        summary = stats.mean_with_ci(v, patient_ids, n_boot, seed)
        rate = stats.mean_with_ci(above, patient_ids, n_boot, seed)
        out[name] = {"mean": summary["value"], "ci95": summary["ci95"], "fraction_above_chance": rate["value"],
                     "fraction_above_chance_ci95": rate["ci95"], "n": summary["n"]}
        if positive.any():
            pos_ids = [p for p, k in zip(patient_ids, positive, strict=True) if k]
            rate_pos = stats.mean_with_ci(above[positive], pos_ids, n_boot, seed)
            out[name]["positives"] = {"fraction_above_chance": rate_pos["value"],
                                      "fraction_above_chance_ci95": rate_pos["ci95"], "n": int(positive.sum())}
    return out


def deletion_curves(logit_model: LogitModel, images: Array, cams: Array, z0: Array,
                    fractions: Sequence[float] = CURVE_FRACTIONS, reference: Array | None = None) -> dict[str, Any]:
    """Mean logit as Grad-CAM cells are removed most-relevant-first (MoRF), least-relevant-first
    (LeRF) and in random order, with the faithfulness module's masks and imputation."""
    size = images.shape[1]
    curves: dict[str, list[float]] = {"morf": [float(z0.mean())], "lerf": [float(z0.mean())],
                                      "random": [float(z0.mean())]}
    for f in fractions:
        variants = []
        for img, cam in zip(images, cams, strict=True):
            masks = (faithfulness.ranked_cell_mask(cam, size, f, most_relevant=True),
                     faithfulness.ranked_cell_mask(cam, size, f, most_relevant=False),
                     faithfulness.random_cell_mask(cam, size, f))
            variants += [faithfulness.impute(img, m, reference=reference) for m in masks]
        z = logit_model.of_images(np.stack(variants)).reshape(len(images), 3)
        for k, name in enumerate(("morf", "lerf", "random")):
            curves[name].append(float(z[:, k].mean()))
    return {"fractions": [0.0, *fractions], "n": len(images), "mean_logit": curves,
            # Area between LeRF and MoRF (per unit fraction): larger = the map ranks evidence better.
            "lerf_minus_morf_area": float(np.trapezoid(np.subtract(curves["lerf"], curves["morf"]),
                                                       [0.0, *fractions]))}


def subgroup_report(y: Array, p: Array, records: list[Record], threshold: float, n_boot: int,
                    seed: int) -> dict[str, Any]:
    """Per sex, age band and view: sensitivity and specificity at the operating point, AUC and
    ECE with patient-level intervals (:func:`trainer.stats.subgroup_metrics`)."""
    pids = [r.patient_id for r in records]
    attributes = {"view": [r.view for r in records], "sex": [r.sex for r in records],
                  "age_band": [stats.age_band(r.age) for r in records]}
    return {"auc": stats.subgroup_aucs(y, p, pids, attributes, n_boot, seed),
            "view_alone": stats.view_alone_auc(y, attributes["view"], pids, n_boot, seed),
            "at_operating_point": stats.subgroup_metrics(y, p, threshold, pids, attributes, n_boot, seed),
            "min_patients_per_class": stats.MIN_SUBGROUP_PATIENTS}


def operating_point(y_val: Array, z_val: Array, temperature: float, threshold: float) -> dict[str, Any]:
    """Sensitivity and specificity at the threshold on the validation split, and the curve the
    worker picks a ``model.target_sensitivity`` threshold from (on the calibrated logit z / T,
    the exported graph's ``logit``)."""
    z = np.asarray(z_val, np.float64) / temperature
    p = stats.sigmoid(z)
    pos, neg = y_val == 1, y_val == 0
    return {"split": "val", "threshold": threshold, "sensitivity": float(np.mean(p[pos] >= threshold)),
            "specificity": float(np.mean(p[neg] < threshold)), "positives": int(pos.sum()),
            "negatives": int(neg.sum()), "curve": sensitivity_curve(z[pos].tolist())}


def gate_coverage(model: keras.Model, cfg: TrainConfig, dataset: Dataset, records: list[Record],
                  hard: list[Record], n_boot: int, seed: int) -> dict[str, Any]:
    """How often the out-of-distribution gate, fitted as ``export`` fits it, fires on the
    evaluated split and on the hard negatives (other findings, no pneumonia): a gate that
    fires on them withholds answers on exactly the images where a reader wants one."""
    # export imports this module (load_run); its feature pooling is taken at call time.
    from trainer.export import pooled_features
    from trainer.ood import conformal_threshold, fit_gate

    size, layer = cfg.model.image_size, cfg.model.feature_layer
    train, val = require_split(dataset, "train"), require_split(dataset, "val")
    gate = fit_gate(pooled_features(model, layer, train, size), np.array([r.label for r in train]))
    threshold, _ = conformal_threshold(gate.score(pooled_features(model, layer, val, size)),
                                       cfg.export.ood_false_gate_rate)
    out: dict[str, Any] = {"threshold": threshold, "false_gate_rate": cfg.export.ood_false_gate_rate,
                           "fitted_as": "export: train features, split-conformal threshold on val"}
    for name, group in (("split", records), ("hard_negatives", hard)):
        if group:
            fired = (gate.score(pooled_features(model, layer, group, size)) > threshold).astype(float)
            out[name] = stats.mean_with_ci(fired, [r.patient_id for r in group], n_boot, seed)
    return out


def hard_negative_report(logit_model: LogitModel, cfg: TrainConfig, temperature: float, threshold: float,
                         positives: list[Record], p_pos: Array, hard: list[Record], n_boot: int,
                         seed: int) -> dict[str, Any]:
    """Test positives against negatives that carry other findings: AUC and specificity."""
    p_hard = stats.sigmoid(logit_model.of_records(hard, cfg) / temperature)
    y = np.r_[np.ones(len(positives)), np.zeros(len(hard))]
    p = np.r_[p_pos, p_hard]
    pids = [r.patient_id for r in positives] + [r.patient_id for r in hard]
    spec = stats.mean_with_ci((p_hard < threshold).astype(float), [r.patient_id for r in hard], n_boot, seed)
    findings: dict[str, int] = {}
    for r in hard:
        for f in r.findings.split("|"):
            if f:
                findings[f] = findings.get(f, 0) + 1
    return {"n": len(hard), "patients": len(set(r.patient_id for r in hard)),
            "auc_vs_positives": stats.auc_with_ci(y, p, pids, n_boot, seed),
            "specificity": {"value": spec["value"], "ci95": spec["ci95"]},
            "views": {v: sum(r.view == v for r in hard) for v in sorted({r.view for r in hard})},
            "findings": dict(sorted(findings.items(), key=lambda kv: -kv[1])[:10])}


def evaluate(run: Path, split: str = "test", boxes_file: Path | None = None, *,
             pointing_tolerance: float = localise.POINTING_TOLERANCE) -> dict[str, Any]:
    """Evaluate a run on one split and write metrics.json and the figures into the run."""
    if not 0.0 <= pointing_tolerance <= 1.0:
        raise TrainerError(f"--pointing-tolerance is a fraction of the image side, received {pointing_tolerance}")
    model, cfg, info = load_run(run)
    dataset: Dataset = load_dataset(Path(info["data"]))
    boxes = read_boxes(boxes_file) if boxes_file else dataset.boxes
    val = require_split(dataset, "val")
    records = require_split(dataset, split)
    n_boot, seed = cfg.evaluate.bootstrap, cfg.train.seed
    logit_model = LogitModel(model)

    y_val = np.array([r.label for r in val])
    z_val = logit_model.of_records(val, cfg)
    temperature = stats.fit_temperature(y_val, z_val)
    threshold = choose_threshold(y_val, stats.sigmoid(z_val / temperature), cfg)
    # The calibrated probability assumes the validation split's share of pneumonia.
    prevalence = float(np.mean(y_val))

    y = np.array([r.label for r in records])
    pids = [r.patient_id for r in records]
    z = logit_model.of_records(records, cfg)
    p = stats.sigmoid(z / temperature)
    metrics = point_metrics(y, p, threshold)
    ci = bootstrap_ci(y, p, threshold, pids, n_boot, seed)
    calibration = {"method": "temperature", "temperature": temperature, "fitted_on": "val",
                   "prevalence": prevalence}
    quality = stats.calibration_report(y, z, temperature, pids, n_boot, seed)
    quality["temperature_at_bound"] = not 0.051 < temperature < 49.9  # a split the model separates perfectly
    quality["val_nll"] = {"before": stats.nll(y_val, z_val), "after": stats.nll(y_val, z_val, temperature)}

    size = cfg.model.image_size
    images = np.stack([load_image(r.path, size) for r in records])
    cams = heatmaps(model, cfg, images)
    located = _regions(records, boxes, size)
    train_regions = [m for _, m in _regions(dataset.splits["train"], boxes, size)]
    loc = localisation_report(cams, records, located, train_regions, pointing_tolerance, n_boot, seed)
    val_images = np.stack([load_image(r.path, size) for r in val])
    reference = faithfulness_reference(run, dataset, size, seed)
    faith = faithfulness_report(lambda x: logit_model.of_images(x) / temperature, images, cams, y, pids, val_images,
                                n_boot, seed, reference)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(records), min(len(records), CURVE_MAX_IMAGES), replace=False))
    curves = deletion_curves(logit_model, images[chosen], cams[chosen], z[chosen], reference=reference)

    result: dict[str, Any] = {
        "split": split,
        # export refuses this calibration for any other weights.
        "weights_sha256": weights_sha256(model),
        "prevalence": {"value": prevalence, "split": "val",
                       "meaning": "share of pneumonia the calibrated probability assumes"},
        "operating_point": operating_point(y_val, z_val, temperature, threshold),
        "n": len(y),
        "patients": len(set(pids)),
        "positives": int(y.sum()),
        "threshold": threshold,
        "threshold_rule": cfg.evaluate.threshold_rule + " on calibrated validation probabilities",
        "calibration": calibration,
        "metrics": metrics,
        "ci95": ci,
        "bootstrap": n_boot,
        "bootstrap_unit": "patient",
        "calibration_quality": quality,
        "confusion_matrix": confusion_matrix(y, p >= threshold, labels=[0, 1]).tolist(),
        "subgroups": subgroup_report(y, p, records, threshold, n_boot, seed),
        "faithfulness": faith,
        "deletion_curves": curves,
        "localisation": loc,
        "synthetic": bool(json.loads((run / "data_summary.json").read_text()).get("synthetic"))
        if (run / "data_summary.json").is_file() else None,
    }
    if split == "test" and dataset.hard_negatives:
        pos = [r for r in records if r.label == 1]
        result["hard_negatives"] = hard_negative_report(
            logit_model, cfg, temperature, threshold, pos, p[y == 1], dataset.hard_negatives, n_boot, seed)
    result["gate"] = gate_coverage(model, cfg, dataset, records, dataset.hard_negatives if split == "test" else [],
                                   n_boot, seed)
    summary_path = run / "data_summary.json"
    result["model_card"] = modelcard.write(run, result, json.loads(summary_path.read_text())
                                           if summary_path.is_file() else {})
    (run / "metrics.json").write_text(json.dumps(_json_safe(result), indent=2, allow_nan=False) + "\n")
    _figures(run, y, p, z, temperature, threshold, result, cams, images)
    return result


def _json_safe(obj: Any) -> Any:
    """NaN and infinities (an AUC of a one-class subgroup) become null: metrics.json stays JSON."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating) and not np.isfinite(obj):
        return None
    return obj


def _figures(run: Path, y: Array, p: Array, z: Array, temperature: float, threshold: float,
             result: dict[str, Any], cams: Array, images: Array) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(result["confusion_matrix"])
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

    _reliability_figure(run, y, z, temperature, result["calibration_quality"], plt)
    _deletion_figure(run, result["deletion_curves"], result["faithfulness"], plt)

    pred = p >= threshold
    groups = {
        "true positive": [i for i in range(len(y)) if y[i] == 1 and pred[i]],
        "false positive": [i for i in range(len(y)) if y[i] == 0 and pred[i]],
        "false negative": [i for i in range(len(y)) if y[i] == 1 and not pred[i]],
    }
    size = images.shape[1]
    fig, axes = plt.subplots(3, 4, figsize=(10, 7.8))
    for row, (name, idx) in enumerate(groups.items()):
        chosen = sorted(idx, key=lambda i: -p[i])[:4]
        for col in range(4):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(chosen):
                i = chosen[col]
                ax.imshow(images[i][..., 0], cmap="gray")
                cam = upsample(cams[i], size)
                ax.imshow(cam / cam.max() if cam.max() > 0 else cam, cmap="jet", alpha=0.4)
                ax.set_title(f"{name}\np={p[i]:.2f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(run / "gallery.png", dpi=90)
    plt.close(fig)


def _reliability_figure(run: Path, y: Array, z: Array, temperature: float, quality: dict[str, Any],
                        plt: Any) -> None:
    """reliability.png: observed frequency against predicted probability, before and after."""
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.8, 6), height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    for when, probs, style in (("before", stats.sigmoid(z), "s--"), ("after", stats.sigmoid(z / temperature), "o-")):
        r = stats.reliability(y, probs)
        used = r["count"] > 0
        ece = quality["ece"][when]
        ci = ece["ci95"] or [float("nan")] * 2
        label = f"{when} (ECE {ece['value']:.3f}, 95% CI {ci[0]:.3f}-{ci[1]:.3f})"
        ax.plot(r["mean_predicted"][used], r["observed"][used], style, label=label)
        centres = (r["edges"][:-1] + r["edges"][1:]) / 2
        hist.bar(centres, r["count"], width=1 / len(centres), alpha=0.5, label=when)
    ax.set_ylabel("observed frequency of pneumonia")
    ax.set_title(f"reliability, {stats.ECE_BINS} bins (T = {temperature:.2f})")
    ax.legend(loc="upper left", fontsize=7)
    hist.set_xlabel("predicted probability")
    hist.set_ylabel("images")
    hist.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run / "reliability.png", dpi=100)
    plt.close(fig)


def _deletion_figure(run: Path, curves: dict[str, Any], faith: dict[str, Any], plt: Any) -> None:
    """morf-lerf.png: mean logit against the fraction of Grad-CAM cells removed."""
    fig, ax = plt.subplots(figsize=(5, 4))
    labels = {"morf": "most relevant first (MoRF)", "lerf": "least relevant first (LeRF)", "random": "random order"}
    for name, style in (("morf", "o-"), ("lerf", "s-"), ("random", "^--")):
        ax.plot(curves["fractions"], curves["mean_logit"][name], style, label=labels[name])
    g = faith["gradcam"]
    ax.set_xlabel("fraction of the image removed (Grad-CAM cells, imputed)")
    ax.set_ylabel("mean logit")
    ax.set_title(f"deletion curves (n={curves['n']}); faithfulness {g['mean']:+.2f} logit, "
                 f"{100 * g['fraction_above_chance']:.0f}% above chance", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run / "morf-lerf.png", dpi=100)
    plt.close(fig)
