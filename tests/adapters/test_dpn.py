"""DPN quirks (the contract test covers the '-b' layout): the plain layout's feature conv feeds two blocks of
pooled channels (an index set), checked against autograd; tanh is refused."""

from __future__ import annotations

from functools import partial

import pytest
import timm
import torch
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused, images_and_labels, prepare
from helpers.tiny_models import tiny_dpn
from timm.layers import BatchNormAct2d, get_act_layer
from timm.models.dpn import DPN, DualPathBlock
from torch import nn

import flatscan


def narrow_plain_dpn(act_layer: str = "relu") -> DPN:
    """A plain-layout DPN whose last block is narrow: timm fixes the residual path of conv5 at 512 channels,
    too wide for a full autograd Hessian, so the last block (a 'down' block: it projects its own residual path)
    is rebuilt with a residual path of 8 and 4 dense channels: pooled = cat([8 residual + out1, 8 dense, 4 out2])."""
    model = tiny_dpn(b=False, k_sec=(1, 1, 1, 1), act_layer=act_layer)
    last = model.features.conv5_1
    model.features.conv5_1 = DualPathBlock(last.c1x1_a.conv.in_channels, 8, 8, 8, 4, 2, "down", b=False)
    total = 8 + 3 * 4
    model.features.conv5_bn_ac.bn = BatchNormAct2d(total, eps=1e-3, act_layer=get_act_layer(act_layer))
    model.classifier = nn.Conv2d(total, CLASSES, 1)
    model.num_features = total
    return model


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_plain_layout_feeds_an_index_set_and_matches_autograd(act: str) -> None:
    head = assert_matches_autograd(narrow_plain_dpn(act), "dpn", size=32)
    assert head.feature_layer == "features.conv5_1.c1x1_c.conv"
    assert isinstance(head.channels, torch.Tensor)
    assert head.channels.tolist() == [*range(8), *range(16, 20)]
    assert head.to_dict()["channels"] == "0:8,16:20"
    assert head.channel_scale.shape == (12,)


def test_plain_layout_is_verified_on_a_real_dpn() -> None:
    # dpn68's layout at its real widths (random weights): verify's sampled block traces against autograd HVPs.
    model = prepare(timm.create_model("dpn68", num_classes=CLASSES))
    head = flatscan.describe(model)
    assert head.feature_layer == "features.conv5_3.c1x1_c.conv"
    result = flatscan.verify(model, images_and_labels(size=32, n=2), pairs=8)
    assert result.passed, result


REFUSALS = {
    "tanh": (partial(tiny_dpn, act_layer="tanh"), "without closed-form derivatives"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)
