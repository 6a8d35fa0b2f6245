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
