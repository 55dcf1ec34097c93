"""One-line error messages: the first line of an exception, a few items of a long list."""

from __future__ import annotations

import re
from collections.abc import Sequence


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, or its class name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def few(items: Sequence[str], n: int) -> str:
    """The first ``n`` of ``items``, comma-separated, and how many more there are."""
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with control characters (ANSI escapes in a model name, newlines) shown as escapes, not executed."""
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode(), text)
