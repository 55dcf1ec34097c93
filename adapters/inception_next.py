"""timm MetaNeXt (InceptionNeXt): the last block's mlp.fc2 (1x1 conv), layer scale gamma, + shortcut.

The head is MlpClassifierHead: GAP -> fc1 -> act -> norm -> fc2 (the classifier), a general head.
"""

from __future__ import annotations

from functools import partial

from timm.models.inception_next import MetaNeXt, MetaNeXtBlock, MlpClassifierHead
from torch import Tensor

from flatscan.contract import NormalisedHead, Tap, layer_scaled_residual_head, require_average_pool, submodule
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


def _head_logits(head: MlpClassifierHead, pooled: Tensor) -> Tensor:
    """MlpClassifierHead.forward after its global pool, on the pooled vector (N, C)."""
    return head.fc2(head.drop(head.norm(head.act(head.fc1(pooled)))))


@register("inception_next", MetaNeXt)
def describe_inception_next(model: MetaNeXt) -> NormalisedHead:
    head = model.head
    if not isinstance(head, MlpClassifierHead):
        raise UnsupportedModel(f"head is {type(head).__name__}, not MetaNeXt's MlpClassifierHead")
    require_average_pool(head.global_pool, "head.global_pool")
    block_name = f"stages.{len(model.stages) - 1}.blocks.{len(model.stages[-1].blocks) - 1}"  # type: ignore[arg-type]
    block = submodule(model, block_name)
    if not isinstance(block, MetaNeXtBlock):
        raise UnsupportedModel(f"{block_name} is {type(block).__name__}, not a MetaNeXtBlock: not the layout it knows")
    return layer_scaled_residual_head(
        model,
        feature_layer=f"{block_name}.mlp.fc2",
        layer_scale=block.gamma,
        pre_activation=Tap(block_name, "output"),
        pooled=Tap("head.global_pool", "output"),
        classifier="head.fc2",
        head_fn=partial(_head_logits, head),
    )
