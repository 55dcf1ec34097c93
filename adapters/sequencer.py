"""timm Sequencer2d: the last block's mlp_channels.fc2 (Linear on channels-last maps), + shortcut, then the final
LayerNorm across channels at every position (:class:`flatscan.contract.ChannelNorm`), the pool and the Linear fc."""

from __future__ import annotations

from dataclasses import replace
from typing import cast

from timm.models.sequencer import Sequencer2d, Sequencer2dBlock
from torch import nn

from flatscan.contract import (
    NormalisedHead,
    Tap,
    channel_layer_norm,
    layer_scaled_residual_head,
    require_average_pool,
    submodule,
)
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


@register("sequencer", Sequencer2d)
def describe_sequencer(model: Sequencer2d) -> NormalisedHead:
    require_average_pool(submodule(model, "head.global_pool"), "head.global_pool")
    last_stage = cast(nn.Sequential, model.stages)[-1]
    block_name = f"stages.{len(model.stages) - 1}.blocks.{len(last_stage.blocks) - 1}"  # type: ignore[arg-type]
    block = submodule(model, block_name)
    if not isinstance(block, Sequencer2dBlock) or not isinstance(block.drop_path, nn.Identity):
        raise UnsupportedModel(f"{block_name} is not a Sequencer2dBlock in eval form: not the layout it knows")
    # The maps stay channels-last (N, H, W, C) up to the head's pool: every tap reads them channels-last.
    final_norm = None if isinstance(model.norm, nn.Identity) else channel_layer_norm(model, "norm")
    head = layer_scaled_residual_head(
        model,
        feature_layer=f"{block_name}.mlp_channels.fc2",
        layer_scale=None,
        pre_activation=Tap(block_name if final_norm is None else "norm", "output", channels_last=True),
        pooled=Tap("head.fc", "input"),
        classifier="head.fc",
    )
    return replace(head, coupling=final_norm)
