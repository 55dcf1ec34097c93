"""timm RDNet: the last dense block's last 1x1 conv feeds the last growth_rate channels (layer scale gamma).

As in DenseNet, the stage concatenates its input and every block's output, so the feature layer feeds only
the last channels of the pooled vector; no residual is added to them and no activation follows. The head
is NormMlpClassifierHead (GAP -> LayerNorm -> Linear). Blocks ending in an eSE gate (BlockESE, all of timm's
pretrained RDNets) and head_norm_first models (a per-position norm before the pool) are refused.
"""

from __future__ import annotations

from functools import partial

from timm.layers import NormMlpClassifierHead
from timm.models.rdnet import Block, BlockESE, DenseStage, RDNet
from torch import nn

from flatscan.contract import (
    NormalisedHead,
    Tap,
    layer_scaled_residual_head,
    norm_mlp_head_logits,
    require_average_pool,
    submodule,
)
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


@register("rdnet", RDNet)
def describe_rdnet(model: RDNet) -> NormalisedHead:
    if not isinstance(model.norm_pre, nn.Identity):
        raise UnsupportedModel(
            f"norm_pre ({type(model.norm_pre).__name__}, head_norm_first) normalises across channels at every "
            "position before the pool, with statistics of each sample: not a per-channel affine map"
        )
    if not isinstance(model.head, NormMlpClassifierHead):
        raise UnsupportedModel(f"head is {type(model.head).__name__}, not timm's NormMlpClassifierHead")
    require_average_pool(model.head.global_pool, "head.global_pool")
    stage_name = f"dense_stages.{len(model.dense_stages) - 1}.{len(model.dense_stages[-1]) - 1}"  # type: ignore[arg-type]
    stage = submodule(model, stage_name)
    if not isinstance(stage, DenseStage):
        raise UnsupportedModel(f"{stage_name} is {type(stage).__name__}, not a DenseStage: not the layout it knows")
    block_name, block = list(stage.named_children())[-1]
    block_name = f"{stage_name}.{block_name}"
    if isinstance(block.layers, BlockESE):
        raise UnsupportedModel(
            f"{block_name}.layers (BlockESE) ends in an eSE gate computed from the feature layer's output, "
            "between the feature layer and the pool: not element-wise"
        )
    if not isinstance(block.layers, Block):
        raise UnsupportedModel(f"{block_name}.layers is {type(block.layers).__name__}: not the layout it knows")
    growth = block.layers.layers[-1].out_channels
    total = stage.num_out_features
    return layer_scaled_residual_head(
        model,
        feature_layer=f"{block_name}.layers.layers.{len(block.layers.layers) - 1}",
        layer_scale=block.gamma,  # type: ignore[arg-type]
        pre_activation=Tap(stage_name, "output"),
        pooled=Tap("head.global_pool", "output"),
        classifier="head.fc",
        head_fn=partial(norm_mlp_head_logits, model.head),
        channels=slice(total - growth, total),  # type: ignore[operator]
    )
