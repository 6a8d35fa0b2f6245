"""pytorch-grad-cam on torchvision's ResNet-50 (random weights, one output unit), per image at
the given batch sizes on the CPU. Run by bench_gradcam.py inside its own virtualenv (torch,
torchvision, grad-cam), so the project's environment never gets torch; prints one JSON line.

Usage: python gradcam_torch.py SIZE REPEAT BATCH [BATCH ...]
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

    size, repeat, batches = int(sys.argv[1]), int(sys.argv[2]), [int(b) for b in sys.argv[3:]]
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None, num_classes=1).eval()
    out: dict[str, object] = {"torch": torch.__version__, "torchvision": torchvision.__version__,
                              "threads": torch.get_num_threads()}
    with GradCAM(model=net, target_layers=[net.layer4[-1]]) as cam:
        for batch in batches:
            x = torch.rand(batch, 3, size, size)
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
