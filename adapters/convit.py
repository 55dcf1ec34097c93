"""timm ConViT: refused, a vision transformer (class token or LayerNorm before the pool)."""

from __future__ import annotations

from timm.models.convit import ConVit

from flatscan.contract import NormalisedHead
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


@register("convit", ConVit)
def describe_convit(model: ConVit) -> NormalisedHead:
    if model.global_pool == "token":
        raise UnsupportedModel(
            "ConViT is a vision transformer: its logits read the class token after self-attention blocks and a "
            "LayerNorm, not a global average pool over a convolution's output"
        )
    raise UnsupportedModel(
        "ConViT is a vision transformer: its last weight layer is an MLP Linear on tokens, and norm (LayerNorm) "
        "normalises every token across channels before the pool: not a per-channel affine map"
    )
