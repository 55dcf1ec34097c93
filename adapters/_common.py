"""Layout helpers shared by the adapters of families ending in conv -> BatchNorm -> activation -> GAP -> Linear.

Each family's adapter names where its feature convolution, BatchNorm and activation sit; these helpers
read and check those modules and build the :class:`NormalisedHead`.
"""

from __future__ import annotations

from collections.abc import Sequence

from timm.layers import Conv2dSame, ConvNormAct
from timm.layers.conv2d_same import Conv2dSameExport
from torch import nn

from flatscan.contract import (
    NormalisedHead,
    Tap,
    activation_of,
    batchnorm_scale,
    require_average_pool,
    require_linear,
)
from flatscan.errors import UnsupportedModel

# Convolutions whose forward applies ``.weight`` itself (timm's 'SAME' variants only pad the input first).
_PLAIN_CONVS = (nn.Conv2d, Conv2dSame, Conv2dSameExport)


def submodule(model: nn.Module, name: str) -> nn.Module:
    """``model``'s submodule ``name``, or :class:`UnsupportedModel` when it has none."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise UnsupportedModel(f"{type(model).__name__} has no {name}: not the layout its adapter knows") from None


def require_plain_conv(model: nn.Module, name: str) -> nn.Conv2d:
    """The Conv2d ``name``, refused unless its forward convolves with ``.weight`` as stored."""
    conv = submodule(model, name)
    if not isinstance(conv, nn.Conv2d):
        raise UnsupportedModel(f"{name} is {type(conv).__name__}, not a Conv2d: there is no feature convolution")
    if type(conv) not in _PLAIN_CONVS and type(conv).forward is not nn.Conv2d.forward:
        raise UnsupportedModel(
            f"{name} is {type(conv).__name__}, whose forward transforms its weight (e.g. weight standardisation) "
            "before convolving: measure the kernel it applies with flatscan.inference_form(model) (flatscan's "
            "loader does this)"
        )
    return conv


def conv_norm_act(model: nn.Module, name: str) -> tuple[str, str, str]:
    """(conv, norm, activation) names inside timm's ConvNormAct ``name`` (conv -> BatchNormAct2d)."""
    block = submodule(model, name)
    if not isinstance(block, ConvNormAct):
        raise UnsupportedModel(f"{name} is {type(block).__name__}, not timm's ConvNormAct")
    if not isinstance(getattr(block, "aa", None), (type(None), nn.Identity)):
        raise UnsupportedModel(
            f"{name}.aa ({type(block.aa).__name__}) blurs and subsamples the feature layer's output before the "
            "pool: not element-wise"
        )
    if not isinstance(getattr(block.bn, "act", None), nn.Module):
        raise UnsupportedModel(f"{name}.bn is {type(block.bn).__name__}, not timm's BatchNormAct2d")
    return f"{name}.conv", f"{name}.bn", f"{name}.bn.act"


def sole_activation(model: nn.Module, names: Sequence[str]) -> str:
    """The one non-Identity module among the element-wise modules ``names`` (in execution order), else the last."""
    active = [name for name in names if not isinstance(submodule(model, name), nn.Identity)]
    if len(active) > 1:
        raise UnsupportedModel(
            f"{' then '.join(active)} apply activations one after the other after the feature layer; flatscan "
            "needs a single element-wise activation"
        )
    return active[0] if active else names[-1]


def normalised_head(
    model: nn.Module,
    *,
    family: str,
    feature_layer: str,
    norm: str | None,
    activation: str,
    pool: str,
    classifier: str,
    channels: slice | None = None,
    pre_activation: Tap | None = None,
) -> NormalisedHead:
    """feature_layer -> BatchNorm ``norm`` (None: scale 1) -> [+ residual] -> ``activation`` -> GAP -> Linear.

    ``pool`` is the global pool, ``classifier`` the Linear layer reading the pooled vector. ``channels``
    (DenseNet) are the pooled channels the feature layer feeds, when ``norm`` spans more channels. The
    pre-activation is read at the input of ``activation`` unless ``pre_activation`` says where.
    """
    require_average_pool(submodule(model, pool), pool)
    require_linear(submodule(model, classifier), classifier)
    conv = require_plain_conv(model, feature_layer)
    if norm is None:
        scale = conv.weight.new_ones(conv.out_channels).detach()
    else:
        scale = batchnorm_scale(submodule(model, norm), norm)
    channels = slice(None) if channels is None else channels
    scale = scale[channels]
    if scale.shape[0] != conv.out_channels:
        raise UnsupportedModel(
            f"{feature_layer} has {conv.out_channels} output channels but {norm} scales {scale.shape[0]} of them"
        )
    return NormalisedHead(
        family=family,
        feature_layer=feature_layer,
        pre_activation=pre_activation or Tap(activation, "input"),
        pooled=Tap(classifier, "input"),
        channel_scale=scale,
        activation=activation_of(submodule(model, activation), activation),
        classifier=classifier,
        channels=channels,
    )


def pooled_conv_head(model: nn.Module, family: str) -> NormalisedHead:
    """MobileNetV3's 'efficient head': global_pool -> conv_head -> [norm_head] -> act2 -> flatten -> classifier.

    The pool runs first, so the feature layer conv_head acts on the pooled (N, C, 1, 1) vector: L = 1.
    """
    if not isinstance(getattr(model, "conv_head", None), nn.Conv2d):
        raise UnsupportedModel(
            "conv_head is missing (the model was built or pruned without its head convolution): the pooled "
            "vector feeds the classifier directly, with no feature convolution"
        )
    require_average_pool(submodule(model, "global_pool"), "global_pool")
    norm_head = getattr(model, "norm_head", None)
    if norm_head is None or isinstance(norm_head, nn.Identity):
        norm, chain = None, ["act2"]
    else:
        if not isinstance(getattr(norm_head, "act", None), nn.Module):
            raise UnsupportedModel(f"norm_head is {type(norm_head).__name__}, not timm's BatchNormAct2d")
        norm, chain = "norm_head", ["norm_head.act", "act2"]
    return normalised_head(
        model,
        family=family,
        feature_layer="conv_head",
        norm=norm,
        activation=sole_activation(model, chain),
        pool="global_pool",
        classifier="classifier",
    )
