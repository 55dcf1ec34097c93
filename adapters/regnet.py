"""timm RegNet X/Y/Z/V: final_conv (ConvNormAct) when present, else the last block's conv3, its norm, + shortcut."""

from __future__ import annotations

from typing import Any

from timm.layers import ConvNormAct
from timm.models.regnet import PreBottleneck, RegNet, RegStage
from torch import nn

from flatscan.contract import NormalisedHead, conv_norm_act, normalised_head, sole_activation, submodule
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


@register("regnet", RegNet)
def describe_regnet(model: RegNet) -> NormalisedHead:
    head: dict[str, Any] = {"pool": "head.global_pool", "classifier": "head.fc"}
    if isinstance(model.final_conv, ConvNormAct):
        # num_features set (some RegNetZ): a 1x1 ConvNormAct after the last stage is the feature layer.
        conv, norm, act = conv_norm_act(model, "final_conv")
        return normalised_head(model, feature_layer=conv, norm=norm, activation=act, **head)
    stage = [name for name, module in model.named_children() if isinstance(module, RegStage)][-1]
    block_name = f"{stage}.{list(submodule(model, stage).named_children())[-1][0]}"
    block = submodule(model, block_name)
    # The SE gate sits before conv3 (on conv2's output), so nothing but element-wise ops follow conv3.
    if isinstance(block, PreBottleneck):
        # RegNetV (pre-activation): conv3 has no norm after it; final_conv is the activation.
        act = sole_activation(model, ["final_conv"])
        return normalised_head(model, feature_layer=f"{block_name}.conv3", norm=None, activation=act, **head)
    conv, norm, norm_act = conv_norm_act(model, f"{block_name}.conv3")
    if not isinstance(submodule(model, norm_act), nn.Identity):
        raise UnsupportedModel(f"{norm_act} applies an activation before the residual add: not v = s z + t + r")
    # act3 (ReLU/SiLU), or Identity with linear_out, then final_conv is the activation (or Identity).
    act = sole_activation(model, [f"{block_name}.act3", "final_conv"])
    return normalised_head(model, feature_layer=conv, norm=norm, activation=act, **head)
