"""Split-precision contraction: TF32 rounding against an independent float64 rounding, 3xTF32 products against
float64 GEMMs, and a scan through it (CPU emulation of the tensor-core arithmetic) against the float32 scan."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from hessian_reference import randomise_norms

import flatscan
from flatscan import scanner
from flatscan.flatness import round_to_tf32, split_matmul, split_tf32


def spread_values(n: int, seed: int = 0) -> torch.Tensor:
    """Float32 values over many binades, both signs."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=generator) * torch.exp(6 * torch.randn(n, generator=generator))


def test_round_to_tf32_matches_float64_rounding() -> None:
    x = torch.cat([spread_values(100_000), torch.tensor([1 + 2**-11, -(1 + 2**-11), 1 + 2**-12, 0.0])])
    rounded = round_to_tf32(x)
    assert (rounded.view(torch.int32) & 0x1FFF).eq(0).all()  # at most 10 explicit significand bits
    # Independently: 11 significant bits of the float64 value, halves away from zero.
    mantissa, exponent = torch.frexp(x.double())
    expected = torch.ldexp(torch.sign(mantissa) * torch.floor(mantissa.abs() * 2**11 + 0.5) / 2**11, exponent)
    assert torch.equal(rounded.double(), expected)
    assert rounded[-4:].tolist() == [1 + 2**-10, -(1 + 2**-10), 1.0, 0.0]


def test_split_tf32_keeps_21_bits() -> None:
    x = spread_values(100_000, seed=1)
    hi, lo = split_tf32(x)
    assert torch.equal(round_to_tf32(hi), hi) and torch.equal(round_to_tf32(lo), lo)
    residual = (x.double() - hi.double() - lo.double()).abs()
    assert (residual <= 2**-22 * x.double().abs()).all()


def test_split_matmul_has_float32_accuracy() -> None:
    generator = torch.Generator().manual_seed(2)
    a = torch.randn(3, 200, 300, generator=generator) * 10.0
    b = torch.randn(3, 300, 150, generator=generator)
    exact = a.double() @ b.double()
    scale = a.double().abs() @ b.double().abs()  # the size of the terms each entry sums
    split_error = ((split_matmul(a, b).double() - exact).abs() / scale).max()
    plain_error = (((a @ b).double() - exact).abs() / scale).max()
    assert split_error < 4 * 2**-21  # per entry, relative to its terms: what the dropped lo lo and residuals allow
    assert split_error < 10 * plain_error + 1e-7  # the same order as a float32 GEMM's own rounding
    # Dropping the lo pieces would be TF32 alone: a thousand times worse, which the test above would catch.
    tf32_only = ((round_to_tf32(a) @ round_to_tf32(b)).double() - exact).abs().div(scale).max()
    assert tf32_only > 50 * split_error


def resnet(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=1000)
    randomise_norms(model, torch.Generator().manual_seed(0))
    return model.to(dtype).eval()


def batches(n: int = 6, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(4)
    return [(torch.randn(n, 3, size, size, generator=generator), torch.randint(0, 1000, (n,), generator=generator))]


def test_scan_through_split_precision_agrees_with_float32() -> None:
    model, data = resnet(), batches()
    plain = flatscan.scan(model, data, device="cpu", split_precision=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scan's own check must pass: no fallback warning
        split = flatscan.scan(model, data, device="cpu", split_precision=True)
    assert plain.relative_flatness is not None and split.relative_flatness is not None
    assert split.relative_flatness == pytest.approx(plain.relative_flatness, rel=1e-6)
    assert split.relative_flatness != plain.relative_flatness  # it did take the other route
    assert split.trace == plain.trace  # Tr(H) does not go through the contraction


def test_failed_check_falls_back_to_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = resnet(), batches()
    plain = flatscan.scan(model, data, device="cpu", split_precision=False)
    monkeypatch.setattr(scanner, "SPLIT_PRECISION_RTOL", 0.0)  # no split result can agree exactly
    with pytest.warns(UserWarning, match="split-precision .* differs from float32 by .*; computing kappa in float32"):
        checked = flatscan.scan(model, data, device="cpu", split_precision=True)
    assert checked.relative_flatness == plain.relative_flatness


def test_split_precision_needs_float32() -> None:
    with pytest.raises(ValueError, match="split_precision needs a float32 model"):
        flatscan.scan(
            resnet(torch.float64), [(x.double(), y) for x, y in batches(2)], device="cpu", split_precision=True
        )
    # Off by default on the CPU: the same numbers as the float32 product.
    model, data = resnet(), batches(2)
    default = flatscan.scan(model, data, device="cpu")
    assert (
        default.relative_flatness == flatscan.scan(model, data, device="cpu", split_precision=False).relative_flatness
    )
