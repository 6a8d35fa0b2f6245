"""Peak memory of ``cxr-worker process`` over many real CR chests (not a test).

Copies pydicom-data's RG1_UNCR (a 1955x1841 CR chest, uncompressed) N times and runs
``cxr-worker process`` on each set as a subprocess; reports the child's peak RSS. A
streaming process keeps one batch in memory, so the peak must not grow with N (goal:
500 files under 1.5 GiB).

Usage: python benchmarks/bench_process_memory.py --model MODEL.onnx [--files 20 60 500]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import report  # noqa: E402


def peak_rss_mib(model: Path, n: int, work: Path) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one ``cxr-worker process`` run over ``n`` copies."""
    from pydicom.data import get_testdata_file

    source = Path(str(get_testdata_file("RG1_UNCR.dcm")))
    inputs, out = work / f"in-{n}", work / f"out-{n}"
    inputs.mkdir()
    for i in range(n):
        try:
            os.link(source, inputs / f"{i:04d}.dcm")  # the same bytes, no disk used
        except OSError:
            shutil.copy(source, inputs / f"{i:04d}.dcm")
    config = work / "process.toml"
    config.write_text("[select]\nmin_size = 32\n[log]\nformat = \"text\"\nlevel = \"WARNING\"\n")
    # A fresh interpreter per run: RUSAGE_CHILDREN keeps the largest child's peak, so run
    # each size in its own wrapper process and read that wrapper's children.
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
            "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    started = time.perf_counter()
    out_text = subprocess.run(
        [sys.executable, "-c", code, sys.executable, "-m", "worker.cli", "process", str(inputs), "--out", str(out),
         "--config", str(config), "--model", str(model)],
        check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent).stdout
    seconds = time.perf_counter() - started
    shutil.rmtree(inputs)
    shutil.rmtree(out)
    return int(out_text.split()[-1]) / 1024, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--files", type=int, nargs="+", default=[20, 60])
    args = p.parse_args()
    rows, data = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.files:
            mib, seconds = peak_rss_mib(args.model, n, Path(tmp))
            rows.append((f"{n} x RG1_UNCR (1955x1841 CR)", f"peak RSS {mib:,.0f} MiB, {seconds:.0f} s"))
            data[str(n)] = {"peak_rss_mib": mib, "seconds": seconds}
    report("bench_process_memory", rows, {"runs": data, "model": str(args.model)})


if __name__ == "__main__":
    main()
