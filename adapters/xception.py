"""timm Xception (legacy) and XceptionAligned: the last separable conv's pointwise 1x1 conv is the feature layer.

Legacy Xception: conv4 (SeparableConv2d: depthwise, then ``pointwise``) -> bn4 -> act4 -> GAP -> fc.
XceptionAligned: the last block's last SeparableConv2d, conv_pw -> bn_pw -> act_pw [+ shortcut] -> act (Identity);
pre-activation models (PreXceptionModule, '-p' variants): conv_pw with no norm after it [+ shortcut] -> act.
"""

from __future__ import annotations

from typing import Any

from timm.models.xception import Xception
from timm.models.xception_aligned import (
    PreSeparableConv2d,
    PreXceptionModule,
    SeparableConv2d,
    XceptionAligned,
    XceptionModule,
)
from torch import nn

from flatscan.contract import NormalisedHead, normalised_head, sole_activation, submodule
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


@register("xception", Xception)
def describe_xception(model: Xception) -> NormalisedHead:
    return normalised_head(
        model,
        feature_layer="conv4.pointwise",
        norm="bn4",
        activation="act4",
        pool="global_pool",
        classifier="fc",
    )


@register("xception_aligned", XceptionAligned)
def describe_xception_aligned(model: XceptionAligned) -> NormalisedHead:
    head: dict[str, Any] = {"pool": "head.global_pool", "classifier": "head.fc"}
    block_name = f"blocks.{len(model.blocks) - 1}"
    block = submodule(model, block_name)
    if not isinstance(block, (XceptionModule, PreXceptionModule)) or len(block.stack) == 0:
        raise UnsupportedModel(f"{block_name} is {type(block).__name__}, not an Xception module (the model was pruned)")
    conv_name = f"{block_name}.stack.{[name for name, _ in block.stack.named_children()][-1]}"
    conv = submodule(model, conv_name)
    residual = not block.no_skip
    if isinstance(block, PreXceptionModule):
        if not isinstance(conv, PreSeparableConv2d):
            raise UnsupportedModel(f"{conv_name} is {type(conv).__name__}, not a PreSeparableConv2d")
        # Pre-activation: nothing but the residual add between conv_pw and the model's final activation.
        return normalised_head(model, feature_layer=f"{conv_name}.conv_pw", norm=None, activation="act", **head)
    if not isinstance(conv, SeparableConv2d):
        raise UnsupportedModel(f"{conv_name} is {type(conv).__name__}, not a SeparableConv2d")
    act_pw = f"{conv_name}.act_pw"
    if residual and not isinstance(conv.act_pw, nn.Identity):
        raise UnsupportedModel(
            f"{act_pw} applies an activation before {block_name}'s residual add: not v = s z + t + r"
        )
    activation = sole_activation(model, [act_pw, "act"])
    return normalised_head(
        model, feature_layer=f"{conv_name}.conv_pw", norm=f"{conv_name}.bn_pw", activation=activation, **head
    )
