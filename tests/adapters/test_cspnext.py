"""CspNext: the last CSP layer's final_conv (1x1 conv, BatchNorm, SiLU) after its eSE attention -> GAP -> Linear."""

from __future__ import annotations

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models.cspnext import CspNext


def tiny_cspnext(**kwargs: object) -> CspNext:
    return CspNext(num_classes=CLASSES, depths=(1, 1, 1, 1), channels=(8, 8, 16, 16), **kwargs)


@pytest.mark.parametrize("channel_attention", [True, False], ids=["ese", "no_attention"])
def test_cspnext_matches_autograd(channel_attention: bool) -> None:
    head = assert_matches_autograd(tiny_cspnext(channel_attention=channel_attention), "cspnext", size=32)
    assert head.feature_layer == "stages.3.2.final_conv.conv"
    assert head.activation.name == "silu"


def test_max_pool_is_refused() -> None:
    assert_refused(tiny_cspnext(global_pool="max"), "not a global average")
