"""timm MetaFormer (PoolFormer v1/v2, ConvFormer, CAFormer): the last block's mlp.fc2, layer scale, + shortcut.

The block ends ``x = res_scale2(x) + layer_scale2(mlp(norm2(x)))`` and the stage hands its output (channel-first;
CAFormer's attention stages run channels-last, with a Linear fc2) to the head: GAP -> norm -> Linear or MlpHead.
The norm after the pool is part of the head function.
"""

from __future__ import annotations

from functools import partial

from timm.layers import Mlp
from timm.models.metaformer import MetaFormer, Scale
from torch import Tensor, nn

from flatscan.contract import NormalisedHead, Tap, layer_scaled_residual_head, require_average_pool, submodule
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


def _head_logits(head: nn.Sequential, pooled: Tensor) -> Tensor:
    """MetaFormer.forward_head after the global pool, on the pooled vector (N, C)."""
    return head.fc(head.drop(head.flatten(head.norm(pooled[:, :, None, None]))))  # type: ignore[operator]


@register("metaformer", MetaFormer)
def describe_metaformer(model: MetaFormer) -> NormalisedHead:
    require_average_pool(submodule(model, "head.global_pool"), "head.global_pool")
    fc = submodule(model, "head.fc")
    # MlpHead (fc1 -> act -> norm -> fc2) or a Linear classifier.
    classifier = "head.fc.fc2" if isinstance(getattr(fc, "fc2", None), nn.Linear) else "head.fc"
    stage_name = f"stages.{len(model.stages) - 1}"
    block_name = f"{stage_name}.blocks.{len(model.stages[-1].blocks) - 1}"  # type: ignore[arg-type]
    mlp = submodule(model, f"{block_name}.mlp")
    if not isinstance(mlp, Mlp):
        raise UnsupportedModel(f"{block_name}.mlp is {type(mlp).__name__}, not timm's Mlp: not the layout it knows")
    layer_scale = submodule(model, f"{block_name}.layer_scale2")
    if not isinstance(layer_scale, (Scale, nn.Identity)):
        raise UnsupportedModel(f"{block_name}.layer_scale2 is {type(layer_scale).__name__}, not a per-channel Scale")
    return layer_scaled_residual_head(
        model,
        feature_layer=f"{block_name}.mlp.fc2",
        # res_scale2 scales the shortcut only: part of the residual, not of the feature layer's output.
        layer_scale=layer_scale.scale if isinstance(layer_scale, Scale) else None,
        pre_activation=Tap(stage_name, "output"),
        pooled=Tap("head.global_pool", "output"),
        classifier=classifier,
        head_fn=partial(_head_logits, model.head),
    )
