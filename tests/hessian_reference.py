"""Brute-force reference: the autograd Hessian of the mean loss w.r.t. one weight tensor.

Independent of flatscan: the whole model runs through torch.func.functional_call with the weight
swapped in, and torch.autograd.functional.hessian differentiates it twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def weight_hessian(model: nn.Module, weight_name: str, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(W as (rows, D), Hessian of the mean cross-entropy w.r.t. W as (rows, D, rows, D))."""
    model.eval()
    weight = dict(model.named_parameters())[weight_name].detach()

    def loss(w: Tensor) -> Tensor:
        logits = torch.func.functional_call(model, {weight_name: w}, (images,))
        return F.cross_entropy(logits, labels)

    hessian = torch.autograd.functional.hessian(loss, weight, vectorize=True)
    rows = weight.shape[0]
    return weight.reshape(rows, -1), hessian.reshape(rows, weight[0].numel(), rows, weight[0].numel())


def trace_and_flatness(model: nn.Module, weight_name: str, images: Tensor, labels: Tensor) -> tuple[float, float]:
    """Tr(H) and relative flatness sum_{c,c'} <K_c, K_c'> Tr(H_cc') from the full autograd Hessian.

    For a grouped convolution (the module owning ``weight_name`` has ``groups`` > 1) the double sum runs over
    pairs (c, c') in the same group only: each group is an independent layer on its own input channels.
    """
    kernel, hessian = weight_hessian(model, weight_name, images, labels)
    block_traces = torch.einsum("idjd->ij", hessian)
    module = model.get_submodule(weight_name.rpartition(".")[0])
    groups = getattr(module, "groups", 1) if isinstance(module, nn.Conv2d) else 1
    group = torch.arange(kernel.shape[0]) // (kernel.shape[0] // groups)
    same_group = group[:, None] == group[None, :]
    return block_traces.trace().item(), ((kernel @ kernel.T) * block_traces)[same_group].sum().item()


def randomise_norms(model: nn.Module, generator: torch.Generator, scale: tuple[float, float] = (0.5, 2.0)) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters, and every GroupNorm non-trivial
    affine parameters (timm zero-inits some: a zero last norm would make the test degenerate)."""
    lo, hi = scale
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(0.2 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(c, generator=generator))
                module.weight.copy_(lo + (hi - lo) * torch.rand(c, generator=generator))
                module.bias.copy_(0.3 * torch.randn(c, generator=generator))
            elif isinstance(module, nn.GroupNorm) and module.affine:
                c = module.num_channels
                module.weight.copy_(lo + (hi - lo) * torch.rand(c, generator=generator))
                if module.bias is not None:  # timm's GroupNorm1NoBias
                    module.bias.copy_(0.3 * torch.randn(c, generator=generator))


def relative_error(actual: float, expected: float) -> float:
    return abs(actual - expected) / max(abs(expected), 1e-300)
