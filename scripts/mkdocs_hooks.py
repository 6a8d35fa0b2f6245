"""MkDocs hooks: the benchmark tables are read from ``benchmarks/results/*.json`` at build time.

A page writes ``<!-- bench: FILE.json [FILE2.json ...] | COMMAND -->``; the hook replaces it
with the command, the machine (cores, CPU model, GPU) and the date of the run, and the table
its renderer makes from the JSON. Numbers are never copied into the docs by hand.
The root ``CHANGELOG.md`` is served as the page ``changelog.md``.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"<!--\s*bench:\s*(?P<files>[^|]+?)\s*\|\s*(?P<command>.+?)\s*-->")


def _load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


def _date(name: str, data: dict[str, Any]) -> str:
    """The run's date: recorded in the JSON by newer runs, else the commit that wrote the file."""
    recorded = data.get("machine", {}).get("date")
    if recorded:
        return str(recorded)[:10]
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%cs", "--", str(RESULTS / name)], cwd=ROOT,
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or "not recorded"


def _machine(name: str, data: dict[str, Any]) -> str:
    m = data.get("machine", {})
    cpu = m.get("cpu_model") or "CPU model not recorded"
    gpu = data.get("gpu") or m.get("gpu") or "no GPU"
    if isinstance(gpu, str):
        gpu = gpu.split(",")[0]
    return f"{m.get('cores', '?')} cores, {cpu}, {gpu}; {_date(name, data)}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _ms(x: float) -> str:
    return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def _pct(x: float) -> str:
    return f"{x:+.1f} %"


# --- one renderer per benchmark --------------------------------------------------------------------------------

def worker_quick(d: dict[str, Any]) -> str:
    s, i = d["stages"], d["inference"]
    rows = [["decode RG1 (1955x1841, MONOCHROME1, 15-bit), p50 / p95", f"{_ms(s['decode']['p50_ms'])} / "
             f"{_ms(s['decode']['p95_ms'])} ms"],
            ["preprocess (resize to 224), p50", f"{_ms(s['preprocess']['p50_ms'])} ms"],
            ["probability + Grad-CAM, batch 1 / 8, per image", f"{_ms(i['onnx_gradcam_b1']['ms_per_image'])} / "
             f"{_ms(i['onnx_gradcam_b8']['ms_per_image'])} ms"],
            ["probability only (same weights), batch 1 / 8", f"{_ms(i['onnx_plain_b1']['ms_per_image'])} / "
             f"{_ms(i['onnx_plain_b8']['ms_per_image'])} ms"],
            ["cost of the Grad-CAM output, batch 1 / 8", f"{_pct(i['gradcam_overhead_b1_pct'])} / "
             f"{_pct(i['gradcam_overhead_b8_pct'])}"],
            ["Grad-CAM with Keras' GradientTape, batch 1 / 8", f"{_ms(i['keras_gradienttape_b1']['ms_per_image'])}"
             f" / {_ms(i['keras_gradienttape_b8']['ms_per_image'])} ms"],
            ["build SC (full resolution) + SR, including one inference, p50 / p95",
             f"{_ms(s['build_sc_sr']['p50_ms'])} / {_ms(s['build_sc_sr']['p95_ms'])} ms"]]
    return _table(["measurement", "result"], rows)


def trust(d: dict[str, Any]) -> str:
    t = d["trust"]
    rows = [["contract-v1 graph (probability + Grad-CAM), ms/image", *(_ms(t[f"v1_predict_b{b}"]["ms_per_image"])
                                                                        for b in (1, 8))],
            ["contract-v2 graph (+ logit + ood_score), ms/image", *(_ms(t[f"v2_predict_b{b}"]["ms_per_image"])
                                                                     for b in (1, 8))],
            ["cost of the out-of-distribution gate", *(_pct(t[f"gate_overhead_b{b}_pct"]) for b in (1, 8))],
            ["heatmap faithfulness (imputation + one extra run of 2N), ms/image",
             *(_ms(t[f"faithfulness_b{b}"]["ms_per_image"]) for b in (1, 8))],
            ["of which the imputation, ms/image", *(_ms(t[f"faithfulness_imputation_b{b}"]["ms_per_image"])
                                                    for b in (1, 8))],
            ["cost of the faithfulness over v2 inference", *(_pct(t[f"faithfulness_overhead_b{b}_pct"])
                                                             for b in (1, 8))]]
    return _table(["measurement", "batch 1", "batch 8"], rows)


