"""ResNet-50 with the paper's head, and Grad-CAM written two ways.

* :func:`gradcam_tape` is Grad-CAM as the Keras example computes it, with
  ``tf.GradientTape``: the reference.
* :func:`gradcam_forward` writes the gradient of the class score with respect to
  the feature maps using forward-only ops, one rule per head layer, because
  tf2onnx cannot convert gradient ops (ReluGrad, SigmoidGrad). Export checks the
  two agree.

The class score is the pneumonia logit (the last layer's pre-activation), as
Selvaraju et al. use the pre-softmax score. The contract needs a logit and a probability,
so the head must end in one of the shapes :func:`split_head` accepts: ``Dense(1,
activation="sigmoid")`` (with or without bias) or ``Dense(1)`` followed by
``Activation("sigmoid")``; anything else is refused with one error naming the layer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from trainer.config import ModelSection, resolved_bn
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
    frozen = resolved_bn(cfg) == "frozen"
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            # Keras' 0.99 suits long runs; short runs on small sets need faster-moving
            # statistics or validation in inference mode lags far behind training.
            layer.momentum = cfg.bn_momentum
            # Keras' transfer-learning guide: a non-trainable BatchNormalization runs in
            # inference mode, so pretrained statistics are not overwritten by the batch
            # statistics of the first steps, while the head is still random.
            layer.trainable = not frozen
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


def _rule(layer: keras.layers.Layer) -> ForwardRule:
    """Forward function of one head layer (before the score layer) returning (output,
    backward); backward maps the gradient at the output to the gradient at the input
    with forward-only ops."""
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
        if act not in SUPPORTED_ACTIVATIONS:
            raise ExportError(f"no forward-only gradient rule for activation {act!r} of layer {layer.name!r}")

        def dense(x: tf.Tensor) -> tuple[tf.Tensor, Callable[[tf.Tensor], tf.Tensor]]:
            if kind == "Dense":
                kernel = tf.cast(tf.convert_to_tensor(layer.kernel), x.dtype)
                z = tf.matmul(x, kernel)
                if layer.use_bias:
                    z = z + tf.cast(tf.convert_to_tensor(layer.bias), x.dtype)
            else:
                z = x
            a, da = _activation_and_derivative(act, z)
            if kind == "Dense":
                return a, lambda g: tf.matmul(g * da, kernel, transpose_b=True)
            return a, lambda g: g * da

        return dense
    raise ExportError(f"no forward-only gradient rule for head layer {layer.name!r} ({kind})")


@dataclass(frozen=True)
class Head:
    """The head split where the contract needs it: the logit is ``score``'s pre-activation."""

    body: list[keras.layers.Layer]  # feature layer -> input of the score layer
    score: keras.layers.Layer  # Dense with one unit
    activation: keras.layers.Layer | None  # Activation("sigmoid") after a linear score layer


ACCEPTED_OUTPUTS = "Dense(1, activation='sigmoid') or Dense(1) followed by Activation('sigmoid')"


def _describe(layer: keras.layers.Layer) -> str:
    units = getattr(layer, "units", None)
    shape = f" with {units} units" if units is not None else ""
    return f"{type(layer).__name__} {layer.name!r}{shape} and activation {_activation_name(layer)!r}"


def split_head(model: keras.Model, feature_layer: str) -> Head:
    """The head's body, its one-unit score layer, and an optional sigmoid Activation.

    Raises:
        ExportError: one line naming the output layer when the head ends in any other shape
            (a linear output would be served as a "probability"; two units have no single logit).
    """
    layers = head_layers(model, feature_layer)
    last = layers[-1]
    previous = layers[-2] if len(layers) > 1 else None
    if isinstance(last, keras.layers.Dense) and last.units == 1 and _activation_name(last) == "sigmoid":
        return Head(layers[:-1], last, None)
    if (isinstance(last, keras.layers.Activation) and _activation_name(last) == "sigmoid"
            and isinstance(previous, keras.layers.Dense) and previous.units == 1
            and _activation_name(previous) == "linear"):
        return Head(layers[:-2], previous, last)
    received = _describe(last) + (f" after {_describe(previous)}" if isinstance(last, keras.layers.Activation)
                                  and previous is not None else "")
    raise ExportError(f"the model must end in {ACCEPTED_OUTPUTS}: the contract serves a probability and "
                      f"its logit. Received: {received}")


def feature_model(model: keras.Model, feature_layer: str) -> keras.Model:
    """The sub-model from the image to the feature maps."""
    # model.input, not model.inputs: built on a list, the sub-model expects a list and Keras warns
    # ("The structure of `inputs` doesn't match") at every call with the image tensor.
    return keras.Model(model.input, model.get_layer(feature_layer).output)


def _score(layer: keras.layers.Layer, h: tf.Tensor) -> tf.Tensor:
    """The score layer's pre-activation, in float32 whatever the policy."""
    z = tf.matmul(tf.cast(h, tf.float32), tf.cast(tf.convert_to_tensor(layer.kernel), tf.float32))
    if layer.use_bias:
        z = z + tf.cast(tf.convert_to_tensor(layer.bias), tf.float32)
    return z


#: What :func:`gradcam_parts` returns, by key.
PARTS = ("logit", "probability", "gradcam", "gradcam_raw", "alpha", "pooled")


