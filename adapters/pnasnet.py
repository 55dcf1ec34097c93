"""timm PNASNet-5 Large: cell_11's last branch (point-wise conv -> bn_sep_2, + cell input) feeds the last channels
of the concatenated cell output -> ReLU -> GAP -> Linear."""

from __future__ import annotations

from timm.models.pnasnet import PNASNet5Large

from flatscan.contract import NormalisedHead, nas_cell_head
from flatscan.registry import register


@register("pnasnet", PNASNet5Large)
def describe_pnasnet(model: PNASNet5Large) -> NormalisedHead:
    return nas_cell_head(model, "cell_11")
