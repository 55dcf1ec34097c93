"""timm DLA: the last tree root (1x1 conv on the concatenated children -> BatchNorm [+ first child] -> ReLU).

The head is GAP -> 1x1-conv classifier (``fc``). With ``shortcut_root`` the root adds its first child, which
does not depend on the root's conv: the residual r of v = s z + t + r.
"""

from __future__ import annotations

from timm.models.dla import DLA, DlaRoot, DlaTree

from flatscan.contract import NormalisedHead, normalised_head, submodule
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


@register("dla", DLA)
def describe_dla(model: DLA) -> NormalisedHead:
    # level5 is a tree of trees; its output is that of the root of the right-most (tree2) level-1 tree.
    name = "level5"
    tree = submodule(model, name)
    while isinstance(tree, DlaTree) and tree.root is None:
        name, tree = f"{name}.tree2", tree.tree2
    if not isinstance(tree, DlaTree) or not isinstance(tree.root, DlaRoot):
        raise UnsupportedModel(f"{name} is {type(tree).__name__}, not a DLA tree ending in a DlaRoot")
    root = f"{name}.root"
    return normalised_head(
        model,
        feature_layer=f"{root}.conv",
        norm=f"{root}.bn",
        activation=f"{root}.relu",
        pool="global_pool",
        classifier="fc",
    )
