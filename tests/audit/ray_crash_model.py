"""A timm architecture whose construction kills its process outright, as a segfault or the kernel's OOM killer would.

tests/audit/test_ray_audit.py imports this module in its Ray workers (a ``worker_process_setup_hook``), so that loading
the Hub repo ``crash-org/crash`` (config.json: ``"architecture": "test_crashing_net"``) kills the worker running that
task: a real worker death on the real loading path, with nothing in flatscan mocked or hooked.
"""

from __future__ import annotations

import os
from typing import Any

from timm.models import register_model

ARCHITECTURE = "test_crashing_net"
attempts_file: str | None = None  # each construction appends its process id here (set by the setup hook)


@register_model
def test_crashing_net(**kwargs: Any) -> None:
    if attempts_file is not None:
        with open(attempts_file, "a") as attempts:
            attempts.write(f"{os.getpid()}\n")
    os._exit(1)
