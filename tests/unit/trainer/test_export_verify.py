"""Export's verification of the ONNX graph against TensorFlow accepts a correct graph whose
images include one on the decision boundary (logit ~ 0), and still refuses a graph with one
weight perturbed by 0.1%. A miniature model (32 px, conv5-named layers, the paper's head)
converted with tf2onnx, as ``cxr-train export`` converts the real one."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest

from trainer.errors import ExportError
from trainer.export import to_onnx, verify
from trainer.model import feature_model, gradcam_tape_parts
from trainer.ood import fit_gate

LAYER = "conv5_block3_out"


def miniature() -> keras.Model:
    keras.utils.set_random_seed(3)
    image = keras.Input((32, 32, 1))
    x = keras.layers.Conv2D(8, 3, strides=4, padding="same", activation="relu", name="conv4_block6_out")(image)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name=LAYER)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(12, activation="relu", name="head_dense")(x)
    out = keras.layers.Dense(1, activation="sigmoid", name="pneumonia")(x)
    return keras.Model(image, out)


def images(n: int = 8) -> np.ndarray:
    x = np.random.default_rng(0).random((n, 32, 32, 1), dtype=np.float32)
    x[::2, 4:20, 4:20] += 0.8
    return x


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    model = miniature()
    x = images()
    # Logits of a trained model's size (a few units), then the output bias moved so that
    # image 0 sits on the decision boundary: logit ~ 1e-7.
    dense = model.get_layer("pneumonia")
    dense.kernel.assign(dense.kernel.numpy() * 20)
    z = gradcam_tape_parts(model, LAYER, x[:1])["logit"].ravel()[0]
    dense.bias.assign(dense.bias.numpy() - z)
    logits = gradcam_tape_parts(model, LAYER, x)["logit"].ravel()
    pooled = np.asarray(feature_model(model, LAYER)(x, training=False)).mean(axis=(1, 2))
    gate = fit_gate(pooled, np.arange(len(x)) % 2)
    return {"model": model, "images": x, "gate": gate, "logits": logits,
            "proto": to_onnx(model, LAYER, 32, gate)}


def test_a_logit_near_zero_does_not_refuse_a_correct_graph(setup: dict[str, Any]) -> None:
    assert abs(setup["logits"][0]) < 1e-5 < np.abs(setup["logits"]).max()
    check = verify(setup["proto"], setup["model"], LAYER, setup["images"], setup["gate"])
    assert check["logit_max_rel_error"] < 1e-5


def test_a_perturbed_weight_is_still_refused(setup: dict[str, Any]) -> None:
    """The graph holds the weights as converted; then the Keras model's output weight that
    contributes most to the logit is off by 1%: the graph no longer computes this model's
    logit, and is refused."""
    model = setup["model"]
    dense = model.get_layer("pneumonia")
    kernel = dense.kernel.numpy()
    hidden = np.asarray(keras.Model(model.inputs, model.get_layer("head_dense").output)(setup["images"]))
    changed = kernel.copy()
    changed.flat[int(np.argmax(np.abs(kernel.ravel()) * np.abs(hidden).mean(axis=0)))] *= 1.01
    dense.kernel.assign(changed)
    try:
        with pytest.raises(ExportError, match="logit_max_rel_error"):
            verify(setup["proto"], setup["model"], LAYER, setup["images"], setup["gate"])
    finally:
        dense.kernel.assign(kernel)
