"""DenseNet: the last dense layer's conv2 feeds the last growth_rate pooled channels, through norm5 (BN + ReLU)."""

from __future__ import annotations

from functools import partial

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models.densenet import DenseNet

tiny_densenet = partial(DenseNet, growth_rate=4, block_config=(1, 2), bn_size=2, num_classes=CLASSES)


@pytest.mark.parametrize("stem_type", ["", "deep"])
def test_densenet_matches_autograd(stem_type: str) -> None:
    head = assert_matches_autograd(tiny_densenet(stem_type=stem_type), "densenet", size=32)
    assert head.feature_layer == "features.denseblock2.denselayer2.conv2"
    # 8 stem channels + 4, halved by the transition, + 2 layers of 4: the last 4 of 14 pooled channels.
    assert head.channels == slice(10, 14)
    assert head.channel_scale.shape == (4,)


def pruned() -> DenseNet:
    model = tiny_densenet()
    model.prune_intermediate_layers(indices=[1], prune_head=False)
    return model


REFUSALS = {
    "pruned": (pruned, "does not end in a dense block then norm5"),
    "max_pool": (partial(tiny_densenet, global_pool="max"), "not a global average"),
    "no_classifier": (partial(tiny_densenet, num_classes=0), "not a Linear classifier"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)
