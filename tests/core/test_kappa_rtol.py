"""kappa over the likeliest classes (kappa_rtol): the autograd value lies within the certified interval.

A toy GAP network with 40 classes and a peaked softmax (a wide spread of classifier biases), in float64; the exact
kappa comes from the brute-force autograd Hessian, never from flatscan's own exact route.
"""

from __future__ import annotations

import pytest
import timm
import torch
from helpers.toy_nets import GapNet, batch
from hessian_reference import randomise_norms, relative_error, trace_and_flatness
from torch import nn

import flatscan

CLASSES = 40


def peaked_gapnet(act: nn.Module, groups: int = 1) -> GapNet:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = GapNet(nn.Conv2d(4, 8, 3, padding=1, groups=groups), act, classes=CLASSES)
    randomise_norms(model, generator, scale=(1.0, 4.0))
    with torch.no_grad():
        model.fc.bias.copy_(5 * torch.randn(CLASSES, generator=generator))
    return model.double().eval()


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("rtol", [0.3, 1e-2])
def test_the_autograd_kappa_lies_in_the_certified_interval(rtol: float, groups: int) -> None:
    model = peaked_gapnet(nn.SiLU(), groups)
    images, labels = batch(n=6, classes=CLASSES)
    result = flatscan.scan(model, [(images, labels)], device="cpu", kappa_rtol=rtol)
    _, kappa = trace_and_flatness(model, "conv.weight", images, labels)
    bound = result.relative_flatness_bound
    assert result.relative_flatness is not None and bound is not None
    assert bound > 0, "no class was left out: the case tests nothing"
    slack = 1e-10 * abs(kappa)
    assert result.relative_flatness - slack <= kappa <= result.relative_flatness + bound + slack, (
        result.relative_flatness,
        kappa,
        bound,
    )


def test_the_bound_is_within_rtol_of_the_value() -> None:
    # ReLU: no curvature term, so kappa is the classes' part the bound is relative to.
    rtol = 0.05
    model = peaked_gapnet(nn.ReLU())
    images, labels = batch(n=6, classes=CLASSES)
    result = flatscan.scan(model, [(images, labels)], device="cpu", kappa_rtol=rtol)
    _, kappa = trace_and_flatness(model, "conv.weight", images, labels)
    assert result.relative_flatness is not None and result.relative_flatness_bound is not None
    assert 0 < result.relative_flatness_bound <= rtol * result.relative_flatness
    assert 0 <= kappa - result.relative_flatness <= result.relative_flatness_bound * (1 + 1e-10)


def test_a_tiny_rtol_keeps_every_class_and_is_exact() -> None:
    model = peaked_gapnet(nn.SiLU())
    images, labels = batch(n=6, classes=CLASSES)
    result = flatscan.scan(model, [(images, labels)], device="cpu", kappa_rtol=1e-14)
    _, kappa = trace_and_flatness(model, "conv.weight", images, labels)
    assert result.relative_flatness_bound == 0
    assert result.relative_flatness is not None and relative_error(result.relative_flatness, kappa) <= 1e-10


def test_exact_scans_report_no_bound() -> None:
    model = peaked_gapnet(nn.SiLU())
    result = flatscan.scan(model, [batch(classes=CLASSES)], device="cpu")
    assert result.relative_flatness_bound is None


def test_what_cannot_be_bounded_is_refused() -> None:
    model = peaked_gapnet(nn.SiLU())
    data = [batch(classes=CLASSES)]
    with pytest.raises(flatscan.FlatscanError, match=r"kappa_rtol \(--kappa-rtol\) must be between 0 and 1"):
        flatscan.scan(model, data, device="cpu", kappa_rtol=0)
    with pytest.raises(flatscan.FlatscanError, match="trace-only scan"):
        flatscan.scan(model, data, device="cpu", kappa_rtol=0.1, trace_only=True)
    convnext = timm.create_model("test_convnext", num_classes=CLASSES).double().eval()  # LayerNorm head
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(flatscan.ScanError, match=r"head is not a Linear classifier.*without kappa_rtol"):
        flatscan.scan(convnext, [(images, torch.tensor([0, 1]))], device="cpu", kappa_rtol=0.1)
