"""Merge readers' feedback exports (:mod:`cxr_contract.feedback`) into a training set.

The rules, in the order they apply:

1. **Which image.** A feedback image is the worker's preview, named by its pseudonymous
   image key. It is the same image as a record of the set only when that record's
   ``image_id`` equals the key (a set merged from an earlier export); otherwise it is a new
   image. The same key in several exports is one image (the latest export's file is used).
2. **Which label.** Per image, each reader's latest label counts (by ``recorded_at``). The
   label with strictly more votes than any other wins. A tie, or a majority of
   ``uncertain``, decides nothing: the image is excluded and counted, and an image of the
   set it names is removed (its readers doubt the dataset's label too). The ``agree`` column
   does not vote: a reader's own label already says what they saw.
3. **Override.** A decided label replaces the set's label (the NLP-mined one of NIH or RSNA)
   for the same image; its mask and boxes are dropped when it becomes negative, and a hard
   negative that readers call pneumonia leaves the hard-negative set.
4. **Split.** By patient key: a patient already in the set keeps their split; new patients
   are split like ``prepare`` does (stratified, the same fractions and seed), so no patient
   is in two splits.

All exports must carry the same key fingerprint: with different keys the same patient has
different keys, and rule 4 could no longer hold.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_contract.feedback import (
    NO_PNEUMONIA,
    PNEUMONIA,
    UNCERTAIN,
    FeedbackExport,
    FeedbackFormatError,
    FeedbackLabel,
    read_export,
)
from trainer.errors import DataError
from trainer.records import (
    HARD_NEGATIVES,
    POSITIVE_FINDING,
    SPLITS,
    Box,
    Dataset,
    Record,
    split_by_patient,
    summarize,
    write_split_folder,
)

#: Where the merged set keeps the feedback images, relative to its folder.
FEEDBACK_IMAGES = "feedback"


@dataclass
class Decision:
    """The readers' verdict on one image."""

    image_key: str
    patient_key: str
    source: Path
    #: 1 pneumonia, 0 no pneumonia, None excluded.
    label: int | None
    reason: str = ""


@dataclass
class MergeCounts:
    exports: int = 0
    labels: int = 0
    readers: int = 0
    images: int = 0
    overridden: int = 0
    confirmed: int = 0
    added: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    tied: int = 0
    uncertain: int = 0
    removed: int = 0

    def line(self) -> str:
        added = sum(self.added.values())
        per_split = "/".join(str(self.added[s]) for s in SPLITS)
        return (f"feedback: {self.labels} labels by {self.readers} readers on {self.images} images from "
                f"{self.exports} export(s): {self.overridden} dataset labels overridden, {self.confirmed} confirmed, "
                f"{added} images added (train/val/test {per_split}), {self.tied + self.uncertain} excluded "
                f"({self.tied} readers tied, {self.uncertain} uncertain majority; {self.removed} removed from "
                "the set)")


def _feedback_image(d: Decision) -> str:
    """Where a new feedback image lies in the merged set, relative to its folder."""
    return f"{FEEDBACK_IMAGES}/{d.image_key}.png"


def read_exports(folders: Sequence[Path]) -> list[FeedbackExport]:
    """Read every export; refuse a malformed one or a mix of keys."""
    exports = []
    for folder in folders:
        try:
            exports.append(read_export(folder))
        except FeedbackFormatError as exc:
            raise DataError(str(exc)) from None
    keys = {e.manifest.key_fingerprint: e.root for e in exports}
    if len(keys) > 1:
        named = ", ".join(f"{root} (key {fp})" for fp, root in keys.items())
        raise DataError(f"feedback exports made with different pseudonym keys cannot be merged: {named}")
    return exports


def decide(exports: Sequence[FeedbackExport]) -> list[Decision]:
    """Apply rule 2 (latest label per reader, strict majority) to every image."""
    latest: dict[str, dict[str, FeedbackLabel]] = defaultdict(dict)
    source: dict[str, Path] = {}
    for export in exports:
        for lab in export.labels:
            mine = latest[lab.image_key]
            if lab.reader not in mine or lab.recorded_at >= mine[lab.reader].recorded_at:
                mine[lab.reader] = lab
            source[lab.image_key] = export.image_file(lab)
    decisions = []
    for image_key, by_reader in sorted(latest.items()):
        votes = Counter(lab.label for lab in by_reader.values()).most_common()
        patient_key = max(by_reader.values(), key=lambda lab: lab.recorded_at).patient_key
        if len(votes) > 1 and votes[0][1] == votes[1][1]:
            decisions.append(Decision(image_key, patient_key, source[image_key], None, "tied"))
        elif votes[0][0] == UNCERTAIN:
            decisions.append(Decision(image_key, patient_key, source[image_key], None, UNCERTAIN))
        else:
            label = {PNEUMONIA: 1, NO_PNEUMONIA: 0}[votes[0][0]]
            decisions.append(Decision(image_key, patient_key, source[image_key], label))
    return decisions


