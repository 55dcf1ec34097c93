"""RepGhostNet: pool, then conv_head on the pooled vector (L = 1), as GhostNet; as built and reparameterised."""

from __future__ import annotations

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused, prepare
from timm.layers import Linear
from timm.models.repghost import RepGhostNet
from timm.utils import reparameterize_model
from torch import nn

CFGS = [[[3, 8, 8, 0, 1]], [[3, 16, 16, 0.25, 2]], [[3, 24, 16, 0, 1]]]


def tiny_repghostnet(**kwargs: object) -> RepGhostNet:
    """RepGhostNet with tiny stages; its conv_head (hard-coded 1280 wide) replaced by a 24-wide one."""
    model = RepGhostNet(CFGS, num_classes=CLASSES, **kwargs)
    model.conv_head = nn.Conv2d(model.num_features, 24, 1)
    model.classifier = Linear(24, CLASSES)
    return model


@pytest.mark.parametrize("reparameterise", [False, True])
def test_repghostnet_matches_autograd(reparameterise: bool) -> None:
    model = reparameterize_model(prepare(tiny_repghostnet())) if reparameterise else tiny_repghostnet()
    head = assert_matches_autograd(model, "repghostnet")
    assert (head.feature_layer, head.activation.name, head.classifier) == ("conv_head", "relu", "classifier")


def pruned() -> RepGhostNet:
    model = tiny_repghostnet()
    model.prune_intermediate_layers(indices=1)
    return model


REFUSALS = {
    "no_conv_head": (pruned, "conv_head is missing"),
    "max_pool": (lambda: tiny_repghostnet(global_pool="max"), "not a global average"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)
