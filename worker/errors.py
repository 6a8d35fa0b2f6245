"""One error hierarchy for the worker; the CLI maps each to one clear line."""


class WorkerError(Exception):
    """Base class of every error the worker raises on purpose.

    The message is folded into one line: library errors quoted in it (pydicom lists one line
    per pixel-data plugin) would otherwise break the one-line CLI error, log record and
    quarantine reason.
    """

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(" ".join(str(message).split()), *args)


class ConfigError(WorkerError):
    """The configuration file, a flag or an environment variable is invalid."""


class UnsupportedInput(WorkerError):
    """A dataset is readable but not something the model can be applied to."""


class DecodeError(WorkerError):
    """A dataset or its pixel data cannot be read."""


class InfrastructureError(WorkerError):
    """The runtime, the disk or a peer failed; the input is fine and is retried later."""


class ModelError(WorkerError):
    """The ONNX model is missing or does not follow the model contract."""


class ModelProbeMismatch(ModelError):
    """A reduced-precision model answers its stored probes, on this machine, outside the limits
    its export verified (int8 kernels differ between CPUs)."""


class SendError(WorkerError):
    """A delivery (C-STORE or STOW-RS) to a destination failed (``attempted``: False when it was never tried)."""

    def __init__(self, message: str, *, permanent: bool = False, attempted: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.attempted = attempted
