"""timm EfficientViM: the last block's ffn.fc2 (conv + BatchNorm), blended into the residual by sigmoid(alpha[3]),
then the final LayerNorm2d across channels (:class:`flatscan.contract.ChannelNorm`) -> GAP -> the last stage's head.

The logits are sum_i softmax(weights)_i heads[i](pooled_i): the earlier terms pool the state-space mixers' hidden
states, computed before the feature layer runs, so they only shift the logits; the last head is the classifier,
with its weight as the gain. The distilled variant averages two such sums: heads_dist's last head reads the same
pooled vector, a parallel classifier with gain softmax(weights_dist)[-1] / 2 (and the main one's halved).
"""

from __future__ import annotations

from timm.models.efficientvim import EfficientViM, EfficientViMBlock, EfficientViMDistilled
from torch import Tensor, nn

from flatscan.contract import (
    NormalisedHead,
    Tap,
    batchnorm_scale,
    channel_layer_norm,
    require_linear,
    require_plain_conv,
    submodule,
)
from flatscan.errors import UnsupportedModel
from flatscan.flatness import Activation
from flatscan.registry import register


@register("efficientvim", EfficientViM)
def describe_efficientvim(model: EfficientViM) -> NormalisedHead:
    if model.global_pool != "avg":
        raise UnsupportedModel(f"global_pool is {model.global_pool!r}, not a global average")
    last = len(model.heads) - 1
    stage = f"stages.{len(model.stages) - 1}"  # type: ignore[arg-type]
    block_name = f"{stage}.blocks.{len(submodule(model, stage).blocks) - 1}"  # type: ignore[arg-type]
    block = submodule(model, block_name)
    if not isinstance(block, EfficientViMBlock) or not isinstance(block.drop_path, nn.Identity):
        raise UnsupportedModel(f"{block_name} is not an EfficientViMBlock in eval form: not the layout it knows")
    require_linear(submodule(model, f"heads.{last}"), f"heads.{last}")
    gain = model.weights.detach().softmax(-1)[last]
    parallel: tuple[tuple[str, float | Tensor], ...] = ()
    if isinstance(model, EfficientViMDistilled):  # eval: (heads sum + heads_dist sum) / 2
        require_linear(submodule(model, f"heads_dist.{last}"), f"heads_dist.{last}")
        gain /= 2
        parallel = ((f"heads_dist.{last}", model.weights_dist.detach().softmax(-1)[last] / 2),)
    conv = f"{block_name}.ffn.fc2.conv"
    require_plain_conv(model, conv)
    # x + alpha_3 (ffn(x) - x): the feature layer's output is scaled by alpha_3 (per channel) after its BatchNorm.
    blend = block.alpha.detach().sigmoid().view(4, -1)[3]
    # In the inference form (flatscan.inference_form, timm's fuse) the BatchNorm is folded into the conv: norm None.
    norm = getattr(submodule(model, f"{block_name}.ffn.fc2"), "norm", None)
    scale = blend if norm is None else batchnorm_scale(norm, f"{block_name}.ffn.fc2.norm") * blend
    return NormalisedHead(
        feature_layer=conv,
        pre_activation=Tap(f"norm.{last}", "output"),
        pooled=Tap(f"heads.{last}", "input"),
        channel_scale=scale,
        activation=Activation("identity"),
        classifier=f"heads.{last}",
        coupling=channel_layer_norm(model, f"norm.{last}"),
        classifier_gain=gain,
        parallel_classifiers=parallel,
    )
