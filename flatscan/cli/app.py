"""The ``flatscan`` Typer app, its consoles, and the one-line error handling every command shares."""

from __future__ import annotations

from collections.abc import Callable

import typer
from rich.console import Console
from rich.text import Text

from flatscan.errors import FlatscanError, UnsupportedModel
from flatscan.io.messages import printable

app = typer.Typer(
    help="Exact Hessian trace and relative flatness of CNN classifiers' feature layers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)


@app.callback()
def main() -> None:
    """flatscan: audit pretrained CNN classifiers."""


def run_action(debug: bool, action: Callable[[], None], subject: str | None = None) -> None:
    """Run ``action``; a FlatscanError becomes one line on stderr (``unsupported: NAME: reason``) and its exit code."""
    try:
        action()
    except FlatscanError as error:
        if debug:
            raise
        kind = "unsupported" if isinstance(error, UnsupportedModel) else "error"
        # Text, not markup: messages quote user input and module names that may contain brackets.
        where = f" {printable(subject)}: " if subject else " "
        message = Text.assemble((f"{kind}:", "bold red"), where, printable(str(error)))
        errors.print(message, soft_wrap=True, highlight=False)
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:  # before the scan holds a partial result (loading, downloading)
        if debug:
            raise
        errors.print(Text.assemble(("interrupted:", "bold red"), " nothing was measured"), highlight=False)
        raise typer.Exit(130) from None
