"""ResNetV2: the last block's conv3 / conv2, + shortcut, then the final norm (BatchNorm + act) before the pool.

timm builds ResNetV2 with a 1x1-conv classifier (ClassifierHead(use_conv=True)); it is measured as the Linear
map it is, and a Linear head is checked too.
"""

from __future__ import annotations

import pytest
import timm
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.layers import BatchNormAct2d, ClassifierHead, create_conv2d
from timm.models.resnetv2 import ResNetV2

import flatscan


def tiny_resnetv2(linear_head: bool = False, global_pool: str = "avg", **kwargs: object) -> ResNetV2:
    """Widths 8, 8, 8, 16 (two blocks in the last stage), BatchNorm and plain convs as timm's resnetv2_50."""
    kwargs = {"conv_layer": create_conv2d, "norm_layer": BatchNormAct2d, "stem_chs": 8, **kwargs}
    model = ResNetV2([1, 1, 1, 2], channels=(8, 8, 8, 16), num_classes=CLASSES, global_pool=global_pool, **kwargs)
    if linear_head:
        model.head = ClassifierHead(model.num_features, CLASSES, pool_type=global_pool)
    return model


MODELS = {
    # resnetv2_50: pre-activation bottlenecks, conv3 + identity shortcut, then norm (BN + ReLU).
    "preact_bottleneck": ({}, "stages.3.blocks.1.conv3", "relu"),
    # resnetv2_18d / 34d: pre-activation basic blocks, deep stem, avg-down shortcuts, SiLU.
    "preact_basic": (
        {"basic": True, "bottle_ratio": 1.0, "stem_type": "deep", "avg_down": True, "act_layer": "silu"},
        "stages.3.blocks.1.conv2",
        "silu",
    ),
    # preact=False: ResNet-style bottleneck, conv3 -> norm3, + shortcut, act3.
    "bottleneck": ({"preact": False}, "stages.3.blocks.1.conv3", "relu"),
}


@pytest.mark.parametrize("linear_head", [False, True], ids=["conv_classifier", "linear_classifier"])
@pytest.mark.parametrize("name", MODELS)
def test_resnetv2_matches_autograd(name: str, linear_head: bool) -> None:
    kwargs, feature_layer, activation = MODELS[name]
    head = assert_matches_autograd(tiny_resnetv2(linear_head=linear_head, **kwargs), "resnetv2", size=32)
    assert head.feature_layer == feature_layer
    assert head.activation.name == activation


def test_pretrained_layout_is_described() -> None:
    model = timm.create_model("resnetv2_50", num_classes=CLASSES)
    head = flatscan.describe(model)
    assert head.feature_layer == "stages.3.blocks.2.conv3"
    assert head.channel_scale.shape == (2048,)


REFUSALS = {
    # weight-standardised convs without the BiT adapter's handling (GroupNorm tails: test_coupled_tails).
    "bit_std_conv": (lambda: tiny_resnetv2(conv_layer=timm.layers.StdConv2d), "transforms its weight"),
    "max_pool": (lambda: tiny_resnetv2(global_pool="max"), "not a global average"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)
