"""FasterNet: pool, then conv_head (1x1, no norm) -> act -> classifier, with L = 1."""

from __future__ import annotations

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models.fasternet import FasterNet
from torch import nn


def tiny_fasternet(**kwargs: object) -> FasterNet:
    return FasterNet(num_classes=CLASSES, embed_dim=8, depths=(1, 1, 1, 1), feature_dim=24, **kwargs)


# fasternet_t0/t1 use GELU (the curvature term), the larger ones ReLU.
@pytest.mark.parametrize("act_layer", [nn.GELU, nn.ReLU], ids=["gelu", "relu"])
def test_fasternet_matches_autograd(act_layer: type[nn.Module]) -> None:
    head = assert_matches_autograd(tiny_fasternet(act_layer=act_layer), "fasternet", size=32)
    assert head.feature_layer == "conv_head"
    assert head.activation.name == ("gelu" if act_layer is nn.GELU else "relu")


def test_pruned_head_is_refused() -> None:
    model = tiny_fasternet()
    model.prune_intermediate_layers(indices=1)
    assert_refused(model, "conv_head is missing")
