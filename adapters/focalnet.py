"""timm FocalNet: the last block's mlp.fc2 (1x1 conv), layer scale ls2, + shortcut; GAP -> head.

Most of timm's pretrained FocalNets normalise the last stage's output across channels at every position (``norm``,
LayerNorm2d) before the pool: exact through :class:`flatscan.contract.ChannelNorm`. The large/xlarge/huge ones
also normalise mlp.fc2's output before the layer scale (use_post_norm): two LayerNorms in a row, refused.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from timm.layers import ClassifierHead, LayerScale2d, NormMlpClassifierHead
from timm.models.focalnet import FocalNet
from torch import nn

from flatscan.contract import (
    NormalisedHead,
    Tap,
    channel_layer_norm,
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
    if not isinstance(model.head, (NormMlpClassifierHead, ClassifierHead)):
        raise UnsupportedModel(
            f"head is {type(model.head).__name__}, not timm's ClassifierHead or NormMlpClassifierHead"
        )
    require_average_pool(model.head.global_pool, "head.global_pool")
    layer_scale = submodule(model, f"{block_name}.ls2")
    if not isinstance(layer_scale, (LayerScale2d, nn.Identity)):
        raise UnsupportedModel(f"{block_name}.ls2 is {type(layer_scale).__name__}, not a per-channel LayerScale2d")
    final_norm = None if isinstance(model.norm, nn.Identity) else channel_layer_norm(model, "norm")
    head = layer_scaled_residual_head(
        model,
        feature_layer=f"{block_name}.mlp.fc2",
        layer_scale=layer_scale.gamma if isinstance(layer_scale, LayerScale2d) else None,
        pre_activation=Tap(block_name, "output") if final_norm is None else Tap("norm", "output"),
        pooled=Tap("head.global_pool", "output"),
        classifier="head.fc",
        # NormMlpClassifierHead (head_hidden_size): GAP -> norm -> MLP -> fc, a general head; ClassifierHead: Linear.
        head_fn=partial(norm_mlp_head_logits, model.head) if isinstance(model.head, NormMlpClassifierHead) else None,
    )
    return replace(head, coupling=final_norm)
