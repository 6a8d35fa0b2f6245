"""``cxr-train recalibrate``: a site's own temperature, prevalence and threshold, from its labelled
images, written as a new model version with the same weights.

The exported graph's calibrated logit ``z`` assumes the prevalence of the validation split it was
calibrated on (``Meta.PREVALENCE``, ``pi0``). On the site's labelled images (the dashboard's
feedback export, or a labels CSV with images) this fits one temperature ``T`` so that
``sigmoid(z / T + log_odds(pi_s) - log_odds(pi0))`` has the least negative log-likelihood, where
``pi_s`` is the share of pneumonia among those images; the reported prevalence is ``pi_s``, or the
one the site states (``--prevalence``) when its labelled images are not a random sample of its
caseload (readers label the images they chose to review). The threshold keeps the model's
operating point, or reaches ``--target-sensitivity`` on the site's positives.

The graph is not touched: the new model carries the same weights (same sha256) and the site
calibration in its metadata (``Meta.SITE_CALIBRATION``), which the worker applies
(:meth:`cxr_contract.model.ModelInfo.adjustment`). No TensorFlow.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cxr_contract.model import INPUT_NAME, LOGIT_OUTPUT, ContractError, Meta, ModelInfo
from cxr_contract.pixels import resize_for_model, to_unit_range
from cxr_contract.prevalence import (
    check_prevalence,
    log_odds,
    sensitivity_curve,
    sigmoid,
    threshold_for_sensitivity,
)
from trainer import stats
from trainer.errors import DataError, TrainerError

#: Fewest labelled images of EACH class a site calibration is fitted from. Below it the fitted
#: numbers are noise: the count of positives behind the prevalence has a 95% Poisson interval of
#: 12-31 at 20 (already +-50%), and fitting one parameter from fewer than ~20 events of the rarer
#: class overfits (the events-per-parameter rule of prediction modelling).
MIN_PER_CLASS = 20
BATCH = 32


@dataclass(frozen=True)
class Labelled:
    """One labelled image of the site."""

    path: Path
    label: int
    patient: str


def from_feedback(folders: list[Path]) -> list[Labelled]:
    """The readers' verdicts of dashboard feedback exports (majority of each image's latest
    labels; ties and "uncertain" left out, as ``prepare --feedback`` does)."""
    from trainer.feedback import decide, read_exports

    return [Labelled(d.source, d.label, d.patient_key) for d in decide(read_exports(folders)) if d.label is not None]


def from_labels_csv(labels: Path, images: Path) -> list[Labelled]:
    """Rows of a CSV with columns ``image`` (a path under ``images``), ``label`` (1 pneumonia,
    0 none) and optionally ``patient`` (else each image is its own patient)."""
    if not labels.is_file():
        raise DataError(f"labels file not found: {labels}")
    out = []
    with labels.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "label"} <= set(reader.fieldnames):
            raise DataError(f"{labels}: needs columns image and label (and optionally patient); "
                            f"has {reader.fieldnames}")
        for row_no, row in enumerate(reader, start=2):
            label, image = (row.get("label") or "").strip(), (row.get("image") or "").strip()
            if label not in ("0", "1"):
                raise DataError(f"{labels} row {row_no}: label must be 0 or 1. Received: {row.get('label')!r}")
            if not image:
                raise DataError(f"{labels} row {row_no}: no image path")
            out.append(Labelled(images / image, int(label), row.get("patient") or image))
    return out


def load_input(path: Path, size: int) -> np.ndarray[Any, Any]:
    """A grayscale PNG as the worker hands it to the model (:mod:`cxr_contract.pixels`)."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(f"{path}: not a readable image")
    if img.ndim == 3:
        img = cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2GRAY)
    return resize_for_model(to_unit_range(img), size)[..., None].astype(np.float32)


def check_counts(y: np.ndarray[Any, Any], minimum: int = MIN_PER_CLASS) -> None:
    """Refuse, naming the numbers, too few labelled images of a class."""
    pos, neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    if min(pos, neg) < minimum:
        raise TrainerError(
            f"too few labelled images to recalibrate: {pos} with pneumonia and {neg} without; at least {minimum} "
            "of each are needed (fewer give a prevalence and temperature that are mostly noise: 20 positives "
            "already leave the prevalence uncertain by +-50%); no model written")


def fit_site(z: np.ndarray[Any, Any], y: np.ndarray[Any, Any], model_prevalence: float,
             sample_prevalence: float) -> float:
    """The temperature minimising the NLL of ``sigmoid(z / T + shift)`` on the site's images,
    ``shift`` moving the model's prevalence to the share of pneumonia among them."""
    from scipy.optimize import minimize_scalar

    shift = log_odds(sample_prevalence) - log_odds(model_prevalence)
    z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t) + shift
        return float(np.mean(np.logaddexp(0.0, s) - y * s))

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(50.0)), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(res.x))


def _report(y: np.ndarray[Any, Any], before: np.ndarray[Any, Any], after: np.ndarray[Any, Any],
            patients: list[str], n_boot: int, seed: int) -> dict[str, Any]:
    def stat(idx: np.ndarray[Any, Any]) -> dict[str, float]:
        return {"ece_before": stats.expected_calibration_error(y[idx], before[idx]),
                "ece_after": stats.expected_calibration_error(y[idx], after[idx]),
                "brier_before": stats.brier(y[idx], before[idx]), "brier_after": stats.brier(y[idx], after[idx])}

    point, ci = stat(np.arange(len(y))), stats.cluster_bootstrap(patients, stat, n_boot, seed)
    return {m: {w: {"value": point[f"{m}_{w}"], "ci95": ci.get(f"{m}_{w}")} for w in ("before", "after")}
            for m in ("ece", "brier")} | {"ece_bins": stats.ECE_BINS, "bootstrap": n_boot, "bootstrap_unit": "patient",
                                          "note": "fitted and measured on the same images: optimistic"}


