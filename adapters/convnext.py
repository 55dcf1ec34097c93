"""timm ConvNeXt(-V2): last block's mlp.fc2 and layer scale, + shortcut; GAP -> LayerNorm -> Linear.

head_norm_first models (convnext_*_hnf) normalise across channels before the pool instead (norm_pre, LayerNorm2d),
then GAP -> Linear: exact through :class:`flatscan.contract.ChannelNorm`.
"""

from __future__ import annotations

from functools import partial
from typing import cast

from timm.layers import NormMlpClassifierHead
from timm.models.convnext import ConvNeXt
from torch import Tensor, nn

from flatscan.contract import NormalisedHead, Tap, channel_layer_norm, require_average_pool, require_linear
from flatscan.errors import UnsupportedModel
from flatscan.flatness import Activation
from flatscan.registry import register


def _head_logits(head: NormMlpClassifierHead, pooled: Tensor) -> Tensor:
    """NormMlpClassifierHead.forward after its global pool, on the pooled vector (N, C)."""
    x = head.flatten(head.norm(pooled[:, :, None, None]))
    return head.fc(head.drop(head.pre_logits(x)))


@register("convnext", ConvNeXt)
def describe_convnext(model: ConvNeXt) -> NormalisedHead:
    stage = cast(nn.Sequential, model.stages)[-1]
    block_name = f"stages.{len(model.stages) - 1}.blocks.{len(stage.blocks) - 1}"  # type: ignore[arg-type]
    block = stage.blocks[-1]  # type: ignore[index]
    fc2 = block.mlp.fc2  # type: ignore[union-attr]
    # The layer scale gamma is the per-channel scale; without one the scale is 1.
    scale = block.gamma.detach() if block.gamma is not None else fc2.weight.new_ones(fc2.weight.shape[0])  # type: ignore[union-attr]
    head = model.head
    require_average_pool(head.global_pool, "head.global_pool")
    require_linear(head.fc, "head.fc")
    if not isinstance(model.norm_pre, nn.Identity):  # head_norm_first: LayerNorm2d -> GAP -> Linear
        return NormalisedHead(
            feature_layer=f"{block_name}.mlp.fc2",
            pre_activation=Tap("norm_pre", "output"),
            pooled=Tap("head.fc", "input"),
            channel_scale=scale,
            activation=Activation("identity"),
            classifier="head.fc",
            coupling=channel_layer_norm(model, "norm_pre"),
        )
    if not isinstance(head, NormMlpClassifierHead):
        raise UnsupportedModel(f"head is {type(head).__name__}, not timm's NormMlpClassifierHead")
    return NormalisedHead(
        feature_layer=f"{block_name}.mlp.fc2",
        pre_activation=Tap(block_name, "output"),
        pooled=Tap("head.global_pool", "output"),
        channel_scale=scale,
        activation=Activation("identity"),
        classifier="head.fc",
        head_fn=partial(_head_logits, head),
    )
