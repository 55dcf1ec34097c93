"""timm EfficientNet class (EfficientNet, MobileNetV1/V2, MNASNet, MixNet, FBNet, ...): conv_head, bn2 + activation.

Built without a head convolution (MobileNetV1), the last block's point-wise conv and its norm are the feature layer.
"""

from __future__ import annotations

from typing import Any

from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models.efficientnet import EfficientNet
from torch import nn

from flatscan.contract import EVO_NORMS, NormalisedHead, Tap, evo_norm_head, normalised_head, submodule
from flatscan.errors import UnsupportedModel
from flatscan.registry import register

# The last block's point-wise conv and the norm after it, by block type.
_LAST_CONV = {DepthwiseSeparableConv: ("conv_pw", "bn2"), InvertedResidual: ("conv_pwl", "bn3")}


def _require_norm_act(model: nn.Module, norm: str) -> str:
    if not isinstance(getattr(submodule(model, norm), "act", None), nn.Module):
        raise UnsupportedModel(f"{norm} is {type(submodule(model, norm)).__name__}, not timm's BatchNormAct2d")
    return f"{norm}.act"


def _describe_last_block(model: EfficientNet) -> NormalisedHead:
    stage = len(model.blocks) - 1
    block_name = f"blocks.{stage}.{len(model.blocks[stage]) - 1}"  # type: ignore[arg-type]
    block = submodule(model, block_name)
    if type(block) not in _LAST_CONV:
        raise UnsupportedModel(
            f"no conv_head, and the last block {block_name} is {type(block).__name__} (flatscan reads a "
            "DepthwiseSeparableConv or InvertedResidual last block)"
        )
    conv, norm = (f"{block_name}.{name}" for name in _LAST_CONV[type(block)])
    act = _require_norm_act(model, norm)
    head: dict[str, Any] = {"feature_layer": conv, "norm": norm, "pool": "global_pool"}
    if not block.has_skip:
        return normalised_head(model, activation=act, classifier="classifier", **head)
    if not isinstance(submodule(model, act), nn.Identity):
        raise UnsupportedModel(f"{act} applies an activation before the residual add: not v = s z + t + r")
    # v = s z + t + shortcut is the block's output, pooled as is.
    return normalised_head(model, activation=act, classifier="classifier", pre_activation=Tap(block_name), **head)


@register("efficientnet", EfficientNet)
def describe_efficientnet(model: EfficientNet) -> NormalisedHead:
    if isinstance(model.conv_head, nn.Identity):
        return _describe_last_block(model)
    if isinstance(model.bn2, EVO_NORMS):  # EvoNorm-S0 head: its own non-linearity through group statistics
        return evo_norm_head(model, feature_layer="conv_head", norm="bn2", pool="global_pool", classifier="classifier")
    return normalised_head(
        model,
        feature_layer="conv_head",
        norm="bn2",
        activation=_require_norm_act(model, "bn2"),
        pool="global_pool",
        classifier="classifier",
    )
