"""Shared checks of the family adapters (adapters/_common.py) and the helper the family tests use."""

from __future__ import annotations

import pytest
import torch
from hessian_reference import relative_error, trace_and_flatness
from test_timm_families import CLASSES, RTOL, images_and_labels, prepare
from timm.layers import BlurPool2d, ConvNormAct, ScaledStdConv2d
from timm.models.vgg import VGG, ConvMlp
from torch import nn

import flatscan

# Keeps the softmax away from one-hot: B_cc = sum_k p_k W_kc^2 - (W^T p)_c^2 cancels when p is nearly one-hot,
# which would leave the comparison at ~1e-8 instead of ~1e-15 (see the report on HeadDerivatives.diagonal).
MAX_LOGIT = 4.0


def tame_logits(model: nn.Module, classifier: str, images: torch.Tensor) -> None:
    """Scale the classifier so the largest |logit| is at most MAX_LOGIT."""
    with torch.no_grad():
        peak = model(images).abs().max()
        if peak > MAX_LOGIT:
            layer = model.get_submodule(classifier)
            layer.weight.mul_(MAX_LOGIT / peak)
            layer.bias.mul_(MAX_LOGIT / peak)


def assert_matches_autograd(model: nn.Module, family: str, size: int = 40, seed: int = 0) -> flatscan.NormalisedHead:
    """flatscan.scan's Tr(H) and relative flatness equal the autograd Hessian's, on a prepared float64 model."""
    torch.manual_seed(seed)
    model = prepare(model, seed)
    head = flatscan.describe(model)
    assert head.family == family
    images, labels = images_and_labels(size)
    tame_logits(model, head.classifier, images)
    result = flatscan.scan(model, [(images, labels)], device="cpu")
    assert result.feature_layer == head.feature_layer
    trace, kappa = trace_and_flatness(model, f"{head.feature_layer}.weight", images, labels)
    assert abs(trace) > 1e-8 and abs(kappa) > 1e-8, "degenerate test case"
    assert relative_error(result.trace, trace) <= RTOL, (result.trace, trace)
    assert relative_error(result.relative_flatness, kappa) <= RTOL, (result.relative_flatness, kappa)
    return head


def tiny_vgg() -> VGG:
    """A VGG with 16 channels and a 24-wide pre_logits ConvMlp (timm hard-codes 4096)."""
    model = VGG([8, "M", 16], num_classes=CLASSES)
    model.pre_logits = ConvMlp(16, 24, 7)
    model.head.fc = nn.Linear(24, CLASSES)
    return model


def test_weight_standardised_feature_layer_is_refused() -> None:
    model = tiny_vgg()
    model.pre_logits.fc2 = ScaledStdConv2d(24, 24, 1)
    with pytest.raises(flatscan.UnsupportedModel, match="transforms its weight"):
        flatscan.describe(model)


def test_activation_without_closed_form_is_refused() -> None:
    model = tiny_vgg()
    model.pre_logits.act2 = nn.Sequential(nn.ReLU(), nn.ReLU())
    with pytest.raises(flatscan.UnsupportedModel, match="Sequential"):
        flatscan.describe(model)


def test_anti_aliased_conv_norm_act_is_refused() -> None:
    from timm.models.rexnet import RexNet

    model = RexNet(num_classes=CLASSES, width_mult=0.1, initial_chs=4, final_chs=16, depth_mult=0.2)
    last = model.features[-1]
    model.features[-1] = ConvNormAct(last.in_channels, last.out_channels, stride=2, aa_layer=BlurPool2d)
    with pytest.raises(flatscan.UnsupportedModel, match="blurs and subsamples"):
        flatscan.describe(model)
