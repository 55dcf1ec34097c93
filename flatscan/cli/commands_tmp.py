"""Command line: a thin layer over the Python API (flatscan.scan, flatscan.describe, load_model, open_eval_data)."""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Callable
from functools import partial
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
from flatscan import study, zoo
from flatscan.data import DataOptions, open_eval_data
from flatscan.errors import FlatscanError, ScanInterrupted
from flatscan.leaderboard import Leaderboard, build_leaderboard, write_reports
from flatscan.models import LoadedModel, load_model
from flatscan.org import AuditRow, audit_org
from flatscan.ray_audit import DEFAULT_MEMORY_GB, DEFAULT_RETRIES, audit_org_ray
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
    name: Annotated[
        str, typer.Argument(help="Hub organisation or user (timm), or a directory of model folders (./zoo)")
    ],
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
    ray: Annotated[
        bool, typer.Option("--ray", help="one task per model on a Ray cluster (pip install 'flatscan[ray]')")
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(help="Ray cluster to join (implies --ray): auto, HOST:6379, ray://HOST:10001 (default: local)"),
    ] = None,
    ray_gpus: Annotated[
        float | None, typer.Option(min=0, help="GPUs per model task (default: 1 if the cluster has GPUs, else 0)")
    ] = None,
    ray_memory_gb: Annotated[
        float, typer.Option(min=0, help="memory per model task, a hint to Ray's scheduler")
    ] = DEFAULT_MEMORY_GB,
    ray_retries: Annotated[int, typer.Option(min=0, help="retries of a task whose worker dies")] = DEFAULT_RETRIES,
    debug: Debug = False,
) -> None:
    """Audit every image-classification model of a Hub organisation or a local directory, one committed row each."""
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

        on_ray = ray or ray_address is not None
        audit: Callable[..., list[AuditRow]] = audit_org
        if on_ray:
            audit = partial(
                audit_org_ray, address=ray_address, num_gpus=ray_gpus, memory_gb=ray_memory_gb, max_retries=ray_retries
            )
        with ResultsStore(store) as results, progress:
            rows = audit(
                name,
                results,
                options,
                pattern=pattern,
                limit=limit,
                include_transformers=include_transformers,
                offline=offline,
                force=force,
                num_samples=num_samples,
                # On Ray, each worker resolves it: "auto" is the task's GPU when Ray gives it one.
                device=device if on_ray else resolve_device(device),
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


zoo_app = typer.Typer(
    help="Model zoos: small timm CNNs trained with varied hyperparameters, saved as a local organisation.",
    no_args_is_help=True,
)
app.add_typer(zoo_app, name="zoo")
PresetOpt = Annotated[str, typer.Option(help="demo (10 models, a minute) or study (64 models)")]
ZooSizeOpt = Annotated[int | None, typer.Option("--size", min=1, help="number of models (default: the preset's)")]
EpochsOpt = Annotated[int | None, typer.Option(min=1, help="training epochs of every model (default: the grid's)")]


def _training_progress(progress: Progress, task: int) -> tuple[Callable[..., None], Callable[..., None]]:
    """on_model and on_step callbacks of train_zoo that drive ``progress``: one bar for the zoo, one per model."""
    bars: dict[str, int] = {}

    def on_step(name: str, step: int, steps: int) -> None:
        if name not in bars:
            bars[name] = progress.add_task(f"  {name}", total=steps)
        progress.update(bars[name], completed=step)

    def on_model(model: zoo.ZooModel, done: int, total: int, reused: bool) -> None:
        if model.name in bars:
            progress.remove_task(bars.pop(model.name))
        progress.update(task, completed=done, total=total)

    return on_model, on_step


def _bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=errors
    )


