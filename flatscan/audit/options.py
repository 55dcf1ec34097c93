"""What an audit runs with, one object for `flatscan model`, `flatscan org` and the Ray audit: the data options,
the device and the scan settings. Imports nothing heavy (the CLI reads its defaults at start-up)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from flatscan.io.data import DataOptions

# Ray's `memory` is a scheduling hint, not a limit: room for a typical timm model, its data loaders and a batch.
DEFAULT_MEMORY_GB = 4.0
DEFAULT_RETRIES = 3  # Ray's own default for tasks


@dataclass(frozen=True)
class AuditOptions:
    """One audit's settings: ``data`` (opened per model, in its own preprocessing), ``num_samples`` (stop after this
    many images), ``device`` (as ``flatscan.scan`` takes it; the Ray audit resolves it in the worker), ``amp``,
    ``trace_only``, ``kappa_rtol`` (``flatscan.scan``'s), ``channels_last``, ``offline`` (the local cache only) and
    ``force`` (redo models the store has)."""

    data: DataOptions
    num_samples: int | None = None
    device: str | torch.device | None = None
    amp: bool = False
    trace_only: bool = False
    kappa_rtol: float | None = None
    channels_last: bool = False
    offline: bool = False
    force: bool = False

    def check_storable(self) -> None:
        """Refuse options whose results a store must not keep: its run keys do not record ``kappa_rtol``, so a bounded
        kappa would later pass for an exact one."""
        if self.kappa_rtol is not None:
            from flatscan.errors import FlatscanError

            raise FlatscanError(
                "kappa_rtol is for single scans (flatscan model, flatscan.scan): an audit's store keeps exact values; "
                "audit without it"
            )
