"""RDNet: the last dense block's 1x1 conv feeds the last growth_rate channels (layer scale); GAP -> LayerNorm -> Linear.

timm's pretrained RDNets end in an eSE-gated block: refused.
"""

from __future__ import annotations

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models.rdnet import RDNet


def tiny_rdnet(last_block: str = "Block", **kwargs: object) -> RDNet:
    return RDNet(
        num_classes=CLASSES,
        growth_rates=(8, 8),
        num_blocks_list=(1, 2),
        is_downsample_block=(None, True),
        block_type=("Block", last_block),
        num_init_features=8,
        bottleneck_width_ratio=1.0,
        **kwargs,
    )


def test_rdnet_matches_autograd() -> None:
    head = assert_matches_autograd(tiny_rdnet(), "rdnet", size=32)
    assert head.feature_layer == "dense_stages.1.2.dense_block1.layers.layers.4"
    assert head.channels == slice(16, 24)  # 8 input features + 8 from the first block, then the last block's 8


REFUSALS = {
    "ese_gate": (lambda: tiny_rdnet("BlockESE"), "eSE gate"),
    "norm_before_pool": (lambda: tiny_rdnet(head_norm_first=True), "head_norm_first"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)
