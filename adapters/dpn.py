"""timm DPN (dual path networks): the last block's c1x1_c2 (DPN-b layout) feeds the last ``inc`` pooled channels.

Each DualPathBlock returns cat([residual path, dense path, new dense channels]); conv5_bn_ac (BatchNorm ->
activation) then spans all of them. In the '-b' layout the new dense channels come from their own 1x1 conv,
c1x1_c2, which is the feature layer (a channel slice, as in DenseNet). In the plain layout one conv, c1x1_c,
feeds both the first (residual) and the last (dense) pooled channels, a layout the contract cannot express.
timm's DPNs apply ELU in conv5_bn_ac, for which flatscan has no closed form: those are refused by name.
"""

from __future__ import annotations

from timm.models.dpn import DPN, DualPathBlock

from flatscan.contract import NormalisedHead, normalised_head, submodule
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


@register("dpn", DPN)
def describe_dpn(model: DPN) -> NormalisedHead:
    names = [name for name, _ in model.features.named_children()]
    if len(names) < 2 or names[-1] != "conv5_bn_ac" or not isinstance(model.features[-2], DualPathBlock):
        raise UnsupportedModel("features does not end in a DualPathBlock then conv5_bn_ac (the model was pruned)")
    block_name = f"features.{names[-2]}"
    block = model.features[-2]
    if block.c1x1_c2 is None:
        raise UnsupportedModel(
            f"{block_name}.c1x1_c.conv feeds both the first (residual) and the last (dense) pooled channels: "
            "not one contiguous block of channels, which the contract needs (only DPN '-b' models, with a "
            "separate c1x1_c2, are supported)"
        )
    feature_layer = f"{block_name}.c1x1_c2"
    growth = submodule(model, feature_layer).out_channels
    total = model.features.conv5_bn_ac.bn.num_features  # type: ignore[union-attr]
    return normalised_head(
        model,
        feature_layer=feature_layer,
        norm="features.conv5_bn_ac.bn",
        activation="features.conv5_bn_ac.bn.act",
        pool="global_pool",
        classifier="classifier",
        channels=slice(total - growth, total),  # type: ignore[operator]
    )
