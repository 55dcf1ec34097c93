"""timm DPN (dual path networks): the last block's conv feeds pooled channels through conv5_bn_ac.

Each DualPathBlock returns cat([residual path + out1, dense path, out2]); conv5_bn_ac (BatchNorm -> activation)
then spans all of them. In the '-b' layout the new dense channels out2 come from their own 1x1 conv, c1x1_c2,
which is the feature layer (the last ``inc`` pooled channels, a slice as in DenseNet). In the plain layout one
conv, c1x1_c.conv, gives both out1 (added to the residual path: the first ``num_1x1_c`` pooled channels) and
out2 (the last ``inc``): the feature layer then feeds an index set of two blocks of pooled channels.
timm's DPNs apply ELU in conv5_bn_ac, for which flatscan has no closed form: those are refused by name.
"""

from __future__ import annotations

import torch
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
    total = int(submodule(model, "features.conv5_bn_ac.bn").num_features)  # type: ignore[arg-type]
    if block.c1x1_c2 is None:
        # Plain layout: c1x1_c.conv's first num_1x1_c channels join the residual path (pooled 0:num_1x1_c), its
        # last inc channels are the new dense channels (the last inc pooled channels).
        feature_layer = f"{block_name}.c1x1_c.conv"
        residual, growth = int(block.num_1x1_c), int(block.inc)
        if submodule(model, feature_layer).out_channels != residual + growth:
            raise UnsupportedModel(f"{feature_layer} does not give num_1x1_c + inc channels: not the layout it knows")
        channels: slice | torch.Tensor = torch.cat([torch.arange(residual), torch.arange(total - growth, total)])
    else:
        feature_layer = f"{block_name}.c1x1_c2"
        growth = int(submodule(model, feature_layer).out_channels)  # type: ignore[arg-type]
        channels = slice(total - growth, total)
    return normalised_head(
        model,
        feature_layer=feature_layer,
        norm="features.conv5_bn_ac.bn",
        activation="features.conv5_bn_ac.bn.act",
        pool="global_pool",
        classifier="classifier",
        channels=channels,
    )
