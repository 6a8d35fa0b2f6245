"""Errors the trainer raises on purpose; the CLI prints each as one line."""


class TrainerError(Exception):
    """Base class: a clear message, never a traceback, for the user."""


class DataError(TrainerError):
    """Input data (label file, images, split CSVs) is missing or inconsistent."""


class ConfigError(TrainerError):
    """A configuration value or flag is invalid."""


class ExportError(TrainerError):
    """The ONNX export failed or did not verify against TensorFlow."""
