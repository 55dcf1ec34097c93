"""timm GhostNet (V1-V3): pool, then conv_head (bias) -> act2 -> classifier, as MobileNetV3."""

from __future__ import annotations

from timm.models.ghostnet import GhostNet

from flatscan.contract import NormalisedHead, pooled_conv_head
from flatscan.registry import register


@register("ghostnet", GhostNet)
def describe_ghostnet(model: GhostNet) -> NormalisedHead:
    return pooled_conv_head(model)
