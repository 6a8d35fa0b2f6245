"""prepare on the real NIH label file; phantoms; config and CLI errors."""

from __future__ import annotations

import csv
import gzip
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import load_config
from trainer.data import SPLITS, load_dataset, prepare, read_boxes, require_split
from trainer.errors import ConfigError, DataError
from trainer.phantoms import write_phantoms

DATA = Path(__file__).resolve().parent.parent / "data"
LABELS = DATA / "Data_Entry_2017_v2020.csv.gz"


def label_rows() -> list[dict[str, str]]:
    with gzip.open(LABELS, "rt", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Empty stand-ins for every Pneumonia and No Finding image, in the release's nested layout."""
    root = tmp_path_factory.mktemp("nih") / "images"
    for i, row in enumerate(label_rows()):
        labels = row["Finding Labels"].split("|")
        if "Pneumonia" in labels or labels == ["No Finding"]:
            folder = root / f"images_{i // 10000:03d}" / "images"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / row["Image Index"]).touch()
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


def test_prepare_notes_the_fractions_it_used(release: Path, tmp_path: Path) -> None:
    assert "Split 70/15/15 (train/val/test) by patient" in prepare(LABELS, release, tmp_path / "a")["notes"][1]
    summary = prepare(LABELS, release, tmp_path / "b", fractions=(0.8, 0.1, 0.1))
    assert "Split 80/10/10 (train/val/test) by patient" in summary["notes"][1]
    assert summary["splits"]["train"]["images"] > 0.75 * sum(s["images"] for s in summary["splits"].values())


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


def test_nih_boxes_become_regions_at_the_model_size(tmp_path: Path) -> None:
    import cv2
    import numpy as np

    from trainer.data import Box, Record
    from trainer.evaluate import centre_prior, localisation, region_mask

    image = tmp_path / "00000001_000.png"
    cv2.imwrite(str(image), np.zeros((1024, 1024), np.uint8))
    record = Record(path=str(image), label=1, patient_id="1", view="PA", image_id=image.name)
    region = region_mask(record, [Box(image.name, "Pneumonia", 512, 256, 256, 512)], 64)
    assert region is not None and region.shape == (64, 64)
    ys, xs = np.nonzero(region)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (32, 47, 16, 47)
    cam = np.zeros((2, 2), np.float32)
    cam[0, 1] = 1.0  # hottest cell: top right, centre (16, 48)
    hit, energy = localisation(cam, region)
    assert hit and 0 < energy < 1
    assert not localisation(np.zeros((2, 2), np.float32), region)[0]
    prior_hit, _ = localisation(centre_prior(64), region)
    assert prior_hit  # the centre (31.5, 31.5) is within 15 * 64 / 224 px of the box
