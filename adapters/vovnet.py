"""timm VoVNet: the last OSA block's conv_concat (ConvNormAct: 1x1 conv, BatchNorm, activation) -> GAP -> Linear.

The eSE variants (all of timm's pretrained VoVNets) gate conv_concat's activation w by a function of its mean
and may add the shortcut after: v = gate(mean_p w) * w + r, measured exactly through the pooled mean
(:func:`flatscan.contract.squeeze_excitation`, with the activation as the inner one). A residual block without
a gate (the shortcut added after the activation) is refused.
"""

from __future__ import annotations

from timm.models.vovnet import OsaBlock, VovNet

from flatscan.contract import (
    NormalisedHead,
    Tap,
    activation_of,
    batchnorm_scale,
    conv_norm_act,
    normalised_head,
    require_average_pool,
    require_linear,
    require_plain_conv,
    squeeze_excitation,
    submodule,
)
from flatscan.errors import UnsupportedModel
from flatscan.flatness import Activation
from flatscan.registry import register


@register("vovnet", VovNet)
def describe_vovnet(model: VovNet) -> NormalisedHead:
    block_name = f"stages.{len(model.stages) - 1}.blocks.{len(model.stages[-1].blocks) - 1}"  # type: ignore[arg-type]
    block = submodule(model, block_name)
    if not isinstance(block, OsaBlock):
        raise UnsupportedModel(f"{block_name} is {type(block).__name__}, not an OsaBlock: not the layout it knows")
    conv, norm, act = conv_norm_act(model, f"{block_name}.conv_concat")
    if block.attn is None:
        if block.residual:
            raise UnsupportedModel(
                f"{block_name} adds its shortcut after conv_concat's activation and applies none after it: the "
                "pooled vector is not the average of an activation of v = s z + t + r"
            )
        return normalised_head(
            model, feature_layer=conv, norm=norm, activation=act, pool="head.global_pool", classifier="head.fc"
        )
    require_average_pool(submodule(model, "head.global_pool"), "head.global_pool")
    require_linear(submodule(model, "head.fc"), "head.fc")
    require_plain_conv(model, conv)
    return NormalisedHead(
        feature_layer=conv,
        pre_activation=Tap("head.global_pool", "input"),
        pooled=Tap("head.fc", "input"),
        channel_scale=batchnorm_scale(submodule(model, norm), norm),
        activation=Activation("identity"),
        classifier="head.fc",
        coupling=squeeze_excitation(
            model, f"{block_name}.attn", Tap(act, "input"), inner=activation_of(submodule(model, act), act)
        ),
    )
