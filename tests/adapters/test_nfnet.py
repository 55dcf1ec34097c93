"""NormFreeNet, measured in its inference form: final_conv (or the last block's conv3) -> [gamma *] act -> GAP -> fc."""

from __future__ import annotations

import pytest
import torch
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused, images_and_labels
from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from timm.models.nfnet import NfCfg, NormFreeNet
from torch import nn

import flatscan


def tiny_nfnet(**kwargs: object) -> NormFreeNet:
    """Four one-block stages of 8-16 channels; kwargs go to NfCfg."""
    cfg = NfCfg(depths=(1, 1, 1, 1), channels=(8, 16, 16, 16), stem_chs=8, **kwargs)
    model = NormFreeNet(cfg, num_classes=CLASSES)
    with torch.no_grad():  # zero-initialised skip-init and conv gains would make the residual branch vanish
        for module in model.modules():
            if getattr(module, "skipinit_gain", None) is not None:
                module.skipinit_gain.fill_(0.7)
            if isinstance(module, (ScaledStdConv2d, ScaledStdConv2dSame)) and not module.gain.any():
                module.gain.fill_(0.8)
    return model


BUILDS = {
    # NFNet-F: gamma-scaled GELU, SE inside the blocks (before final_conv), a final 1x1 conv, 'SAME' padding.
    "dm_nfnet": lambda: tiny_nfnet(
        act_layer="gelu",
        gamma_in_act=True,
        num_features=24,
        attn_layer="se",
        attn_kwargs={"rd_ratio": 0.5},
        extra_conv=True,
        group_size=8,
        same_padding=True,
        skipinit=True,
    ),
    # NF-RegNet / ECA-NFNet-L style: SiLU, final conv.
    "nf_regnet": lambda: tiny_nfnet(
        act_layer="silu", num_features=24, reg=True, attn_layer="se", attn_kwargs={"rd_ratio": 0.5}
    ),
    # NF-ResNet: no final conv; the last block's conv3 * alpha + shortcut -> ReLU.
    "nf_resnet": lambda: tiny_nfnet(act_layer="relu", stem_type="7x7_pool"),
}


@pytest.mark.parametrize("name", BUILDS)
def test_nfnet_matches_autograd(name: str) -> None:
    model = flatscan.inference_form(BUILDS[name]())
    head = assert_matches_autograd(model, "nfnet", size=32)
    if name == "nf_resnet":
        assert head.feature_layer == "stages.3.0.conv3"
        assert head.channel_scale.unique().tolist() == [0.2]  # the block's alpha
    else:
        assert head.feature_layer == "final_conv"
    if name == "dm_nfnet":
        assert head.activation.name == "gelu" and head.activation.gain > 1


def test_the_stored_weight_form_is_refused_with_the_fix() -> None:
    assert_refused(BUILDS["nf_regnet"](), "flatscan.inference_form")


def test_attention_after_the_last_conv_is_refused() -> None:
    model = flatscan.inference_form(tiny_nfnet(act_layer="relu", attn_layer="se", attn_kwargs={"rd_ratio": 0.5}))
    assert_refused(model, "attn_last")


@pytest.mark.parametrize(
    "conv",
    [
        lambda: StdConv2d(4, 6, 3, stride=2),
        lambda: StdConv2dSame(4, 6, 3, stride=2),
        lambda: ScaledStdConv2d(4, 6, 3, gain_init=1.3),
        lambda: ScaledStdConv2dSame(4, 6, 3, stride=2),
    ],
    ids=["std", "std_same", "scaled_std", "scaled_std_same"],
)
def test_inference_form_keeps_the_function(conv) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(conv(), nn.ReLU()).double()
    with torch.no_grad():
        model[0].weight.normal_()
        if getattr(model[0], "bias", None) is not None:
            model[0].bias.normal_()
    images = images_and_labels(size=9)[0][:, :3].repeat(1, 2, 1, 1)[:, :4]
    expected = model(images)
    fused = flatscan.inference_form(model)
    assert type(fused[0]).forward is not type(conv()).forward
    torch.testing.assert_close(fused(images), expected, rtol=1e-12, atol=1e-12)
