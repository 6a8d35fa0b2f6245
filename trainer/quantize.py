"""Reduced-precision copies of an exported model (int8 for the CPU, fp16 for CUDA) and their
verification against the fp32 model they came from.

Only the backbone is reduced: every node computed from the feature maps ``A`` (the head, the
forward-only gradient rule that gives Grad-CAM's alpha, the einsum sum_k alpha_k A_k and the
Mahalanobis out-of-distribution score) stays float32. The head and the gradient rule are a
handful of small matrix products, so keeping them costs nothing measurable; quantizing them
moves the logit and alpha by the quantization step of a Dense kernel, and the Mahalanobis
distance of pooled features squares every error (docs/export.md, "Reduced precision", has the numbers).

Nothing here imports TensorFlow: the worker's benchmarks call it with ONNX Runtime alone.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cxr_contract.model import (
    GRADCAM_OUTPUT,
    INPUT_NAME,
    OOD_SCORE_OUTPUT,
    PROBABILITY_OUTPUT,
    Meta,
)
from cxr_contract.pixels import resize_for_model, to_unit_range
from cxr_contract.probes import Probes, as_probe_inputs, map_pearson
from trainer.errors import DataError, ExportError
from trainer.stats import auc

Array = np.ndarray[Any, Any]

__all__ = ["map_pearson"]  # kept importable from here: it moved to cxr_contract.probes

#: Calibration images fed to ONNX Runtime's calibrator at a time. Its min-max calibrator
#: keeps every intermediate tensor until it computes the ranges (hundreds of MB per 224-px
#: image); strided calibration reduces each batch first (min and max merge exactly), so
#: memory holds one batch whatever the number of images.
CALIBRATION_BATCH = 4

#: Limits a reduced-precision model must meet against its fp32 model on the test split and
#: the out-of-distribution probes. ``max`` limits are upper bounds, ``min`` lower bounds.
LIMITS: dict[str, tuple[str, float]] = {
    "probability_max_abs_diff": ("max", 0.02),
    "gradcam_mean_pearson": ("min", 0.95),
    "auc_abs_diff": ("max", 0.005),
    "decision_agreement": ("min", 0.99),
    "ood_verdict_agreement": ("min", 0.99),
    # Per image, against the fp32 score: the gate's verdicts hinge on it near the threshold.
    "ood_score_max_rel_diff": ("max", 0.25),
}

#: Each model gates with its own threshold, each the split-conformal quantile of its own
#: validation scores (with a few hundred images, one of them): an image whose fp32 score lies
#: within this fraction of the fp32 threshold is a coin toss for either model, so its verdict
#: is reported (``ood_borderline``) but not held to ``ood_verdict_agreement``.
OOD_BORDERLINE = 0.05
#: Scores are compared up to this multiple of the fp32 threshold: beyond it both models call
#: the image far outside, and min-max calibration clips the activations of inputs it never saw
#: (uniform noise: fp32 1004, int8 650, threshold 72), which moves nothing that is decided.
OOD_SCORE_CAP = 2.0

#: int8 variants: (activations, weights) of ONNX Runtime's QDQ quantization. With VNNI
#: (AVX-512 VNNI or AVX-VNNI) int8 weights take one-instruction 8-bit dot products with 32-bit
#: sums; without it ONNX Runtime's uint8 x int8 kernels (``vpmaddubsw``) add pairs of products
#: in 16 bits, which saturate (the demo model's probability moved by 0.23), so there only
#: uint8 weights (U8U8, widened to 16 bits, exact) are tried.
INT8_VARIANTS: dict[str, tuple[str, str]] = {
    "s8s8": ("int8", "int8"),
    "u8s8": ("uint8", "int8"),
    "u8u8": ("uint8", "uint8"),
}
#: Fastest first, as ``benchmarks/bench_precision.py --variants`` measured them on an AVX-512
#: VNNI Xeon (224 px, batch 8, least disturbed round): u8s8 12 ms/image, u8u8 29, s8s8 32, fp32
#: 27. ONNX Runtime's x86 kernels take uint8 activations; int8 ones are shifted first.
VNNI_ORDER = ("u8s8", "s8s8", "u8u8")
NO_VNNI_ORDER = ("u8u8",)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def has_vnni(flags: set[str] | None = None) -> bool:
    """Whether this CPU has 8-bit dot products with 32-bit sums (VNNI)."""
    return bool(set(VNNI_FLAGS) & (cpu_flags() if flags is None else flags))


def int8_variants(vnni: bool | None = None) -> tuple[str, ...]:
    """The int8 variants export tries on this CPU, fastest first."""
    return VNNI_ORDER if (has_vnni() if vnni is None else vnni) else NO_VNNI_ORDER


def _load(path: Path) -> Any:
    import onnx

    if not Path(path).is_file():
        raise ExportError(f"model file not found: {path}")
    return onnx.load(str(path))


def _metadata(model: Any) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def feature_tensor(model: Any) -> str:
    """Name of the feature-map tensor ``A`` (the output of the metadata's feature layer).

    tf2onnx names a Keras layer's ops ``<model>/<layer>[_N]/<Op>``; the last node whose name
    carries the feature layer is the layer's output.

    Raises:
        ExportError: the model has no ``feature_layer`` metadata, or no node of that layer.
    """
    layer = _metadata(model).get(Meta.FEATURE_LAYER)
    if not layer:
        raise ExportError(f"the model has no {Meta.FEATURE_LAYER!r} metadata: cannot tell the backbone "
                          "from the head (export it with cxr-train export)")
    pattern = re.compile(rf"(^|/){re.escape(layer)}(_\d+)?/")
    hits = [n for n in model.graph.node if pattern.search(n.name)]
    if not hits:
        raise ExportError(f"no node of the feature layer {layer!r} in the graph")
    return str(hits[-1].output[0])


def backbone_nodes(model: Any, feature: str) -> set[str]:
    """Names of the nodes the feature maps depend on (the tensor's ancestors, itself included)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    seen: set[str] = set()
    stack = [feature]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        stack.extend(node.input)
    return seen


def float_nodes(model: Any) -> list[str]:
    """Nodes that stay float32: all computed from the feature maps (head, gradient rule,
    Grad-CAM sum, Mahalanobis score)."""
    backbone = backbone_nodes(model, feature_tensor(model))
    return [n.name for n in model.graph.node if n.name not in backbone]


def _name_nodes(model: Any) -> None:
    """Give every node a unique name: exclusion lists refer to nodes by name."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}_unnamed"
        seen.add(node.name)


class _Calibration:
    """ONNX Runtime's CalibrationDataReader over an image array, in batches; ``set_range`` lets
    the calibrator reduce each batch to its ranges before reading the next (strided min-max)."""

    def __init__(self, images: Array) -> None:
        self._batches = [images[i:i + CALIBRATION_BATCH] for i in range(0, len(images), CALIBRATION_BATCH)]
        self._todo: Iterator[Array] = iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._todo = iter(self._batches[start_index:end_index])

    def get_next(self) -> dict[str, Array] | None:
        batch = next(self._todo, None)
        return None if batch is None else {INPUT_NAME: batch}


def _check_calibration(calibration: Array, size: int) -> Array:
    calibration = np.asarray(calibration, np.float32)
    if calibration.ndim != 4 or calibration.shape[1:] != (size, size, 1) or not len(calibration):
        raise ExportError(f"calibration images must be [N, {size}, {size}, 1] with N >= 1. "
                          f"Received: shape={calibration.shape}")
    if not np.isfinite(calibration).all():
        raise ExportError("calibration images contain values that are not finite")
    return calibration


def _write(model: Any, out: Path, precision: str, meta: dict[str, str]) -> Path:
    """Write ``model`` atomically with the fp32 model's metadata and its precision."""
    import onnx

    merged = {**meta, **_metadata(model), Meta.PRECISION: precision}
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, merged)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".onnx.tmp", delete=False) as f:
        f.write(model.SerializeToString())
    Path(f.name).replace(out)
    return out


