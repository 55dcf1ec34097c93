"""ReXNet: the last features entry, a 1x1 ConvNormAct (conv, BatchNorm, SiLU), then GAP -> Linear."""

from __future__ import annotations

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd
from timm.models.rexnet import RexNet

import flatscan


def tiny_rexnet(**kwargs: object) -> RexNet:
    return RexNet(num_classes=CLASSES, width_mult=0.1, initial_chs=4, final_chs=16, depth_mult=0.2, **kwargs)


def test_rexnet_matches_autograd() -> None:
    model = tiny_rexnet()
    head = assert_matches_autograd(model, "rexnet")
    assert head.feature_layer == f"features.{len(model.features) - 1}.conv"
    assert head.activation.name == "silu"


def test_max_pool_is_refused() -> None:
    with pytest.raises(flatscan.UnsupportedModel, match="not a global average"):
        flatscan.describe(tiny_rexnet(global_pool="max"))
