"""Worker benchmark (not a test): a 224-px ResNet-50 with in-graph Grad-CAM.

Measures, on this machine and in one run:
- per stage p50/p95 for the real CR chest (RG1_UNCR, 1955x1841): receive (C-STORE into the
  running worker), decode, preprocess, infer + Grad-CAM, build SC + SR, send (C-STORE of the
  results to a receiving SCP);
- end to end through ``cxr-worker serve`` between DCMTK ``storescu`` and ``storescp``: latency
  p50/p95 of one image at a time (storescu start to the SR and SC both at storescp), images/s
  with 1 and 4 concurrent storescu processes, each phase's stages (receive, decode, infer,
  build, send) from the worker's own ``cxr_stage_seconds`` histogram, the worker's peak RSS
  and the load average (the machine may be shared: compare runs made back to back);
- the cost of the out-of-distribution gate: the contract-v2 graph (``logit`` and ``ood_score``,
  a class-conditional Mahalanobis distance with a shared 2048x2048 precision matrix on the
  pooled conv5 features) against the v1 graph, same weights, same run;
- the cost of the heatmap faithfulness: the one extra run over the 9N perturbed inputs
  (and their imputation) against the v2 inference of the batch;
The Grad-CAM comparisons (pytorch-grad-cam, GradientTape under ``tf.function``, the model
without its Grad-CAM output, int8) are ``benchmarks/bench_gradcam.py``.

Usage: python benchmarks/bench_worker.py [--quick] [--trust-only]
       python benchmarks/bench_worker.py --e2e [--model MODEL.onnx | --int8] [--worker-root OTHER_CHECKOUT] [--tag NAME]
           [--no-faithfulness] [--worker-env CXR_SECTION__KEY=VALUE ...] [--peer-nagle]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from benchmarks.common import report, summary, timed  # noqa: E402

SIZE = 224


def export_models(work: Path) -> tuple[Path, Path]:
    """``(v1, v2)``: the benchmark's random-weight contract-v2 ResNet-50 (``benchmarks.models``)
    and the same graph cut back to the contract-v1 outputs (probability and Grad-CAM: no logit,
    no out-of-distribution score), so the gate's cost is the difference of the two."""
    import onnx
    from onnx.utils import Extractor

    from benchmarks.models import export_random
    from cxr_contract.model import INPUT_NAME, V1_OUTPUTS

    v2, _, _ = export_random(work)
    full = onnx.load(str(v2))
    v1 = Extractor(full).extract_model([INPUT_NAME], list(V1_OUTPUTS))
    v1.opset_import.extend([o for o in full.opset_import if o not in v1.opset_import])
    v1.ir_version = full.ir_version
    path = work / "v1.onnx"
    path.write_bytes(v1.SerializeToString())
    return path, v2


def bench_trust(v1: Path, v2: Path, repeat: int) -> dict[str, Any]:
    """Gate (v2 graph vs v1 graph, same weights) and faithfulness (one extra run of 9N) in the same
    process. The Grad-CAM comparisons with GradientTape and pytorch-grad-cam moved to
    ``benchmarks/bench_gradcam.py``."""
    import onnxruntime as ort

    from cxr_contract import faithfulness
    from worker.model import OnnxModel

    out: dict[str, Any] = {}
    s_v1 = ort.InferenceSession(str(v1), providers=["CPUExecutionProvider"])
    s_v2 = ort.InferenceSession(str(v2), providers=["CPUExecutionProvider"])
    v2_model = OnnxModel(v2, providers="cpu")
    for batch in (1, 8):
        x = np.random.default_rng(1).random((batch, SIZE, SIZE, 1), dtype=np.float32)
        t_v1 = timed(lambda x=x: s_v1.run(None, {"image": x}), repeat)
        t_v2 = timed(lambda x=x: s_v2.run(None, {"image": x}), repeat)
        cams = [p.gradcam for p in v2_model.predict(x)]
        t_faith = timed(lambda x=x, cams=cams: v2_model.faithfulness(x, cams), repeat)
        pairs = list(zip(x, cams, strict=True))
        ref = v2_model._faith_reference  # the worker's fill, from the model's metadata
        t_impute = timed(lambda pairs=pairs, ref=ref: [faithfulness.perturbed_inputs(a, c, reference=ref)
                                                       for a, c in pairs], repeat)
        per = 1000 / batch
        out[f"v1_predict_b{batch}"] = {**summary(t_v1), "ms_per_image": per * np.median(t_v1)}
        out[f"v2_predict_b{batch}"] = {**summary(t_v2), "ms_per_image": per * np.median(t_v2)}
        out[f"gate_overhead_b{batch}_pct"] = 100 * (np.median(t_v2) / np.median(t_v1) - 1)
        out[f"faithfulness_b{batch}"] = {**summary(t_faith), "ms_per_image": per * np.median(t_faith)}
        out[f"faithfulness_imputation_b{batch}"] = {**summary(t_impute), "ms_per_image": per * np.median(t_impute)}
        out[f"faithfulness_overhead_b{batch}_pct"] = 100 * np.median(t_faith) / np.median(t_v2)
    return out


