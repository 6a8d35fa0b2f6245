"""Failures sorted by kind, in one place, as pynetdicom sorts its statuses.

* ``INPUT``: the file is bad (it cannot be read, or a library refuses its header). It
  goes to quarantine with its reason; retrying cannot help.
* ``INFRASTRUCTURE``: ONNX Runtime or CUDA failed, the disk is full, a peer is down. The
  input is fine: it goes back to the queue and the worker backs off; never quarantined.
* ``BUG``: our own code raised. Logged with its traceback and counted in
  ``cxr_internal_errors_total``; the instance is quarantined with "internal error" as the
  reason so the queue moves on, and never counted as bad input.
"""

from __future__ import annotations

import enum
import traceback
from pathlib import Path
from typing import Any

from worker.errors import DecodeError, InfrastructureError, ModelError, SendError, UnsupportedInput

_OURS = tuple(str(Path(__file__).resolve().parent.parent / name) for name in ("worker", "cxr_contract"))


class Fault(enum.Enum):
    INPUT = "input"
    INFRASTRUCTURE = "infrastructure"
    BUG = "bug"


def raised_in_our_code(exc: BaseException) -> bool:
    """Whether the innermost frame of the traceback is in ``worker/`` or ``cxr_contract/``."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename.startswith(_OURS)


def fault_of(exc: BaseException) -> Fault:
    """The kind of a failure raised after an instance was decoded (infer, build, write).

    The decode stage reports every failure as :class:`DecodeError`: a malformed file can
    break a reader anywhere, so there any exception is the input's.
    """
    if isinstance(exc, RemoteFailure):
        return exc.fault
    if isinstance(exc, (DecodeError, UnsupportedInput)):
        return Fault.INPUT
    if isinstance(exc, (InfrastructureError, ModelError, SendError, OSError, MemoryError)):
        return Fault.INFRASTRUCTURE
    if type(exc).__module__.startswith("onnxruntime"):  # its pybind errors: Fail, EPFail, RuntimeException
        return Fault.INFRASTRUCTURE
    return Fault.BUG if raised_in_our_code(exc) else Fault.INPUT


class RemoteFailure(Exception):
    """An exception raised in an answer process, sorted there (its traceback tells a bug from a
    bad input, :func:`worker.faults.fault_of`) and carried back as text: library exceptions do not
    all survive pickling."""

    def __init__(self, fault: Fault, text: str, trace: str = "", stage: str = "decode") -> None:
        super().__init__(text)
        self.fault = fault
        self.text = text
        self.trace = trace
        self.stage = stage  # decode, infer or build: the metric label of an internal error

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteFailure, (self.fault, self.text, self.trace, self.stage))

    @classmethod
    def of(cls, exc: BaseException, stage: str) -> RemoteFailure:
        fault = fault_of(exc)
        return cls(fault, f"{type(exc).__name__}: {exc}",
                   "".join(traceback.format_exception(exc)) if fault is Fault.BUG else "", stage)
