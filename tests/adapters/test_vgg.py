"""VGG: pre_logits (ConvMlp) fc2 -> act2 -> GAP -> Linear."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd, tiny_vgg
from timm.layers import ClassifierHead
from timm.models.vgg import VGG, ConvMlp
from torch import nn

import flatscan


def tiny_vgg_bn() -> VGG:
    model = VGG([8, "M", 16], num_classes=CLASSES, norm_layer=nn.BatchNorm2d)
    model.pre_logits = ConvMlp(16, 24, 7)
    model.head.fc = nn.Linear(24, CLASSES)
    return model


def conv_classifier() -> VGG:
    model = tiny_vgg()
    model.head = ClassifierHead(24, CLASSES, use_conv=True)
    return model


@pytest.mark.parametrize(
    ("build", "size"),
    [
        (tiny_vgg, 40),  # 20x20 map: fc1 (7x7) leaves 14x14 positions for fc2
        (tiny_vgg_bn, 40),
        (tiny_vgg, 8),  # 4x4 map: ConvMlp first resizes it to 7x7, so fc2 sees one position
        (conv_classifier, 40),  # timm's use_conv head: a 1x1 conv on the pooled map, measured as Linear
    ],
)
def test_vgg_matches_autograd(build: Callable[[], VGG], size: int) -> None:
    head = assert_matches_autograd(build(), "vgg", size=size)
    assert head.feature_layer == "pre_logits.fc2"


def no_pre_logits() -> VGG:
    model = tiny_vgg()
    model.pre_logits = nn.Identity()
    return model


def leaky_head() -> VGG:
    model = tiny_vgg()
    model.pre_logits.act2 = nn.LeakyReLU(0.2)
    return model


def test_leaky_relu_head_matches_autograd() -> None:
    head = assert_matches_autograd(leaky_head(), "vgg")
    assert head.activation.name == "leaky_relu" and head.activation.negative_slope == 0.2


REFUSALS = {
    "no_pre_logits": (no_pre_logits, "not timm's ConvMlp"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    model = build()
    with pytest.raises(flatscan.UnsupportedModel, match=reason):
        flatscan.describe(model)
