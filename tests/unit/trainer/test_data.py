"""prepare on the real NIH and RSNA label files; phantoms; config and CLI errors."""

from __future__ import annotations

import csv
import gzip
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from trainer import stats
from trainer.config import load_config
from trainer.data import SPLITS, load_dataset, prepare, read_boxes, require_split
from trainer.errors import ConfigError, DataError
from trainer.phantoms import write_phantoms

DATA = Path(__file__).resolve().parents[2] / "data"
LABELS = DATA / "Data_Entry_2017_v2020.csv.gz"


def label_rows() -> list[dict[str, str]]:
    with gzip.open(LABELS, "rt", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Empty stand-ins for every image of the release (hard negatives may be any of them), in
    its nested layout; mknod is the cheapest way to create 112,120 empty files."""
    root = tmp_path_factory.mktemp("nih") / "images"
    for i, row in enumerate(label_rows()):
        folder = root / f"images_{i // 10000:03d}" / "images"
        if i % 10000 == 0:
            folder.mkdir(parents=True)
        os.mknod(folder / row["Image Index"])
    return root


def read_split(folder: Path, name: str) -> list[dict[str, str]]:
    with open(folder / f"{name}.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_prepare_splits_the_real_labels_by_patient(release: Path, tmp_path: Path) -> None:
    summary = prepare(LABELS, release, tmp_path / "a", seed=3)
    splits = {n: read_split(tmp_path / "a", n) for n in SPLITS}
    patients = {n: {r["patient_id"] for r in rows} for n, rows in splits.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    positives = sum(int(r["label"]) for rows in splits.values() for r in rows)
    expected = sum("Pneumonia" in r["Finding Labels"].split("|") for r in label_rows())
    assert positives == expected == 1431
    assert len({r["patient_id"] for rows in splits.values() for r in rows if r["label"] == "1"}) == 1008
    for name, rows in splits.items():
        n_pos = sum(r["label"] == "1" for r in rows)
        assert len(rows) - n_pos == n_pos, name  # neg-ratio 1
        assert abs(len(rows) / (2 * 1431) - {"train": 0.7, "val": 0.15, "test": 0.15}[name]) < 0.03
    assert "5000 per class cannot be drawn" in summary["notes"][0].replace(",", "").replace("'s", "")
    assert summary["splits"]["train"]["age"]["quartiles"]
    assert set(summary["splits"]["test"]["sex"]) == {"M", "F"}
    # View, sex, age and findings travel into the records that evaluate reads.
    ds = load_dataset(tmp_path / "a")
    truth = {r["Image Index"]: r for r in label_rows()}
    for r in ds.splits["test"][:50]:
        row = truth[r.image_id]
        assert (r.view, r.sex, r.age, r.findings) == (row["View Position"], row["Patient Gender"],
                                                    row["Patient Age"], row["Finding Labels"])
    # The hard negatives: other findings, no pneumonia, from test patients only.
    hard = ds.hard_negatives
    n_test_pos = sum(r.label for r in ds.splits["test"])
    assert len(hard) == n_test_pos and summary["hard_negatives"]["images"] == len(hard)
    assert all(r.label == 0 and "Pneumonia" not in r.findings and r.findings != "No Finding" for r in hard)
    assert not {r.patient_id for r in hard} & (patients["train"] | patients["val"])
    assert all(Path(r.path).is_file() for r in hard)


def test_prepare_notes_the_fractions_it_used(release: Path, tmp_path: Path) -> None:
    assert "Split 70/15/15 (train/val/test) by patient" in prepare(LABELS, release, tmp_path / "a")["notes"][1]
    summary = prepare(LABELS, release, tmp_path / "b", fractions=(0.8, 0.1, 0.1))
    assert "Split 80/10/10 (train/val/test) by patient" in summary["notes"][1]
    assert summary["splits"]["train"]["images"] > 0.75 * sum(s["images"] for s in summary["splits"].values())


def test_match_view_removes_the_view_shortcut(release: Path, tmp_path: Path) -> None:
    """On the real labels the view alone scores AUC ~0.63; with --match-view, 0.5."""
    prepare(LABELS, release, tmp_path / "plain", seed=3)
    summary = prepare(LABELS, release, tmp_path / "matched", seed=3, match_view=True)
    plain, matched = load_dataset(tmp_path / "plain"), load_dataset(tmp_path / "matched")
    every = [r for n in SPLITS for r in plain.splits[n]]
    assert 0.60 < stats.auc(np.array([r.label for r in every]), np.array([r.view == "AP" for r in every], float)) < 0.66
    for name in SPLITS:
        records = matched.splits[name]
        for view in ("AP", "PA"):
            assert (sum(r.view == view for r in records if r.label == 1)
                    == sum(r.view == view for r in records if r.label == 0)), (name, view)
        y = np.array([r.label for r in records])
        assert stats.auc(y, np.array([r.view == "AP" for r in records], float)) == pytest.approx(0.5)
    hard = matched.hard_negatives
    test_pos = [r for r in matched.splits["test"] if r.label]
    assert sum(r.view == "AP" for r in hard) == sum(r.view == "AP" for r in test_pos)
    assert summary["match_view"] is True and any("--match-view" in n for n in summary["notes"])

def test_prepare_is_reproducible_with_the_same_seed(release: Path, tmp_path: Path) -> None:
    prepare(LABELS, release, tmp_path / "a", seed=5)
    prepare(LABELS, release, tmp_path / "b", seed=5)
    prepare(LABELS, release, tmp_path / "c", seed=6)
    for name in SPLITS:
        assert (tmp_path / "a" / f"{name}.csv").read_bytes() == (tmp_path / "b" / f"{name}.csv").read_bytes()
    assert (tmp_path / "a" / "test.csv").read_bytes() != (tmp_path / "c" / "test.csv").read_bytes()


def test_prepare_views_and_ratio(release: Path, tmp_path: Path) -> None:
    summary = prepare(LABELS, release, tmp_path / "pa", views=["PA"], neg_ratio=2.0)
    rows = [r for n in SPLITS for r in read_split(tmp_path / "pa", n)]
    assert {r["view"] for r in rows} == {"PA"}
    n_pos = sum(r["label"] == "1" for r in rows)
    assert abs((len(rows) - n_pos) / n_pos - 2.0) < 0.01
    assert "PA" in summary["notes"][0]


def test_missing_images_give_one_error_and_write_nothing(release: Path, tmp_path: Path) -> None:
    gone = next(release.rglob("*.png"))
    partial = tmp_path / "partial"
    partial.mkdir()
    for p in list(release.rglob("*.png"))[:500]:
        (partial / p.name).touch()
    with pytest.raises(DataError, match=r"selected image\(s\) are not under") as err:
        prepare(LABELS, partial, tmp_path / "out")
    assert "nothing was written" in str(err.value)
    assert not (tmp_path / "out").exists()
    assert gone.exists()


def test_prepare_rejects_a_file_that_is_not_the_label_file(tmp_path: Path, release: Path) -> None:
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="not a ChestX-ray14 label file"):
        prepare(bad, release, tmp_path / "out")


def test_nih_boxes_are_read() -> None:
    boxes = read_boxes(DATA / "BBox_List_2017.csv.gz")
    assert sum(len(b) for b in boxes.values()) == 120
    one = next(iter(boxes.values()))[0]
    assert one.finding == "Pneumonia" and one.w > 0 and one.h > 0


def test_phantoms_share_the_schema_and_carry_masks_and_boxes(tmp_path: Path) -> None:
    summary = write_phantoms(tmp_path, 30, size=64, seed=1)
    ds = load_dataset(tmp_path)
    assert summary["synthetic"] is True and "SYNTHETIC" in summary["notes"][0]
    records = [r for n in SPLITS for r in ds.splits[n]]
    assert len(records) == 30
    positives = [r for r in records if r.label == 1]
    assert positives and all(Path(r.mask).is_file() for r in positives)
    assert all(not r.mask for r in records if r.label == 0)
    assert {r.image_id for r in positives} == set(ds.boxes)
    for name in SPLITS:
        require_split(ds, name)  # both classes everywhere


def test_empty_split_is_a_clear_error(tmp_path: Path) -> None:
    write_phantoms(tmp_path, 30, size=64, seed=1)
    header = (tmp_path / "val.csv").read_text().splitlines()[0]
    (tmp_path / "val.csv").write_text(header + "\n")
    with pytest.raises(DataError, match="split 'val' .* is empty"):
        require_split(load_dataset(tmp_path), "val")


@pytest.mark.parametrize("toml, match", [
    ("[train]\nepochs = 0\n", "train.epochs"),
    ("[model]\nimage_size = 100\n", "model.image_size"),
    ("[augment]\nzoom = 2\n", "augment.zoom"),
    ("[train]\nunknown_key = 1\n", "train.unknown_key"),
    ("[train\n", "not valid TOML"),
])
def test_bad_config_values_are_refused(tmp_path: Path, toml: str, match: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_shipped_config_is_the_papers_recipe() -> None:
    cfg = load_config(None)
    assert (cfg.train.learning_rate, cfg.train.batch_size, cfg.train.epochs, cfg.train.patience) == (1e-4, 32, 30, 5)
    assert cfg.model.dropout == 0.5 and cfg.model.dense_units == 256 and cfg.model.image_size == 224
    assert cfg.model.weights == "imagenet" and cfg.model.feature_layer == "conv5_block3_out"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainer.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    out = cli("fit", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run"), "--weights", "none")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("cxr-train fit: error: data folder not found")
    out = cli("phantoms", "--out", str(tmp_path / "p"), "--n", "2")
    assert out.returncode == 1 and "--n must be at least 6" in out.stderr and "Traceback" not in out.stderr
    out = cli("fit", "--data", "x", "--out", "y", "--bogus-flag")
    assert out.returncode == 2 and "unrecognized arguments: --bogus-flag" in out.stderr
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[train]\nlearning_rate = -1\n")
    write_phantoms(tmp_path / "d", 12, size=64)
    out = cli("fit", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"), "--config", str(cfg))
    assert out.returncode == 1 and "train.learning_rate" in out.stderr and "Traceback" not in out.stderr
    out = cli("fit", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r2"), "--weights", str(tmp_path / "no.h5"))
    assert out.returncode == 1 and "weights file not found" in out.stderr and "Traceback" not in out.stderr
    out = cli("evaluate", "--run", str(tmp_path / "r"), "--pointing-tolerance", "15")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "--pointing-tolerance is a fraction of the image side, received 15.0" in out.stderr


def test_nih_boxes_become_regions_at_the_model_size(tmp_path: Path) -> None:
    import cv2

    from trainer.data import Box, Record
    from trainer.evaluate import region_mask
    from trainer.localise import centre_prior, scores

    image = tmp_path / "00000001_000.png"
    cv2.imwrite(str(image), np.zeros((1024, 1024), np.uint8))
    record = Record(path=str(image), label=1, patient_id="1", view="PA", image_id=image.name)
    region = region_mask(record, [Box(image.name, "Pneumonia", 512, 256, 256, 512)], 64)
    assert region is not None and region.shape == (64, 64)
    ys, xs = np.nonzero(region)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (32, 47, 16, 47)
    cam = np.zeros((2, 2), np.float32)
    cam[0, 1] = 1.0  # hottest cell: top right, centre (16, 48), 1 px right of the box
    s = scores(cam, region)
    assert s["pointing_game"] == 1.0 and s["pointing_game_zero_tolerance"] == 0.0
    assert 0 < s["energy_in_region"] < 1 and 0 < s["iou"] < 1
    assert scores(np.zeros((2, 2), np.float32), region)["pointing_game"] == 0.0
    # The centre (31.5, 31.5) ties four pixels: two inside the box, two 1 px from it.
    prior = scores(centre_prior(64), region)
    assert prior["pointing_game"] == 1.0 and prior["pointing_game_zero_tolerance"] == 0.5

RSNA_LABELS = DATA / "stage_2_train_labels.csv.gz"
RSNA_HEADERS = DATA / "stage_2_train_images_dicom_headers.csv.gz"


def rsna_dicom(patient_id: str, view: str, sex: str, age: str, pixels: np.ndarray | None = None) -> bytes:
    """A CR image as the RSNA release ships it (its header values; pixels optional)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    with warnings.catch_warnings():  # RSNA's PatientAge "51" is not the AS form "051Y"
        warnings.simplefilter("ignore")
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = pydicom.uid.ComputedRadiographyImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.PatientID, ds.PatientName, ds.Modality, ds.BodyPartExamined = patient_id, patient_id, "CR", "CHEST"
        ds.ViewPosition, ds.PatientSex = view, sex
        ds.add_new("PatientAge", "AS", age)  # RSNA writes "51", not "051Y"
        ds.Rows = ds.Columns = 1024
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        if pixels is not None:
            ds.PixelData = pixels.astype(np.uint8).tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def rsna_headers() -> dict[str, dict[str, str]]:
    with gzip.open(RSNA_HEADERS, "rt", newline="") as f:
        return {r["PatientID"]: r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def rsna_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A header-only <patientId>.dcm for each of the 26,684 labelled images, with the real header
    values (view, sex, age) of that image: one pydicom encoding, the values patched in bytes."""
    root = tmp_path_factory.mktemp("rsna") / "stage_2_train_images"
    root.mkdir()
    slot = {"pid": "P" * 36, "view": "VV", "sex": "S", "age": "AAAA"}
    template = rsna_dicom(slot["pid"], slot["view"], slot["sex"], slot["age"])
    for pid, h in rsna_headers().items():
        data = (template.replace(slot["pid"].encode(), pid.encode())
                .replace(b"VV", h["ViewPosition"].encode()).replace(b"AAAA", h["PatientAge"].ljust(4).encode())
                .replace(b"S ", h["PatientSex"].encode() + b" "))
        (root / f"{pid}.dcm").write_bytes(data)
    return root


def test_rsna_prepare_splits_the_real_labels_with_boxes_and_headers(rsna_release: Path, tmp_path: Path) -> None:
    summary = prepare(RSNA_LABELS, rsna_release, tmp_path / "r", seed=2)
    ds = load_dataset(tmp_path / "r")
    records = [r for n in SPLITS for r in ds.splits[n]]
    positives = [r for r in records if r.label == 1]
    assert len(positives) == 6012  # every Target 1 image, neg-ratio 1
    assert len(records) == 2 * 6012
    ids = {n: {r.patient_id for r in ds.splits[n]} for n in SPLITS}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert all(r.findings == "Lung Opacity" for r in positives)
    # The header of each file, not the label file, gives view, sex and age.
    truth = rsna_headers()
    for r in records[:200]:
        h = truth[r.patient_id]
        assert (r.view, r.sex, r.age) == (h["ViewPosition"], h["PatientSex"], h["PatientAge"])
        assert r.path.endswith(f"{r.patient_id}.dcm") and Path(r.path).is_file()
    # Every box of every kept positive, in the data folder, readable as evaluate reads it.
    assert sum(len(b) for b in ds.boxes.values()) == summary["boxes"] == 9555
    assert set(ds.boxes) == {r.image_id for r in positives}
    assert "different label from NIH" in summary["notes"][0] and summary["positive_class"].startswith("RSNA")
    assert ds.hard_negatives == []
    # The confound is in RSNA too: 78% of opacity images are AP, 36% of the others.
    every_view = [r.view == "AP" for r in records]
    assert 0.68 < stats.auc(np.array([r.label for r in records]), np.array(every_view, float)) < 0.74


def test_rsna_boxes_are_read_from_the_label_file() -> None:
    boxes = read_boxes(RSNA_LABELS)
    assert len(boxes) == 6012 and sum(len(b) for b in boxes.values()) == 9555
    b = boxes["00436515-870c-4b36-a041-de91049b9ab4"]
    assert [(x.x, x.y, x.w, x.h) for x in b] == [(264.0, 152.0, 213.0, 379.0), (562.0, 152.0, 256.0, 453.0)]
    assert b[0].finding == "Lung Opacity"


def test_rsna_missing_images_and_bad_rows_are_one_error(rsna_release: Path, tmp_path: Path) -> None:
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(rsna_release.iterdir())[:10]:
        (few / p.name).write_bytes(p.read_bytes())
    with pytest.raises(DataError, match=r"labelled image\(s\) are not under .* nothing was written"):
        prepare(RSNA_LABELS, few, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("patientId,x,y,width,height,Target\nabc,1,2,3,4,1\nabc,,,,,0\n")
    with pytest.raises(DataError, match="both Target 0 and 1"):
        prepare(bad, few, tmp_path / "out")
    bad.write_text("patientId,x,y,width,height,Target\nabc,,,,,1\n")
    with pytest.raises(DataError, match=r"bad.csv:2: not an RSNA label row"):
        read_boxes(bad)


def test_rsna_dicom_pixels_and_boxes_reach_the_model_size(tmp_path: Path) -> None:
    import cv2

    from trainer.data import Box, Record
    from trainer.evaluate import region_mask
    from trainer.fit import load_image

    pixels = (np.arange(1024 * 1024) % 251).reshape(1024, 1024).astype(np.uint8)
    dcm = tmp_path / "00436515-870c-4b36-a041-de91049b9ab4.dcm"
    dcm.write_bytes(rsna_dicom(dcm.stem, "PA", "F", "51", pixels))
    png = tmp_path / "same.png"
    cv2.imwrite(str(png), pixels)
    assert np.array_equal(load_image(str(dcm), 64), load_image(str(png), 64))
    record = Record(path=str(dcm), label=1, patient_id=dcm.stem, view="PA", image_id=dcm.stem)
    region = region_mask(record, [Box(dcm.stem, "Lung Opacity", 512, 256, 256, 512)], 64)
    assert region is not None
    ys, xs = np.nonzero(region)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (32, 47, 16, 47)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not dicom")
    with pytest.raises(DataError, match="broken.dcm: not a readable DICOM image"):
        load_image(str(broken), 64)


def test_prepare_merges_feedback_into_the_nih_splits(release: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from datetime import UTC, datetime

    from cxr_contract.feedback import FeedbackLabel, pseudonym, write_export
    from trainer.cli import main

    key = b"n" * 32
    labels = [FeedbackLabel(pseudonym(f"p{n}", key), pseudonym(f"i{n}", key), pseudonym("r", key),
                            "pneumonia" if n % 2 else "no_pneumonia", True, "v1", 0.5, datetime(2026, 1, 1, tzinfo=UTC))
              for n in range(6)]
    write_export(tmp_path / "fb", labels, {lab.image_key: np.zeros((8, 8), np.uint8) for lab in labels}, key)
    prepare(LABELS, release, tmp_path / "plain", seed=3)
    assert main(["prepare", "--labels", str(LABELS), "--images", str(release), "--seed", "3",
                 "--feedback", str(tmp_path / "fb"), "--out", str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("1431 Pneumonia images") and out[3].startswith("feedback: 6 labels by 1 readers")
    for name in SPLITS:
        plain, merged = read_split(tmp_path / "plain", name), read_split(tmp_path / "merged", name)
        assert merged[: len(plain)] == plain  # the NIH records and their split are untouched
        assert all(r["image_id"] in {lab.image_key for lab in labels} for r in merged[len(plain):])
    assert sum(len(read_split(tmp_path / "merged", n)) - len(read_split(tmp_path / "plain", n)) for n in SPLITS) == 6
    assert (tmp_path / "merged" / "hard_negatives.csv").is_file()
