"""DLA: the last tree root's 1x1 conv, its BatchNorm [+ first child], ReLU; GAP -> 1x1-conv classifier."""

from __future__ import annotations

from functools import partial

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models.dla import DLA, DlaBasic, DlaBottle2neck, DlaBottleneck
from torch import nn


def tiny_dla(
    levels: tuple[int, ...] = (1, 1, 1, 1, 1, 2), channels: tuple[int, ...] = (4, 4, 4, 4, 4, 6), **kwargs: object
) -> DLA:
    kwargs = {"block": DlaBasic, "num_classes": CLASSES, **kwargs}
    return DLA(levels, channels, **kwargs)  # type: ignore[arg-type]


MODELS = {
    # DLA-34 layout (basic blocks); level5 of two levels: the root sits in level5.tree2.
    "basic": (partial(tiny_dla), "level5.tree2.root.conv"),
    # DLA-60 / DLA-X layouts (bottlenecks, grouped), root shortcut (a constant residual), one-level level5.
    "bottleneck_shortcut_root": (
        partial(tiny_dla, levels=(1, 1, 1, 1, 1, 1), block=DlaBottleneck, shortcut_root=True),
        "level5.root.conv",
    ),
    "res2net_blocks": (
        partial(
            tiny_dla,
            levels=(1, 1, 1, 1, 1, 1),
            channels=(4, 4, 8, 8, 8, 8),
            block=DlaBottle2neck,
            cardinality=2,
            base_width=16,
        ),
        "level5.root.conv",
    ),
}


@pytest.mark.parametrize("name", MODELS)
def test_dla_matches_autograd(name: str) -> None:
    build, feature_layer = MODELS[name]
    head = assert_matches_autograd(build(), "dla", size=64)
    assert head.feature_layer == feature_layer
    assert head.activation.name == "relu"
    assert head.classifier == "fc" and isinstance(build().fc, nn.Conv2d)


REFUSALS = {
    "max_pool": (partial(tiny_dla, global_pool="max"), "not a global average"),
    "no_classifier": (partial(tiny_dla, num_classes=0), "not a Linear classifier"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason, size=64)
