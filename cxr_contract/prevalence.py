"""The probability at a site's prevalence: prior-shift arithmetic shared by the trainer and the worker.

A calibrated probability ``p`` of pneumonia is only "p in 100" among images with the same share
of pneumonia as the set it was calibrated on. Bayes' rule in odds: the posterior odds are the
likelihood ratio of the image times the prior odds, so moving from prevalence ``a`` to
prevalence ``b`` multiplies the odds by ``odds(b) / odds(a)``, i.e. adds
``log_odds(b) - log_odds(a)`` to the logit (Saerens et al., Neural Computation 2002). The image's
evidence (its likelihood ratio) is unchanged; only the prior is swapped.

The shift is monotone, so moving the threshold by the same amount keeps every decision, hence
the operating point (sensitivity and specificity), exactly as it was.

Pure Python: imported by the worker, which has no numpy-free constraint but must not need SciPy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: Prevalences outside this range are refused: at 0 or 1 the log-odds are infinite.
MIN_PREVALENCE, MAX_PREVALENCE = 0.001, 0.999


def log_odds(p: float) -> float:
    """``log(p / (1 - p))``; raises ValueError outside (0, 1)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"log-odds need 0 < p < 1. Received: p={p!r}")
    return math.log(p) - math.log1p(-p)


def sigmoid(z: float) -> float:
    """``1 / (1 + exp(-z))`` without overflow for any finite or infinite z."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def check_prevalence(value: float, name: str = "prevalence") -> float:
    """``value`` when it is a usable prevalence, else ValueError naming it."""
    if not (math.isfinite(value) and MIN_PREVALENCE <= value <= MAX_PREVALENCE):
        raise ValueError(f"{name} must be in [{MIN_PREVALENCE}, {MAX_PREVALENCE}]. Received: {name}={value!r}")
    return value


@dataclass(frozen=True)
class Adjustment:
    """From the model graph's calibrated logit ``z`` to the reported one:
    ``z / temperature + log_odds(to_prevalence) - log_odds(from_prevalence)``.

    Attributes:
        temperature: a site's own temperature on top of the graph's (1: none).
        from_prevalence: the prevalence the graph's probability assumes.
        to_prevalence: the prevalence the reported probability assumes.
        threshold_logit: the decision threshold on the graph's logit ``z``; the reported
            threshold is :meth:`threshold`.
    """

    temperature: float
    from_prevalence: float
    to_prevalence: float
    threshold_logit: float

    @property
    def shift(self) -> float:
        return log_odds(self.to_prevalence) - log_odds(self.from_prevalence)

    def logit(self, z: float) -> float:
        return z / self.temperature + self.shift

    def probability(self, z: float) -> float:
        return sigmoid(self.logit(z))

    @property
    def threshold(self) -> float:
        """The threshold on the reported probability: the graph threshold moved with it."""
        return self.probability(self.threshold_logit)

    @property
    def identity(self) -> bool:
        return self.temperature == 1.0 and self.from_prevalence == self.to_prevalence


def threshold_for_sensitivity(curve: Sequence[Sequence[float]], target: float) -> float:
    """The graph logit threshold that keeps at least ``target`` sensitivity on the set the
    curve was measured on: the highest threshold whose sensitivity reaches it.

    Args:
        curve: ``[sensitivity, logit threshold]`` pairs (``Meta.OPERATING_POINT["curve"]``).
        target: wanted sensitivity in (0, 1].

    Raises:
        ValueError: no point of the curve reaches ``target``, or the curve is empty.
    """
    reaching = [t for s, t in curve if s >= target]
    if not reaching:
        best = max((s for s, _ in curve), default=float("nan"))
        raise ValueError(f"no threshold reaches sensitivity {target:g} (highest on the curve: {best:g})")
    return max(reaching)


def sensitivity_curve(positive_logits: Sequence[float], points: int = 99) -> list[list[float]]:
    """``[sensitivity, threshold]`` pairs over the logits of known positives: for sensitivity
    ``k / n`` the ``k``-th highest logit (calling at or above it positive). At most ``points``
    pairs, evenly spread, always including the lowest logit (sensitivity 1)."""
    z = sorted((float(v) for v in positive_logits), reverse=True)
    n = len(z)
    if n == 0:
        return []
    ks = sorted({max(1, round(n * (i + 1) / points)) for i in range(points)} | {n})
    return [[k / n, z[k - 1]] for k in ks]


def decision_digits(probability: float, threshold: float, minimum: int = 3, maximum: int = 12) -> int:
    """Decimals at which probability and threshold, both printed so, show the decision: the
    printed probability is above, equal to or below the printed threshold as the values are
    (a probability at or above the threshold is positive). ``minimum`` unless more are needed,
    at most ``maximum`` (closer values than that print equal, and equal reads positive)."""
    def side(a: float, b: float) -> int:
        return (a > b) - (a < b)

    want = side(probability, threshold)
    for digits in range(minimum, maximum + 1):
        if side(round(probability, digits), round(threshold, digits)) == want:
            return digits
    return maximum


def format_pair(probability: float, threshold: float) -> tuple[str, str]:
    """Probability and threshold as printed on the SC, the SR and the dashboard."""
    d = decision_digits(probability, threshold)
    return f"{probability:.{d}f}", f"{threshold:.{d}f}"


def percent(prevalence: float) -> str:
    """A prevalence as people say it: ``10%``, ``2.5%``, ``0.4%``."""
    value = 100 * prevalence
    return f"{value:.0f}%" if abs(value - round(value)) < 0.05 else f"{value:.2g}%" if value < 1 else f"{value:.1f}%"
