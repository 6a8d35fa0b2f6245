"""The out-of-distribution gate baked into the exported model.

Mahalanobis detector of Lee et al. (NeurIPS 2018), on the spatially pooled feature
maps of the Grad-CAM layer: one Gaussian per class with a shared covariance, fitted on
the training split. The score of an image is its smallest Mahalanobis distance to a
class mean. 2048 features from a few hundred images give a singular sample covariance,
so it is shrunk towards a scaled identity with the Ledoit-Wolf estimate (no tuning
parameter). The inverse is stored as a whitening matrix W (Sigma^-1 = W W^T), so the
graph needs one matmul: d_k(x) = ||x W - mu_k W||.

The threshold is the split-conformal quantile of the validation scores (Vovk et al.;
Angelopoulos and Bates 2021): for a new image exchangeable with the validation images,
P(score > threshold) <= the target rate, or 1 / (n + 1) when n is too small for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import tensorflow as tf

from trainer.errors import ExportError

METHOD = "mahalanobis-min-class"


@dataclass(frozen=True)
class MahalanobisGate:
    """Class means and whitening matrix, in float64 as fitted."""

    means: np.ndarray[Any, Any]  # [K, C]
    whitening: np.ndarray[Any, Any]  # [C, C], Sigma^-1 = W W^T
    shrinkage: float
    n_train: int

    def score(self, pooled: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """Reference scores [N] for pooled features [N, C], in float64."""
        z = np.asarray(pooled, np.float64) @ self.whitening
        m = self.means @ self.whitening
        return np.sqrt(((z[:, None, :] - m[None, :, :]) ** 2).sum(-1).min(1))

    def tf_score(self, pooled: tf.Tensor) -> tf.Tensor:
        """The same score as graph ops (float32): one matmul and K differences."""
        w = tf.constant(self.whitening, tf.float32)
        m = tf.constant(self.means @ self.whitening, tf.float32)
        z = tf.matmul(tf.cast(pooled, tf.float32), w)
        d2 = tf.reduce_sum(tf.square(z[:, None, :] - m[None, :, :]), axis=-1)
        return tf.sqrt(tf.reduce_min(d2, axis=1))


def fit_gate(pooled: np.ndarray[Any, Any], labels: np.ndarray[Any, Any]) -> MahalanobisGate:
    """Fit class means and the shared Ledoit-Wolf covariance on training features.

    Args:
        pooled: [N, C] spatially averaged feature maps of the training images.
        labels: [N] class indices (0 = No Finding, 1 = Pneumonia).
    """
    from sklearn.covariance import LedoitWolf

    x = np.asarray(pooled, np.float64)
    y = np.asarray(labels).astype(int).ravel()
    classes = np.unique(y)
    if len(x) != len(y) or len(classes) < 1 or len(x) < 2:
        raise ExportError(f"the out-of-distribution gate needs training features of both classes; received "
                          f"{len(x)} feature rows and {len(y)} labels")
    means = np.stack([x[y == k].mean(0) for k in classes])
    centred = x - means[np.searchsorted(classes, y)]
    lw = LedoitWolf(assume_centered=True, store_precision=False).fit(centred)
    if not float(np.trace(lw.covariance_)) > 0:
        raise ExportError("the pooled training features are constant: no out-of-distribution gate can be fitted")
    # Shrinkage towards a scaled identity makes the covariance positive definite, so
    # Cholesky applies: Sigma = L L^T, Sigma^-1 = L^-T L^-1, hence W = L^-T.
    chol = np.linalg.cholesky(lw.covariance_)
    whitening = scipy.linalg.solve_triangular(chol, np.eye(len(chol)), lower=True).T
    return MahalanobisGate(means=means, whitening=whitening, shrinkage=float(lw.shrinkage_), n_train=len(x))


def conformal_threshold(scores: np.ndarray[Any, Any], rate: float) -> tuple[float, float]:
    """The split-conformal threshold of in-distribution ``scores`` at false-gate ``rate``.

    Returns:
        (threshold, bound): an exchangeable in-distribution image scores above the
        threshold with probability at most ``bound`` = max(rate, 1 / (n + 1)).
    """
    s = np.sort(np.asarray(scores, np.float64).ravel())
    n = len(s)
    if n == 0:
        raise ExportError("the validation split is empty: the out-of-distribution threshold needs it")
    k = math.ceil((n + 1) * (1 - rate))
    if k > n:  # too few scores for this rate: the maximum gives 1 / (n + 1)
        return float(s[-1]), 1.0 / (n + 1)
    return float(s[k - 1]), float(rate)
