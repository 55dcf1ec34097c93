"""Command line: the ``flatscan`` app (:mod:`.app`), its shared options (:mod:`.options`) and output (:mod:`.render`),
and one module per command group: one model (:mod:`.models`), an organisation (:mod:`.audit`), research
(:mod:`.research`). Importing it loads no torch, timm or pandas: each command imports what it uses when it runs."""

import importlib

from flatscan.cli.app import app, console, errors

# The command modules register their commands on import, in the order `flatscan --help` lists them.
for _group in ("models", "audit", "research"):
    importlib.import_module(f"flatscan.cli.{_group}")

__all__ = ["app", "console", "errors"]
