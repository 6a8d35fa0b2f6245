"""The saliency sanity check fails a model whose Grad-CAM does not depend on its weights
(also when the randomised map is its mirror image, or all zero after the ReLU), passes one
whose maps do, says "inconclusive" where there is too little to rank, and leaves the weights
as they were."""

from __future__ import annotations

import keras
import numpy as np

from trainer.sanity import MIN_CELLS, overall_verdict, rank_correlation, sanity_check, stage_verdict


def images(n: int = 8) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.random((n, 32, 32, 1), dtype=np.float32)
    x[:, 8:20, 4:16] += 1.0  # structure the maps can follow
    return x


def insensitive_model(pool: int = 4, kernel: keras.initializers.Initializer | None = None) -> keras.Model:
    """Features with no weights (the pooled image, three times) and a head whose weights
    are positive by construction: Grad-CAM = ReLU(sum_k alpha_k A_k) is then a positive
    multiple of the feature energy, whatever the head's weights are: an edge detector,
    not an explanation of the model."""
    image = keras.Input((32, 32, 1))
    pooled = keras.layers.AveragePooling2D(pool)(image)
    x = keras.layers.Concatenate()([pooled, pooled, pooled])
    x = keras.layers.Activation("relu", name="conv5_block3_out")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(1, activation="sigmoid", name="pneumonia",
                             kernel_initializer=kernel or keras.initializers.RandomUniform(0.1, 1.0))(x)
    return keras.Model(image, out)


def sensitive_model() -> keras.Model:
    """A miniature ResNet tail: convolutions named like conv5's blocks, then the paper's head. Its
    feature layer is signed (no ReLU): with 16 positive feature maps as alike as a miniature's
    are, any head's map is close to their common energy (|rho| 0.73 after the head stage), which
    is the failure this check exists to catch."""
    keras.utils.set_random_seed(5)
    image = keras.Input((32, 32, 1))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv4_block6_out")(image)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="conv5_block1_out")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", name="conv5_block3_2_conv")(x)
    x = keras.layers.BatchNormalization(name="conv5_block3_2_bn")(x)
    x = keras.layers.Activation("linear", name="conv5_block3_out")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(12, activation="relu", name="head_dense")(x)
    out = keras.layers.Dense(1, activation="sigmoid", name="pneumonia")(x)
    return keras.Model(image, out)


def test_maps_that_ignore_the_weights_are_refused() -> None:
    model = insensitive_model()
    result = sanity_check(model, "conv5_block3_out", images(), limit=0.5)
    assert [s["stage"] for s in result["stages"]] == ["head"]  # nothing in conv5 carries weights
    assert result["stages"][0]["abs_spearman_mean"] > 0.99
    assert result["stages"][0]["verdict"] == result["verdict"] == "failed" and result["passed"] is False


def test_a_mirror_image_map_is_not_a_changed_map() -> None:
    """Trained weights positive, re-initialised ones negative: the randomised map is the trained
    one upside down (rho -1), and after the ReLU it is all zero. A signed correlation of the
    shown map (0 by convention for a constant map, or -1) passed it; |rho| of the pre-ReLU map fails it."""
    model = insensitive_model(kernel=keras.initializers.Constant(-0.5))
    model.get_layer("pneumonia").kernel.assign(np.full((3, 1), 0.5, np.float32))
    result = sanity_check(model, "conv5_block3_out", images(), limit=0.5)
    assert result["per_image"]["head"] == [-1.0] * 8
    assert result["verdict"] == "failed"


def test_a_grid_too_coarse_to_rank_is_inconclusive_not_passed_or_failed() -> None:
    model = insensitive_model(pool=16)  # a 2x2 grid, as a 64-px ResNet-50 has
    result = sanity_check(model, "conv5_block3_out", images(), limit=0.5)
    assert result["stages"][0]["cells"] == 4 < MIN_CELLS
    assert result["verdict"] == "inconclusive" and result["passed"] is False
    assert "too coarse" in result["stages"][0]["why"]


def test_maps_that_follow_the_weights_pass_and_the_weights_are_restored() -> None:
    model = sensitive_model()
    before = [w.numpy().copy() for w in model.weights]
    result = sanity_check(model, "conv5_block3_out", images(), limit=0.5)
    assert [s["stage"] for s in result["stages"]] == ["head", "conv5_block3", "conv5"]
    assert [s["layers"] for s in result["stages"]] == [2, 2, 1]
    assert all(st["verdict"] == "passed" and st["abs_spearman_mean"] <= 0.5 for st in result["stages"]), result
    assert result["verdict"] == "passed" and result["passed"] is True
    assert len(result["per_image"]["head"]) == 8
    for w, b in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(w.numpy(), b)


def test_constant_maps_have_no_rank_correlation_and_make_a_stage_inconclusive() -> None:
    flat, ramp = np.zeros((3, 3)), np.arange(9.0).reshape(3, 3)
    assert rank_correlation(flat, flat) is None and rank_correlation(flat, ramp) is None
    assert rank_correlation(ramp, ramp * 2) == 1.0
    assert rank_correlation(ramp, -ramp) == -1.0
    assert stage_verdict([None, None, 0.1], 49, 0.5)[0] == "inconclusive"
    assert stage_verdict([-0.9, 0.8, None], 49, 0.5)[0] == "failed"
    assert stage_verdict([-0.2, 0.1, None], 49, 0.5)[0] == "passed"
    assert overall_verdict(["passed", "inconclusive"]) == "inconclusive"
    assert overall_verdict(["inconclusive", "failed"]) == "failed"
    assert overall_verdict(["passed", "passed"]) == "passed"
