"""timm HRNet (HighResolutionNet, classification head): final_layer = 1x1 conv -> BatchNorm -> ReLU -> GAP -> Linear.

The head sums the four resolution branches (incre_modules + downsamp_modules) into final_layer's input; the
feature layer is final_layer's conv, as a conv head.
"""

from __future__ import annotations

from timm.models.hrnet import HighResolutionNet
from torch import nn

from flatscan.contract import NormalisedHead, normalised_head
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


@register("hrnet", HighResolutionNet)
def describe_hrnet(model: HighResolutionNet) -> NormalisedHead:
    final = getattr(model, "final_layer", None)
    if not isinstance(final, nn.Sequential) or len(final) != 3:
        raise UnsupportedModel(
            "final_layer is missing (a feature-extraction head, or a pruned model): no conv -> BatchNorm -> "
            "ReLU before the pool"
        )
    return normalised_head(
        model,
        feature_layer="final_layer.0",
        norm="final_layer.1",
        activation="final_layer.2",
        pool="global_pool",
        classifier="classifier",
    )
