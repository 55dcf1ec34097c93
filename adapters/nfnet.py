"""timm NormFreeNet (NFNet-F, ECA-NFNet-L, NF-RegNet, NF-ResNet): no normalisation layers.

With ``num_features`` set the feature layer is ``final_conv`` (1x1, weight-standardised), then ``final_act``;
without it, the last block's ``conv3``, times the block's ``alpha`` (and skip-init gain), plus the shortcut, then
``final_act``. ``final_act`` may be NFNet's ``GammaAct``, ``gamma * act(x)``: an activation with a gain. The
weight-standardised convolutions are measured in their inference form (:func:`flatscan.inference_form`).
"""

from __future__ import annotations

from timm.layers import get_act_fn
from timm.models.nfnet import GammaAct, NormFreeBlock, NormFreeNet
from torch import nn

from flatscan.contract import (
    NormalisedHead,
    Tap,
    activation_of,
    require_average_pool,
    require_linear,
    require_plain_conv,
    submodule,
)
from flatscan.errors import UnsupportedModel
from flatscan.flatness import Activation
from flatscan.registry import register

_GAMMA_ACT_NAMES = {"gelu": "gelu", "gelu_tanh": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}


def _final_activation(act: nn.Module) -> Activation:
    if not isinstance(act, GammaAct):
        return activation_of(act, "final_act")
    for timm_name, name in _GAMMA_ACT_NAMES.items():
        if act.act_fn is get_act_fn(timm_name):
            return Activation(name, gain=float(act.gamma))
    raise UnsupportedModel(f"final_act applies {act.act_fn.__name__}, which flatscan has no closed form for")


@register("nfnet", NormFreeNet)
def describe_nfnet(model: NormFreeNet) -> NormalisedHead:
    require_average_pool(submodule(model, "head.global_pool"), "head.global_pool")
    require_linear(submodule(model, "head.fc"), "head.fc")
    activation = _final_activation(model.final_act)
    if isinstance(model.final_conv, nn.Identity):
        block_name = f"stages.{len(model.stages) - 1}.{len(model.stages[-1]) - 1}"  # type: ignore[arg-type]
        block = submodule(model, block_name)
        if not isinstance(block, NormFreeBlock):
            raise UnsupportedModel(f"the last block {block_name} is {type(block).__name__}, not a NormFreeBlock")
        if block.attn_last is not None:
            raise UnsupportedModel(
                f"{block_name}.attn_last ({type(block.attn_last).__name__}) gates the feature layer's output with a "
                "value computed from that output, between the feature layer and the pool: not element-wise"
            )
        feature_layer = f"{block_name}.conv3"
        conv = require_plain_conv(model, feature_layer)
        # out * skipinit_gain * alpha + shortcut: one scale for every channel.
        gain = block.alpha * (block.skipinit_gain.detach() if block.skipinit_gain is not None else 1.0)
        scale = conv.weight.new_ones(conv.out_channels).detach() * gain
    else:
        feature_layer = "final_conv"
        conv = require_plain_conv(model, feature_layer)
        scale = conv.weight.new_ones(conv.out_channels).detach()
    return NormalisedHead(
        feature_layer=feature_layer,
        pre_activation=Tap("final_act", "input"),
        pooled=Tap("head.fc", "input"),
        channel_scale=scale,
        activation=activation,
        classifier="head.fc",
    )
