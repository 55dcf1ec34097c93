"""Hugging Face transformers CNN classifiers: ResNet, RegNet, ConvNeXt(-V2), EfficientNet, MobileNetV1/V2, BiT,
PoolFormer, FocalNet (its final per-position LayerNorm: :class:`flatscan.contract.ChannelNorm`).

Imported by ``flatscan.adapters`` only when transformers is installed (``pip install 'flatscan[transformers]'``).
Their forward returns a ``ModelOutput`` whose ``logits`` the scanner reads. BiT's weight-standardised convolutions
are measured in their inference form (:func:`flatscan.inference_form`, which flatscan's loader applies); its
GroupNorms, and PoolFormer's final one-group GroupNorm, are the GroupNorm coupling
(:func:`flatscan.contract.group_norm`).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from torch import Tensor, nn
from transformers import (
    BitForImageClassification,
    ConvNextForImageClassification,
    ConvNextV2ForImageClassification,
    EfficientNetForImageClassification,
    FocalNetForImageClassification,
    MobileNetV1ForImageClassification,
    MobileNetV2ForImageClassification,
    PoolFormerForImageClassification,
    RegNetForImageClassification,
    ResNetForImageClassification,
)
from transformers import activations as hf_activations

from flatscan.contract import (
    NormalisedHead,
    Tap,
    activation_of,
    batchnorm_scale,
    channel_layer_norm,
    group_norm,
    layer_scaled_residual_head,
    require_linear,
    require_plain_conv,
    submodule,
)
from flatscan.errors import UnsupportedModel
from flatscan.flatness import Activation
from flatscan.registry import register

# transformers' own activation modules (ACT2FN) by the function they compute (torch's are read by activation_of);
# looked up by name, as the set of classes changes between transformers releases.
_ACTIVATION_NAMES = {
    "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "SiLUActivation": "silu",
    "MishActivation": "mish",
    "LinearActivation": "identity",
}
_ACTIVATIONS: dict[type[nn.Module], str] = {
    getattr(hf_activations, cls): name for cls, name in _ACTIVATION_NAMES.items() if hasattr(hf_activations, cls)
}


def _activation(model: nn.Module, name: str) -> Activation:
    module = submodule(model, name)
    known = _ACTIVATIONS.get(type(module))
    return Activation(known) if known else activation_of(module, name)


def _require_global_average(model: nn.Module, name: str) -> None:
    pool = submodule(model, name)
    if not (isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1))):
        raise UnsupportedModel(f"{name} is {pool!r}, not a global average pool")


def _linear(model: nn.Module, name: str) -> None:
    if isinstance(submodule(model, name), nn.Identity):
        raise UnsupportedModel(f"{name} is Identity: a model built with num_labels=0 has no classifier to measure")
    require_linear(submodule(model, name), name)


def _flatten_linear(model: nn.Module) -> None:
    """The classifier ``Sequential(Flatten, Linear)`` of ResNet, RegNet and BiT."""
    if not (isinstance(model.classifier, nn.Sequential) and isinstance(model.classifier[0], nn.Flatten)):
        raise UnsupportedModel(f"classifier is {type(model.classifier).__name__}, not Sequential(Flatten, Linear)")
    _linear(model, "classifier.1")


def _conv_bn(model: nn.Module, *, layer: str, activation: str, pooled: Tap, classifier: str) -> NormalisedHead:
    """``layer``'s convolution -> normalization [+ residual] -> ``activation`` -> global pool -> ``classifier``."""
    conv = f"{layer}.convolution"
    require_plain_conv(model, conv)
    return NormalisedHead(
        feature_layer=conv,
        pre_activation=Tap(activation, "input"),
        pooled=pooled,
        channel_scale=batchnorm_scale(submodule(model, f"{layer}.normalization"), f"{layer}.normalization"),
        activation=_activation(model, activation),
        classifier=classifier,
    )


