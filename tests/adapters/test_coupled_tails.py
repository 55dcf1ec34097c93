"""Tails coupled through pooled statistics, on the real timm modules, against brute-force autograd Hessians.

Squeeze-excitation gates (timm's SEModule, EcaModule, EffectiveSEModule, legacy SENet's SEModule) and GroupNorm
after the feature layer: the loss Hessian w.r.t. the feature layer's output is an element-wise part plus a part
through the pooled statistics (flatscan.flatness.coupled_terms). Each case compares flatscan.scan's Tr(H) and
relative flatness with the full autograd Hessian (float64, rtol 1e-10), and flatscan.verify's sampled block traces.
"""

from __future__ import annotations

from functools import partial

import pytest
import timm
import torch
from helpers.adapters import CLASSES, assert_matches_autograd, images_and_labels, prepare
from timm.layers import EvoNorm2dS0, EvoNorm2dS0a, GroupNorm, GroupNormAct, SEModule, create_conv2d, get_act_layer
from timm.layers.activations import HardSigmoid
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.resnetv2 import ResNetV2
from timm.models.vovnet import VovNet
from torch import nn

import flatscan
from flatscan.contract import exact_evo_norm_statistics


def tiny_resnet(block: type[nn.Module] = Bottleneck, **kwargs: object) -> ResNet:
    kwargs = {"channels": (4, 4, 4, 8), "stem_width": 8, "num_classes": CLASSES, **kwargs}
    return ResNet(block, (1, 1, 1, 2), **kwargs)  # type: ignore[arg-type]


def tiny_resnetv2(**kwargs: object) -> ResNetV2:
    kwargs = {"conv_layer": create_conv2d, "norm_layer": partial(GroupNormAct, num_groups=2), "stem_chs": 8, **kwargs}
    return ResNetV2([1, 1, 1, 2], channels=(8, 8, 8, 16), num_classes=CLASSES, **kwargs)  # type: ignore[arg-type]


def tiny_vovnet(**cfg: object) -> VovNet:
    """eSE VoVNet; the gate's Hardsigmoid is swapped for timm's HardSigmoid (relu6(x + 3) / 6, the same function),
    which the autograd reference can differentiate twice."""
    base = {
        "stem_chs": [4, 4, 8],
        "stage_conv_chs": [4, 4, 4, 4],
        "stage_out_chs": [8, 8, 8, 16],
        "layer_per_block": 1,
        "block_per_stage": [1, 1, 1, 1],
        "residual": False,
        "depthwise": False,
        "attn": "ese",
    }
    model = VovNet({**base, **cfg}, num_classes=CLASSES)
    for stage in model.stages:
        for block in stage.blocks:
            if block.attn is not None:
                block.attn.gate = HardSigmoid()
    return model


MODELS = {
    # seresnet50 / seresnext / resnetrs: bottleneck conv3 -> bn3 -> SEModule -> + shortcut -> act3.
    "se_bottleneck": (partial(tiny_resnet, block_args={"attn_layer": "se"}), "resnet", "layer4.1.conv3"),
    "se_resnext_silu": (
        partial(tiny_resnet, cardinality=2, base_width=32, act_layer=nn.SiLU, block_args={"attn_layer": "se"}),
        "resnet",
        "layer4.1.conv3",
    ),
    # ecaresnet*: the gate is a 1-D conv over channels of the pooled mean.
    "eca_bottleneck": (partial(tiny_resnet, block_args={"attn_layer": "eca"}), "resnet", "layer4.1.conv3"),
    "se_basic_gelu": (
        partial(tiny_resnet, BasicBlock, act_layer=get_act_layer("gelu"), block_args={"attn_layer": "se"}),
        "resnet",
        "layer4.1.conv2",
    ),
    # resnet50_gn: GroupNorm in place of bn3, + shortcut, act3.
    "groupnorm_bottleneck": (
        partial(tiny_resnet, norm_layer=partial(GroupNorm, num_groups=2)),
        "resnet",
        "layer4.1.conv3",
    ),
    # BiT / resnetv2_50d_gn: pre-activation blocks, conv3 + shortcut, then the final GroupNormAct.
    "bit_preact": (tiny_resnetv2, "resnetv2", "stages.3.blocks.1.conv3"),
    "bit_preact_silu": (partial(tiny_resnetv2, act_layer="silu"), "resnetv2", "stages.3.blocks.1.conv3"),
    # ese_vovnet*: conv_concat (conv, BN, ReLU) -> eSE gate of the activation's mean -> [+ residual] -> pool.
    "ese_vovnet": (tiny_vovnet, "vovnet", "stages.3.blocks.0.conv_concat.conv"),
    "ese_vovnet_residual": (
        partial(tiny_vovnet, residual=True, block_per_stage=[1, 1, 1, 2]),
        "vovnet",
        "stages.3.blocks.1.conv_concat.conv",
    ),
}


