"""TResNet: the last Bottleneck's conv3 + BatchNorm, + shortcut, ReLU (legacy SENet: test_coupled_tails)."""

from __future__ import annotations

from functools import partial

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models.tresnet import TResNet

import flatscan

# planes = int(64 * width_factor) = 2: the last stage's conv3 maps 16 to 64 channels.
tiny_tresnet = partial(TResNet, (1, 1, 1, 1), num_classes=CLASSES, width_factor=2 / 64)


def test_tresnet_matches_autograd() -> None:
    head = assert_matches_autograd(tiny_tresnet(), "tresnet", size=64)
    assert head.feature_layer == "body.layer4.0.conv3.conv"
    assert head.activation.name == "relu"


def test_tresnet_v2_has_the_same_ending() -> None:
    # v2 (Bottleneck blocks in every stage) rounds widths to multiples of 8, too wide for a full Hessian.
    model = tiny_tresnet(v2=True, width_factor=8 / 64)
    head = flatscan.describe(model)
    assert head.feature_layer == "body.layer4.0.conv3.conv" and head.channel_scale.shape == (256,)


def pruned_tresnet() -> TResNet:
    model = tiny_tresnet()
    model.prune_intermediate_layers(indices=[2], prune_head=False)
    return model


REFUSALS = {
    "max_pool": (partial(tiny_tresnet, global_pool="max"), "not a global average"),
    "pruned": (pruned_tresnet, "has no body.layer4"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason, size=64)
