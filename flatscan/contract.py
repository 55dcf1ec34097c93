"""The adapter contract: a model's head normalised to feature layer -> affine -> activation -> GAP -> head.

Adapters describe a model with a :class:`NormalisedHead`; the scanner consumes nothing else. The
helpers here read generic torch/timm layers (BatchNorm, activations, pools) and refuse, with a
reason, whatever is outside the class.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from timm.layers import activations as timm_act
from torch import Tensor, nn

from flatscan.errors import UnsupportedModel
from flatscan.flatness import Activation

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # timm's activations_me calls torch.jit.script on import
    from timm.layers import activations_me as timm_act_me


@dataclass(frozen=True)
class Tap:
    """Where the scanner reads a tensor: the input or the output of a named module."""

    module: str
    point: Literal["input", "output"] = "output"
    channels_last: bool = False  # the tensor is (N, ..., C), as channels-last models (MambaOut) keep their maps


@dataclass(frozen=True, eq=False)
class NormalisedHead:
    """Everything between a model's feature layer and its logits, normalised.

    The tensor read at ``pre_activation`` has the pooled vector's channel layout, and its channels
    ``channels`` are ``v = channel_scale * feature_layer(A) + shift + residual`` (all of them, unless the
    feature layer feeds only some pooled channels, as in DenseNet). ``h = mean over positions of
    activation(v)`` is ``h[:, channels]`` of the pooled vector read at ``pooled``; logits are
    ``classifier(h)`` (linear head, ``head_fn`` None) or ``head_fn(h)``.
    ``classifier`` is the final Linear layer, whose input the classifier-layer flatness uses.
    """

    family: str
    feature_layer: str
    pre_activation: Tap
    pooled: Tap
    channel_scale: Tensor
    activation: Activation
    classifier: str
    head_fn: Callable[[Tensor], Tensor] | None = None
    channels: slice = field(default_factory=lambda: slice(None))

    @property
    def head_type(self) -> str:
        return "linear" if self.head_fn is None else "general"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary (the folded scale as statistics, not values)."""
        scale = self.channel_scale.detach().double()
        return {
            "family": self.family,
            "feature_layer": self.feature_layer,
            "pre_activation": f"{self.pre_activation.point} of {self.pre_activation.module}",
            "pooled": f"{self.pooled.point} of {self.pooled.module}",
            "activation": self.activation.label,
            "head_type": self.head_type,
            "classifier": self.classifier,
            "channels": "all" if self.channels == slice(None) else f"{self.channels.start}:{self.channels.stop}",
            "channel_scale_min": scale.min().item(),
            "channel_scale_max": scale.max().item(),
        }


def batchnorm_scale(norm: nn.Module, where: str) -> Tensor:
    """The per-channel scale s of an eval-mode BatchNorm, ``y = s * x + shift``."""
    if not isinstance(norm, nn.BatchNorm2d):
        raise UnsupportedModel(
            f"{where} is {type(norm).__name__}, not BatchNorm: it normalises with statistics of each "
            "sample, so it is not a fixed per-channel affine map after the feature layer"
        )
    if norm.running_mean is None or norm.running_var is None:
        raise UnsupportedModel(f"{where} keeps no running statistics, so it normalises with batch statistics")
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    return scale.detach()


_ACTIVATIONS: dict[type[nn.Module], str] = {
    nn.Identity: "identity",
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.SiLU: "silu",
    timm_act.Swish: "silu",
    timm_act_me.SwishMe: "silu",
    nn.Hardswish: "hardswish",
    timm_act.HardSwish: "hardswish",
    timm_act_me.HardSwishMe: "hardswish",
    nn.Mish: "mish",
    timm_act.Mish: "mish",
    timm_act_me.MishMe: "mish",
    timm_act.GELU: "gelu",
    timm_act.GELUTanh: "gelu_tanh",
}


def activation_of(module: nn.Module, where: str) -> Activation:
    """The closed-form :class:`Activation` computing the same function as ``module``."""
    if type(module) is nn.GELU:
        return Activation("gelu_tanh" if module.approximate == "tanh" else "gelu")
    if type(module) is nn.LeakyReLU:
        return Activation("leaky_relu", negative_slope=module.negative_slope)
    name = _ACTIVATIONS.get(type(module))
    if name is None:
        raise UnsupportedModel(
            f"{where} is {type(module).__name__}, an activation without closed-form derivatives in flatscan "
            f"(supported: {', '.join(sorted(set(_ACTIVATIONS.values()) | {'gelu', 'leaky_relu'}))})"
        )
    return Activation(name)


def require_average_pool(pool: nn.Module, where: str) -> None:
    """Refuse anything but a global average pool (timm's SelectAdaptivePool2d 'avg' / 'fast')."""
    pool_type = getattr(pool, "pool_type", None)
    if pool_type not in ("avg", "fast", "fastavg"):
        raise UnsupportedModel(
            f"{where} pools with {pool_type or type(pool).__name__!r}, not a global average: the measure "
            "is defined for a global average pool"
        )


def require_linear(module: nn.Module, where: str) -> nn.Module:
    """A Linear classifier, or a 1x1 ungrouped Conv2d on the pooled (N, C, 1, 1) map (timm's use_conv heads)."""
    if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1:
        return module
    if not isinstance(module, nn.Linear):
        raise UnsupportedModel(
            f"{where} is {type(module).__name__}, not a Linear classifier (a model built with "
            "num_classes=0 has no classifier to measure against)"
        )
    return module


def qualified_name(model: nn.Module, module: nn.Module) -> str:
    """The name of ``module`` inside ``model`` (as in ``model.named_modules()``)."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")
