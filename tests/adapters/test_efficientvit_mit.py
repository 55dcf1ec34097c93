"""EfficientViT (MIT, B and L series): head in_conv (1x1 conv -> BatchNorm -> act) -> GAP -> MLP classifier."""

from __future__ import annotations

from functools import partial

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models.efficientvit_mit import EfficientVit, EfficientVitLarge
from torch import nn

TINY = {"widths": (4, 8, 8, 16, 16), "depths": (1, 1, 1, 1, 1), "head_dim": 8, "head_widths": (24, 20)}


def tiny(model_class: type[nn.Module], **kwargs: object) -> nn.Module:
    return model_class(**{**TINY, "num_classes": CLASSES, **kwargs})


@pytest.mark.parametrize(("model_class", "activation"), [(EfficientVit, "hardswish"), (EfficientVitLarge, "gelu_tanh")])
def test_efficientvit_matches_autograd(model_class: type[nn.Module], activation: str) -> None:
    head = assert_matches_autograd(tiny(model_class), "efficientvit", size=32)
    assert head.feature_layer == "head.in_conv.conv"
    assert head.activation.name == activation
    # Linear -> LayerNorm -> act -> Linear on the pooled vector: a general head, classified by its last Linear.
    assert head.head_type == "general"
    assert head.classifier == "head.classifier.4"


def without_head_conv() -> nn.Module:
    model = tiny(EfficientVit)
    model.reset_classifier(CLASSES, reset_other=True)
    return model


REFUSALS = {
    "no_head_conv": (without_head_conv, "head.in_conv was removed"),
    "max_pool": (partial(tiny, EfficientVit, global_pool="max"), "not a global average"),
    "no_classifier": (partial(tiny, EfficientVitLarge, num_classes=0), "not a Linear classifier"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)
