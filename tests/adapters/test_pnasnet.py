"""PNASNet-5 Large: cell_11's last branch (point-wise conv -> bn_sep_2, + the cell's right input) feeds the last
channels of the concatenated cell output -> ReLU -> GAP -> Linear."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.layers import ConvNormAct
from timm.layers.classifier import create_classifier
from timm.models.pnasnet import Cell, CellStem0, PNASNet5Large
from torch import nn

# PNASNet5Large's cells, in units of its 54 channels: (left in, left out, right in, right out, match_prev, reduction).
# The stem cell's left input is the stem itself.
CELLS = {
    "cell_stem_1": (None, 2, 5, 2, True, True),
    "cell_0": (5, 4, 10, 4, True, False),
    "cell_1": (10, 4, 20, 4, False, False),
    "cell_2": (20, 4, 20, 4, False, False),
    "cell_3": (20, 4, 20, 4, False, False),
    "cell_4": (20, 8, 20, 8, False, True),
    "cell_5": (20, 8, 40, 8, True, False),
    "cell_6": (40, 8, 40, 8, False, False),
    "cell_7": (40, 8, 40, 8, False, False),
    "cell_8": (40, 16, 40, 16, False, True),
    "cell_9": (40, 16, 80, 16, True, False),
    "cell_10": (80, 16, 80, 16, False, False),
    "cell_11": (80, 16, 80, 16, False, False),
}


def tiny_pnasnet(unit: int = 1, stem: int = 8, **kwargs: object) -> PNASNet5Large:
    """PNASNet5Large (whose widths timm hard-codes) with every cell rebuilt ``unit`` instead of 54 channels wide."""
    with torch.device("meta"):
        model = PNASNet5Large(num_classes=CLASSES, **kwargs)
    model.conv_0 = ConvNormAct(
        3, stem, kernel_size=3, stride=2, padding=0, norm_layer=partial(nn.BatchNorm2d, eps=0.001), apply_act=False
    )
    model.cell_stem_0 = CellStem0(stem, unit, stem, unit, pad_type="same")
    for name, (left_in, left_out, right_in, right_out, match, reduction) in CELLS.items():
        cell = Cell(
            stem if left_in is None else left_in * unit,
            left_out * unit,
            right_in * unit,
            right_out * unit,
            pad_type="same",
            match_prev_layer_dims=match,
            is_reduction=reduction,
        )
        setattr(model, name, cell)
    model.num_features = 80 * unit
    model.global_pool, model.head_drop, model.last_linear = create_classifier(
        model.num_features, model.num_classes, pool_type=model.global_pool.pool_type, drop_rate=0.0
    )
    return model


def test_pnasnet_matches_autograd() -> None:
    head = assert_matches_autograd(tiny_pnasnet(), "pnasnet", size=40)
    assert head.feature_layer == "cell_11.comb_iter_4_left.separable_2.pointwise_conv2d"
    assert head.channels == slice(64, 80)
    assert head.activation.name == "relu"


def pruned() -> PNASNet5Large:
    model = tiny_pnasnet()
    model.prune_intermediate_layers(indices=[2])
    return model


REFUSALS = {
    "pruned": (pruned, "cell_11 was pruned"),
    "max_pool": (partial(tiny_pnasnet, global_pool="max"), "not a global average"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason, size=40)
