"""Pixel work per RG1 (1955x1841, 15-bit MONOCHROME1), this tree against another checkout.

Decodes the real CR chest and draws its SC overlay (painted answer, and a withheld one) with
the functions of this source tree and with those of ``--baseline-root`` (e.g. ``git archive
main | tar -x -C /tmp/base``), alternating in one process so that both see the same load,
and reports the largest per-channel difference of the two overlays (written as PNGs, side by
side, to look at). Not a test.

Usage: python benchmarks/bench_pixels.py --baseline-root /tmp/base [--repeat 10]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import OUT, report, summary, timed  # noqa: E402


def load_worker(root: Path) -> tuple[ModuleType, ModuleType]:
    """``worker.decode`` and the SC's renderer (``worker.outputs.render``; ``worker.build`` in trees
    before the outputs package) of the tree at ``root``, without disturbing ours."""
    ours = {k: v for k, v in sys.modules.items() if k == "worker" or k.startswith("worker.")}
    for k in ours:
        del sys.modules[k]
    sys.path.insert(0, str(root))
    try:
        decode = importlib.import_module("worker.decode")
        try:
            build = importlib.import_module("worker.outputs.render")
        except ModuleNotFoundError:
            build = importlib.import_module("worker.build")
    finally:
        sys.path.remove(str(root))
        for k in [k for k in sys.modules if k == "worker" or k.startswith("worker.")]:
            del sys.modules[k]
        sys.modules.update(ours)
    return decode, build


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--baseline-root", type=Path, required=True)
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args()
    import cv2
    import pydicom
    from pydicom.data import get_testdata_file

    new = load_worker(ROOT)
    old = load_worker(args.baseline_root.resolve())
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    unit = new[0].dataset_to_unit_image(ds)
    cam = np.zeros((7, 7), np.float32)
    cam[2:5, 1:4] = np.random.default_rng(3).random((3, 3)) * 2.0  # above the fixed scale: saturates
    cam[5, 5] = 0.6
    kw: dict[str, Any] = {"probability": 0.87, "threshold": 0.5, "model_name": "bench-resnet50",
                          "model_version": "bench", "heatmap_scale": 1.0, "faithfulness": 0.42}
    held: dict[str, Any] = {"reason": "OOD score 3.1 > threshold 2", "model_name": "m", "model_version": "v"}
    data: dict[str, Any] = {"load_average_1m": os.getloadavg()[0]}
    rows = []
    for name, before, after in [
        ("decode (stored pixels to unit image)", lambda: old[0].dataset_to_unit_image(ds),
         lambda: new[0].dataset_to_unit_image(ds)),
        ("overlay, painted answer", lambda: old[1].render_heatmap_overlay(unit, cam, **kw),
         lambda: new[1].render_heatmap_overlay(unit, cam, **kw)),
        ("overlay, withheld answer", lambda: old[1].render_withheld(unit, **held),
         lambda: new[1].render_withheld(unit, **held)),
    ]:
        t_old: list[float] = []
        t_new: list[float] = []
        for _ in range(args.repeat):  # alternate, so a change of load hits both
            t_old += timed(before, 1, warmup=0)
            t_new += timed(after, 1, warmup=0)
        a, b = before(), after()
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        per_channel = diff.reshape(-1, a.shape[-1] if a.ndim == 3 else 1).max(axis=0).tolist()
        data[name] = {"before": summary(t_old), "after": summary(t_new), "max_abs_diff_per_channel": per_channel,
                      "pixels_differing_pct": 100 * float((diff.reshape(a.shape[0], a.shape[1], -1) > 0)
                                                          .any(axis=-1).mean())}
        rows.append((name, f"{data[name]['before']['p50_ms']:.0f} -> {data[name]['after']['p50_ms']:.0f} ms p50, "
                     f"max |diff| per channel {per_channel}"))
        if name == "overlay, painted answer":
            OUT.mkdir(exist_ok=True)
            side = np.concatenate([a, b], axis=1)
            cv2.imwrite(str(OUT / "bench_pixels_overlay_before_after.png"),
                        cv2.cvtColor(cv2.resize(side, (side.shape[1] // 3, side.shape[0] // 3),
                                                interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2BGR))
    rows.append(("load average (1 min)", f"{data['load_average_1m']:.1f}"))
    report("bench_pixels", rows, data)


if __name__ == "__main__":
    main()
