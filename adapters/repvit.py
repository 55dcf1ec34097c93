"""timm RepViT: the last block's channel-mixer MLP (conv2 -> BatchNorm) + shortcut -> GAP -> NormLinear head.

timm builds RepViT with a distillation head: the logits average two NormLinear heads, so the model is measured
after ``timm.utils.reparameterize_model``, which fuses them (and the multi-branch depth-wise token mixers, and
every conv -> BatchNorm) into the single kernels and Linear the deployed model applies.
"""

from __future__ import annotations

from timm.models.repvit import RepVit, RepViTBlock, RepVitDownsample

from flatscan.contract import NormalisedHead, Tap, bn_linear_classifier, conv_bn, layer_scaled_residual_head
from flatscan.errors import UnsupportedModel
from flatscan.registry import register

# The residual MLP that ends each block type: output = x + mlp(x).
_LAST_MLP = {RepViTBlock: "channel_mixer", RepVitDownsample: "ffn"}


@register("repvit", RepVit)
def describe_repvit(model: RepVit) -> NormalisedHead:
    if model.global_pool != "avg":
        raise UnsupportedModel(f"global_pool is {model.global_pool!r}, not a global average: nothing is pooled")
    stage = model.stages[-1]
    stage_name = f"stages.{len(model.stages) - 1}"
    block_name = f"{stage_name}.blocks.{len(stage.blocks) - 1}" if len(stage.blocks) else f"{stage_name}.downsample"  # type: ignore[arg-type]
    block = model.get_submodule(block_name)
    if type(block) not in _LAST_MLP:
        raise UnsupportedModel(f"the last block {block_name} is {type(block).__name__}, not a RepViT block")
    conv, scale = conv_bn(model, f"{block_name}.{_LAST_MLP[type(block)]}.conv2")
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
