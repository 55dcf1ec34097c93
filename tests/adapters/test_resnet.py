"""ResNet-class block endings beyond Bottleneck / BasicBlock: SK-ResNet (ConvNormAct + act), Res2Net (Bottle2neck)."""

from __future__ import annotations

from functools import partial

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.layers import SEModule
from timm.models.res2net import Bottle2neck
from timm.models.resnet import ResNet
from timm.models.sknet import SelectiveKernelBasic, SelectiveKernelBottleneck
from torch import nn


def tiny_resnet(block: type[nn.Module], **kwargs: object) -> ResNet:
    kwargs = {"channels": (4, 4, 4, 8), "stem_width": 8, "num_classes": CLASSES, **kwargs}
    return ResNet(block, (1, 1, 1, 2), **kwargs)  # type: ignore[arg-type]


MODELS = {
    # skresnet18 / 34: SelectiveKernel conv1, then conv2 = ConvNormAct without activation, + shortcut, act.
    "skresnet_basic": (
        partial(tiny_resnet, SelectiveKernelBasic, block_args={"sk_kwargs": {"rd_divisor": 2}}),
        "layer4.1.conv2.conv",
        "relu",
    ),
    # skresnext50: bottleneck ending in conv3 = ConvNormAct (no activation), + shortcut, act; SiLU here (smooth).
    "skresnext_bottleneck": (
        partial(
            tiny_resnet,
            SelectiveKernelBottleneck,
            cardinality=2,
            base_width=64,
            act_layer=nn.SiLU,
            block_args={"sk_kwargs": {"rd_divisor": 2}},
        ),
        "layer4.1.conv3.conv",
        "silu",
    ),
    # Res2Net: one ReLU module reused in the block; the pre-activation is read after it, at the pool's input.
    "res2net": (partial(tiny_resnet, Bottle2neck, base_width=26, block_args={"scale": 4}), "layer4.1.conv3", "relu"),
    "res2next_deep_stem": (
        partial(
            tiny_resnet,
            Bottle2neck,
            base_width=16,
            cardinality=2,
            stem_type="deep",
            avg_down=True,
            block_args={"scale": 2},
        ),
        "layer4.1.conv3",
        "relu",
    ),
}


@pytest.mark.parametrize("name", MODELS)
def test_resnet_block_endings_match_autograd(name: str) -> None:
    build, feature_layer, activation = MODELS[name]
    head = assert_matches_autograd(build(), "resnet", size=32)
    assert head.feature_layer == feature_layer
    assert head.activation.name == activation


REFUSALS = {
    # Res2Net's reused activation can only be read after itself, which is exact for ReLU alone.
    "res2net_silu": (
        partial(tiny_resnet, Bottle2neck, base_width=26, act_layer=nn.SiLU, block_args={"scale": 4}),
        "exact only for ReLU",
    ),
    "res2net_se": (
        partial(tiny_resnet, Bottle2neck, base_width=26, block_args={"scale": 4, "attn_layer": SEModule}),
        "gates the feature layer's output",
    ),
    "skresnet_se": (
        partial(tiny_resnet, SelectiveKernelBasic, block_args={"sk_kwargs": {"rd_divisor": 2}, "attn_layer": "se"}),
        "gates the feature layer's output",
    ),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)