def e2e(*runs: dict[str, Any]) -> str:
    rows = []
    for d in runs:
        e = d["end_to_end"]
        lat, one, four = e["latency"], e["senders_1"], e["senders_4"]
        st = lat["stages"]
        model = e.get("precision", Path(str(e.get("model", "?"))).name) + (
            f" {e['int8_variant']}" if e.get("int8_variant") else "")
        env = e.get("worker_env", {})
        if "states_faithfulness" in e:
            off = not e["states_faithfulness"] or env.get("CXR_MODEL__FAITHFULNESS", "").lower() in ("0", "false")
            model += ", faithfulness " + ("off" if off else "on")
        if env.get("CXR_PROCESSING__WORKERS"):
            model += f", workers {env['CXR_PROCESSING__WORKERS']}"
        rows.append([model,
                     f"{lat['p50_ms'] / 1000:.2f} / {lat['p95_ms'] / 1000:.2f} s",
                     f"{one['images_per_s']:.2f} / {four['images_per_s']:.2f}",
                     " / ".join(f"{st[k]['mean_ms']:.0f}" for k in ("receive", "decode", "infer", "build", "send")),
                     f"{e['worker_peak_rss_mib'] / 1024:.2f} GiB", str(e.get("send_failures", "?"))])
    return _table(["model", "latency p50 / p95", "images/s, 1 / 4 senders",
                   "receive / decode / infer / build / send, mean ms", "worker peak RSS", "send failures"], rows)


def precision(d: dict[str, Any]) -> str:
    rows = [[f"batch {b} (p50 / min)", *(f"{_ms(d[f'{p}_batch{b}']['p50_ms'])} / {_ms(d[f'{p}_batch{b}']['min_ms'])}"
                                         for p in ("fp32", "int8")),
             f"{d[f'int8_speedup_batch{b}']:.2f}x / {d[f'int8_speedup_batch{b}_min']:.2f}x",
             f"{_ms(d[f'fp16_batch{b}']['p50_ms'])} / {_ms(d[f'fp16_batch{b}']['min_ms'])}"] for b in (1, 8)]
    size = d["model_mb"]
    rows.append(["model size", f"{size['fp32']} MB", f"{size['int8']} MB", "", f"{size['fp16']} MB"])
    return _table(["ms/image", "fp32", "int8", "int8 speed-up", "fp16 on the CPU"], rows)


def outputs(d: dict[str, Any]) -> str:
    rows = []
    for name, r in d["results"].items():
        psnr = "lossless" if r["psnr_db"] == float("inf") else f"{r['psnr_db']:.1f} dB"
        enc = "—" if name == "none" else f"{_ms(r['encode']['p50_ms'])} / {_ms(r['encode']['cpu_p50_ms'])} ms"
        rows.append([f"`{name}`", f"{r['file_bytes'] / 1e6:.2f} MB", psnr, f"{_ms(r['build']['p50_ms'])} ms", enc])
    table = _table(["`output.sc_compression`", "file", "PSNR", "build p50 (wall)", "encode p50 wall / CPU"], rows)
    sr = d.get("sr")
    if not sr:
        return table
    labels = {"highdicom": "highdicom for every image (`build_report_highdicom`)",
              "template": "template filled per image (`build_report`)"}
    sr_rows = [[label, f"{_ms(sr[k]['build_cpu_p50_ms'])} ms", f"{_ms(sr[k]['build_encode_cpu_p50_ms'])} ms",
                f"{_ms(sr[k]['first_cpu_ms'])} ms"] for k, label in labels.items()]
    sr_rows.append(["speed-up", "", f"{sr['speedup_build_encode']:.1f}x", ""])
    return table + "\n\n" + _table(["SR, CPU per image (p50)", "build", "build + encode", "first image"], sr_rows)


