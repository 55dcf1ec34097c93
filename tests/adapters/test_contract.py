"""The adapter contract, for every family in one table: each tiny model's closed form equals the brute-force
autograd Hessian (helpers.adapters.assert_matches_autograd, float64, rtol 1e-10) and its head is the expected one;
the generic refusals (a pool that is not a global average, no Linear classifier, generic layers outside the class)
say why. Per-family files (tests/adapters/test_<family>.py) keep only their family's quirks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import pytest
import timm
from helpers.adapters import CLASSES, assert_matches_autograd, assert_refused, tiny_vgg
from helpers.tiny_models import (
    narrow_hrnet,
    tiny_cspnext,
    tiny_densenet,
    tiny_dpn,
    tiny_fasternet,
    tiny_lcnetv2,
    tiny_lowformer,
    tiny_metanext,
    tiny_nasnet,
    tiny_rdnet,
    tiny_starnet,
)
from timm.layers import BlurPool2d, ConvNormAct, ScaledStdConv2d
from torch import nn

import flatscan


@dataclass(frozen=True)
class Case:
    """A tiny model of ``family`` (built by ``build``) scanned on ``size`` px images; ``expect``: head attributes."""

    family: str
    build: Callable[[], nn.Module]
    size: int = 40
    expect: dict[str, object] = field(default_factory=dict)  # dotted attribute of the head -> expected value


def head_attribute(head: flatscan.NormalisedHead, path: str) -> object:
    value: object = head
    for name in path.split("."):
        value = getattr(value, name)
    return value


CASES = {
    # StarNet: the last block's depthwise (grouped) dwconv2 + shortcut, then norm (BatchNorm) -> GAP -> Linear.
    "starnet": Case(
        "starnet", tiny_starnet, 32, {"feature_layer": "stages.1.1.dwconv2.conv", "activation.name": "identity"}
    ),
    # LCNetV2: pool, then conv_head (1x1, no norm) -> act2 -> classifier, with L = 1.
    "lcnetv2": Case("lcnetv2", tiny_lcnetv2, 32, {"feature_layer": "conv_head", "activation.name": "relu"}),
    # MetaNeXt (InceptionNeXt): last block's mlp.fc2, layer scale gamma, + shortcut; MlpClassifierHead.
    "inception_next": Case(
        "inception_next",
        tiny_metanext,
        32,
        {"feature_layer": "stages.3.blocks.0.mlp.fc2", "classifier": "head.fc2", "head_type": "general"},
    ),
    # CspNext: the last CSP layer's final_conv (1x1 conv, BatchNorm, SiLU) after its eSE attention -> GAP -> Linear.
    **{
        f"cspnext-{name}": Case(
            "cspnext",
            partial(tiny_cspnext, channel_attention=attention),
            32,
            {"feature_layer": "stages.3.2.final_conv.conv", "activation.name": "silu"},
        )
        for name, attention in [("ese", True), ("no_attention", False)]
    },
    # FasterNet: pool, then conv_head -> act -> classifier; fasternet_t0/t1 use GELU (the curvature term), others ReLU.
    **{
        f"fasternet-{name}": Case(
            "fasternet",
            partial(tiny_fasternet, act_layer=act_layer),
            32,
            {"feature_layer": "conv_head", "activation.name": name},
        )
        for name, act_layer in [("gelu", nn.GELU), ("relu", nn.ReLU)]
    },
    # DenseNet: 8 stem channels + 4, halved by the transition, + 2 layers of 4: the last 4 of 14 pooled channels.
    **{
        f"densenet-{stem_type or 'plain'}": Case(
            "densenet",
            partial(tiny_densenet, stem_type=stem_type),
            32,
            {
                "feature_layer": "features.denseblock2.denselayer2.conv2",
                "channels": slice(10, 14),
                "channel_scale.shape": (4,),
            },
        )
        for stem_type in ["", "deep"]
    },
    # DPN-b: 512 residual channels + 3 * 4 dense channels + 4 more: the last 4 of 528 pooled channels.
    **{
        f"dpn-{act}": Case(
            "dpn",
            partial(tiny_dpn, act_layer=act),
            32,
            {
                "feature_layer": "features.conv5_2.c1x1_c2",
                "activation.name": act,
                "channels": slice(524, 528),
                "channel_scale.shape": (4,),
            },
        )
        for act in ["relu", "silu"]
    },
    # LowFormer: in_conv (1x1 conv -> BatchNorm -> hard-swish) -> GAP -> Linear, LayerNorm, act -> Linear.
    **{
        f"lowformer-attn_{attn}": Case(
            "lowformer",
            partial(tiny_lowformer, attn=attn),
            32,
            {
                "feature_layer": "in_conv.conv",
                "activation.name": "hardswish",
                "head_type": "general",
                "classifier": "classifier",
            },
        )
        for attn in [True, False]
    },
    # HRNet: final_layer (1x1 conv -> BatchNorm -> ReLU) after the summed resolution branches, GAP -> Linear.
    "hrnet": Case("hrnet", narrow_hrnet, 64, {"feature_layer": "final_layer.0", "activation.name": "relu"}),
    # NASNet-A: cell_17's last branch feeds the last 16 of 96 pooled channels.
    "nasnet": Case(
        "nasnet",
        tiny_nasnet,
        40,
        {
            "feature_layer": "cell_17.comb_iter_4_left.separable_2.pointwise_conv2d",
            "channels": slice(80, 96),
            "activation.name": "relu",
        },
    ),
    # RDNet: 8 input features + 8 from the first block, then the last block's 8.
    "rdnet": Case(
        "rdnet",
        tiny_rdnet,
        32,
        {"feature_layer": "dense_stages.1.2.dense_block1.layers.layers.4", "channels": slice(16, 24)},
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_family_matches_autograd(name: str) -> None:
    case = CASES[name]
    head = assert_matches_autograd(case.build(), case.family, size=case.size)
    for path, expected in case.expect.items():
        assert head_attribute(head, path) == expected, path


MAX_POOL, NO_CLASSIFIER = "not a global average", "not a Linear classifier"
REFUSALS: dict[str, tuple[Callable[[], nn.Module], str, int]] = {
    "starnet-max_pool": (partial(tiny_starnet, global_pool="max"), MAX_POOL, 32),
    "lcnetv2-max_pool": (partial(tiny_lcnetv2, global_pool="max"), MAX_POOL, 32),
    "inception_next-max_pool": (partial(tiny_metanext, global_pool="max"), MAX_POOL, 32),
    "cspnext-max_pool": (partial(tiny_cspnext, global_pool="max"), MAX_POOL, 32),
    "densenet-max_pool": (partial(tiny_densenet, global_pool="max"), MAX_POOL, 32),
    "densenet-no_classifier": (partial(tiny_densenet, num_classes=0), NO_CLASSIFIER, 32),
    "dpn-max_pool": (partial(tiny_dpn, global_pool="max"), MAX_POOL, 32),
    "lowformer-max_pool": (partial(tiny_lowformer, global_pool="max"), MAX_POOL, 32),
    "lowformer-no_classifier": (partial(tiny_lowformer, num_classes=0), NO_CLASSIFIER, 32),
    "hrnet-max_pool": (partial(timm.create_model, "hrnet_w18_small", global_pool="max"), MAX_POOL, 64),
    "nasnet-max_pool": (partial(tiny_nasnet, global_pool="max"), MAX_POOL, 40),
    "nasnet-no_classifier": (partial(tiny_nasnet, num_classes=0), NO_CLASSIFIER, 40),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_generic_refusals_say_why(name: str) -> None:
    build, reason, size = REFUSALS[name]
    assert_refused(build(), reason, size=size)


def test_weight_standardised_feature_layer_is_refused() -> None:
    model = tiny_vgg()
    model.pre_logits.fc2 = ScaledStdConv2d(24, 24, 1)
    with pytest.raises(flatscan.UnsupportedModel, match="transforms its weight"):
        flatscan.describe(model)


def test_activation_without_closed_form_is_refused() -> None:
    model = tiny_vgg()
    model.pre_logits.act2 = nn.Sequential(nn.ReLU(), nn.ReLU())
    with pytest.raises(flatscan.UnsupportedModel, match="Sequential"):
        flatscan.describe(model)


def test_anti_aliased_conv_norm_act_is_refused() -> None:
    from timm.models.rexnet import RexNet

    model = RexNet(num_classes=CLASSES, width_mult=0.1, initial_chs=4, final_chs=16, depth_mult=0.2)
    last = model.features[-1]
    model.features[-1] = ConvNormAct(last.in_channels, last.out_channels, stride=2, aa_layer=BlurPool2d)
    with pytest.raises(flatscan.UnsupportedModel, match="blurs and subsamples"):
        flatscan.describe(model)
