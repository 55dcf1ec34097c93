"""EfficientViM: ffn.fc2 blended into the residual, LayerNorm2d before the pool, the last of several weighted heads
(the distilled variant: averaged with a second set of heads)."""

from __future__ import annotations

import torch
from helpers.adapters import CLASSES, assert_matches_autograd, images_and_labels, prepare
from timm.models.efficientvim import EfficientViM, EfficientViMDistilled

import flatscan


def tiny(model_class: type[EfficientViM]) -> EfficientViM:
    model = model_class(num_classes=CLASSES, embed_dim=(8, 8, 8), depths=(1, 1, 1), state_dim=(4, 4, 4))
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # away from timm's init: unequal head weights, blends and norm affines
        model.weights.copy_(torch.randn(model.weights.shape, generator=generator))
        if isinstance(model, EfficientViMDistilled):
            model.weights_dist.copy_(torch.randn(model.weights_dist.shape, generator=generator))
        for name, parameter in model.named_parameters():
            if name.endswith("alpha") or ("norm." in name and name.startswith("norm")):
                parameter.copy_(0.5 + torch.rand(parameter.shape, generator=generator))
            if name.startswith("heads") and name.endswith("weight"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model


def test_efficientvim_matches_autograd() -> None:
    head = assert_matches_autograd(tiny(EfficientViM), "efficientvim", size=64)
    assert head.feature_layer == "stages.2.blocks.0.ffn.fc2.conv"
    assert head.coupling is not None and 0 < head.classifier_gain < 1


def test_inference_form_matches_autograd() -> None:
    # The loader's inference form folds every ConvLayer2d's BatchNorm (randomised first: timm zero-inits fc2's)
    # into its conv (norm None).
    model = flatscan.inference_form(prepare(tiny(EfficientViMDistilled)))
    assert model.stages[2].blocks[0].ffn.fc2.norm is None
    assert_matches_autograd(model, "efficientvim", size=64)


def test_distilled_efficientvim_matches_autograd() -> None:
    head = assert_matches_autograd(tiny(EfficientViMDistilled), "efficientvim", size=64)
    assert [name for name, _ in head.parallel_classifiers] == ["heads_dist.3"]
    assert 0 < head.classifier_gain < 0.5 and 0 < head.parallel_classifiers[0][1] < 0.5


def test_distilled_efficientvim_is_verified() -> None:
    # heads_dist.3 reads the pooled vector too: verify must count it as part of the head, not as a layer downstream.
    result = flatscan.verify(prepare(tiny(EfficientViMDistilled)), images_and_labels(size=64), pairs=8)
    assert result.passed and not result.degenerate, result
