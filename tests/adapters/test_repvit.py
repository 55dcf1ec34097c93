"""RepViT: the last block's channel-mixer MLP (conv2 -> BatchNorm) + shortcut -> GAP -> NormLinear head(s).

timm builds RepViT with a distillation head (two NormLinear heads averaged): measured after reparameterisation,
which fuses them into one Linear.
"""

from __future__ import annotations

from functools import partial

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused, prepare, randomise_batchnorm1d
from timm.models.repvit import RepVit
from timm.utils import reparameterize_model

tiny_repvit = partial(RepVit, embed_dim=(8, 12), depth=(1, 1), num_classes=CLASSES)


@pytest.mark.parametrize("legacy", [False, True])
def test_reparameterised_repvit_matches_autograd(legacy: bool) -> None:
    model = reparameterize_model(randomise_batchnorm1d(prepare(tiny_repvit(legacy=legacy))))
    head = assert_matches_autograd(model, "repvit", size=32)
    assert head.feature_layer == "stages.1.blocks.0.channel_mixer.conv2"
    assert (head.head_type, head.classifier) == ("linear", "head")


def test_repvit_without_distillation_matches_autograd() -> None:
    # A last stage with no blocks ends in its downsample's residual FFN; one NormLinear head, unfused.
    model = randomise_batchnorm1d(tiny_repvit(depth=(1, 0), distillation=False))
    head = assert_matches_autograd(model, "repvit", size=32)
    assert head.feature_layer == "stages.1.downsample.ffn.conv2.c"
    assert (head.head_type, head.classifier) == ("general", "head.head.l")


REFUSALS = {
    "unfused_distilled": (tiny_repvit, "reparameterise the model first"),
    "no_pool": (partial(tiny_repvit, global_pool=""), "not a global average"),
    "no_classifier": (partial(tiny_repvit, num_classes=0, distillation=False), "not a Linear classifier"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)
