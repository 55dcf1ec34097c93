"""StarNet: the last block's depthwise dwconv2 + shortcut, then norm (BatchNorm) -> GAP -> Linear."""

from __future__ import annotations

from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models.starnet import StarNet


def tiny_starnet(**kwargs: object) -> StarNet:
    return StarNet(num_classes=CLASSES, base_dim=2, depths=(1, 1), mlp_ratio=2, **kwargs)


def test_starnet_matches_autograd() -> None:
    head = assert_matches_autograd(tiny_starnet(), "starnet", size=32)
    assert head.feature_layer == "stages.1.1.dwconv2.conv"  # a depthwise (grouped) conv
    assert head.activation.name == "identity"


def test_max_pool_is_refused() -> None:
    assert_refused(tiny_starnet(global_pool="max"), "not a global average")