def quantize_int8(fp32_onnx: Path, calibration: np.ndarray, out: Path, *,  # type: ignore[type-arg]
                  exclude: list[str] | None = None, variant: str = "u8u8") -> Path:
    """Static 8-bit ("int8") quantization (QDQ, per-channel asymmetric weights, asymmetric
    activations, min-max calibration) of the backbone; everything computed from the feature
    maps stays float32.

    Args:
        fp32_onnx: a model written by ``cxr-train export`` (it names its feature layer).
        calibration: validation images ``[N, S, S, 1]`` in [0, 1], as the model takes them.
        out: where the int8 model is written (atomically), metadata copied, ``precision=int8``.
        exclude: nodes kept float32; default :func:`float_nodes` (``[]`` quantizes everything,
            which verification refuses: see docs/export.md).
        variant: one of :data:`INT8_VARIANTS` (activations/weights signedness); recorded in the
            metadata as ``int8_variant``.

    Returns:
        ``out``. Nothing is verified here: :func:`compare` and :func:`check_limits` do that.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if variant not in INT8_VARIANTS:
        raise ExportError(f"int8 variant must be one of {', '.join(INT8_VARIANTS)}. Received: variant={variant!r}")
    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    activations, weights = (types[t] for t in INT8_VARIANTS[variant])
    source = _load(Path(fp32_onnx))
    meta = _metadata(source)
    size = int(meta.get(Meta.INPUT_SIZE, "0"))
    images = _check_calibration(calibration, size)
    with tempfile.TemporaryDirectory() as tmp:
        # ORT's recommended pre-processing: fuses each batch-norm Mul/Add into its Conv, so
        # the quantized unit is the whole conv layer, and infers the shapes the quantizer needs.
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=True)
        except Exception as exc:
            raise ExportError(f"ONNX Runtime cannot prepare {fp32_onnx} for quantization: {exc}") from None
        model = onnx.load(str(prepared))
        _name_nodes(model)
        # Kept beside pre-processing's own marker, which tells quantize_static it has run.
        onnx.helper.set_model_props(model, {**_metadata(model), **meta})
        onnx.save(model, str(prepared))
        keep = float_nodes(model) if exclude is None else exclude
        quantized = Path(tmp) / "int8.onnx"
        try:
            quantize_static(str(prepared), str(quantized), _Calibration(images),  # type: ignore[arg-type]
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=activations, weight_type=weights,
                            nodes_to_exclude=keep, calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": False,
                                           "CalibStridedMinMax": 1})
        except Exception as exc:
            raise ExportError(f"ONNX Runtime could not quantize {fp32_onnx}: {exc}") from None
        return _write(onnx.load(str(quantized)), Path(out), "int8", {**meta, Meta.INT8_VARIANT: variant})


def convert_fp16(fp32_onnx: Path, out: Path, *, exclude: list[str] | None = None) -> Path:
    """float16 copy for the CUDA provider: inputs and outputs stay float32, and so does every
    node computed from the feature maps (default :func:`float_nodes`).

    Returns:
        ``out``, metadata copied with ``precision=fp16``.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    source = _load(Path(fp32_onnx))
    meta = _metadata(source)
    _name_nodes(source)
    keep = float_nodes(source) if exclude is None else exclude
    try:
        half = convert_float_to_float16(source, keep_io_types=True, node_block_list=keep)
    except Exception as exc:
        raise ExportError(f"cannot convert {fp32_onnx} to float16: {exc}") from None
    _drop_duplicate_nodes(half)
    _drop_cast_round_trips(half)
    return _write(half, Path(out), "fp16", meta)


