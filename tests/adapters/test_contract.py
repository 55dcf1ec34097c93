"""Shared checks of the family adapters (adapters/_common.py) and the helper the family tests use."""

from __future__ import annotations

import pytest
from helpers.adapters import CLASSES, tiny_vgg
from timm.layers import BlurPool2d, ConvNormAct, ScaledStdConv2d
from torch import nn

import flatscan


def test_weight_standardised_feature_layer_is_refused() -> None:
    model = tiny_vgg()
    model.pre_logits.fc2 = ScaledStdConv2d(24, 24, 1)
    with pytest.raises(flatscan.UnsupportedModel, match="transforms its weight"):
        flatscan.describe(model)


def test_activation_without_closed_form_is_refused() -> None:
    model = tiny_vgg()
    model.pre_logits.act2 = nn.Sequential(nn.ReLU(), nn.ReLU())
    with pytest.raises(flatscan.UnsupportedModel, match="Sequential"):
        flatscan.describe(model)


def test_anti_aliased_conv_norm_act_is_refused() -> None:
    from timm.models.rexnet import RexNet

    model = RexNet(num_classes=CLASSES, width_mult=0.1, initial_chs=4, final_chs=16, depth_mult=0.2)
    last = model.features[-1]
    model.features[-1] = ConvNormAct(last.in_channels, last.out_channels, stride=2, aa_layer=BlurPool2d)
    with pytest.raises(flatscan.UnsupportedModel, match="blurs and subsamples"):
        flatscan.describe(model)
