"""RDNet quirks (the contract test covers the plain Block): the BlockESE tail (1x1 conv -> eSE gate -> layer scale,
concatenated into the last growth_rate channels) against autograd, and a norm before the pool refused."""

from __future__ import annotations

import pytest
from helpers.adapters import assert_matches_autograd, assert_refused, images_and_labels, prepare
from helpers.tiny_models import tiny_rdnet
from timm.layers import EffectiveSEModule
from timm.layers.activations import HardSigmoid
from timm.models.rdnet import RDNet

import flatscan


def tiny_rdnet_ese(twice_differentiable: bool = True) -> RDNet:
    """BlockESE blocks; the eSE gate's nn.Hardsigmoid (no second derivative in autograd) is swapped for timm's
    HardSigmoid, the same function relu6(x + 3) / 6, for the autograd reference."""
    model = tiny_rdnet("BlockESE")
    if twice_differentiable:
        for module in model.modules():
            if isinstance(module, EffectiveSEModule):
                module.gate = HardSigmoid()
    return model


def test_ese_block_matches_autograd() -> None:
    # prepare() draws the layer scale gamma in [0.5, 1.5): folded into the gate's alpha, it is exercised.
    head = assert_matches_autograd(tiny_rdnet_ese(), "rdnet", size=32)
    assert head.feature_layer == "dense_stages.1.2.dense_block1.layers.layers.4"
    assert head.channels == slice(16, 24)
    assert head.coupling is not None and "EffectiveSEModule" in head.coupling.label
    assert head.head_type == "general"


def test_ese_block_is_verified_with_its_own_hardsigmoid() -> None:
    # flatscan.verify swaps nn.Hardsigmoid for a twice-differentiable copy itself.
    model = prepare(tiny_rdnet_ese(twice_differentiable=False))
    result = flatscan.verify(model, images_and_labels(size=32), pairs=8)
    assert result.passed, result


REFUSALS = {
    "norm_before_pool": (lambda: tiny_rdnet(head_norm_first=True), "head_norm_first"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)
