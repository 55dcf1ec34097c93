"""Shared helpers of the adapter tests: tiny float64 models, their data, and the two checks every family runs.

:func:`assert_matches_autograd` compares flatscan.scan's Tr(H) and relative flatness with the brute-force autograd
Hessian of tests/hessian_reference.py; :func:`assert_refused` checks that describe and scan refuse a model with a
reason.
"""

from __future__ import annotations

import pytest
import torch
from hessian_reference import randomise_norms, relative_error, trace_and_flatness
from timm.models.vgg import VGG, ConvMlp
from torch import nn

import flatscan

RTOL = 1e-10
CLASSES = 7


def prepare(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    randomise_norms(model, generator)
    with torch.no_grad():
        for module in model.modules():
            # ConvNeXt's layer scale starts at 1e-6; make it O(1) so the head is not degenerate.
            if isinstance(getattr(module, "gamma", None), nn.Parameter):
                module.gamma.copy_(0.5 + torch.rand(module.gamma.shape, generator=generator))
    return model.double().eval()


def images_and_labels(size: int, n: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 3, size, size, generator=generator, dtype=torch.float64),
        torch.randint(0, CLASSES, (n,), generator=generator),
    )


def assert_refused(model: nn.Module, reason: str, size: int = 32) -> None:
    """Both describe and scan refuse ``model`` with a reason matching ``reason``."""
    with pytest.raises(flatscan.UnsupportedModel, match=reason):
        flatscan.describe(model)
    with pytest.raises(flatscan.UnsupportedModel, match=reason):
        flatscan.scan(model, [images_and_labels(size=size)], device="cpu")


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


def randomise_batchnorm1d(model: nn.Module, seed: int = 3) -> nn.Module:
    """Non-trivial statistics and affine maps for the BatchNorm1d of NormLinear heads (hessian_reference's
    randomise_norms covers BatchNorm2d only): a head function that skipped it would then give wrong logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                c = module.num_features
                module.running_mean.copy_(0.2 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(c, generator=generator))
                module.weight.copy_(0.5 + 1.5 * torch.rand(c, generator=generator))
                module.bias.copy_(0.3 * torch.randn(c, generator=generator))
    return model
