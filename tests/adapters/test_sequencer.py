"""Sequencer2d: mlp_channels.fc2 (channels-last Linear) + shortcut, then a LayerNorm across channels before the pool."""

from __future__ import annotations

import torch
from helpers.adapters import CLASSES, assert_matches_autograd
from timm.models.sequencer import Sequencer2d
from torch import nn


def test_layer_norm_before_the_pool_matches_autograd() -> None:
    model = Sequencer2d(
        num_classes=CLASSES,
        layers=(1, 1),
        patch_sizes=(4, 2),
        embed_dims=(8, 8),
        hidden_sizes=(4, 4),
        mlp_ratios=(1.0, 1.0),
    )
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # the final norm's affine parameters away from (1, 0)
        model.norm.weight.copy_(0.5 + torch.rand(8, generator=generator))
        model.norm.bias.copy_(0.3 * torch.randn(8, generator=generator))
        for layer in (model.stages[1].blocks[0].mlp_channels.fc2, model.head.fc):  # timm's init is std 0.02
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
    head = assert_matches_autograd(model, "sequencer", size=32)
    assert head.feature_layer == "stages.1.blocks.0.mlp_channels.fc2"
    assert head.coupling is not None and isinstance(model.norm, nn.LayerNorm)
