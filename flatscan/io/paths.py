"""Checks of the places flatscan writes to, made before any work that would be lost."""

from __future__ import annotations

import os
from pathlib import Path

from flatscan.errors import FlatscanError


def writable_folder(folder: Path, what: str) -> None:
    """Create ``folder`` if needed and refuse, in one line naming ``what`` (e.g. ``--out reports``), one that is a
    file, cannot be created or cannot be written."""
    if folder.exists() and not folder.is_dir():
        raise FlatscanError(f"{what} is a file: give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FlatscanError(f"{what}: cannot create it ({error.strerror}); choose a folder you can write to") from None
    if not os.access(folder, os.W_OK):
        raise FlatscanError(f"{what}: not writable; choose a folder you can write to")
