"""flatscan: exact Hessian trace and relative flatness of the feature layer of pretrained CNN classifiers.

The names below load on first use (``flatscan.scan`` imports torch then), so that ``import flatscan`` and the
command line's ``--help`` stay fast."""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flatscan.contract import NormalisedHead, Tap
    from flatscan.errors import FlatscanError, NonFiniteValue, ScanError, ScanInterrupted, UnsupportedModel
    from flatscan.flatness import Activation
    from flatscan.inference import inference_form
    from flatscan.io.data import DataOptions, open_eval_data
    from flatscan.io.models import load_model
    from flatscan.registry import Adapter, describe, list_adapters, register
    from flatscan.scanner import ScanResult, scan
    from flatscan.verify import VerifyResult, verify

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "Activation": "flatscan.flatness",
    "Adapter": "flatscan.registry",
    "DataOptions": "flatscan.io.data",
    "FlatscanError": "flatscan.errors",
    "NonFiniteValue": "flatscan.errors",
    "NormalisedHead": "flatscan.contract",
    "ScanError": "flatscan.errors",
    "ScanInterrupted": "flatscan.errors",
    "ScanResult": "flatscan.scanner",
    "Tap": "flatscan.contract",
    "UnsupportedModel": "flatscan.errors",
    "VerifyResult": "flatscan.verify",
    "describe": "flatscan.registry",
    "inference_form": "flatscan.inference",
    "list_adapters": "flatscan.registry",
    "load_model": "flatscan.io.models",
    "open_eval_data": "flatscan.io.data",
    "register": "flatscan.registry",
    "scan": "flatscan.scanner",
    "verify": "flatscan.verify",
}

__all__ = [
    "Activation",
    "Adapter",
    "DataOptions",
    "FlatscanError",
    "NonFiniteValue",
    "NormalisedHead",
    "ScanError",
    "ScanInterrupted",
    "ScanResult",
    "Tap",
    "UnsupportedModel",
    "VerifyResult",
    "__version__",
    "describe",
    "inference_form",
    "list_adapters",
    "load_model",
    "open_eval_data",
    "register",
    "scan",
    "verify",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flatscan' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``flatscan.verify`` is the function, as ``from flatscan.verify import verify`` made it when this package imported
    it eagerly: importing the submodule ``flatscan.verify`` binds the module here, which must not replace it."""

    @property
    def verify(self) -> Any:
        return __getattr__("verify")

    @verify.setter
    def verify(self, value: Any) -> None:
        if not isinstance(value, types.ModuleType):
            globals()["verify"] = value


sys.modules[__name__].__class__ = _Package
