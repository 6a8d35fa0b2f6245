"""How ``cxr-worker serve`` gathers a batch: it waits for more instances only while a
peer is still sending, so a lone study is answered without the batch wait."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers import phantom_file, storescu, wait_for

pytestmark = pytest.mark.integration


def test_lone_instance_is_not_held_for_a_batch(make_worker: Any, pacs: Any, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # A batch wait far longer than the test may take: an answer within the timeout shows
    # that the worker stopped waiting once the sender's association had ended.
    monkeypatch.setenv("CXR_MODEL__BATCH_WAIT_MS", "900000")
    worker = make_worker([f"PACS@127.0.0.1:{pacs.port}"])
    phantom_file(tmp_path / "one.dcm", True, seed=3)
    storescu(worker.port, [tmp_path / "one.dcm"])
    wait_for(lambda: len(pacs.files()) >= 2, 120, "SC + SR of a lone instance at the PACS")


def test_batch_built_on_both_cores_is_the_batch_built_image_by_image(onnx_model: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from worker.config import Settings
    from worker.model import OnnxModel
    from worker.pipeline import Decoded, Processor, Result

    monkeypatch.setenv("CXR_MODEL__OOD_ACTION", "flag")  # answered, so the heatmap is drawn
    model = OnnxModel(onnx_model, providers="cpu")
    settings = Settings(select={"min_size": 32}, output={"heatmap_for_negative": True})
    paths = []
    for seed in range(3):
        phantom_file(tmp_path / f"{seed}.dcm", bool(seed % 2), seed=seed)
        paths.append(tmp_path / f"{seed}.dcm")
    serial, pooled = Processor(settings, model, build_threads=1), Processor(settings, model, build_threads=3)
    batch = [d for d in (serial.decode(p) for p in paths) if isinstance(d, Decoded)]
    assert len(batch) == len(paths)
    one_by_one = serial.infer_and_build(batch)
    together = pooled.infer_and_build(batch)
    for a, b, path in zip(one_by_one, together, paths, strict=True):
        assert isinstance(a, Result) and isinstance(b, Result), (a, b)
        assert a.sop_instance_uid == b.sop_instance_uid == str(pydicom_uid(path))
        assert a.encoded is not None and b.encoded is not None
        np.testing.assert_array_equal(a.sc.pixel_array, b.sc.pixel_array)
        assert a.sr.SOPInstanceUID == b.sr.SOPInstanceUID and a.probability == b.probability


def pydicom_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
