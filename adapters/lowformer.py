"""timm LowFormer: in_conv (1x1 conv -> BatchNorm -> act) -> GAP -> pre_classifier (Linear, LayerNorm, act) -> fc."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from timm.models.lowformer import LowFormer
from torch import Tensor, nn

from flatscan.contract import NormalisedHead, Tap, normalised_head
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


def _head_logits(model: LowFormer, pooled: Tensor) -> Tensor:
    """LowFormer.forward_head after its global pool, on the pooled vector (N, C) (dropout is off in eval)."""
    return model.classifier(model.pre_classifier(pooled))


@register("lowformer", LowFormer)
def describe_lowformer(model: LowFormer) -> NormalisedHead:
    if isinstance(model.in_conv, nn.Identity):
        raise UnsupportedModel(
            "in_conv was removed (reset_classifier with reset_other): the last stage feeds the pool directly, "
            "with no feature convolution"
        )
    linear_head = normalised_head(
        model,
        feature_layer="in_conv.conv",
        norm="in_conv.norm",
        activation="in_conv.act",
        pool="global_pool",
        classifier="classifier",
    )
    return replace(linear_head, pooled=Tap("global_pool"), head_fn=partial(_head_logits, model))
