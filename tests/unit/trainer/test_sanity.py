"""The saliency sanity check refuses a model whose Grad-CAM does not depend on its
weights, passes one whose maps do, and leaves the weights as they were."""

from __future__ import annotations

import keras
import numpy as np

from trainer.sanity import rank_correlation, sanity_check


def images(n: int = 8) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.random((n, 32, 32, 1), dtype=np.float32)
    x[:, 8:20, 4:16] += 1.0  # structure the maps can follow
    return x


def insensitive_model() -> keras.Model:
    """Features with no weights (the pooled image, three times) and a head whose weights
    are positive by construction: Grad-CAM = ReLU(sum_k alpha_k A_k) is then a positive
    multiple of the feature energy, whatever the head's weights are: an edge detector,
    not an explanation of the model."""
    image = keras.Input((32, 32, 1))
    pooled = keras.layers.AveragePooling2D(4)(image)
    x = keras.layers.Concatenate()([pooled, pooled, pooled])
    x = keras.layers.Activation("relu", name="conv5_block3_out")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(1, activation="sigmoid", kernel_initializer=keras.initializers.RandomUniform(0.1, 1.0),
                             name="pneumonia")(x)
    return keras.Model(image, out)


def sensitive_model() -> keras.Model:
    """A miniature ResNet tail: convolutions named like conv5's blocks, then the paper's head."""
    keras.utils.set_random_seed(5)
    image = keras.Input((32, 32, 1))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv4_block6_out")(image)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="conv5_block1_out")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", name="conv5_block3_2_conv")(x)
    x = keras.layers.BatchNormalization(name="conv5_block3_2_bn")(x)
    x = keras.layers.Activation("relu", name="conv5_block3_out")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(12, activation="relu", name="head_dense")(x)
    out = keras.layers.Dense(1, activation="sigmoid", name="pneumonia")(x)
    return keras.Model(image, out)


def test_maps_that_ignore_the_weights_are_refused() -> None:
    model = insensitive_model()
    result = sanity_check(model, "conv5_block3_out", images(), limit=0.5)
    assert [s["stage"] for s in result["stages"]] == ["head"]  # nothing in conv5 carries weights
    assert result["stages"][0]["spearman_mean"] > 0.99
    assert result["passed"] is False


def test_maps_that_follow_the_weights_pass_and_the_weights_are_restored() -> None:
    model = sensitive_model()
    before = [w.numpy().copy() for w in model.weights]
    result = sanity_check(model, "conv5_block3_out", images(), limit=0.5)
    assert [s["stage"] for s in result["stages"]] == ["head", "conv5_block3", "conv5"]
    assert [s["layers"] for s in result["stages"]] == [2, 2, 1]
    assert result["stages"][-1]["spearman_mean"] < 0.5
    assert result["passed"] is True
    assert len(result["per_image"]["head"]) == 8
    for w, b in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(w.numpy(), b)


def test_rank_correlation_of_constant_maps() -> None:
    flat, ramp = np.zeros((3, 3)), np.arange(9.0).reshape(3, 3)
    assert rank_correlation(flat, flat) == 1.0
    assert rank_correlation(flat, ramp) == 0.0
    assert rank_correlation(ramp, ramp * 2) == 1.0
    assert rank_correlation(ramp, -ramp) == -1.0