@pytest.mark.parametrize("name", MODELS)
def test_coupled_tail_matches_autograd(name: str) -> None:
    build, family, feature_layer = MODELS[name]
    head = assert_matches_autograd(build(), family, size=32)
    assert head.feature_layer == feature_layer
    assert head.coupling is not None


@pytest.mark.parametrize("name", ["se_bottleneck", "bit_preact", "ese_vovnet"])
def test_coupled_tail_is_verified(name: str) -> None:
    build, _, _ = MODELS[name]
    model = prepare(build())
    result = flatscan.verify(model, images_and_labels(size=32), pairs=12)
    assert result.passed, result
    assert not result.degenerate


@pytest.mark.parametrize("name", ["legacy_seresnet18", "legacy_seresnext26_32x4d"])
def test_legacy_senet_is_verified(name: str) -> None:
    # Legacy SENet's widths are fixed (512+ channels in the last stage): a full Hessian is out of reach, so the
    # check is verify's sampled block traces against autograd Hessian-vector products.
    model = prepare(timm.create_model(name, num_classes=CLASSES))
    head = flatscan.describe(model)
    assert head.coupling is not None and "SEModule" in head.coupling.label
    result = flatscan.verify(model, images_and_labels(size=32, n=2), pairs=8)
    assert result.passed, result


def test_groupnorm_efficientnet_head_matches_autograd() -> None:
    # test_efficientnet_gn: conv_head -> GroupNormAct (bn2) -> GAP -> classifier.
    model = timm.create_model("test_efficientnet_gn", num_classes=CLASSES)
    head = assert_matches_autograd(model, "efficientnet", size=32)
    assert head.coupling is not None and head.coupling.moments == 2


def test_gate_the_adapter_misreads_is_refused() -> None:
    model = prepare(tiny_resnet(block_args={"attn_layer": "se"}))
    gate = model.layer4[1].se
    gate.forward = lambda x: 2 * SEModule.forward(gate, x)  # no longer the gate the adapter describes
    with pytest.raises(flatscan.UnsupportedModel, match="the adapter is wrong about this model"):
        flatscan.scan(model, [images_and_labels(size=32)], device="cpu")


def test_max_pooling_gate_is_refused() -> None:
    model = tiny_resnet(block_args={"attn_layer": partial(SEModule, add_maxpool=True)})
    with pytest.raises(flatscan.UnsupportedModel, match="max-pools"):
        flatscan.describe(model)


def test_layer_norm_efficientnet_head_is_verified() -> None:
    # test_efficientnet_ln: conv_head -> LayerNormAct2d (across channels, SiLU) -> GAP -> classifier.
    model = prepare(timm.create_model("test_efficientnet_ln", num_classes=CLASSES))
    head = flatscan.describe(model)
    assert head.coupling is not None and "LayerNorm" in head.coupling.label
    result = flatscan.verify(model, images_and_labels(size=32, n=2), pairs=8)
    assert result.passed, result


def randomise_evo_norms(model: nn.Module, seed: int = 6) -> nn.Module:
    """EvoNorm weights, biases and SiLU slopes v away from their init (1, 0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (EvoNorm2dS0, EvoNorm2dS0a)):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))
                if module.v is not None:
                    module.v.copy_(0.5 + torch.rand(module.v.shape, generator=generator))
    return model


@pytest.mark.parametrize("norm", [EvoNorm2dS0, EvoNorm2dS0a], ids=["s0", "s0a"])
def test_evo_norm_preact_matches_autograd(norm: type[nn.Module]) -> None:
    # resnetv2_50d_evos (EvoNorm-S0) and regnetz_*_evos (S0a): x * sigmoid(v x) / group_std(x) * weight + bias, its
    # own non-linearity, over conv3 + shortcut, then the pool.
    model = randomise_evo_norms(tiny_resnetv2(norm_layer=partial(norm, group_size=4)))
    with exact_evo_norm_statistics():  # timm takes the group std in float32; the reference needs float64
        head = assert_matches_autograd(model, "resnetv2", size=32)
    assert head.coupling is not None and head.coupling.statistics_of_input


@pytest.mark.parametrize("name", ["regnetz_c16_evos", "test_efficientnet_evos"])
def test_evo_norm_heads_are_verified(name: str) -> None:
    model = randomise_evo_norms(prepare(timm.create_model(name, num_classes=CLASSES)))
    head = flatscan.describe(model)
    assert head.coupling is not None and "EvoNorm" in head.coupling.label
    result = flatscan.verify(model, images_and_labels(size=64, n=2), pairs=8)
    assert result.passed, result