def gradcam(d: dict[str, Any]) -> str:
    int8 = d.get("int8", {})
    first = int8.get("export_first_choice")
    variants = {k: f"ours: ONNX Runtime int8, {k.removeprefix('onnx_int8_')}"
                + (" (export's first try on this CPU)" if k == f"onnx_int8_{first}" else "")
                for k in d if k.startswith("onnx_int8_")}
    names = {"pytorch_grad_cam": "pytorch-grad-cam on torchvision's ResNet-50",
             "tf_gradienttape_tf_function": "TensorFlow GradientTape Grad-CAM under `tf.function`",
             "onnx_fp32": "ours: ONNX Runtime fp32, in-graph Grad-CAM", **variants,
             "onnx_fp32_no_gradcam": "the same fp32 model without Grad-CAM"}

    def cell(row: dict[str, Any]) -> str:
        least = row.get("ms_per_image_min")
        return _ms(row["ms_per_image"]) + (f" / {_ms(least)}" if least else "")

    ratios = d.get("ratios", {})
    rows = [[label, *(cell(d[key][f"b{b}"]) for b in (1, 8))]
            for key, label in names.items() if isinstance(d.get(key), dict) and "b1" in d[key]]
    for key, label in variants.items():
        name = f"{key.removeprefix('onnx_')}_speedup_vs_pytorch_b"
        if all(ratios.get(f"{name}{b}") for b in (1, 8)):
            rows.append([f"pytorch-grad-cam / {label.removeprefix('ours: ONNX Runtime ')}",
                         *(f"{ratios[f'{name}{b}']:.1f}x" + (f" / {ratios[f'{name}{b}_min']:.1f}x"
                                                             if f"{name}{b}_min" in ratios else "")
                           for b in (1, 8))])
    goal = d.get("goals", {}).get("int8_speedup_vs_pytorch_b8")
    if goal and first:
        rows.append([f"goal: pytorch-grad-cam / int8 {first}", "", f"{goal.split(' (')[0]}x"])
    if "cpu_vnni" in int8:
        rows.append(["CPU with VNNI (8-bit dot products, 32-bit sums)", "", "yes" if int8["cpu_vnni"] else "no"])
    threads = d.get("threads", {})
    if threads:
        rows.append(["intra-op threads: ONNX Runtime / torch / TensorFlow", "",
                     " / ".join(str(threads.get(k, "?")) for k in ("onnxruntime", "torch", "tensorflow"))])
    versions = d.get("pytorch_grad_cam", {}).get("versions") if isinstance(d.get("pytorch_grad_cam"), dict) else None
    if versions:
        rows.append(["torch / torchvision", "", f"{versions['torch']} / {versions['torchvision']}"])
    rows.append(["load average, start / end", "", f"{d.get('load_avg_start', '?')} / {d.get('load_avg_end', '?')}"])
    return _table(["ms per image (median / least disturbed run)", "batch 1", "batch 8"], rows)


def gpu(d: dict[str, Any]) -> str:
    batches = d["batches"]

    def cell(r: dict[str, Any]) -> str:
        return f"{r['images_per_s']:,.0f} ({r['p50_ms']:.2f} / {r['p95_ms']:.2f} ms)"

    rows = [["fp32: probability + Grad-CAM", *(cell(d["fp32"][f"b{b}"]) for b in batches)],
            ["fp16", *(cell(d["fp16"][f"b{b}"]) for b in batches)],
            ["fp32 + faithfulness run (the worker's default)",
             *(cell(d["fp32"][f"b{b}"]["with_faithfulness"]) for b in batches)],
            ["fp16 + faithfulness run", *(cell(d["fp16"][f"b{b}"]["with_faithfulness"]) for b in batches)],
            ["pytorch-grad-cam, torchvision ResNet-50 fp32, same GPU",
             *(f"{torch['images_per_s']:,.0f} ({torch['p50_ms']:.1f} ms)"
               for torch in (d["pytorch_grad_cam"][f"b{b}"] for b in batches))],
            ["Grad-CAM's cost (fp32, same graph without it)",
             *(_pct(100 * d["gradcam_cost_fp32"][f"b{b}"]["cost"]) for b in batches)]]
    return _table(["per run: images/s (p50 / p95 ms)", *(f"batch {b}" for b in batches)], rows)


def store(d: dict[str, Any]) -> str:
    rows = [["hand-over on the processing thread, 1024-px / 2048-px image",
             f"{_ms(d['handover_1024px']['p50_ms'])} / {_ms(d['handover_2048px']['p50_ms'])} ms"],
            ["recorder thread per image (PNG encoding mostly), 1024 / 2048 px",
             f"{_ms(d['record_1024px']['p50_ms'])} / {_ms(d['record_2048px']['p50_ms'])} ms"],
            ["worklist page over 3000 rows / search", f"{_ms(d['worklist_page']['p50_ms'])} / "
             f"{_ms(d['worklist_search']['p50_ms'])} ms"]]
    return _table(["p50", "result"], rows)


def spool(d: dict[str, Any]) -> str:
    rows = [[f"{int(n):,}", f"{d[n]['spool_drain_us_per_instance']:.0f} µs",
             f"{d[n]['outbox_due_us_per_result']:.1f} µs"] for n in d if n.isdigit()]
    return _table(["queued", "drain, per instance", "find due results, per result"], rows)


