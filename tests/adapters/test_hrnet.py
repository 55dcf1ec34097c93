"""HRNet: final_layer (1x1 conv -> BatchNorm -> ReLU) after the summed resolution branches, GAP -> Linear."""

from __future__ import annotations

from functools import partial

import pytest
import timm
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models.hrnet import HighResolutionNet
from torch import nn

WIDTH = 3


def narrow_hrnet() -> HighResolutionNet:
    """hrnet_w18_small with final_layer narrowed from 2048 to WIDTH channels (timm hard-codes the head widths)."""
    model = timm.create_model("hrnet_w18_small", num_classes=CLASSES)
    model.final_layer = nn.Sequential(nn.Conv2d(1024, WIDTH, 1), nn.BatchNorm2d(WIDTH), nn.ReLU(inplace=True))
    model.classifier = nn.Linear(WIDTH, CLASSES)
    return model


def test_hrnet_matches_autograd() -> None:
    head = assert_matches_autograd(narrow_hrnet(), "hrnet", size=64)
    assert head.feature_layer == "final_layer.0"
    assert head.activation.name == "relu"


REFUSALS = {
    "feature_head": (partial(timm.create_model, "hrnet_w18_small", head="incre"), "final_layer is missing"),
    "max_pool": (partial(timm.create_model, "hrnet_w18_small", global_pool="max"), "not a global average"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason, size=64)
