"""timm EfficientViT (MIT: B and L series): head in_conv (1x1 conv -> BatchNorm -> act) -> GAP -> MLP classifier.

The classifier is Linear -> LayerNorm -> act -> Linear on the pooled vector: a general head whose last Linear is
the classifier.
"""

from __future__ import annotations

from dataclasses import replace

from timm.models.efficientvit_mit import ClassifierHead, EfficientVit, EfficientVitLarge
from torch import nn

from flatscan.contract import NormalisedHead, Tap, normalised_head
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


@register("efficientvit", EfficientVit, EfficientVitLarge)  # type: ignore[arg-type]
def describe_efficientvit(model: EfficientVit | EfficientVitLarge) -> NormalisedHead:
    head = model.head
    if not isinstance(head, ClassifierHead):
        raise UnsupportedModel(f"head is {type(head).__name__}, not EfficientViT's ClassifierHead")
    if isinstance(head.in_conv, nn.Identity):
        raise UnsupportedModel(
            "head.in_conv was removed (reset_classifier with reset_other): the last stage's attention blocks "
            "feed the pool directly, with no feature convolution"
        )
    classifier = f"head.classifier.{len(head.classifier) - 1}"
    linear_head = normalised_head(
        model,
        feature_layer="head.in_conv.conv",
        norm="head.in_conv.norm",
        activation="head.in_conv.act",
        pool="head.global_pool",
        classifier=classifier,
    )
    # The pooled vector goes through the whole MLP (the pool flattens it), not only the last Linear.
    return replace(linear_head, pooled=Tap("head.global_pool"), head_fn=head.classifier)
