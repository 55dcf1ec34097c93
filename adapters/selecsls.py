"""timm SelecSLS: the last head layer, conv_bn = Sequential(conv, BatchNorm, ReLU) -> GAP -> Linear."""

from __future__ import annotations

from timm.models.selecsls import SelecSls
from torch import nn

from flatscan.contract import NormalisedHead, normalised_head
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


@register("selecsls", SelecSls)
def describe_selecsls(model: SelecSls) -> NormalisedHead:
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Sequential) or len(head) == 0:
        raise UnsupportedModel("head has no conv layers (the model was pruned): no conv -> BatchNorm -> ReLU last")
    last = f"head.{len(head) - 1}"
    layer = head[-1]
    if not isinstance(layer, nn.Sequential) or len(layer) != 3:
        raise UnsupportedModel(f"{last} is {type(layer).__name__}, not SelecSLS's conv -> BatchNorm -> ReLU")
    return normalised_head(
        model,
        feature_layer=f"{last}.0",
        norm=f"{last}.1",
        activation=f"{last}.2",
        pool="global_pool",
        classifier="fc",
    )
