"""Errors of model loading: what cannot be resolved or loaded, and what offline mode cannot find."""

from __future__ import annotations

from flatscan.errors import EnvironmentFault, FlatscanError


class ModelLoadError(FlatscanError):
    """The model cannot be resolved or loaded; the message names the problem and the fix."""

    exit_code = 2


class OfflineCacheMiss(ModelLoadError):
    """Offline, and the files the model needs are not in the local cache."""


class DownloadFailed(ModelLoadError, EnvironmentFault):
    """The network failed while fetching the model's files (refused, reset, timed out, a server error): retryable."""
