"""What the commands print: result tables, progress bars, rank correlations, and the --results-file writer."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from flatscan.cli.app import console, errors
from flatscan.errors import FlatscanError
from flatscan.io.messages import printable

if TYPE_CHECKING:
    from flatscan.audit.leaderboard import Leaderboard
    from flatscan.audit.org import AuditRow
    from flatscan.research.zoo import ZooModel
    from flatscan.scanner import ScanResult


def format_value(value: float | None, se: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if se is None or math.isnan(se) else f"{value:.4g} ± {se:.2g}"


def bound_text(bound: float | None) -> str:
    """The certified bound of a kappa over the likeliest classes (``kappa_rtol``), as printed beside it."""
    return "" if bound is None else f" (classes left out: exact value within +{bound:.2g})"


def print_record(record: dict[str, Any], title: str, out: Console) -> None:
    table = Table(title=title, show_header=False)
    rows = {
        "model": record["model"],
        "feature layer": record["feature_layer"],
        "activation": record["activation"],
        "Tr(H)": format_value(record["trace"], record["trace_se"]),
        "kappa": format_value(record["relative_flatness"], record["relative_flatness_se"])
        + bound_text(record.get("relative_flatness_bound")),
        "classifier kappa": format_value(record["classifier_flatness"]),
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


def json_text(record: dict[str, Any], indent: int | None = None) -> str:
    """``record`` as strict JSON: a float that is not finite (the SE of one sample) becomes null, never ``NaN``."""
    safe = {key: None if isinstance(v, float) and not math.isfinite(v) else v for key, v in record.items()}
    return json.dumps(safe, indent=indent, allow_nan=False)


def check_results_file(path: Path) -> None:
    """Refuse a --results-file that cannot be written before anything is measured, so no result is lost."""
    if path.suffix not in (".csv", ".json"):
        raise FlatscanError(f"--results-file {path}: use a .json or .csv file name")
    folder = path.parent
    if not folder.is_dir():
        raise FlatscanError(f"--results-file {path}: the folder {folder} does not exist; create it first")
    if path.is_dir() or not os.access(path if path.exists() else folder, os.W_OK):
        raise FlatscanError(f"--results-file {path}: not writable; choose a file in a folder you can write to")


def write_results(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` to a .csv, or write it to a .json file.

    A .csv whose columns differ (written by another flatscan version, or with other options) is rewritten with the
    union of the columns, each value under its own name: an appended row would shift into the wrong columns."""
    if path.suffix == ".csv":
        import pandas as pd

        frame = pd.DataFrame([record])
        if not path.exists() or path.stat().st_size == 0:
            frame.to_csv(path, index=False)
        elif list(pd.read_csv(path, nrows=0).columns) == list(frame.columns):
            frame.to_csv(path, mode="a", header=False, index=False)
        else:
            pd.concat([pd.read_csv(path), frame], ignore_index=True).to_csv(path, index=False)
    else:  # .json: check_results_file refused any other suffix before the scan
        path.write_text(json_text(record, indent=2) + "\n")


def emit(record: dict[str, Any], title: str, as_json: bool, results_file: Path | None) -> None:
    """The result row as a table; with --json, stdout carries the JSON alone and the table goes to stderr."""
    print_record(record, title, errors if as_json else console)
    if as_json:
        typer.echo(json_text(record))
    if results_file is not None:
        write_results(results_file, record)


def scan_progress(out: Console) -> Progress:
    """Progress of scans: images done, images per second and the running kappa."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("kappa {task.fields[kappa]}"),
        TimeElapsedColumn(),
        console=out,
        transient=True,
        disable=not out.is_terminal,  # in a log or pipe a bar is noise, and its last frame would precede an error
    )


def progress_callback(progress: Progress, task: Any, until_se: float | None) -> Callable[[ScanResult], bool]:
    """A scan's ``on_batch``: updates ``task``; True (stop) once kappa's relative standard error is below
    ``until_se``."""

    def on_batch(running: ScanResult) -> bool:
        kappa = format_value(running.relative_flatness, running.relative_flatness_se)
        rate = running.n_samples / max(running.seconds, 1e-9)
        progress.update(task, completed=running.n_samples, kappa=kappa, rate=f"{rate:.1f} img/s")
        if until_se is None or running.relative_flatness is None or running.n_samples < 2:
            return False
        return running.relative_flatness_se / abs(running.relative_flatness) < until_se  # type: ignore[operator]

    return on_batch


def report_failure(row: AuditRow) -> None:
    """One line on stderr for a model that was refused, failed, or is left to retry."""
    if row.status in ("unsupported", "failed", "retry"):
        line = printable(f"{row.status}: {row.model}: {row.reason}")
        errors.print(Text(line), soft_wrap=True, highlight=False)


def bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=errors,
        disable=not errors.is_terminal,
    )


def training_progress(progress: Progress, task: Any) -> tuple[Callable[..., None], Callable[..., None]]:
    """on_model and on_step callbacks of train_zoo that drive ``progress``: one bar for the zoo, one per model."""
    bars: dict[str, Any] = {}

    def on_step(name: str, step: int, steps: int) -> None:
        if name not in bars:
            bars[name] = progress.add_task(f"  {name}", total=steps)
        progress.update(bars[name], completed=step)

    def on_model(model: ZooModel, done: int, total: int, reused: bool) -> None:
        if model.name in bars:
            progress.remove_task(bars.pop(model.name))
        progress.update(task, completed=done, total=total)

    return on_model, on_step


def estimate(value: float, low: float, high: float) -> str:
    """``+0.42 [+0.10, +0.70]``; NaN (fewer than 3 models, constant ranks) as ``-``."""
    if math.isnan(value):
        return "-"
    return f"{value:+.2f}" + ("" if math.isnan(low) else f" [{low:+.2f}, {high:+.2f}]")


def print_correlations(board: Leaderboard) -> None:
    table = Table(title=Text("rank correlation with reported top-1 (the zoo's test accuracy), 95% bootstrap CIs"))
    for column in ("measure", "group", "n", "Kendall tau", "Spearman rho"):
        table.add_column(column, justify="left" if column in ("measure", "group") else "right")
    for row in board.correlations.itertuples(index=False):
        tau = estimate(row.kendall_tau, row.tau_ci_low, row.tau_ci_high)
        rho = estimate(row.spearman_rho, row.rho_ci_low, row.rho_ci_high)
        table.add_row(Text(row.measure), Text(str(row.group)), str(row.n), tau, rho)
    console.print(table)
