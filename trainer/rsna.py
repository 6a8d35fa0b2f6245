"""The RSNA Pneumonia Detection Challenge (2018) as a data source: labels, boxes, DICOM images.

RSNA and the Society of Thoracic Radiology re-annotated 26,684 ChestX-ray14 images with
radiologists' boxes (Shih et al., Radiology: AI 2019). Its positive class is **Target 1, "Lung
Opacity"**: an opacity suggestive of pneumonia, boxed by a radiologist. That is a different label
from NIH's "Pneumonia", which was mined from report text; a model trained on one and scored on
the other is scored against a different question.

``stage_2_train_labels.csv`` has one row per box (``patientId, x, y, width, height, Target``;
no box when Target is 0). The images are DICOM files named ``<patientId>.dcm`` (CR, 1024 px,
MONOCHROME2, 8-bit). View, sex and age come from each file's header.

In this release ``patientId`` names one image: RSNA removed the link to ChestX-ray14's patients,
so a person with several radiographs appears under several IDs, and a split "by patient" can
only be a split by ``patientId``.
"""

from __future__ import annotations

import csv
import os
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from trainer.errors import DataError
from trainer.records import (
    SPLITS,
    Box,
    Record,
    draw_splits,
    open_text,
    split_by_patient,
    summarize,
    write_split_folder,
)

RSNA_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
#: RSNA's name for Target 1, used as the finding of its records and boxes.
RSNA_POSITIVE = "Lung Opacity"
_HEADER_TAGS = ["ViewPosition", "PatientSex", "PatientAge", "Rows", "Columns"]


def is_rsna_labels(path: Path) -> bool:
    """True when the file's header is RSNA's ``stage_2_train_labels.csv``."""
    with open_text(path) as f:
        header = next(csv.reader(f), [])
    return tuple(h.strip() for h in header) == RSNA_COLUMNS


def read_rsna_labels(path: Path) -> dict[str, tuple[int, list[Box]]]:
    """patientId -> (Target, boxes), in file order."""
    out: dict[str, tuple[int, list[Box]]] = {}
    with open_text(path) as f:
        reader = csv.DictReader(f)
        for n, row in enumerate(reader, start=2):
            pid = row["patientId"].strip()
            try:
                target = int(row["Target"])
                box = (Box(pid, RSNA_POSITIVE, float(row["x"]), float(row["y"]), float(row["width"]),
                           float(row["height"])) if target == 1 else None)
            except (TypeError, ValueError):
                raise DataError(f"{path}:{n}: not an RSNA label row (patientId, x, y, width, height, "
                                "Target; a box when Target is 1)") from None
            if target not in (0, 1) or not pid:
                raise DataError(f"{path}:{n}: Target must be 0 or 1 with a patientId, received {row['Target']!r}")
            previous = out.get(pid)
            if previous is not None and previous[0] != target:
                raise DataError(f"{path}:{n}: patientId {pid} has both Target 0 and 1")
            boxes = previous[1] if previous else []
            if box is not None:
                boxes.append(box)
            out[pid] = (target, boxes)
    return out


def read_rsna_boxes(path: Path) -> dict[str, list[Box]]:
    """patientId -> radiologists' boxes (pixels of the 1024-px image), images with Target 1."""
    return {pid: boxes for pid, (target, boxes) in read_rsna_labels(path).items() if target == 1}


def read_header(path: Path) -> dict[str, str]:
    """View, sex, age, rows and columns of one DICOM file, without reading its pixels."""
    try:
        with warnings.catch_warnings():
            # RSNA's PatientAge is "51", not the AS form "051Y": valid enough for us.
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            return {t: str(ds.get(t, "") or "").strip() for t in _HEADER_TAGS}
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable DICOM file ({type(exc).__name__})") from None


