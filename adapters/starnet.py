"""timm StarNet: the last block's dwconv2 (depthwise 7x7, no norm) + shortcut, then norm (BatchNorm) -> GAP -> head.

v = s * (dwconv2(x) + shortcut) + t with s, t from ``norm``: the shortcut's share s * shortcut is part of
the residual r, and no activation follows. The depthwise conv is the feature layer itself (a grouped conv),
not something between it and the pool.
"""

from __future__ import annotations

from timm.models.starnet import Block, StarNet

from flatscan.contract import (
    NormalisedHead,
    Tap,
    batchnorm_scale,
    require_average_pool,
    require_linear,
    require_plain_conv,
    submodule,
)
from flatscan.errors import UnsupportedModel
from flatscan.flatness import Activation
from flatscan.registry import register


@register("starnet", StarNet)
def describe_starnet(model: StarNet) -> NormalisedHead:
    require_average_pool(model.global_pool, "global_pool")
    require_linear(model.head, "head")
    block_name = f"stages.{len(model.stages) - 1}.{len(model.stages[-1]) - 1}"  # type: ignore[arg-type]
    if not isinstance(submodule(model, block_name), Block):
        raise UnsupportedModel(
            f"the last stage does not end in a StarNet Block ({block_name}): not the layout it knows"
        )
    if hasattr(submodule(model, f"{block_name}.dwconv2"), "bn"):
        raise UnsupportedModel(f"{block_name}.dwconv2 has its own BatchNorm: not the layout the adapter knows")
    feature_layer = f"{block_name}.dwconv2.conv"
    require_plain_conv(model, feature_layer)
    return NormalisedHead(
        feature_layer=feature_layer,
        pre_activation=Tap("norm", "output"),
        pooled=Tap("head", "input"),
        channel_scale=batchnorm_scale(model.norm, "norm"),
        activation=Activation("identity"),
        classifier="head",
    )
