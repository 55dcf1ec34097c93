"""timm MambaOut: the last gated CNN block's fc2 (Linear on channels-last maps), layer scale, + shortcut.

The maps stay channels-last (N, H, W, C) up to the head, which averages them itself (``x.mean((1, 2))``)
and then applies norm -> [fc -> act -> norm] -> fc (MlpHead) or norm -> MLP -> fc (ClNormMlpClassifierHead):
all of it after the pool, so it is the head function.
"""

from __future__ import annotations

from functools import partial

from timm.layers import ClNormMlpClassifierHead, LayerScale
from timm.models.mambaout import GatedConvBlock, MambaOut, MlpHead
from torch import Tensor, nn

from flatscan.contract import NormalisedHead, Tap, layer_scaled_residual_head, submodule
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


def _head_logits(head: nn.Module, pooled: Tensor) -> Tensor:
    """The head after its own global average, on the pooled vector (N, C)."""
    dropout = head.head_dropout if isinstance(head, MlpHead) else head.drop
    return head.fc(dropout(head.pre_logits(head.norm(pooled))))  # type: ignore[operator]


@register("mambaout", MambaOut)
def describe_mambaout(model: MambaOut) -> NormalisedHead:
    head = model.head
    if not isinstance(head, (MlpHead, ClNormMlpClassifierHead)):
        raise UnsupportedModel(f"head is {type(head).__name__}, not MambaOut's MlpHead or ClNormMlpClassifierHead")
    if head.pool_type != "avg":
        raise UnsupportedModel(
            f"head pools with {head.pool_type or 'nothing'!r}, not a global average: the measure is defined for a "
            "global average pool"
        )
    block_name = f"stages.{len(model.stages) - 1}.blocks.{len(model.stages[-1].blocks) - 1}"  # type: ignore[arg-type]
    block = submodule(model, block_name)
    if not isinstance(block, GatedConvBlock):
        raise UnsupportedModel(f"{block_name} is {type(block).__name__}, not a GatedConvBlock: not the layout it knows")
    if not isinstance(block.ls, (LayerScale, nn.Identity)):
        raise UnsupportedModel(f"{block_name}.ls is {type(block.ls).__name__}, not a per-channel LayerScale")
    return layer_scaled_residual_head(
        model,
        feature_layer=f"{block_name}.fc2",
        layer_scale=block.ls.gamma if isinstance(block.ls, LayerScale) else None,
        pre_activation=Tap(block_name, "output", channels_last=True),
        pooled=Tap("head.norm", "input"),
        classifier="head.fc",
        head_fn=partial(_head_logits, head),
    )
