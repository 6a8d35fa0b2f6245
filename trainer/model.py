"""ResNet-50 with the paper's head, and Grad-CAM written two ways.

* :func:`gradcam_tape` is Grad-CAM as the Keras example computes it, with
  ``tf.GradientTape``: the reference.
* :func:`gradcam_forward` writes the gradient of the class score with respect to
  the feature maps using forward-only ops, one rule per head layer, because
  tf2onnx cannot convert gradient ops (ReluGrad, SigmoidGrad). Export checks the
  two agree.

The class score is the pneumonia logit (the last layer's pre-activation), as
Selvaraju et al. use the pre-softmax score.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from trainer.config import ModelSection
from trainer.errors import ConfigError, ExportError

#: Caffe-style ImageNet means (BGR) used by keras.applications.resnet50.preprocess_input;
#: the gray channel is replicated, so channel order does not matter.
IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)
NOTOP_WEIGHTS_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"


def _backbone_weights(weights: str, size: int) -> keras.Model | None:
    """A stand-alone ResNet-50 carrying the requested weights, or None for random init."""
    if weights == "none":
        return None
    if weights != "imagenet" and not Path(weights).is_file():
        raise ConfigError(
            f"weights file not found. Received: weights={weights!r} (expected imagenet, none, or "
            f"the path of Keras' {NOTOP_WEIGHTS_FILE})"
        )
    try:
        return keras.applications.ResNet50(include_top=False, weights=weights, input_shape=(size, size, 3))
    except Exception as exc:
        if weights == "imagenet":
            raise ConfigError(
                f"ImageNet weights cannot be fetched ({type(exc).__name__}: {exc}). On a machine "
                f"without internet, copy {NOTOP_WEIGHTS_FILE} (from the keras-applications "
                "release on GitHub) here and pass --weights /path/to/it"
            ) from None
        raise ConfigError(f"cannot load weights from {weights}: {exc}") from None


def build_model(cfg: ModelSection) -> keras.Model:
    """ResNet-50 + GlobalAveragePooling -> Dropout -> Dense ReLU -> Dense sigmoid.

    Args:
        cfg: model section of the training config.

    Returns:
        A model taking grayscale ``[S, S, 1]`` in [0, 1]; channel replication and ImageNet
        normalisation happen inside it, so the exported graph takes the same input.
    """
    size = cfg.image_size
    image = keras.Input((size, size, 1), name="image")
    x = keras.layers.Concatenate(name="gray_to_rgb")([image, image, image])
    x = keras.layers.Rescaling(255.0, offset=[-m for m in IMAGENET_MEAN_BGR], name="imagenet_norm")(x)
    base = keras.applications.ResNet50(include_top=False, weights=None, input_tensor=x)
    source = _backbone_weights(cfg.weights, size)
    if source is not None:
        for layer in source.layers:
            if layer.weights:
                base.get_layer(layer.name).set_weights(layer.get_weights())
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            # Keras' 0.99 suits long runs; short runs on small sets need faster-moving
            # statistics or validation in inference mode lags far behind training.
            layer.momentum = cfg.bn_momentum
    try:
        features = base.get_layer(cfg.feature_layer).output
    except ValueError:
        raise ConfigError(f"feature layer not in ResNet-50. Received: feature_layer={cfg.feature_layer!r}") from None
    h = keras.layers.GlobalAveragePooling2D(name="head_pool")(features)
    h = keras.layers.Dropout(cfg.dropout, name="head_dropout")(h)
    h = keras.layers.Dense(cfg.dense_units, activation="relu", name="head_dense")(h)
    out = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="pneumonia")(h)
    return keras.Model(image, out, name=cfg.name)


def head_layers(model: keras.Model, feature_layer: str) -> list[keras.layers.Layer]:
    """The chain of layers from the feature layer to the output, checked to be a chain."""
    names = [layer.name for layer in model.layers]
    if feature_layer not in names:
        raise ExportError(f"model has no layer {feature_layer!r}")
    chain = model.layers[names.index(feature_layer) + 1 :]
    previous = model.get_layer(feature_layer).output
    for layer in chain:
        if layer.input is not previous:
            raise ExportError(f"head is not a simple chain at layer {layer.name!r}: Grad-CAM export needs one")
        previous = layer.output
    if previous is not model.outputs[0]:
        raise ExportError("the head's last layer is not the model output")
    return list(chain)


def _activation_name(layer: keras.layers.Layer) -> str:
    fn = getattr(layer, "activation", None)
    return getattr(fn, "__name__", "linear") if fn is not None else "linear"


SUPPORTED_ACTIVATIONS = ("linear", "relu", "sigmoid", "tanh")


def _activation_and_derivative(name: str, z: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Forward-only value and derivative of an activation at ``z``."""
    if name == "linear":
        return z, tf.ones_like(z)
    if name == "relu":
        return tf.nn.relu(z), tf.cast(z > 0, z.dtype)
    if name == "sigmoid":
        s = tf.sigmoid(z)
        return s, s * (1 - s)
    if name == "tanh":
        t = tf.tanh(z)
        return t, 1 - t * t
    raise ExportError(f"no forward-only gradient rule for activation {name!r}")


ForwardRule = Callable[[tf.Tensor], tuple[tf.Tensor, Callable[[tf.Tensor], tf.Tensor]]]


