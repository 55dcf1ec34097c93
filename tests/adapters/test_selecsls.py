"""SelecSLS: the last head layer's conv -> BatchNorm -> ReLU, GAP -> Linear."""

from __future__ import annotations

from functools import partial

import pytest
import timm
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models.selecsls import SelecSls, conv_bn
from torch import nn

WIDTH = 8  # enough ReLU channels that some are active for any seed


def narrow_selecsls() -> SelecSls:
    """selecsls42b with its last head layer narrowed from 1024 to WIDTH channels (timm hard-codes the widths)."""
    model = timm.create_model("selecsls42b", num_classes=CLASSES)
    model.head[-1] = conv_bn(model.head[-1][0].in_channels, WIDTH, 1, 1)
    model.fc = nn.Linear(WIDTH, CLASSES)
    return model


def test_selecsls_matches_autograd() -> None:
    head = assert_matches_autograd(narrow_selecsls(), "selecsls", size=64)
    assert head.feature_layer == "head.3.0"
    assert head.activation.name == "relu"


REFUSALS = {
    "max_pool": (partial(timm.create_model, "selecsls42b", global_pool="max"), "not a global average"),
    "no_classifier": (partial(timm.create_model, "selecsls42b", num_classes=0), "not a Linear classifier"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason, size=64)