def _drop_cast_round_trips(model: Any) -> None:
    """Let float32 values pass between float32 nodes as float32. The float16 converter casts
    every kept node's output to float16 and back to float32 for the next kept node, so the
    kept nodes computed in float32 but their values passed through float16 between them: the
    Mahalanobis sum overflowed it (inf OOD scores for any image far from the training data)
    and the Grad-CAM and logit lost precision. Each Cast to float16 read only by Casts to
    float32 goes; those become Identity of its float32 input (names, graph outputs kept)."""
    from onnx import TensorProto, helper

    def cast_to(node: Any) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((int(a.i) for a in node.attribute if a.name == "to"), None)

    readers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    kept = []
    for node in model.graph.node:
        users = readers.get(node.output[0], []) if node.output else []
        if (cast_to(node) == TensorProto.FLOAT16 and node.output[0] not in outputs and users
                and all(cast_to(u) == TensorProto.FLOAT for u in users)):
            for u in users:
                u.CopyFrom(helper.make_node("Identity", [node.input[0]], list(u.output), name=u.name))
        else:
            kept.append(node)
    if len(kept) < len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(kept)


def _drop_duplicate_nodes(model: Any) -> None:
    """Remove repeated identical nodes. The float16 converter inserts one Cast back to float32
    per float32 consumer of a tensor, all with the same name and output, which ONNX refuses."""
    seen: set[bytes] = set()
    kept = []
    for node in model.graph.node:
        key = node.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)


