"""as_float32: a model whose layers compute in float16 (mixed precision) is rebuilt computing in
float32 with the same weights; a float32 model is left as it is."""

from __future__ import annotations

import keras
import numpy as np

from trainer.model import as_float32, computes_in_float32


def _model(dtype: str) -> keras.Model:
    image = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(4, 3, activation="relu", dtype=dtype, name="conv")(image)
    x = keras.layers.BatchNormalization(dtype=dtype, name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D(dtype=dtype, name="pool")(x)
    out = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="pneumonia")(x)
    return keras.Model(image, out)


def test_mixed_model_is_rebuilt_in_float32_with_its_weights() -> None:
    keras.utils.set_random_seed(1)
    mixed = _model("mixed_float16")
    assert not computes_in_float32(mixed)
    rebuilt = as_float32(mixed)
    assert computes_in_float32(rebuilt) and rebuilt is not mixed
    assert [layer.name for layer in rebuilt.layers] == [layer.name for layer in mixed.layers]
    for a, b in zip(mixed.get_weights(), rebuilt.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(0).random((2, 8, 8, 1), dtype=np.float32)
    reference = _model("float32")
    reference.set_weights(mixed.get_weights())
    np.testing.assert_allclose(rebuilt(x, training=False), reference(x, training=False), rtol=1e-6, atol=1e-7)


def test_float32_model_is_returned_as_it_is() -> None:
    model = _model("float32")
    assert as_float32(model) is model
