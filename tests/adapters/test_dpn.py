"""DPN: the '-b' layout's last c1x1_c2 feeds the last inc pooled channels through conv5_bn_ac; others refused."""

from __future__ import annotations

from functools import partial

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models.dpn import DPN

tiny_dpn = partial(
    DPN,
    k_sec=(1, 1, 1, 2),
    inc_sec=(2, 2, 2, 4),
    k_r=8,
    groups=2,
    num_init_features=8,
    small=True,
    b=True,
    num_classes=CLASSES,
)


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_dpn_b_matches_autograd(act: str) -> None:
    head = assert_matches_autograd(tiny_dpn(act_layer=act), "dpn", size=32)
    assert head.feature_layer == "features.conv5_2.c1x1_c2"
    assert head.activation.name == act
    # 512 residual channels + 3 * 4 dense channels + 4 more: the last 4 of 528 pooled channels.
    assert head.channels == slice(524, 528)
    assert head.channel_scale.shape == (4,)


REFUSALS = {
    # The plain layout's c1x1_c feeds pooled channels at both ends of the concatenation.
    "plain_layout": (partial(tiny_dpn, b=False), "not one contiguous block of channels"),
    "tanh": (partial(tiny_dpn, act_layer="tanh"), "without closed-form derivatives"),
    "max_pool": (partial(tiny_dpn, global_pool="max"), "not a global average"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)
