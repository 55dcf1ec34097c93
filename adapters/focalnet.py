"""timm FocalNet: the last block's mlp.fc2 (1x1 conv), layer scale ls2, + shortcut; GAP -> head.

Only models built with ``head_hidden_size`` keep the per-position LayerNorm out of the way: the others
(all of timm's pretrained FocalNets) normalise the last stage's output across channels at every position
before the pool, and the large/xlarge/huge ones also after mlp.fc2 (use_post_norm). Both are refused.
"""

from __future__ import annotations

from functools import partial

from timm.layers import LayerScale2d, NormMlpClassifierHead
from timm.models.focalnet import FocalNet
from torch import nn

from flatscan.contract import (
    NormalisedHead,
    Tap,
    layer_scaled_residual_head,
    norm_mlp_head_logits,
    require_average_pool,
    submodule,
)
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


def _refuse_position_norm(model: nn.Module, name: str, what: str, hint: str) -> None:
    norm = submodule(model, name)
    if not isinstance(norm, nn.Identity):
        raise UnsupportedModel(
            f"{name} ({type(norm).__name__}) normalises {what} across channels at every position, with statistics "
            f"of each sample: not a per-channel affine map between the feature layer and the pool ({hint})"
        )


@register("focalnet", FocalNet)
def describe_focalnet(model: FocalNet) -> NormalisedHead:
    block_name = f"layers.{len(model.layers) - 1}.blocks.{len(model.layers[-1].blocks) - 1}"  # type: ignore[arg-type]
    _refuse_position_norm(model, f"{block_name}.norm2_post", "mlp.fc2's output", "use_post_norm")
    _refuse_position_norm(
        model, "norm", "the last stage's output", "FocalNets built with head_hidden_size normalise after the pool"
    )
    if not isinstance(model.head, NormMlpClassifierHead):
        raise UnsupportedModel(f"head is {type(model.head).__name__}, not timm's NormMlpClassifierHead")
    require_average_pool(model.head.global_pool, "head.global_pool")
    layer_scale = submodule(model, f"{block_name}.ls2")
    if not isinstance(layer_scale, (LayerScale2d, nn.Identity)):
        raise UnsupportedModel(f"{block_name}.ls2 is {type(layer_scale).__name__}, not a per-channel LayerScale2d")
    return layer_scaled_residual_head(
        model,
        feature_layer=f"{block_name}.mlp.fc2",
        layer_scale=layer_scale.gamma if isinstance(layer_scale, LayerScale2d) else None,
        pre_activation=Tap(block_name, "output"),
        pooled=Tap("head.global_pool", "output"),
        classifier="head.fc",
        head_fn=partial(norm_mlp_head_logits, model.head),
    )
