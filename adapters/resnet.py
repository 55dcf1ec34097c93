"""timm ResNet / ResNeXt / ResNeSt: the last block's last conv, its BatchNorm, + shortcut, activation."""

from __future__ import annotations

from timm.models.resnet import ResNet

from flatscan.contract import (
    NormalisedHead,
    Tap,
    activation_of,
    batchnorm_scale,
    require_average_pool,
    require_linear,
)
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


@register("resnet", ResNet)
def describe_resnet(model: ResNet) -> NormalisedHead:
    require_average_pool(model.global_pool, "global_pool")
    require_linear(model.fc, "fc")
    block_name = f"layer4.{len(model.layer4) - 1}"
    block = model.layer4[-1]
    # Bottleneck-style blocks end in conv3/bn3/act3, BasicBlock-style ones in conv2/bn2/act2.
    last = next((i for i in (3, 2) if all(hasattr(block, f"{n}{i}") for n in ("conv", "bn", "act"))), None)
    if last is None:
        raise UnsupportedModel(
            f"{block_name} is {type(block).__name__}, a block that does not end in convN, bnN, actN "
            "(e.g. Res2Net reuses one activation module across the block); no adapter knows its layout"
        )
    if getattr(block, "se", None) is not None:
        raise UnsupportedModel(
            f"{block_name}.se ({type(block.se).__name__}) gates the feature layer's output with a value "
            "computed from that output, between the feature layer and the pool: not element-wise"
        )
    return NormalisedHead(
        family="resnet",
        feature_layer=f"{block_name}.conv{last}",
        pre_activation=Tap(f"{block_name}.act{last}", "input"),
        pooled=Tap("fc", "input"),
        channel_scale=batchnorm_scale(getattr(block, f"bn{last}"), f"{block_name}.bn{last}"),
        activation=activation_of(getattr(block, f"act{last}"), f"{block_name}.act{last}"),
        classifier="fc",
    )
