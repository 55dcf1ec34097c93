"""FocalNet: with head_hidden_size, the last block's mlp.fc2, ls2, + shortcut; GAP -> LayerNorm -> MLP -> Linear.

timm's pretrained FocalNets normalise every position across channels before the pool: refused.
"""

from __future__ import annotations

import pytest
import torch
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models.focalnet import FocalNet
from torch import nn


def tiny_focalnet(**kwargs: object) -> FocalNet:
    return FocalNet(num_classes=CLASSES, depths=(1, 1), embed_dim=4, mlp_ratio=2.0, **kwargs)


@pytest.mark.parametrize("layerscale_value", [1e-4, None], ids=["layer_scale", "no_layer_scale"])
def test_focalnet_matches_autograd(layerscale_value: float | None) -> None:
    model = tiny_focalnet(head_hidden_size=12, layerscale_value=layerscale_value)
    head = assert_matches_autograd(model, "focalnet", size=32)
    assert head.feature_layer == "layers.1.blocks.0.mlp.fc2"
    assert head.head_type == "general"


def randomise_layer_norms(model: nn.Module, seed: int = 4) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))
    return model


@pytest.mark.parametrize("layerscale_value", [1e-4, None], ids=["layer_scale", "no_layer_scale"])
def test_layer_norm_before_the_pool_matches_autograd(layerscale_value: float | None) -> None:
    # focalnet_tiny_srf ... focalnet_base_lrf: the last stage's output -> norm (LayerNorm2d across channels) -> pool.
    model = randomise_layer_norms(tiny_focalnet(layerscale_value=layerscale_value))
    head = assert_matches_autograd(model, "focalnet", size=32)
    assert head.pre_activation.module == "norm"
    assert head.coupling is not None and "LayerNorm2d" in head.coupling.label


REFUSALS = {
    # focalnet_large_fl3 ... focalnet_huge_fl4: LayerNorm after mlp.fc2 in every block
    "post_norm": (lambda: tiny_focalnet(use_post_norm=True, head_hidden_size=12), "use_post_norm"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)
