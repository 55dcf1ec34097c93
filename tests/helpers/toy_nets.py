"""GapNet: a toy CNN in flatscan's class (stem -> feature conv -> BatchNorm + shortcut -> activation -> GAP -> Linear),
its registered adapter, and a batch for it. Importing this module registers the adapter.
"""

from __future__ import annotations

import torch
from hessian_reference import randomise_norms
from torch import nn

import flatscan
from flatscan.contract import NormalisedHead, Tap, activation_of, batchnorm_scale


class GapNet(nn.Module):
    """stem -> conv (feature layer) -> bn + shortcut -> act -> global average pool -> fc."""

    def __init__(self, conv: nn.Conv2d, act: nn.Module, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, conv.in_channels, 3, padding=1)
        self.conv = conv
        self.bn = nn.BatchNorm2d(conv.out_channels)
        self.shortcut = nn.Conv2d(conv.in_channels, conv.out_channels, 1)
        self.act = act
        self.fc = nn.Linear(conv.out_channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(self.stem(x))
        z = self.bn(self.conv(a))
        # The residual does not depend on the feature layer's kernel.
        v = z + self.shortcut(nn.functional.adaptive_avg_pool2d(a, z.shape[-2:]))
        return self.fc(self.act(v).mean((2, 3)))


@flatscan.register("gapnet", GapNet)
def describe_gapnet(model: GapNet) -> NormalisedHead:
    return NormalisedHead(
        feature_layer="conv",
        pre_activation=Tap("act", "input"),
        pooled=Tap("fc", "input"),
        channel_scale=batchnorm_scale(model.bn, "bn"),
        activation=activation_of(model.act, "act"),
        classifier="fc",
    )


def make_gapnet(conv: nn.Conv2d, act: nn.Module, seed: int = 0) -> GapNet:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = GapNet(conv, act)
    # A wide spread of pre-activations, so every piece of ReLU6 / hard-swish is visited.
    randomise_norms(model, generator, scale=(1.0, 4.0))
    return model.double().eval()


def batch(n: int = 4, size: int = 8, seed: int = 1, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 3, size, size, generator=generator, dtype=torch.float64),
        torch.randint(0, classes, (n,), generator=generator),
    )
