"""timm DenseNet: the last dense layer's conv2 feeds the last growth_rate channels, through norm5 (BN + ReLU)."""

from __future__ import annotations

from timm.models.densenet import DenseBlock, DenseNet

from flatscan.contract import NormalisedHead, normalised_head
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


@register("densenet", DenseNet)
def describe_densenet(model: DenseNet) -> NormalisedHead:
    names = [name for name, _ in model.features.named_children()]
    if len(names) < 2 or names[-1] != "norm5" or not isinstance(model.features[-2], DenseBlock):
        raise UnsupportedModel("features does not end in a dense block then norm5 (the model was pruned)")
    block = model.features[-2]
    layer_name = list(block.keys())[-1]
    feature_layer = f"features.{names[-2]}.{layer_name}.conv2"
    # The block concatenates its input and every layer's output: the last layer's growth_rate channels come last.
    growth = block[layer_name].conv2.out_channels  # type: ignore[union-attr]
    total = model.features.norm5.num_features  # type: ignore[union-attr]
    return normalised_head(
        model,
        feature_layer=feature_layer,
        norm="features.norm5",
        activation="features.norm5.act",
        pool="global_pool",
        classifier="classifier",
        channels=slice(total - growth, total),  # type: ignore[operator]
    )
