"""The adapter registry: which adapter describes which model class.

An adapter is registered under its family's name (``@register("resnet", ResNet)``); :func:`describe` fills that
name into the head the adapter returns (``NormalisedHead.family``), so adapters do not repeat it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from torch import nn

from flatscan.contract import NormalisedHead
from flatscan.errors import UnsupportedModel

M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class Adapter:
    """Describes models of ``model_types`` (one family) as a :class:`NormalisedHead`."""

    family: str
    model_types: tuple[type[nn.Module], ...]
    describe: Callable[[nn.Module], NormalisedHead]


_ADAPTERS: list[Adapter] = []
_builtins_loaded = False


def register(
    family: str, *model_types: type[M]
) -> Callable[[Callable[[M], NormalisedHead]], Callable[[M], NormalisedHead]]:
    """Register ``describe(model) -> NormalisedHead`` for instances of ``model_types``.

    Later registrations take precedence, so a user's adapter can override a built-in one. The heads it returns
    are given the family ``family`` by :func:`describe`.
    """

    def decorator(describe_fn: Callable[[M], NormalisedHead]) -> Callable[[M], NormalisedHead]:
        _ADAPTERS.append(Adapter(family, tuple(model_types), describe_fn))  # type: ignore[arg-type]
        return describe_fn

    return decorator


def list_adapters() -> list[Adapter]:
    """All registered adapters, built-in ones included, in precedence order."""
    global _builtins_loaded
    if not _builtins_loaded:
        importlib.import_module("flatscan.adapters")  # registers the built-in families
        _builtins_loaded = True
    return _ADAPTERS[::-1]


def describe(model: nn.Module) -> NormalisedHead:
    """The normalised head of ``model`` (``family``: the adapter's), or :class:`UnsupportedModel` with the reason."""
    registered = list_adapters()
    for adapter in registered:
        if isinstance(model, adapter.model_types):
            return replace(adapter.describe(model), family=adapter.family)
    families = ", ".join(sorted({a.family for a in registered}))
    raise UnsupportedModel(
        f"no adapter for {type(model).__name__} (supported families: {families}); register one with flatscan.register"
    )
