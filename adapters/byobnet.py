"""timm ByobNet (RepVGG, MobileOne, GENet, RegNetZ, ResNet-ts, ...): final_conv (ConvNormAct) when present, else
the last block's last conv and its BatchNorm, + shortcut, the block's activation; ClassifierHead (GAP -> Linear).

RepVGG and MobileOne blocks sum several conv branches at train time; timm fuses them into one ``reparam_conv``
for deployment. Only the fused block is measured: its kernel is the one the deployed model applies. Their SE
variants (mobileone_s4, repvgg_d2se) gate the fused conv's output, act(attn(reparam_conv(x))): a coupled tail.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from timm.layers import ClassifierHead, ConvNormAct
from timm.models.byobnet import (
    BasicBlock,
    BottleneckBlock,
    ByobNet,
    DarkBlock,
    EdgeBlock,
    MobileOneBlock,
    RepVggBlock,
    SelfAttnBlock,
)
from torch import nn

from flatscan.contract import (
    EVO_NORMS,
    NormalisedHead,
    Tap,
    conv_norm_act,
    evo_norm_head,
    normalised_head,
    sole_activation,
    squeeze_excitation,
    submodule,
)
from flatscan.errors import UnsupportedModel
from flatscan.registry import register

# The last ConvNormAct of each residual block type; nothing but attn_last, drop_path, + shortcut, act follows it.
_LAST_CONV = {
    BasicBlock: "conv2_kxk",
    BottleneckBlock: "conv3_1x1",
    DarkBlock: "conv2_kxk",
    EdgeBlock: "conv2_1x1",
    SelfAttnBlock: "conv3_1x1",
}


def _require_no_gate(model: nn.Module, name: str) -> None:
    if not isinstance(submodule(model, name), nn.Identity):
        raise UnsupportedModel(
            f"{name} ({type(submodule(model, name)).__name__}) gates the feature layer's output with a value "
            "computed from that output, between the feature layer and the pool: not element-wise"
        )


@register("byobnet", ByobNet)
def describe_byobnet(model: ByobNet) -> NormalisedHead:
    if not isinstance(model.head, ClassifierHead):
        raise UnsupportedModel(
            f"head is {type(model.head).__name__}, not timm's ClassifierHead (global average pool -> Linear): "
            "attention pooling or a normalised MLP head is outside the class"
        )
    head: dict[str, Any] = {"pool": "head.global_pool", "classifier": "head.fc"}
    if isinstance(model.final_conv, ConvNormAct) and isinstance(model.final_conv.bn, EVO_NORMS):
        # RegNetZ-evos: EvoNorm-S0a, its own non-linearity through per-sample group statistics (coupled).
        return evo_norm_head(model, feature_layer="final_conv.conv", norm="final_conv.bn", **head)
    if isinstance(model.final_conv, ConvNormAct):
        # num_features set (GENet, RegNetZ, ResNet33ts, ...): a 1x1 ConvNormAct after the last stage.
        conv, norm, act = conv_norm_act(model, "final_conv")
        return normalised_head(model, feature_layer=conv, norm=norm, activation=act, **head)
    if not isinstance(model.final_conv, nn.Identity):
        raise UnsupportedModel(f"final_conv is {type(model.final_conv).__name__}, not timm's ConvNormAct")
    stage = len(model.stages) - 1
    block_name = f"stages.{stage}.{len(model.stages[stage]) - 1}"
    block = submodule(model, block_name)
    if isinstance(block, (RepVggBlock, MobileOneBlock)):
        if block.reparam_conv is None:
            raise UnsupportedModel(
                f"{block_name} ({type(block).__name__}) is in its multi-branch training form: its branches are "
                "fused into one kernel for inference; reparameterise the model first (flatscan.inference_form(model), "
                "which flatscan's loader applies) so the measure is about the kernel it applies"
            )
        act = f"{block_name}.act"
        fused = normalised_head(model, feature_layer=f"{block_name}.reparam_conv", norm=None, activation=act, **head)
        if isinstance(submodule(model, f"{block_name}.attn"), nn.Identity):
            return fused
        # mobileone_s4, repvgg_d2se: act(attn(reparam_conv(x))), the SE gate right on the fused conv's output
        # (no norm, no residual in the inference form): a tail coupled through the pooled mean.
        gate = f"{block_name}.attn"
        return replace(fused, coupling=squeeze_excitation(model, gate, Tap(gate, "input")))
    if type(block) not in _LAST_CONV:
        raise UnsupportedModel(
            f"the last block {block_name} is {type(block).__name__}, a block type the byobnet adapter does not know"
        )
    conv, norm, norm_act = conv_norm_act(model, f"{block_name}.{_LAST_CONV[type(block)]}")
    if not isinstance(submodule(model, norm_act), nn.Identity):
        raise UnsupportedModel(f"{norm_act} applies an activation before the residual add: not v = s z + t + r")
    if hasattr(block, "attn_last"):
        _require_no_gate(model, f"{block_name}.attn_last")
    # The block's act (Identity with linear_out), then final_conv (Identity here): one element-wise activation.
    act = sole_activation(model, [f"{block_name}.act", "final_conv"])
    return normalised_head(model, feature_layer=conv, norm=norm, activation=act, **head)
