"""NASNet-A Large: cell_17's last branch (point-wise conv -> bn_sep_2, + the cell's right input) feeds the last
channels of the concatenated cell output -> ReLU -> GAP -> Linear."""

from __future__ import annotations

from functools import partial

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models.nasnet import NASNetALarge

# 96 features: channels = 96 // 24 = 4, the last cell's branches are 4 * 4 = 16 wide.
tiny_nasnet = partial(NASNetALarge, num_classes=CLASSES, stem_size=8, num_features=96)


def test_nasnet_matches_autograd() -> None:
    head = assert_matches_autograd(tiny_nasnet(), "nasnet", size=40)
    assert head.feature_layer == "cell_17.comb_iter_4_left.separable_2.pointwise_conv2d"
    assert head.channels == slice(80, 96)
    assert head.activation.name == "relu"


def pruned() -> NASNetALarge:
    model = tiny_nasnet()
    model.prune_intermediate_layers(indices=[2])
    return model


REFUSALS = {
    "pruned": (pruned, "cell_17 was pruned"),
    "max_pool": (partial(tiny_nasnet, global_pool="max"), "not a global average"),
    "no_classifier": (partial(tiny_nasnet, num_classes=0), "not a Linear classifier"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason, size=40)
