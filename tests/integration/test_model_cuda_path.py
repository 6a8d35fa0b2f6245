"""The worker's CUDA path, run where it can be: I/O binding and padded batches work on the CPU
provider too, so they are checked here against the plain runs; on a machine with a usable GPU
the same tests check the CUDA provider itself."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from cxr_contract import faithfulness
from worker.model import CPU, OnnxModel


@pytest.fixture(scope="module")
def inputs(onnx_model: Path) -> np.ndarray:
    size = OnnxModel(onnx_model, providers="cpu").info.input_size
    return np.random.default_rng(3).random((3, size, size, 1), dtype=np.float32)


def test_bound_padded_runs_give_the_plain_runs_answers(onnx_model: Path, inputs: np.ndarray,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    plain = OnnxModel(onnx_model, providers="cpu", io_binding="off", pad_batches="off")
    bound = OnnxModel(onnx_model, providers="cpu", io_binding="on", batch_size=4, pad_batches="on")
    assert bound.execution == {"providers": CPU, "io_binding": "on", "batch_padding": "multiples of 4"}
    assert plain.execution["io_binding"] == "off" and plain.execution["batch_padding"] == "off"

    def unbound(*args: object, **kwargs: object) -> None:
        raise AssertionError("the bound model ran without its I/O binding")

    monkeypatch.setattr(bound.session, "run", unbound)
    want, got = plain.predict(inputs), bound.predict(inputs)  # 3 images: padded to 4, cut back to 3
    assert len(got) == len(want) == 3
    for w, g in zip(want, got, strict=True):
        assert g.probability == pytest.approx(w.probability, abs=1e-6)
        assert g.logit == pytest.approx(w.logit, abs=1e-5)
        assert g.ood_score == pytest.approx(w.ood_score, rel=1e-5)
        np.testing.assert_allclose(g.gradcam, w.gradcam, rtol=1e-5, atol=1e-6)
    cams = [p.gradcam for p in want]
    np.testing.assert_allclose(bound.faithfulness(inputs, cams), plain.faithfulness(inputs, cams), atol=1e-5)


def test_cuda_requested_runs_on_cuda_or_says_in_one_line_it_fell_back(
        onnx_model: Path, inputs: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="worker.model"):
        model = OnnxModel(onnx_model, providers="cuda")
    if model.on_cuda:  # a GPU machine: the CUDA path itself, bound and padded, against the CPU
        assert model.execution["io_binding"] == "on" and model.pad_to == 8
        cpu = OnnxModel(onnx_model, providers="cpu")
        for g, w in zip(model.predict(inputs), cpu.predict(inputs), strict=True):
            assert g.probability == pytest.approx(w.probability, abs=1e-3)
        return
    assert model.providers == [CPU]
    assert model.execution["io_binding"] == "off" and model.pad_to == 0  # auto: CPU runs stay as they were
    fell_back = [r for r in caplog.records if "running on the CPU" in r.getMessage()]
    assert len(fell_back) == 1 and fell_back[0].levelno == logging.WARNING, caplog.text
    assert "cxr-gradcam[gpu]" in fell_back[0].getMessage()
    assert len(model.predict(inputs)) == 3  # and it answers


def test_padded_runs_all_have_the_batch_size_shape(onnx_model: Path, inputs: np.ndarray,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA provider rebuilds every convolution's cuDNN plan when the input shape changes
    (~250 ms a batch on an H100 when inference ran at N and the faithfulness run at 2N): a
    padded model runs everything, the faithfulness run's 2N perturbed images too, at exactly
    ``batch_size``, and answers as the plain model does."""
    plain = OnnxModel(onnx_model, providers="cpu", io_binding="off", pad_batches="off")
    bound = OnnxModel(onnx_model, providers="cpu", io_binding="on", batch_size=4, pad_batches="on")
    shapes: list[int] = []
    run = bound.session.run_with_iobinding

    def recording(binding, *args: object, **kwargs: object) -> None:  # type: ignore[no-untyped-def]
        run(binding, *args, **kwargs)
        shapes.append(binding.get_outputs()[0].shape()[0])

    monkeypatch.setattr(bound.session, "run_with_iobinding", recording)
    cams = [p.gradcam for p in bound.predict(inputs)]  # 3 images: one run of 4
    got = bound.faithfulness(inputs, cams)  # 3 x 9 = 27 perturbed images: seven runs of 4, not one of 27
    assert shapes == [4] * (1 + -(-3 * faithfulness.INPUTS_PER_IMAGE // 4))
    np.testing.assert_allclose(got, plain.faithfulness(inputs, cams), atol=1e-5)
    five = np.concatenate([inputs, inputs[:2]])  # a batch longer than batch_size: chunks of 4
    want = plain.predict(five)
    for w, g in zip(want, bound.predict(five), strict=True):
        assert g.probability == pytest.approx(w.probability, abs=1e-6)
        np.testing.assert_allclose(g.gradcam, w.gradcam, rtol=1e-5, atol=1e-6)
    assert shapes[8:] == [4, 4]


def test_cpu_runs_longer_than_the_batch_go_in_chunks(onnx_model: Path, inputs: np.ndarray,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU the faithfulness run's 9N perturbed images run batch_size at a time: ONNX
    Runtime's arena keeps the largest run's activations, so runs of 72 at 224 px held the
    worker at 1.82 GiB peak RSS (0.82 in chunks of 8) for the whole of its life, for no speed."""
    model = OnnxModel(onnx_model, providers="cpu", io_binding="off", batch_size=4, pad_batches="off")
    plain = OnnxModel(onnx_model, providers="cpu", io_binding="off", batch_size=64, pad_batches="off")
    sizes: list[int] = []
    run = model.session.run

    def recording(names, feeds, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        sizes.append(len(next(iter(feeds.values()))))
        return run(names, feeds, *args, **kwargs)

    monkeypatch.setattr(model.session, "run", recording)
    cams = [p.gradcam for p in model.predict(inputs)]
    got = model.faithfulness(inputs, cams)  # 27 perturbed images: 4, 4, ..., 3
    assert sizes == [3] + [4] * 6 + [3], sizes
    np.testing.assert_allclose(got, plain.faithfulness(inputs, cams), atol=1e-4)
