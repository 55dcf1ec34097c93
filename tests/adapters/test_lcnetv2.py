"""LCNetV2: pool, then conv_head (1x1, no norm) -> act2 -> classifier, with L = 1."""

from __future__ import annotations

from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models.lcnetv2 import LCNetV2


def tiny_lcnetv2(**kwargs: object) -> LCNetV2:
    kwargs = {"num_classes": CLASSES, "scale": 0.1, "depths": (1, 1, 1, 1), "head_hidden_size": 16, **kwargs}
    return LCNetV2(**kwargs)


def test_lcnetv2_matches_autograd() -> None:
    head = assert_matches_autograd(tiny_lcnetv2(), "lcnetv2", size=32)
    assert head.feature_layer == "conv_head"
    assert head.activation.name == "relu"


def test_no_head_conv_is_refused() -> None:
    assert_refused(tiny_lcnetv2(head_hidden_size=None), "conv_head is missing")


def test_max_pool_is_refused() -> None:
    assert_refused(tiny_lcnetv2(global_pool="max"), "not a global average")
