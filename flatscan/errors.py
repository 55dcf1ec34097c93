"""flatscan's exceptions: each message is one line naming the problem and the fix."""

from __future__ import annotations


class FlatscanError(Exception):
    """Base class; the CLI prints ``str(error)`` on one line and exits with ``exit_code``."""

    exit_code = 1


class UnsupportedModel(FlatscanError):
    """The model is outside the class flatscan measures exactly; ``reason`` says why."""

    exit_code = 3

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ScanError(FlatscanError):
    """The evaluation data cannot be scanned (no samples, labels outside the model's classes)."""


class EnvironmentFault(FlatscanError):
    """The machine, network or disk failed, not the model: an audit does not record it as the model's verdict."""


class NonFiniteValue(FlatscanError):
    """A weight, the logits or a measure holds NaN/Inf: never a result; the message names the tensor."""


class ScanInterrupted(FlatscanError):
    """The scan was interrupted (Ctrl-C); ``partial`` holds the result over the samples finished so far."""

    exit_code = 130

    def __init__(self, partial: object | None) -> None:
        n = getattr(partial, "n_samples", 0)
        super().__init__(f"interrupted after {n} samples" + ("; partial result kept" if partial else ""))
        self.partial = partial