def process_memory(d: dict[str, Any]) -> str:
    rows = [[n, f"{r['peak_rss_mib']:,.0f} MiB", f"{r['seconds']:.0f} s"] for n, r in d["runs"].items()]
    return _table(["files", "peak RSS", "wall time"], rows)


def hostile(d: dict[str, Any]) -> str:
    rows = []
    for attack, r in d.items():
        if not isinstance(r, dict) or "peak_above_warm_mb" not in r:
            continue
        if r.get("aborted"):
            what = f"A-ABORT after {r['sent_before_abort_mb']} MB had left the sender"
        elif "quarantined" in r:
            what = "acknowledged, quarantined before decoding"
        elif "sc_sizes" in r:
            what = f"processed; SCs of {', '.join(sorted(set(r['sc_sizes'])))}"
        elif "statuses" in r:
            what = "; ".join(sorted(set(r["statuses"])))
        else:
            what = "the PACS associates" if r.get("pacs_from_127.0.0.2_associates") else "the PACS is locked out"
        rows.append([attack, what, f"{r['peak_above_warm_mb']:.0f} MB"])
    return _table(["what the peer sent", "what happened", "peak RSS above the warm worker"], rows)


def trainer(d: dict[str, Any]) -> str:
    rows = [[f"{size} px", f"{r['train_images_per_s']:.1f}", f"{r['keras_numpy_fit_images_per_s']:.1f}",
             f"{r['export_convert_s']:.0f} s", f"{r['export_verify_s']:.1f} s"] for size, r in d["results"].items()]
    return _table(["input", "training images/s (tf.data, augmented)", "plain model.fit on numpy",
                   "tf2onnx conversion", "verification"], rows)


def send_race(d: dict[str, Any]) -> str:
    names = {"nagle_on": "Nagle on", "nagle_off": "Nagle off, without the response guard",
             "nagle_off_guard": "Nagle off, with the guard (what the worker does)"}
    rows = []
    for key, runs in d["variants"].items():
        rows.append([names.get(key, key), str(sum(r["rounds"] for r in runs)), str(sum(r["lost"] for r in runs)),
                     " / ".join(f"{r['p50_ms']:.0f}" for r in runs)])
    return _table(["sender", "associations", "responses lost", "round p50 per run, ms"], rows)


def pixels(d: dict[str, Any]) -> str:
    rows = [[name, f"{_ms(r['before']['p50_ms'])} ms", f"{_ms(r['after']['p50_ms'])} ms",
             f"{max(r['max_abs_diff_per_channel']):.0f}"] for name, r in d.items()
            if isinstance(r, dict) and "before" in r]
    return _table(["step (RG1)", "pixel-by-pixel reference", "the worker's table lookup",
                   "max difference (grey levels)"], rows)


RENDERERS: dict[str, Callable[..., str]] = {
    "bench_worker": worker_quick, "bench_worker_trust": trust, "bench_worker_e2e": e2e,
    "bench_precision": precision, "bench_outputs": outputs, "bench_gradcam": gradcam, "bench_gpu": gpu,
    "bench_store": store, "bench_spool": spool, "bench_process_memory": process_memory,
    "bench_hostile": hostile, "bench_trainer": trainer, "bench_send_race": send_race, "bench_pixels": pixels,
}


def _renderer(name: str) -> Callable[..., str]:
    for prefix in sorted(RENDERERS, key=len, reverse=True):
        if name.removesuffix(".json") == prefix or name.startswith(prefix + "_"):
            return RENDERERS[prefix]
    raise ValueError(f"no renderer for {name} (add one to scripts/mkdocs_hooks.py)")


def render(files: list[str], command: str) -> str:
    """The block that replaces one marker."""
    data = [_load(f) for f in files]
    machines = sorted({_machine(f, d) for f, d in zip(files, data, strict=True)})
    head = f"*Command:* `{command}`  \n*Machine:* {'; '.join(machines)}"
    return f"{head}\n\n{_renderer(files[0])(*data)}\n"


def expand(markdown: str) -> str:
    return MARKER.sub(lambda m: render(m["files"].split(), m["command"]), markdown)


# --- MkDocs events --------------------------------------------------------------------------------------------

def on_page_markdown(markdown: str, **_: Any) -> str:
    return expand(markdown)


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    changelog = ROOT / "CHANGELOG.md"
    if changelog.is_file():
        files.append(File.generated(config, "changelog.md", content=changelog.read_text(encoding="utf-8")))
    return files
