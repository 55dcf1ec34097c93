"""timm ReXNet: the last features entry is a 1x1 ConvNormAct (conv, BN, SiLU), then ClassifierHead."""

from __future__ import annotations

from typing import Any

from timm.models.rexnet import RexNet

from flatscan.contract import NormalisedHead, conv_norm_act, normalised_head
from flatscan.registry import register


@register("rexnet", RexNet)
def describe_rexnet(model: RexNet) -> NormalisedHead:
    conv, norm, act = conv_norm_act(model, f"features.{len(model.features) - 1}")
    head: dict[str, Any] = {"pool": "head.global_pool", "classifier": "head.fc"}
    return normalised_head(model, feature_layer=conv, norm=norm, activation=act, **head)
