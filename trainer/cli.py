"""``cxr-train``: prepare | phantoms | fit | evaluate | export | recalibrate."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError, TrainerError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxr-train", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("prepare", help="patient-level splits from the NIH ChestX-ray14 or RSNA label file, "
                       "with readers' feedback merged in")
    s.add_argument("--labels", type=Path,
                   help="NIH Data_Entry_2017.csv or RSNA stage_2_train_labels.csv (or .csv.gz); told apart by header")
    s.add_argument("--images", type=Path,
                   help="folder holding the release's PNGs (NIH) or <patientId>.dcm files (RSNA), any depth")
    s.add_argument("--feedback", type=Path, action="append", default=[], metavar="DIR",
                   help="a 'cxr-worker feedback export' folder to merge (repeatable; rules in docs/training.md)")
    s.add_argument("--base", type=Path, metavar="DATA",
                   help="with --feedback: merge into this data folder (from prepare or phantoms) "
                        "instead of one built from --labels")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--neg-ratio", type=float, default=1.0, help="No Finding images per Pneumonia image")
    s.add_argument("--views", default="PA,AP", help="comma-separated View Position values")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--match-view", action="store_true",
                   help="draw negatives with the positives' AP/PA mix, so the view alone predicts nothing")

    s = sub.add_parser("phantoms", help="synthetic chest phantoms with opacity masks (not patient data)")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--n", type=int, required=True)
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("fit", help="fine-tune ResNet-50; resumes an interrupted run")
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True, help="run folder")
    s.add_argument("--config", default=None,
                   help="TOML file, or a shipped config: train (the default, the paper's recipe) or demo-train")
    s.add_argument("--epochs", type=int)
    s.add_argument("--image-size", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--learning-rate", type=float)
    s.add_argument("--weights", help="imagenet | none | PATH to the notop .h5")

    s = sub.add_parser("evaluate", help="metrics with 95%% CIs, figures, heatmap localisation")
    s.add_argument("--run", type=Path, required=True)
    s.add_argument("--split", default="test", choices=("val", "test"))
    s.add_argument("--boxes", type=Path, default=None,
                   help="expert regions: NIH BBox_List_2017.csv or RSNA stage_2_train_labels.csv")
    s.add_argument("--pointing-tolerance", type=float, default=None,
                   help="pointing-game tolerance as a fraction of the image side (default 15/448, Zhang et al.)")

    s = sub.add_parser("export", help="verified ONNX model: probability, logit, gradcam, ood_score")
    s.add_argument("--run", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--threshold", type=float, default=None, help="default: the one evaluate chose")
    s.add_argument("--model-version", default=None)
    s.add_argument("--allow-insensitive-saliency", action="store_true",
                   help="write the model even if its Grad-CAM fails the saliency sanity check")
    s.add_argument("--precision", default="fp32", choices=("fp32", "int8", "fp16"),
                   help="int8: static quantization for the CPU (calibrated on the validation split); fp16: for "
                        "the CUDA provider. Either is verified against fp32 on the test split and refused "
                        "past the limits (docs/export.md, Reduced precision)")
    s.add_argument("--from-model", type=Path, default=None, metavar="FP32_ONNX",
                   help="with --precision int8|fp16: reduce this model, written by export from --run before, "
                        "instead of repeating the fp32 steps")

    s = sub.add_parser("recalibrate", help="a site's own temperature, prevalence and threshold from its labelled "
                       "images, written as a new model version with the same weights")
    s.add_argument("--model", type=Path, required=True, help="the model export wrote")
    s.add_argument("--out", type=Path, required=True, help="the recalibrated model (report and diagram beside it)")
    s.add_argument("--feedback", type=Path, action="append", default=[], metavar="DIR",
                   help="a 'cxr-worker feedback export' folder (repeatable)")
    s.add_argument("--labels", type=Path, help="CSV with columns image, label (1/0) and optionally patient")
    s.add_argument("--images", type=Path, help="with --labels: the folder the image column is relative to")
    s.add_argument("--prevalence", type=float, default=None,
                   help="the site's share of pneumonia when its labelled images are not a random sample of its "
                        "caseload (default: their own share)")
    s.add_argument("--target-sensitivity", type=float, default=None,
                   help="choose the threshold for this sensitivity on the labelled images (default: keep the "
                        "model's operating point)")
    s.add_argument("--model-version", default=None, help="default: the model's version + site<UTC time>")
    return p


def _recalibrate(args: argparse.Namespace) -> dict[str, Any]:
    from trainer import recalibrate as r

    if bool(args.feedback) == (args.labels is not None):
        raise ConfigError("pass --feedback DIR or --labels CSV --images DIR (one of them)")
    if (args.labels is None) != (args.images is None):
        raise ConfigError("--labels and --images go together")
    images = r.from_feedback(args.feedback) if args.feedback else r.from_labels_csv(args.labels, args.images)
    return r.recalibrate(args.model, args.out, images, prevalence=args.prevalence,
                         target_sensitivity=args.target_sensitivity, version=args.model_version)


def _prepare(args: argparse.Namespace) -> dict[str, Any]:
    """prepare: a set from the label file, or a base folder, with any feedback merged in."""
    from trainer.data import load_dataset, prepare

    if args.base is not None and args.labels is not None:
        raise ConfigError("--base and --labels both name the set to merge into: pass one")
    if args.base is not None and not args.feedback:
        raise ConfigError("--base is only for merging: pass --feedback DIR too")
    if args.labels is None and args.base is None and not args.feedback:
        raise ConfigError("pass --labels and --images (and/or --feedback DIR)")
    if (args.labels is None) != (args.images is None):
        raise ConfigError("--labels and --images go together")
    if args.feedback:
        from trainer.feedback import read_exports

        read_exports(args.feedback)  # a malformed export is named before anything is written
    summary: dict[str, Any] = {}
    base = None
    if args.labels is not None:
        summary = prepare(args.labels, args.images, args.out, neg_ratio=args.neg_ratio,
                          views=args.views.split(","), seed=args.seed, match_view=args.match_view)
        for note in summary["notes"]:
            print(note)
        base = load_dataset(args.out)
    elif args.base is not None:
        base = load_dataset(args.base)
    if args.feedback:
        from trainer.feedback import merge_feedback

        summary, counts = merge_feedback(base, args.feedback, args.out, seed=args.seed)
        print(counts.line())
    return summary


def _run(args: argparse.Namespace) -> dict[str, Any]:
    if args.command == "prepare":
        summary = _prepare(args)
        return {k: {"images": v["images"], "patients": v["patients"]} for k, v in summary["splits"].items()}
    if args.command == "recalibrate":
        return _recalibrate(args)
    if args.command == "phantoms":
        from trainer.phantoms import write_phantoms

        summary = write_phantoms(args.out, args.n, size=args.size, seed=args.seed)
        return {k: v["images"] for k, v in summary["splits"].items()}

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.command == "fit":
        from trainer.config import load_config

        cfg = load_config(args.config, {
            "model": {"image_size": args.image_size, "weights": args.weights},
            "train": {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.learning_rate},
        })
        from trainer.data import load_dataset

        load_dataset(args.data)  # a missing data folder or split file is named before TensorFlow loads
        from trainer.fit import fit

        return fit(args.data, args.out, cfg)
    if args.command == "evaluate":
        from trainer.evaluate import evaluate
        from trainer.localise import POINTING_TOLERANCE

        tolerance = POINTING_TOLERANCE if args.pointing_tolerance is None else args.pointing_tolerance
        r = evaluate(args.run, args.split, args.boxes, pointing_tolerance=tolerance)
        loc = {k: v for k, v in r["localisation"].items() if k != "methods"}
        return {"threshold": r["threshold"], "calibration": r["calibration"], "metrics": r["metrics"],
                "ci95": r["ci95"], "calibration_quality": r["calibration_quality"],
                "faithfulness": r["faithfulness"], "localisation": loc, "prevalence": r["prevalence"]["value"],
                "gate": {k: v for k, v in r["gate"].items() if k in ("split", "hard_negatives")},
                "model_card": r["model_card"]}
    from trainer.export import export, export_reduced

    if args.from_model is not None:
        return export_reduced(args.run, args.from_model, args.out, args.precision)
    return export(args.run, args.out, threshold=args.threshold, version=args.model_version,
                  allow_insensitive_saliency=args.allow_insensitive_saliency, precision=args.precision)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = _run(args)
    except TrainerError as exc:
        print(f"cxr-train {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cxr-train {args.command}: interrupted (a fit resumes from its last checkpoint)", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
