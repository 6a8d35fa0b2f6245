"""The records and split files every data source writes: what ``prepare`` (NIH, RSNA) and
``phantoms`` share, so that no data source imports another.

A data folder holds ``train.csv``, ``val.csv``, ``test.csv`` (columns :data:`SPLIT_COLUMNS`),
``summary.json``, optionally ``boxes.csv`` and ``hard_negatives.csv``; splits are by patient.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import DataError

SPLITS = ("train", "val", "test")
SPLIT_COLUMNS = ("path", "label", "patient_id", "view", "image_id", "age", "sex", "mask", "findings")
HARD_NEGATIVES = "hard_negatives"
POSITIVE_FINDING = "Pneumonia"
NEGATIVE_FINDING = "No Finding"
#: Number of Pneumonia images in the ChestX-ray14 release the paper drew "5,000 per class" from.
PAPER_PER_CLASS = 5000


@dataclass
class Record:
    """One image of a split."""

    path: str
    label: int
    patient_id: str
    view: str
    image_id: str
    age: str = ""
    sex: str = ""
    mask: str = ""
    #: The label file's findings, "|"-separated (NIH "Finding Labels"); "" when unknown.
    findings: str = ""

    def row(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in SPLIT_COLUMNS}


@dataclass
class Box:
    """An expert region in NIH BBox_List format (pixels of the stored image)."""

    image_id: str
    finding: str
    x: float
    y: float
    w: float
    h: float


@dataclass
class Dataset:
    """The three splits of a data folder, with paths resolved."""

    root: Path
    splits: dict[str, list[Record]]
    boxes: dict[str, list[Box]] = field(default_factory=dict)
    #: Test-split patients' images with other findings and no pneumonia (may be empty).
    hard_negatives: list[Record] = field(default_factory=list)


def open_text(path: Path) -> io.TextIOBase:
    """Open a CSV that may be gzip-compressed (as the NIH files are shipped here)."""
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")  # noqa: SIM115


def split_by_patient(
    patients: dict[str, bool], fractions: Sequence[float], seed: int
) -> dict[str, str]:
    """Assign each patient to a split, stratified by whether they have a positive.

    Args:
        patients: patient ID -> has at least one positive image.
        fractions: train, val, test fractions (sum to 1).
        seed: makes the split reproducible.

    Returns:
        patient ID -> split name. No patient is in two splits by construction.
    """
    rng = random.Random(seed)
    assignment: dict[str, str] = {}
    for stratum in (True, False):
        group = sorted(p for p, pos in patients.items() if pos is stratum)
        rng.shuffle(group)
        n = len(group)
        n_train = round(n * fractions[0])
        n_val = round(n * fractions[1])
        for i, pid in enumerate(group):
            assignment[pid] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
    return assignment


def summarize(splits: dict[str, list[Record]], notes: Iterable[str] = ()) -> dict[str, Any]:
    """Images and patients per split and class, views, and age and sex spread."""
    out: dict[str, Any] = {"splits": {}, "notes": list(notes)}
    for name, records in splits.items():
        by_view = {v: dict(Counter(str(r.label) for r in records if r.view == v))
                   for v in sorted({r.view for r in records})}
        ages = [float(r.age) for r in records if r.age.replace(".", "", 1).isdigit()]
        out["splits"][name] = {
            "images": len(records),
            "patients": len({r.patient_id for r in records}),
            "by_class": {
                str(c): {
                    "images": sum(r.label == c for r in records),
                    "patients": len({r.patient_id for r in records if r.label == c}),
                }
                for c in (0, 1)
            },
            "views": dict(Counter(r.view for r in records)),
            "views_by_class": by_view,
            "sex": dict(Counter(r.sex for r in records if r.sex)),
            "age": (
                {
                    "mean": round(statistics.fmean(ages), 1),
                    "sd": round(statistics.pstdev(ages), 1),
                    "quartiles": [round(q, 1) for q in statistics.quantiles(ages, n=4)],
                }
                if len(ages) >= 2
                else {}
            ),
        }
    return out


def write_split_folder(
    out: Path,
    splits: dict[str, list[Record]],
    summary: dict[str, Any],
    boxes: Sequence[Box] = (),
    hard_negatives: Sequence[Record] = (),
) -> None:
    """Write the split CSVs, summary.json and (when given) boxes.csv and hard_negatives.csv."""
    out.mkdir(parents=True, exist_ok=True)
    tables = {name: splits[name] for name in SPLITS}
    if hard_negatives:
        tables[HARD_NEGATIVES] = list(hard_negatives)
    for name, records in tables.items():
        with open(out / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=SPLIT_COLUMNS)
            writer.writeheader()
            writer.writerows(r.row() for r in records)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if boxes:
        with open(out / "boxes.csv", "w", newline="", encoding="utf-8") as f:
            box_writer = csv.writer(f)
            box_writer.writerow(["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"])
            for b in boxes:
                box_writer.writerow([b.image_id, b.finding, b.x, b.y, b.w, b.h])




def draw_negatives(positives: Sequence[Record], pool: Sequence[Record], ratio: float, rng: random.Random,
                   *, match_view: bool = False) -> list[Record]:
    """``ratio`` negatives per positive from ``pool``; with ``match_view``, per view."""
    if not match_view:
        return rng.sample(list(pool), min(len(pool), round(len(positives) * ratio)))
    drawn: list[Record] = []
    for view, n_pos in sorted(Counter(r.view for r in positives).items()):
        same = [r for r in pool if r.view == view]
        drawn += rng.sample(same, min(len(same), round(n_pos * ratio)))
    return drawn


def draw_splits(positives: Sequence[Record], negatives: Sequence[Record], assignment: dict[str, str],
                neg_ratio: float, rng: random.Random, *, match_view: bool = False) -> dict[str, list[Record]]:
    """Every positive of each split with its drawn negatives, shuffled."""
    splits: dict[str, list[Record]] = {}
    for name in SPLITS:
        pos = [r for r in positives if assignment[r.patient_id] == name]
        neg_pool = [r for r in negatives if assignment[r.patient_id] == name]
        splits[name] = pos + draw_negatives(pos, neg_pool, neg_ratio, rng, match_view=match_view)
        rng.shuffle(splits[name])
    return splits
