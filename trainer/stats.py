"""The statistics ``evaluate`` reports, as pure numpy functions (no TensorFlow).

* Intervals resample **patients**, pooling their images (a cluster bootstrap): images of one
  patient are correlated, so resampling images treats ~464 test images from ~350 patients as
  464 independent draws and gives intervals that are too narrow.
* Calibration: temperature scaling (Guo et al., ICML 2017) fitted by minimising the negative
  log-likelihood of ``sigmoid(z / T)``; expected calibration error over 15 equal-width bins of
  the predicted probability of pneumonia, and the Brier score.
* Subgroups: ROC AUC per view, sex and age band, and the AUC of the view alone, which says how
  much of a model's AUC a shortcut could explain.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.stats import rankdata

Array = np.ndarray[Any, Any]
#: A statistic of the images at the given indices, e.g. ``lambda idx: {"auc": ...}``.
Statistic = Callable[[Array], Mapping[str, float]]

ECE_BINS = 15
#: Age bands (years, lower bound inclusive) for the subgroup AUCs.
AGE_BANDS = ((0, 40, "<40"), (40, 60, "40-59"), (60, 80, "60-79"), (80, 200, ">=80"))


def sigmoid(z: Array) -> Array:
    z = np.asarray(z, np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def patient_groups(patient_ids: Sequence[str]) -> list[Array]:
    """Indices of each patient's images, one array per patient (in first-seen order)."""
    members: dict[str, list[int]] = {}
    for i, pid in enumerate(patient_ids):
        members.setdefault(pid, []).append(i)
    return [np.asarray(v, np.intp) for v in members.values()]


def cluster_bootstrap(patient_ids: Sequence[str], statistic: Statistic, n: int, seed: int,
                      *, level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap intervals that resample patients with replacement.

    Each resample draws as many patients as there are, with replacement, and pools all
    images of every drawn patient (a patient drawn twice contributes its images twice).
    Resamples where the statistic is not finite (e.g. an AUC with one class) are skipped.

    Args:
        patient_ids: the patient of each image, in the order the statistic indexes.
        statistic: indices -> named values.
        n: number of resamples (0 gives no intervals).
        seed: makes the intervals reproducible.
        level: coverage of the interval.

    Returns:
        name -> [low, high]; names the statistic never gave finitely are left out.
    """
    groups = patient_groups(patient_ids)
    if not groups or n <= 0:
        return {}
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(n):
        drawn = rng.integers(0, len(groups), len(groups))
        idx = np.concatenate([groups[k] for k in drawn])
        for key, value in statistic(idx).items():
            if np.isfinite(value):
                samples.setdefault(key, []).append(float(value))
    tail = 100 * (1 - level) / 2
    return {k: [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))] for k, v in samples.items()}


def mean_with_ci(values: Array, patient_ids: Sequence[str], n: int, seed: int) -> dict[str, Any]:
    """``{"value", "ci95", "n"}`` for the mean of per-image values, patients resampled."""
    values = np.asarray(values, np.float64)
    ci = cluster_bootstrap(patient_ids, lambda idx: {"m": float(values[idx].mean())}, n, seed)
    return {"value": float(values.mean()) if len(values) else float("nan"), "ci95": ci.get("m"),
            "n": int(len(values)), "patients": len(set(patient_ids))}


# --- calibration ------------------------------------------------------------------------

def nll(y: Array, z: Array, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of labels ``y`` under ``sigmoid(z / T)``, stable for any z."""
    s = np.asarray(z, np.float64) / temperature
    y = np.asarray(y, np.float64)
    return float(np.mean(np.logaddexp(0.0, s) - y * s))


def fit_temperature(y: Array, z: Array, *, bounds: tuple[float, float] = (0.05, 50.0)) -> float:
    """The temperature T > 0 minimising the NLL of ``sigmoid(z / T)`` (one parameter, so it
    keeps the ranking, hence the AUC, and only changes how confident the probabilities are).

    Searched on log T, where the NLL is smooth; bounded so that a validation split the model
    separates perfectly (NLL falls towards T -> 0) gives the sharpest bound, not a crash.
    """
    y, z = np.asarray(y, np.float64), np.asarray(z, np.float64)
    if len(y) == 0 or len(set(y.tolist())) < 2:
        raise ValueError("temperature scaling needs both classes in the validation split")
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    res = minimize_scalar(lambda t: nll(y, z, float(np.exp(t))), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-6})
    return float(np.exp(res.x))


