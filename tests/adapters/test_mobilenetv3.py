"""MobileNetV3-class models (V3, V4, LCNet, FBNetV3) and GhostNet: pool, then conv_head on the pooled vector."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.layers import Linear
from timm.models._efficientnet_blocks import SqueezeExcite
from timm.models._efficientnet_builder import decode_arch_def
from timm.models.ghostnet import GhostNet
from timm.models.mobilenetv3 import MobileNetV3
from torch import nn

HARD_SE = partial(SqueezeExcite, gate_layer="hard_sigmoid", force_act_layer=nn.ReLU)


def mobilenet(arch: list[list[str]], **kwargs: object) -> MobileNetV3:
    kwargs = {"num_classes": CLASSES, "stem_size": 8, "num_features": 32, **kwargs}
    return MobileNetV3(decode_arch_def(arch), **kwargs)


V3_ARCH = [["ds_r1_k3_s1_e1_c8_nre"], ["ir_r1_k3_s2_e3_c16_se0.25"], ["cn_r1_k1_s1_c24"]]
# Universal inverted residual blocks (ExtraDW, ConvNeXt-like) as in MobileNetV4-Conv.
V4_ARCH = [["er_r1_k3_s2_e2_c8"], ["uir_r1_a3_k5_s2_e2_c16", "uir_r1_a0_k3_s1_e2_c16"], ["cn_r1_k1_s1_c24"]]
LCNET_ARCH = [["dsa_r1_k3_s1_c8"], ["dsa_r1_k3_s2_c16"], ["dsa_r1_k5_s2_c24_se0.25"]]


def tiny_ghostnet(version: str) -> GhostNet:
    """GhostNet with tiny stages; its conv_head (hard-coded 1280 wide) replaced by a 24-wide one."""
    cfgs = [[[3, 8, 8, 0, 1]], [[3, 16, 16, 0.25, 2]], [[3, 24, 16, 0, 1]]]
    model = GhostNet(cfgs, num_classes=CLASSES, version=version)
    model.conv_head = nn.Conv2d(model.num_features, 24, 1)
    model.classifier = Linear(24, CLASSES)
    return model


MODELS: dict[str, tuple[Callable[[], nn.Module], str, str]] = {
    # conv_head (bias) -> act2, hard-swish and ReLU.
    "mobilenetv3": (partial(mobilenet, V3_ARCH, act_layer=nn.Hardswish, se_layer=HARD_SE), "mobilenetv3", "hardswish"),
    "mobilenetv3_relu": (partial(mobilenet, V3_ARCH), "mobilenetv3", "relu"),
    # FBNetV3: conv_head without bias.
    "fbnetv3": (partial(mobilenet, V3_ARCH, act_layer=nn.Hardswish, head_bias=False), "mobilenetv3", "hardswish"),
    # MobileNetV4: conv_head -> norm_head (BatchNormAct2d), act2 Identity.
    "mobilenetv4": (partial(mobilenet, V4_ARCH, head_norm=True, head_bias=False), "mobilenetv3", "relu"),
    "mobilenetv4_hybrid_act": (
        partial(mobilenet, V4_ARCH, head_norm=True, head_bias=False, act_layer=nn.GELU),
        "mobilenetv3",
        "gelu",
    ),
    "lcnet": (partial(mobilenet, LCNET_ARCH, act_layer=nn.Hardswish, se_layer=HARD_SE), "mobilenetv3", "hardswish"),
    "ghostnet": (partial(tiny_ghostnet, "v1"), "ghostnet", "relu"),
    "ghostnetv2": (partial(tiny_ghostnet, "v2"), "ghostnet", "relu"),
    "ghostnetv3": (partial(tiny_ghostnet, "v3"), "ghostnet", "relu"),
}


@pytest.mark.parametrize("name", MODELS)
def test_pooled_conv_head_matches_autograd(name: str) -> None:
    build, family, activation = MODELS[name]
    head = assert_matches_autograd(build(), family)
    assert head.feature_layer == "conv_head"
    assert head.activation.name == activation


def pruned() -> MobileNetV3:
    model = mobilenet(V3_ARCH)
    model.prune_intermediate_layers(indices=1)
    return model


def stacked_activations() -> MobileNetV3:
    model = mobilenet(V4_ARCH, head_norm=True, head_bias=False)
    model.act2 = nn.ReLU()
    return model


REFUSALS = {
    "no_conv_head": (pruned, "conv_head is missing"),
    "max_pool": (partial(mobilenet, V3_ARCH, global_pool="max"), "not a global average"),
    "no_classifier": (partial(mobilenet, V3_ARCH, num_classes=0), "not a Linear classifier"),
    "norm_then_act2": (stacked_activations, "one after the other"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)
