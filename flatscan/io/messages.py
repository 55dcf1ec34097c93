"""One-line error messages: the first line of an exception, a few items of a long list."""

from __future__ import annotations

from collections.abc import Sequence


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, or its class name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def few(items: Sequence[str], n: int) -> str:
    """The first ``n`` of ``items``, comma-separated, and how many more there are."""
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")