def reliability(y: Array, p: Array, bins: int = ECE_BINS) -> dict[str, Array]:
    """Per equal-width bin of ``p``: count, mean predicted probability, observed frequency."""
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    # Bin k holds (k/B, (k+1)/B]; p == 0 goes to the first bin.
    which = np.clip(np.ceil(p * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(which, weights=p, minlength=bins) / count
        freq = np.bincount(which, weights=y, minlength=bins) / count
    return {"count": count, "mean_predicted": mean_p, "observed": freq,
            "edges": np.linspace(0.0, 1.0, bins + 1)}


def expected_calibration_error(y: Array, p: Array, bins: int = ECE_BINS) -> float:
    """Sum over bins of (share of images) x |observed frequency - mean predicted probability|.

    The binary form: bins of the probability of pneumonia, not of the top-class confidence.
    """
    r = reliability(y, p, bins)
    used = r["count"] > 0
    n = r["count"].sum()
    return float(np.sum(r["count"][used] / n * np.abs(r["observed"][used] - r["mean_predicted"][used])))


def brier(y: Array, p: Array) -> float:
    """Mean squared difference between probability and outcome (0 is perfect, 0.25 a coin)."""
    return float(np.mean((np.asarray(p, np.float64) - np.asarray(y, np.float64)) ** 2))


def calibration_report(y: Array, z: Array, temperature: float, patient_ids: Sequence[str],
                       n: int, seed: int) -> dict[str, Any]:
    """ECE and Brier of ``sigmoid(z)`` (before) and ``sigmoid(z / T)`` (after), with intervals."""
    y = np.asarray(y, np.float64)
    before, after = sigmoid(z), sigmoid(np.asarray(z, np.float64) / temperature)

    def stat(idx: Array) -> dict[str, float]:
        return {"ece_before": expected_calibration_error(y[idx], before[idx]),
                "ece_after": expected_calibration_error(y[idx], after[idx]),
                "brier_before": brier(y[idx], before[idx]), "brier_after": brier(y[idx], after[idx])}

    point, ci = stat(np.arange(len(y))), cluster_bootstrap(patient_ids, stat, n, seed)
    return {
        metric: {when: {"value": point[f"{metric}_{when}"], "ci95": ci.get(f"{metric}_{when}")}
                 for when in ("before", "after")}
        for metric in ("ece", "brier")
    } | {"ece_bins": ECE_BINS}


# --- discrimination in subgroups ------------------------------------------------------------

def auc(y: Array, score: Array) -> float:
    """ROC AUC (Mann-Whitney, ties count one half); NaN when a class is missing."""
    y, score = np.asarray(y), np.asarray(score, np.float64)
    pos, neg = score[y == 1], score[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([pos, neg]))  # ties get their average rank
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def age_band(age: str) -> str:
    """The band of an age in years ('' when unknown)."""
    try:
        a = float(age.rstrip("Yy"))
    except ValueError:
        return ""
    return next((name for lo, hi, name in AGE_BANDS if lo <= a < hi), "")


def auc_with_ci(y: Array, score: Array, patient_ids: Sequence[str], n: int, seed: int) -> dict[str, Any]:
    y = np.asarray(y)
    ci = cluster_bootstrap(patient_ids, lambda idx: {"auc": auc(y[idx], score[idx])}, n, seed)
    return {"auc": auc(y, score), "ci95": ci.get("auc"), "n": int(len(y)),
            "positives": int(np.sum(y == 1)), "patients": len(set(patient_ids))}


def subgroup_aucs(y: Array, score: Array, patient_ids: Sequence[str], attributes: Mapping[str, Sequence[str]],
                  n: int, seed: int) -> dict[str, dict[str, Any]]:
    """AUC with interval in each value of each attribute (e.g. view -> AP, PA).

    Args:
        attributes: name -> the value of each image (``''`` = unknown, left out).

    Returns:
        attribute -> value -> ``{"auc", "ci95", "n", "positives", "patients"}``; a group with
        one class has ``auc`` NaN and no interval.
    """
    y, score = np.asarray(y), np.asarray(score, np.float64)
    pids = np.asarray(patient_ids, dtype=object)
    out: dict[str, dict[str, Any]] = {}
    for name, values in attributes.items():
        column = np.asarray(values, dtype=object)
        out[name] = {}
        for v in sorted({str(x) for x in column if x}):
            sel = column == v
            out[name][v] = auc_with_ci(y[sel], score[sel], list(pids[sel]), n, seed)
    return out


def view_alone_auc(y: Array, views: Sequence[str], patient_ids: Sequence[str], n: int, seed: int) -> dict[str, Any]:
    """AUC of a "model" that knows only the view (AP scores 1, anything else 0).

    ChestX-ray14's Pneumonia images are mostly AP (bedside) and its No Finding images
    mostly PA, so the view alone separates the classes better than chance.
    """
    score = np.array([1.0 if v == "AP" else 0.0 for v in views])
    return auc_with_ci(np.asarray(y), score, patient_ids, n, seed)


def youden_threshold(y: Sequence[int] | np.ndarray[Any, Any], p: Sequence[float] | np.ndarray[Any, Any]) -> float:
    """The probability threshold that maximises Youden's J (sensitivity + specificity - 1).

    Always one of the probabilities in ``p``: roc_curve's first point (nothing called positive)
    has no real threshold (inf, or max + 1 in older scikit-learn), and choosing it for a model
    with J <= 0 everywhere would store 1.0, "never positive". Ties go to the highest threshold.
    """
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(np.asarray(y), np.asarray(p, np.float64))
    best = 1 + int(np.argmax(tpr[1:] - fpr[1:]))
    return float(np.clip(thresholds[best], 0.0, 1.0))


# --- per-group operating characteristics -----------------------------------------------------

#: A subgroup is estimated only with at least this many patients with pneumonia AND this many
#: without: below it, the 95% interval of a sensitivity of 0.8 is wider than 0.45 (Wilson,
#: 10 patients: 0.49-0.94), a number too loose to tell groups apart.
MIN_SUBGROUP_PATIENTS = 10


def group_metrics(y: Array, p: Array, threshold: float, patient_ids: Sequence[str], n: int,
                  seed: int, min_patients: int = MIN_SUBGROUP_PATIENTS) -> dict[str, Any]:
    """Sensitivity and specificity at ``threshold``, AUC and ECE of one group, each with a
    patient-level bootstrap interval; "too few to estimate" below ``min_patients`` per class."""
    y, p = np.asarray(y), np.asarray(p, np.float64)
    pids = np.asarray(patient_ids, dtype=object)
    pos_patients, neg_patients = len(set(pids[y == 1])), len(set(pids[y == 0]))
    out: dict[str, Any] = {"n": int(len(y)), "patients": len(set(pids)), "positive_patients": pos_patients,
                           "negative_patients": neg_patients}
    if min(pos_patients, neg_patients) < min_patients:
        out["estimate"] = (f"too few to estimate (at least {min_patients} patients with and {min_patients} "
                           "without pneumonia needed)")
        return out

    def stat(idx: Array) -> dict[str, float]:
        yy, pp = y[idx], p[idx]
        pos, neg = yy == 1, yy == 0
        return {"sensitivity": float(np.mean(pp[pos] >= threshold)) if pos.any() else float("nan"),
                "specificity": float(np.mean(pp[neg] < threshold)) if neg.any() else float("nan"),
                "auc": auc(yy, pp), "ece": expected_calibration_error(yy, pp)}

    point, ci = stat(np.arange(len(y))), cluster_bootstrap(list(pids), stat, n, seed)
    return out | {k: {"value": v, "ci95": ci.get(k)} for k, v in point.items()}


def subgroup_metrics(y: Array, p: Array, threshold: float, patient_ids: Sequence[str],
                     attributes: Mapping[str, Sequence[str]], n: int, seed: int,
                     min_patients: int = MIN_SUBGROUP_PATIENTS) -> dict[str, dict[str, Any]]:
    """:func:`group_metrics` in each value of each attribute (``''`` = unknown, left out)."""
    y, p = np.asarray(y), np.asarray(p, np.float64)
    pids = np.asarray(patient_ids, dtype=object)
    out: dict[str, dict[str, Any]] = {}
    for name, values in attributes.items():
        column = np.asarray(values, dtype=object)
        out[name] = {v: group_metrics(y[column == v], p[column == v], threshold, list(pids[column == v]), n,
                                      seed, min_patients)
                     for v in sorted({str(x) for x in column if x})}
    return out