def gradcam_parts(model: keras.Model, feature_layer: str) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
    """Everything export needs from one forward graph with no gradient ops.

    Returns:
        ``fn(image) -> dict``: ``logit`` [N, 1] (uncalibrated), ``probability`` [N, 1],
        ``gradcam`` [N, h, w] = ReLU(``gradcam_raw``), ``gradcam_raw`` = sum_k alpha_k A_k,
        ``alpha`` [N, C] and ``pooled`` [N, C], the spatial mean of the feature maps A.
    """
    head = split_head(model, feature_layer)
    rules = [_rule(layer) for layer in head.body]
    score_layer = head.score
    features = feature_model(model, feature_layer)

    def fn(image: tf.Tensor) -> dict[str, tf.Tensor]:
        a = tf.cast(features(image, training=False), tf.float32)
        x, backward = a, []
        for rule in rules:
            x, back = rule(x)
            backward.append(back)
        logit = _score(score_layer, x)
        g = tf.matmul(tf.ones_like(logit), tf.cast(tf.convert_to_tensor(score_layer.kernel), tf.float32),
                      transpose_b=True)
        for back in reversed(backward):
            g = back(g)
        alpha = tf.reduce_mean(g, axis=[1, 2])
        raw = tf.einsum("nhwc,nc->nhw", a, alpha)
        return {"logit": logit, "probability": tf.sigmoid(logit), "gradcam": tf.nn.relu(raw),
                "gradcam_raw": raw, "alpha": alpha, "pooled": tf.reduce_mean(a, axis=[1, 2])}

    return fn


def gradcam_forward(
    model: keras.Model, feature_layer: str
) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """Probability and Grad-CAM in one forward graph with no gradient ops.

    Returns:
        ``fn(image) -> (probability [N, 1], gradcam [N, h, w])``, gradcam raw and >= 0.
    """
    parts = gradcam_parts(model, feature_layer)

    def fn(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        out = parts(image)
        return out["probability"], out["gradcam"]

    return fn


def gradcam_tape_parts(model: keras.Model, feature_layer: str, images: Any) -> dict[str, Any]:
    """Reference Grad-CAM with GradientTape, as in the Keras Grad-CAM example.

    Returns:
        The keys of :func:`gradcam_parts` but ``pooled``, as numpy arrays; ``probability`` is
        the Keras model's own output, so a head the split misreads cannot verify.
    """
    head = split_head(model, feature_layer)
    features = feature_model(model, feature_layer)
    with tf.GradientTape() as tape:
        a = tf.cast(features(tf.convert_to_tensor(images), training=False), tf.float32)
        tape.watch(a)
        h = a
        for layer in head.body:
            h = layer(h, training=False)
        score = _score(head.score, h)
    grads = tape.gradient(score, a)
    alpha = tf.reduce_mean(grads, axis=[1, 2])
    raw = tf.einsum("nhwc,nc->nhw", a, alpha)
    return {"logit": score.numpy(), "probability": np.asarray(model(images, training=False), np.float32),
            "gradcam": tf.nn.relu(raw).numpy(), "gradcam_raw": raw.numpy(), "alpha": alpha.numpy()}


def gradcam_tape(model: keras.Model, feature_layer: str, images: Any) -> tuple[Any, Any]:
    """(probability [N, 1], gradcam [N, h, w]) of :func:`gradcam_tape_parts`."""
    parts = gradcam_tape_parts(model, feature_layer, images)
    return parts["probability"], parts["gradcam"]


def computes_in_float32(model: keras.Model) -> bool:
    """Whether every layer computes in float32 (not so for a model trained under ``mixed_float16``)."""
    return all(layer.dtype_policy.compute_dtype == "float32" for layer in _all_layers(model))


def _all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    found: list[keras.layers.Layer] = []
    for layer in model.layers:
        found.append(layer)
        if isinstance(layer, keras.Model):
            found += _all_layers(layer)
    return found


def as_float32(model: keras.Model) -> keras.Model:
    """The same model computing in float32, for export and evaluation.

    A model trained with mixed precision (``mixed_float16``, the default on a GPU) keeps
    float32 weights but computes in float16: converted as loaded, its ONNX graph differs from
    the float32 reference by ~1e-4 in probability and export's verification refuses it, and
    metrics computed in float16 would not describe the exported model. So the model is
    rebuilt from its own config with every layer's policy float32 and the weights copied;
    a model already in float32 is returned as it is.
    """
    if computes_in_float32(model):
        return model

    def in_float32(layer: keras.layers.Layer) -> keras.layers.Layer:
        if isinstance(layer, keras.Model):
            return keras.models.clone_model(layer, clone_function=in_float32)
        return type(layer).from_config({**layer.get_config(), "dtype": "float32"})

    rebuilt = keras.models.clone_model(model, clone_function=in_float32)
    rebuilt.set_weights(model.get_weights())
    if not computes_in_float32(rebuilt):
        raise ExportError(f"model {model.name!r} still computes in reduced precision after the float32 rebuild")
    return rebuilt


def weights_sha256(model: keras.Model) -> str:
    """sha256 over every weight array in model order: stable across file formats."""
    h = hashlib.sha256()
    for w in model.weights:
        h.update(w.path.encode())
        h.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w), dtype=np.float32).tobytes())
    return h.hexdigest()