@register("resnet", ResNetForImageClassification)  # type: ignore[arg-type]
@register("regnet", RegNetForImageClassification)
def describe_resnet_regnet(model: ResNetForImageClassification | RegNetForImageClassification) -> NormalisedHead:
    """The last layer's last ResNetConvLayer (conv, BatchNorm, no activation), + shortcut, the layer's activation.

    RegNet-Y's squeeze-excitation gates the input of that conv, not its output, so it stays outside the head.
    """
    base = model.base_model_prefix
    stages = model.base_model.encoder.stages  # type: ignore[union-attr]
    block_name = f"{base}.encoder.stages.{len(stages) - 1}.layers.{len(stages[-1].layers) - 1}"  # type: ignore[arg-type, index, union-attr]
    block = submodule(model, block_name)
    last = f"{block_name}.layer.{len(block.layer) - 1}"  # type: ignore[arg-type]
    if not isinstance(getattr(submodule(model, last), "activation", None), nn.Identity):
        raise UnsupportedModel(f"{last} applies an activation before the residual add: not v = s z + t + r")
    _require_global_average(model, f"{base}.pooler")
    _flatten_linear(model)
    return _conv_bn(
        model,
        layer=last,
        activation=f"{block_name}.activation",
        pooled=Tap("classifier.1", "input"),
        classifier="classifier.1",
    )


def _norm_then_linear(norm: nn.LayerNorm, classifier: nn.Linear, pooled: Tensor) -> Tensor:
    return classifier(norm(pooled))


@register("convnext", ConvNextForImageClassification, ConvNextV2ForImageClassification)  # type: ignore[arg-type]
def describe_convnext(model: ConvNextForImageClassification | ConvNextV2ForImageClassification) -> NormalisedHead:
    """The last layer's pwconv2 (Linear on channels-last maps), layer scale, + shortcut; GAP -> LayerNorm -> Linear.

    The pool is a ``mean`` in the model's forward, not a module: the pooled vector is read at the LayerNorm's input.
    """
    base = model.base_model_prefix
    stages = model.base_model.encoder.stages  # type: ignore[union-attr]
    block_name = f"{base}.encoder.stages.{len(stages) - 1}.layers.{len(stages[-1].layers) - 1}"  # type: ignore[arg-type, index, union-attr]
    block = submodule(model, block_name)
    fc2 = block.pwconv2
    if not isinstance(fc2, nn.Linear):
        raise UnsupportedModel(f"{block_name}.pwconv2 is {type(fc2).__name__}, not the Linear its adapter knows")
    norm = submodule(model, f"{base}.layernorm")
    if type(norm) is not nn.LayerNorm:
        raise UnsupportedModel(f"{base}.layernorm is {type(norm).__name__}, not the LayerNorm after the pool")
    _linear(model, "classifier")
    # ConvNeXt's layer scale is the per-channel scale (V2 has none: scale 1).
    gamma = getattr(block, "layer_scale_parameter", None)
    scale = gamma.detach() if gamma is not None else fc2.weight.new_ones(fc2.out_features)
    return NormalisedHead(
        feature_layer=f"{block_name}.pwconv2",
        pre_activation=Tap(block_name, "output"),
        pooled=Tap(f"{base}.layernorm", "input"),
        channel_scale=scale,
        activation=Activation("identity"),
        classifier="classifier",
        head_fn=partial(_norm_then_linear, norm, model.classifier),
    )


