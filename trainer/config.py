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
    name: str = "cxr-gradcam-resnet50"
    feature_layer: str = "conv5_block3_out"
    image_size: int = Field(224, ge=32, le=1024, multiple_of=32)
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    dense_units: int = Field(256, ge=1)
    weights: str = "imagenet"
    bn_momentum: float = Field(0.99, gt=0, lt=1)
    #: frozen: BatchNormalization runs in inference mode on its (pretrained) statistics and
    #: is not trained; train: batch statistics while training. auto: frozen with pretrained
    #: weights (Keras' transfer-learning guide), train with weights = "none" (nothing to keep).
    bn: Literal["auto", "frozen", "train"] = "auto"


class TrainSection(_Section):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-4, gt=0, lt=1)
    patience: int = Field(5, ge=0)
    class_weights: Literal["auto", "none"] = "auto"
    cache: bool = True
    mixed_precision: Literal["auto", "on", "off"] = "auto"
    seed: int = 0
    deterministic: bool = False
    #: Epochs that train only the head (backbone frozen) before fine-tuning everything,
    #: so a random head's gradients do not disturb pretrained features; 0 = none.
    head_warmup_epochs: int = Field(0, ge=0)


class AugmentSection(_Section):
    rotation_degrees: float = Field(10.0, ge=0, le=180)
    zoom: float = Field(0.1, ge=0, lt=1)
    horizontal_flip: bool = True
    contrast: float = Field(0.1, ge=0, lt=1)


class EvaluateSection(_Section):
    bootstrap: int = Field(1000, ge=0)
    threshold_rule: Literal["youden", "fixed"] = "youden"
    fixed_threshold: float = Field(0.5, gt=0, lt=1)


class ExportSection(_Section):
    #: Target rate of in-distribution images the out-of-distribution gate refuses: the
    #: threshold is the split-conformal quantile of the validation scores at this rate.
    ood_false_gate_rate: float = Field(0.01, gt=0, lt=0.5)
    #: Percentile of the peak raw Grad-CAM over validation images called positive that the
    #: worker draws as full colour (heatmap_scale).
    heatmap_percentile: float = Field(95.0, gt=0, le=100)
    #: Validation images whose Grad-CAM the saliency sanity check compares.
    sanity_images: int = Field(16, ge=2)
    #: A sanity-check stage fails when the pre-ReLU maps, after its weights are re-initialised,
    #: still correlate (mean absolute Spearman) above this with the trained model's maps.
    sanity_max_correlation: float = Field(0.5, gt=0, lt=1)


class TrainConfig(_Section):
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