def bench_stages(full: Path, repeat: int, *, faithfulness: bool = True) -> dict[str, Any]:
    import pydicom
    from pydicom.data import get_testdata_file

    from cxr_contract.pixels import resize_for_model
    from worker.config import Settings
    from worker.decode import dataset_to_unit_image
    from worker.model import OnnxModel
    from worker.pipeline import Processor

    path = Path(get_testdata_file("RG1_UNCR.dcm"))
    settings = Settings(model={"faithfulness": faithfulness})
    processor = Processor(settings, OnnxModel(full, providers="cpu"))
    ds = pydicom.dcmread(path)
    unit = dataset_to_unit_image(ds)
    decoded = processor.decode(path)
    assert not isinstance(decoded, str)
    pred = processor.model.predict(decoded.model_input[None])[0]
    out = {
        "read": summary(timed(lambda: pydicom.dcmread(path), repeat)),
        "decode": summary(timed(lambda: dataset_to_unit_image(pydicom.dcmread(path)), repeat)),
        "preprocess": summary(timed(lambda: resize_for_model(unit, SIZE), repeat)),
        "infer_gradcam": summary(timed(lambda: processor.model.predict(decoded.model_input[None]), repeat)),
        "build_sc_sr": summary(timed(lambda: processor.infer_and_build([decoded]), repeat)),
    }
    out["build_sc_sr"]["note"] = "includes one inference; subtract infer_gradcam for build alone"
    del pred
    return out


def export_e2e_model(target: Path, size: int = SIZE) -> Path:
    """A contract-v2 ResNet-50 (random weights) with the exporter's graph: the end-to-end
    run needs only its shape and cost. Its gate never fires (threshold 1e30) and its
    decision threshold is 0, so every image is answered with a painted heatmap and its
    faithfulness (the most expensive output), scaled so that the real chest's hottest cell is
    full colour."""
    import onnx

    from cxr_contract import faithfulness
    from cxr_contract.model import CONTRACT_VERSION, GRADCAM_OUTPUT, INPUT_NAME, Meta
    from trainer.config import ModelSection
    from trainer.export import prune_to_contract, to_onnx
    from trainer.model import build_model
    from trainer.ood import MahalanobisGate

    model = build_model(ModelSection(image_size=size, weights="none"))
    channels = int(model.get_layer("conv5_block3_out").output.shape[-1])
    gate = MahalanobisGate(means=np.zeros((2, channels)), whitening=np.eye(channels), shrinkage=0.0, n_train=2)
    proto = prune_to_contract(to_onnx(model, "conv5_block3_out", size, gate))
    import onnxruntime as ort
    import pydicom
    from pydicom.data import get_testdata_file

    from worker.decode import dataset_to_model_input

    x = dataset_to_model_input(pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm")), size)[None]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (cam,) = session.run([GRADCAM_OUTPUT], {INPUT_NAME: x})
    onnx.helper.set_model_props(proto, {
        Meta.CONTRACT_VERSION: str(CONTRACT_VERSION), Meta.NAME: "bench-resnet50", Meta.VERSION: "bench-e2e",
        Meta.INPUT_SIZE: str(size), Meta.THRESHOLD: "0.0", Meta.WEIGHTS_SHA256: "0" * 64,
        Meta.FEATURE_LAYER: "conv5_block3_out",
        Meta.OOD_THRESHOLD: "1e30", Meta.HEATMAP_SCALE: f"{max(float(cam.max()), 1e-12):.6g}",
        Meta.PRECISION: "fp32",
        # Heatmap faithfulness as an exported model states it, so its run is in the numbers
        # (a model without a cut-off and its reference states none and skips the run).
        Meta.FAITHFULNESS_CUTOFF: "0",
        Meta.FAITHFULNESS_REFERENCE: faithfulness.encode_reference(faithfulness.reference_image(x))})
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(target))
    return target


