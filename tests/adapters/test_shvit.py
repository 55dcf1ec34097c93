"""SHViT: the last block's FFN (pw2 conv -> BatchNorm) + shortcut -> GAP -> NormLinear (BatchNorm1d -> Linear)."""

from __future__ import annotations

from functools import partial

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused, prepare, randomise_batchnorm1d
from timm.models.shvit import SHViT
from timm.utils import reparameterize_model

tiny_shvit = partial(
    SHViT, embed_dim=(8, 8, 12), partial_dim=(4, 4, 4), qk_dim=(4, 4, 4), depth=(1, 1, 1), num_classes=CLASSES
)


def test_shvit_matches_autograd() -> None:
    head = assert_matches_autograd(randomise_batchnorm1d(tiny_shvit()), "shvit", size=64)
    assert head.feature_layer == "stages.2.blocks.0.ffn.m.pw2.c"
    assert head.activation.name == "identity"
    # The NormLinear's BatchNorm1d is part of the head function; its Linear is the classifier.
    assert (head.head_type, head.classifier) == ("general", "head.l")


def test_reparameterised_shvit_matches_autograd() -> None:
    model = reparameterize_model(randomise_batchnorm1d(prepare(tiny_shvit())))
    head = assert_matches_autograd(model, "shvit", size=64)
    # pw2 and its BatchNorm fused into one biased conv, the NormLinear into one Linear.
    assert head.feature_layer == "stages.2.blocks.0.ffn.m.pw2"
    assert (head.head_type, head.classifier) == ("linear", "head")


REFUSALS = {
    "max_pool": (partial(tiny_shvit, global_pool="max"), "not a global average"),
    "no_classifier": (partial(tiny_shvit, num_classes=0), "not a Linear classifier"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason, size=64)
