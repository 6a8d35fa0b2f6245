"""Preparing a data folder from a real label file (NIH ChestX-ray14 here, RSNA through
:mod:`trainer.rsna`), reading one back (:func:`load_dataset`) and its expert boxes.

The folder's layout and the records both sources write are :mod:`trainer.records`: a data folder
holds ``train.csv``, ``val.csv``, ``test.csv``, ``summary.json``, optionally ``boxes.csv`` in the
NIH ``BBox_List_2017.csv`` format and ``hard_negatives.csv`` (images of test-split patients with
other findings and no pneumonia, scored by ``evaluate`` as a harder negative set).
"""

from __future__ import annotations

import csv
import os
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainer.errors import DataError
from trainer.records import (
    HARD_NEGATIVES,
    NEGATIVE_FINDING,
    PAPER_PER_CLASS,
    POSITIVE_FINDING,
    SPLITS,
    Box,
    Dataset,
    Record,
    draw_negatives,
    draw_splits,
    open_text,
    split_by_patient,
    summarize,
    write_split_folder,
)
from trainer.rsna import is_rsna_labels, prepare_rsna, read_rsna_boxes

#: Box labels that mark the positive class: NIH's "Pneumonia", RSNA's "Lung Opacity".
BOX_FINDINGS = (POSITIVE_FINDING, "Lung Opacity")


def read_boxes(path: Path, findings: Sequence[str] = BOX_FINDINGS) -> dict[str, list[Box]]:
    """Read NIH ``BBox_List_2017.csv`` (or ours) or RSNA's ``stage_2_train_labels.csv``:
    image ID -> boxes of the positive class."""
    if is_rsna_labels(path):
        return read_rsna_boxes(path)
    boxes: dict[str, list[Box]] = defaultdict(list)
    with open_text(path) as f:
        reader = csv.reader(f)
        next(reader, None)
        for n, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                image_id, label = row[0], row[1]
                x, y, w, h = (float(v) for v in row[2:6])
            except (IndexError, ValueError):
                raise DataError(f"{path}:{n}: not a box row (Image Index, Finding Label, x, y, w, h)") from None
            if label in findings:
                boxes[image_id].append(Box(image_id, label, x, y, w, h))
    return dict(boxes)


def load_dataset(root: Path) -> Dataset:
    """Read a data folder written by ``prepare`` or ``phantoms``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    splits: dict[str, list[Record]] = {}
    for name in SPLITS:
        path = root / f"{name}.csv"
        if not path.is_file():
            raise DataError(f"{path} is missing: run 'cxr-train prepare' or 'cxr-train phantoms' first")
        splits[name] = _read_records(root, path)
    boxes = read_boxes(root / "boxes.csv") if (root / "boxes.csv").is_file() else {}
    hard = root / f"{HARD_NEGATIVES}.csv"
    return Dataset(root, splits, boxes, _read_records(root, hard) if hard.is_file() else [])


def _read_records(root: Path, path: Path) -> list[Record]:
    """The records of one split CSV, paths resolved against the data folder."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"path", "label", "patient_id"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        records = []
        for n, row in enumerate(reader, start=2):
            if row["label"] not in ("0", "1"):
                raise DataError(f"{path}:{n}: label must be 0 or 1, received {row['label']!r}")
            p = row["path"]
            records.append(
                Record(
                    path=p if os.path.isabs(p) else str(root / p),
                    label=int(row["label"]),
                    patient_id=row["patient_id"],
                    view=row.get("view", ""),
                    image_id=row.get("image_id") or Path(p).name,
                    age=row.get("age", ""),
                    sex=row.get("sex", ""),
                    mask=(str(root / row["mask"]) if row.get("mask") else ""),
                    findings=row.get("findings") or "",
                )
            )
    return records


def require_split(ds: Dataset, name: str, *, both_classes: bool = True) -> list[Record]:
    """The records of one split, or a clear error when it is empty or one-class."""
    records = ds.splits.get(name) or []
    if not records:
        raise DataError(f"split {name!r} in {ds.root} is empty")
    if both_classes and len({r.label for r in records}) < 2:
        raise DataError(f"split {name!r} in {ds.root} holds only one class: metrics need both")
    return records


def _index_images(images: Path) -> dict[str, Path]:
    """Image file name -> path, searching the release's nested images_NNN/images folders."""
    index: dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(images):
        for name in files:
            if name.lower().endswith(".png"):
                index.setdefault(name, Path(dirpath) / name)
    return index


