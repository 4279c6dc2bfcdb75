"""Every error edgelora raises on purpose is an :class:`EdgeLoraError` with a one-line message
that names the file (where there is one) and what to do about it. The CLI prints the message and
exits with the class's ``exit_code``."""

from __future__ import annotations


class EdgeLoraError(Exception):
    """Base class: a problem with the user's input or environment, explained in one line."""

    exit_code = 1

    def __init__(self, message: str, path=None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class UsageError(EdgeLoraError):
    """Bad arguments: an unknown option value, an output that already exists."""

    exit_code = 2


class FormatError(EdgeLoraError):
    """A file is missing, truncated, corrupt, or not in the format it claims to be."""

    exit_code = 3


class ChecksumError(FormatError):
    """A file's sha256 does not match the manifest."""


class AdapterMismatchError(FormatError):
    """A LoRA adapter made for another base model (sizes, layer count, module names, vocabulary)."""


class UnsupportedError(EdgeLoraError):
    """Valid input edgelora does not handle (an architecture, a dtype, a newer format version)."""

    exit_code = 4


class PickleRefusedError(UnsupportedError):
    """A pickle checkpoint (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``): never unpickled."""


class QuantizationError(EdgeLoraError):
    """Weights that cannot be quantized (empty, non-finite, not floating point)."""

    exit_code = 3


class OutputError(EdgeLoraError):
    """The output could not be written (exists already, disk full, no permission)."""

    exit_code = 5


class PlanError(EdgeLoraError):
    """A memory plan that does not fit its device, or a deploy folder used beyond its plan or on a
    device unlike the one it was planned for."""

    exit_code = 6


class QueueFull(EdgeLoraError):
    """The batching engine's queue holds ``max_queue`` waiting requests already (an HTTP server's
    429): try again in ``retry_after`` seconds (a guess from the recent requests' durations)."""

    exit_code = 7

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = float(retry_after)


class EngineClosed(EdgeLoraError):
    """A request submitted to a batching engine after ``close()`` (an HTTP server's 503)."""

    exit_code = 7
