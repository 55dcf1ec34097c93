"""EfficientNet-class variants: MNASNet, SPNASNet, EfficientNet-V2/X/Edge/CondConv, MixNet, FBNet, Lite, MobileNetV1.

The real timm generators where the head width can be shrunk; the variant's block string otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models import efficientnet as E
from timm.models._efficientnet_builder import decode_arch_def
from timm.models.efficientnet import EfficientNet
from torch import nn


def from_blocks(arch: list[list[str]], **kwargs: object) -> EfficientNet:
    """A tiny EfficientNet made of a variant's block types, with a 16-wide conv_head."""
    kwargs = {"num_classes": CLASSES, "stem_size": 8, "num_features": 16, **kwargs}
    return EfficientNet(decode_arch_def(arch), **kwargs)


TINY = {"num_classes": CLASSES}
MODELS: dict[str, tuple[Callable[[], nn.Module], str, str]] = {
    "mnasnet_b1": (partial(E._gen_mnasnet_b1, "mnasnet_100", 0.1, num_features=8, **TINY), "conv_head", "relu"),
    "semnasnet_a1": (partial(E._gen_mnasnet_a1, "semnasnet_100", 0.1, num_features=8, **TINY), "conv_head", "relu"),
    "mnasnet_small": (partial(E._gen_mnasnet_small, "mnasnet_small", 0.1, num_features=8, **TINY), "conv_head", "relu"),
    "spnasnet": (partial(E._gen_spnasnet, "spnasnet_100", 0.1, num_features=8, **TINY), "conv_head", "relu"),
    # TF ports: 'SAME' padding everywhere, BatchNorm eps 1e-3.
    "tf_efficientnet": (
        partial(E._gen_efficientnet, "tf_efficientnet_b0", 0.02, 0.1, pad_type="same", bn_eps=1e-3, **TINY),
        "conv_head",
        "silu",
    ),
    "efficientnetv2_rw_t": (
        partial(E._gen_efficientnetv2_s, "efficientnetv2_rw_t", 0.02, 0.1, **TINY),
        "conv_head",
        "silu",
    ),
    "tf_efficientnetv2_b0": (
        partial(E._gen_efficientnetv2_base, "tf_efficientnetv2_b0", 0.02, 0.1, pad_type="same", **TINY),
        "conv_head",
        "silu",
    ),
    "efficientnet_x": (partial(E._gen_efficientnet_x, "efficientnet_x_b3", 0.02, 0.1, **TINY), "conv_head", "silu"),
    "efficientnet_edge": (partial(E._gen_efficientnet_edge, "efficientnet_es", 0.02, 0.1, **TINY), "conv_head", "relu"),
    "efficientnet_condconv": (
        partial(E._gen_efficientnet_condconv, "efficientnet_cc_b0_4e", 0.02, 0.1, **TINY),
        "conv_head",
        "silu",
    ),
    # MixNet: mixed depth-wise kernels and grouped point-wise convs in the blocks.
    "mixnet": (
        partial(
            from_blocks, [["ds_r1_k3_s1_e1_c8"], ["ir_r1_k3.5.7_a1.1_p1.1_s2_e3_c16_se0.5_nsw"]], act_layer=nn.SiLU
        ),
        "conv_head",
        "silu",
    ),
    "fbnetc": (
        partial(from_blocks, [["ir_r1_k3_s1_e1_c8"], ["ir_r1_k5_s2_e6_c16", "ir_r1_k3_s1_e1_c16"]]),
        "conv_head",
        "relu",
    ),
    "efficientnet_lite": (
        partial(from_blocks, [["ds_r1_k3_s1_e1_c8"], ["ir_r1_k5_s2_e6_c16"]], act_layer=nn.ReLU6),
        "conv_head",
        "relu6",
    ),
    # MobileNetV1: no conv_head; the last block's conv_pw -> bn2 (+ ReLU6), no skip.
    "mobilenetv1": (partial(E._gen_mobilenet_v1, "mobilenetv1_100", 0.1, **TINY), "blocks.4.1.conv_pw", "relu6"),
    # No conv_head and a last InvertedResidual with a skip: v = bn3(conv_pwl) + shortcut, pooled as is.
    "no_head_inverted_residual": (
        partial(from_blocks, [["ds_r1_k3_s1_e1_c8"], ["ir_r2_k3_s2_e2_c16"]], num_features=0),
        "blocks.1.1.conv_pwl",
        "identity",
    ),
}


@pytest.mark.parametrize("name", MODELS)
def test_efficientnet_variant_matches_autograd(name: str) -> None:
    build, feature_layer, activation = MODELS[name]
    head = assert_matches_autograd(build(), "efficientnet")
    assert head.feature_layer == feature_layer
    assert head.activation.name == activation


def act_before_skip() -> EfficientNet:
    model = from_blocks([["ds_r1_k3_s1_e1_c8"], ["ds_r2_k3_s2_e1_c16"]], num_features=0)
    model.blocks[1][1].bn2.act = nn.ReLU()
    return model


REFUSALS = {
    "act_before_skip": (act_before_skip, "before the residual add"),
    "no_head_conv_block": (
        partial(from_blocks, [["ds_r1_k3_s1_e1_c8"], ["cn_r1_k3_s2_c16"]], num_features=0),
        "ConvBnAct",
    ),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)
