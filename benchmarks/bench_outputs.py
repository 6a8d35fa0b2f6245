"""Size and build time of the Secondary Capture for the real RG1 chest (1955 x 1841 CR), per
``output.sc_compression``: none, jpeg (the default) and jpeg2000; and the CPU of its SR, built
by highdicom for every image (``build_report_highdicom``) against filled into the template
highdicom built once for the report's shape (``build_report``), both in the same run.

Build = ``build_secondary_capture`` (highdicom's SC plus the encoding); encode = the encoding
alone, the part compression adds. Writes ``benchmarks/results/bench_outputs.json`` and, to look at
the burned-in text and colour bar at 100 %, ``previews/bench_outputs_<compression>.png`` there (the
decoded SC; not committed, 3-4 MB each).

    PYTHONPATH=. python benchmarks/bench_outputs.py [--repeat 10]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
import warnings
from typing import Any

import cv2
import numpy as np
import pydicom
from pydicom.data import get_testdata_file

from benchmarks.common import OUT, report, summary, timed
from cxr_contract.model import ModelInfo
from worker.decode import dataset_to_unit_image
from worker.outputs import BuildSettings, Trust, build_secondary_capture, output_uids, render_heatmap_overlay
from worker.outputs.sc import _compress
from worker.outputs.sr import TEMPLATES, build_report, build_report_highdicom
from worker.pipeline import encode

MODEL = ModelInfo(name="bench-model", version="1.0.0", input_size=224, threshold=0.5, weights_sha256="ab" * 32,
                  contract_version=2, ood_threshold=10.0, heatmap_scale=4.0, faithfulness_cutoff=1.25)


def psnr(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def cpu_ms(fn: Any, repeat: int) -> float:
    """Median CPU time of ``fn`` in ms: the encoders are single-threaded, so on a loaded machine
    this is closer to what a quiet one measures as wall time."""
    out = []
    for _ in range(repeat):
        t = time.process_time()
        fn()
        out.append(time.process_time() - t)
    return 1000 * statistics.median(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # RG1's one-component Referring Physician name, said on every build
    source = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    cam = np.zeros((7, 7), np.float32)
    cam[3:6, 1:4] = 3.0  # a hot area over the right lung
    rgb = render_heatmap_overlay(dataset_to_unit_image(source), cam, probability=0.87, threshold=0.5,
                                 model_name=MODEL.name, model_version=MODEL.version, heatmap_scale=4.0,
                                 faithfulness=1.2)
    uids = output_uids(source, MODEL.version)
    rows: list[tuple[str, str]] = [("image", f"RG1_UNCR {rgb.shape[0]} x {rgb.shape[1]} RGB, "
                                             f"{rgb.nbytes / 1e6:.1f} MB raw")]
    results: dict[str, Any] = {}
    for compression in ("none", "jpeg", "jpeg2000"):
        settings = BuildSettings(sc_compression=compression)
        repeat = args.repeat if compression != "jpeg2000" else max(2, args.repeat // 5)
        build = summary(timed(lambda s=settings: build_secondary_capture(source, rgb, uids, MODEL, s), repeat))
        plain = build_secondary_capture(source, rgb, uids, MODEL, BuildSettings(sc_compression="none"))
        encode = summary(timed(lambda c=compression, p=plain: _compress(p.copy(), rgb, source, c, 90), repeat))
        encode["cpu_p50_ms"] = cpu_ms(lambda c=compression, p=plain: _compress(p.copy(), rgb, source, c, 90), repeat)
        sc = build_secondary_capture(source, rgb, uids, MODEL, settings)
        buffer = io.BytesIO()
        sc.save_as(buffer, enforce_file_format=True)
        decoded = pydicom.dcmread(io.BytesIO(buffer.getvalue())).pixel_array
        (OUT / "previews").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(OUT / "previews" / f"bench_outputs_{compression}.png"),
                    cv2.cvtColor(decoded, cv2.COLOR_RGB2BGR))
        size = len(buffer.getvalue())
        results[compression] = {"file_bytes": size, "build": build, "encode": encode,
                                "psnr_db": psnr(decoded, rgb), "transfer_syntax": str(sc.file_meta.TransferSyntaxUID)}
        rows.append((f"{compression:<8} file", f"{size / 1e6:6.2f} MB   PSNR {psnr(decoded, rgb):5.1f} dB"))
        rows.append((f"{compression:<8} build p50/p95",
                     f"{build['p50_ms']:7.1f} / {build['p95_ms']:7.1f} ms   encode p50 {encode['p50_ms']:7.1f} ms"
                     f" (CPU {encode['cpu_p50_ms']:7.1f} ms)"))
    sr, sr_rows = bench_sr(source, args.repeat * 10)
    rows += sr_rows
    report("bench_outputs", rows, {"sc_quality": 90, "repeat": args.repeat, "results": results, "sr": sr})


def bench_sr(source: pydicom.Dataset, repeat: int) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """CPU of one SR as the pipeline builds it (an answered image, the gate passed, the heatmap's
    faithfulness and the review link), alone and with its encoding for sending."""
    settings = BuildSettings()
    uids = output_uids(source, MODEL.version)
    sc = build_secondary_capture(source, np.zeros((source.Rows, source.Columns, 3), np.uint8), uids, MODEL, settings)
    trust = Trust(ood_score=3.2, faithfulness=1.8)
    link = "https://dashboard.example.org/review/1.2.3?model=1.0.0"
    results: dict[str, Any] = {}
    rows: list[tuple[str, str]] = []
    for name, build in (("highdicom", build_report_highdicom), ("template", build_report)):
        def one(b: Any = build) -> pydicom.Dataset:
            return b(source, sc, 0.87, MODEL, uids, settings, trust=trust, review_url=link)
        TEMPLATES.clear()
        t = time.process_time()
        one()  # the template path's first image builds its template
        first = 1000 * (time.process_time() - t)
        results[name] = {"first_cpu_ms": first, "build": summary(timed(one, repeat)), "build_cpu_p50_ms":
                         cpu_ms(one, repeat), "build_encode_cpu_p50_ms": cpu_ms(lambda o=one: encode(o()), repeat)}
        r = results[name]
        rows.append((f"SR {name:<9} CPU p50", f"build {r['build_cpu_p50_ms']:6.2f} ms   build + encode "
                                              f"{r['build_encode_cpu_p50_ms']:6.2f} ms   first image {first:6.1f} ms"))
    results["speedup_build_encode"] = (results["highdicom"]["build_encode_cpu_p50_ms"]
                                       / results["template"]["build_encode_cpu_p50_ms"])
    rows.append(("SR speed-up (build + encode)", f"{results['speedup_build_encode']:.1f}x"))
    return {"repeat": repeat, **results}, rows


if __name__ == "__main__":
    main()
