"""timm NASNet-A Large: cell_17's last branch (point-wise conv -> bn_sep_2, + cell input) feeds the last channels
of the concatenated cell output -> ReLU -> GAP -> Linear."""

from __future__ import annotations

from timm.models.nasnet import NASNetALarge

from flatscan.contract import NormalisedHead, nas_cell_head
from flatscan.registry import register


@register("nasnet", NASNetALarge)
def describe_nasnet(model: NASNetALarge) -> NormalisedHead:
    return nas_cell_head(model, "cell_17")
