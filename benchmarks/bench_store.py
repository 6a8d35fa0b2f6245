"""Results-store benchmark (not a test): what recording one answered image adds to the worker.

The worker's processing thread pays only the hand-over, ``Recorder.submit``: the 8-bit
preview (a resize to 1024 px) and a queue put. The recorder's own thread then pays
``ResultStore.record``: the PNG, the float16 Grad-CAM grid and one row. Both measured here
on the embedded SQLite (WAL) for a 2048-px image (the SC's size cap) and a 1024-px one,
and the worklist query the dashboard runs over many rows.

Usage: python benchmarks/bench_store.py [--n 200] [--rows 5000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import report, summary, timed  # noqa: E402
from tests.unit.worker.store.test_results import new  # noqa: E402
from worker.store import Recorder, ResultStore, Worklist, sqlite_url  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=200, help="records per image size")
    p.add_argument("--rows", type=int, default=5000, help="rows in the database for the worklist query")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    rows: list[tuple[str, str]] = []
    data: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as d:
        store = ResultStore(sqlite_url(Path(d) / "results.db"), Path(d) / "media")
        cam = rng.random((7, 7), dtype=np.float32)
        counter = iter(range(10**9))
        for side in (2048, 1024):
            # A smooth image compresses like a radiograph; noise would be the worst case.
            yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
            image = 0.5 + 0.3 * np.sin(6 * xx) * np.cos(4 * yy) + 0.02 * rng.standard_normal((side, side),
                                                                                                np.float32)
            recorder = Recorder(store, capacity=args.n + 8)
            def hand_over(image: np.ndarray = image, recorder: Recorder = recorder) -> None:
                recorder.submit(new(f"1.2.{next(counter)}"), image, cam)

            stats = summary(timed(hand_over, args.n, warmup=3))
            rows.append((f"worker thread: hand-over, {side} px", f"p50 {stats['p50_ms']:.1f} ms, "
                                                               f"p95 {stats['p95_ms']:.1f} ms"))
            data[f"handover_{side}px"] = stats
            recorder.close(timeout=600)
            stats = summary(timed(lambda image=image: store.record(new(f"1.2.{next(counter)}"), image, cam),
                                  args.n, warmup=3))
            rows.append((f"recorder thread: write, {side} px", f"p50 {stats['p50_ms']:.1f} ms, "
                                                               f"p95 {stats['p95_ms']:.1f} ms"))
            data[f"record_{side}px"] = stats
        while next(counter) < args.rows:
            store.record(new(f"1.3.{next(counter)}"), np.zeros((64, 64), np.float32), cam)
        stats = summary(timed(lambda: store.worklist(Worklist(limit=50)), 50))
        rows.append((f"worklist page, {args.rows}+ rows",
                     f"p50 {stats['p50_ms']:.1f} ms, p95 {stats['p95_ms']:.1f} ms"))
        data["worklist_page"] = stats
        stats = summary(timed(lambda: store.worklist(Worklist(search="PID7", limit=50)), 50))
        rows.append(("worklist search by patient ID", f"p50 {stats['p50_ms']:.1f} ms, p95 {stats['p95_ms']:.1f} ms"))
        data["worklist_search"] = stats
    report("bench_store", rows, data)


if __name__ == "__main__":
    main()
