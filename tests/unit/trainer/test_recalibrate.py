"""``cxr-train recalibrate`` refuses to fit a site calibration from too few labelled images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainer.cli import main as cxr_train


def test_recalibrate_refuses_too_few_labelled_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import cv2

    (tmp_path / "images").mkdir()
    rows = ["image,label"]
    for i, label in enumerate([1] * 5 + [0] * 40):
        cv2.imwrite(str(tmp_path / "images" / f"{i}.png"), np.zeros((8, 8), np.uint8))
        rows.append(f"{i}.png,{label}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "model.onnx").write_bytes(b"not read before the counts are checked")
    code = cxr_train(["recalibrate", "--model", str(tmp_path / "model.onnx"), "--labels", str(tmp_path / "labels.csv"),
                      "--images", str(tmp_path / "images"), "--out", str(tmp_path / "site.onnx")])
    err = capsys.readouterr().err
    assert code == 1 and "5 with pneumonia and 40 without; at least 20 of each" in err, err
    assert not (tmp_path / "site.onnx").exists() and "Traceback" not in err


@pytest.mark.parametrize(("row", "said"), [("7.png", "row 3: label must be 0 or 1"),
                                           (",1", "row 3: no image path"),
                                           ("8.png,maybe", "row 3: label must be 0 or 1")])
def test_a_short_or_bad_labels_row_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], row: str,
                                            said: str) -> None:
    (tmp_path / "labels.csv").write_text(f"image,label\n1.png,1\n{row}\n")
    code = cxr_train(["recalibrate", "--model", str(tmp_path / "model.onnx"), "--labels", str(tmp_path / "labels.csv"),
                      "--images", str(tmp_path), "--out", str(tmp_path / "site.onnx")])
    err = capsys.readouterr().err
    assert code == 1 and said in err and "Traceback" not in err, err
