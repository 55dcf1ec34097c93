"""Command line: the ``flatscan`` app (:mod:`.app`), its shared options (:mod:`.options`) and output (:mod:`.render`),
and one module per command group: one model (:mod:`.models`), an organisation (:mod:`.audit`), research
(:mod:`.research`). Importing it loads no torch, timm or pandas: each command imports what it uses when it runs."""

from flatscan.cli import audit, models, research
from flatscan.cli.app import app, console, errors

__all__ = ["app", "audit", "console", "errors", "models", "research"]
