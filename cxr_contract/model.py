"""The exported model's interface: what ``cxr-train export`` writes and the worker reads.

Contract version 2 (version 1 models, exported before it, still load):

* input ``image``: float32 ``[N, S, S, 1]``, grayscale in [0, 1] (see :mod:`cxr_contract.pixels`);
  channel replication and ImageNet normalisation are inside the graph.
* output ``probability``: float32 ``[N, 1]``, probability of pneumonia (v2: calibrated).
* output ``gradcam``: float32 ``[N, S/32, S/32]`` >= 0, ReLU(sum_k alpha_k A_k), raw.
* output ``logit`` (v2): float32 ``[N, 1]``, the calibrated logit, ``sigmoid(logit) == probability``;
  it does not saturate where the probability rounds to 0 or 1.
* output ``ood_score`` (v2): float32 ``[N]``, larger = further from the training data;
  the image is outside the model's training distribution when ``ood_score > ood_threshold``.
* ``metadata_props``: the keys below, all strings.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

from cxr_contract import faithfulness
from cxr_contract import prevalence as prior
from cxr_contract.drift import DriftReference

#: Bumped whenever a name, a shape or the meaning of a metadata key changes.
CONTRACT_VERSION = 2

INPUT_NAME = "image"
PROBABILITY_OUTPUT = "probability"
GRADCAM_OUTPUT = "gradcam"
LOGIT_OUTPUT = "logit"
OOD_SCORE_OUTPUT = "ood_score"

#: Outputs every model has; v2 adds :data:`V2_OUTPUTS`.
V1_OUTPUTS = (PROBABILITY_OUTPUT, GRADCAM_OUTPUT)
V2_OUTPUTS = (LOGIT_OUTPUT, OOD_SCORE_OUTPUT)

LABELS = ("No Finding", "Pneumonia")


class Meta:
    """Keys of the model's ``metadata_props``."""

    CONTRACT_VERSION = "contract_version"
    NAME = "name"
    VERSION = "version"
    INPUT_SIZE = "input_size"
    THRESHOLD = "threshold"
    WEIGHTS_SHA256 = "weights_sha256"
    LABELS = "labels"
    FEATURE_LAYER = "feature_layer"
    INTENDED_USE = "intended_use"
    TRAINING_DATA = "training_data"
    TEST_METRICS = "test_metrics"
    GRADCAM = "gradcam"
    EXPORTED = "exported"
    TENSORFLOW = "tensorflow"
    GIT_COMMIT = "git_commit"
    # v2
    OOD_THRESHOLD = "ood_threshold"
    OOD_METHOD = "ood_method"
    CALIBRATION = "calibration"  # JSON: {"method": "temperature", "temperature": T, ...}
    HEATMAP_SCALE = "heatmap_scale"  # raw Grad-CAM value drawn as full colour
    SANITY_CHECK = "sanity_check"  # JSON: cascading-randomisation correlations
    PRECISION = "precision"  # one of PRECISIONS; absent = fp32 (models exported before int8)
    #: JSON: a reduced-precision model's verification against its fp32 model on the test split
    #: (probability, Grad-CAM, AUC, decision and out-of-distribution agreement, with the limits).
    PRECISION_CHECK = "precision_check"
    #: JSON (:class:`cxr_contract.drift.DriftReference`): the validation split's probabilities and
    #: ood_scores as quantile bins, the worker's drift reference; absent = "no reference".
    DRIFT_REFERENCE = "drift_reference"
    #: Heatmap faithfulness score above which a map is "above chance" (:mod:`cxr_contract.faithfulness`);
    #: absent: the model makes no faithfulness statement.
    FAITHFULNESS_CUTOFF = "faithfulness_cutoff"
    FAITHFULNESS_NULL = "faithfulness_null"  # JSON: how the cut-off was computed, per null family
    #: The healthy reference removed regions are filled from (base64 16-bit PNG at the input size,
    #: :func:`cxr_contract.faithfulness.encode_reference`). A cut-off without it was computed with
    #: an earlier score and is not used: such a model makes no faithfulness statement.
    FAITHFULNESS_REFERENCE = "faithfulness_reference"
    #: int8 only: which signedness of activations/weights export chose on its CPU (``s8s8``,
    #: ``u8s8``, ``u8u8``), with the variants it tried in ``precision_check``.
    INT8_VARIANT = "int8_variant"
    #: JSON: a few probe inputs (uint8, zlib, base64) with the fp32 model's outputs on them and
    #: the limits; the worker checks a reduced model against them at load (:mod:`cxr_contract.probes`).
    PROBES = "probes"
    #: The share of pneumonia the graph's calibrated probability assumes (that of the split the
    #: temperature was fitted on). Absent (older models): the training split's, from TRAINING_DATA.
    PREVALENCE = "prevalence"
    #: JSON: the operating point on the validation split, ``{"sensitivity", "specificity", "split",
    #: "curve": [[sensitivity, logit threshold], ...]}``, thresholds on the graph's ``logit``.
    OPERATING_POINT = "operating_point"
    #: JSON, written by ``cxr-train recalibrate``: a site's ``{"temperature", "prevalence",
    #: "threshold_logit", "target_sensitivity", "curve", "report"}`` applied on top of the graph.
    SITE_CALIBRATION = "site_calibration"
    #: JSON: the model card's summary (``evaluate`` writes the card itself into the run folder).
    MODEL_CARD = "model_card"


