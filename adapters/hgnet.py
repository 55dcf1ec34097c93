"""timm HGNet / HGNetV2 (HighPerfGpuNet): pool, then head.last_conv (1x1 conv -> ReLU [-> LearnableAffineBlock]) -> fc.

As in MobileNetV3, the feature layer acts on the pooled vector (L = 1). HGNetV2's learnable affine block
(a scalar scale and bias after the ReLU) is part of the head function: logits = fc(scale * h + bias).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from timm.models.hgnet import HighPerfGpuNet, LearnableAffineBlock
from torch import Tensor, nn

from flatscan.contract import NormalisedHead, Tap, normalised_head, require_average_pool, submodule
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


def _affine_then_fc(lab: nn.Module, fc: nn.Module, pooled: Tensor) -> Tensor:
    """The head after the ReLU on the (N, C) vector: LearnableAffineBlock, then the Linear classifier."""
    return fc(lab(pooled))


@register("hgnet", HighPerfGpuNet)
def describe_hgnet(model: HighPerfGpuNet) -> NormalisedHead:
    last_conv = model.head.last_conv
    if not isinstance(last_conv, nn.Sequential):
        raise UnsupportedModel(
            "head.last_conv is missing (built with head_hidden_size=None): the pooled vector feeds the "
            "classifier directly, with no feature convolution after the pool"
        )
    require_average_pool(submodule(model, "head.global_pool"), "head.global_pool")
    head = normalised_head(
        model,
        feature_layer="head.last_conv.0",
        norm=None,
        activation="head.last_conv.1",
        pool="head.global_pool",
        classifier="head.fc",
    )
    if len(last_conv) == 2:
        return head
    lab = last_conv[2]
    if len(last_conv) != 3 or not isinstance(lab, LearnableAffineBlock):
        raise UnsupportedModel("head.last_conv is not conv -> ReLU [-> LearnableAffineBlock]: not the layout it knows")
    # h is the ReLU's output (the affine block's input); the affine block belongs to the head function.
    return replace(head, pooled=Tap("head.last_conv.2", "input"), head_fn=partial(_affine_then_fc, lab, model.head.fc))
