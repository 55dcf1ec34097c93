"""timm EfficientViM (and its distilled variant): refused, the head is outside flatscan's class."""

from __future__ import annotations

from timm.models.efficientvim import EfficientViM

from flatscan.contract import NormalisedHead
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


@register("efficientvim", EfficientViM)
def describe_efficientvim(model: EfficientViM) -> NormalisedHead:
    raise UnsupportedModel(
        "EfficientViM normalises its last feature map with a LayerNorm2d (across channels, per position) before "
        "the pool, and its head mixes that pooled map with the pooled hidden states of every stage's state-space "
        "mixer: not a per-channel affine map between a feature convolution and one global average pool"
    )
