"""timm ResNetV2 (pre-activation): the last block's last conv, + shortcut, then the final norm (BatchNorm + act).

v = s * (conv3(x) + shortcut) + t: the shortcut, scaled by the final BatchNorm, is the constant residual.
Non-pre-activation ResNetV2 (preact=False) ends like ResNet: conv3, norm3, + shortcut, act3.
BiT / GroupNorm models: the final GroupNormAct couples channels through group statistics (a coupled tail);
EvoNorm-S0 likewise. Their StdConv2d kernels are measured as the inference model applies them (flatscan.inference).
"""

from __future__ import annotations

from typing import Any

from timm.models.resnetv2 import Bottleneck, PreActBasic, PreActBottleneck, ResNetV2
from torch import nn

from flatscan.contract import EVO_NORMS, NormalisedHead, evo_norm_head, normalised_head, submodule
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


def _require_norm_act(model: nn.Module, norm: str) -> str:
    if not isinstance(getattr(submodule(model, norm), "act", None), nn.Module):
        raise UnsupportedModel(f"{norm} is {type(submodule(model, norm)).__name__}, not timm's BatchNormAct2d")
    return f"{norm}.act"


@register("resnetv2", ResNetV2)
def describe_resnetv2(model: ResNetV2) -> NormalisedHead:
    head: dict[str, Any] = {"pool": "head.global_pool", "classifier": "head.fc"}
    stage = len(model.stages) - 1
    block_name = f"stages.{stage}.blocks.{len(model.stages[stage].blocks) - 1}"  # type: ignore[arg-type]
    block = submodule(model, block_name)
    if isinstance(block, (PreActBottleneck, PreActBasic)):
        last = "conv3" if isinstance(block, PreActBottleneck) else "conv2"
        if isinstance(model.norm, EVO_NORMS):  # resnetv2_50d_evos: EvoNorm-S0, coupled through group statistics
            return evo_norm_head(model, feature_layer=f"{block_name}.{last}", norm="norm", **head)
        act = _require_norm_act(model, "norm")
        return normalised_head(model, feature_layer=f"{block_name}.{last}", norm="norm", activation=act, **head)
    if not isinstance(block, Bottleneck):
        raise UnsupportedModel(
            f"the last block {block_name} is {type(block).__name__}, a block the adapter does not know"
        )
    norm_act = _require_norm_act(model, f"{block_name}.norm3")
    if not isinstance(submodule(model, norm_act), nn.Identity):
        raise UnsupportedModel(f"{norm_act} applies an activation before the residual add: not v = s z + t + r")
    if not isinstance(model.norm, nn.Identity):
        raise UnsupportedModel("norm follows a non-pre-activation last block: not the layout the adapter knows")
    return normalised_head(
        model, feature_layer=f"{block_name}.conv3", norm=f"{block_name}.norm3", activation=f"{block_name}.act3", **head
    )
