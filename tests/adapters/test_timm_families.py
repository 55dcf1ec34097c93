"""Each built-in timm adapter against the autograd Hessian of the real timm model, in float64."""

from __future__ import annotations

from functools import partial

import pytest
import timm
import torch
from helpers.adapters import CLASSES, RTOL, assert_refused, images_and_labels, prepare
from hessian_reference import relative_error, trace_and_flatness
from timm.models._efficientnet_builder import decode_arch_def
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import Bottleneck, ResNet
from torch import nn

import flatscan


def tiny_mobilenet_v2(act_layer: type[nn.Module], pad_type: str = "") -> EfficientNet:
    arch = decode_arch_def([["ds_r1_k3_s1_c8"], ["ir_r1_k3_s2_e2_c8"]])
    return EfficientNet(arch, num_classes=CLASSES, num_features=16, stem_size=8, act_layer=act_layer, pad_type=pad_type)


MODELS = {
    # BasicBlock ending (conv2 / bn2 / act2), deep stem, avg-down shortcut.
    "resnet_basic": lambda: timm.create_model("test_resnet", num_classes=CLASSES, channels=(8, 8, 8, 12)),
    # Bottleneck ending (conv3 / bn3 / act3) with a downsampling shortcut.
    "resnet_bottleneck": lambda: ResNet(
        Bottleneck, (1, 1, 1, 1), num_classes=CLASSES, channels=(4, 4, 4, 8), stem_width=8
    ),
    "resnext": lambda: ResNet(
        Bottleneck, (1, 1, 1, 1), num_classes=CLASSES, channels=(4, 4, 4, 8), stem_width=8, cardinality=2, base_width=64
    ),
    # EfficientNet: conv_head + bn2 (BatchNormAct2d, SiLU).
    "efficientnet": lambda: timm.create_model("test_efficientnet", num_classes=CLASSES, channel_multiplier=0.25),
    # MobileNetV2 layout (EfficientNet class, ReLU6), TF 'same' padding in the stem.
    "mobilenetv2": lambda: tiny_mobilenet_v2(nn.ReLU6, pad_type="same"),
    "efficientnet_hardswish": lambda: tiny_mobilenet_v2(nn.Hardswish),
    # ConvNeXt: Linear fc2 on channels-last maps, layer scale, GAP -> LayerNorm -> Linear (general head).
    "convnext": lambda: timm.create_model(
        "test_convnext", num_classes=CLASSES, dims=(8, 8, 8, 16), depths=(1, 1, 1, 2)
    ),
    "convnext_conv_mlp": lambda: timm.create_model(
        "test_convnext", num_classes=CLASSES, dims=(8, 8, 8, 16), depths=(1, 1, 1, 1), conv_mlp=True
    ),
    "convnext_head_mlp": lambda: timm.create_model(
        "test_convnext", num_classes=CLASSES, dims=(8, 8, 8, 16), depths=(1, 1, 1, 1), head_hidden_size=12
    ),
    # head_norm_first (convnext_*_hnf): norm_pre, a LayerNorm2d across channels, before GAP -> Linear.
    "convnext_head_norm_first": lambda: timm.create_model(
        "test_convnext", num_classes=CLASSES, dims=(8, 8, 8, 16), depths=(1, 1, 1, 1), head_norm_first=True
    ),
}

FAMILIES = {
    "resnet_basic": "resnet",
    "resnet_bottleneck": "resnet",
    "resnext": "resnet",
    "efficientnet": "efficientnet",
    "mobilenetv2": "efficientnet",
    "efficientnet_hardswish": "efficientnet",
    "convnext": "convnext",
    "convnext_conv_mlp": "convnext",
    "convnext_head_norm_first": "convnext",
    "convnext_head_mlp": "convnext",
}


@pytest.mark.parametrize("name", MODELS)
def test_family_matches_autograd(name: str) -> None:
    torch.manual_seed(0)
    model = prepare(MODELS[name]())
    head = flatscan.describe(model)
    assert head.family == FAMILIES[name]
    images, labels = images_and_labels(size=40)
    result = flatscan.scan(model, [(images, labels)], device="cpu")
    assert result.feature_layer == head.feature_layer
    trace, kappa = trace_and_flatness(model, f"{head.feature_layer}.weight", images, labels)
    assert abs(trace) > 1e-8 and abs(kappa) > 1e-8, "degenerate test case"
    assert relative_error(result.trace, trace) <= RTOL, (result.trace, trace)
    assert relative_error(result.relative_flatness, kappa) <= RTOL, (result.relative_flatness, kappa)


def test_resnet_kappa_invariant_under_bn_rescaling() -> None:
    torch.manual_seed(0)
    model = prepare(MODELS["resnet_bottleneck"]())
    images, labels = images_and_labels(size=40)
    before = flatscan.scan(model, [(images, labels)], device="cpu")
    block = model.layer4[-1]
    lam = torch.linspace(0.25, 4.0, block.conv3.out_channels, dtype=torch.float64)
    with torch.no_grad():
        block.conv3.weight.mul_(lam[:, None, None, None])
        block.bn3.running_mean.mul_(lam)
        block.bn3.weight.div_(lam)
    after = flatscan.scan(model, [(images, labels)], device="cpu")
    assert relative_error(after.relative_flatness, before.relative_flatness) <= RTOL
    assert relative_error(after.trace, before.trace) > 1e-2


REFUSALS = {
    "max_pool": (partial(timm.create_model, "test_resnet", global_pool="max"), "not a global average"),
    "no_classifier": (partial(timm.create_model, "test_resnet", num_classes=0), "not a Linear classifier"),
    # SE / ECA gates, GroupNorm heads and head_norm_first are measured exactly now (test_coupled_tails.py).
    "no_adapter": (partial(timm.create_model, "test_vit"), "no adapter for VisionTransformer"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)
