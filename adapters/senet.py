"""timm legacy SENet (legacy_seresnet*, legacy_seresnext*, legacy_senet154).

Every SENet block ends convN -> bnN -> [relu, in SEResNetBlock] -> se_module -> + shortcut -> relu: a
squeeze-excitation gate of the BatchNorm's output (or its relu), measured exactly through its pooled mean
(:func:`flatscan.contract.squeeze_excitation`).
``relu`` is one module the block calls several times, so the pre-activation is read after it, at the pool's
input: exact for ReLU, whose sigma' and sigma'' are the same functions of relu(v) as of v.
"""

from __future__ import annotations

from timm.models.senet import SENet, SEResNetBlock
from torch import nn

from flatscan.contract import (
    NormalisedHead,
    Tap,
    activation_of,
    batchnorm_scale,
    require_average_pool,
    require_linear,
    squeeze_excitation,
    submodule,
)
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


@register("senet", SENet)
def describe_senet(model: SENet) -> NormalisedHead:
    require_average_pool(model.global_pool, "global_pool")
    require_linear(model.last_linear, "last_linear")
    block_name = f"layer4.{len(model.layer4) - 1}"
    block = submodule(model, block_name)
    last = next((i for i in (3, 2) if hasattr(block, f"conv{i}") and hasattr(block, f"bn{i}")), None)
    if last is None or not isinstance(getattr(block, "se_module", None), nn.Module):
        raise UnsupportedModel(f"{block_name} is {type(block).__name__}: not the SENet block layout the adapter knows")
    if type(block.relu) is not nn.ReLU:
        raise UnsupportedModel(
            f"{block_name}.relu is {type(block.relu).__name__}: the pool input is exact for ReLU only"
        )
    norm = f"{block_name}.bn{last}"
    relu = activation_of(block.relu, f"{block_name}.relu")
    return NormalisedHead(
        feature_layer=f"{block_name}.conv{last}",
        pre_activation=Tap("global_pool", "input"),
        pooled=Tap("last_linear", "input"),
        channel_scale=batchnorm_scale(submodule(model, norm), norm),
        activation=relu,
        classifier="last_linear",
        # SEResNetBlock (legacy_seresnet18/34) applies relu before the gate too: the gate scales relu(y).
        coupling=squeeze_excitation(
            model,
            f"{block_name}.se_module",
            Tap(norm, "output"),
            inner=relu if isinstance(block, SEResNetBlock) else None,
        ),
    )