@register("efficientnet", EfficientNetForImageClassification)
def describe_efficientnet(model: EfficientNetForImageClassification) -> NormalisedHead:
    """top_conv -> top_bn -> top_activation -> pooler -> dropout -> classifier.

    The pooler is ``AvgPool2d(hidden_dim, ceil_mode=True)``: a global average for final maps up to hidden_dim
    pixels a side (the window is cut to the map, and so is the divisor). On a larger map it leaves several
    positions, which the scanner refuses at the pooled tap (the model's own reshape would fail right after).
    """
    encoder = "efficientnet.encoder"
    pool = submodule(model, "efficientnet.pooler")
    if not isinstance(pool, nn.AvgPool2d):
        raise UnsupportedModel(
            f"efficientnet.pooler is {type(pool).__name__} (pooling_type={model.config.pooling_type!r}), not an "
            "average: the measure is defined for a global average pool"
        )
    if pool.stride != pool.kernel_size or pool.padding not in (0, (0, 0)) or pool.divisor_override is not None:
        raise UnsupportedModel(f"efficientnet.pooler is {pool!r}, not the global AvgPool2d(hidden_dim) it should be")
    _linear(model, "classifier")
    conv = f"{encoder}.top_conv"
    require_plain_conv(model, conv)
    return NormalisedHead(
        feature_layer=conv,
        pre_activation=Tap(f"{encoder}.top_activation", "input"),
        pooled=Tap("efficientnet.pooler", "output"),
        channel_scale=batchnorm_scale(submodule(model, f"{encoder}.top_bn"), f"{encoder}.top_bn"),
        activation=_activation(model, f"{encoder}.top_activation"),
        classifier="classifier",
    )


@register("mobilenetv2", MobileNetV2ForImageClassification)
def describe_mobilenet_v2(model: MobileNetV2ForImageClassification) -> NormalisedHead:
    """conv_1x1 (convolution, normalization, activation) -> pooler -> dropout -> classifier."""
    return _mobilenet_head(model, "mobilenet_v2", "mobilenet_v2.conv_1x1")


@register("mobilenetv1", MobileNetV1ForImageClassification)
def describe_mobilenet_v1(model: MobileNetV1ForImageClassification) -> NormalisedHead:
    """The last layer (pointwise convolution, normalization, activation) -> pooler -> dropout -> classifier."""
    layer = f"mobilenet_v1.layer.{len(list(submodule(model, 'mobilenet_v1.layer').children())) - 1}"
    return _mobilenet_head(model, "mobilenet_v1", layer)


def _mobilenet_head(model: nn.Module, base: str, layer: str) -> NormalisedHead:
    """MobileNetV1/V2: ``layer`` (convolution, normalization, activation) -> ``base``.pooler -> classifier."""
    if not isinstance(getattr(submodule(model, layer), "activation", None), nn.Module):
        raise UnsupportedModel(f"{layer} has no activation module to read the pre-activation at")
    if submodule(model, layer).normalization is None:
        raise UnsupportedModel(f"{layer} has no normalization: not the layout its adapter knows")
    if submodule(model, base).pooler is None:
        raise UnsupportedModel(f"{base} was built without its pooler (add_pooling_layer=False)")
    _require_global_average(model, f"{base}.pooler")
    _linear(model, "classifier")
    return _conv_bn(
        model,
        layer=layer,
        activation=f"{layer}.activation",
        pooled=Tap("classifier", "input"),
        classifier="classifier",
    )


def _group_norm_activation(model: nn.Module, name: str, *, active: bool) -> None:
    """``name`` is BiT's BitGroupNormActivation (a GroupNorm whose forward then applies ``activation``)."""
    norm = submodule(model, name)
    if not (isinstance(norm, nn.GroupNorm) and isinstance(getattr(norm, "activation", None), nn.Module)):
        raise UnsupportedModel(f"{name} is {type(norm).__name__}, not BiT's GroupNorm + activation")
    if not active and not isinstance(norm.activation, nn.Identity):
        raise UnsupportedModel(f"{name} applies an activation before the residual add: not v = GroupNorm(z) + r")


