"""ByobNet: final_conv, or the last block's last ConvNormAct + shortcut + act; RepVGG / MobileOne once fused."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import timm
import torch
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused
from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg
from timm.utils import reparameterize_model
from torch import nn

import flatscan


def tiny_byobnet(
    block: str,
    global_pool: str = "avg",
    last: dict | None = None,
    num_classes: int = CLASSES,
    img_size: int | None = None,
    **kwargs: object,
) -> ByobNet:
    """Stages of widths 8 and 16 (two blocks in the last) made of ``block``; kwargs override the ByoModelCfg."""
    blocks = (
        ByoBlockCfg(type=block, d=1, c=8, s=1, br=0.5),
        ByoBlockCfg(type=block, d=2, c=16, s=2, br=0.5, **(last or {})),
    )
    cfg = ByoModelCfg(blocks=blocks, stem_chs=8, stem_pool="", zero_init_last=False, **kwargs)  # type: ignore[arg-type]
    return ByobNet(cfg, num_classes=num_classes, global_pool=global_pool, img_size=img_size)


def fused(block: str, **kwargs: object) -> Callable[[], nn.Module]:
    """A RepVGG / MobileOne tiny model with its branches fused into reparam_conv (after the norms are randomised)."""

    def build() -> nn.Module:
        from helpers.adapters import prepare

        return reparameterize_model(prepare(tiny_byobnet(block, **kwargs)))

    return build


MODELS: dict[str, tuple[Callable[[], nn.Module], str, str]] = {
    # ResNet-ts style: bottleneck, SE on the 3x3 output (before conv3_1x1), identity shortcut in the last block.
    "bottleneck_se": (
        lambda: tiny_byobnet("bottle", act_layer="silu", attn_layer="se"),
        "stages.1.1.conv3_1x1.conv",
        "silu",
    ),
    # GENet / RegNetZ / ResNet33ts style: a 1x1 ConvNormAct after the last stage.
    "final_conv": (lambda: tiny_byobnet("bottle", num_features=12), "final_conv.conv", "relu"),
    "basic": (lambda: tiny_byobnet("basic"), "stages.1.1.conv2_kxk.conv", "relu"),
    "dark": (lambda: tiny_byobnet("dark", act_layer="silu"), "stages.1.1.conv2_kxk.conv", "silu"),
    "edge": (lambda: tiny_byobnet("edge"), "stages.1.1.conv2_1x1.conv", "relu"),
    # linear_out: no activation after the residual add; the pooled vector is the block output itself.
    "bottleneck_linear_out": (
        lambda: tiny_byobnet("bottle", last={"block_kwargs": {"linear_out": True}}),
        "stages.1.1.conv3_1x1.conv",
        "identity",
    ),
    "repvgg_fused": (fused("rep"), "stages.1.1.reparam_conv", "relu"),
    "mobileone_fused": (
        fused("one", last={"block_kwargs": {"num_conv_branches": 2}}),
        "stages.1.1.reparam_conv",
        "relu",
    ),
    # repvgg_d2se / mobileone_s4: act(attn(reparam_conv(x))), an SE gate on the fused conv's output (coupled).
    "repvgg_se_fused": (fused("rep", attn_layer="se"), "stages.1.1.reparam_conv", "relu"),
    "mobileone_se_fused": (
        fused("one", attn_layer="se", act_layer="silu", last={"block_kwargs": {"num_conv_branches": 2}}),
        "stages.1.1.reparam_conv",
        "silu",
    ),
}


@pytest.mark.parametrize("name", MODELS)
def test_byobnet_matches_autograd(name: str) -> None:
    build, feature_layer, activation = MODELS[name]
    head = assert_matches_autograd(build(), "byobnet", size=32)
    assert head.feature_layer == feature_layer
    assert head.activation.name == activation
    assert (head.coupling is not None) == name.endswith("_se_fused")


@pytest.mark.parametrize("name", ["mobileone_s4", "repvgg_d2se"])
def test_se_models_are_described_in_inference_form(name: str) -> None:
    model = flatscan.inference_form(timm.create_model(name, num_classes=CLASSES))
    head = flatscan.describe(model)
    assert head.coupling is not None and head.coupling.label == "SEModule gate"
    assert head.feature_layer.endswith("reparam_conv")


def se_after_feature_conv() -> ByobNet:
    # BasicBlock puts its attention after conv2_kxk (attn_last): a gate on the feature layer's own output.
    return tiny_byobnet("basic", attn_layer="se")


REFUSALS = {
    "unfused_repvgg": (lambda: tiny_byobnet("rep"), "reparameterise the model first"),
    "unfused_mobileone": (lambda: tiny_byobnet("one"), "reparameterise the model first"),
    "se_after_feature_conv": (se_after_feature_conv, "gates the feature layer's output"),
    "attention_pool_head": (
        lambda: tiny_byobnet(
            "bottle", "token", img_size=32, head_type="attn_abs", head_hidden_size=64, fixed_input_size=True
        ),
        "not timm's ClassifierHead",
    ),
    "max_pool": (lambda: tiny_byobnet("bottle", global_pool="max"), "not a global average"),
    "no_classifier": (lambda: tiny_byobnet("bottle", num_classes=0), "not a Linear classifier"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_say_why(name: str) -> None:
    build, reason = REFUSALS[name]
    assert_refused(build(), reason)


def test_group_norm_final_conv_matches_autograd() -> None:
    # A GroupNorm (one group) after final_conv: exact through the pooled moments (PooledCoupling).
    model = tiny_byobnet("bottle", num_features=12, norm_layer="groupnorm1")
    with torch.no_grad():
        norm = model.final_conv.bn
        norm.weight.copy_(torch.linspace(0.5, 1.5, norm.num_channels))
        norm.bias.copy_(torch.linspace(-0.3, 0.3, norm.num_channels))
    head = assert_matches_autograd(model, "byobnet", size=32)
    assert head.coupling is not None and head.coupling.label == "GroupNorm(1)"
