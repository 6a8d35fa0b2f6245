"""``cxr-train export``: one ONNX model (contract version 2) returning ``probability``,
``logit``, ``gradcam`` and ``ood_score`` from one run.

Before a model is written, export

* fits the out-of-distribution gate (:mod:`trainer.ood`) on the training split and
  chooses its threshold on the validation split;
* bakes the temperature that ``evaluate`` fitted into the graph (logit / T);
* verifies the graph with ONNX Runtime against TensorFlow's GradientTape: probability,
  logit, the pre-ReLU Grad-CAM sum and the channel weights alpha, each scaled by its own
  magnitude, on images of both classes, and the gate's score;
* runs the saliency sanity check (:mod:`trainer.sanity`), refusing only a "failed" verdict;
* sets the heatmap-faithfulness cut-off from knowledge-free maps on the validation split
  (:func:`cxr_contract.faithfulness.null_cutoff`);
* with ``--precision int8|fp16``, reduces the verified fp32 graph (:mod:`trainer.quantize`,
  int8 calibrated on the validation split) and compares it with the fp32 graph on the test
  split against :data:`trainer.quantize.LIMITS`.

A model that fails verification, the sanity check (verdict "failed") unless allowed, or the
precision limits is not written.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from cxr_contract import faithfulness
from cxr_contract.drift import reference_of
from cxr_contract.model import (
    CONTRACT_VERSION,
    GRADCAM_OUTPUT,
    INPUT_NAME,
    LABELS,
    LOGIT_OUTPUT,
    OOD_SCORE_OUTPUT,
    PRECISIONS,
    PROBABILITY_OUTPUT,
    RESEARCH_USE,
    SYNTHETIC_USE,
    ContractError,
    Meta,
    ModelInfo,
    required_outputs,
)
from trainer import __version__
from trainer.config import resolved_bn
from trainer.data import Record, load_dataset, require_split
from trainer.errors import DataError, ExportError, TrainerError
from trainer.evaluate import faithfulness_reference, load_run
from trainer.fit import load_image
from trainer.model import feature_model, gradcam_parts, gradcam_tape_parts, weights_sha256
from trainer.ood import METHOD, MahalanobisGate, conformal_threshold, fit_gate
from trainer.quantize import (
    LIMITS,
    check_limits,
    compare,
    convert_fp16,
    failures,
    has_vnni,
    int8_variants,
    ood_probe_images,
    probe_record,
    quantize_int8,
    run_model,
)
from trainer.sanity import sanity_check

OPSET = 17
PROB_TOL = 1e-4
#: Relative tolerance of logit, pre-ReLU Grad-CAM, alpha and ood_score, each against its own magnitude.
REL_TOL = 1e-4
#: The logit's error is scaled by the batch's largest |logit|, and by at least this many logits:
#: against each image's own logit, an image near the decision boundary (logit ~ 0, which a
#: real model has somewhere) turned float noise into a refusal of a correct graph.
LOGIT_SCALE_FLOOR = 0.1
#: Outputs present only while verifying, pruned before the model is written.
RAW_OUTPUT, ALPHA_OUTPUT = "gradcam_raw", "gradcam_alpha"
BATCH = 32
#: At most this many validation images calibrate an int8 model (seeded draw beyond it):
#: min-max ranges settle long before, and calibration runs the whole graph on each.
CALIBRATION_MAX = 256
#: Test images (both classes) whose fp32 outputs a reduced model carries for the worker's load check.
PROBE_IMAGES = 4


def to_onnx(model: keras.Model, feature_layer: str, size: int, gate: MahalanobisGate,
            temperature: float = 1.0) -> Any:
    """Convert the forward-only graph with tf2onnx: the contract's outputs plus the two
    verification outputs (:data:`RAW_OUTPUT`, :data:`ALPHA_OUTPUT`)."""
    import tf2onnx

    parts = gradcam_parts(model, feature_layer)
    spec = (tf.TensorSpec([None, size, size, 1], tf.float32, name=INPUT_NAME),)

    @tf.function(input_signature=spec)
    def serve(image: tf.Tensor) -> dict[str, tf.Tensor]:
        out = parts(image)
        # Calibration rescales the decision score only; Grad-CAM stays the gradient of
        # the uncalibrated logit (for T > 0 that only rescales the map by 1/T).
        logit = out["logit"] / temperature
        return {PROBABILITY_OUTPUT: tf.sigmoid(logit), LOGIT_OUTPUT: logit, GRADCAM_OUTPUT: out["gradcam"],
                OOD_SCORE_OUTPUT: gate.tf_score(out["pooled"]), RAW_OUTPUT: out["gradcam_raw"],
                ALPHA_OUTPUT: out["alpha"]}

    try:
        proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=OPSET)
    except Exception as exc:
        raise ExportError(f"tf2onnx could not convert the model: {exc}") from None
    return proto


def _session(proto: Any) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _rel_err(got: np.ndarray[Any, Any], ref: np.ndarray[Any, Any],
             scale_of: np.ndarray[Any, Any] | None = None, *, batch_floor: float | None = None) -> float:
    """Largest per-image |got - ref| over that image's largest |scale_of| (default ``ref``;
    1e-12 if all zero); with ``batch_floor``, over the whole batch's largest |scale_of| and at
    least ``batch_floor`` instead."""
    n = len(ref)
    basis = np.abs(ref if scale_of is None else scale_of).reshape(n, -1)
    scale = (np.full(n, max(float(basis.max()), batch_floor)) if batch_floor is not None
             else np.maximum(basis.max(axis=1), 1e-12))
    return float((np.abs(got - ref).reshape(n, -1).max(axis=1) / scale).max())


def verify(proto: Any, model: keras.Model, feature_layer: str, images: np.ndarray[Any, Any],
           gate: MahalanobisGate, temperature: float = 1.0) -> dict[str, float]:
    """ONNX Runtime against GradientTape; raises ExportError past tolerance.

    The post-ReLU map can be all zero, or have a tiny peak, and so hide a wrong graph; the
    pre-ReLU sum and alpha are compared instead, each against its own magnitude. The logit is
    compared against the batch's largest |logit| (at least :data:`LOGIT_SCALE_FLOOR`), never
    an image's own, which is near zero for an image near the decision boundary.
    """
    names = [PROBABILITY_OUTPUT, LOGIT_OUTPUT, GRADCAM_OUTPUT, OOD_SCORE_OUTPUT, RAW_OUTPUT, ALPHA_OUTPUT]
    got = dict(zip(names, _session(proto).run(names, {INPUT_NAME: images.astype(np.float32)}), strict=True))
    ref = gradcam_tape_parts(model, feature_layer, images)
    pooled = np.asarray(feature_model(model, feature_layer)(images, training=False), np.float64).mean(axis=(1, 2))
    calibrated = 1.0 / (1.0 + np.exp(-np.asarray(ref["logit"], np.float64) / temperature))
    errors = {
        # The graph's probability is calibrated: sigmoid(z / T), not the Keras output sigmoid(z).
        "probability_max_abs_error": float(np.abs(got[PROBABILITY_OUTPUT] - calibrated).max()),
        "logit_max_rel_error": _rel_err(got[LOGIT_OUTPUT], ref["logit"] / temperature, batch_floor=LOGIT_SCALE_FLOOR),
        "gradcam_raw_max_rel_error": _rel_err(got[RAW_OUTPUT], ref["gradcam_raw"]),
        "alpha_max_rel_error": _rel_err(got[ALPHA_OUTPUT], ref["alpha"]),
        # The shown map against the pre-ReLU scale: a tiny post-ReLU peak cannot inflate it.
        "gradcam_max_rel_error": _rel_err(got[GRADCAM_OUTPUT], ref["gradcam"], ref["gradcam_raw"]),
        "ood_score_max_rel_error": _rel_err(got[OOD_SCORE_OUTPUT][:, None], gate.score(pooled)[:, None]),
    }
    shapes_ok = got[GRADCAM_OUTPUT].shape == ref["gradcam"].shape and got[LOGIT_OUTPUT].shape == ref["logit"].shape
    bad = [f"{k} {v:.2e}" for k, v in errors.items()
           if v > (PROB_TOL if k.startswith("probability") else REL_TOL) or not np.isfinite(v)]
    if bad or not shapes_ok:
        raise ExportError(
            f"exported model does not match TensorFlow: {', '.join(bad) or 'shapes differ'} (limits: probability "
            f"{PROB_TOL}, relative {REL_TOL}); Grad-CAM shapes {got[GRADCAM_OUTPUT].shape} vs "
            f"{ref['gradcam'].shape}; no model written"
        )
    return {**errors, "images": len(images)}


def prune_to_contract(proto: Any) -> Any:
    """The graph with only the contract's outputs (the verification outputs removed)."""
    import onnx
    from onnx.utils import Extractor

    keep = list(required_outputs(CONTRACT_VERSION))
    pruned = Extractor(proto).extract_model([INPUT_NAME], keep)
    pruned.opset_import.extend([o for o in proto.opset_import if o not in pruned.opset_import])
    pruned.ir_version = proto.ir_version
    onnx.checker.check_model(pruned)
    return pruned


