"""LowFormer: in_conv (1x1 conv -> BatchNorm -> hard-swish) -> GAP -> Linear, LayerNorm, act -> Linear."""

from __future__ import annotations

from functools import partial

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models.lowformer import LowFormer

tiny_lowformer = partial(
    LowFormer, width_list=[4, 8, 8, 16, 16], depth_list=[0, 1, 1, 1, 1], head_widths=(24, 20), num_classes=CLASSES
)


@pytest.mark.parametrize("attn", [True, False])
def test_lowformer_matches_autograd(attn: bool) -> None:
    head = assert_matches_autograd(tiny_lowformer(attn=attn), "lowformer", size=32)
    assert head.feature_layer == "in_conv.conv"
    assert head.activation.name == "hardswish"
    assert (head.head_type, head.classifier) == ("general", "classifier")


def without_head_conv() -> LowFormer:
    model = tiny_lowformer()
    model.reset_classifier(CLASSES, reset_other=True)
    return model


REFUSALS = {
    "no_head_conv": (without_head_conv, "in_conv was removed"),
    "max_pool": (partial(tiny_lowformer, global_pool="max"), "not a global average"),
    "no_classifier": (partial(tiny_lowformer, num_classes=0), "not a Linear classifier"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)
