"""timm legacy SENet (legacy_seresnet*, legacy_seresnext*, legacy_senet154): refused.

Every SENet block ends conv -> BatchNorm -> se_module -> + shortcut -> ReLU: the squeeze-excitation gate
multiplies the feature layer's output by a value computed from that output, between it and the pool.
"""

from __future__ import annotations

from timm.models.senet import SENet

from flatscan.contract import NormalisedHead, submodule
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


@register("senet", SENet)
def describe_senet(model: SENet) -> NormalisedHead:
    block_name = f"layer4.{len(model.layer4) - 1}"
    block = submodule(model, block_name)
    gate = getattr(block, "se_module", None)
    raise UnsupportedModel(
        f"{block_name}.se_module ({type(gate).__name__}) gates the feature layer's output with a value computed "
        "from that output, between the feature layer and the pool: not element-wise (every SENet block has one)"
    )
