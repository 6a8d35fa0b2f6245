"""What each install gives, read from pyproject.toml's requirements as pip evaluates them on a
Linux x86_64 machine (nothing is installed: tensorflow[and-cuda] alone is gigabytes)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
LINUX_X86 = {"platform_system": "Linux", "platform_machine": "x86_64", "sys_platform": "linux"}
MACOS_ARM = {"platform_system": "Darwin", "platform_machine": "arm64", "sys_platform": "darwin"}


def resolved(extra: str | None, env: dict[str, str]) -> dict[str, Requirement]:
    """The requirements, by name, that ``pip install .[extra]`` asks for on ``env``, following
    the project's references to its own extras (``cxr-gradcam[train-common]``)."""
    lines = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    found: dict[str, Requirement] = {}
    for line in lines:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        if req.name == PROJECT["name"]:
            for inner in req.extras:
                found.update(resolved(inner, env))
        else:
            found[req.name] = req
    return found


def test_base_install_is_the_slim_cpu_onnx_runtime_everywhere() -> None:
    for env in (LINUX_X86, MACOS_ARM):
        base = resolved(None, env)
        assert "onnxruntime" in base
        assert "onnxruntime-gpu" not in base  # ~300 MB of CUDA build nobody on a CPU uses


def test_gpu_extra_brings_the_cuda_provider_with_cuda_and_cudnn_from_pip() -> None:
    gpu = resolved("gpu", LINUX_X86)
    assert set(gpu) == {"onnxruntime-gpu"}
    assert gpu["onnxruntime-gpu"].extras == {"cuda", "cudnn"}
    assert "1.21" in str(gpu["onnxruntime-gpu"].specifier)  # preload_dlls() and the extras came with 1.21
    assert resolved("gpu", MACOS_ARM) == {}  # no CUDA build exists there: the extra adds nothing


def test_train_gpu_is_train_with_tensorflow_and_cuda() -> None:
    train, train_gpu = resolved("train", LINUX_X86), resolved("train-gpu", LINUX_X86)
    assert "tensorflow-cpu" in train and "tensorflow" not in train
    assert "tensorflow-cpu" not in train_gpu  # both would write one package folder
    assert train_gpu["tensorflow"].extras == {"and-cuda"}
    # Whatever else training needs (added to `train` later too) comes with train-gpu as well.
    assert set(train) - {"tensorflow-cpu"} == set(train_gpu) - {"tensorflow"}
    dev = resolved("dev", LINUX_X86)
    assert "tensorflow" not in dev and "onnxruntime-gpu" not in dev  # CI and developers stay on CPU builds


def test_cuda_image_installs_the_gpu_extra_and_keeps_one_onnx_runtime() -> None:
    text = (ROOT / "deploy" / "Dockerfile.cuda").read_text()
    steps = [line.strip() for line in text.splitlines() if "pip " in line and not line.lstrip().startswith("#")]
    assert any('".[gpu]"' in s for s in steps), steps
    swap = [i for i, s in enumerate(steps) if "uninstall -y onnxruntime" in s]
    assert swap and any("--force-reinstall --no-deps onnxruntime-gpu" in s for s in steps[swap[0]:]), steps
    assert "FROM nvidia/cuda" not in text  # CUDA comes from pip, matching the onnxruntime-gpu build
