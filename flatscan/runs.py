"""One model's run, shared by `flatscan model` and `flatscan org`: the scan with its out-of-memory retry, and the
flat result row that the CLI prints and the results store keeps."""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Callable
from typing import Any

import timm
import torch
from torch import nn

import flatscan
from flatscan.data import DataOptions, EvalData, open_eval_data
from flatscan.errors import FlatscanError
from flatscan.models import LoadedModel
from flatscan.scanner import ScanResult, scan


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
        data = data or open_eval_data(model, options)
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
