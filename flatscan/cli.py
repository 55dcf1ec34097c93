"""Command line: a thin layer over the Python API."""

from __future__ import annotations

import json

import timm
import typer
from rich.console import Console
from rich.table import Table

import flatscan

app = typer.Typer(
    help="Exact Hessian trace and relative flatness of CNN classifiers' feature layers.", no_args_is_help=True
)
console = Console()
errors = Console(stderr=True)


@app.callback()
def main() -> None:
    """flatscan: audit pretrained CNN classifiers."""


@app.command()
def describe(
    name: str = typer.Argument(help="timm architecture name, e.g. resnet50 (built without weights)"),
    as_json: bool = typer.Option(False, "--json", help="print the normalised head as JSON"),
) -> None:
    """Print the normalised head of a timm architecture, or why flatscan refuses it."""
    if not timm.is_model(name):
        errors.print(f"[red]error:[/] unknown timm model {name!r}; list names with timm.list_models()")
        raise typer.Exit(2)
    model = timm.create_model(name, pretrained=False)
    try:
        head = flatscan.describe(model).to_dict()
    except flatscan.UnsupportedModel as refusal:
        errors.print(f"[red]unsupported:[/] {name}: {refusal.reason}")
        raise typer.Exit(3) from None
    if as_json:
        typer.echo(json.dumps({"model": name, **head}))
        return
    table = Table(title=f"{name}: normalised head", show_header=False)
    for key, value in head.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
