"""``cxr-worker process`` streams: each batch is answered before the next is read, so
memory holds one batch of full-resolution images whatever the number of files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from trainer.dicom_phantoms import cr_dataset
from trainer.phantoms import make_phantom
from worker.config import Settings
from worker.model import OnnxModel
from worker.pipeline import Processor, Result, process_files

pytestmark = pytest.mark.integration


def test_results_come_per_batch_not_at_the_end(onnx_model: Path, tmp_path: Path) -> None:
    processor = Processor(Settings(select={"min_size": 32}, model={"batch_size": 2}),
                          OnnxModel(onnx_model, providers="cpu"))
    files = []
    for i in range(5):
        image, _ = make_phantom(np.random.default_rng(i), 96, bool(i % 2))
        cr_dataset(image).save_as(tmp_path / f"{i}.dcm", enforce_file_format=True)
        files.append(tmp_path / f"{i}.dcm")
    pulled: list[Path] = []

    def paths() -> Iterator[Path]:
        for p in files:
            pulled.append(p)
            yield p

    stream = process_files(paths(), processor)
    first = next(stream)
    assert pulled == files[:2]  # the first batch only: nothing else was read yet
    assert first[0] == files[0] and isinstance(first[1], Result)
    second = next(stream)
    assert second[0] == files[1] and len(pulled) == 2
    rest = list(stream)
    assert [p for p, _ in rest] == files[2:] and all(isinstance(r, Result) for _, r in rest)
