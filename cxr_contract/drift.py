"""Drift references and the two statistics the worker watches them with.

``cxr-train export`` summarises the validation split's calibrated probabilities and
``ood_score``s as quantile bins (:func:`reference_of`) and stores them in the model's
metadata (:attr:`cxr_contract.model.Meta.DRIFT_REFERENCE`); the worker compares its recent
answers with them:

* the population stability index (:func:`psi`) of the probabilities in the reference's bins;
* a one-sided binomial test (:func:`binomial_sf`) of how many images the gate held out against
  the gate's conformal false-gate rate: more than that on in-distribution images is unlikely.

Pure functions of numbers, shared by both sides so the bins mean the same thing in both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: Quantile bins of a reference: about this many reference values per bin, between 2 and 10
#: bins. A bin's reference fraction then has a sampling error well under its size, and the
#: PSI's own noise, about (bins - 1) * (1/n_window + 1/n_reference), stays far below 0.1.
VALUES_PER_BIN, MIN_BINS, MAX_BINS = 10, 2, 10
#: Below this many validation images a reference's own sampling error is a lasting offset of the
#: PSI (its cut points are quantiles of a handful of values: the median of 8 leaves anywhere from
#: 20 to 80 % of the population on one side), so the worker computes no PSI against it.
MIN_REFERENCE = 100


@dataclass(frozen=True)
class Bins:
    """A distribution as quantile bins: ``edges`` are the inner cut points (a value ``v`` falls
    in bin ``searchsorted(edges, v, side="right")``), ``fractions`` the reference's share of each."""

    edges: tuple[float, ...]
    fractions: tuple[float, ...]

    def counts(self, values: Sequence[float] | np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        index = np.searchsorted(np.asarray(self.edges, np.float64), np.asarray(values, np.float64), side="right")
        return np.bincount(index, minlength=len(self.fractions))


@dataclass(frozen=True)
class DriftReference:
    """The validation split's probabilities and ``ood_score``s, binned (:func:`reference_of`)."""

    n: int
    probability: Bins
    ood_score: Bins

    def to_json(self) -> str:
        return json.dumps({"n": self.n, "split": "val", **{k: asdict(v) for k, v in
                                                          (("probability", self.probability),
                                                           ("ood_score", self.ood_score))}},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> DriftReference:
        """Raises ValueError (naming what is wrong) for anything :meth:`to_json` would not write."""
        data = json.loads(text)
        bins = {}
        for key in ("probability", "ood_score"):
            edges = tuple(float(v) for v in data[key]["edges"])
            fractions = tuple(float(v) for v in data[key]["fractions"])
            if len(fractions) != len(edges) + 1 or not all(math.isfinite(v) for v in edges + fractions) \
                    or list(edges) != sorted(edges) or abs(sum(fractions) - 1.0) > 1e-3:
                raise ValueError(f"{key}: {len(edges)} edges and {len(fractions)} fractions do not make "
                                 "sorted bins whose fractions sum to 1")
            bins[key] = Bins(edges, fractions)
        return cls(n=int(data["n"]), probability=bins["probability"], ood_score=bins["ood_score"])


def bins_of(values: np.ndarray[Any, Any]) -> Bins:
    """Quantile bins of ``values`` (:data:`VALUES_PER_BIN` per bin); tied cut points merge."""
    v = np.asarray(values, np.float64).ravel()
    v = v[np.isfinite(v)]
    if not len(v):
        raise ValueError("no finite values to bin")
    k = min(MAX_BINS, max(MIN_BINS, len(v) // VALUES_PER_BIN))
    edges = np.unique(np.quantile(v, np.arange(1, k) / k))
    counts = np.bincount(np.searchsorted(edges, v, side="right"), minlength=len(edges) + 1)
    return Bins(tuple(float(e) for e in edges), tuple(float(c) / len(v) for c in counts))


def reference_of(probabilities: np.ndarray[Any, Any], ood_scores: np.ndarray[Any, Any]) -> DriftReference:
    return DriftReference(n=int(np.size(probabilities)), probability=bins_of(probabilities),
                          ood_score=bins_of(ood_scores))


def psi(reference: Bins, values: Sequence[float] | np.ndarray[Any, Any]) -> float:
    """Population stability index of ``values`` against the reference's bins:
    sum (a - e) ln(a / e). Half a count is added to every bin of the window (and the reference
    fractions floored at a thousandth), so an empty bin costs a bounded amount, not infinity.
    By convention < 0.1 is stable, 0.1-0.25 a moderate shift, > 0.25 a significant one."""
    counts = reference.counts(values).astype(np.float64)
    actual = (counts + 0.5) / (counts.sum() + 0.5 * len(counts))
    expected = np.maximum(np.asarray(reference.fractions, np.float64), 1e-3)
    expected = expected / expected.sum()
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): the one-sided p-value of ``k`` gated images in ``n``
    when each is gated with probability ``p``. Summed in log space (exact to float precision
    for any window a worker keeps)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
             for i in range(k, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))
