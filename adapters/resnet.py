"""timm ResNet / ResNeXt / ResNeSt / SK-ResNet / Res2Net: the last block's last conv, its BatchNorm, + shortcut, act.

Block endings: Bottleneck-style convN / bnN / actN (N = 3, or 2 for BasicBlock-style), SK-ResNet's
ConvNormAct convN (conv, bn with no activation) then ``act``, and Res2Net's conv3 / bn3 then ``relu``.
A squeeze-excitation gate after bnN (SE-ResNe(X)t, ECA-ResNet, ResNet-RS, SENet-154) and a GroupNorm in place
of bnN (resnet50_gn) couple the tail through pooled statistics (:class:`flatscan.contract.PooledCoupling`).
"""

from __future__ import annotations

from dataclasses import replace

from timm.models.res2net import Bottle2neck
from timm.models.resnet import ResNet
from timm.models.sknet import SelectiveKernelBasic, SelectiveKernelBottleneck
from torch import nn

from flatscan.contract import (
    NormalisedHead,
    PooledCoupling,
    Tap,
    activation_of,
    batchnorm_scale,
    conv_norm_act,
    group_norm,
    normalised_head,
    require_average_pool,
    require_linear,
    squeeze_excitation,
)
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


def _refuse_gate(block: nn.Module, block_name: str) -> None:
    if getattr(block, "se", None) is not None:
        raise UnsupportedModel(
            f"{block_name}.se ({type(block.se).__name__}) gates the feature layer's output with a value "
            "computed from that output, inside a block ending flatscan reads only element-wise"
        )


def _block_ending(model: ResNet, block: nn.Module, block_name: str, last: int) -> NormalisedHead:
    """convN -> bnN (BatchNorm, or GroupNorm) -> [se gate] -> + shortcut -> actN."""
    norm_name = f"{block_name}.bn{last}"
    norm = getattr(block, f"bn{last}")
    gate = getattr(block, "se", None)
    coupling: PooledCoupling | None
    if isinstance(norm, nn.GroupNorm):
        if gate is not None:
            raise UnsupportedModel(f"{block_name} has both a GroupNorm and a gate after the feature layer")
        scale = norm.weight.new_ones(norm.num_channels).detach()
        coupling = group_norm(model, norm_name)
        coupling = replace(coupling, affine_output=Tap(norm_name, "output"))
    else:
        scale = batchnorm_scale(norm, norm_name)
        coupling = None if gate is None else squeeze_excitation(model, f"{block_name}.se", Tap(norm_name, "output"))
    return NormalisedHead(
        feature_layer=f"{block_name}.conv{last}",
        pre_activation=Tap(f"{block_name}.act{last}", "input"),
        pooled=Tap("fc", "input"),
        channel_scale=scale,
        activation=activation_of(getattr(block, f"act{last}"), f"{block_name}.act{last}"),
        classifier="fc",
        coupling=coupling,
    )


def _selective_kernel(model: ResNet, block: nn.Module, block_name: str) -> NormalisedHead:
    """SK-ResNet: the last ConvNormAct (conv, BatchNorm, no activation), + shortcut, ``act``."""
    last = 3 if isinstance(block, SelectiveKernelBottleneck) else 2
    conv, norm, norm_act = conv_norm_act(model, f"{block_name}.conv{last}")
    if not isinstance(model.get_submodule(norm_act), nn.Identity):
        raise UnsupportedModel(f"{norm_act} applies an activation before the residual add: not v = s z + t + r")
    return normalised_head(
        model,
        feature_layer=conv,
        norm=norm,
        activation=f"{block_name}.act",
        pool="global_pool",
        classifier="fc",
    )


def _res2net(model: ResNet, block: Bottle2neck, block_name: str) -> NormalisedHead:
    """Res2Net: conv3 -> bn3 [+ shortcut] -> relu, where ``relu`` is one module the block calls scale + 1 times.

    A hook on that module cannot single out its last call, so the pre-activation is read after it, at the
    pool's input. For ReLU that is exact: relu(v) > 0 exactly where v > 0, so sigma'(v) = 1[relu(v) > 0] and
    sigma'' = 0 are the same functions of relu(v) as of v, and relu(relu(v)) = relu(v) gives the same pool.
    """
    where = f"{block_name}.relu"
    if type(block.relu) is not nn.ReLU:
        raise UnsupportedModel(
            f"{where} ({type(block.relu).__name__}) runs several times inside Res2Net's Bottle2neck, so its last "
            "input cannot be tapped; flatscan reads the pre-activation after it, which is exact only for ReLU"
        )
    return normalised_head(
        model,
        feature_layer=f"{block_name}.conv3",
        norm=f"{block_name}.bn3",
        activation=where,
        pool="global_pool",
        classifier="fc",
        pre_activation=Tap("global_pool", "input"),
    )


@register("resnet", ResNet)
def describe_resnet(model: ResNet) -> NormalisedHead:
    require_average_pool(model.global_pool, "global_pool")
    require_linear(model.fc, "fc")
    block_name = f"layer4.{len(model.layer4) - 1}"  # type: ignore[arg-type]
    block: nn.Module = model.layer4[-1]  # type: ignore[assignment, index]
    if isinstance(block, (SelectiveKernelBasic, SelectiveKernelBottleneck)):
        _refuse_gate(block, block_name)
        return _selective_kernel(model, block, block_name)
    if isinstance(block, Bottle2neck):
        _refuse_gate(block, block_name)
        return _res2net(model, block, block_name)
    # Bottleneck-style blocks end in conv3/bn3/act3, BasicBlock-style ones in conv2/bn2/act2.
    last = next((i for i in (3, 2) if all(hasattr(block, f"{n}{i}") for n in ("conv", "bn", "act"))), None)
    if last is None:
        raise UnsupportedModel(
            f"{block_name} is {type(block).__name__}, a block that does not end in convN, bnN, actN "
            "(nor SK-ResNet's or Res2Net's ending); no adapter knows its layout"
        )
    return _block_ending(model, block, block_name, last)
