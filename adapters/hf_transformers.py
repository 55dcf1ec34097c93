"""Hugging Face transformers CNN classifiers: ResNet, RegNet, ConvNeXt(-V2), EfficientNet, MobileNetV2.

Imported by ``flatscan.adapters`` only when transformers is installed (``pip install 'flatscan[transformers]'``).
Their forward returns a ``ModelOutput`` whose ``logits`` the scanner reads.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn
from transformers import (
    ConvNextForImageClassification,
    ConvNextV2ForImageClassification,
    EfficientNetForImageClassification,
    MobileNetV2ForImageClassification,
    RegNetForImageClassification,
    ResNetForImageClassification,
)
from transformers import activations as hf_activations

from flatscan.contract import (
    NormalisedHead,
    Tap,
    activation_of,
    batchnorm_scale,
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
    if not (isinstance(model.classifier, nn.Sequential) and isinstance(model.classifier[0], nn.Flatten)):
        raise UnsupportedModel(f"classifier is {type(model.classifier).__name__}, not Sequential(Flatten, Linear)")
    _linear(model, "classifier.1")
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
    layer = "mobilenet_v2.conv_1x1"
    if not isinstance(getattr(submodule(model, layer), "activation", None), nn.Module):
        raise UnsupportedModel(f"{layer} has no activation module to read the pre-activation at")
    if submodule(model, layer).normalization is None:
        raise UnsupportedModel(f"{layer} has no normalization: not the layout its adapter knows")
    if model.mobilenet_v2.pooler is None:
        raise UnsupportedModel("mobilenet_v2 was built without its pooler (add_pooling_layer=False)")
    _require_global_average(model, "mobilenet_v2.pooler")
    _linear(model, "classifier")
    return _conv_bn(
        model,
        layer=layer,
        activation=f"{layer}.activation",
        pooled=Tap("classifier", "input"),
        classifier="classifier",
    )
