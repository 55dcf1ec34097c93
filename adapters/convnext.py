"""timm ConvNeXt(-V2): last block's mlp.fc2 and layer scale, + shortcut; GAP -> LayerNorm -> Linear."""

from __future__ import annotations

from functools import partial

from timm.layers import NormMlpClassifierHead
from timm.models.convnext import ConvNeXt
from torch import Tensor, nn

from flatscan.contract import NormalisedHead, Tap, require_average_pool, require_linear
from flatscan.errors import UnsupportedModel
from flatscan.flatness import Activation
from flatscan.registry import register


def _head_logits(head: NormMlpClassifierHead, pooled: Tensor) -> Tensor:
    """NormMlpClassifierHead.forward after its global pool, on the pooled vector (N, C)."""
    x = head.flatten(head.norm(pooled[:, :, None, None]))
    return head.fc(head.drop(head.pre_logits(x)))


@register("convnext", ConvNeXt)
def describe_convnext(model: ConvNeXt) -> NormalisedHead:
    if not isinstance(model.norm_pre, nn.Identity):
        raise UnsupportedModel(
            "norm_pre normalises across channels at every position before the pool (head_norm_first): "
            "not a per-channel affine map"
        )
    head = model.head
    if not isinstance(head, NormMlpClassifierHead):
        raise UnsupportedModel(f"head is {type(head).__name__}, not timm's NormMlpClassifierHead")
    require_average_pool(head.global_pool, "head.global_pool")
    require_linear(head.fc, "head.fc")
    block_name = f"stages.{len(model.stages) - 1}.blocks.{len(model.stages[-1].blocks) - 1}"  # type: ignore[arg-type]
    block = model.stages[-1].blocks[-1]  # type: ignore[index]
    fc2 = block.mlp.fc2  # type: ignore[union-attr]
    # The layer scale gamma is the per-channel scale; without one the scale is 1.
    scale = block.gamma.detach() if block.gamma is not None else fc2.weight.new_ones(fc2.weight.shape[0])  # type: ignore[union-attr]
    return NormalisedHead(
        feature_layer=f"{block_name}.mlp.fc2",
        pre_activation=Tap(block_name, "output"),
        pooled=Tap("head.global_pool", "output"),
        channel_scale=scale,
        activation=Activation("identity"),
        classifier="head.fc",
        head_fn=partial(_head_logits, head),
    )