def _reliability_png(path: Path, y: np.ndarray[Any, Any], before: np.ndarray[Any, Any],
                     after: np.ndarray[Any, Any], report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    for when, probs, style in (("before", before, "s--"), ("after", after, "o-")):
        r = stats.reliability(y, probs)
        used = r["count"] > 0
        ax.plot(r["mean_predicted"][used], r["observed"][used], style,
                label=f"{when} (ECE {report['ece'][when]['value']:.3f})")
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency of pneumonia")
    ax.set_title("site recalibration: reliability")
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def recalibrate(model_path: Path, out: Path, images: list[Labelled], *, prevalence: float | None = None,
                target_sensitivity: float | None = None, version: str | None = None, n_boot: int = 1000,
                seed: int = 0, minimum: int = MIN_PER_CLASS) -> dict[str, Any]:
    """Fit the site calibration on ``images`` and write the model at ``out``, its report at
    ``out`` with suffix ``.recalibration.json`` and the reliability diagram beside it.

    Raises:
        TrainerError: too few images of a class, an unreadable model or image, a model without
            a recorded prevalence, or a target sensitivity no threshold reaches.
    """
    import onnx
    import onnxruntime as ort

    if not Path(model_path).is_file():
        raise TrainerError(f"model file not found: {model_path}")
    if prevalence is not None:
        try:
            check_prevalence(prevalence, "--prevalence")
        except ValueError as exc:
            raise TrainerError(str(exc)) from None
    y = np.array([im.label for im in images])
    check_counts(y, minimum)
    try:
        proto = onnx.load(str(model_path))
        meta = {p.key: p.value for p in proto.metadata_props}
        info = ModelInfo.from_metadata(meta, str(model_path))
    except ContractError as exc:
        raise TrainerError(f"not a model 'cxr-train export' wrote: {exc}") from None
    except Exception as exc:  # protobuf's DecodeError and kin
        raise TrainerError(f"{model_path} is not an ONNX model ({type(exc).__name__})") from None
    if info.prevalence is None or info.contract_version < 2:
        raise TrainerError(f"{model_path} records no prevalence or has no logit output: export it again")
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    z = np.concatenate([session.run([LOGIT_OUTPUT], {INPUT_NAME: np.stack(
        [load_input(im.path, info.input_size) for im in images[i:i + BATCH]])})[0].reshape(-1)
        for i in range(0, len(images), BATCH)]).astype(np.float64)
    sample = float(np.mean(y))
    temperature = fit_site(z, y, info.prevalence, sample)
    site_prevalence = prevalence if prevalence is not None else sample
    curve = sensitivity_curve(z[y == 1].tolist())
    threshold_logit = log_odds(min(max(info.threshold, 1e-12), 1 - 1e-12))
    if target_sensitivity is not None:
        try:
            threshold_logit = threshold_for_sensitivity(curve, target_sensitivity)
        except ValueError as exc:
            raise TrainerError(f"--target-sensitivity: {exc}") from None
    before = stats.sigmoid(z)
    after = stats.sigmoid(z / temperature + log_odds(sample) - log_odds(info.prevalence))
    patients = [im.patient for im in images]
    report = _report(y.astype(np.float64), before, after, patients, n_boot, seed)
    site_threshold = sigmoid(threshold_logit / temperature + log_odds(site_prevalence) - log_odds(info.prevalence))
    site = {
        "temperature": temperature, "prevalence": site_prevalence, "threshold_logit": threshold_logit,
        "threshold": site_threshold, "target_sensitivity": target_sensitivity,
        "site_sensitivity": float(np.mean(z[y == 1] >= threshold_logit)),
        "site_specificity": float(np.mean(z[y == 0] < threshold_logit)),
        "sample_prevalence": sample, "prevalence_from": "--prevalence" if prevalence is not None else "labelled images",
        "images": len(images), "positives": int(y.sum()), "patients": len(set(patients)),
        "model_prevalence": info.prevalence, "curve": curve,
        "fitted": datetime.now(UTC).isoformat(timespec="seconds"),
        "report": {k: report[k] for k in ("ece", "brier")},
    }
    new_version = version or f"{info.version}+site{datetime.now(UTC).strftime('%Y%m%d%H%M%S')}"
    if new_version == info.version:
        raise TrainerError(f"--model-version {new_version!r} is the model's own: a recalibrated model needs a new one")
    onnx.helper.set_model_props(proto, {**meta, Meta.VERSION: new_version,
                                        Meta.SITE_CALIBRATION: json.dumps(site, separators=(",", ":"))})
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".onnx.tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(proto.SerializeToString())
    os.replace(tmp, out)
    metrics = {"model": str(out), "version": new_version, "from_model": str(model_path),
               "from_version": info.version, "weights_sha256": info.weights_sha256,
               **{k: v for k, v in site.items() if k not in ("curve", "report")}, **report}
    out.with_suffix(".recalibration.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _reliability_png(out.with_suffix(".reliability.png"), y, before, after, report)
    return metrics