@register("bit", BitForImageClassification)
def describe_bit(model: BitForImageClassification) -> NormalisedHead:
    """The last layer's conv3 (weight-standardised: measured in its inference form), then a GroupNorm coupling.

    Pre-activation layers (BiT): conv3 + shortcut -> bit.norm (GroupNorm, then its activation) -> pool -> Linear.
    Bottleneck layers (layer_type="bottleneck"): conv3 -> norm3 (GroupNorm, no activation) + shortcut -> the
    layer's activation -> pool -> Linear.
    """
    stages = model.bit.encoder.stages
    last = f"bit.encoder.stages.{len(stages) - 1}.layers.{len(stages[-1].layers) - 1}"  # type: ignore[arg-type, index, union-attr]
    _require_global_average(model, "bit.pooler")
    _flatten_linear(model)
    conv = require_plain_conv(model, f"{last}.conv3")
    scale = conv.weight.new_ones(conv.out_channels).detach()
    if isinstance(model.bit.norm, nn.Identity):
        _group_norm_activation(model, f"{last}.norm3", active=False)
        coupling = replace(group_norm(model, f"{last}.norm3"), affine_output=Tap(f"{last}.norm3", "output"))
        activation = f"{last}.activation"
    else:
        _group_norm_activation(model, "bit.norm", active=True)
        coupling, activation = group_norm(model, "bit.norm"), "bit.norm.activation"
    return NormalisedHead(
        feature_layer=f"{last}.conv3",
        pre_activation=Tap(activation, "input"),
        pooled=Tap("classifier.1", "input"),
        channel_scale=scale,
        activation=_activation(model, activation),
        classifier="classifier.1",
        coupling=coupling,
    )


@register("poolformer", PoolFormerForImageClassification)
def describe_poolformer(model: PoolFormerForImageClassification) -> NormalisedHead:
    """The last layer's output.conv2 (1x1), layer_scale_2, + shortcut -> norm (GroupNorm, 1 group) -> mean -> Linear.

    The one-group GroupNorm normalises each sample over (C, H, W): the GroupNorm coupling. The mean is in the
    model's forward, not a module: the pooled vector is read at the classifier's input.
    """
    blocks = model.poolformer.encoder.block
    layer_name = f"poolformer.encoder.block.{len(blocks) - 1}.{len(blocks[-1]) - 1}"
    layer = submodule(model, layer_name)
    conv = require_plain_conv(model, f"{layer_name}.output.conv2")
    if not isinstance(model.norm, nn.GroupNorm):
        raise UnsupportedModel(f"norm is {type(model.norm).__name__}, not the GroupNorm before the pool")
    _linear(model, "classifier")
    gamma = getattr(layer, "layer_scale_2", None) if layer.use_layer_scale else None
    scale = gamma.detach() if gamma is not None else conv.weight.new_ones(conv.out_channels).detach()
    return NormalisedHead(
        feature_layer=f"{layer_name}.output.conv2",
        pre_activation=Tap("norm", "output"),
        pooled=Tap("classifier", "input"),
        channel_scale=scale,
        activation=Activation("identity"),
        classifier="classifier",
        coupling=group_norm(model, "norm"),
    )


@register("focalnet", FocalNetForImageClassification)
def describe_focalnet(model: FocalNetForImageClassification) -> NormalisedHead:
    """The last layer's mlp.fc2 (a Linear on the (N, L, C) tokens), * gamma_2, + shortcut, then focalnet.layernorm
    across channels at every position (:class:`flatscan.contract.ChannelNorm`), the pooler and the classifier."""
    if model.config.use_post_layernorm:
        raise UnsupportedModel(
            "use_post_layernorm: each layer normalises mlp.fc2's output across channels before the layer scale, then "
            "focalnet.layernorm normalises again: two LayerNorms in a row, which flatscan has no closed form for"
        )
    stages = model.focalnet.encoder.stages
    last_stage = f"focalnet.encoder.stages.{len(stages) - 1}"
    layer = f"{last_stage}.layers.{len(stages[-1].layers) - 1}"
    if submodule(model, last_stage).downsample is not None:
        raise UnsupportedModel(f"{last_stage} downsamples after its last layer: not the layout the adapter knows")
    gamma = submodule(model, layer).gamma_2  # a per-channel Parameter with use_layerscale, else the float 1.0
    head = layer_scaled_residual_head(
        model,
        feature_layer=f"{layer}.mlp.fc2",
        layer_scale=gamma.detach() if isinstance(gamma, Tensor) else None,
        pre_activation=Tap("focalnet.layernorm", "output", channels_last=True),
        pooled=Tap("classifier", "input"),
        classifier="classifier",
    )
    return replace(head, coupling=channel_layer_norm(model, "focalnet.layernorm"))
