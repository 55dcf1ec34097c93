"""timm LCNetV2: pool, then conv_head (1x1, no norm) -> act2 -> flatten -> classifier (MobileNetV3's layout)."""

from __future__ import annotations

from timm.models.lcnetv2 import LCNetV2

from flatscan.contract import NormalisedHead, pooled_conv_head
from flatscan.registry import register


@register("lcnetv2", LCNetV2)
def describe_lcnetv2(model: LCNetV2) -> NormalisedHead:
    return pooled_conv_head(model)
