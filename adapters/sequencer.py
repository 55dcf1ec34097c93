"""timm Sequencer2d: refused, its final LayerNorm normalises every position across channels before the pool."""

from __future__ import annotations

from timm.models.sequencer import Sequencer2d
from torch import nn

from flatscan.contract import NormalisedHead
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


@register("sequencer", Sequencer2d)
def describe_sequencer(model: Sequencer2d) -> NormalisedHead:
    if not isinstance(model.norm, nn.Identity):
        raise UnsupportedModel(
            f"norm ({type(model.norm).__name__}) normalises the last stage's output across channels at every "
            "position, with statistics of each sample: not a per-channel affine map between the feature layer "
            "and the pool"
        )
    raise UnsupportedModel(
        "Sequencer2d keeps its feature maps channels-last (N, H, W, C) up to the pool; flatscan reads the "
        "pre-activation only from channel-first (N, C, H, W) module outputs, so it cannot tap this model"
    )
