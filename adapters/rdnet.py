"""timm RDNet: the last dense block's last 1x1 conv feeds the last growth_rate channels (layer scale gamma).

As in DenseNet, the stage concatenates its input and every block's output, so the feature layer feeds only
the last channels of the pooled vector; no residual is added to them and no activation follows. The head
is NormMlpClassifierHead (GAP -> LayerNorm -> Linear). Blocks ending in an eSE gate (BlockESE, all of timm's
pretrained RDNets): the 1x1 conv's output goes through EffectiveSEModule, then the layer scale gamma, a tail
coupled through the pooled mean (flatscan.contract.squeeze_excitation, gamma folded into alpha).
head_norm_first models (a per-position norm before the pool) are refused.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
from timm.layers import NormMlpClassifierHead
from timm.models.rdnet import Block, BlockESE, DenseStage, RDNet
from torch import nn

from flatscan.contract import (
    NormalisedHead,
    Tap,
    layer_scaled_residual_head,
    norm_mlp_head_logits,
    require_average_pool,
    squeeze_excitation,
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
    if not isinstance(block.layers, (Block, BlockESE)):
        raise UnsupportedModel(f"{block_name}.layers is {type(block.layers).__name__}: not the layout it knows")
    layers = block.layers.layers
    last_conv = len(layers) - (2 if isinstance(block.layers, BlockESE) else 1)
    feature_layer = f"{block_name}.layers.layers.{last_conv}"
    growth = layers[last_conv].out_channels
    total = stage.num_out_features
    pre_activation, pooled = Tap(stage_name, "output"), Tap("head.global_pool", "output")
    head_fn, channels = partial(norm_mlp_head_logits, model.head), slice(total - growth, total)  # type: ignore[operator]
    gamma = block.gamma
    assert gamma is None or isinstance(gamma, torch.Tensor)

    def head(layer_scale: torch.Tensor | None) -> NormalisedHead:
        return layer_scaled_residual_head(
            model,
            feature_layer=feature_layer,
            layer_scale=layer_scale,
            pre_activation=pre_activation,
            pooled=pooled,
            classifier="head.fc",
            head_fn=head_fn,
            channels=channels,
        )

    if isinstance(block.layers, Block):
        return head(gamma)
    # BlockESE: conv -> eSE gate (x * gate(fc(mean x))) -> * gamma, concatenated into the last growth channels.
    gate = f"{block_name}.layers.layers.{len(layers) - 1}"
    coupling = squeeze_excitation(
        model, gate, Tap(gate, "input"), scale=None if gamma is None else gamma.detach().flatten()
    )
    # The gate's input and the pre-activation's channels both hold the feature layer's channels only: the
    # gate's taps are not cut to the pooled channels (pooled_layout False); v is read in the stage's concat.
    return replace(head(None), coupling=replace(coupling, affine_output=None, pooled_layout=False))