#: What ``cxr-train export --precision`` writes: fp32 (the default), int8 (CPU), fp16 (CUDA).
PRECISIONS = ("fp32", "int8", "fp16")

REQUIRED_METADATA = (Meta.NAME, Meta.VERSION, Meta.INPUT_SIZE, Meta.THRESHOLD, Meta.WEIGHTS_SHA256)
#: Required in addition from contract version 2 on.
REQUIRED_METADATA_V2 = (Meta.CONTRACT_VERSION, Meta.OOD_THRESHOLD, Meta.HEATMAP_SCALE)

#: A model trained on phantoms says so in its intended use; the worker prints it on every SC.
SYNTHETIC_USE = "demo model trained on synthetic phantoms - not for clinical use"
RESEARCH_USE = "research use only - not a medical device"


class ContractError(ValueError):
    """A model's metadata or interface does not follow this contract."""


@dataclass(frozen=True)
class ModelInfo:
    """What a consumer needs to know about a model, read from its metadata."""

    name: str
    version: str
    input_size: int
    threshold: float
    weights_sha256: str
    contract_version: int = 1
    intended_use: str = ""
    #: None for a version 1 model: it has no out-of-distribution gate.
    ood_threshold: float | None = None
    #: None for a version 1 model: its heatmaps are scaled per image.
    heatmap_scale: float | None = None
    #: Numeric precision of the graph's backbone (:data:`PRECISIONS`).
    precision: str = "fp32"
    #: The drift reference (:data:`Meta.DRIFT_REFERENCE`); None for models exported before it.
    drift_reference: DriftReference | None = None
    #: The gate's conformal bound on gating an in-distribution image (``false_gate_bound`` in
    #: :data:`Meta.OOD_METHOD`); None without a gate or that record.
    false_gate_rate: float | None = None
    #: None: no null cut-off in the metadata (or one without its reference, from an earlier
    #: score), so no heatmap faithfulness statement.
    faithfulness_cutoff: float | None = None
    #: The healthy reference's text (:data:`Meta.FAITHFULNESS_REFERENCE`); None without a cut-off.
    faithfulness_reference: str | None = None
    #: The prevalence the graph's probability assumes (None: neither recorded nor derivable).
    prevalence: float | None = None
    #: Validation ``[sensitivity, logit threshold]`` pairs (empty for older models).
    operating_curve: tuple[tuple[float, float], ...] = ()
    #: ``cxr-train recalibrate``'s site calibration (None: the model as exported).
    site_calibration: dict[str, Any] | None = None
    #: The model card's summary (empty for older models).
    model_card: dict[str, Any] = field(default_factory=dict)
    #: Set by a consumer that reports at another prevalence (:meth:`reporting`); None = ``prevalence``.
    reported_prevalence: float | None = None

    @property
    def assumed_prevalence(self) -> float | None:
        """The prevalence the reported probability assumes (what the SC and SR print)."""
        return self.reported_prevalence if self.reported_prevalence is not None else self.prevalence

    def reporting(self, adjustment: prior.Adjustment | None) -> ModelInfo:
        """This model as reported through ``adjustment``: its threshold moved onto the reported
        probability, and the prevalence that probability assumes."""
        if adjustment is None:
            return self
        moved = adjustment.threshold
        # Unmoved, the threshold stays the recorded value itself, not its round trip through the
        # log-odds: a probability exactly at the threshold keeps its decision.
        threshold = self.threshold if abs(moved - self.threshold) < 1e-12 else moved
        return replace(self, threshold=threshold, reported_prevalence=adjustment.to_prevalence)

    def adjustment(self, site_prevalence: float | None = None,
                   target_sensitivity: float | None = None) -> prior.Adjustment | None:
        """How the worker turns the graph's logit into the reported one (:mod:`cxr_contract.prevalence`).

        Args:
            site_prevalence: the prevalence to report at; None = the site calibration's, else
                the model's own.
            target_sensitivity: choose the threshold for this sensitivity (on the site
                calibration's labelled images, else the validation split); None keeps the
                operating point.

        Returns:
            None for a model whose prevalence is unknown and that has no site calibration
            (nothing to shift from; a ``site_prevalence`` then raises).

        Raises:
            ContractError: a prevalence or sensitivity out of range, or a shift asked of a model
                that does not know its prevalence.
        """
        site = self.site_calibration or {}
        base = site.get("prevalence", self.prevalence)
        if base is None:
            if site_prevalence is not None or target_sensitivity is not None:
                raise ContractError(f"model {self.name} {self.version} does not record the prevalence its "
                                    "probability assumes: it cannot be shifted (export it again)")
            return None
        temperature = float(site.get("temperature", 1.0))
        threshold_logit = float(site.get("threshold_logit", prior.log_odds(min(max(self.threshold, 1e-12),
                                                                                 1 - 1e-12))))
        if target_sensitivity is not None:
            curve = site.get("curve") or self.operating_curve
            if not curve:
                raise ContractError(f"model {self.name} {self.version} records no sensitivity curve: "
                                    "model.target_sensitivity needs one (export it again)")
            try:
                threshold_logit = prior.threshold_for_sensitivity(curve, target_sensitivity)
            except ValueError as exc:
                raise ContractError(f"model.target_sensitivity: {exc}") from None
        to = base if site_prevalence is None else site_prevalence
        try:
            prior.check_prevalence(to, "site_prevalence")
        except ValueError as exc:
            raise ContractError(str(exc)) from None
        # The model's own prevalence is what the graph assumes; a site calibration's was fitted
        # on top of it (its temperature and shift), so the shift is taken from the graph's.
        graph = self.prevalence if self.prevalence is not None else base
        return prior.Adjustment(temperature=temperature, from_prevalence=graph,
                                to_prevalence=to, threshold_logit=threshold_logit)

    @property
    def has_ood_gate(self) -> bool:
        return self.ood_threshold is not None

    @property
    def synthetic(self) -> bool:
        return "synthetic" in self.intended_use

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str) -> ModelInfo:
        """Validate ``metadata_props``; a ContractError names the source and the bad key."""
        missing = [k for k in REQUIRED_METADATA if k not in meta]
        try:
            contract = int(meta.get(Meta.CONTRACT_VERSION, "1"))
        except ValueError:
            raise ContractError(f"{source}: {Meta.CONTRACT_VERSION}={meta[Meta.CONTRACT_VERSION]!r} "
                                "is not a whole number") from None
        if contract > CONTRACT_VERSION:
            raise ContractError(f"{source}: contract version {contract} is newer than this software "
                                f"understands ({CONTRACT_VERSION}); upgrade cxr-gradcam")
        if contract >= 2:
            missing += [k for k in REQUIRED_METADATA_V2 if k not in meta]
        if missing:
            raise ContractError(f"{source}: metadata_props lack {', '.join(missing)}")
        size = int(_number(meta, Meta.INPUT_SIZE, source, int))
        threshold = _number(meta, Meta.THRESHOLD, source, float)
        if size < 32 or not 0.0 <= threshold <= 1.0:
            raise ContractError(f"{source}: input_size={size} or threshold={threshold} out of range")
        ood = _number(meta, Meta.OOD_THRESHOLD, source, float) if Meta.OOD_THRESHOLD in meta else None
        scale = _number(meta, Meta.HEATMAP_SCALE, source, float) if Meta.HEATMAP_SCALE in meta else None
        if scale is not None and not scale > 0:
            raise ContractError(f"{source}: {Meta.HEATMAP_SCALE}={scale} must be > 0")
        try:
            labels = tuple(json.loads(meta[Meta.LABELS])) if Meta.LABELS in meta else LABELS
        except ValueError:
            raise ContractError(f"{source}: {Meta.LABELS} is not a JSON list") from None
        if labels != LABELS:  # the worker reports the second label's probability
            raise ContractError(f"{source}: labels {list(labels)} are not {list(LABELS)}")
        # A cut-off is only comparable with the score it was computed with: one exported before
        # the healthy reference came from an earlier score, which this software no longer computes.
        faith_reference = meta.get(Meta.FAITHFULNESS_REFERENCE)
        cutoff = (_number(meta, Meta.FAITHFULNESS_CUTOFF, source, float)
                  if Meta.FAITHFULNESS_CUTOFF in meta else None)
        if not faith_reference:
            cutoff = None
        elif cutoff is not None:
            try:
                faithfulness.decode_reference(faith_reference, size)
            except ValueError as exc:
                raise ContractError(f"{source}: {Meta.FAITHFULNESS_REFERENCE} is {exc}") from None
        precision = meta.get(Meta.PRECISION, "fp32")
        if precision not in PRECISIONS:
            raise ContractError(f"{source}: {Meta.PRECISION}={precision!r} is not one of {', '.join(PRECISIONS)}")
        reference = None
        if Meta.DRIFT_REFERENCE in meta:
            try:
                reference = DriftReference.from_json(meta[Meta.DRIFT_REFERENCE])
            except (ValueError, KeyError, TypeError) as exc:
                raise ContractError(f"{source}: {Meta.DRIFT_REFERENCE} is not a drift reference "
                                    f"({type(exc).__name__}: {exc})") from None
        model_prevalence = _prevalence(meta, source)
        try:
            operating = json.loads(meta.get(Meta.OPERATING_POINT, "{}"))
            site = json.loads(meta[Meta.SITE_CALIBRATION]) if Meta.SITE_CALIBRATION in meta else None
            card = json.loads(meta.get(Meta.MODEL_CARD, "{}"))
            curve = tuple((float(s), float(t)) for s, t in operating.get("curve", []))
        except (ValueError, TypeError, AttributeError):
            raise ContractError(f"{source}: {Meta.OPERATING_POINT}, {Meta.SITE_CALIBRATION} or "
                                f"{Meta.MODEL_CARD} is not the JSON this software writes") from None
        if site is not None:
            try:
                prior.check_prevalence(float(site["prevalence"]), "site_calibration prevalence")
                if not float(site["temperature"]) > 0:
                    raise ValueError(f"site_calibration temperature must be > 0, is {site['temperature']}")
                float(site["threshold_logit"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ContractError(f"{source}: {Meta.SITE_CALIBRATION}: {exc}") from None
        return cls(
            name=meta[Meta.NAME],
            version=meta[Meta.VERSION],
            input_size=size,
            threshold=threshold,
            weights_sha256=meta[Meta.WEIGHTS_SHA256],
            contract_version=contract,
            intended_use=meta.get(Meta.INTENDED_USE, ""),
            ood_threshold=ood,
            heatmap_scale=scale,
            precision=precision,
            drift_reference=reference,
            false_gate_rate=_false_gate_rate(meta) if ood is not None else None,
            faithfulness_cutoff=cutoff,
            faithfulness_reference=faith_reference if cutoff is not None else None,
            prevalence=model_prevalence,
            operating_curve=curve,
            site_calibration=site,
            model_card=card if isinstance(card, dict) else {},
        )


def _false_gate_rate(meta: dict[str, str]) -> float | None:
    """``false_gate_bound`` from the gate's record, when it is a rate (models exported before
    the record carried it have none: their gated-rate test says so instead of guessing)."""
    try:
        bound = float(json.loads(meta.get(Meta.OOD_METHOD, "{}")).get("false_gate_bound"))
    except (ValueError, TypeError, AttributeError):
        return None
    return bound if 0.0 < bound < 1.0 else None


def _prevalence(meta: dict[str, str], source: str) -> float | None:
    """The recorded prevalence; for a model exported before it was recorded, the training
    split's share of pneumonia (its probability was calibrated on a split drawn alike)."""
    if Meta.PREVALENCE in meta:
        value = _number(meta, Meta.PREVALENCE, source, float)
        try:
            return prior.check_prevalence(value)
        except ValueError as exc:
            raise ContractError(f"{source}: {exc}") from None
    try:
        by_class = json.loads(meta.get(Meta.TRAINING_DATA, "{}"))["splits"]["train"]["by_class"]
        pos, neg = float(by_class["1"]["images"]), float(by_class["0"]["images"])
        return prior.check_prevalence(pos / (pos + neg))
    except (ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


def required_outputs(contract_version: int) -> tuple[str, ...]:
    return V1_OUTPUTS + (V2_OUTPUTS if contract_version >= 2 else ())


def _number(meta: dict[str, str], key: str, source: str, kind: type[int] | type[float]) -> float:
    try:
        value = kind(meta[key])
    except ValueError:
        raise ContractError(f"{source}: {key}={meta[key]!r} is not a number") from None
    if not math.isfinite(value):
        raise ContractError(f"{source}: {key}={meta[key]!r} is not finite")
    return value
