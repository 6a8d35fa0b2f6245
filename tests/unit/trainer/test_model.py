"""The forward-only Grad-CAM equals GradientTape's, for the paper's head and others; head
shapes the contract cannot serve are refused; BatchNormalization can be frozen."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.config import ModelSection, resolved_bn
from trainer.errors import ExportError
from trainer.evaluate import LogitModel
from trainer.model import build_model, feature_model, gradcam_forward, gradcam_parts, gradcam_tape, gradcam_tape_parts


def small_backbone(head: list[keras.layers.Layer]) -> keras.Model:
    image = keras.Input((32, 32, 1))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(image)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="features")(x)
    for layer in head:
        x = layer(x)
    return keras.Model(image, x)


HEADS = {
    "paper": lambda: [keras.layers.GlobalAveragePooling2D(), keras.layers.Dropout(0.5),
                      keras.layers.Dense(12, activation="relu"), keras.layers.Dense(1, activation="sigmoid")],
    "max-pool, batch norm, tanh": lambda: [keras.layers.GlobalMaxPooling2D(), keras.layers.BatchNormalization(),
                                           keras.layers.Dense(7, activation="tanh"),
                                           keras.layers.Dense(5, activation="sigmoid"),
                                           keras.layers.Dense(1, activation="sigmoid")],
    "flatten, activation layer": lambda: [keras.layers.Flatten(), keras.layers.Dense(6),
                                          keras.layers.Activation("relu"), keras.layers.Dense(1, activation="sigmoid")],
    # Variants the contract serves explicitly: the logit is the one-unit Dense's pre-activation.
    "dense(1) then Activation(sigmoid)": lambda: [keras.layers.GlobalAveragePooling2D(),
                                                  keras.layers.Dense(6, activation="relu"), keras.layers.Dense(1),
                                                  keras.layers.Activation("sigmoid")],
    "no bias": lambda: [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(6, activation="relu"),
                        keras.layers.Dense(1, activation="sigmoid", use_bias=False)],
}


@pytest.mark.parametrize("head", HEADS)
def test_forward_gradcam_matches_gradient_tape(head: str) -> None:
    keras.utils.set_random_seed(1)
    model = small_backbone(HEADS[head]())
    for layer in model.layers:  # non-trivial batch-norm statistics
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.random.rand(16).astype("float32"))
            layer.moving_variance.assign(np.random.rand(16).astype("float32") + 0.5)
            layer.gamma.assign(np.random.randn(16).astype("float32"))
    images = np.random.default_rng(0).random((4, 32, 32, 1), dtype=np.float32)
    prob, cam = tf.function(gradcam_forward(model, "features"))(tf.constant(images))
    ref_prob, ref_cam = gradcam_tape(model, "features", images)
    np.testing.assert_allclose(prob.numpy(), ref_prob, atol=1e-6)
    assert cam.shape == ref_cam.shape == (4, 8, 8)
    assert ref_cam.max() > 0
    np.testing.assert_allclose(cam.numpy(), ref_cam, atol=1e-5 * ref_cam.max())


@pytest.mark.parametrize("head", ["dense(1) then Activation(sigmoid)", "no bias"])
def test_head_variants_give_the_logit_and_the_channel_weights(head: str) -> None:
    keras.utils.set_random_seed(2)
    model = small_backbone(HEADS[head]())
    images = np.random.default_rng(3).random((3, 32, 32, 1), dtype=np.float32)
    parts = tf.function(gradcam_parts(model, "features"))(tf.constant(images))
    ref = gradcam_tape_parts(model, "features", images)
    np.testing.assert_allclose(tf.sigmoid(parts["logit"]).numpy(), model.predict(images, verbose=0), atol=1e-6)
    for key in ("logit", "alpha", "gradcam_raw"):
        np.testing.assert_allclose(parts[key].numpy(), ref[key], atol=1e-5 * np.abs(ref[key]).max(), err_msg=key)


REFUSED_HEADS = {
    "linear output (a logit served as a probability)": lambda: [keras.layers.Dense(1, name="out")],
    "two sigmoid units": lambda: [keras.layers.Dense(2, activation="sigmoid", name="out")],
    "relu output": lambda: [keras.layers.Dense(1, activation="relu", name="out")],
    "sigmoid after a non-linear dense": lambda: [keras.layers.Dense(1, activation="tanh"),
                                                 keras.layers.Activation("sigmoid", name="out")],
    "softmax activation layer": lambda: [keras.layers.Dense(1), keras.layers.Activation("softmax", name="out")],
}


@pytest.mark.parametrize("head", REFUSED_HEADS)
def test_head_shapes_the_contract_cannot_serve_are_refused(head: str) -> None:
    model = small_backbone([keras.layers.GlobalAveragePooling2D(), *REFUSED_HEADS[head]()])
    with pytest.raises(ExportError, match=r"must end in Dense\(1, activation='sigmoid'\).*Received: .*'out'"):
        gradcam_forward(model, "features")
    with pytest.raises(ExportError, match="must end in"):
        gradcam_tape(model, "features", np.zeros((1, 32, 32, 1), np.float32))


def test_unsupported_head_layer_is_named() -> None:
    model = small_backbone([keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(4, activation="softplus"),
                            keras.layers.Dense(1, activation="sigmoid")])
    with pytest.raises(ExportError, match="softplus"):
        gradcam_forward(model, "features")


def test_resnet50_takes_grayscale_and_matches_tape() -> None:
    model = build_model(ModelSection(image_size=64, weights="none"))
    assert model.input_shape == (None, 64, 64, 1)
    assert model.get_layer("conv5_block3_out").output.shape[1:3] == (2, 2)
    names = [layer.name for layer in model.layers]
    assert names[-4:] == ["head_pool", "head_dropout", "head_dense", "pneumonia"]
    images = np.random.default_rng(1).random((2, 64, 64, 1), dtype=np.float32)
    prob, cam = tf.function(gradcam_forward(model, "conv5_block3_out"))(tf.constant(images))
    ref_prob, ref_cam = gradcam_tape(model, "conv5_block3_out", images)
    np.testing.assert_allclose(prob.numpy(), ref_prob, atol=1e-5)
    np.testing.assert_allclose(cam.numpy(), ref_cam, atol=1e-4 * max(ref_cam.max(), 1e-12))


def test_weights_from_a_local_file_are_loaded(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The air-gapped path: ``--weights PATH`` loads a notop ResNet-50 weights file."""
    source = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(64, 64, 3))
    kernel = source.get_layer("conv1_conv").kernel
    kernel.assign(np.random.default_rng(3).normal(size=kernel.shape).astype("float32"))
    path = tmp_path / "resnet50_notop.weights.h5"
    source.save_weights(path)
    model = build_model(ModelSection(image_size=64, weights=str(path)))
    np.testing.assert_array_equal(model.get_layer("conv1_conv").kernel.numpy(), kernel.numpy())


