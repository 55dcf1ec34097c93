"""Xception (legacy) and XceptionAligned (plain and pre-activation): the last separable conv's pointwise conv."""

from __future__ import annotations

from functools import partial

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models.xception import SeparableConv2d, Xception
from timm.models.xception_aligned import XceptionAligned
from torch import nn


def tiny_xception() -> Xception:
    """timm hard-codes Xception's widths; the exit flow is narrowed to 1024 -> 8 -> 6 channels."""
    model = Xception(num_classes=CLASSES)
    model.conv3, model.bn3 = SeparableConv2d(1024, 8, 3, 1, 1), nn.BatchNorm2d(8)
    model.conv4, model.bn4 = SeparableConv2d(8, 6, 3, 1, 1), nn.BatchNorm2d(6)
    model.fc = nn.Linear(6, CLASSES)
    return model


def tiny_xception_aligned(last: dict[str, object] | None = None, **kwargs: object) -> XceptionAligned:
    """The stem (64 channels, fixed), one strided module and an exit module ending in 6 channels."""
    block_cfg = [
        {"in_chs": 64, "out_chs": 8, "stride": 2},
        {"in_chs": 8, "out_chs": (8, 8, 6), "stride": 1, "no_skip": True, "start_with_relu": False, **(last or {})},
    ]
    if kwargs.get("preact"):
        del block_cfg[-1]["start_with_relu"]  # PreXceptionModule always starts with its norm + activation
    return XceptionAligned(block_cfg, num_classes=CLASSES, **kwargs)  # type: ignore[arg-type]


MODELS = {
    "legacy": (tiny_xception, "xception", "conv4.pointwise", "relu"),
    # xception41/65/71: the exit module activates after bn_pw (no skip, start_with_relu=False).
    "aligned": (tiny_xception_aligned, "xception_aligned", "blocks.1.stack.conv3.conv_pw", "relu"),
    # start_with_relu and a skip: conv_pw -> bn_pw + shortcut, no activation after it (identity).
    "aligned_residual_identity": (
        partial(tiny_xception_aligned, {"no_skip": False, "start_with_relu": True, "out_chs": (8, 8, 8)}),
        "xception_aligned",
        "blocks.1.stack.conv3.conv_pw",
        "identity",
    ),
    # xception41p/65p: pre-activation modules, conv_pw [+ shortcut] -> act (SiLU here, smooth).
    "aligned_preact": (
        partial(tiny_xception_aligned, {"no_skip": False}, preact=True, act_layer=nn.SiLU),
        "xception_aligned",
        "blocks.1.stack.conv3.conv_pw",
        "silu",
    ),
}


@pytest.mark.parametrize("name", MODELS)
def test_xception_matches_autograd(name: str) -> None:
    build, family, feature_layer, activation = MODELS[name]
    head = assert_matches_autograd(build(), family, size=32)
    assert head.feature_layer == feature_layer
    assert head.activation.name == activation


def pruned_aligned() -> XceptionAligned:
    model = tiny_xception_aligned()
    model.prune_intermediate_layers(indices=[0], prune_head=False)  # ends at blocks.0's tap: stack.conv3 removed
    return model


REFUSALS = {
    # An activated exit module with a skip: ReLU, then the residual add, with nothing after it.
    "activation_before_add": (
        partial(tiny_xception_aligned, {"no_skip": False, "out_chs": (8, 8, 8)}),
        "before blocks.1's residual add",
    ),
    "max_pool": (partial(tiny_xception_aligned, global_pool="max"), "not a global average"),
    "legacy_no_classifier": (lambda: Xception(num_classes=0), "not a Linear classifier"),
    "pruned": (pruned_aligned, "blocks.0.stack.conv3 is Identity, not a SeparableConv2d"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)
