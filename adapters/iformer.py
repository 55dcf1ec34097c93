"""timm iFormer: the last block's residual FFN / ConvBlock (last 1x1 conv -> BatchNorm [* layer scale]) + shortcut
-> GAP -> NormLinear (BatchNorm1d -> Linear).

Distilled models average two NormLinear heads; ``timm.utils.reparameterize_model`` fuses them (and every conv ->
BatchNorm) into the single Linear the deployed model applies, which this adapter then reads.
"""

from __future__ import annotations

from timm.models.iformer import IFormer, Residual
from torch import nn

from flatscan.contract import NormalisedHead, Tap, bn_linear_classifier, conv_bn, layer_scaled_residual_head
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


@register("iformer", IFormer)
def describe_iformer(model: IFormer) -> NormalisedHead:
    if model.global_pool != "avg":
        raise UnsupportedModel(f"global_pool is {model.global_pool!r}, not a global average: nothing is pooled")
    blocks = model.stages[-1].blocks
    block_name = f"stages.{len(model.stages) - 1}.blocks.{len(blocks) - 1}"  # type: ignore[arg-type]
    residual = getattr(blocks[-1], "mixer", None) if len(blocks) else None  # type: ignore[arg-type, index]
    # FFN and ConvBlock: x + [gamma *] Sequential(..., last conv -> BatchNorm)(x); SHMA and RepCPE are never last.
    if not isinstance(residual, Residual) or not isinstance(residual.module, nn.Sequential):
        raise UnsupportedModel(
            f"the last block {block_name} is {type(blocks[-1]).__name__ if len(blocks) else 'missing'}, "  # type: ignore[arg-type, index]
            "not a residual FFN or ConvBlock"
        )
    conv, scale = conv_bn(model, f"{block_name}.mixer.module.{len(residual.module) - 1}")
    if residual.gamma is not None:
        scale = scale * residual.gamma.detach().flatten()
    classifier, head_fn = bn_linear_classifier(model, "head")
    return layer_scaled_residual_head(
        model,
        feature_layer=conv,
        layer_scale=scale,
        pre_activation=Tap(block_name),
        pooled=Tap("head_drop", "input"),
        classifier=classifier,
        head_fn=head_fn,
    )
