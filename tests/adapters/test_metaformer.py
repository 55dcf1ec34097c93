"""MetaFormer (PoolFormer v1/v2, ConvFormer, CAFormer): last block's mlp.fc2, layer scale, + res-scaled shortcut."""

from __future__ import annotations

import pytest
import torch
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models import metaformer as mf
from torch import nn

# The layouts of timm's poolformer_s12, poolformerv2_s12, convformer_s18 and caformer_s18, at tiny widths.
LAYOUTS = {
    # GroupNorm blocks, 1x1-conv MLP with layer scale, Linear head.
    "poolformer": {
        "downsample_norm": None,
        "mlp_act": nn.GELU,
        "mlp_bias": True,
        "norm_layers": mf.GroupNorm1,
        "layer_scale_init_values": 1e-5,
        "res_scale_init_values": None,
        "use_mlp_head": False,
    },
    # res_scale on the last stages' shortcuts (part of the residual, not a scale of fc2), Linear head.
    "poolformerv2": {"norm_layers": mf.GroupNorm1NoBias, "use_mlp_head": False},
    # separable-conv mixer, StarReLU, MlpHead (fc1 -> SquaredReLU -> LayerNorm -> fc2).
    "convformer": {"token_mixers": mf.SepConv, "norm_layers": mf.LayerNorm2dNoBias},
    # attention in the last stages: channels-last blocks, a Linear fc2 on (N, L, C).
    "caformer": {
        "token_mixers": [mf.SepConv, mf.SepConv, mf.Attention, mf.Attention],
        "norm_layers": [mf.LayerNorm2dNoBias] * 2 + [mf.LayerNormNoBias] * 2,
        "head_dim": 8,
    },
}


def tiny_metaformer(layout: str, **kwargs: object) -> mf.MetaFormer:
    model = mf.MetaFormer(num_classes=CLASSES, depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), **LAYOUTS[layout], **kwargs)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # layer scale starts at 1e-5 and res scale at 1: make both non-trivial
        for module in model.modules():
            if isinstance(module, mf.Scale):
                module.scale.copy_(0.5 + torch.rand(module.scale.shape, generator=generator))
    return model


@pytest.mark.parametrize("layout", LAYOUTS)
def test_metaformer_matches_autograd(layout: str) -> None:
    head = assert_matches_autograd(tiny_metaformer(layout), "metaformer", size=32)
    assert head.feature_layer == "stages.3.blocks.0.mlp.fc2"
    assert head.activation.name == "identity"
    assert head.classifier == ("head.fc" if layout.startswith("poolformer") else "head.fc.fc2")


def test_max_pool_is_refused() -> None:
    assert_refused(tiny_metaformer("poolformerv2", global_pool="max"), "not a global average")
