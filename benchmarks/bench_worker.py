"""Worker benchmark (not a test): a 224-px ResNet-50 with in-graph Grad-CAM.

Measures, on this machine and in one run:
- per stage p50/p95 for the real CR chest (RG1_UNCR, 1955x1841): receive (C-STORE into the
  running worker), decode, preprocess, infer + Grad-CAM, build SC + SR, send (C-STORE of the
  results to a receiving SCP);
- end-to-end throughput with 1 and 4 concurrent senders;
- the cost of the Grad-CAM output over plain inference (same weights, probability-only graph);
- the alternatives a user would pick: Grad-CAM as the Keras example computes it (GradientTape)
  and, where torch is installed, pytorch-grad-cam on a torchvision ResNet-50 of the same shape.

Usage: python benchmarks/bench_worker.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from benchmarks.common import report, summary, timed  # noqa: E402

SIZE = 224


def export_models(work: Path) -> tuple[Path, Path, Any]:
    """The same random-weight ResNet-50 exported twice: with and without the Grad-CAM output."""
    import onnx
    import tensorflow as tf
    import tf2onnx

    from trainer.config import ModelSection
    from trainer.export import to_onnx
    from trainer.model import build_model

    model = build_model(ModelSection(image_size=SIZE, weights="none"))
    full = to_onnx(model, "conv5_block3_out", SIZE)
    onnx.helper.set_model_props(full, {"name": "bench-resnet50", "version": "bench", "input_size": str(SIZE),
                                       "threshold": "0.5", "weights_sha256": "0" * 64})
    spec = (tf.TensorSpec([None, SIZE, SIZE, 1], tf.float32, name="image"),)

    @tf.function(input_signature=spec)
    def plain(image: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"probability": model(image, training=False)}

    prob_only, _ = tf2onnx.convert.from_function(plain, input_signature=spec, opset=17)
    paths = (work / "gradcam.onnx", work / "plain.onnx")
    paths[0].write_bytes(full.SerializeToString())
    paths[1].write_bytes(prob_only.SerializeToString())
    return paths[0], paths[1], model


def bench_inference(full: Path, plain: Path, model: Any, repeat: int) -> dict[str, Any]:
    import onnxruntime as ort
    import tensorflow as tf

    from trainer.model import gradcam_tape

    out: dict[str, Any] = {}
    s_full = ort.InferenceSession(str(full), providers=["CPUExecutionProvider"])
    s_plain = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"])
    for batch in (1, 8):
        x = np.random.default_rng(0).random((batch, SIZE, SIZE, 1), dtype=np.float32)
        t_full = timed(lambda x=x: s_full.run(None, {"image": x}), repeat)
        t_plain = timed(lambda x=x: s_plain.run(None, {"image": x}), repeat)
        out[f"onnx_gradcam_b{batch}"] = {**summary(t_full), "ms_per_image": 1000 * np.median(t_full) / batch}
        out[f"onnx_plain_b{batch}"] = {**summary(t_plain), "ms_per_image": 1000 * np.median(t_plain) / batch}
        out[f"gradcam_overhead_b{batch}_pct"] = 100 * (np.median(t_full) / np.median(t_plain) - 1)
        t_tape = timed(lambda x=x: gradcam_tape(model, "conv5_block3_out", tf.constant(x)), max(3, repeat // 3))
        out[f"keras_gradienttape_b{batch}"] = {**summary(t_tape), "ms_per_image": 1000 * np.median(t_tape) / batch}
    try:
        import torch
        import torchvision
        from pytorch_grad_cam import GradCAM

        net = torchvision.models.resnet50(weights=None, num_classes=1).eval()
        cam = GradCAM(model=net, target_layers=[net.layer4[-1]])
        for batch in (1, 8):
            x = torch.rand(batch, 3, SIZE, SIZE)
            t = timed(lambda x=x: cam(input_tensor=x), max(3, repeat // 3))
            out[f"pytorch_grad_cam_b{batch}"] = {**summary(t), "ms_per_image": 1000 * np.median(t) / batch}
    except ImportError as exc:
        out["pytorch_grad_cam"] = f"not installed ({exc.name}); pip install grad-cam torch torchvision"
    return out


def bench_stages(full: Path, repeat: int) -> dict[str, Any]:
    import pydicom
    from pydicom.data import get_testdata_file

    from cxr_contract.pixels import resize_for_model
    from worker.config import Settings
    from worker.decode import dataset_to_unit_image
    from worker.model import OnnxModel
    from worker.pipeline import Processor

    path = Path(get_testdata_file("RG1_UNCR.dcm"))
    settings = Settings()
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


def bench_service(full: Path, work: Path, images: int, senders: tuple[int, ...]) -> dict[str, Any]:
    """cxr-worker serve + a receiving SCP; C-STORE of the real CR from N threads."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid
    from pynetdicom import AE

    from tests.helpers import free_port, wait_port

    src = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    out: dict[str, Any] = {}
    for n_senders in senders:
        run = work / f"svc{n_senders}"
        received = run / "received"
        received.mkdir(parents=True)
        wport, rport = free_port(), free_port()
        recv = subprocess.Popen([sys.executable, "-m", "cxr_demo.receiver", str(received), str(rport)])
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "serve", "--bind", "127.0.0.1", "--port", str(wport), "--model",
             str(full), "--spool", str(run / "spool"), "--destination", f"RECV@127.0.0.1:{rport}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "CXR_SPOOL__RESERVE_MB": "0"})
        try:
            wait_port(wport, 60)
            wait_port(rport, 30)
            store_times: list[float] = []

            def send(k: int, wport: int = wport, n_senders: int = n_senders,
                     store_times: list[float] = store_times) -> None:
                ae = AE(ae_title=f"BENCH{k}")
                ae.add_requested_context(src.SOPClassUID, src.file_meta.TransferSyntaxUID)
                assoc = ae.associate("127.0.0.1", wport, ae_title="CXR-GRADCAM")
                for _ in range(images // n_senders):
                    ds = src.copy()
                    ds.SOPInstanceUID = generate_uid()
                    t = time.perf_counter()
                    assoc.send_c_store(ds)
                    store_times.append(time.perf_counter() - t)
                assoc.release()

            total = (images // n_senders) * n_senders
            t0 = time.perf_counter()
            threads = [threading.Thread(target=send, args=(k,)) for k in range(n_senders)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            deadline = time.monotonic() + 600
            while len(list(received.glob("*.dcm"))) < 2 * total and time.monotonic() < deadline:
                time.sleep(0.2)
            elapsed = time.perf_counter() - t0
            done = len(list(received.glob("*.dcm"))) // 2
            status = Path(f"/proc/{worker.pid}/status").read_text()
            peak_mib = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM"))) / 1024
            out[f"senders_{n_senders}"] = {"images": total, "delivered": done, "seconds": elapsed,
                                           "images_per_s": done / elapsed, "receive": summary(store_times),
                                           "worker_peak_rss_mib": peak_mib}
        finally:
            worker.terminate()
            recv.terminate()
            worker.wait(30)
            recv.wait(30)
    # Send stage: one SC + SR to the receiver, as the outbox does it.
    return out


def main() -> None:
    warnings.filterwarnings("ignore")  # highdicom's note on RG1's one-word referring physician
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = p.parse_args()
    repeat = 5 if args.quick else 20
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        full, plain, model = export_models(work)
        export_s = time.perf_counter() - t
        inference = bench_inference(full, plain, model, repeat)
        stages = bench_stages(full, repeat)
        service = bench_service(full, work, 8 if args.quick else 16, (1, 4))
    rows = [("export both models (s)", f"{export_s:.1f}")]
    for k, v in stages.items():
        rows.append((f"stage {k} (RG1 1955x1841)", f"p50 {v['p50_ms']:.1f} ms  p95 {v['p95_ms']:.1f} ms"))
    for k, v in service.items():
        rows.append((f"end to end, {k.replace('_', ' ')}", f"{v['images_per_s']:.2f} images/s "
                     f"({v['delivered']}/{v['images']}), receive p50 {v['receive']['p50_ms']:.0f} ms, "
                     f"worker peak RSS {v['worker_peak_rss_mib']:.0f} MiB"))
    for k, v in inference.items():
        if isinstance(v, dict):
            rows.append((k, f"{v['ms_per_image']:.1f} ms/image (p50 {v['p50_ms']:.1f}, p95 {v['p95_ms']:.1f} ms)"))
        elif isinstance(v, float):
            rows.append((k, f"{v:+.1f} %"))
        else:
            rows.append((k, str(v)))
    report("bench_worker", rows, {"input_size": SIZE, "export_seconds": export_s, "stages": stages,
                                  "service": service, "inference": inference})


if __name__ == "__main__":
    main()