@zoo_app.command("train")
def zoo_train(
    out: Annotated[Path, typer.Argument(help="zoo directory: one timm/Hub-format folder per model, manifest.json/csv")],
    preset: PresetOpt = "study",
    spec: Annotated[
        Path | None, typer.Option(help="JSON file of zoo spec fields (size, seed, grid, img_size, ...) over the preset")
    ] = None,
    size: ZooSizeOpt = None,
    seed: Annotated[int | None, typer.Option(help="seed of the sample and the models (default: the preset's)")] = None,
    epochs: EpochsOpt = None,
    img_size: Annotated[int | None, typer.Option(min=8, help="input size in pixels (default 16)")] = None,
    dataset: DatasetOpt = None,
    train_split: Annotated[str | None, typer.Option(help="split to train on (default train)")] = None,
    test_split: Annotated[str | None, typer.Option(help="split to test on (default test)")] = None,
    num_classes: Annotated[int | None, typer.Option(min=2, help="classes of the dataset (default 10)")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads while training (default 1)")] = None,
    debug: Debug = False,
) -> None:
    """Train a zoo (seeded: the same spec gives the same weights); audit it with `flatscan org DIR`."""

    def action() -> None:
        zoo_spec = zoo.load_spec(
            preset, spec, size=size, seed=seed, epochs=epochs, img_size=img_size, dataset=dataset,
            train_split=train_split, test_split=test_split, num_classes=num_classes, threads=threads,
        )  # fmt: skip
        progress = _bar()
        with progress:
            on_model, on_step = _training_progress(progress, progress.add_task("training the zoo", total=None))
            zoo.train_zoo(zoo_spec, out, on_model=on_model, on_step=on_step)
        root = out.expanduser().resolve()
        table = Table(title=f"{root}: {zoo.MANIFEST} / {zoo.MANIFEST_CSV}")
        for column in ("model", "architecture", "params", "train acc", "test acc", "seconds"):
            table.add_column(column, justify="left" if column in ("model", "architecture") else "right")
        for model in zoo.read_manifest(root):
            table.add_row(
                model.name, model.architecture, f"{model.params:,}", f"{100 * model.train_accuracy:.1f}",
                f"{100 * model.test_accuracy:.1f}", f"{model.seconds:.1f}",
            )  # fmt: skip
        console.print(table)
        console.print(f"audit it with: flatscan org {root} --dataset {zoo_spec.dataset} --split {zoo_spec.test_split}")

    _run(debug, action)


def _estimate(value: float, low: float, high: float) -> str:
    """``+0.42 [+0.10, +0.70]``; NaN (fewer than 3 models, constant ranks) as ``-``."""
    if math.isnan(value):
        return "-"
    return f"{value:+.2f}" + ("" if math.isnan(low) else f" [{low:+.2f}, {high:+.2f}]")


@zoo_app.command("study")
def zoo_study(
    zoo_dir: Annotated[Path, typer.Argument(help="zoo directory trained by `flatscan zoo train`")],
    out: Annotated[Path, typer.Option(help="directory for study.md, study.csv, study_spec.json and plots")] = Path(
        "reports"
    ),
    probes: Annotated[int, typer.Option(min=2, help="Rademacher probes of the Hutchinson trace")] = 32,
    sharpness_criterion: Annotated[
        str, typer.Option(help="what the perturbation may raise: error (Jiang et al.) or cross_entropy")
    ] = "error",
    sharpness_threshold: Annotated[float, typer.Option(help="largest mean increase of the criterion")] = 0.1,
    sharpness_samples: Annotated[int, typer.Option(min=1, help="Gaussian draws per sigma")] = 8,
    weightwatcher: Annotated[
        bool, typer.Option("--weightwatcher/--no-weightwatcher", help="WeightWatcher's alpha_weighted (extra: study)")
    ] = True,
    resamples: Annotated[int, typer.Option(min=10, help="bootstrap resamples of the models")] = 1000,
    seed: Annotated[int, typer.Option(help="seed of the probes, perturbations and bootstrap")] = 0,
    device: DeviceOpt = "cpu",
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads while measuring (small models: 1)")] = 1,
    debug: Debug = False,
) -> None:
    """Does relative flatness predict generalisation? Measure every zoo model, rank-correlate with its gap."""

    def action() -> None:
        options = study.StudyOptions(
            probes=probes,
            sharpness_criterion=sharpness_criterion,
            sharpness_threshold=sharpness_threshold,
            sharpness_samples=sharpness_samples,
            weightwatcher=weightwatcher,
            seed=seed,
            device=device,
            threads=threads,
        )
        arguments = [str(zoo_dir), "--out", str(out), "--probes", str(probes)]
        arguments += ["--sharpness-criterion", sharpness_criterion, "--sharpness-threshold", str(sharpness_threshold)]
        arguments += ["--sharpness-samples", str(sharpness_samples), "--resamples", str(resamples), "--seed", str(seed)]
        arguments += ["--device", device, "--threads", str(threads)] + ([] if weightwatcher else ["--no-weightwatcher"])
        progress = _bar()
        with progress:
            task = progress.add_task("measuring the zoo", total=None)
            result = study.run_study(
                zoo_dir,
                options,
                resamples=resamples,
                on_model=lambda name, done, total, reused: progress.update(task, completed=done, total=total),
            )
        table = Table(title=Text("Kendall tau with the accuracy gap (train - test), 95% bootstrap CIs"))
        for column in ("measure", "n", "tau", "psi (granulated)"):
            table.add_column(column, justify="left" if column == "measure" else "right")
        rows = result.correlations[result.correlations["target"] == "gap_accuracy"]
        for row in rows.itertuples(index=False):
            tau = _estimate(row.tau, row.tau_ci_low, row.tau_ci_high)
            table.add_row(row.measure, str(row.n), tau, _estimate(row.psi, row.psi_ci_low, row.psi_ci_high))
        console.print(table)
        for path in study.write_study(result, out, "flatscan zoo study " + shlex.join(arguments)):
            console.print(f"wrote {path}")

    _run(debug, action, str(zoo_dir))


def _print_correlations(board: Leaderboard) -> None:
    table = Table(title=Text("rank correlation with reported top-1 (the zoo's test accuracy), 95% bootstrap CIs"))
    for column in ("measure", "group", "n", "Kendall tau", "Spearman rho"):
        table.add_column(column, justify="left" if column in ("measure", "group") else "right")
    for row in board.correlations.itertuples(index=False):
        tau = _estimate(row.kendall_tau, row.tau_ci_low, row.tau_ci_high)
        rho = _estimate(row.spearman_rho, row.rho_ci_low, row.rho_ci_high)
        table.add_row(Text(row.measure), Text(str(row.group)), str(row.n), tau, rho)
    console.print(table)


@app.command()
def demo(
    zoo_dir: Annotated[
        Path | None, typer.Option(help="zoo directory (default: a cache folder per spec, ~/.cache/flatscan/zoo)")
    ] = None,
    size: ZooSizeOpt = None,
    epochs: EpochsOpt = None,
    store: Annotated[Path | None, typer.Option(help="results store (default: in the zoo directory)")] = None,
    out: Annotated[Path | None, typer.Option(help="directory for the reports (default: reports/ in the zoo)")] = None,
    debug: Debug = False,
) -> None:
    """Train (or reuse) ~10 small CNNs on digits, audit them as `flatscan org` does, rank them: offline, CPU."""

    def action() -> None:
        spec = zoo.load_spec("demo", size=size, epochs=epochs)
        progress = _bar()
        with progress:
            on_model, on_step = _training_progress(progress, progress.add_task("training the zoo", total=None))
            audit_task = progress.add_task("auditing", total=None, visible=False)

            def on_audit(row: AuditRow, done: int, total: int) -> None:
                progress.update(audit_task, completed=done, total=total, visible=True)
                if row.status in ("unsupported", "failed"):
                    errors.print(Text(f"{row.status}: {row.model}: {row.reason}"), soft_wrap=True, highlight=False)

            result = zoo.run_demo(spec, zoo_dir, store, on_model=on_model, on_step=on_step, on_audit=on_audit)
        console.print(result.board.rich_table())
        _print_correlations(result.board)
        for path in write_reports(result.board, out or result.zoo / "reports"):
            console.print(f"wrote {path}")
        console.print(f"zoo: {result.zoo} ({len(result.models)} models; flatscan org {result.zoo} audits it again)")

    _run(debug, action)
