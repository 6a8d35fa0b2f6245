"""Worker benchmark (not a test): a 224-px ResNet-50 with in-graph Grad-CAM.

Measures, on this machine and in one run:
- per stage p50/p95 for the real CR chest (RG1_UNCR, 1955x1841): receive (C-STORE into the
  running worker), decode, preprocess, infer + Grad-CAM, build SC + SR, send (C-STORE of the
  results to a receiving SCP);
- end-to-end throughput with 1 and 4 concurrent senders;
- the cost of the Grad-CAM output over plain inference (same weights, probability-only graph);
- the cost of the out-of-distribution gate: the contract-v2 graph (``logit`` and ``ood_score``,
  a class-conditional Mahalanobis distance with a shared 2048x2048 precision matrix on the
  pooled conv5 features) against the v1 graph, same weights, same run;
- the cost of the heatmap faithfulness: the one extra run over the 2N perturbed inputs
  (and their imputation) against the v2 inference of the batch;
- the alternatives a user would pick: Grad-CAM as the Keras example computes it (GradientTape)
  and, where torch is installed, pytorch-grad-cam on a torchvision ResNet-50 of the same shape.

Usage: python benchmarks/bench_worker.py [--quick] [--trust-only]
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


def add_ood_head(full: Path, target: Path) -> Path:
    """The v1 graph plus what contract v2 adds: ``logit`` and ``ood_score``.

    The gate is the cost shape of the Mahalanobis detector of Lee et al. (2018) that
    ``cxr-train export`` fits: pooled conv5 features, a distance to each of two class means
    under one shared precision matrix, the smaller of the two. The weights are random (only
    the cost is measured), and the threshold is set so that every image is answered.
    """
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load(str(full))
    g = m.graph
    producer = {o: n for n in g.node for o in n.output}
    logit_in = producer["probability"].input[0]
    feat = next(o for n in g.node for o in n.output if "conv5_block3_out" in n.name and n.op_type == "Relu")
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    probe.graph.output.append(helper.make_tensor_value_info(feat, TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    (shape,) = [a.shape for a in session.run([feat], {"image": np.zeros((1, SIZE, SIZE, 1), np.float32)})]
    axes, channels = ([2, 3], shape[1]) if shape[1] > shape[-1] else ([1, 2], shape[-1])
    rng = np.random.default_rng(0)
    root = rng.standard_normal((channels, channels)).astype(np.float32) / channels
    g.initializer.extend([
        numpy_helper.from_array(root @ root.T, "ood_precision"),
        numpy_helper.from_array(rng.standard_normal((2, 1, channels)).astype(np.float32), "ood_means"),
    ])
    g.node.extend([
        helper.make_node("ReduceMean", [feat], ["ood_pooled"], axes=axes, keepdims=0),  # [N, C]
        helper.make_node("Sub", ["ood_pooled", "ood_means"], ["ood_diff"]),  # [2, N, C]
        helper.make_node("MatMul", ["ood_diff", "ood_precision"], ["ood_proj"]),
        helper.make_node("Mul", ["ood_proj", "ood_diff"], ["ood_sq"]),
        helper.make_node("ReduceSum", ["ood_sq", "ood_axis"], ["ood_dist"], keepdims=0),  # [2, N]
        helper.make_node("ReduceMin", ["ood_dist"], ["ood_score"], axes=[0], keepdims=0),  # [N]
        helper.make_node("Identity", [logit_in], ["logit"]),
    ])
    g.initializer.append(numpy_helper.from_array(np.array([2], np.int64), "ood_axis"))
    g.output.extend([helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["N", 1]),
                     helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["N"])])
    props = {p.key: p.value for p in m.metadata_props}
    props.update({"contract_version": "2", "ood_threshold": "1e30", "heatmap_scale": "1.0", "version": "bench-v2"})
    del m.metadata_props[:]
    onnx.helper.set_model_props(m, props)
    onnx.save(m, str(target))
    return target


def bench_trust(full: Path, v2: Path, repeat: int) -> dict[str, Any]:
    """Gate (v2 graph vs v1 graph) and faithfulness (one extra run of 2N) in the same process."""
    from cxr_contract import faithfulness
    from worker.model import OnnxModel

    out: dict[str, Any] = {}
    v1_model, v2_model = OnnxModel(full, providers="cpu"), OnnxModel(v2, providers="cpu")
    for batch in (1, 8):
        x = np.random.default_rng(1).random((batch, SIZE, SIZE, 1), dtype=np.float32)
        t_v1 = timed(lambda x=x: v1_model.predict(x), repeat)
        t_v2 = timed(lambda x=x: v2_model.predict(x), repeat)
        cams = [p.gradcam for p in v2_model.predict(x)]
        t_faith = timed(lambda x=x, cams=cams: v2_model.faithfulness(x, cams), repeat)
        pairs = list(zip(x, cams, strict=True))
        t_impute = timed(lambda pairs=pairs: [faithfulness.perturbed_inputs(a, c) for a, c in pairs], repeat)
        per = 1000 / batch
        out[f"v1_predict_b{batch}"] = {**summary(t_v1), "ms_per_image": per * np.median(t_v1)}
        out[f"v2_predict_b{batch}"] = {**summary(t_v2), "ms_per_image": per * np.median(t_v2)}
        out[f"gate_overhead_b{batch}_pct"] = 100 * (np.median(t_v2) / np.median(t_v1) - 1)
        out[f"faithfulness_b{batch}"] = {**summary(t_faith), "ms_per_image": per * np.median(t_faith)}
        out[f"faithfulness_imputation_b{batch}"] = {**summary(t_impute), "ms_per_image": per * np.median(t_impute)}
        out[f"faithfulness_overhead_b{batch}_pct"] = 100 * np.median(t_faith) / np.median(t_v2)
    return out


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
    p.add_argument("--trust-only", action="store_true",
                   help="only the gate and faithfulness costs (results/bench_worker_trust.json)")
    args = p.parse_args()
    repeat = 5 if args.quick else 20
    inference: dict[str, Any] = {}
    stages: dict[str, Any] = {}
    service: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        full, plain, model = export_models(work)
        v2 = add_ood_head(full, work / "v2.onnx")
        export_s = time.perf_counter() - t
        trust = bench_trust(full, v2, repeat)
        if not args.trust_only:
            inference = bench_inference(full, plain, model, repeat)
            stages = bench_stages(v2, repeat)
            stages_no_faith = bench_stages(v2, repeat, faithfulness=False)
            stages["build_sc_sr_without_faithfulness"] = stages_no_faith["build_sc_sr"]
            service = bench_service(v2, work, 8 if args.quick else 16, (1, 4))
    rows = [("export both models (s)", f"{export_s:.1f}")]
    for k, v in stages.items():
        rows.append((f"stage {k} (RG1 1955x1841)", f"p50 {v['p50_ms']:.1f} ms  p95 {v['p95_ms']:.1f} ms"))
    for k, v in service.items():
        rows.append((f"end to end, {k.replace('_', ' ')}", f"{v['images_per_s']:.2f} images/s "
                     f"({v['delivered']}/{v['images']}), receive p50 {v['receive']['p50_ms']:.0f} ms, "
                     f"worker peak RSS {v['worker_peak_rss_mib']:.0f} MiB"))
    for k, v in [*inference.items(), *trust.items()]:
        if isinstance(v, dict):
            rows.append((k, f"{v['ms_per_image']:.1f} ms/image (p50 {v['p50_ms']:.1f}, p95 {v['p95_ms']:.1f} ms)"))
        elif isinstance(v, float):
            rows.append((k, f"{v:+.1f} %"))
        else:
            rows.append((k, str(v)))
    report("bench_worker_trust" if args.trust_only else "bench_worker", rows,
           {"input_size": SIZE, "export_seconds": export_s, "stages": stages, "service": service,
            "inference": inference, "trust": trust})


if __name__ == "__main__":
    main()
