"""The healthy reference heatmap faithfulness fills removed regions from: the mean of the
training split's negatives, written into the run once so that evaluate and export (and, through
the model's metadata, the worker) fill with the same numbers."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cxr_contract import faithfulness
from trainer.errors import DataError
from trainer.evaluate import REFERENCE_FILE, faithfulness_reference
from trainer.fit import load_image
from trainer.records import Dataset, Record


def _dataset(tmp_path: Path, labels: list[int]) -> Dataset:
    """A training split of 8-bit PNGs, image k bright in its k-th quarter band of rows."""
    records = []
    for k, label in enumerate(labels):
        image = np.zeros((40, 40), np.uint8)
        image[10 * k:10 * k + 10] = 255
        path = tmp_path / f"{k}.png"
        cv2.imwrite(str(path), image)
        records.append(Record(str(path), label, f"P{k}", "PA", path.name))
    return Dataset(tmp_path, {"train": records})


def test_the_reference_is_the_negatives_mean_written_once_and_read_back(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    dataset = _dataset(tmp_path, [0, 0, 1])  # the positive is left out
    ref = faithfulness_reference(run, dataset, 32, seed=0)
    assert ref.shape == (32, 32) and (run / REFERENCE_FILE).is_file()
    negatives = [load_image(r.path, 32)[..., 0] for r in dataset.splits["train"][:2]]
    np.testing.assert_allclose(ref, np.mean(negatives, axis=0), atol=1 / 65535)
    assert float(ref[26:].max()) == 0.0  # the positive's band stays dark
    # Read back, not recomputed: a changed data folder does not change a run's reference.
    dataset.splits["train"] = dataset.splits["train"][:1]
    np.testing.assert_array_equal(faithfulness_reference(run, dataset, 32, seed=0), ref)
    # What export stores in the model is exactly this.
    np.testing.assert_array_equal(faithfulness.decode_reference(faithfulness.encode_reference(ref), 32), ref)


def test_a_training_split_without_negatives_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no negative image"):
        faithfulness_reference(tmp_path, _dataset(tmp_path, [1]), 32, seed=0)
