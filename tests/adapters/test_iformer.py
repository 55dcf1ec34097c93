"""iFormer: the last block's residual FFN / ConvBlock (1x1 conv -> BatchNorm [* layer scale]) + shortcut -> GAP ->
NormLinear; distilled models are measured after reparameterisation, which fuses their two heads into one Linear."""

from __future__ import annotations

from functools import partial

import pytest
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused, prepare, randomise_batchnorm1d
from timm.models.iformer import IFormer
from timm.utils import reparameterize_model

# Stage 3 ends in RepCPE -> SHMA -> FFN (an attention group), stage 4 in a ConvBlock unless it has attention.
tiny_iformer = partial(
    IFormer, dims=(4, 8, 8, 12), attn_head_dim_reduction=(0, 0, 2, 2), conv_ratio=2, num_classes=CLASSES
)
with_attention = partial(tiny_iformer, depths=(1, 1, 3, 3), attn_groups=(0, 0, 1, 1))
convolutional = partial(tiny_iformer, depths=(1, 1, 1, 1), attn_groups=(0, 0, 0, 0))


@pytest.mark.parametrize(
    ("build", "feature_layer"),
    [
        (partial(with_attention, layer_scale_init_value=1e-6), "stages.3.blocks.2.mixer.module.2.c"),
        (convolutional, "stages.3.blocks.0.mixer.module.3.c"),
    ],
)
def test_iformer_matches_autograd(build: partial[IFormer], feature_layer: str) -> None:
    head = assert_matches_autograd(randomise_batchnorm1d(build()), "iformer", size=32)
    assert head.feature_layer == feature_layer
    assert head.activation.name == "identity"
    assert (head.head_type, head.classifier) == ("general", "head.head.l")


def test_reparameterised_distilled_iformer_matches_autograd() -> None:
    model = with_attention(distillation=True, layer_scale_init_value=1e-6)
    model = reparameterize_model(randomise_batchnorm1d(prepare(model)))
    head = assert_matches_autograd(model, "iformer", size=32)
    assert head.feature_layer == "stages.3.blocks.2.mixer.module.2"
    # The two NormLinear heads averaged into one Linear: the logits are its output.
    assert (head.head_type, head.classifier) == ("linear", "head")


REFUSALS = {
    "unfused_distilled": (partial(with_attention, distillation=True), "reparameterise the model first"),
    "no_pool": (partial(convolutional, global_pool=""), "not a global average"),
    "no_classifier": (partial(convolutional, num_classes=0), "not a Linear classifier"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)
