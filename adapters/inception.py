"""timm Inception-v3, Inception-v4 and Inception-ResNet-v2.

Inception-v3 / v4 end in an Inception module whose branches (each ConvNormAct: conv -> BatchNorm -> ReLU)
are concatenated and pooled with nothing in between. The feature layer is the first branch's 1x1 conv
(v3: Mixed_7c.branch1x1, v4: the last InceptionC's branch0): it feeds the first pooled channels, so its own
activation's input is the pre-activation of exactly those channels (a channel slice, as in DenseNet).
Inception-ResNet-v2 ends in conv2d_7b (1x1 ConvNormAct) after the last Block8, like a conv head.
"""

from __future__ import annotations

from timm.models.inception_resnet_v2 import InceptionResnetV2
from timm.models.inception_v3 import InceptionE, InceptionV3
from timm.models.inception_v4 import InceptionC, InceptionV4

from flatscan.contract import NormalisedHead, conv_norm_act, normalised_head, submodule
from flatscan.errors import UnsupportedModel
from flatscan.registry import register


def _first_branch(model: InceptionV3 | InceptionV4, branch: str, classifier: str) -> NormalisedHead:
    conv, norm, act = conv_norm_act(model, branch)
    width = submodule(model, conv).out_channels
    # The branch comes first in the module's torch.cat: channels 0..width of the pooled vector. Its
    # activation's input has just those channels, which the slice leaves as they are.
    return normalised_head(
        model,
        feature_layer=conv,
        norm=norm,
        activation=act,
        pool="global_pool",
        classifier=classifier,
        channels=slice(0, width),
    )


@register("inception_v3", InceptionV3)
def describe_inception_v3(model: InceptionV3) -> NormalisedHead:
    if not isinstance(getattr(model, "Mixed_7c", None), InceptionE):
        raise UnsupportedModel("Mixed_7c is not an InceptionE module (the model was pruned)")
    return _first_branch(model, "Mixed_7c.branch1x1", "fc")


@register("inception_v4", InceptionV4)
def describe_inception_v4(model: InceptionV4) -> NormalisedHead:
    last = f"features.{len(model.features) - 1}"
    if not isinstance(submodule(model, last), InceptionC):
        raise UnsupportedModel(f"{last} is not an InceptionC module (the model was pruned)")
    return _first_branch(model, f"{last}.branch0", "last_linear")


@register("inception_resnet_v2", InceptionResnetV2)
def describe_inception_resnet_v2(model: InceptionResnetV2) -> NormalisedHead:
    conv, norm, act = conv_norm_act(model, "conv2d_7b")
    return normalised_head(
        model,
        feature_layer=conv,
        norm=norm,
        activation=act,
        pool="global_pool",
        classifier="classif",
    )
