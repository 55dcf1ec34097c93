"""flatscan.verify: the per-model certificate passes on correct adapters and catches wrong ones."""

from __future__ import annotations

import pytest
import timm
import torch
from helpers.toy_nets import batch as gapnet_batch
from helpers.toy_nets import make_gapnet
from hessian_reference import randomise_norms, weight_hessian
from torch import nn

import flatscan
from flatscan.contract import NormalisedHead, Tap, activation_of, batchnorm_scale
from flatscan.verify import verify

CLASSES = 6


def images_and_labels(n: int = 4, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return torch.randn(n, 3, size, size, generator=generator), torch.randint(0, CLASSES, (n,), generator=generator)


def prepared(model: nn.Module) -> nn.Module:
    randomise_norms(model, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(getattr(module, "gamma", None), nn.Parameter):
                module.gamma.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize(
    "build",
    [
        lambda: timm.create_model("test_resnet", num_classes=CLASSES),
        lambda: timm.create_model("test_efficientnet", num_classes=CLASSES),
        lambda: timm.create_model("test_convnext", num_classes=CLASSES),
    ],
    ids=["resnet", "efficientnet", "convnext"],
)
def test_verify_passes_on_the_built_in_families(build) -> None:
    torch.manual_seed(0)
    model = prepared(build())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = verify(model, images_and_labels(), pairs=12)
    assert result.passed, result
    assert len(result.pairs) == 12 and any(c == d for c, d in result.pairs)
    assert result.downstream_layers == []
    assert result.max_relative_error <= 1e-8
    # The caller's model is untouched (verify works on a float64 copy).
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).dtype == torch.float32


def test_verify_reference_agrees_with_a_full_hessian() -> None:
    torch.manual_seed(0)
    model = prepared(timm.create_model("test_resnet", num_classes=CLASSES, channels=(8, 8, 8, 12))).double()
    images, labels = images_and_labels()
    result = verify(model, (images, labels), pairs=8)
    _, hessian = weight_hessian(model, "layer4.0.conv2.weight", images.double(), labels)
    blocks = torch.einsum("idjd->ij", hessian)
    for (c, d), value in zip(result.pairs, result.autograd, strict=True):
        assert value == pytest.approx(blocks[c, d].item(), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),  # D = 18 <= N L: one HVP per kernel coordinate
        lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4),  # depthwise
        lambda: nn.Conv2d(4, 6, 5, stride=4, groups=2),  # L = 1, D = 50 > N L: through the response Gram
    ],
    ids=["grouped", "depthwise", "grouped-gram-route"],
)
def test_verify_reference_agrees_with_a_full_hessian_for_grouped_convs(conv) -> None:
    """Filters of different groups see different input channels: each keeps its own response J e_{r,d}."""
    model = make_gapnet(conv(), nn.SiLU())
    images, labels = gapnet_batch()
    result = verify(model, (images, labels), pairs=12)
    _, hessian = weight_hessian(model, "conv.weight", images, labels)
    blocks = torch.einsum("idjd->ij", hessian)
    assert any(c // 2 != d // 2 for c, d in result.pairs)  # pairs across groups are among those checked
    for (c, d), value in zip(result.pairs, result.autograd, strict=True):
        assert value == pytest.approx(blocks[c, d].item(), rel=1e-9, abs=1e-12)
    assert result.passed, result


class TwoConvNet(nn.Module):
    """conv -> bn -> relu -> conv2 (1x1) -> bn2 -> relu -> GAP -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(6, 5, 1), nn.BatchNorm2d(5), nn.ReLU()
        self.fc = nn.Linear(5, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv(x)))
        return self.fc(self.act2(self.bn2(self.conv2(x))).mean((2, 3)))


def describe_two_conv(model: TwoConvNet, feature_layer: str, scale_factor: float) -> NormalisedHead:
    return NormalisedHead(
        feature_layer=feature_layer,
        pre_activation=Tap("act2", "input"),
        pooled=Tap("fc", "input"),
        channel_scale=scale_factor * batchnorm_scale(model.bn2, "bn2"),
        activation=activation_of(model.act2, "act2"),
        classifier="fc",
    )


@pytest.mark.parametrize(
    ("feature_layer", "scale_factor", "downstream"),
    [("conv2", 1.0, []), ("conv2", 2.0, []), ("conv", 1.0, ["conv2"])],
    ids=["correct", "wrong-scale", "not-the-last-conv"],
)
def test_verify_catches_a_wrong_adapter(feature_layer: str, scale_factor: float, downstream: list[str]) -> None:
    torch.manual_seed(0)
    model = prepared(TwoConvNet())
    flatscan.register("two-conv", TwoConvNet)(lambda m: describe_two_conv(m, feature_layer, scale_factor))
    result = verify(model, images_and_labels(), pairs=8)
    assert result.downstream_layers == downstream
    assert result.passed == (feature_layer == "conv2" and scale_factor == 1.0)
    if scale_factor != 1.0:
        assert result.max_relative_error > 0.5  # the trace scales with s^2
