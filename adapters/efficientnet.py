"""timm EfficientNet / MobileNetV2 (EfficientNet class): conv_head, bn2 with its activation."""

from __future__ import annotations

from timm.models.efficientnet import EfficientNet
from torch import nn

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


@register("efficientnet", EfficientNet)
def describe_efficientnet(model: EfficientNet) -> NormalisedHead:
    if not isinstance(model.conv_head, nn.Conv2d):
        raise UnsupportedModel("conv_head was removed (model truncated); there is no feature convolution")
    require_average_pool(model.global_pool, "global_pool")
    require_linear(model.classifier, "classifier")
    act = getattr(model.bn2, "act", None)
    if act is None:
        raise UnsupportedModel(f"bn2 is {type(model.bn2).__name__}, not timm's BatchNormAct2d")
    return NormalisedHead(
        family="efficientnet",
        feature_layer="conv_head",
        pre_activation=Tap("bn2.act", "input"),
        pooled=Tap("classifier", "input"),
        channel_scale=batchnorm_scale(model.bn2, "bn2"),
        activation=activation_of(act, "bn2.act"),
        classifier="classifier",
    )