def _rule(layer: keras.layers.Layer, *, is_last: bool) -> ForwardRule:
    """Forward function of one head layer returning (output, backward); backward maps
    the gradient at the output to the gradient at the input with forward-only ops.
    For the last layer the output is the pre-activation (the class score)."""
    kind = type(layer).__name__
    if kind in ("Dropout", "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "ActivityRegularization"):
        return lambda x: (x, lambda g: g)
    if kind == "GlobalAveragePooling2D":

        def gap(x: tf.Tensor) -> tuple[tf.Tensor, Callable[[tf.Tensor], tf.Tensor]]:
            hw = tf.cast(tf.shape(x)[1] * tf.shape(x)[2], x.dtype)
            return tf.reduce_mean(x, axis=[1, 2]), lambda g: tf.ones_like(x) * (g / hw)[:, None, None, :]

        return gap
    if kind == "GlobalMaxPooling2D":

        def gmp(x: tf.Tensor) -> tuple[tf.Tensor, Callable[[tf.Tensor], tf.Tensor]]:
            m = tf.reduce_max(x, axis=[1, 2])
            hit = tf.cast(tf.equal(x, m[:, None, None, :]), x.dtype)
            share = hit / tf.reduce_sum(hit, axis=[1, 2], keepdims=True)
            return m, lambda g: share * g[:, None, None, :]

        return gmp
    if kind == "Flatten":
        return lambda x: (tf.reshape(x, [tf.shape(x)[0], -1]), lambda g: tf.reshape(g, tf.shape(x)))
    if kind == "BatchNormalization":
        if layer.axis not in (-1, [-1], 3, [3]):
            raise ExportError(f"BatchNormalization {layer.name!r}: only the channel axis is supported")
        scale = tf.math.rsqrt(tf.convert_to_tensor(layer.moving_variance) + layer.epsilon)
        if layer.gamma is not None:
            scale = scale * tf.convert_to_tensor(layer.gamma)
        shift = -tf.convert_to_tensor(layer.moving_mean) * scale
        if layer.beta is not None:
            shift = shift + tf.convert_to_tensor(layer.beta)
        return lambda x: (x * scale + shift, lambda g: g * scale)
    if kind in ("Dense", "Activation"):
        act = _activation_name(layer)
        if not is_last and act not in SUPPORTED_ACTIVATIONS:
            raise ExportError(f"no forward-only gradient rule for activation {act!r} of layer {layer.name!r}")

        def dense(x: tf.Tensor) -> tuple[tf.Tensor, Callable[[tf.Tensor], tf.Tensor]]:
            if kind == "Dense":
                kernel = tf.cast(tf.convert_to_tensor(layer.kernel), x.dtype)
                z = tf.matmul(x, kernel)
                if layer.use_bias:
                    z = z + tf.cast(tf.convert_to_tensor(layer.bias), x.dtype)
            else:
                z = x
            if is_last:
                return z, (lambda g: tf.matmul(g, kernel, transpose_b=True)) if kind == "Dense" else (lambda g: g)
            a, da = _activation_and_derivative(act, z)
            if kind == "Dense":
                return a, lambda g: tf.matmul(g * da, kernel, transpose_b=True)
            return a, lambda g: g * da

        return dense
    raise ExportError(f"no forward-only gradient rule for head layer {layer.name!r} ({kind})")


def _final_activation(layer: keras.layers.Layer) -> Callable[[tf.Tensor], tf.Tensor]:
    name = _activation_name(layer)
    if name not in ("sigmoid", "linear"):
        raise ExportError(f"output layer {layer.name!r} must be sigmoid (binary score); received {name!r}")
    return tf.sigmoid if name == "sigmoid" else tf.identity


def feature_model(model: keras.Model, feature_layer: str) -> keras.Model:
    """The sub-model from the image to the feature maps."""
    return keras.Model(model.inputs, model.get_layer(feature_layer).output)


def gradcam_forward(
    model: keras.Model, feature_layer: str
) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """Probability and Grad-CAM in one forward graph with no gradient ops.

    Returns:
        ``fn(image) -> (probability [N, 1], gradcam [N, h, w])``, gradcam raw and >= 0.
    """
    layers = head_layers(model, feature_layer)
    rules = [_rule(layer, is_last=i == len(layers) - 1) for i, layer in enumerate(layers)]
    final = _final_activation(layers[-1])
    features = feature_model(model, feature_layer)

    def fn(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        a = tf.cast(features(image, training=False), tf.float32)
        x, backward = a, []
        for rule in rules:
            x, back = rule(x)
            backward.append(back)
        score = x  # [N, 1] pneumonia logit
        g = tf.ones_like(score)
        for back in reversed(backward):
            g = back(g)
        alpha = tf.reduce_mean(g, axis=[1, 2])
        cam = tf.nn.relu(tf.einsum("nhwc,nc->nhw", a, alpha))
        return final(score), cam

    return fn


def gradcam_tape(model: keras.Model, feature_layer: str, images: Any) -> tuple[Any, Any]:
    """Reference Grad-CAM with GradientTape, as in the Keras Grad-CAM example.

    Returns:
        (probability [N, 1], gradcam [N, h, w]) as numpy arrays.
    """
    layers = head_layers(model, feature_layer)
    features = feature_model(model, feature_layer)
    last = layers[-1]
    with tf.GradientTape() as tape:
        a = tf.cast(features(tf.convert_to_tensor(images), training=False), tf.float32)
        tape.watch(a)
        h = a
        for layer in layers[:-1]:
            h = layer(h, training=False)
        score = tf.matmul(tf.cast(h, tf.float32), tf.cast(last.kernel, tf.float32)) + tf.cast(last.bias, tf.float32)
    grads = tape.gradient(score, a)
    alpha = tf.reduce_mean(grads, axis=[1, 2])
    cam = tf.nn.relu(tf.einsum("nhwc,nc->nhw", a, alpha))
    return model(images, training=False).numpy(), cam.numpy()
