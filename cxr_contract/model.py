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
from dataclasses import dataclass

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
    #: int8 only: which signedness of activations/weights export chose on its CPU (``s8s8``,
    #: ``u8s8``, ``u8u8``), with the variants it tried in ``precision_check``.
    INT8_VARIANT = "int8_variant"
    #: JSON: a few probe inputs (uint8, zlib, base64) with the fp32 model's outputs on them and
    #: the limits; the worker checks a reduced model against them at load (:mod:`cxr_contract.probes`).
    PROBES = "probes"


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
        precision = meta.get(Meta.PRECISION, "fp32")
        if precision not in PRECISIONS:
            raise ContractError(f"{source}: {Meta.PRECISION}={precision!r} is not one of {', '.join(PRECISIONS)}")
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
        )


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