def run_model(path: Path, images: Array, batch: int = 32) -> dict[str, Array]:
    """probability [N], gradcam [N, h, w] and ood_score [N] of a model on CPU, in batches."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [PROBABILITY_OUTPUT, GRADCAM_OUTPUT, OOD_SCORE_OUTPUT]
    chunks: dict[str, list[Array]] = {n: [] for n in names}
    for i in range(0, len(images), batch):
        got = session.run(names, {INPUT_NAME: images[i:i + batch].astype(np.float32)})
        for n, v in zip(names, got, strict=True):
            chunks[n].append(v)
    out = {n: np.concatenate(v) for n, v in chunks.items()}
    out[PROBABILITY_OUTPUT] = out[PROBABILITY_OUTPUT].reshape(-1)
    out[OOD_SCORE_OUTPUT] = out[OOD_SCORE_OUTPUT].reshape(-1)
    return out


def ood_rel_diff(ref: Array, got: Array) -> Array:
    """Per image, |got - ref| over |ref| (two equal scores, infinities included, differ by 0)."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.abs(got - ref) / np.maximum(np.abs(ref), 1e-12)
    return np.where(ref == got, 0.0, rel)


def compare(ref: dict[str, Array], got: dict[str, Array], labels: Array, *, threshold: float,
            ood_threshold: float, heatmap_scale: float, got_ood_threshold: float | None = None,
            ood_probes: tuple[dict[str, Array], dict[str, Array]] | None = None) -> dict[str, Any]:
    """The verification numbers of a reduced-precision model (``got``) against fp32 (``ref``),
    outputs as :func:`run_model` returns them, on the same images.

    Args:
        got_ood_threshold: the reduced model's own gate threshold (chosen on its own validation
            scores); default ``ood_threshold``.
        ood_probes: (fp32, reduced) outputs on out-of-distribution probes (noise, a constant,
            inverted polarity, a radiograph the model never saw): their gate verdicts and scores
            count in the out-of-distribution numbers, not in the AUC or the decisions.
    """
    p_ref, p_got = ref[PROBABILITY_OUTPUT], got[PROBABILITY_OUTPUT]
    auc_ref, auc_got = auc(labels, p_ref), auc(labels, p_got)
    auc_diff = abs(auc_ref - auc_got) if math.isfinite(auc_ref) and math.isfinite(auc_got) else None
    own = ood_threshold if got_ood_threshold is None else got_ood_threshold
    o_ref, o_got = ref[OOD_SCORE_OUTPUT], got[OOD_SCORE_OUTPUT]
    if ood_probes is not None:
        o_ref = np.concatenate([o_ref, ood_probes[0][OOD_SCORE_OUTPUT]])
        o_got = np.concatenate([o_got, ood_probes[1][OOD_SCORE_OUTPUT]])
    # A score that is not finite is outside, as the worker decides.
    out_ref, out_got = ~(o_ref <= ood_threshold), ~(o_got <= own)
    borderline = np.abs(o_ref - ood_threshold) <= OOD_BORDERLINE * ood_threshold
    cap = OOD_SCORE_CAP * ood_threshold
    numbers: dict[str, Any] = {
        "images": len(p_ref),
        "probability_max_abs_diff": float(np.abs(p_got.astype(np.float64) - p_ref).max()),
        "gradcam_mean_pearson": float(map_pearson(ref[GRADCAM_OUTPUT], got[GRADCAM_OUTPUT], heatmap_scale).mean()),
        "auc_fp32": auc_ref if math.isfinite(auc_ref) else None,
        "auc": auc_got if math.isfinite(auc_got) else None,
        "auc_abs_diff": auc_diff,
        "decision_agreement": float(np.mean((p_ref >= threshold) == (p_got >= threshold))),
        "ood_verdict_agreement": float(np.mean((out_ref == out_got)[~borderline])) if (~borderline).any() else 1.0,
        "ood_borderline": {"images": int(borderline.sum()),
                           "verdict_agreement": float(np.mean((out_ref == out_got)[borderline]))
                           if borderline.any() else None},
        # NaN counts as +inf (outside, as the worker decides): far outside, like any score past the cap.
        "ood_score_max_rel_diff": float(ood_rel_diff(*(np.minimum(np.nan_to_num(o, nan=np.inf, posinf=np.inf), cap)
                                                       for o in (o_ref, o_got))).max()),
        "ood_threshold_fp32": float(ood_threshold),
        "ood_threshold": float(own),
    }
    if ood_probes is not None:
        n = len(ood_probes[0][OOD_SCORE_OUTPUT])
        numbers["ood_probes"] = {"images": n, "outside_fp32": int(out_ref[-n:].sum()),
                                 "outside": int(out_got[-n:].sum()),
                                 "verdict_agreement": float(np.mean(out_ref[-n:] == out_got[-n:]))}
    return numbers