def quantize_e2e_model(fp32: Path, target: Path, size: int = SIZE, variant: str | None = None) -> Path:
    """The end-to-end model reduced to int8 by ``trainer.quantize.quantize_int8``,
    calibrated on the real chest and 15 phantoms (the runs in docs/benchmarks.md), in
    ``variant`` (default: the one export tries first on this CPU, u8s8 with VNNI; random
    weights make export's own verification meaningless, so none is run here)."""
    import pydicom
    from pydicom.data import get_testdata_file

    from cxr_contract.pixels import resize_for_model, to_unit_range
    from trainer.phantoms import make_phantom
    from trainer.quantize import int8_variants, quantize_int8
    from worker.decode import dataset_to_model_input

    rng = np.random.default_rng(0)
    calibration = [dataset_to_model_input(pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm")), size)]
    for i in range(15):
        image, _ = make_phantom(rng, 256, bool(i % 2))
        calibration.append(resize_for_model(to_unit_range(image), size)[..., None])
    return Path(quantize_int8(fp32, np.stack(calibration).astype(np.float32), target,
                              variant=variant or int8_variants()[0]))


STAGES = ("receive", "decode", "infer", "build", "send")
STORESCU, STORESCP = "/usr/bin/storescu", "/usr/bin/storescp"
#: DCMTK leaves Nagle's algorithm on unless told; Orthanc (``TcpNoDelay``, default true) and
#: most PACS switch it off. The stand-in sender and PACS do as a PACS does (``--peer-nagle``:
#: leave it on, which adds DCMTK's delayed-ACK stalls, ~40 ms per object, to the worker's numbers).
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}


def rg1_copies(folder: Path, n: int) -> list[Path]:
    """``n`` copies of the real CR chest, each a new instance (the worker answers an instance once)."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    src = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    paths = []
    for i in range(n):
        src.SOPInstanceUID = generate_uid()
        src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
        path = folder / f"rg1_{i:04d}.dcm"
        src.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def stage_histograms(metrics_port: int) -> dict[str, dict[str, Any]]:
    """The worker's own ``cxr_stage_seconds`` histogram: per stage, cumulative bucket counts and sum."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    out: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        if not line.startswith("cxr_stage_seconds"):
            continue
        name, value = line.rsplit(" ", 1)
        labels = dict(part.split("=", 1) for part in name[name.index("{") + 1 : name.rindex("}")].split(","))
        stage = labels["stage"].strip('"')
        entry = out.setdefault(stage, {"buckets": {}, "sum": 0.0, "count": 0.0})
        if name.startswith("cxr_stage_seconds_bucket"):
            entry["buckets"][float(labels["le"].strip('"'))] = float(value)
        elif name.startswith("cxr_stage_seconds_sum"):
            entry["sum"] = float(value)
        elif name.startswith("cxr_stage_seconds_count"):
            entry["count"] = float(value)
    return out


def stage_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Per stage between two scrapes: count, mean and bucket-interpolated p50/p95 (ms)."""
    out: dict[str, Any] = {}
    for stage in STAGES:
        a, b = after.get(stage), before.get(stage, {"buckets": {}, "sum": 0.0, "count": 0.0})
        if a is None:
            continue
        count = a["count"] - b["count"]
        if count <= 0:
            continue
        edges = sorted(a["buckets"])
        cum = [a["buckets"][e] - b["buckets"].get(e, 0.0) for e in edges]

        def quantile(q: float, edges: list[float] = edges, cum: list[float] = cum, count: float = count) -> float:
            rank, lo, below = q * count, 0.0, 0.0
            for edge, c in zip(edges, cum, strict=True):
                if c >= rank:
                    if edge == float("inf"):
                        return lo
                    return lo + (edge - lo) * (rank - below) / max(c - below, 1e-12)
                lo, below = edge, c
            return lo

        out[stage] = {"n": int(count), "mean_ms": 1000 * (a["sum"] - b["sum"]) / count,
                      "p50_ms": 1000 * quantile(0.5), "p95_ms": 1000 * quantile(0.95)}
    return out


class Outputs:
    """DCMTK storescp standing in for the PACS; files are counted as they appear."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        folder.mkdir(parents=True)
        self.proc = subprocess.Popen([STORESCP, "+xa", "-aet", "RECV", "-od", str(folder), str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=PEER_ENV)

    def count(self) -> int:
        return sum(1 for _ in os.scandir(self.folder))

    def wait_for(self, n: int, timeout: float, poll: float = 0.005) -> float:
        """perf_counter() when at least ``n`` files are there (raises on timeout)."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.count() >= n:
                return time.perf_counter()
            time.sleep(poll)
        raise TimeoutError(f"{self.count()} of {n} outputs after {timeout:.0f} s")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def storescu(port: int, files: list[Path]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([STORESCU, "-aet", "BENCH", "-aec", "CXR-GRADCAM", "127.0.0.1", str(port),
                             *map(str, files)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=PEER_ENV)


def process_tree(pid: int) -> list[int]:
    """The process and its descendants (the answer processes of ``processing.workers``)."""
    tree, i = [pid], 0
    while i < len(tree):
        for task in Path(f"/proc/{tree[i]}/task").glob("*"):
            try:
                tree += [int(c) for c in (task / "children").read_text().split()]
            except FileNotFoundError:
                continue
        i += 1
    return tree


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) the process and its children have used so far."""
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> tuple[float, float]:
    """``(busy, total)`` CPU seconds of the whole machine so far (all cores, from /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(values) - idle) / tick, sum(values) / tick


class CpuUse:
    """The worker's CPU seconds per image and the machine's busy fraction over one phase:
    how much of the two cores the phase used, and how much the worker itself took."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.worker0 = process_cpu_s(pid)
        self.busy0, self.total0 = machine_busy_s()

    def result(self, images: int) -> dict[str, float]:
        busy, total = machine_busy_s()
        return {"worker_cpu_ms_per_image": 1000 * (process_cpu_s(self.pid) - self.worker0) / images,
                "machine_busy_fraction": (busy - self.busy0) / max(total - self.total0, 1e-9)}


def peak_rss_each_mib(pid: int) -> list[float]:
    """The peak RSS of the process, then of each child (its answer processes)."""
    peaks = []
    for p in process_tree(pid):
        status = Path(f"/proc/{p}/status").read_text()
        peaks.append(int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM"))) / 1024)
    return peaks


def peak_rss_mib(pid: int) -> float:
    """The sum of the peaks of the process and its children: an upper bound of their joint peak."""
    return sum(peak_rss_each_mib(pid))


def bench_end_to_end(model: Path, work: Path, *, root: Path, latency_images: int, interval_s: float,
                     throughput_images: int, senders: tuple[int, ...] = (1, 4), warmup: int = 3,
                     worker_env: dict[str, str] | None = None) -> dict[str, Any]:
    """``cxr-worker serve`` (run from the source tree ``root``) between DCMTK storescu and storescp.

    Latency: one image at a time, ``interval_s`` apart (a steady low rate), from starting
    storescu (the C-STORE request) to the last output (SC, SR and, where a heatmap is drawn, the
    GSPS) at storescp. Throughput:
    ``throughput_images`` split over each number of concurrent storescu processes, from the
    first start to the last output. Stages: the worker's own histograms, per phase.
    """
    from tests.helpers import free_port, wait_port

    files = rg1_copies(work / "in", warmup + latency_images + throughput_images * len(senders))
    wport, rport, mport = free_port(), free_port(), free_port()
    outputs = Outputs(work / "out", rport)
    log = open(work / "worker.log", "ab")  # noqa: SIM115 (closed when the worker has stopped)
    env = {**os.environ, "PYTHONPATH": str(root), "CXR_SPOOL__RESERVE_MB": "0", "CXR_METRICS__PORT": str(mport),
           "CXR_AUDIT__PATH": str(work / "audit.jsonl"), **(worker_env or {})}
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "serve", "--bind", "127.0.0.1", "--port", str(wport), "--model",
         str(model), "--spool", str(work / "spool"), "--destination", f"RECV@127.0.0.1:{rport}"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    out: dict[str, Any] = {"worker_root": str(root), "model": str(model), "worker_env": worker_env or {},
                           "precision": meta.get("precision", "fp32"), "int8_variant": meta.get("int8_variant"),
                           "states_faithfulness": "faithfulness_reference" in meta}
    try:
        wait_port(wport, 120)
        wait_port(rport, 30)
        wait_port(mport, 30)
        queue = iter(files)
        # Objects per image: SC and SR, and a GSPS where a heatmap is drawn (output.gsps): every
        # image is the same chest, so the first one tells, once nothing more arrives for a while.
        storescu(wport, [next(queue)]).wait()
        outputs.wait_for(2, 300)
        time.sleep(3.0)
        per_image = outputs.count()
        out["objects_per_image"] = per_image
        done = per_image
        for _ in range(warmup - 1):  # first runs allocate ONNX Runtime's arenas and import lazily
            storescu(wport, [next(queue)]).wait()
            done += per_image
            outputs.wait_for(done, 300)
        # Latency at a steady low rate: the next image starts interval_s after the last one did.
        before = stage_histograms(mport)
        load = os.getloadavg()
        cpu = CpuUse(worker.pid)
        latencies = []
        for _ in range(latency_images):
            t0 = time.perf_counter()
            storescu(wport, [next(queue)]).wait()
            done += per_image
            latencies.append(outputs.wait_for(done, 300) - t0)
            time.sleep(max(0.0, interval_s - (time.perf_counter() - t0)))
        out["latency"] = {**summary(latencies), "interval_s": interval_s,
                          "stages": stage_delta(before, stage_histograms(mport)),
                          "load_average_1m": [load[0], os.getloadavg()[0]], **cpu.result(latency_images)}
        for n in senders:
            batch = [next(queue) for _ in range(throughput_images)]
            before = stage_histograms(mport)
            load = os.getloadavg()
            cpu = CpuUse(worker.pid)
            t0 = time.perf_counter()
            procs = [storescu(wport, batch[k::n]) for k in range(n)]
            for p in procs:
                p.wait()
            done += per_image * len(batch)
            elapsed = outputs.wait_for(done, 600) - t0
            out[f"senders_{n}"] = {"images": len(batch), "seconds": elapsed, "images_per_s": len(batch) / elapsed,
                                   "stages": stage_delta(before, stage_histograms(mport)),
                                   "load_average_1m": [load[0], os.getloadavg()[0]],
                                   **cpu.result(len(batch))}
        out["worker_peak_rss_mib"] = peak_rss_mib(worker.pid)
        out["worker_peak_rss_each_mib"] = peak_rss_each_mib(worker.pid)
        out["worker_processes"] = len(out["worker_peak_rss_each_mib"])
        out["send_failures"] = counter_total(mport, "cxr_send_failures_total")
    finally:
        worker.terminate()
        worker.wait(60)
        log.close()
        outputs.stop()
        problems = [ln for ln in (work / "worker.log").read_text(errors="replace").splitlines()
                    if '"level": "ERROR"' in ln or "paused" in ln
                    or ('"level": "WARNING"' in ln and '"logger": "worker.send"' in ln)]
        out["worker_log_problems"] = problems[:20]
    return out


def counter_total(metrics_port: int, name: str) -> float:
    """Sum of a counter over its labels."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(name))


def end_to_end_rows(e2e: dict[str, Any]) -> list[tuple[str, str]]:
    lat = e2e["latency"]
    variant = f" {e2e['int8_variant']}" if e2e.get("int8_variant") else ""
    faith = {True: "on", False: "off (no cut-off)", None: "?"}[e2e.get("states_faithfulness")]
    if e2e.get("worker_env", {}).get("CXR_MODEL__FAITHFULNESS", "").lower() in ("0", "false"):
        faith = "off (model.faithfulness = false)"
    rows = [("model", f"{e2e.get('precision', '?')}{variant}, heatmap faithfulness {faith}"),
            ("end to end latency, one image at a time",
             f"p50 {lat['p50_ms'] / 1000:.2f} s, p95 {lat['p95_ms'] / 1000:.2f} s (goal p95 <= 0.3 s; "
             f"n={lat['n']}, one every {lat['interval_s']:.1f} s, load {lat['load_average_1m'][0]:.1f})")]
    phases = [("latency", lat)] + [(k, v) for k, v in e2e.items() if k.startswith("senders_")]
    for k, v in phases[1:]:
        goal = " (goal >= 8 with 4)" if k == "senders_4" else ""
        rows.append((f"end to end throughput, {k.replace('_', ' ')}",
                     f"{v['images_per_s']:.2f} images/s{goal} ({v['images']} images in {v['seconds']:.1f} s, "
                     f"load {v['load_average_1m'][0]:.1f})"))
    for k, v in phases:
        if "worker_cpu_ms_per_image" in v:
            rows.append((f"  worker CPU per image ({k.replace('_', ' ')})",
                         f"{v['worker_cpu_ms_per_image']:.0f} ms (machine busy "
                         f"{100 * v['machine_busy_fraction']:.0f} % of its {os.cpu_count()} cores)"))
        for stage, s in v["stages"].items():
            rows.append((f"  stage {stage} ({k.replace('_', ' ')})", f"mean {s['mean_ms']:.0f} ms, "
                         f"p50 ~{s['p50_ms']:.0f} ms, p95 ~{s['p95_ms']:.0f} ms (n={s['n']})"))
    rows.append(("worker peak RSS", f"{e2e['worker_peak_rss_mib'] / 1024:.2f} GiB (goal <= 1.5 GiB; sum of the "
                 f"peaks of its {e2e.get('worker_processes', 1)} processes: "
                 f"{', '.join(f'{m / 1024:.2f}' for m in e2e.get('worker_peak_rss_each_mib', []))})"))
    rows.append(("failed delivery attempts (retried)", f"{e2e.get('send_failures', 0):.0f}"))
    rows += [("worker log", line[:160]) for line in e2e.get("worker_log_problems", [])[:5]]
    return rows


def main() -> None:
    warnings.filterwarnings("ignore")  # highdicom's note on RG1's one-word referring physician
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--trust-only", action="store_true",
                   help="only the gate and faithfulness costs (results/bench_worker_trust.json)")
    p.add_argument("--e2e", action="store_true",
                   help="only the end-to-end run through cxr-worker serve (results/bench_worker_e2e.json)")
    p.add_argument("--model", type=Path, help="end to end on this exported model (e.g. an int8 one); "
                   "default: a 224-px contract-v2 ResNet-50 with random weights, exported for the run")
    p.add_argument("--int8", action="store_true", help="with no --model: reduce the exported model to int8 "
                   "(trainer.quantize)")
    p.add_argument("--worker-root", type=Path, default=Path(__file__).resolve().parent.parent,
                   help="source tree the worker runs from (another checkout, to compare before and after)")
    p.add_argument("--int8-variant", choices=("u8s8", "s8s8", "u8u8"),
                   help="with --int8: this signedness (default: the one export tries first on this CPU)")
    p.add_argument("--latency-images", type=int, default=20)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between latency images")
    p.add_argument("--throughput-images", type=int, default=24, help="per number of senders")
    p.add_argument("--tag", default="", help="suffix of the JSON file name (e.g. before, after)")
    p.add_argument("--no-faithfulness", action="store_true",
                   help="the worker without the per-image heatmap faithfulness (model.faithfulness = false)")
    p.add_argument("--worker-env", action="append", default=[], metavar="CXR_SECTION__KEY=VALUE",
                   help="a setting for the worker under test (repeatable), e.g. CXR_MODEL__BATCH_WAIT_MS=0")
    p.add_argument("--peer-nagle", action="store_true",
                   help="leave Nagle's algorithm on in DCMTK's storescu/storescp (DCMTK's default)")
    args = p.parse_args()
    if args.peer_nagle:
        PEER_ENV.pop("TCP_NODELAY", None)
    repeat = 5 if args.quick else 20
    stages: dict[str, Any] = {}
    e2e: dict[str, Any] = {}
    trust: dict[str, Any] = {}
    export_s = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.e2e:
            t = time.perf_counter()
            v1, v2 = export_models(work)
            export_s = time.perf_counter() - t
            trust = bench_trust(v1, v2, repeat)
        if not args.trust_only:
            if not args.e2e:
                stages = bench_stages(v2, repeat)
                stages_no_faith = bench_stages(v2, repeat, faithfulness=False)
                stages["build_sc_sr_without_faithfulness"] = stages_no_faith["build_sc_sr"]
            e2e_model = args.model or export_e2e_model(work / "e2e.onnx")
            if args.int8 and not args.model:
                e2e_model = quantize_e2e_model(e2e_model, work / "e2e_int8.onnx", variant=args.int8_variant)
            quick = 0.5 if args.quick else 1.0
            e2e = bench_end_to_end(e2e_model.resolve(), work / "e2e", root=args.worker_root.resolve(),
                                   latency_images=max(4, round(args.latency_images * quick)),
                                   interval_s=args.interval,
                                   throughput_images=max(4, round(args.throughput_images * quick)),
                                   worker_env={**({"CXR_MODEL__FAITHFULNESS": "false"} if args.no_faithfulness else {}),
                                               **dict(kv.split("=", 1) for kv in args.worker_env)})
    rows = [("export both models (s)", f"{export_s:.1f}")] if not args.e2e else []
    for k, v in stages.items():
        rows.append((f"stage {k} (RG1 1955x1841)", f"p50 {v['p50_ms']:.1f} ms  p95 {v['p95_ms']:.1f} ms"))
    if e2e:
        rows += end_to_end_rows(e2e)
    for k, v in trust.items():
        if isinstance(v, dict):
            rows.append((k, f"{v['ms_per_image']:.1f} ms/image (p50 {v['p50_ms']:.1f}, p95 {v['p95_ms']:.1f} ms)"))
        elif isinstance(v, float):
            rows.append((k, f"{v:+.1f} %"))
        else:
            rows.append((k, str(v)))
    name = "bench_worker_trust" if args.trust_only else "bench_worker_e2e" if args.e2e else "bench_worker"
    report(name + (f"_{args.tag}" if args.tag else ""), rows,
           {"input_size": SIZE, "export_seconds": export_s, "stages": stages, "end_to_end": e2e,
            "trust": trust})


if __name__ == "__main__":
    main()
