"""Command line: a thin layer over the Python API (flatscan.scan, flatscan.describe, load_model, open_eval_data)."""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import timm
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

import flatscan
from flatscan.data import DataOptions, EvalData, open_eval_data
from flatscan.errors import FlatscanError, ScanInterrupted
from flatscan.leaderboard import build_leaderboard, write_reports
from flatscan.models import LoadedModel, load_model
from flatscan.reported import ReportedAccuracy
from flatscan.scanner import ScanResult, resolve_device
from flatscan.store import ResultsStore

app = typer.Typer(
    help="Exact Hessian trace and relative flatness of CNN classifiers' feature layers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)

ModelName = Annotated[
    str | None,
    typer.Argument(
        help="timm name (resnet50, resnet50.a1_in1k), Hub id (hf-hub:timm/resnet50.a1_in1k), or a local dir"
    ),
]
Checkpoint = Annotated[Path | None, typer.Option(help="local weights file (.safetensors / .pth) for --arch")]
Arch = Annotated[str | None, typer.Option(help="timm architecture of --checkpoint")]
Offline = Annotated[bool, typer.Option("--offline", help="load from the local cache only (also HF_HUB_OFFLINE=1)")]
RandomInit = Annotated[bool, typer.Option("--random-init", help="build the architecture without loading weights")]
Debug = Annotated[bool, typer.Option("--debug", help="show tracebacks")]


@app.callback()
def main() -> None:
    """flatscan: audit pretrained CNN classifiers."""


def _run(debug: bool, action: Callable[[], None], subject: str | None = None) -> None:
    """Run ``action``; a FlatscanError becomes one line on stderr (``unsupported: NAME: reason``) and its exit code."""
    try:
        action()
    except FlatscanError as error:
        if debug:
            raise
        kind = "unsupported" if isinstance(error, flatscan.UnsupportedModel) else "error"
        # Text, not markup: messages quote user input and module names that may contain brackets.
        message = Text.assemble((f"{kind}:", "bold red"), f" {subject}: " if subject else " ", str(error))
        errors.print(message, soft_wrap=True, highlight=False)
        raise typer.Exit(error.exit_code) from None


def _load(name: str | None, checkpoint: Path | None, arch: str | None, offline: bool, random_init: bool) -> LoadedModel:
    return load_model(name, checkpoint=checkpoint, arch=arch, offline=offline or None, pretrained=not random_init)


@app.command()
def describe(
    name: ModelName = None,
    checkpoint: Checkpoint = None,
    arch: Arch = None,
    offline: Offline = False,
    random_init: RandomInit = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the normalised head as JSON")] = False,
    debug: Debug = False,
) -> None:
    """Print a model's normalised head (feature layer, folded scale, activation, head), or why it is refused."""

    def action() -> None:
        loaded = _load(name, checkpoint, arch, offline, random_init)
        head = {"model": loaded.name, **flatscan.describe(loaded.model).to_dict()}
        if as_json:
            typer.echo(json.dumps(head))
            return
        table = Table(title=f"{loaded.name}: normalised head", show_header=False)
        for key, value in head.items():
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
        console.print(table)

    _run(debug, action, name or (str(checkpoint) if checkpoint else None))


def _record(loaded: LoadedModel, data: EvalData, result: ScanResult, options: DataOptions) -> dict[str, Any]:
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


def _format(value: float | None, se: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if se is None or math.isnan(se) else f"{value:.4g} ± {se:.2g}"


def _print_table(record: dict[str, Any], title: str, out: Console) -> None:
    table = Table(title=title, show_header=False)
    rows = {
        "model": record["model"],
        "feature layer": record["feature_layer"],
        "activation": record["activation"],
        "Tr(H)": _format(record["trace"], record["trace_se"]),
        "kappa": _format(record["relative_flatness"], record["relative_flatness_se"]),
        "classifier kappa": _format(record["classifier_flatness"]),
        "loss": f"{record['loss']:.4f}",
        "top-1": f"{100 * record['accuracy']:.2f}",
        "top-5": f"{100 * record['accuracy_top5']:.2f}",
        "images": str(record["n_samples"]),
        "seconds": f"{record['seconds']:.1f}",
    }
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows.items():
        table.add_row(key, value)
    out.print(table)


def _write_results(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` to a .csv, or write it to a .json file."""
    if path.suffix == ".csv":
        frame = pd.DataFrame([record])
        frame.to_csv(path, mode="a", header=not path.exists() or path.stat().st_size == 0, index=False)
    elif path.suffix == ".json":
        path.write_text(json.dumps(record, indent=2) + "\n")
    else:
        raise FlatscanError(f"--results-file {path}: use a .json or .csv file name")


def _progress_callback(progress: Progress, task: int, until_se: float | None) -> Callable[[ScanResult], bool]:
    def on_batch(running: ScanResult) -> bool:
        kappa = _format(running.relative_flatness, running.relative_flatness_se)
        rate = running.n_samples / max(running.seconds, 1e-9)
        progress.update(task, completed=running.n_samples, kappa=kappa, rate=f"{rate:.1f} img/s")
        if until_se is None or running.relative_flatness is None or running.n_samples < 2:
            return False
        return running.relative_flatness_se / abs(running.relative_flatness) < until_se

    return on_batch


@app.command()
def model(
    name: ModelName = None,
    checkpoint: Checkpoint = None,
    arch: Arch = None,
    offline: Offline = False,
    random_init: RandomInit = False,
    dataset: Annotated[
        str | None, typer.Option(help="digits (built in), a HF dataset id, an image folder, or parquet/arrow files")
    ] = None,
    config: Annotated[str | None, typer.Option(help="HF dataset config")] = None,
    split: Annotated[str | None, typer.Option(help="dataset split (default: validation, test, then train)")] = None,
    image_column: Annotated[str | None, typer.Option(help="image column (default: auto-detect)")] = None,
    label_column: Annotated[str | None, typer.Option(help="label column (default: auto-detect)")] = None,
    class_map: Annotated[Path | None, typer.Option(help="file mapping dataset labels to model classes")] = None,
    img_size: Annotated[int | None, typer.Option(help="input size (default: the model's pretrained config)")] = None,
    crop_pct: Annotated[float | None, typer.Option(help="center-crop fraction")] = None,
    interpolation: Annotated[str | None, typer.Option(help="resize interpolation (bilinear, bicubic, ...)")] = None,
    mean: Annotated[tuple[float, float, float] | None, typer.Option(help="normalisation mean")] = None,
    std: Annotated[tuple[float, float, float] | None, typer.Option(help="normalisation std")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 64,
    workers: Annotated[int, typer.Option("--workers", "-j", min=0, help="data loading processes")] = 4,
    num_samples: Annotated[int | None, typer.Option(min=1, help="stop after this many images")] = None,
    device: Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")] = "auto",
    amp: Annotated[
        bool, typer.Option("--amp", help="mixed-precision forward pass (the measure stays >= fp32)")
    ] = False,
    channels_last: Annotated[bool, typer.Option("--channels-last")] = False,
    seed: Annotated[int, typer.Option(help="seed for data order and splits")] = 0,
    until_se: Annotated[
        float | None, typer.Option(help="stop once the relative standard error of kappa is below this")
    ] = None,
    trace_only: Annotated[bool, typer.Option("--trace-only", help="measure Tr(H) only (skip kappa)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the result row as JSON")] = False,
    results_file: Annotated[Path | None, typer.Option(help="write the result to a .json or append to a .csv")] = None,
    debug: Debug = False,
) -> None:
    """Scan one model: exact Tr(H) and relative flatness of its feature layer on evaluation data."""
    torch.manual_seed(seed)

    def action() -> None:
        loaded = _load(name, checkpoint, arch, offline, random_init)
        head = flatscan.describe(loaded.model)  # refuse before touching any data
        net = loaded.model.to(memory_format=torch.channels_last) if channels_last else loaded.model
        dev = resolve_device(device)
        size = batch_size
        while True:
            options = DataOptions(
                dataset=dataset,
                config=config,
                split=split,
                image_column=image_column,
                label_column=label_column,
                class_map=class_map,
                img_size=img_size,
                crop_pct=crop_pct,
                interpolation=interpolation,
                mean=mean,
                std=std,
                batch_size=size,
                workers=workers,
                seed=seed,
            )
            data = open_eval_data(net, options)
            known = [n for n in (num_samples, data.num_samples) if n is not None]
            total = min(known) if known else None
            progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TextColumn("kappa {task.fields[kappa]}"),
                TimeElapsedColumn(),
                console=errors,
                transient=True,
            )
            task = progress.add_task(f"{loaded.name} [{head.feature_layer}]", total=total, kappa="-", rate="")
            try:
                with progress:
                    result = flatscan.scan(
                        net,
                        data.batches,
                        device=dev,
                        max_samples=num_samples,
                        trace_only=trace_only,
                        amp=amp,
                        on_batch=_progress_callback(progress, task, until_se),
                    )
                break
            except torch.OutOfMemoryError:
                # As timm's validate --retry: halve the batch and start again.
                if size == 1:
                    raise FlatscanError(f"out of memory on {dev} even at batch size 1; try --device cpu") from None
                size //= 2
                torch.cuda.empty_cache()
                errors.print(f"out of memory on {dev}; retrying with batch size {size}")
            except ScanInterrupted as interrupted:
                if interrupted.partial is not None:
                    _emit(
                        _record(loaded, data, interrupted.partial, options),
                        "partial result (interrupted)",
                        as_json,
                        results_file,
                    )
                raise
        _emit(_record(loaded, data, result, options), f"flatscan: {data.name}", as_json, results_file)

    _run(debug, action, name or (str(checkpoint) if checkpoint else None))


def _emit(record: dict[str, Any], title: str, as_json: bool, results_file: Path | None) -> None:
    # With --json, stdout carries the JSON alone and the table goes to stderr.
    _print_table(record, title, errors if as_json else console)
    if as_json:
        typer.echo(json.dumps(record))
    if results_file is not None:
        _write_results(results_file, record)


@app.command()
def verify(
    name: ModelName = None,
    checkpoint: Checkpoint = None,
    arch: Arch = None,
    offline: Offline = False,
    random_init: RandomInit = False,
    dataset: Annotated[str, typer.Option(help="where the batch comes from (any --dataset of `model`)")] = "digits",
    img_size: Annotated[int, typer.Option(help="input size: small keeps the reference cheap")] = 96,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 2,
    pairs: Annotated[int, typer.Option(min=1, help="sampled filter pairs (c, c')")] = 16,
    tolerance: Annotated[float, typer.Option(help="largest relative error that passes")] = 1e-8,
    as_json: Annotated[bool, typer.Option("--json", help="print the certificate as JSON")] = False,
    debug: Debug = False,
) -> None:
    """Certify one model: closed-form Tr(H_cc') against autograd through the real model graph (float64, CPU)."""

    def action() -> None:
        loaded = _load(name, checkpoint, arch, offline, random_init)
        options = DataOptions(dataset=dataset, img_size=img_size, batch_size=batch_size, workers=0)
        batch = next(iter(open_eval_data(loaded.model, options).batches))
        result = flatscan.verify(loaded.model, batch, pairs=pairs, tolerance=tolerance)
        if as_json:
            typer.echo(json.dumps({"model": loaded.name, **result.to_dict()}))
        else:
            table = Table(title=f"{loaded.name}: {result.feature_layer}, Tr(H_cc') on {batch_size} images")
            for column in ("c", "c'", "closed form", "autograd"):
                table.add_column(column, justify="right")
            for (c, c2), closed, reference in zip(result.pairs, result.closed_form, result.autograd, strict=True):
                table.add_row(str(c), str(c2), f"{closed:.12g}", f"{reference:.12g}")
            console.print(table)
            if result.degenerate:
                console.print("every sampled Tr(H_cc') is zero (a zero scale, dead filters): nothing was certified")
            if result.downstream_layers:
                console.print(f"weight layers fed by the feature layer: {', '.join(result.downstream_layers)}")
            verdict = "[green]PASS[/]" if result.passed else "[red]FAIL[/]"
            console.print(f"max relative error {result.max_relative_error:.2e} (tolerance {tolerance:g}): {verdict}")
        if not result.passed:
            raise typer.Exit(1)

    _run(debug, action, name or (str(checkpoint) if checkpoint else None))


@app.command()
def leaderboard(
    store: Annotated[Path, typer.Argument(help="results store written by `flatscan org`")] = Path(
        "flatscan-results.sqlite"
    ),
    rank_by: Annotated[str, typer.Option(help="measure to rank by (ascending: flatter first)")] = "relative_flatness",
    dataset: Annotated[
        str | None, typer.Option(help="the evaluation data set to rank (when the store has several)")
    ] = None,
    reported: Annotated[
        Path | None, typer.Option(help="your own reported accuracies: CSV with model,top1[,top5]")
    ] = None,
    offline: Offline = False,
    out: Annotated[Path, typer.Option(help="directory for the .md, .csv and .html reports")] = Path("reports"),
    stem: Annotated[str, typer.Option(help="file name stem of the reports")] = "leaderboard",
    debug: Debug = False,
) -> None:
    """Rank audited models by a flatness measure against reported accuracy, with rank correlations."""

    def action() -> None:
        if not store.exists():
            raise FlatscanError(f"no results store at {store}; run `flatscan org ORG` first or pass the store's path")
        with ResultsStore(store) as results:
            frame = results.frame()
        if dataset is not None:
            frame = frame[frame["dataset"] == dataset]
        board = build_leaderboard(frame, ReportedAccuracy(user_csv=reported, offline=offline), rank_by=rank_by)
        console.print(board.rich_table())
        for path in write_reports(board, out, stem):
            console.print(f"wrote {path}")

    _run(debug, action)
