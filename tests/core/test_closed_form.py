"""The closed form against brute-force autograd Hessians, for every activation and conv geometry.

A small GAP network (stem -> feature conv -> BatchNorm + residual -> activation -> GAP -> Linear)
registered through the public adapter API, in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers.toy_nets import batch, make_gapnet
from hessian_reference import randomise_norms, relative_error, trace_and_flatness, weight_hessian
from timm.layers import create_conv2d
from torch import nn

import flatscan
from flatscan import flatness
from flatscan.contract import NormalisedHead, Tap, activation_of, batchnorm_scale

RTOL = 1e-10


def assert_matches_autograd(
    model: nn.Module,
    weight_name: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    result: flatscan.ScanResult,
) -> None:
    trace, kappa = trace_and_flatness(model, weight_name, images, labels)
    assert abs(trace) > 1e-6 and abs(kappa) > 1e-6, "degenerate test case"
    assert relative_error(result.trace, trace) <= RTOL, (result.trace, trace)
    assert relative_error(result.relative_flatness, kappa) <= RTOL, (result.relative_flatness, kappa)


ACTIVATIONS = {
    "identity": nn.Identity(),
    "relu": nn.ReLU(inplace=True),
    "relu6": nn.ReLU6(),
    "leaky_relu": nn.LeakyReLU(0.2),
    "silu": nn.SiLU(),
    "gelu": nn.GELU(),
    "gelu_tanh": nn.GELU(approximate="tanh"),
    "hardswish": nn.Hardswish(),
    "mish": nn.Mish(),
}


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_every_activation_matches_autograd(name: str) -> None:
    model = make_gapnet(nn.Conv2d(4, 6, 3, padding=1), ACTIVATIONS[name])
    images, labels = batch()
    result = flatscan.scan(model, [(images, labels)], device="cpu")
    assert result.activation == name
    assert_matches_autograd(model, "conv.weight", images, labels, result)


GEOMETRIES = {
    # 8x8 input, 3x3 stride 1: L = 64 > D = 36, g is formed explicitly.
    "3x3": lambda: nn.Conv2d(4, 6, 3, padding=1),
    # L = 9 < D = 36: <g_c, g_c'> goes through the patch Gram matrix P^T P.
    "stride2": lambda: nn.Conv2d(4, 6, 3, stride=2),
    "dilation2": lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2),
    "groups2": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    "1x1": lambda: nn.Conv2d(4, 6, 1),
    "rect_kernel": lambda: nn.Conv2d(4, 6, (3, 1), stride=(1, 2), padding=(1, 0)),
    "torch_same_even": lambda: nn.Conv2d(4, 6, 4, padding="same"),
    "reflect": lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    "circular": lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"),
    "timm_same_dynamic": lambda: create_conv2d(4, 6, 3, stride=2, padding="same"),
    "timm_same_static": lambda: create_conv2d(4, 6, 5, stride=1, padding="same", dilation=2),
}


@pytest.mark.parametrize("name", GEOMETRIES)
@pytest.mark.parametrize("size", [8, 9])
def test_conv_geometry_matches_autograd(name: str, size: int) -> None:
    model = make_gapnet(GEOMETRIES[name](), nn.SiLU())
    images, labels = batch(size=size)
    result = flatscan.scan(model, [(images, labels)], device="cpu")
    assert_matches_autograd(model, "conv.weight", images, labels, result)


@pytest.mark.parametrize("name", ["stride2", "1x1", "rect_kernel", "timm_same_dynamic"])
@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
def test_positions_route_matches_autograd(name: str, activation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """kappa through the positions (no (C, C) matrix; chosen on small maps) against autograd, forced on."""
    taken = []

    def always(*sizes: int) -> bool:
        taken.append(sizes)
        return True

    monkeypatch.setattr(flatness, "positions_route_is_cheaper", always)
    model = make_gapnet(GEOMETRIES[name](), ACTIVATIONS[activation])
    images, labels = batch(size=9)
    result = flatscan.scan(model, [(images, labels)], device="cpu")
    assert taken, "the positions route was not taken"
    assert_matches_autograd(model, "conv.weight", images, labels, result)


def test_positions_route_is_chosen_on_small_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    """A small map with more channels than the kernel is long takes the positions route, and agrees with autograd."""
    calls: list[bool] = []
    original = flatness.positions_route_is_cheaper
    monkeypatch.setattr(
        flatness, "positions_route_is_cheaper", lambda *sizes: calls.append(original(*sizes)) or calls[-1]
    )
    model = make_gapnet(nn.Conv2d(4, 24, 1, stride=4), nn.SiLU())  # 8 px -> 2 x 2 positions, D = 4, C = 24
    images, labels = batch(size=8)
    result = flatscan.scan(model, [(images, labels)], device="cpu")
    assert calls == [True]
    assert_matches_autograd(model, "conv.weight", images, labels, result)
    assert not original(channels=2048, positions=49, kernel_size=512, rows=1000)  # resnet50 at 224 px: the Gram route


def test_timm_same_padding_is_dynamic() -> None:
    assert type(GEOMETRIES["timm_same_dynamic"]()).__name__ == "Conv2dSame"


def test_classifier_flatness_matches_autograd() -> None:
    model = make_gapnet(nn.Conv2d(4, 6, 3, padding=1), nn.GELU())
    images, labels = batch()
    result = flatscan.scan(model, [(images, labels)], device="cpu")
    weight, hessian = weight_hessian(model, "fc.weight", images, labels)
    # Per sample: the mean over samples of kappa_W equals sum <w_j, w_j'> Tr(H_jj') of the mean loss.
    kappa_w = ((weight @ weight.T) * torch.einsum("idjd->ij", hessian)).sum().item()
    assert relative_error(result.classifier_flatness, kappa_w) <= RTOL


def test_standard_errors_are_over_per_sample_values() -> None:
    model = make_gapnet(nn.Conv2d(4, 6, 3, padding=1), nn.Mish())
    images, labels = batch(n=6)
    per_sample = torch.tensor(
        [trace_and_flatness(model, "conv.weight", images[i : i + 1], labels[i : i + 1]) for i in range(6)],
        dtype=torch.float64,
    )
    mean, se = per_sample.mean(0), per_sample.std(0, unbiased=True) / math.sqrt(6)
    # Three uneven batches: the streaming merge must give the same moments as one pass.
    batches = [(images[:1], labels[:1]), (images[1:4], labels[1:4]), (images[4:], labels[4:])]
    result = flatscan.scan(model, batches, device="cpu")
    assert result.n_samples == 6
    assert relative_error(result.trace, mean[0].item()) <= RTOL
    assert relative_error(result.relative_flatness, mean[1].item()) <= RTOL
    assert relative_error(result.trace_se, se[0].item()) <= 1e-8
    assert relative_error(result.relative_flatness_se, se[1].item()) <= 1e-8


def test_kappa_is_invariant_to_filter_rescaling_and_trace_is_not() -> None:
    model = make_gapnet(nn.Conv2d(4, 6, 3, padding=1), nn.SiLU())
    images, labels = batch()
    before = flatscan.scan(model, [(images, labels)], device="cpu")
    logits_before = model(images)
    lam = torch.linspace(0.3, 3.0, 6, dtype=torch.float64)
    with torch.no_grad():
        # Rescale filter c by lam_c and divide the BatchNorm scale by lam_c: the same function.
        model.conv.weight.mul_(lam[:, None, None, None])
        model.conv.bias.mul_(lam)
        model.bn.running_mean.mul_(lam)
        model.bn.weight.div_(lam)
    torch.testing.assert_close(model(images), logits_before, rtol=1e-12, atol=1e-12)
    after = flatscan.scan(model, [(images, labels)], device="cpu")
    assert relative_error(after.relative_flatness, before.relative_flatness) <= RTOL
    assert relative_error(after.trace, before.trace) > 1e-2
    # And after the rescaling both still agree with autograd.
    assert_matches_autograd(model, "conv.weight", images, labels, after)


class ConcatNet(nn.Module):
    """DenseNet-like: the feature conv's output is concatenated after other channels, then BN + act + GAP + fc."""

    def __init__(self, act: nn.Module, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.other = nn.Conv2d(4, 3, 1)
        self.conv = nn.Conv2d(4, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = act
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(self.stem(x))
        return self.fc(self.act(self.bn(torch.cat([self.other(a), self.conv(a)], 1))).mean((2, 3)))


@flatscan.register("concatnet", ConcatNet)
def describe_concatnet(model: ConcatNet) -> NormalisedHead:
    return NormalisedHead(
        feature_layer="conv",
        pre_activation=Tap("act", "input"),
        pooled=Tap("fc", "input"),
        channel_scale=batchnorm_scale(model.bn, "bn")[3:],
        activation=activation_of(model.act, "act"),
        classifier="fc",
        channels=slice(3, None),
    )


@pytest.mark.parametrize("act", [nn.ReLU(), nn.SiLU()], ids=["relu", "silu"])
def test_feature_layer_feeding_some_pooled_channels_matches_autograd(act: nn.Module) -> None:
    torch.manual_seed(0)
    model = ConcatNet(act)
    randomise_norms(model, torch.Generator().manual_seed(0), scale=(1.0, 4.0))
    model = model.double().eval()
    images, labels = batch()
    result = flatscan.scan(model, [(images, labels)], device="cpu")
    assert_matches_autograd(model, "conv.weight", images, labels, result)


def test_confident_predictions_lose_no_precision() -> None:
    """Near one-hot softmax: B_cc and e against exact rational arithmetic (the naive forms cancel)."""
    from fractions import Fraction

    from flatscan.flatness import class_spread, linear_head_derivatives

    logits = torch.tensor([[32.0, 1.0, -2.0], [0.5, 0.2, 0.1]], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    weight = torch.tensor([[0.3, -1.2], [0.7, 0.4], [-0.5, 0.9]], dtype=torch.float64)
    probs = torch.softmax(logits, dim=1)
    spread = class_spread(probs, weight)
    derivatives = linear_head_derivatives(logits, labels, weight)
    for n in range(2):
        p = [Fraction(v) for v in probs[n].tolist()]
        w = [[Fraction(v) for v in row] for row in weight.tolist()]
        for c in range(2):
            mean = sum(p[k] * w[k][c] for k in range(3))
            exact = sum(p[k] * (w[k][c] - mean) ** 2 for k in range(3))
            assert relative_error(spread[n, c].item(), float(exact)) <= 1e-12
            # e_c = sum_k (p_k - [k == y]) W_kc, with p_y - 1 taken as -sum_{k != y} p_k of the same p.
            residual = [p[k] if k != labels[n] else -sum(p[j] for j in range(3) if j != labels[n]) for k in range(3)]
            exact_e = sum(residual[k] * w[k][c] for k in range(3))
            assert relative_error(derivatives.grad[n, c].item(), float(exact_e)) <= 1e-12
    assert (1 - probs[0].max()).item() < 1e-12  # the first sample is in the cancelling regime


@pytest.mark.parametrize("groups", [2, 6])  # grouped, and depthwise-like (one filter per group)
def test_grouped_layer_sums_within_group_pairs_only(groups: int) -> None:
    # The spec's "Grouped and depthwise feature layers": kappa sums (c, c') of the same group only; Tr(H) unchanged.
    model = make_gapnet(nn.Conv2d(6, 6, 3, padding=1, groups=groups), nn.SiLU())
    images, labels = batch()
    result = flatscan.scan(model, [(images, labels)], device="cpu")
    assert_matches_autograd(model, "conv.weight", images, labels, result)
    kernel, hessian = weight_hessian(model, "conv.weight", images, labels)
    blocks = torch.einsum("idjd->ij", hessian)
    all_pairs = ((kernel @ kernel.T) * blocks).sum().item()
    assert relative_error(result.relative_flatness, all_pairs) > 1e-3  # the old all-pairs value is another number
    assert relative_error(result.trace, blocks.trace().item()) <= RTOL
