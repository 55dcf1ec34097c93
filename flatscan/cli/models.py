"""One model's commands: ``flatscan describe``, ``flatscan model`` (scan it) and ``flatscan verify`` (certify it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from flatscan.cli.app import app, console, errors, run_action
from flatscan.cli.options import (
    AmpOpt,
    Arch,
    Checkpoint,
    Debug,
    DeviceOpt,
    KappaRtolOpt,
    ModelName,
    NumSamplesOpt,
    Offline,
    RandomInit,
    TraceOnlyOpt,
    UntilSeOpt,
    with_data_options,
)
from flatscan.cli.render import check_results_file, emit, progress_callback, scan_progress

if TYPE_CHECKING:
    from flatscan.io.data import DataOptions
    from flatscan.io.models import LoadedModel
    from flatscan.verify import VerifyResult


def load(name: str | None, checkpoint: Path | None, arch: str | None, offline: bool, random_init: bool) -> LoadedModel:
    from flatscan.io.models import load_model

    return load_model(name, checkpoint=checkpoint, arch=arch, offline=offline or None, pretrained=not random_init)


def subject(name: str | None, checkpoint: Path | None) -> str | None:
    """What an error line names: the model, else its checkpoint."""
    return name or (str(checkpoint) if checkpoint else None)


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
        from flatscan.registry import describe

        loaded = load(name, checkpoint, arch, offline, random_init)
        head = {"model": loaded.name, **describe(loaded.model).to_dict()}
        if as_json:
            typer.echo(json.dumps(head))
            return
        table = Table(title=f"{loaded.name}: normalised head", show_header=False)
        for key, value in head.items():
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
        console.print(table)

    run_action(debug, action, subject(name, checkpoint))


@app.command()
@with_data_options(seed_before="until_se")
def model(
    name: ModelName = None,
    checkpoint: Checkpoint = None,
    arch: Arch = None,
    offline: Offline = False,
    random_init: RandomInit = False,
    data: DataOptions = None,  # type: ignore[assignment]  # the data options, see with_data_options
    num_samples: NumSamplesOpt = None,
    device: DeviceOpt = "auto",
    amp: AmpOpt = False,
    channels_last: Annotated[bool, typer.Option("--channels-last")] = False,
    until_se: UntilSeOpt = None,
    trace_only: TraceOnlyOpt = False,
    kappa_rtol: KappaRtolOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result row as JSON")] = False,
    results_file: Annotated[Path | None, typer.Option(help="write the result to a .json or append to a .csv")] = None,
    debug: Debug = False,
) -> None:
    """Scan one model: exact Tr(H) and relative flatness of its feature layer on evaluation data."""
    import torch

    from flatscan.audit.options import AuditOptions
    from flatscan.audit.run import measure, prepare
    from flatscan.errors import ScanInterrupted
    from flatscan.scanner import resolve_device

    torch.manual_seed(data.seed)

    def action() -> None:
        # Checked before the model and data load: a wrong device or results file must not cost a download.
        scan_device = resolve_device(device)
        if results_file is not None:
            check_results_file(results_file)
        run = prepare(
            load(name, checkpoint, arch, offline, random_init),
            AuditOptions(data, num_samples=num_samples, channels_last=channels_last),
        )
        for note in run.data.notes:
            errors.print(Text.assemble(("note:", "bold yellow"), f" {note}"), soft_wrap=True, highlight=False)
        known = [n for n in (num_samples, run.data.num_samples) if n is not None]
        progress = scan_progress(errors)
        task = progress.add_task(
            f"{run.loaded.name} [{run.head.feature_layer}]", total=min(known) if known else None, kappa="-", rate=""
        )
        options = AuditOptions(
            data, num_samples=num_samples, device=scan_device, amp=amp, trace_only=trace_only,
            kappa_rtol=kappa_rtol, channels_last=channels_last,
        )  # fmt: skip
        partial: list[dict[str, Any]] = []
        try:
            with progress:
                record = measure(
                    run,
                    options,
                    on_batch=progress_callback(progress, task, until_se),
                    on_retry=lambda size: errors.print(f"out of memory; retrying with batch size {size}"),
                    on_partial=partial.append,
                )
        except ScanInterrupted:
            for row in partial:  # marked: a file of results must not mistake it for a finished run
                emit({**row, "partial": True}, "partial result (interrupted)", as_json, results_file)
            raise
        emit(record, f"flatscan: {run.data.name}", as_json, results_file)

    run_action(debug, action, subject(name, checkpoint))


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
        from flatscan.io.data import DataOptions, open_eval_data
        from flatscan.verify import verify

        loaded = load(name, checkpoint, arch, offline, random_init)
        options = DataOptions(dataset=dataset, img_size=img_size, batch_size=batch_size, workers=0)
        batch = next(iter(open_eval_data(loaded.model, options).batches))
        result = verify(loaded.model, batch, pairs=pairs, tolerance=tolerance)
        if as_json:
            typer.echo(json.dumps({"model": loaded.name, **result.to_dict()}))
        else:
            print_certificate(loaded.name, result, batch_size, tolerance)
        if not result.passed:
            raise typer.Exit(1)

    run_action(debug, action, subject(name, checkpoint))


def print_certificate(name: str, result: VerifyResult, batch_size: int, tolerance: float) -> None:
    table = Table(title=f"{name}: {result.feature_layer}, Tr(H_cc') on {batch_size} images")
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
