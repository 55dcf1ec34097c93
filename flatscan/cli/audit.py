"""An organisation's commands: ``flatscan org`` (audit every model, on one machine or on Ray) and
``flatscan leaderboard`` (rank the audited models)."""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flatscan.audit.options import DEFAULT_MEMORY_GB, DEFAULT_RETRIES, AuditOptions
from flatscan.cli.app import app, console, errors, run_action
from flatscan.cli.options import (
    AmpOpt,
    Debug,
    DeviceOpt,
    NumSamplesOpt,
    Offline,
    TraceOnlyOpt,
    with_data_options,
)
from flatscan.cli.render import progress_callback, report_failure, scan_progress
from flatscan.errors import FlatscanError

if TYPE_CHECKING:
    from rich.progress import Progress

    from flatscan.audit.org import AuditRow
    from flatscan.io.data import DataOptions
    from flatscan.scanner import ScanResult


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
        from flatscan.audit.leaderboard import build_leaderboard, check_report_target, write_reports
        from flatscan.audit.reported import ReportedAccuracy
        from flatscan.audit.store import ResultsStore

        check_report_target(out, stem)  # before reading the model cards: a bad --out must not cost their downloads
        if not store.exists():
            raise FlatscanError(f"no results store at {store}; run `flatscan org ORG` first or pass the store's path")
        with ResultsStore(store) as results:
            frame = results.frame()
        if dataset is not None:
            # Refused and failed rows stay: they say which models could not be ranked, and why.
            frame = frame[(frame["dataset"] == dataset) | (frame["status"] != "ok")]
        board = build_leaderboard(frame, ReportedAccuracy(user_csv=reported, offline=offline), rank_by=rank_by)
        options = {"--rank-by": rank_by, "--dataset": dataset, "--reported": reported, "--out": out, "--stem": stem}
        words = ["flatscan", "leaderboard", str(store), *(["--offline"] if offline else [])]
        words += [str(word) for option, value in options.items() if value is not None for word in (option, value)]
        board = dataclasses.replace(board, command=shlex.join(words))
        console.print(board.rich_table())
        for path in write_reports(board, out, stem):
            console.print(f"wrote {path}")

    run_action(debug, action)


@app.command()
@with_data_options(seed_before="trace_only")
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
    data: DataOptions = None,  # type: ignore[assignment]  # the data options, see with_data_options
    num_samples: NumSamplesOpt = None,
    device: DeviceOpt = "auto",
    amp: AmpOpt = False,
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
    import torch

    torch.manual_seed(data.seed)
    on_ray = ray or ray_address is not None
    ray_settings = dict(address=ray_address, num_gpus=ray_gpus, memory_gb=ray_memory_gb, max_retries=ray_retries)
    listing = {"pattern": pattern, "limit": limit, "include_transformers": include_transformers}

    def action() -> None:
        options = AuditOptions(
            data, num_samples=num_samples, device=device, amp=amp, trace_only=trace_only, offline=offline, force=force
        )
        counts = {"ok": 0, "unsupported": 0, "failed": 0, "skipped": 0, "retry": 0}
        rows = _audit(name, store, options, counts, listing, ray_settings if on_ray else None)
        if not rows:
            raise FlatscanError(f"no image-classification models of {name} match; check the name and --filter")
        console.print(
            f"{name}: {len(rows)} models: "
            + ", ".join(f"{n} {status}" for status, n in counts.items() if n)
            + f"; results in {store}. Rank them with: flatscan leaderboard {store}"
        )
        if counts["retry"]:
            errors.print(f"{counts['retry']} model(s) hit a network or machine fault, not stored: rerun to retry them")
        if counts["failed"] + counts["retry"] == len(rows):
            raise FlatscanError(f"every model of {name} failed (reasons above): nothing was measured")

    run_action(debug, action, name)


def _audit(
    name: str,
    store: Path,
    options: AuditOptions,
    counts: dict[str, int],
    listing: dict[str, Any],
    ray_settings: dict[str, Any] | None,
) -> list[AuditRow]:
    """Audit ``name`` into ``store`` (on Ray with ``ray_settings``), counting the rows by status, with progress."""
    from flatscan.audit.org import audit_org
    from flatscan.audit.store import ResultsStore
    from flatscan.scanner import resolve_device

    audit: Callable[..., list[AuditRow]] = audit_org
    if ray_settings is not None:
        from flatscan.audit.ray_audit import audit_org_ray

        audit = audit_org_ray
    progress = scan_progress(errors)
    models_task = progress.add_task(f"{name}: models", total=None, kappa="-", rate="")

    def on_model(row: AuditRow, done: int, total: int) -> None:
        counts[row.status] += 1
        summary = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
        progress.update(models_task, completed=done, total=total, rate=summary)
        report_failure(row)

    with ResultsStore(store) as results, progress:
        if ray_settings is None:  # on Ray, each worker resolves it: "auto" is the task's GPU when Ray gives it one
            options = dataclasses.replace(options, device=resolve_device(options.device))
        return audit(
            name,
            results,
            options,
            **listing,
            **(ray_settings or {}),
            on_model=on_model,
            on_batch_factory=_batch_progress(progress, options.num_samples),
        )


def _batch_progress(progress: Progress, num_samples: int | None) -> Callable[[str], Callable[[ScanResult], bool]]:
    """A progress bar per scanned model."""

    def on_batch_factory(model_name: str) -> Callable[[ScanResult], bool]:
        task = progress.add_task(model_name, total=num_samples, kappa="-", rate="")
        return progress_callback(progress, task, None)

    return on_batch_factory