def merge_feedback(
    base: Dataset | None,
    folders: Sequence[Path],
    out: Path,
    *,
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
) -> tuple[dict[str, Any], MergeCounts]:
    """Merge feedback exports into ``base`` (or into an empty set) and write the data folder ``out``.

    Returns:
        The summary written to ``summary.json`` and the counts of what each rule did.

    Raises:
        DataError: a malformed export, exports under different keys, or a set without both
            classes in a split.
    """
    exports = read_exports(folders)
    decisions = decide(exports)
    counts = MergeCounts(exports=len(exports), labels=sum(len(e.labels) for e in exports),
                         readers=len({lab.reader for e in exports for lab in e.labels}), images=len(decisions))
    splits = {name: list(base.splits[name]) if base else [] for name in SPLITS}
    hard = list(base.hard_negatives) if base else []
    boxes: dict[str, list[Box]] = dict(base.boxes) if base else {}
    for r in (r for records in (*splits.values(), hard) for r in records):
        # Absolute, so that the set written to another folder still finds the base's files.
        r.path = str(Path(r.path).resolve())
        r.mask = str(Path(r.mask).resolve()) if r.mask else ""
    split_of = {r.patient_id: name for name, records in splits.items() for r in records}
    known = {r.image_id for records in (*splits.values(), hard) for r in records}

    new: list[Decision] = []
    for d in decisions:
        if d.label is None:
            counts.tied += d.reason == "tied"
            counts.uncertain += d.reason == UNCERTAIN
        if d.image_key not in known:
            if d.label is not None:
                new.append(d)
            continue
        if d.label is None:
            counts.removed += 1
            splits = {name: [r for r in records if r.image_id != d.image_key] for name, records in splits.items()}
            hard = [r for r in hard if r.image_id != d.image_key]
            boxes.pop(d.image_key, None)
            continue
        for r in (r for records in splits.values() for r in records if r.image_id == d.image_key):
            if r.label == d.label:
                counts.confirmed += 1
                continue
            counts.overridden += 1
            r.label = d.label
            if d.label == 0:
                r.mask = ""
                boxes.pop(d.image_key, None)
        hard = [r for r in hard if r.image_id != d.image_key or d.label == 0]

    new_patients: dict[str, bool] = {}
    for d in new:
        if d.patient_key not in split_of:
            new_patients[d.patient_key] = new_patients.get(d.patient_key, False) or d.label == 1
    split_of.update(split_by_patient(new_patients, fractions, seed))
    for d in new:
        name = split_of[d.patient_key]
        counts.added[name] += 1
        splits[name].append(Record(path=str((out / _feedback_image(d)).resolve()), label=int(d.label or 0),
                                   patient_id=d.patient_key, view="", image_id=d.image_key,
                                   findings=POSITIVE_FINDING if d.label else ""))
    # Checked before any file is copied: a refused merge must leave ``out`` (which may be
    # the base itself, merged in place) as it was.
    for name in SPLITS:
        if not splits[name]:
            raise DataError(f"after merging the feedback, split {name!r} is empty: merge into a dataset "
                            "(--labels/--images or --base) or gather more feedback; nothing was written")
    (out / FEEDBACK_IMAGES).mkdir(parents=True, exist_ok=True)
    for d in new:
        shutil.copyfile(d.source, out / _feedback_image(d))

    previous: dict[str, Any] = {}
    if base and (base.root / "summary.json").is_file():
        previous = json.loads((base.root / "summary.json").read_text(encoding="utf-8"))
    notes = [*previous.get("notes", []), counts.line() + " (rules: docs/training.md, 'The feedback loop')."]
    summary = {**previous, **summarize(splits, notes)}
    summary["feedback"] = {"exports": [str(e.root) for e in exports], "key_fingerprint":
                           exports[0].manifest.key_fingerprint if exports else None,
                           **{k: v for k, v in vars(counts).items() if k != "exports"}}
    if isinstance(previous.get(HARD_NEGATIVES), dict):
        summary[HARD_NEGATIVES] = summarize({"test": hard})["splits"]["test"]
    if not hard:  # merged in place: the base's file must not outlive its last hard negative
        (out / f"{HARD_NEGATIVES}.csv").unlink(missing_ok=True)
    write_split_folder(out, splits, summary, [b for bs in boxes.values() for b in bs], hard_negatives=hard)
    return summary, counts
