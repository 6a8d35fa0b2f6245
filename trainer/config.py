"""Training configuration: a TOML file validated by pydantic, flags on top.

The shipped configs (``train.toml``, the paper's recipe, and ``demo-train.toml``) are
package data, read with :mod:`importlib.resources`, so an installed trainer has them;
``config/`` in the repository holds the same files for people to read and copy.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainer.errors import ConfigError

#: Name of the shipped config that ``cxr-train fit`` reads without ``--config``.
DEFAULT_CONFIG = "train"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    """The network: ResNet-50, a small head, Grad-CAM at one feature layer."""

    name: str = Field("cxr-gradcam-resnet50", description="model name, carried in the ONNX metadata, every SR "
                      "and the SC")
    feature_layer: str = Field("conv5_block3_out", description="layer whose feature maps Grad-CAM weighs (the "
                               "last convolutional block, as in the case study)")
    image_size: int = Field(224, ge=32, le=1024, multiple_of=32, description="S in pixels: the model takes "
                            "grayscale [0, 1] at S x S; 224 is what ImageNet weights were trained at")
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="dropout rate before the dense layer")
    dense_units: int = Field(256, ge=1, description="units of the head's hidden dense layer")
    weights: str = Field("imagenet", description="imagenet (downloaded by Keras), none (random init, the demo), "
                         "or the path of resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 offline")
    bn_momentum: float = Field(0.99, gt=0, lt=1, description="BatchNormalization moving-average momentum "
                               "(Keras' default)")
    bn: Literal["auto", "frozen", "train"] = Field(
        "auto", description="frozen: BatchNormalization runs on its pretrained statistics and is not trained; "
        "train: batch statistics; auto: frozen with pretrained weights (Keras' transfer-learning guide), "
        "train with weights = none")


class TrainSection(_Section):
    """The fit: the paper's recipe by default."""

    epochs: int = Field(30, ge=1, description="most epochs; early stopping usually ends sooner")
    batch_size: int = Field(32, ge=1, description="images per training step")
    learning_rate: float = Field(1e-4, gt=0, lt=1, description="Adam's learning rate (fine-tuning: small)")
    patience: int = Field(5, ge=0, description="epochs without a lower validation loss before early stopping "
                          "(best weights restored)")
    class_weights: Literal["auto", "none"] = Field("auto", description="auto: balanced class weights when "
                                                   "the classes are imbalanced; none: never")
    cache: bool = Field(True, description="cache decoded images in memory after the first epoch (tf.data)")
    mixed_precision: Literal["auto", "on", "off"] = Field("auto", description="float16 compute with float32 "
                                                          "weights; auto = on when TensorFlow sees a GPU")
    seed: int = Field(0, description="seed of shuffling, augmentation and initialisation")
    deterministic: bool = Field(False, description="reproducible runs (TensorFlow's deterministic ops), slower")
    head_warmup_epochs: int = Field(0, ge=0, description="epochs that train only the head (backbone frozen) "
                                    "before fine-tuning everything; 0 = none")


class AugmentSection(_Section):
    """Training-time augmentation."""

    rotation_degrees: float = Field(10.0, ge=0, le=180, description="random rotation up to this many degrees; "
                                    "0 switches it off")
    zoom: float = Field(0.1, ge=0, lt=1, description="random zoom up to this fraction")
    horizontal_flip: bool = Field(True, description="random left-right flips")
    contrast: float = Field(0.1, ge=0, lt=1, description="random contrast change up to this fraction")


class EvaluateSection(_Section):
    """``cxr-train evaluate``: metrics, intervals and the decision threshold."""

    bootstrap: int = Field(1000, ge=0, description="patient resamples for the 95 % confidence intervals")
    threshold_rule: Literal["youden", "fixed"] = Field(
        "youden", description="youden: the threshold maximising sensitivity + specificity on the calibrated "
        "validation split; fixed: fixed_threshold")
    fixed_threshold: float = Field(0.5, gt=0, lt=1, description="the threshold with threshold_rule = fixed, "
                                   "on the calibrated probability")


class ExportSection(_Section):
    """``cxr-train export``: the out-of-distribution gate, the heatmap scale and the sanity check."""

    ood_false_gate_rate: float = Field(0.01, gt=0, lt=0.5, description="target rate of in-distribution images "
                                       "the gate refuses: the threshold is the split-conformal quantile of the "
                                       "validation scores at this rate")
    heatmap_percentile: float = Field(95.0, gt=0, le=100, description="percentile of the peak raw Grad-CAM over "
                                      "validation images called positive that the worker draws as full colour")
    sanity_images: int = Field(16, ge=2, description="validation images the saliency sanity check compares")
    sanity_max_correlation: float = Field(0.5, gt=0, lt=1, description="a sanity-check stage fails when the "
                                          "pre-ReLU maps, after its weights are re-initialised, still correlate "
                                          "(mean absolute Spearman) above this with the trained model's maps")


class TrainConfig(_Section):
    """Everything ``cxr-train`` reads from its TOML file."""

    model: ModelSection = ModelSection()
    train: TrainSection = TrainSection()
    augment: AugmentSection = AugmentSection()
    evaluate: EvaluateSection = EvaluateSection()
    export: ExportSection = ExportSection()


def resolved_bn(cfg: ModelSection) -> Literal["frozen", "train"]:
    """The BatchNormalization mode ``auto`` stands for with these weights."""
    if cfg.bn != "auto":
        return cfg.bn
    return "train" if cfg.weights == "none" else "frozen"


def shipped_configs() -> dict[str, Traversable]:
    """The configs that come with the package, by name (file name without ``.toml``)."""
    folder = resources.files("trainer") / "defaults"
    if not folder.is_dir():  # an install without its package data: named in _find's error
        return {}
    return {f.name.removesuffix(".toml"): f for f in folder.iterdir() if f.name.endswith(".toml")}


def _find(name: str | Path) -> Traversable | Path:
    """A file, else a shipped config by name; never silently nothing."""
    if Path(name).is_file():
        return Path(name)
    shipped = shipped_configs()
    if str(name) in shipped:
        return shipped[str(name)]
    raise ConfigError(f"config not found: {name} (neither a file nor a shipped config: "
                      f"{', '.join(sorted(shipped)) or 'none installed'})")


def load_config(path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> TrainConfig:
    """Read a TOML config and apply overrides.

    Args:
        path: A file, or the name of a shipped config ("train", "demo-train");
            the shipped "train" when None.
        overrides: Values by section; None means "not given".

    Raises:
        ConfigError: the config is missing, or naming the file and the first bad key and value.
    """
    source = _find(DEFAULT_CONFIG if path is None else path)
    try:
        data: dict[str, Any] = tomllib.loads(source.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{source}: {where}: {err['msg']} (received {err.get('input')!r})") from None
