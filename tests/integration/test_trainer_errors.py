"""Trainer commands on bad input end with one line naming the problem, never a traceback."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent.parent


def test_export_names_an_unreadable_test_image(tmp_path: Path) -> None:
    from trainer.config import load_config
    from trainer.fit import fit
    from trainer.phantoms import write_phantoms

    write_phantoms(tmp_path / "d", 12, size=64)
    fit(tmp_path / "d", tmp_path / "r", load_config(None, {"model": {"image_size": 64, "weights": "none"},
                                                           "train": {"epochs": 1, "batch_size": 8}}), verbose=0)
    with open(tmp_path / "d" / "test.csv", newline="") as f:
        first = Path(next(csv.DictReader(f))["path"])
    corrupt = first if first.is_absolute() else tmp_path / "d" / first
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = subprocess.run([sys.executable, "-m", "trainer.cli", "export", "--run", str(tmp_path / "r"),
                          "--out", str(tmp_path / "m.onnx"), "--threshold", "0.5"], capture_output=True, text=True,
                         timeout=600, cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 1, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("cxr-train")]
    assert errors == [f"cxr-train export: error: {corrupt}: not a readable image"], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "m.onnx").exists()
