"""timm MobileNetV3 / MobileNetV4 / LCNet / HardCoReNAS / FBNetV3 (MobileNetV3 class): pool, then conv_head."""

from __future__ import annotations

from timm.models.mobilenetv3 import MobileNetV3

from flatscan.contract import NormalisedHead, pooled_conv_head
from flatscan.registry import register


@register("mobilenetv3", MobileNetV3)
def describe_mobilenetv3(model: MobileNetV3) -> NormalisedHead:
    # V3/LCNet: conv_head (bias) -> act2; V4 (head_norm): conv_head -> norm_head (BatchNormAct2d), act2 Identity.
    return pooled_conv_head(model)
