"""The worker's drift watch: its recent answers against the model's validation split.

Over a sliding window of the last ``drift.window`` images the model ran on, two numbers
(:mod:`cxr_contract.drift`):

* the population stability index of the calibrated probabilities against the model's
  reference bins (``drift_reference`` in its metadata; a model exported before it has
  none, and the index then says "no reference"; one from a validation split under
  :data:`cxr_contract.drift.MIN_REFERENCE` images is too noisy to use, and it says so);
* the one-sided binomial p-value of the images the ``ood_score`` gate held out, against the
  gate's conformal false-gate rate. Input-check gates (blank, clipped) are not counted: the
  conformal bound says nothing about them.

Both are exported as metrics (:mod:`worker.metrics`); a short history is kept for the
dashboard's operations page (served as JSON at ``/drift`` beside ``/metrics``).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, replace

from cxr_contract.drift import MIN_REFERENCE, Bins, DriftReference, binomial_sf, psi
from cxr_contract.model import ModelInfo
from cxr_contract.prevalence import Adjustment, log_odds
from worker.config import DriftSection

#: Points of history kept for the operations page (one per image, the oldest dropped).
HISTORY = 2000


@dataclass(frozen=True)
class DriftState:
    """The window's statistics after one image; None where there is nothing to compute."""

    time: float
    images: int
    gated: int
    gated_rate: float
    #: One-sided binomial p-value of ``gated`` in ``images`` at the false-gate rate.
    gated_p_value: float | None
    #: None: "no reference" (the model has none) or fewer than ``drift.min_images`` images yet.
    psi: float | None
    psi_alarm: bool
    gated_alarm: bool


class DriftMonitor:
    """The sliding window of one model's answers; thread-safe (scrapes read while a batch writes)."""

    def __init__(self, info: ModelInfo, settings: DriftSection, adjustment: Adjustment | None = None) -> None:
        """Args:
            info: The model as the worker reports it.
            settings: The ``[drift]`` section.
            adjustment: How the worker moves the graph's probability (site calibration,
                prevalence, :attr:`worker.model.OnnxModel.adjustment`): the reference, made of
                the graph's probabilities on the validation split, is moved the same way, so that
                the window and the reference compare like with like.
        """
        self.info = info
        self.settings = settings
        given = _adjusted(info.drift_reference, adjustment)
        #: Why there is or is no PSI: shown on the operations page.
        self.reference_status = ("no reference" if given is None else
                                 f"reference too small (n={given.n} < {MIN_REFERENCE} validation images)"
                                 if given.n < MIN_REFERENCE else f"validation split (n={given.n})")
        self.reference = given if given is not None and given.n >= MIN_REFERENCE else None
        self.false_gate_rate = info.false_gate_rate
        self._probabilities: deque[float] = deque(maxlen=settings.window)
        self._gated: deque[bool] = deque(maxlen=settings.window)
        self.history: deque[DriftState] = deque(maxlen=HISTORY)
        self._lock = threading.Lock()
        self.state = self._compute()

    def observe(self, probability: float, ood_gated: bool) -> DriftState:
        """Add one answered image (its calibrated probability; whether the ``ood_score`` gate held it)."""
        with self._lock:
            if math.isfinite(probability):
                self._probabilities.append(probability)
            self._gated.append(ood_gated)
            self.state = self._compute()
            self.history.append(self.state)
            return self.state

    def _compute(self) -> DriftState:
        n, k = len(self._gated), sum(self._gated)
        p_value = binomial_sf(k, n, self.false_gate_rate) if self.false_gate_rate is not None and n else None
        index = None
        if self.reference is not None and len(self._probabilities) >= self.settings.min_images:
            index = psi(self.reference.probability, list(self._probabilities))
        return DriftState(time=time.time(), images=n, gated=k, gated_rate=k / n if n else 0.0,
                          gated_p_value=p_value, psi=index,
                          psi_alarm=index is not None and index > self.settings.psi_limit,
                          gated_alarm=p_value is not None and p_value < self.settings.gated_alpha)

    def describe(self) -> dict[str, object]:
        """What ``/drift`` serves: the limits, why a number is missing, and the history."""
        with self._lock:
            history = [asdict(s) for s in self.history]
        return {
            "model_version": self.info.version,
            "window": self.settings.window, "min_images": self.settings.min_images,
            "psi_limit": self.settings.psi_limit, "gated_alpha": self.settings.gated_alpha,
            "false_gate_rate": self.false_gate_rate,
            "reference": self.reference_status, "has_reference": self.reference is not None,
            "history": history,
        }


def _adjusted(reference: DriftReference | None, adjustment: Adjustment | None) -> DriftReference | None:
    """The reference's probability bins as the worker reports probabilities: each edge moved by
    the adjustment (monotone, so each bin keeps its share of the validation split)."""
    if reference is None or adjustment is None or adjustment.identity:
        return reference
    edges = tuple(adjustment.probability(log_odds(min(max(e, 1e-7), 1 - 1e-7)))
                  for e in reference.probability.edges)
    return replace(reference, probability=Bins(edges, reference.probability.fractions))
