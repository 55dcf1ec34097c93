"""VoVNet: the last OSA block's conv_concat (1x1 conv, BatchNorm, ReLU) -> GAP -> Linear (vovnet39a/57a layout).

The eSE variants (all of timm's pretrained VoVNets) are coupled tails (tests/adapters/test_coupled_tails.py);
residual last blocks without eSE are refused.
"""

from __future__ import annotations

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models.vovnet import VovNet


def tiny_vovnet(**cfg: object) -> VovNet:
    base = {
        "stem_chs": [4, 4, 8],
        "stage_conv_chs": [4, 4, 4, 4],
        "stage_out_chs": [8, 8, 8, 16],
        "layer_per_block": 1,
        "block_per_stage": [1, 1, 1, 1],
        "residual": False,
        "depthwise": False,
        "attn": "",
    }
    return VovNet({**base, **cfg}, num_classes=CLASSES)


@pytest.mark.parametrize("depthwise", [False, True], ids=["dense", "depthwise"])
def test_vovnet_matches_autograd(depthwise: bool) -> None:
    head = assert_matches_autograd(tiny_vovnet(depthwise=depthwise), "vovnet", size=32)
    assert head.feature_layer == "stages.3.blocks.0.conv_concat.conv"
    assert head.activation.name == "relu"


REFUSALS = {
    "residual_after_activation": (
        lambda: tiny_vovnet(residual=True, block_per_stage=[1, 1, 1, 2]),
        "after conv_concat's activation",
    ),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)