def test_batchnorm_mode_defaults_by_weights_and_frozen_layers_keep_their_statistics() -> None:
    assert resolved_bn(ModelSection(weights="none")) == "train"
    assert resolved_bn(ModelSection(weights="imagenet")) == "frozen"
    assert resolved_bn(ModelSection(weights="none", bn="frozen")) == "frozen"
    trained = build_model(ModelSection(image_size=32, weights="none"))
    assert all(layer.trainable for layer in trained.layers if isinstance(layer, keras.layers.BatchNormalization))
    model = build_model(ModelSection(image_size=32, weights="none", bn="frozen"))
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and not any(layer.trainable for layer in bns)
    before = bns[0].moving_mean.numpy().copy()
    model.compile(optimizer="adam", loss="binary_crossentropy")
    x = np.random.default_rng(0).random((4, 32, 32, 1), dtype=np.float32)
    model.train_on_batch(x, np.array([[0], [1], [0], [1]], np.float32))
    np.testing.assert_array_equal(bns[0].moving_mean.numpy(), before)
    trained.compile(optimizer="adam", loss="binary_crossentropy")
    first = [layer for layer in trained.layers if isinstance(layer, keras.layers.BatchNormalization)][0]
    trained.train_on_batch(x, np.array([[0], [1], [0], [1]], np.float32))
    assert not np.array_equal(first.moving_mean.numpy(), before)


def test_head_warmup_trains_only_the_head_then_unfreezes_the_backbone() -> None:
    from trainer.config import TrainConfig
    from trainer.fit import warm_up_head

    keras.utils.set_random_seed(4)
    model = small_backbone(HEADS["paper"]())
    cfg = TrainConfig.model_validate({"model": {"feature_layer": "features", "image_size": 32},
                                      "train": {"head_warmup_epochs": 2, "learning_rate": 0.01}})
    x = np.random.default_rng(0).random((8, 32, 32, 1), dtype=np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, np.arange(8, dtype=np.float32)[:, None] % 2)).batch(4)
    conv = model.get_layer("features").kernel.numpy().copy()
    head = model.layers[-1].kernel.numpy().copy()
    warm_up_head(model, cfg, ds, ds)
    np.testing.assert_array_equal(model.get_layer("features").kernel.numpy(), conv)
    assert not np.array_equal(model.layers[-1].kernel.numpy(), head)
    assert all(layer.trainable for layer in model.layers)
    model.fit(ds, epochs=1, verbose=0)  # recompiled: the backbone trains again
    assert not np.array_equal(model.get_layer("features").kernel.numpy(), conv)


def test_sub_models_take_the_image_tensor_without_a_keras_warning() -> None:
    """Sub-models built on model.inputs (a list) made Keras warn "The structure of `inputs`
    doesn't match the expected structure" at every call with a tensor: noise in `make demo`."""
    model = small_backbone(HEADS["paper"]())
    x = np.zeros((2, 32, 32, 1), "float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        feature_model(model, "features")(x)
        LogitModel(model).features(x)
    assert not [w for w in caught if "structure" in str(w.message)]
