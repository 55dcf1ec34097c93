"""timm VGG: pre_logits (ConvMlp) fc2 -> act2, then ClassifierHead (GAP -> Linear)."""

from __future__ import annotations

from timm.models.vgg import VGG, ConvMlp

from flatscan.contract import NormalisedHead, normalised_head
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


@register("vgg", VGG)
def describe_vgg(model: VGG) -> NormalisedHead:
    if not isinstance(model.pre_logits, ConvMlp):
        raise UnsupportedModel(f"pre_logits is {type(model.pre_logits).__name__}, not timm's ConvMlp")
    return normalised_head(
        model,
        feature_layer="pre_logits.fc2",
        norm=None,
        activation="pre_logits.act2",
        pool="head.global_pool",
        classifier="head.fc",
    )