def _load(records: list[Record], size: int) -> np.ndarray[Any, Any]:
    return np.stack([load_image(r.path, size) for r in records]).astype(np.float32)


def run_onnx(proto: Any, records: list[Record], size: int) -> dict[str, np.ndarray[Any, Any]]:
    """The written model's outputs over a split, in batches."""
    session = _session(proto)
    names = [PROBABILITY_OUTPUT, GRADCAM_OUTPUT, OOD_SCORE_OUTPUT]
    chunks: dict[str, list[np.ndarray[Any, Any]]] = {n: [] for n in names}
    for i in range(0, len(records), BATCH):
        for n, v in zip(names, session.run(names, {INPUT_NAME: _load(records[i:i + BATCH], size)}), strict=True):
            chunks[n].append(v)
    return {n: np.concatenate(v) for n, v in chunks.items()}


def faithfulness_null(proto: Any, records: list[Record], size: int, grid: tuple[int, ...],
                      reference: np.ndarray[Any, Any] | None = None) -> dict[str, Any]:
    """:func:`cxr_contract.faithfulness.null_cutoff` on ``records`` (the validation split), scored
    by the graph's calibrated ``logit`` output, the unit the worker scores in."""
    session = _session(proto)

    def logit_of(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return np.concatenate([session.run([LOGIT_OUTPUT], {INPUT_NAME: x[i:i + BATCH]})[0].reshape(-1)
                               for i in range(0, len(x), BATCH)])

    return faithfulness.null_cutoff(logit_of, _load(records, size), (int(grid[0]), int(grid[1])),
                                    reference=reference)


def pooled_features(model: keras.Model, feature_layer: str, records: list[Record], size: int) -> np.ndarray[Any, Any]:
    """Spatially averaged feature maps [N, C] of the records (inference mode)."""
    features = feature_model(model, feature_layer)
    out = [np.asarray(features(_load(records[i:i + BATCH], size), training=False), np.float64).mean(axis=(1, 2))
           for i in range(0, len(records), BATCH)]
    return np.concatenate(out)


def heatmap_scale(cams: np.ndarray[Any, Any], positive: np.ndarray[Any, Any], percentile: float) -> tuple[float, str]:
    """The raw Grad-CAM value drawn as full colour: a high percentile of the peak of the
    maps of validation images called positive; of all validation maps when none is."""
    peaks = cams.reshape(len(cams), -1).max(axis=1)
    basis = "validation images called positive"
    if not positive.any():
        basis = "all validation images (none called positive)"
    else:
        peaks = peaks[positive]
    value = float(np.percentile(peaks, percentile))
    if not value > 0:  # every map is zero: any positive scale draws them as they are (blank)
        return 1.0, basis + "; every peak was 0, scale set to 1"
    return value, f"{percentile:g}th percentile of the peak raw Grad-CAM over {basis} (n={len(peaks)})"


def read_calibration(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """The temperature ``evaluate`` fitted, or T = 1 marked uncalibrated."""
    cal = (metrics or {}).get("calibration")
    if not cal:
        return {"method": "none", "temperature": 1.0, "note": "uncalibrated"}
    t = float(cal.get("temperature", 1.0))
    if not (np.isfinite(t) and t > 0):
        raise TrainerError(f"metrics.json: calibration temperature must be > 0. Received: temperature={t}")
    return {**cal, "temperature": t}


def check_calibration_weights(metrics: dict[str, Any] | None, sha: str, run: Path) -> None:
    """Refuse a calibration (temperature, threshold, prevalence) that ``evaluate`` fitted for other
    weights: after a resumed or repeated fit, metrics.json may describe the model before it.

    Raises:
        TrainerError: metrics.json holds a calibration without the weights' sha256 or with another one.
    """
    if not metrics or not metrics.get("calibration"):
        return
    recorded = metrics.get("weights_sha256")
    if recorded != sha:
        said = f"weights sha256 {recorded[:12]}..." if recorded else "no weights sha256 (an older evaluate)"
        raise TrainerError(f"{run}/metrics.json holds a calibration for other weights ({said}; the run's model is "
                           f"{sha[:12]}...): run 'cxr-train evaluate --run {run}' again; no model written")


def both_classes(records: list[Record], n: int) -> list[Record]:
    """Up to ``n`` records, alternating the classes, so a check sees both decisions."""
    by_class = [[r for r in records if r.label == k] for k in (1, 0)]
    mixed = [r for pair in zip(*by_class, strict=False) for r in pair]
    rest = [r for r in records if r not in mixed]
    return (mixed + rest)[:n]


def sample_images(info: dict[str, Any], size: int, n: int = 8, seed: int = 0) -> np.ndarray[Any, Any]:
    """Up to ``n`` real images of both classes from the run's test split, else seeded noise.

    Raises:
        DataError: a test image cannot be read (named); only a run whose data folder is
            not on this machine is verified on noise.
    """
    try:
        records = both_classes(load_dataset(Path(info["data"])).splits["test"], n)
    except DataError:
        records = []
    images = [load_image(r.path, size) for r in records]
    rng = np.random.default_rng(seed)
    while len(images) < 2:
        images.append(rng.random((size, size, 1), dtype=np.float32))
    return np.stack(images).astype(np.float32)


def model_card_metadata(metrics: dict[str, Any] | None) -> dict[str, str]:
    """Prevalence, operating point and model card summary from ``evaluate``'s metrics.json (none
    for a threshold passed by hand: the worker then falls back to the training split's prevalence)."""
    if not metrics or "prevalence" not in metrics:
        return {}
    compact: dict[str, Any] = {"separators": (",", ":")}
    out = {Meta.PREVALENCE: f"{float(metrics['prevalence']['value']):.6g}"}
    if "operating_point" in metrics:
        out[Meta.OPERATING_POINT] = json.dumps(metrics["operating_point"], **compact)
    if "model_card" in metrics:
        out[Meta.MODEL_CARD] = json.dumps(metrics["model_card"], **compact)
    return out


def _update_metrics(run: Path, key: str, value: Any) -> None:
    """Record ``value`` under ``key`` in the run's metrics.json (created when absent)."""
    path = run / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    metrics[key] = value
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(tmp, path)


def _write_model(proto: Any, out: Path) -> None:
    """Serialise ``proto`` to ``out`` through a temporary file in the same folder (atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".onnx.tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(proto.SerializeToString())
    os.replace(tmp, out)


def calibration_records(val: list[Record], seed: int) -> list[Record]:
    """The validation records that calibrate an int8 model: all, or a seeded
    :data:`CALIBRATION_MAX` of them."""
    if len(val) <= CALIBRATION_MAX:
        return list(val)
    pick = np.random.default_rng(seed).choice(len(val), CALIBRATION_MAX, replace=False)
    return [val[i] for i in sorted(pick)]


def _verify_reduced(fp32_path: Path, reduced: Path, images: np.ndarray[Any, Any], test: list[Record],
                    ref: dict[str, np.ndarray[Any, Any]], meta: dict[str, str], val_images: np.ndarray[Any, Any],
                    false_gate_rate: float, ood_ref: dict[str, np.ndarray[Any, Any]],
                    ood_images: np.ndarray[Any, Any]) -> dict[str, Any]:
    """One reduced model's numbers against fp32: its own gate threshold (the split-conformal
    quantile of ITS validation scores, as export chose fp32's), the test split, and the
    out-of-distribution probes' verdicts under each model's own threshold."""
    own_threshold, _ = conformal_threshold(run_model(reduced, val_images)[OOD_SCORE_OUTPUT], false_gate_rate)
    return compare(ref, run_model(reduced, images), np.array([r.label for r in test]),
                   threshold=float(meta[Meta.THRESHOLD]), ood_threshold=float(meta[Meta.OOD_THRESHOLD]),
                   heatmap_scale=float(meta[Meta.HEATMAP_SCALE]), got_ood_threshold=own_threshold,
                   ood_probes=(ood_ref, run_model(reduced, ood_images)))


def reduce_and_verify(fp32_path: Path, precision: str, calibrate: list[Record], test: list[Record], workdir: Path,
                      fp32_on_test: dict[str, np.ndarray[Any, Any]] | None = None, *,
                      validation: list[Record] | None = None,
                      false_gate_rate: float = 0.01) -> tuple[Any, dict[str, Any]]:
    """The exported fp32 model at ``fp32_path`` reduced to ``precision`` and compared with it on
    the ``test`` records (its outputs there may be passed in); returns the reduced model, with
    ``precision_check``, its own ``ood_threshold`` (chosen on the ``validation`` records, default
    ``calibrate``, at ``false_gate_rate``) and the worker's load-time ``probes`` in its
    metadata, and the numbers. Nothing is refused here.

    int8 tries :func:`trainer.quantize.int8_variants` fastest first on this CPU and keeps the
    first that passes (or, when none does, the last tried, which export then refuses).
    """
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(fp32_path), load_external_data=False).metadata_props}
    size = int(meta[Meta.INPUT_SIZE])
    images = _load(test, size)
    ref = run_model(fp32_path, images) if fp32_on_test is None else {
        PROBABILITY_OUTPUT: fp32_on_test[PROBABILITY_OUTPUT].reshape(-1), GRADCAM_OUTPUT: fp32_on_test[GRADCAM_OUTPUT],
        OOD_SCORE_OUTPUT: fp32_on_test[OOD_SCORE_OUTPUT].reshape(-1)}
    val_images = _load(validation if validation is not None else calibrate, size)
    ood_images = np.stack(list(ood_probe_images(size, images[0]).values()))
    ood_ref = run_model(fp32_path, ood_images)
    probes = probe_record(fp32_path, _load(both_classes(test, PROBE_IMAGES), size))
    heat = float(meta[Meta.HEATMAP_SCALE])
    tried: list[dict[str, Any]] = []
    for variant in int8_variants() if precision == "int8" else (None,):
        reduced = workdir / f"{precision}-{variant or 'fp16'}.onnx"
        if variant is None:
            convert_fp16(fp32_path, reduced)
        else:
            quantize_int8(fp32_path, _load(calibrate, size), reduced, variant=variant)
        numbers = _verify_reduced(fp32_path, reduced, images, test, ref, meta, val_images, false_gate_rate,
                                  ood_ref, ood_images)
        on_probes = run_model(reduced, probes.inputs)
        numbers["probes"] = probes.differences(on_probes[PROBABILITY_OUTPUT], on_probes[GRADCAM_OUTPUT],
                                               on_probes[OOD_SCORE_OUTPUT], heat)
        bad = failures(numbers) + probes.failures(numbers["probes"])
        if variant is not None:
            tried.append({"variant": variant, "passed": not bad, "failures": bad})
        if not bad:
            break
    check = {"precision": precision, "against": "fp32 model", "split": "test", **numbers,
             **({"int8_variant": variant, "int8_tried": tried, "cpu_vnni": has_vnni()} if variant else {}),
             "limits": {k: f"{'<=' if kind == 'max' else '>='} {bound:g}" for k, (kind, bound) in LIMITS.items()},
             "passed": not bad}
    model = onnx.load(str(reduced))
    ood = json.loads(meta.get(Meta.OOD_METHOD, "{}"))
    ood.update({"threshold": numbers["ood_threshold"], "fp32_threshold": numbers["ood_threshold_fp32"],
                "threshold_of": f"the {precision} model's own validation scores"})
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        Meta.OOD_THRESHOLD: f"{numbers['ood_threshold']:.6g}",
                                        Meta.OOD_METHOD: json.dumps(ood, separators=(",", ":")),
                                        Meta.PROBES: probes.to_json(),
                                        Meta.PRECISION_CHECK: json.dumps(check, separators=(",", ":"))})
    return model, check


def _accept_reduced(run: Path, model: Any, check: dict[str, Any], out: Path) -> None:
    """Record the numbers in metrics.json whether they pass or not (a refusal names them, like
    the sanity check), then refuse past the limits or write ``out``."""
    _update_metrics(run, "precision_check", check)
    check_limits(check, check["precision"])
    _write_model(model, out)


def _false_gate_rate(info: dict[str, Any]) -> float:
    """The run's configured false-gate rate (the default where its config.json predates it)."""
    from trainer.config import ExportSection

    given = info.get("config", {}).get("export", {}).get("ood_false_gate_rate")
    return float(given) if given is not None else float(ExportSection().ood_false_gate_rate)


def export_reduced(run: Path, fp32_model: Path, out: Path, precision: str) -> dict[str, Any]:
    """A model ``export`` already wrote (fp32) reduced to ``precision``, verified on the run's
    test split (int8 calibrated on its validation split) and written to ``out``: what
    ``export --precision`` does after the fp32 steps, without repeating them.

    Raises:
        ExportError: a limit of :data:`trainer.quantize.LIMITS` is missed (nothing written).
    """
    if precision not in PRECISIONS or precision == "fp32":
        raise TrainerError(f"precision must be int8 or fp16. Received: precision={precision!r}")
    config = run / "config.json"
    if not config.is_file():
        raise TrainerError(f"{run} holds no run: run 'cxr-train fit --out {run}' first")
    if not Path(fp32_model).is_file():
        raise TrainerError(f"model file not found: {fp32_model}")
    import onnx

    try:
        source = onnx.load(str(fp32_model), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and kin: not an ONNX file
        raise TrainerError(f"{fp32_model} is not an ONNX model ({type(exc).__name__})") from None
    meta = {p.key: p.value for p in source.metadata_props}
    try:
        gated = ModelInfo.from_metadata(meta, str(fp32_model)).has_ood_gate
    except ContractError as exc:
        raise TrainerError(f"not a model 'cxr-train export' wrote: {exc}") from None
    if not gated:
        raise TrainerError(f"{fp32_model} has no out-of-distribution gate (contract version 1): export the run "
                           "again, then reduce that model")
    given = meta.get(Meta.PRECISION, "fp32")
    if given != "fp32":
        raise TrainerError(f"{fp32_model} is already {given}: reduce the fp32 model export wrote")
    # Its numbers are measured on this run's test split: it must be this run's model, or the
    # check would score a model on images it may have been trained on.
    keras_model, _, _ = load_run(run)
    if meta.get(Meta.WEIGHTS_SHA256) != weights_sha256(keras_model):
        raise TrainerError(f"{fp32_model} was not exported from {run} (its weights differ from the run's "
                           "model): reduce the model this run's export wrote")
    del keras_model
    info = json.loads(config.read_text())
    dataset = load_dataset(Path(info["data"]))
    val, test = require_split(dataset, "val"), require_split(dataset, "test")
    seed = int(info.get("config", {}).get("train", {}).get("seed", 0))
    with tempfile.TemporaryDirectory() as tmp:
        model, check = reduce_and_verify(Path(fp32_model), precision, calibration_records(val, seed), test, Path(tmp),
                                         validation=val, false_gate_rate=_false_gate_rate(info))
    _accept_reduced(run, model, check, out)
    return {"model": str(out), "precision": precision, "precision_check": check}


def export(run: Path, out: Path, *, threshold: float | None = None, version: str | None = None,
           allow_insensitive_saliency: bool = False, precision: str = "fp32") -> dict[str, Any]:
    """Fit the gate, export, verify, sanity-check, attach metadata, reduce the precision if
    asked and verify that against fp32, write ``out`` atomically."""
    import onnx

    if precision not in PRECISIONS:
        raise TrainerError(f"precision must be one of {', '.join(PRECISIONS)}. Received: precision={precision!r}")
    model, cfg, info = load_run(run)
    metrics_path = run / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    if threshold is None:
        if metrics is None or "threshold" not in metrics:
            raise TrainerError(f"{run} has no threshold in metrics.json: run 'cxr-train evaluate --run {run}' "
                               "or pass --threshold")
        threshold = float(metrics["threshold"])
    if not 0.0 <= threshold <= 1.0:
        raise TrainerError(f"threshold must be in [0, 1]. Received: threshold={threshold}")
    calibration = read_calibration(metrics)
    sha = weights_sha256(model)
    check_calibration_weights(metrics, sha, run)
    temperature = calibration["temperature"]
    size, layer, ex = cfg.model.image_size, cfg.model.feature_layer, cfg.export
    dataset = load_dataset(Path(info["data"]))
    train, val = require_split(dataset, "train"), require_split(dataset, "val")
    timings: dict[str, float] = {}

    samples = sample_images(info, size)  # before the slow steps: a bad image fails fast
    t0 = time.perf_counter()
    gate = fit_gate(pooled_features(model, layer, train, size), np.array([r.label for r in train]))
    timings["ood_fit_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    full = to_onnx(model, layer, size, gate, temperature)
    timings["convert_s"] = time.perf_counter() - t0
    check = verify(full, model, layer, samples, gate, temperature)
    proto = prune_to_contract(full)

    t0 = time.perf_counter()
    on_val = run_onnx(proto, val, size)
    ood_threshold, bound = conformal_threshold(on_val[OOD_SCORE_OUTPUT], ex.ood_false_gate_rate)
    test = dataset.splits.get("test") or []
    if precision != "fp32" and not test:
        raise TrainerError(f"--precision {precision} is verified against fp32 on the test split, and "
                           f"{info['data']} has none")
    on_test = run_onnx(proto, test, size) if test else None
    timings["ood_threshold_s"] = time.perf_counter() - t0
    ood = {
        "method": METHOD, "feature_layer": layer, "pooling": "spatial mean",
        "covariance": "shared across classes, Ledoit-Wolf shrinkage", "shrinkage": round(gate.shrinkage, 6),
        "fitted_on": "train", "n_train": gate.n_train,
        "threshold": ood_threshold, "threshold_rule": f"split-conformal quantile of validation scores at "
        f"false-gate rate {ex.ood_false_gate_rate:g}", "n_val": len(val), "false_gate_bound": round(bound, 6),
        "val_false_gate_rate": float(np.mean(on_val[OOD_SCORE_OUTPUT] > ood_threshold)),
        "test_false_gate_rate": (float(np.mean(on_test[OOD_SCORE_OUTPUT] > ood_threshold))
                                 if on_test is not None else None),
    }
    scale, scale_basis = heatmap_scale(on_val[GRADCAM_OUTPUT], on_val[PROBABILITY_OUTPUT].ravel() >= threshold,
                                       ex.heatmap_percentile)

    t0 = time.perf_counter()
    sanity_records = both_classes(val, ex.sanity_images)
    sanity = sanity_check(model, layer, _load(sanity_records, size), ex.sanity_max_correlation,
                          seed=cfg.train.seed)
    timings["sanity_check_s"] = time.perf_counter() - t0
    failed = sanity["verdict"] == "failed"
    sanity["allowed_by_flag"] = bool(allow_insensitive_saliency and failed)
    _update_metrics(run, "sanity_check", sanity)
    _update_metrics(run, "ood", ood)
    if failed and not allow_insensitive_saliency:
        bad = next(st for st in sanity["stages"] if st["verdict"] == "failed")
        raise ExportError(
            f"saliency sanity check failed: with the weights up to {bad['stage']} re-initialised, the pre-ReLU "
            f"Grad-CAM still correlates |rho| {bad['abs_spearman_mean']:.3f} (limit {sanity['limit']}) with the "
            "trained model's maps, so the maps do not show what the model learned; no model written "
            "(--allow-insensitive-saliency writes it anyway, with the result in its metadata)"
        )

    # The "above chance" cut-off of heatmap faithfulness: knowledge-free maps scored on the
    # validation images by the exported graph's calibrated logit, the worker's unit.
    t0 = time.perf_counter()
    reference = faithfulness_reference(run, dataset, size, cfg.train.seed)
    faith_null = faithfulness_null(proto, val, size, tuple(on_val[GRADCAM_OUTPUT].shape[1:]), reference)
    timings["faithfulness_null_s"] = time.perf_counter() - t0
    _update_metrics(run, "faithfulness_null", faith_null)

    summary_path = run / "data_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    created = info.get("created", datetime.now(UTC).isoformat())
    compact = {"separators": (",", ":")}
    meta = {
        Meta.CONTRACT_VERSION: str(CONTRACT_VERSION),
        Meta.NAME: cfg.model.name,
        Meta.VERSION: version or f"{__version__}+{created[:19].replace('-', '').replace(':', '')}",
        Meta.INPUT_SIZE: str(size),
        Meta.LABELS: json.dumps(list(LABELS)),
        Meta.THRESHOLD: f"{threshold:.6f}",
        Meta.FEATURE_LAYER: layer,
        Meta.TRAINING_DATA: json.dumps(summary, **compact),  # type: ignore[arg-type]
        Meta.TEST_METRICS: json.dumps({k: metrics[k] for k in ("split", "n", "metrics", "ci95", "localisation")
                                       if k in metrics} if metrics else {}, **compact),  # type: ignore[arg-type]
        Meta.WEIGHTS_SHA256: sha,
        Meta.INTENDED_USE: SYNTHETIC_USE if summary.get("synthetic") else RESEARCH_USE,
        Meta.GRADCAM: "ReLU(sum_k alpha_k A_k), alpha_k = mean_ij d(logit)/dA_ijk of the uncalibrated logit; "
                      "raw, not normalised",
        Meta.OOD_THRESHOLD: f"{ood_threshold:.6g}",
        Meta.OOD_METHOD: json.dumps(ood, **compact),  # type: ignore[arg-type]
        Meta.CALIBRATION: json.dumps(calibration, **compact),  # type: ignore[arg-type]
        Meta.HEATMAP_SCALE: f"{scale:.6g}",
        # The worker's drift reference: what the validation split's answers looked like.
        Meta.DRIFT_REFERENCE: reference_of(on_val[PROBABILITY_OUTPUT], on_val[OOD_SCORE_OUTPUT]).to_json(),
        Meta.SANITY_CHECK: json.dumps({k: v for k, v in sanity.items() if k != "per_image"},
                                      **compact),  # type: ignore[arg-type]
        Meta.FAITHFULNESS_CUTOFF: f"{faith_null['cutoff']:.6g}",
        Meta.FAITHFULNESS_NULL: json.dumps(faith_null, **compact),  # type: ignore[arg-type]
        Meta.FAITHFULNESS_REFERENCE: faithfulness.encode_reference(reference),
        Meta.PRECISION: "fp32",  # the reduced model's own precision replaces it
        Meta.EXPORTED: datetime.now(UTC).isoformat(timespec="seconds"),
        Meta.TENSORFLOW: tf.__version__,
        Meta.GIT_COMMIT: info.get("versions", {}).get("git_commit", "unknown"),
        **model_card_metadata(metrics),
        "heatmap_scale_basis": scale_basis,
        "batchnorm": resolved_bn(cfg.model),
    }
    onnx.helper.set_model_props(proto, meta)
    proto.doc_string = (f"{cfg.model.name}: pneumonia probability, logit, Grad-CAM at {layer} and an "
                        f"out-of-distribution score. {meta[Meta.INTENDED_USE]}")
    precision_check = None
    if precision == "fp32":
        _write_model(proto, out)
    else:
        assert on_test is not None  # a test split was required above
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            _write_model(proto, Path(tmp) / "fp32.onnx")
            reduced, precision_check = reduce_and_verify(Path(tmp) / "fp32.onnx", precision,
                                                         calibration_records(val, cfg.train.seed), test, Path(tmp),
                                                         on_test, validation=val,
                                                         false_gate_rate=ex.ood_false_gate_rate)
        timings["precision_s"] = time.perf_counter() - t0
        _accept_reduced(run, reduced, precision_check, out)
    kept = (Meta.NAME, Meta.VERSION, Meta.THRESHOLD, Meta.INPUT_SIZE, Meta.OOD_THRESHOLD, Meta.HEATMAP_SCALE)
    return {"model": str(out), "precision": precision, "metadata": {k: meta[k] for k in kept},
            "verification": check, "precision_check": precision_check, "ood": ood,
            "sanity_check": {k: v for k, v in sanity.items() if k != "per_image"},
            "faithfulness_null": faith_null,
            "seconds": {k: round(v, 2) for k, v in timings.items()}}
