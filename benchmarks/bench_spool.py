"""Spool and outbox cost per instance as the queue grows (not a test).

Drains N queued instances through the spool (accept, then claim in batches of 8 and
finish) and walks N results through the outbox index (put, then due rounds of 32), for
N = 1,000 and 10,000 by default. With the in-memory index the time per instance stays
flat; a rescan per batch would make it grow with N.

Usage: python benchmarks/bench_spool.py [--sizes 1000 10000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import report  # noqa: E402
from worker.config import SendSection  # noqa: E402
from worker.send import Outbox  # noqa: E402
from worker.spool import Spool  # noqa: E402


def drain_us(root: Path, n: int) -> float:
    """Microseconds per instance to claim and finish ``n`` queued instances."""
    spool = Spool(root)
    for i in range(n):
        (spool.incoming / str(i)).write_bytes(b"x")
        spool.accept(spool.incoming / str(i))
    spool = Spool(root)  # as after a restart: the index is built from the folder once
    started = time.perf_counter()
    while batch := spool.claim(8):
        for path in batch:
            spool.finish(path)
    return 1e6 * (time.perf_counter() - started) / n


def due_us(root: Path, n: int) -> float:
    """Microseconds per result to find every due result, 32 per round, and drop it."""
    outbox = Outbox(Spool(root), SendSection(destinations=["PACS@127.0.0.1:1"]), "CXR")
    for i in range(n):
        outbox.put(f"{i:032x}", b"r", f"1.2.{i}")
    outbox = Outbox(Spool(root), SendSection(destinations=["PACS@127.0.0.1:1"]), "CXR")
    now = time.time() + 1
    started = time.perf_counter()
    while due := outbox.due(now):
        for dkey, items in due.items():
            with outbox._lock:  # what a delivery does to the index, without the network
                for path, _ in items:
                    outbox._states[dkey].pop(path.stem, None)
    return 1e6 * (time.perf_counter() - started) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    args = p.parse_args()
    rows, data = [], {}
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            drain, due = drain_us(Path(a), n), due_us(Path(b), n)
        rows.append((f"{n:,} instances", f"spool claim+finish {drain:.0f} us/instance, outbox due {due:.1f} us/result"))
        data[str(n)] = {"spool_drain_us_per_instance": drain, "outbox_due_us_per_result": due}
    report("bench_spool", rows, data)


if __name__ == "__main__":
    main()
