"""Shared benchmark plumbing: timing statistics, a table, JSON output."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "results"


def timed(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeat`` calls after ``warmup`` unmeasured ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def summary(seconds: list[float]) -> dict[str, float]:
    s = sorted(seconds)
    p95 = s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]
    return {"n": len(s), "p50_ms": 1000 * statistics.median(s), "p95_ms": 1000 * p95,
            "mean_ms": 1000 * statistics.fmean(s)}


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), which the docs print beside every number."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    import datetime
    import os

    return {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cpu_model": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")}


def report(name: str, rows: list[tuple[str, str]], data: dict[str, Any]) -> Path:
    """Print a two-column table and write ``benchmarks/results/<name>.json``."""
    width = max(len(k) for k, _ in rows)
    print(f"\n{name}")
    print("-" * (width + 40))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
    print(f"\nwritten: {path}")
    return path
