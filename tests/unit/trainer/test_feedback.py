"""Merging readers' feedback into a training set: override, disagreement, patient split kept."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from cxr_contract.feedback import FeedbackLabel, pseudonym, write_export
from trainer.cli import main
from trainer.data import SPLITS, Dataset, load_dataset
from trainer.errors import DataError
from trainer.feedback import merge_feedback
from trainer.phantoms import write_phantoms

KEY = b"s" * 32
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


def _export(out: Path, votes: list[tuple[str, str, str, str]], key: bytes = KEY, minutes: int = 0) -> Path:
    """votes: (patient, image, reader, label), recorded one minute apart in this order."""
    labels = [FeedbackLabel(pseudonym(p, key), pseudonym(i, key), pseudonym(r, key), lab, lab == "pneumonia",
                            "test-1", 0.5, T0 + timedelta(minutes=minutes + n))
              for n, (p, i, r, lab) in enumerate(votes)]
    images = {lab.image_key: np.full((16, 16), 7 * n, np.uint8) for n, lab in enumerate(labels)}
    write_export(out, labels, images, key)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    root = tmp_path_factory.mktemp("base")
    write_phantoms(root, 12, size=32, seed=3)
    return load_dataset(root)


def _where(ds: Dataset, image: str) -> tuple[str, int] | None:
    key = pseudonym(image, KEY)
    found = [(name, r.label) for name in SPLITS for r in ds.splits[name] if r.image_id == key]
    assert len(found) <= 1
    return found[0] if found else None


def test_readers_disagreeing_follow_the_latest_label_per_reader_and_a_strict_majority(
        tmp_path: Path, base: Dataset) -> None:
    fb = _export(tmp_path / "fb", [
        ("p1", "majority", "a", "pneumonia"), ("p1", "majority", "b", "pneumonia"),
        ("p1", "majority", "c", "no_pneumonia"),
        ("p2", "tie", "a", "pneumonia"), ("p2", "tie", "b", "no_pneumonia"),
        ("p3", "unsure", "a", "uncertain"), ("p3", "unsure", "b", "uncertain"), ("p3", "unsure", "c", "pneumonia"),
        ("p4", "changed", "a", "pneumonia"), ("p4", "changed", "a", "no_pneumonia"),  # a changed their mind
    ])
    _summary, counts = merge_feedback(base, [fb], tmp_path / "out")
    ds = load_dataset(tmp_path / "out")
    assert _where(ds, "majority")[1] == 1 and _where(ds, "changed")[1] == 0  # type: ignore[index]
    assert _where(ds, "tie") is None and _where(ds, "unsure") is None
    assert (counts.tied, counts.uncertain, sum(counts.added.values()), counts.readers) == (1, 1, 2, 3)
    assert sum(len(ds.splits[s]) for s in SPLITS) == sum(len(base.splits[s]) for s in SPLITS) + 2
    assert "1 readers tied, 1 uncertain majority" in counts.line()


def test_feedback_overrides_the_label_of_the_same_image_and_patients_keep_their_split(
        tmp_path: Path, base: Dataset) -> None:
    first = _export(tmp_path / "first", [(f"p{n}", f"img{n}", "a", "pneumonia" if n % 2 else "no_pneumonia")
                                          for n in range(8)])
    merge_feedback(base, [first], tmp_path / "round1", seed=1)
    round1 = load_dataset(tmp_path / "round1")
    assert _where(round1, "img1") is not None and _where(round1, "img1")[1] == 1  # type: ignore[index]
    split_of_p1 = _where(round1, "img1")[0]  # type: ignore[index]
    # A second export, merged into round 1: reader b relabels img1, doubts img2, and a new
    # image of patient p1 arrives.
    second = _export(tmp_path / "second", [("p1", "img1", "b", "no_pneumonia"), ("p2", "img2", "b", "uncertain"),
                                           ("p1", "img1-followup", "b", "pneumonia")], minutes=60)
    _summary, counts = merge_feedback(round1, [second], tmp_path / "round2", seed=99)
    round2 = load_dataset(tmp_path / "round2")
    assert _where(round2, "img1") == (split_of_p1, 0)  # overridden in place, not duplicated
    assert _where(round2, "img2") is None  # the readers' doubt removes it
    assert _where(round2, "img1-followup") == (split_of_p1, 1)  # same patient, same split
    assert (counts.overridden, counts.removed, sum(counts.added.values())) == (1, 1, 1)
    patients = [{r.patient_id for r in round2.splits[s]} for s in SPLITS]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    # Both exports merged at once: a and b now tie on img1 (and on img2: no_pneumonia, uncertain).
    _summary, both = merge_feedback(base, [first, second], tmp_path / "both")
    assert both.tied == 2 and _where(load_dataset(tmp_path / "both"), "img1") is None


def test_exports_under_different_keys_or_malformed_ones_are_refused(tmp_path: Path, base: Dataset,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    a = _export(tmp_path / "a", [("p1", "i1", "r", "pneumonia")])
    b = _export(tmp_path / "b", [("p1", "i1", "r", "pneumonia")], key=b"t" * 32)
    with pytest.raises(DataError, match="different pseudonym keys"):
        merge_feedback(base, [a, b], tmp_path / "out")
    (b / "labels.csv").write_text((b / "labels.csv").read_text().replace("pneumonia", "pneumonitis"))
    assert main(["prepare", "--base", str(base.root), "--feedback", str(b), "--out", str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "labels.csv:2: label must be one of" in err[0]
    assert not (tmp_path / "o2").exists()


def test_prepare_names_a_labels_file_that_is_not_utf8_in_one_line(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    fb = _export(tmp_path / "fb", [("p1", "i1", "r", "pneumonia")])
    (fb / "labels.csv").write_bytes((fb / "labels.csv").read_bytes().replace(b"test-1", b"test-1\xff\xfe"))
    assert main(["prepare", "--feedback", str(fb), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "labels.csv:2: not UTF-8" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "o").exists()


def test_prepare_merges_from_the_command_line(tmp_path: Path, base: Dataset,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    fb = _export(tmp_path / "fb", [(f"p{n}", f"i{n}", "r", "pneumonia") for n in range(3)])
    assert main(["prepare", "--base", str(base.root), "--feedback", str(fb), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("feedback: 3 labels by 1 readers on 3 images from 1 export(s)")
    assert sum(len(v) for v in load_dataset(tmp_path / "o").splits.values()) == 3 + sum(
        len(v) for v in base.splits.values())
    assert main(["prepare", "--base", str(base.root), "--out", str(tmp_path / "o3")]) == 1


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_merge_refused_for_an_empty_split_writes_nothing(tmp_path: Path) -> None:
    # Two patients: the stratified split leaves val empty.
    fb = _export(tmp_path / "fb", [("p1", "i1", "r", "pneumonia"), ("p2", "i2", "r", "no_pneumonia")])
    with pytest.raises(DataError, match="split 'val' is empty.*nothing was written"):
        merge_feedback(None, [fb], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # Merged in place into a set built from feedback: the readers' doubt empties its val split,
    # and the refusal must leave the set as it was, a new image of a kept patient included.
    first = _export(tmp_path / "first", [(f"p{n}", f"img{n}", "a", "pneumonia" if n % 2 else "no_pneumonia")
                                          for n in range(20)])
    merge_feedback(None, [first], tmp_path / "set")
    base = load_dataset(tmp_path / "set")
    doubted = [n for n in range(20) if _where(base, f"img{n}")[0] == "val"]  # type: ignore[index]
    kept = next(n for n in range(20) if n not in doubted)
    assert doubted
    second = _export(tmp_path / "second", [(f"p{n}", f"img{n}", "b", "uncertain") for n in doubted]
                     + [(f"p{kept}", "followup", "b", "pneumonia")], minutes=60)
    before = _files(tmp_path / "set")
    with pytest.raises(DataError, match="split 'val' is empty"):
        merge_feedback(base, [second], tmp_path / "set")
    assert _files(tmp_path / "set") == before
