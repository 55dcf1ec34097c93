"""RegNet X/Y/Z/V: the last block's conv3 and its BatchNorm, + shortcut, act3 / final_conv; or final_conv."""

from __future__ import annotations

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models.regnet import RegNet, RegNetCfg
from torch import nn


def tiny_regnet(global_pool: str = "avg", **kwargs: object) -> RegNet:
    """Stages of widths 8, 16, 24, 32 (two blocks in the last, bottleneck 8 wide); kwargs override the RegNetCfg."""
    defaults = {"depth": 6, "w0": 8, "wa": 8.0, "wm": 1.5, "group_size": 4, "bottle_ratio": 0.25, "stem_width": 8}
    cfg = RegNetCfg(**{**defaults, **kwargs})
    return RegNet(cfg, num_classes=CLASSES, global_pool=global_pool)


MODELS = {
    # RegNetX: conv3 + bn, + identity shortcut, ReLU.
    "regnetx": ({}, "s4.b2.conv3.conv", "relu"),
    # One block in the last stage: its shortcut is a strided 1x1 conv + BatchNorm.
    "regnetx_conv_shortcut": ({"depth": 5}, "s4.b1.conv3.conv", "relu"),
    # RegNetY: SE on conv2's output, before conv3.
    "regnety": ({"se_ratio": 0.25}, "s4.b2.conv3.conv", "relu"),
    # RegNetZ: no shortcut, linear block output, 1x1 ConvNormAct final_conv (num_features).
    "regnetz_final_conv": (
        {"downsample": None, "linear_out": True, "num_features": 16, "act_layer": "silu", "se_ratio": 0.25},
        "final_conv.conv",
        "silu",
    ),
    # linear_out without num_features: final_conv is the activation after the block.
    "regnetz_linear_out": ({"downsample": None, "linear_out": True, "act_layer": "silu"}, "s4.b2.conv3.conv", "silu"),
    # RegNetV (pre-activation blocks): conv3 without a norm after it, final_conv is the activation.
    "regnetv": ({"preact": True, "se_ratio": 0.25, "act_layer": "silu"}, "s4.b2.conv3", "silu"),
    # GroupNorm (one group) in place of every BatchNorm: the last conv3's norm couples channels before the add.
    "regnetx_groupnorm": ({"norm_layer": "groupnorm1"}, "s4.b2.conv3.conv", "relu"),
}


@pytest.mark.parametrize("name", MODELS)
def test_regnet_matches_autograd(name: str) -> None:
    kwargs, feature_layer, activation = MODELS[name]
    head = assert_matches_autograd(tiny_regnet(**kwargs), "regnet")
    assert head.feature_layer == feature_layer
    assert head.activation.name == activation


def act_before_residual() -> RegNet:
    model = tiny_regnet()
    model.s4.b2.conv3.bn.act = nn.ReLU()
    return model


REFUSALS = {
    "act_before_residual": (act_before_residual, "before the residual add"),
    "max_pool": (lambda: tiny_regnet(global_pool="max"), "not a global average"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)
