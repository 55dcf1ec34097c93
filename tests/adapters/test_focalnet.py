"""FocalNet: with head_hidden_size, the last block's mlp.fc2, ls2, + shortcut; GAP -> LayerNorm -> MLP -> Linear.

timm's pretrained FocalNets normalise every position across channels before the pool: refused.
"""

from __future__ import annotations

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models.focalnet import FocalNet


def tiny_focalnet(**kwargs: object) -> FocalNet:
    return FocalNet(num_classes=CLASSES, depths=(1, 1), embed_dim=4, mlp_ratio=2.0, **kwargs)


@pytest.mark.parametrize("layerscale_value", [1e-4, None], ids=["layer_scale", "no_layer_scale"])
def test_focalnet_matches_autograd(layerscale_value: float | None) -> None:
    model = tiny_focalnet(head_hidden_size=12, layerscale_value=layerscale_value)
    head = assert_matches_autograd(model, "focalnet", size=32)
    assert head.feature_layer == "layers.1.blocks.0.mlp.fc2"
    assert head.head_type == "general"


REFUSALS = {
    # the layout of focalnet_tiny_srf ... focalnet_base_lrf
    "norm_before_pool": (tiny_focalnet, "normalises the last stage's output"),
    # focalnet_large_fl3 ... focalnet_huge_fl4: LayerNorm after mlp.fc2 in every block
    "post_norm": (lambda: tiny_focalnet(use_post_norm=True, head_hidden_size=12), "use_post_norm"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)