def dicom_pixels(path: str | Path) -> np.ndarray[Any, Any]:
    """The stored pixels of a single-frame grayscale DICOM image, brighter = denser.

    RSNA's images are MONOCHROME2 8-bit with no modality or VOI LUT, so the stored values
    are the display values; MONOCHROME1 is inverted.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            arr = np.asarray(ds.pixel_array)
    except (InvalidDicomError, OSError, ValueError, AttributeError) as exc:
        raise DataError(f"{path}: not a readable DICOM image ({type(exc).__name__})") from None
    if arr.ndim != 2:
        raise DataError(f"{path}: expected one grayscale frame, received shape {arr.shape}")
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        arr = arr.max() - arr
    return arr


def _index_dicoms(images: Path) -> dict[str, Path]:
    """patientId (file stem) -> path of ``<patientId>.dcm`` at any depth."""
    index: dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(images):
        for name in files:
            if name.lower().endswith(".dcm"):
                index.setdefault(name[:-4], Path(dirpath) / name)
    return index


def prepare_rsna(
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
    """Splits of Lung Opacity (Target 1) vs none (Target 0) by patientId, with every box.

    Returns the summary written to ``summary.json``.
    """
    if neg_ratio <= 0:
        raise DataError(f"--neg-ratio must be positive, received {neg_ratio}")
    if not images.is_dir():
        raise DataError(f"images folder not found: {images}")
    wanted_views = {v.strip().upper() for v in views if v.strip()}
    table = read_rsna_labels(labels)
    index = _index_dicoms(images)
    missing = [pid for pid in table if pid not in index]
    if missing:
        raise DataError(
            f"{len(missing)} labelled image(s) are not under {images} as <patientId>.dcm, e.g. "
            f"{', '.join(missing[:5])}: download stage_2_train_images from the RSNA challenge page "
            "or check --images; nothing was written"
        )
    positives: list[Record] = []
    negatives: list[Record] = []
    boxes: list[Box] = []
    for pid, (target, pid_boxes) in table.items():
        header = read_header(index[pid])
        view = header["ViewPosition"].upper()
        if view not in wanted_views:
            continue
        record = Record(path=str(index[pid].resolve()), label=target, patient_id=pid, view=view, image_id=pid,
                        age=header["PatientAge"], sex=header["PatientSex"],
                        findings=RSNA_POSITIVE if target else "")
        (positives if target else negatives).append(record)
        boxes += pid_boxes
    if not positives:
        raise DataError(f"{labels}: no Target 1 images in views {sorted(wanted_views)}")
    patients = {r.patient_id: bool(r.label) for r in [*positives, *negatives]}
    assignment = split_by_patient(patients, fractions, seed)
    splits = draw_splits(positives, negatives, assignment, neg_ratio, random.Random(seed + 1), match_view=match_view)
    kept = {r.image_id for name in SPLITS for r in splits[name]}
    notes = [
        f"RSNA Pneumonia Detection Challenge: {len(positives)} images with Target 1 ('{RSNA_POSITIVE}', "
        f"radiologists' boxes of opacity suggestive of pneumonia) and {len(negatives)} without, in views "
        f"{','.join(sorted(wanted_views))}; {neg_ratio:g} negative(s) per positive. The positive class is "
        "a different label from NIH's report-mined 'Pneumonia'.",
        f"Split {'/'.join(f'{100 * f:.3g}' for f in fractions)} (train/val/test) by patientId, "
        "stratified by class. RSNA's patientId names one image (the link to "
        "ChestX-ray14's patients was removed), so one person may appear in two splits.",
        "No hard-negative set: this label file does not say which negatives carry other findings.",
    ]
    if match_view:
        notes.append("Negatives drawn with the positives' view mix in each split (--match-view).")
    summary = summarize(splits, notes)
    summary.update({"source": str(labels), "seed": seed, "neg_ratio": neg_ratio, "match_view": match_view,
                    "synthetic": False, "dataset": "rsna-pneumonia-2018",
                    "positive_class": f"RSNA Target 1 ({RSNA_POSITIVE})",
                    "boxes": sum(1 for b in boxes if b.image_id in kept)})
    write_split_folder(out, splits, summary, [b for b in boxes if b.image_id in kept])
    return summary

