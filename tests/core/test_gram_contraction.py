"""The block-triangle contraction against the whole (C, C) product formed directly, in float64.

The measures themselves are tested against autograd (test_closed_form, the adapters' tests); this pins the block
bookkeeping on sizes those models do not have: C not a multiple of the block count, C below it, one channel.
"""

from __future__ import annotations

import pytest
import torch

from flatscan import flatness


def symmetric_case(channels: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """left, right with left right^T symmetric (left = F M, right = F, M symmetric), and a symmetric weight."""
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(3, channels, rank, generator=generator, dtype=torch.float64)
    inner = torch.randn(3, rank, rank, generator=generator, dtype=torch.float64)
    kernel = torch.randn(channels, 5, generator=generator, dtype=torch.float64)
    return factor @ (inner + inner.transpose(1, 2)), factor, kernel @ kernel.T


@pytest.mark.parametrize("channels", [1, 5, 8, 13, 67])
def test_linear_head_matches_the_whole_product(channels: int) -> None:
    left, right, weight = symmetric_case(channels, rank=4, seed=channels)
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 11, generator=generator, dtype=torch.float64)
    classifier = torch.randn(11, channels, generator=generator, dtype=torch.float64)
    head = flatness.linear_head_derivatives(logits, torch.tensor([0, 3, 10]), classifier)
    whole = ((left @ right.transpose(1, 2)) * weight * head.matrix()).sum((1, 2))
    got = flatness.gram_contraction(left, right, weight, head)
    torch.testing.assert_close(got, whole, rtol=1e-12, atol=0)


@pytest.mark.parametrize("channels", [3, 13])
def test_general_head_matches_the_whole_product(channels: int) -> None:
    left, right, weight = symmetric_case(channels, rank=2, seed=channels)
    generator = torch.Generator().manual_seed(2)
    hessian = torch.randn(3, channels, channels, generator=generator, dtype=torch.float64)
    hessian = hessian + hessian.transpose(1, 2)  # indefinite, as a non-linear head's may be
    head = flatness.HeadDerivatives(torch.zeros(3, channels, dtype=torch.float64), hessian=hessian)
    whole = ((left @ right.transpose(1, 2)) * weight * hessian).sum((1, 2))
    got = flatness.gram_contraction(left, right, weight, head)
    torch.testing.assert_close(got, whole, rtol=1e-12, atol=1e-12 * whole.abs().max().item())