def failures(numbers: dict[str, Any]) -> list[str]:
    """Each limit of :data:`LIMITS` the numbers miss, as ``name value (limit op bound)``. A
    number that could not be computed (AUC with one class in the split) is not a failure; a
    NaN is."""
    bad = []
    for key, (kind, bound) in LIMITS.items():
        value = numbers.get(key)
        if value is None:
            continue
        ok = value <= bound if kind == "max" else value >= bound
        if not ok or not math.isfinite(value):
            bad.append(f"{key} {value:.4g} (limit {'<=' if kind == 'max' else '>='} {bound:g})")
    return bad


def check_limits(numbers: dict[str, Any], precision: str) -> None:
    """Raise one ExportError naming every limit the reduced-precision model misses."""
    bad = failures(numbers)
    if bad:
        raise ExportError(f"{precision} model differs from the fp32 model on {numbers['images']} test images: "
                          f"{', '.join(bad)}; no model written")


#: pydicom's test radiograph (a real CR chest, MONOCHROME1) that no model here trained on.
REAL_PROBE = "RG1_UNCR.dcm"


def ood_probe_images(size: int, image: Array, seed: int = 0) -> dict[str, Array]:
    """Inputs ``[S, S, 1]`` outside the training distribution for the gate's verdict check:
    uniform noise, a constant (zeros, as :func:`~cxr_contract.pixels.to_unit_range` gives any
    constant image), ``image`` with inverted polarity, and a real radiograph no model here
    was trained on (pydicom's test file, where pydicom's test data is installed)."""
    rng = np.random.default_rng(seed)
    probes = {
        "uniform noise": rng.random((size, size, 1), dtype=np.float32),
        "constant": np.zeros((size, size, 1), np.float32),
        "inverted polarity": (1.0 - np.asarray(image, np.float32)).reshape(size, size, 1),
    }
    try:
        from pydicom.data import get_testdata_file

        from trainer.rsna import dicom_pixels

        path = get_testdata_file(REAL_PROBE)
        if isinstance(path, str):
            probes["real radiograph (pydicom RG1_UNCR)"] = resize_for_model(to_unit_range(dicom_pixels(path)),
                                                                            size)[..., None]
    except (ImportError, OSError, ValueError, DataError):  # no pydicom test data: three probes
        pass
    return probes


def probe_record(fp32_onnx: Path, images: Array) -> Probes:
    """The fp32 model's outputs on ``images`` (rounded to their stored 256 levels) with
    :data:`LIMITS`: what the worker checks a reduced model against at load."""
    inputs = as_probe_inputs(images)
    out = run_model(fp32_onnx, inputs)
    return Probes(inputs, out[PROBABILITY_OUTPUT], out[GRADCAM_OUTPUT], out[OOD_SCORE_OUTPUT], dict(LIMITS))