def prepare(
    labels: Path,
    images: Path,
    out: Path,
    *,
    neg_ratio: float = 1.0,
    views: Sequence[str] = ("PA", "AP"),
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    match_view: bool = False,
) -> dict[str, Any]:
    """Build patient-level splits of Pneumonia vs No Finding from the NIH label file, and a
    hard-negative set (other findings, no pneumonia) from the test split's patients.

    Args:
        match_view: draw negatives with the positives' view mix (AP/PA) in each split, so
            that the view, which alone scores AUC ~0.63 on this task, tells nothing.

    Returns the summary written to ``summary.json``.
    """
    if is_rsna_labels(labels):
        return prepare_rsna(labels, images, out, neg_ratio=neg_ratio, views=views, seed=seed,
                            fractions=fractions, match_view=match_view)
    if neg_ratio <= 0:
        raise DataError(f"--neg-ratio must be positive, received {neg_ratio}")
    if not images.is_dir():
        raise DataError(f"images folder not found: {images}")
    wanted_views = {v.strip().upper() for v in views if v.strip()}
    positives: list[Record] = []
    negatives: list[Record] = []
    others: list[Record] = []  # other findings, no pneumonia: the hard negatives' pool
    required = {"Image Index", "Finding Labels", "Patient ID", "View Position"}
    with open_text(labels) as f:
        reader = csv.DictReader(f)
        missing = required - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{labels}: not a ChestX-ray14 label file (missing {', '.join(sorted(missing))})")
        for row in reader:
            view = row["View Position"].strip().upper()
            if view not in wanted_views:
                continue
            findings = row["Finding Labels"].split("|")
            label = 1 if POSITIVE_FINDING in findings else 0
            record = Record(
                path=row["Image Index"],
                label=label,
                patient_id=row["Patient ID"],
                view=view,
                image_id=row["Image Index"],
                age=row.get("Patient Age", ""),
                sex=row.get("Patient Gender", ""),
                findings=row["Finding Labels"],
            )
            (positives if label else negatives if findings == [NEGATIVE_FINDING] else others).append(record)
    if not positives:
        raise DataError(f"{labels}: no {POSITIVE_FINDING} images in views {sorted(wanted_views)}")

    patients: dict[str, bool] = {}
    for r in negatives:
        patients.setdefault(r.patient_id, False)
    for r in positives:
        patients[r.patient_id] = True
    assignment = split_by_patient(patients, fractions, seed)
    # Patients with only other findings get a split too (it does not move anyone above), so
    # that hard negatives come only from patients the model never trained on.
    assignment.update(split_by_patient({r.patient_id: False for r in others if r.patient_id not in assignment},
                                       fractions, seed + 2))

    rng = random.Random(seed + 1)
    splits = draw_splits(positives, negatives, assignment, neg_ratio, rng, match_view=match_view)
    test_pos = [r for r in splits["test"] if r.label == 1]
    hard = draw_negatives(test_pos, [r for r in others if assignment[r.patient_id] == "test"], neg_ratio,
                          random.Random(seed + 3), match_view=match_view)

    index = _index_images(images)
    missing_files = [r.image_id for r in [*hard, *(r for name in SPLITS for r in splits[name])]
                     if r.image_id not in index]
    if missing_files:
        raise DataError(
            f"{len(missing_files)} selected image(s) are not under {images}, e.g. "
            f"{', '.join(missing_files[:5])}: download the full release (see docs/training.md) "
            "or check --images; nothing was written"
        )
    for r in [*hard, *(r for name in SPLITS for r in splits[name])]:
        r.path = str(index[r.image_id].resolve())

    n_pos_patients = len({r.patient_id for r in positives})
    notes = [
        f"{len(positives)} {POSITIVE_FINDING} images from {n_pos_patients} patients in views "
        f"{','.join(sorted(wanted_views))}; the paper's {PAPER_PER_CLASS} per class cannot be "
        f"drawn from this release, so all {len(positives)} are used with {neg_ratio:g} "
        f"{NEGATIVE_FINDING} image(s) per positive.",
        f"Split {'/'.join(f'{100 * f:.3g}' for f in fractions)} (train/val/test) by patient, "
        "stratified by whether a patient has a positive image.",
        f"{len(hard)} hard negatives (other findings, no {POSITIVE_FINDING}) from test-split patients "
        "in hard_negatives.csv: evaluate scores the model against them as well.",
    ]
    if match_view:
        notes.append("Negatives drawn with the positives' view mix in each split (--match-view).")
    summary = summarize(splits, notes)
    summary.update({"source": str(labels), "seed": seed, "neg_ratio": neg_ratio, "match_view": match_view,
                    "synthetic": False, "positive_class": f"NIH Finding Labels contains {POSITIVE_FINDING!r}",
                    HARD_NEGATIVES: summarize({"test": hard})["splits"]["test"]})
    write_split_folder(out, splits, summary, hard_negatives=hard)
    return summary


