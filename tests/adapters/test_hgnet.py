"""HGNet / HGNetV2: pool, then head.last_conv (1x1 conv -> ReLU [-> learnable affine]) -> fc, with L = 1."""

from __future__ import annotations

import pytest
import torch
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models.hgnet import HighPerfGpuNet


def tiny_hgnet(stem_type: str = "v1", use_lab: bool = False, **kwargs: object) -> HighPerfGpuNet:
    """Four one-block stages (8 -> 16 channels) and a 16-wide head conv; kwargs go to HighPerfGpuNet."""
    # in_chs, mid_chs, out_chs, blocks, downsample, light_block, kernel_size, layer_num
    cfg = {
        "stem_type": stem_type,
        "stem_chs": [8, 8, 8] if stem_type == "v1" else [8, 8],
        "stage1": [8, 8, 8, 1, False, False, 3, 2],
        "stage2": [8, 8, 8, 1, True, False, 3, 2],
        "stage3": [8, 8, 16, 1, True, True, 5, 2],
        "stage4": [16, 8, 16, 1, True, True, 5, 2],
    }
    kwargs = {"num_classes": CLASSES, "head_hidden_size": 16, **kwargs}
    return HighPerfGpuNet(cfg, use_lab=use_lab, **kwargs)


def with_learnable_affine() -> HighPerfGpuNet:
    model = tiny_hgnet("v2", use_lab=True)
    with torch.no_grad():  # initialised to the identity map: make it a real affine map
        model.head.last_conv[2].scale.fill_(-1.3)
        model.head.last_conv[2].bias.fill_(0.4)
    return model


@pytest.mark.parametrize("build", [tiny_hgnet, with_learnable_affine], ids=["hgnet", "hgnetv2_lab"])
def test_hgnet_matches_autograd(build) -> None:
    head = assert_matches_autograd(build(), "hgnet", size=32)
    assert head.feature_layer == "head.last_conv.0"
    assert head.activation.name == "relu"
    assert head.head_type == ("general" if build is with_learnable_affine else "linear")


REFUSALS = {
    "no_head_conv": (lambda: tiny_hgnet(head_hidden_size=None), "no feature convolution after the pool"),
    "max_pool": (lambda: tiny_hgnet(global_pool="max"), "not a global average"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)
