"""The contract between the trainer and the worker, imported by both.

``model`` holds the ONNX model's interface (input/output names and shapes, metadata
keys, labels, the contract's own version) and ``pixels`` the preprocessing that must be
identical on both sides. Neither imports TensorFlow or ONNX Runtime: the worker
installs without the trainer's dependencies.
"""
