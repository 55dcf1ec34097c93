"""timm VoVNet: the last OSA block's conv_concat (ConvNormAct: 1x1 conv, BatchNorm, activation) -> GAP -> Linear.

The eSE variants (all of timm's pretrained VoVNets) gate conv_concat's output with a value computed from
that output before the pool, and residual blocks add the shortcut after the activation: both are refused.
"""

from __future__ import annotations

from timm.models.vovnet import OsaBlock, VovNet

from flatscan.contract import NormalisedHead, conv_norm_act, normalised_head, submodule
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


@register("vovnet", VovNet)
def describe_vovnet(model: VovNet) -> NormalisedHead:
    block_name = f"stages.{len(model.stages) - 1}.blocks.{len(model.stages[-1].blocks) - 1}"
    block = submodule(model, block_name)
    if not isinstance(block, OsaBlock):
        raise UnsupportedModel(f"{block_name} is {type(block).__name__}, not an OsaBlock: not the layout it knows")
    if block.attn is not None:
        raise UnsupportedModel(
            f"{block_name}.attn ({type(block.attn).__name__}) gates the feature layer's output with a value "
            "computed from that output, between the feature layer and the pool: not element-wise"
        )
    if block.residual:
        raise UnsupportedModel(
            f"{block_name} adds its shortcut after conv_concat's activation and applies none after it: the pooled "
            "vector is not the average of an activation of v = s z + t + r"
        )
    conv, norm, act = conv_norm_act(model, f"{block_name}.conv_concat")
    return normalised_head(
        model,
        feature_layer=conv,
        norm=norm,
        activation=act,
        pool="head.global_pool",
        classifier="head.fc",
    )
