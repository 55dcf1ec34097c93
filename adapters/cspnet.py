"""timm CspNet (CSPResNet/ResNeXt/DarkNet, CS3DarkNet/EdgeNet): the last stage's conv_transition (ConvNormAct);
DarkStage models: the last block's conv3, its BatchNorm, + shortcut, act3; DarkNet's DarkBlock: conv2 -> BatchNorm
-> activation, then + shortcut (a constant shift of the pooled vector). ClassifierHead (GAP -> Linear).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from timm.models.cspnet import BottleneckBlock, CrossStage, CrossStage3, CspNet, DarkBlock, DarkStage
from torch import nn

from flatscan.contract import NormalisedHead, Tap, conv_norm_act, normalised_head, submodule
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


@register("cspnet", CspNet)
def describe_cspnet(model: CspNet) -> NormalisedHead:
    head: dict[str, Any] = {"pool": "head.global_pool", "classifier": "head.fc"}
    stage_name = f"stages.{len(model.stages) - 1}"
    stage = submodule(model, stage_name)
    if isinstance(stage, (CrossStage, CrossStage3)):
        # The cross-stage merge: conv_transition (1x1 ConvNormAct) on cat([blocks(x1), x2]) ends the stage.
        conv, norm, act = conv_norm_act(model, f"{stage_name}.conv_transition")
        return normalised_head(model, feature_layer=conv, norm=norm, activation=act, **head)
    if not isinstance(stage, DarkStage):
        raise UnsupportedModel(
            f"the last stage {stage_name} is {type(stage).__name__}, a stage the adapter does not know"
        )
    block_name = f"{stage_name}.blocks.{len(stage.blocks) - 1}"
    block = submodule(model, block_name)
    if isinstance(block, DarkBlock):
        # DarkNet: conv2 (ConvNormAct: conv -> BatchNorm -> activation), then + shortcut with nothing after it.
        # The pooled vector is mean(act(v)) + mean(shortcut); the shortcut (the block's input) does not depend on
        # conv2's kernel, so it is a constant shift of h read at the block's input (pooled_offset).
        if not isinstance(submodule(model, f"{block_name}.drop_path"), nn.Identity):
            raise UnsupportedModel(f"{block_name}.drop_path is not Identity: the model is not in its eval form")
        conv, norm, act = conv_norm_act(model, f"{block_name}.conv2")
        dark = normalised_head(model, feature_layer=conv, norm=norm, activation=act, **head)
        return replace(dark, pooled_offset=Tap(block_name, "input"))
    if not isinstance(block, BottleneckBlock):
        # EdgeBlock and others: not a layout the adapter knows.
        raise UnsupportedModel(
            f"the last block {block_name} ({type(block).__name__}) applies its activation before the residual "
            "add and none after it, a block type the cspnet adapter does not describe"
        )
    if not isinstance(submodule(model, f"{block_name}.attn3"), nn.Identity):
        raise UnsupportedModel(
            f"{block_name}.attn3 gates the feature layer's output with a value computed from that output, "
            "between the feature layer and the pool: not element-wise"
        )
    conv, norm, norm_act = conv_norm_act(model, f"{block_name}.conv3")
    if not isinstance(submodule(model, norm_act), nn.Identity):
        raise UnsupportedModel(f"{norm_act} applies an activation before the residual add: not v = s z + t + r")
    return normalised_head(model, feature_layer=conv, norm=norm, activation=f"{block_name}.act3", **head)
