"""MambaOut: the last gated CNN block's fc2 (Linear on channels-last maps), layer scale, + shortcut; MLP heads."""

from __future__ import annotations

import pytest
import torch
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models.mambaout import MambaOut
from torch import nn

# mambaout_femto ... _base (MlpHead), and the *_rw variants (ClNormMlpClassifierHead, layer scale, partial conv).
LAYOUTS = {
    "mambaout": {},
    "mambaout_rw": {
        "stem_mid_norm": False,
        "downsample": "conv_nf",
        "ls_init_value": 1e-6,
        "head_fn": "norm_mlp",
        "conv_ratio": 1.25,
        "expansion_ratio": 3.0,
    },
}


def tiny_mambaout(layout: str, **kwargs: object) -> MambaOut:
    torch.manual_seed(0)
    model = MambaOut(num_classes=CLASSES, depths=(1, 1), dims=(8, 8), **LAYOUTS[layout], **kwargs)
    with torch.no_grad():  # timm's std-0.02 init leaves Tr(H) of an 8-wide toy near 1e-9: make the weights O(1)
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, module.in_features**-0.5)
    return model


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mambaout_matches_autograd(layout: str) -> None:
    head = assert_matches_autograd(tiny_mambaout(layout), "mambaout", size=32)
    assert head.feature_layer == "stages.1.blocks.0.fc2"
    assert head.head_type == "general"


def test_no_pool_is_refused() -> None:
    assert_refused(tiny_mambaout("mambaout", global_pool=""), "not a global average")
