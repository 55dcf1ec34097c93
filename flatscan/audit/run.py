"""One model's run, shared by `flatscan model` and `flatscan org`: describe the model (refusing before any data is
read), open its data, scan with the out-of-memory retry, and the flat result row that the CLI prints and the results
store keeps."""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import timm
import torch
from torch import nn

import flatscan
from flatscan.audit.options import AuditOptions
from flatscan.contract import NormalisedHead
from flatscan.errors import FlatscanError, ScanInterrupted
from flatscan.io.data import DataOptions, EvalData, open_eval_data
from flatscan.io.models import LoadedModel
from flatscan.registry import describe
from flatscan.scanner import ScanResult, scan


@dataclass(frozen=True)
class PreparedRun:
    """A model ready to scan: its normalised head, the module to run (channels-last when asked) and its data."""

    loaded: LoadedModel
    head: NormalisedHead
    model: nn.Module
    data: EvalData


def prepare(loaded: LoadedModel, options: AuditOptions) -> PreparedRun:
    """Describe ``loaded`` (an unsupported model is refused before touching any data), then open its data."""
    head = describe(loaded.model)
    model = loaded.model.to(memory_format=torch.channels_last) if options.channels_last else loaded.model
    return PreparedRun(loaded, head, model, open_eval_data(model, options.data, limit=options.num_samples))


def measure(
    run: PreparedRun,
    options: AuditOptions,
    *,
    on_batch: Callable[[ScanResult], bool | None] | None = None,
    on_retry: Callable[[int], None] | None = None,
    on_partial: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Scan ``run`` as ``options`` say and return its result row. On Ctrl-C, ``on_partial`` gets the row of the
    batches finished so far before :class:`ScanInterrupted` propagates."""
    try:
        result, data, used = scan_with_retry(
            run.model,
            options.data,
            run.data,
            on_retry=on_retry,
            device=options.device,
            max_samples=options.num_samples,
            trace_only=options.trace_only,
            kappa_rtol=options.kappa_rtol,
            amp=options.amp,
            on_batch=on_batch,
        )
    except ScanInterrupted as interrupted:
        if on_partial is not None and interrupted.partial is not None:
            on_partial(result_record(run.loaded, run.data, cast(ScanResult, interrupted.partial), options.data))
        raise
    return result_record(run.loaded, data, result, used)


def scan_with_retry(
    model: nn.Module,
    options: DataOptions,
    data: EvalData | None = None,
    on_retry: Callable[[int], None] | None = None,
    **scan_options: Any,
) -> tuple[ScanResult, EvalData, DataOptions]:
    """``flatscan.scan`` on ``data`` (default ``open_eval_data(model, options)``); on out-of-memory, as timm's
    validate --retry, the batch is halved and the scan starts again. Returns the result with the data and options
    finally used."""
    while True:
        data = data or open_eval_data(model, options, limit=scan_options.get("max_samples"))
        try:
            return scan(model, data.batches, **scan_options), data, options
        except torch.OutOfMemoryError:
            if options.batch_size == 1:
                raise FlatscanError("out of memory even at batch size 1; try --device cpu") from None
            options, data = dataclasses.replace(options, batch_size=options.batch_size // 2), None
            torch.cuda.empty_cache()
            if on_retry is not None:
                on_retry(options.batch_size)


def result_record(loaded: LoadedModel, data: EvalData, result: ScanResult, options: DataOptions) -> dict[str, Any]:
    """One flat, JSON-friendly row: the model, the data, the measures and the versions."""
    return {
        "model": loaded.name,
        "revision": loaded.revision,
        "source": loaded.source,
        **result.to_dict(),
        "dataset": data.name,
        "split": data.split,
        "label_mapping": data.label_mapping,
        "input_size": list(data.data_config.get("input_size", ())),
        "interpolation": data.data_config.get("interpolation"),
        "crop_pct": data.data_config.get("crop_pct"),
        "batch_size": options.batch_size,
        "flatscan_version": flatscan.__version__,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }
