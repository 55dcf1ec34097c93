"""timm SHViT: the last block's FFN (pw2 conv -> BatchNorm) + shortcut -> GAP -> NormLinear (BatchNorm1d -> Linear).

Works on the model as built and after ``timm.utils.reparameterize_model`` (pw2 and the head fused into a biased
Conv2d and a Linear).
"""

from __future__ import annotations

from timm.models.shvit import FFN, BasicBlock, Residual, SHViT

from flatscan.contract import (
    NormalisedHead,
    Tap,
    bn_linear_classifier,
    conv_bn,
    layer_scaled_residual_head,
    require_average_pool,
)
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


@register("shvit", SHViT)
def describe_shvit(model: SHViT) -> NormalisedHead:
    require_average_pool(model.global_pool, "global_pool")
    blocks = model.stages[-1].blocks
    block_name = f"stages.{len(model.stages) - 1}.blocks.{len(blocks) - 1}"  # type: ignore[arg-type]
    if not len(blocks) or not isinstance(blocks[-1], BasicBlock):  # type: ignore[arg-type, index]
        raise UnsupportedModel(f"the last stage does not end in a BasicBlock (at {block_name})")
    ffn = blocks[-1].ffn  # type: ignore[index]
    if not isinstance(ffn, Residual) or not isinstance(ffn.m, FFN):
        raise UnsupportedModel(f"{block_name}.ffn is {type(ffn).__name__}, not a residual FFN")
    # The block ends in x + pw2(act(pw1(x))): v = s * conv(A) + t + x is the block's output, pooled as is.
    conv, scale = conv_bn(model, f"{block_name}.ffn.m.pw2")
    classifier, head_fn = bn_linear_classifier(model, "head")
    return layer_scaled_residual_head(
        model,
        feature_layer=conv,
        layer_scale=scale,
        pre_activation=Tap(block_name),
        pooled=Tap("global_pool"),
        classifier=classifier,
        head_fn=head_fn,
    )
