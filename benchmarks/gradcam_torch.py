"""pytorch-grad-cam on torchvision's ResNet-50 (random weights, one output unit), per image at
the given batch sizes, on the CPU (bench_gradcam.py) or on a CUDA GPU (bench_gpu.py). Run inside
its own virtualenv (torch, torchvision, grad-cam), so the project's environment never gets torch;
prints one JSON line. Each timed call returns the maps in host memory, as the library does, so
GPU timings include the device's work.

Usage: python gradcam_torch.py [--device cpu|cuda] [--threads N] SIZE REPEAT BATCH [BATCH ...]

``--threads`` sets torch's intra-op threads (``torch.set_num_threads``), so that a CPU comparison
gives torch the same threads as ONNX Runtime; the JSON records the count torch then reports.
"""

from __future__ import annotations

import json
import statistics
import sys
import time


def main() -> None:
    import torch
    import torchvision
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    args = sys.argv[1:]
    device = "cpu"
    if args[:1] == ["--device"]:
        device, args = args[1], args[2:]
    if args[:1] == ["--threads"]:
        torch.set_num_threads(int(args[1]))
        args = args[2:]
    size, repeat, batches = int(args[0]), int(args[1]), [int(b) for b in args[2:]]
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None, num_classes=1).eval().to(device)
    out: dict[str, object] = {"torch": torch.__version__, "torchvision": torchvision.__version__,
                              "threads": torch.get_num_threads(), "device": device,
                              "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}
    with GradCAM(model=net, target_layers=[net.layer4[-1]]) as cam:
        for batch in batches:
            x = torch.rand(batch, 3, size, size, device=device)
            targets = [ClassifierOutputTarget(0)] * batch
            cam(input_tensor=x, targets=targets)  # warm-up
            seconds = []
            for _ in range(repeat):
                t = time.perf_counter()
                maps = cam(input_tensor=x, targets=targets)
                seconds.append(time.perf_counter() - t)
            assert maps.shape == (batch, size, size)
            out[f"b{batch}"] = seconds
    out["median_s"] = {k: statistics.median(v) for k, v in out.items() if isinstance(v, list)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
