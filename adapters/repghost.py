"""timm RepGhostNet: pool, then conv_head (bias) -> act2 -> classifier, as GhostNet.

The multi-branch RepGhost modules (fused by ``timm.utils.reparameterize_model``) all run before the pool; the
feature layer conv_head and the head after it are the same in both forms.
"""

from __future__ import annotations

from timm.models.repghost import RepGhostNet

from flatscan.contract import NormalisedHead, pooled_conv_head
from flatscan.registry import register


@register("repghostnet", RepGhostNet)
def describe_repghostnet(model: RepGhostNet) -> NormalisedHead:
    return pooled_conv_head(model)
