"""timm FasterNet: pool, then conv_head (1x1, no norm) -> act -> flatten -> classifier.

As in MobileNetV3, the feature layer acts on the pooled vector (L = 1).
"""

from __future__ import annotations

from timm.models.fasternet import FasterNet
from torch import nn

from flatscan.contract import NormalisedHead, normalised_head
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


@register("fasternet", FasterNet)
def describe_fasternet(model: FasterNet) -> NormalisedHead:
    if not isinstance(model.conv_head, nn.Conv2d):
        raise UnsupportedModel(
            "conv_head is missing (the model was pruned): the pooled vector feeds the classifier directly, "
            "with no feature convolution after the pool"
        )
    return normalised_head(
        model,
        feature_layer="conv_head",
        norm=None,
        activation="act",
        pool="global_pool",
        classifier="classifier",
    )
