"""timm TResNet: the last Bottleneck's conv3 (ConvNormAct without activation), + shortcut, ``act`` (ReLU).

The last stage has no squeeze-excitation (TResNet puts SE only in the first three stages, and inside a
Bottleneck it sits before conv3 anyway). The head is ClassifierHead ('fast' global average -> Linear).
"""

from __future__ import annotations

from timm.models.tresnet import BasicBlock, Bottleneck, TResNet
from torch import nn

from flatscan.contract import NormalisedHead, conv_norm_act, normalised_head, submodule
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


@register("tresnet", TResNet)
def describe_tresnet(model: TResNet) -> NormalisedHead:
    layer4 = submodule(model, "body.layer4")
    block_name = f"body.layer4.{len(layer4) - 1}"  # type: ignore[arg-type]
    block = submodule(model, block_name)
    if isinstance(block, Bottleneck):
        last = 3
    elif isinstance(block, BasicBlock):
        last = 2
        if block.se is not None:
            raise UnsupportedModel(
                f"{block_name}.se gates the feature layer's output with a value computed from that output, "
                "between the feature layer and the pool: not element-wise"
            )
    else:
        raise UnsupportedModel(f"{block_name} is {type(block).__name__}, not a TResNet block (the model was pruned)")
    conv, norm, norm_act = conv_norm_act(model, f"{block_name}.conv{last}")
    if not isinstance(submodule(model, norm_act), nn.Identity):
        raise UnsupportedModel(f"{norm_act} applies an activation before the residual add: not v = s z + t + r")
    return normalised_head(
        model,
        feature_layer=conv,
        norm=norm,
        activation=f"{block_name}.act",
        pool="head.global_pool",
        classifier="head.fc",
    )
