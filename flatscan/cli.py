"""Command line: a thin layer over the Python API (flatscan.scan, flatscan.describe, load_model, open_eval_data)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

import flatscan
from flatscan.data import DataOptions, open_eval_data
from flatscan.errors import FlatscanError, ScanInterrupted
from flatscan.leaderboard import build_leaderboard, write_reports
from flatscan.models import LoadedModel, load_model
from flatscan.org import AuditRow, audit_org
from flatscan.reported import ReportedAccuracy
from flatscan.runs import result_record, scan_with_retry
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
DatasetOpt = Annotated[
    str | None, typer.Option(help="digits (built in), a HF dataset id, an image folder, or parquet/arrow files")
]
ConfigOpt = Annotated[str | None, typer.Option(help="HF dataset config")]
SplitOpt = Annotated[str | None, typer.Option(help="dataset split (default: validation, test, then train)")]
ImageColumnOpt = Annotated[str | None, typer.Option(help="image column (default: auto-detect)")]
LabelColumnOpt = Annotated[str | None, typer.Option(help="label column (default: auto-detect)")]
ClassMapOpt = Annotated[Path | None, typer.Option(help="file mapping dataset labels to model classes")]
ImgSizeOpt = Annotated[int | None, typer.Option(help="input size (default: the model's pretrained config)")]
CropPctOpt = Annotated[float | None, typer.Option(help="center-crop fraction")]
InterpolationOpt = Annotated[str | None, typer.Option(help="resize interpolation (bilinear, bicubic, ...)")]
MeanOpt = Annotated[tuple[float, float, float] | None, typer.Option(help="normalisation mean")]
StdOpt = Annotated[tuple[float, float, float] | None, typer.Option(help="normalisation std")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1)]
WorkersOpt = Annotated[int, typer.Option("--workers", "-j", min=0, help="data loading processes")]
NumSamplesOpt = Annotated[int | None, typer.Option(min=1, help="stop after this many images")]
DeviceOpt = Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")]
AmpOpt = Annotated[bool, typer.Option("--amp", help="mixed-precision forward pass (the measure stays >= fp32)")]
SeedOpt = Annotated[int, typer.Option(help="seed for data order and splits")]
UntilSeOpt = Annotated[float | None, typer.Option(help="stop once the relative standard error of kappa is below this")]
TraceOnlyOpt = Annotated[bool, typer.Option("--trace-only", help="measure Tr(H) only (skip kappa)")]


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


def _progress(out: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("kappa {task.fields[kappa]}"),
        TimeElapsedColumn(),
        console=out,
        transient=True,
    )


def _data_options(
    dataset: str | None,
    config: str | None,
    split: str | None,
    image_column: str | None,
    label_column: str | None,
    class_map: Path | None,
    img_size: int | None,
    crop_pct: float | None,
    interpolation: str | None,
    mean: tuple[float, float, float] | None,
    std: tuple[float, float, float] | None,
    batch_size: int,
    workers: int,
    seed: int,
) -> DataOptions:
    return DataOptions(
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
        batch_size=batch_size,
        workers=workers,
        seed=seed,
    )


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
    dataset: DatasetOpt = None,
    config: ConfigOpt = None,
    split: SplitOpt = None,
    image_column: ImageColumnOpt = None,
    label_column: LabelColumnOpt = None,
    class_map: ClassMapOpt = None,
    img_size: ImgSizeOpt = None,
    crop_pct: CropPctOpt = None,
    interpolation: InterpolationOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = 4,
    num_samples: NumSamplesOpt = None,
    device: DeviceOpt = "auto",
    amp: AmpOpt = False,
    channels_last: Annotated[bool, typer.Option("--channels-last")] = False,
    seed: SeedOpt = 0,
    until_se: UntilSeOpt = None,
    trace_only: TraceOnlyOpt = False,
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
        options = _data_options(
            dataset, config, split, image_column, label_column, class_map, img_size, crop_pct, interpolation, mean,
            std, batch_size, workers, seed,
        )  # fmt: skip
        data = open_eval_data(net, options)
        known = [n for n in (num_samples, data.num_samples) if n is not None]
        progress = _progress(errors)
        task = progress.add_task(
            f"{loaded.name} [{head.feature_layer}]", total=min(known) if known else None, kappa="-", rate=""
        )
        try:
            with progress:
                result, data, options = scan_with_retry(
                    net,
                    options,
                    data,
                    on_retry=lambda size: errors.print(f"out of memory; retrying with batch size {size}"),
                    device=resolve_device(device),
                    max_samples=num_samples,
                    trace_only=trace_only,
                    amp=amp,
                    on_batch=_progress_callback(progress, task, until_se),
                )
        except ScanInterrupted as interrupted:
            if interrupted.partial is not None:
                record = result_record(loaded, data, interrupted.partial, options)
                _emit(record, "partial result (interrupted)", as_json, results_file)
            raise
        _emit(result_record(loaded, data, result, options), f"flatscan: {data.name}", as_json, results_file)

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
            # Refused and failed rows stay: they say which models could not be ranked, and why.
            frame = frame[(frame["dataset"] == dataset) | (frame["status"] != "ok")]
        board = build_leaderboard(frame, ReportedAccuracy(user_csv=reported, offline=offline), rank_by=rank_by)
        console.print(board.rich_table())
        for path in write_reports(board, out, stem):
            console.print(f"wrote {path}")

    _run(debug, action)


@app.command()
def org(
    name: Annotated[str, typer.Argument(help="Hub organisation or user, e.g. timm")],
    store: Annotated[Path, typer.Option(help="SQLite results store")] = Path("flatscan-results.sqlite"),
    pattern: Annotated[str | None, typer.Option("--filter", help="glob on the model name, e.g. 'resnet*'")] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="audit at most this many models (most downloaded first)")
    ] = None,
    include_transformers: Annotated[bool, typer.Option("--include-transformers")] = False,
    force: Annotated[bool, typer.Option("--force", help="redo models already in the store")] = False,
    offline: Offline = False,
    dataset: DatasetOpt = None,
    config: ConfigOpt = None,
    split: SplitOpt = None,
    image_column: ImageColumnOpt = None,
    label_column: LabelColumnOpt = None,
    class_map: ClassMapOpt = None,
    img_size: ImgSizeOpt = None,
    crop_pct: CropPctOpt = None,
    interpolation: InterpolationOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = 4,
    num_samples: NumSamplesOpt = None,
    device: DeviceOpt = "auto",
    amp: AmpOpt = False,
    seed: SeedOpt = 0,
    trace_only: TraceOnlyOpt = False,
    debug: Debug = False,
) -> None:
    """Audit every image-classification model of a Hub organisation; each row is committed as it finishes."""
    torch.manual_seed(seed)

    def action() -> None:
        options = _data_options(
            dataset, config, split, image_column, label_column, class_map, img_size, crop_pct, interpolation, mean,
            std, batch_size, workers, seed,
        )  # fmt: skip
        counts = {"ok": 0, "unsupported": 0, "failed": 0, "skipped": 0}
        progress = _progress(errors)
        models_task = progress.add_task(f"{name}: models", total=None, kappa="-", rate="")

        def on_model(row: AuditRow, done: int, total: int) -> None:
            counts[row.status] += 1
            summary = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
            progress.update(models_task, completed=done, total=total, rate=summary)
            if row.status in ("unsupported", "failed"):
                errors.print(Text(f"{row.status}: {row.model}: {row.reason}"), soft_wrap=True, highlight=False)

        def on_batch_factory(model_name: str) -> Callable[[ScanResult], bool]:
            task = progress.add_task(model_name, total=num_samples, kappa="-", rate="")
            return _progress_callback(progress, task, None)

        with ResultsStore(store) as results, progress:
            rows = audit_org(
                name,
                results,
                options,
                pattern=pattern,
                limit=limit,
                include_transformers=include_transformers,
                offline=offline,
                force=force,
                num_samples=num_samples,
                device=resolve_device(device),
                amp=amp,
                trace_only=trace_only,
                on_model=on_model,
                on_batch_factory=on_batch_factory,
            )
        if not rows:
            raise FlatscanError(f"no image-classification models of {name} match; check the name and --filter")
        console.print(
            f"{name}: {len(rows)} models: "
            + ", ".join(f"{n} {status}" for status, n in counts.items() if n)
            + f"; results in {store}. Rank them with: flatscan leaderboard {store}"
        )

    _run(debug, action, name)
