"""The adapter contract, and the one module an adapter author imports: a model's head normalised to
feature layer -> affine -> activation -> GAP -> head.

Adapters describe a model with a :class:`NormalisedHead`; the scanner consumes nothing else. An adapter is a
function ``describe(model) -> NormalisedHead`` registered with :func:`flatscan.register` (``@register("family",
ModelClass)``); the registry fills in ``NormalisedHead.family``, so an adapter never names its family.

What is here, for writing one:

- the contract: :class:`NormalisedHead`, :class:`Tap`;
- generic layers, each read or refused with a reason: :func:`batchnorm_scale`, :func:`activation_of`,
  :func:`require_average_pool`, :func:`require_linear`, :func:`require_plain_conv`,
  :func:`require_feature_layer`, :func:`submodule`, :func:`qualified_name`;
- timm building blocks: :func:`conv_norm_act` (ConvNormAct), :func:`conv_bn` (LeViT-style ConvNorm),
  :func:`bn_linear_classifier` (NormLinear / RepVitClassifier), :func:`norm_mlp_head_logits`
  (NormMlpClassifierHead), :func:`sole_activation`;
- whole heads: :func:`normalised_head` (conv -> BatchNorm [+ residual] -> activation -> GAP -> Linear),
  :func:`layer_scaled_residual_head` (ConvNeXt-like, no activation), :func:`pooled_conv_head` (MobileNetV3's
  pool-first head), :func:`nas_cell_head` (NASNet / PNASNet).

Every helper raises :class:`~flatscan.errors.UnsupportedModel` with the reason for a model outside the class.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from timm.layers import (
    Conv2dSame,
    ConvNormAct,
    EcaModule,
    EffectiveSEModule,
    EvoNorm2dS0,
    EvoNorm2dS0a,
    NormMlpClassifierHead,
    SEModule,
)
from timm.layers import activations as timm_act
from timm.layers import evo_norm as timm_evo_norm
from timm.layers.conv2d_same import Conv2dSameExport
from timm.models.senet import SEModule as LegacySEModule
from torch import Tensor, nn

from flatscan.errors import UnsupportedModel
from flatscan.flatness import Activation, ChannelSiLU

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # timm's activations_me calls torch.jit.script on import
    from timm.layers import activations_me as timm_act_me


@dataclass(frozen=True)
class Tap:
    """Where the scanner reads a tensor: the input or the output of a named module."""

    module: str
    point: Literal["input", "output"] = "output"
    channels_last: bool = False  # the tensor is (N, ..., C), as channels-last models (MambaOut) keep their maps


@dataclass(frozen=True, eq=False)
class NormalisedHead:
    """Everything between a model's feature layer and its logits, normalised.

    The tensor read at ``pre_activation`` has the pooled vector's channel layout, and its channels
    ``channels`` are ``v = channel_scale * feature_layer(A) + shift + residual`` (all of them, unless the
    feature layer feeds only some pooled channels: a slice as in DenseNet, or an index set, a LongTensor or a
    list of indices, in the feature layer's output order, as in DPN, whose conv feeds two blocks). ``h = mean
    over positions of activation(v)`` + ``pooled_offset`` is ``h[:, channels]`` of the pooled vector read at
    ``pooled``; logits are ``classifier(h)`` (linear head, ``head_fn`` None) or ``head_fn(h)``.
    ``pooled_offset`` (None: 0) is where a term added after the activation is read, a tensor in the
    pre-activation's layout that does not depend on the feature layer's kernel (DarkNet's residual, added after
    the block's activation): its mean over positions is a constant shift of h, which leaves e, B and the
    closed form as they are.
    ``classifier`` is the final Linear layer, whose input the classifier-layer flatness uses.
    ``family`` is the name the adapter was registered under: :func:`flatscan.describe` sets it, adapters leave it.
    """

    feature_layer: str
    pre_activation: Tap
    pooled: Tap
    channel_scale: Tensor
    activation: Activation
    classifier: str
    head_fn: Callable[[Tensor], Tensor] | None = None
    channels: slice | Tensor = field(default_factory=lambda: slice(None))
    coupling: PooledCoupling | ChannelNorm | None = None
    pooled_offset: Tap | None = None
    # A fixed factor on the classifier's logits (EfficientViM weighs each stage's head by softmax(weights)); the
    # other terms of such a sum do not depend on the feature layer, so they only shift the logits. A 0-dim tensor
    # when read from the model's parameters (so describe works on the meta device too).
    classifier_gain: float | Tensor = 1.0
    # Further Linear layers on the same pooled vector whose outputs, times their gains, add to the logits (the
    # distilled EfficientViM averages heads and heads_dist): the logits' Linear map is the gained sum of weights.
    parallel_classifiers: tuple[tuple[str, float | Tensor], ...] = ()
    family: str = ""  # set by the registry (flatscan.describe) to the family the adapter was registered under

    def __post_init__(self) -> None:
        if not isinstance(self.channels, slice):  # an index set: kept as a 1-D LongTensor
            index = torch.as_tensor(self.channels, dtype=torch.long).flatten().cpu()
            if index.numel() and (index.unique().numel() != index.numel() or index.min() < 0):
                raise ValueError(f"channels must be distinct non-negative indices, got {index.tolist()}")
            object.__setattr__(self, "channels", index)

    @property
    def head_type(self) -> str:
        return "linear" if self.head_fn is None else "general"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary (the folded scale as statistics, not values)."""
        scale = self.channel_scale.detach().double()
        return {
            "family": self.family,
            "feature_layer": self.feature_layer,
            "pre_activation": f"{self.pre_activation.point} of {self.pre_activation.module}",
            "pooled": f"{self.pooled.point} of {self.pooled.module}",
            "activation": self.activation.label,
            "head_type": self.head_type,
            "classifier": self.classifier,
            "channels": channels_label(self.channels),
            "pooled_offset": None
            if self.pooled_offset is None
            else f"{self.pooled_offset.point} of {self.pooled_offset.module}",
            "coupling": None if self.coupling is None else self.coupling.label,
            "channel_scale_min": scale.min().item(),
            "channel_scale_max": scale.max().item(),
        }


def channels_label(channels: slice | Tensor) -> str:
    """'all', 'start:stop', or the index set as runs 'a:b,c:d' (stop exclusive)."""
    if isinstance(channels, slice):
        return "all" if channels == slice(None) else f"{channels.start}:{channels.stop}"
    runs: list[list[int]] = []
    for index in channels.tolist():
        if runs and index == runs[-1][1]:
            runs[-1][1] = index + 1
        else:
            runs.append([index, index + 1])
    return ",".join(f"{start}:{stop}" for start, stop in runs)


def batchnorm_scale(norm: nn.Module, where: str) -> Tensor:
    """The per-channel scale s of an eval-mode BatchNorm, ``y = s * x + shift``."""
    if not isinstance(norm, nn.BatchNorm2d):
        raise UnsupportedModel(
            f"{where} is {type(norm).__name__}, not BatchNorm: it normalises with statistics of each "
            "sample, so it is not a fixed per-channel affine map after the feature layer"
        )
    if norm.running_mean is None or norm.running_var is None:
        raise UnsupportedModel(f"{where} keeps no running statistics, so it normalises with batch statistics")
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    return scale.detach()


_ACTIVATIONS: dict[type[nn.Module], str] = {
    nn.Identity: "identity",
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.SiLU: "silu",
    timm_act.Swish: "silu",
    timm_act_me.SwishMe: "silu",
    nn.Hardswish: "hardswish",
    timm_act.HardSwish: "hardswish",
    timm_act_me.HardSwishMe: "hardswish",
    nn.Mish: "mish",
    timm_act.Mish: "mish",
    timm_act_me.MishMe: "mish",
    timm_act.GELU: "gelu",
    timm_act.GELUTanh: "gelu_tanh",
}


def activation_of(module: nn.Module, where: str) -> Activation:
    """The closed-form :class:`Activation` computing the same function as ``module``."""
    if type(module) is nn.GELU:
        return Activation("gelu_tanh" if module.approximate == "tanh" else "gelu")
    if type(module) is nn.LeakyReLU:
        return Activation("leaky_relu", negative_slope=module.negative_slope)
    name = _ACTIVATIONS.get(type(module))
    if name is None:
        raise UnsupportedModel(
            f"{where} is {type(module).__name__}, an activation without closed-form derivatives in flatscan "
            f"(supported: {', '.join(sorted(set(_ACTIVATIONS.values()) | {'gelu', 'leaky_relu'}))})"
        )
    return Activation(name)


def require_average_pool(pool: nn.Module, where: str) -> None:
    """Refuse anything but a global average pool (timm's SelectAdaptivePool2d 'avg' / 'fast')."""
    pool_type = getattr(pool, "pool_type", None)
    if pool_type not in ("avg", "fast", "fastavg"):
        raise UnsupportedModel(
            f"{where} pools with {pool_type or type(pool).__name__!r}, not a global average: the measure "
            "is defined for a global average pool"
        )


def require_linear(module: nn.Module, where: str) -> nn.Module:
    """A Linear classifier, or a 1x1 ungrouped Conv2d on the pooled (N, C, 1, 1) map (timm's use_conv heads)."""
    if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1:
        return module
    if not isinstance(module, nn.Linear):
        raise UnsupportedModel(
            f"{where} is {type(module).__name__}, not a Linear classifier (a model built with "
            "num_classes=0 has no classifier to measure against)"
        )
    return module


def qualified_name(model: nn.Module, module: nn.Module) -> str:
    """The name of ``module`` inside ``model`` (as in ``model.named_modules()``)."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


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
    feature_layer: str,
    norm: str | None,
    activation: str,
    pool: str,
    classifier: str,
    channels: slice | Tensor | Sequence[int] | None = None,
    pre_activation: Tap | None = None,
) -> NormalisedHead:
    """feature_layer -> BatchNorm or GroupNorm ``norm`` (None: 1) -> [+ residual] -> ``activation`` -> GAP -> Linear.

    ``pool`` is the global pool, ``classifier`` the Linear layer reading the pooled vector. ``channels``
    (DenseNet: a slice; DPN: an index set) are the pooled channels the feature layer feeds, in its output
    order, when ``norm`` spans more channels. The
    pre-activation is read at the input of ``activation`` unless ``pre_activation`` says where.
    """
    require_average_pool(submodule(model, pool), pool)
    require_linear(submodule(model, classifier), classifier)
    conv = require_plain_conv(model, feature_layer)
    coupling: PooledCoupling | ChannelNorm | None = None
    if norm is None:
        scale = conv.weight.new_ones(conv.out_channels).detach()
    elif isinstance(submodule(model, norm), nn.GroupNorm):
        # Per-sample group statistics: exact through the pooled moments. v is GroupNorm's output, read at the
        # activation's input when the activation is the norm's own (GroupNormAct), else at the norm's output.
        scale = conv.weight.new_ones(cast(nn.GroupNorm, submodule(model, norm)).num_channels).detach()
        coupling = group_norm(model, norm)
        if activation != f"{norm}.act":
            coupling = replace(coupling, affine_output=Tap(norm, "output"))
    elif isinstance(submodule(model, norm), nn.LayerNorm):
        # Across channels at every position (LayerNormAct2d): v is the norm's output, read at its own activation.
        if activation != f"{norm}.act" or channels is not None:
            raise UnsupportedModel(f"{norm} normalises across channels, then more than its own activation follows")
        scale = conv.weight.new_ones(conv.out_channels).detach()
        coupling = channel_layer_norm(model, norm)
    else:
        scale = batchnorm_scale(submodule(model, norm), norm)
    channels = slice(None) if channels is None else channels
    if not isinstance(channels, slice):
        channels = torch.as_tensor(channels, dtype=torch.long)
    scale = scale[channels]
    if scale.shape[0] != conv.out_channels:
        raise UnsupportedModel(
            f"{feature_layer} has {conv.out_channels} output channels but {norm} scales {scale.shape[0]} of them"
        )
    return NormalisedHead(
        feature_layer=feature_layer,
        pre_activation=pre_activation or Tap(activation, "input"),
        pooled=Tap(classifier, "input"),
        channel_scale=scale,
        activation=activation_of(submodule(model, activation), activation),
        classifier=classifier,
        channels=channels,
        coupling=coupling,
    )


def pooled_conv_head(model: nn.Module) -> NormalisedHead:
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
        feature_layer="conv_head",
        norm=norm,
        activation=sole_activation(model, chain),
        pool="global_pool",
        classifier="classifier",
    )


def require_feature_layer(model: nn.Module, name: str) -> nn.Module:
    """The feature layer ``name``: a plain Conv2d (:func:`require_plain_conv`) or a Linear on a channels-last map."""
    layer = submodule(model, name)
    if isinstance(layer, nn.Linear):
        if type(layer).forward is not nn.Linear.forward:
            raise UnsupportedModel(f"{name} is {type(layer).__name__}, a Linear whose forward is not nn.Linear's")
        return layer
    return require_plain_conv(model, name)


def layer_scaled_residual_head(
    model: nn.Module,
    *,
    feature_layer: str,
    layer_scale: Tensor | None,
    pre_activation: Tap,
    pooled: Tap,
    classifier: str,
    head_fn: Callable[[Tensor], Tensor] | None = None,
    channels: slice | Tensor | None = None,
) -> NormalisedHead:
    """feature_layer -> [* layer_scale] [+ shortcut] -> GAP -> head, with no activation in between (ConvNeXt-like).

    ``layer_scale`` is the per-channel scale on the feature layer's output (None: 1); a scale on the shortcut
    is part of the residual. ``pre_activation`` reads v (channel-first, pooled channel layout), ``pooled`` the
    pooled vector; logits are ``head_fn(pooled)``, or ``classifier(pooled)`` when ``head_fn`` is None.
    """
    require_linear(submodule(model, classifier), classifier)
    layer = require_feature_layer(model, feature_layer)
    weight = cast(Tensor, layer.weight)  # a Conv2d's or a Linear's
    out_channels = weight.shape[0]
    scale = weight.new_ones(out_channels) if layer_scale is None else layer_scale.flatten()
    if scale.shape[0] != out_channels:
        raise UnsupportedModel(
            f"{feature_layer} has {out_channels} output channels but its layer scale has {scale.shape[0]}"
        )
    return NormalisedHead(
        feature_layer=feature_layer,
        pre_activation=pre_activation,
        pooled=pooled,
        channel_scale=scale.detach(),
        activation=Activation("identity"),
        classifier=classifier,
        head_fn=head_fn,
        channels=slice(None) if channels is None else channels,
    )


def norm_mlp_head_logits(head: NormMlpClassifierHead, pooled: Tensor) -> Tensor:
    """timm's NormMlpClassifierHead after its global pool, on the pooled vector (N, C): norm -> [MLP] -> fc."""
    x = head.flatten(head.norm(pooled[:, :, None, None]))
    return head.fc(head.drop(head.pre_logits(x)))


def conv_bn(model: nn.Module, name: str) -> tuple[str, Tensor]:
    """The convolution in ``name`` and its per-channel BatchNorm scale.

    ``name`` is a LeViT-style ``ConvNorm`` (a Sequential of conv ``c`` and BatchNorm ``bn``: SHViT, RepViT,
    iFormer), or the biased Conv2d that ``timm.utils.reparameterize_model`` fuses it into (scale 1).
    """
    module = submodule(model, name)
    if isinstance(module, nn.Sequential) and list(module._modules) == ["c", "bn"]:
        return f"{name}.c", batchnorm_scale(module.bn, f"{name}.bn")  # type: ignore[arg-type]
    conv = require_plain_conv(model, name)
    return name, conv.weight.new_ones(conv.out_channels).detach()


def bn_linear_classifier(model: nn.Module, name: str) -> tuple[str, Callable[[Tensor], Tensor] | None]:
    """(classifier, head function) of the head ``name`` that reads the pooled vector.

    A Linear is the classifier itself (no head function). timm's ``NormLinear`` (BatchNorm1d -> Linear: SHViT,
    RepViT, iFormer) is a head function whose Linear ``l`` is the classifier. timm's ``RepVitClassifier`` wraps
    one, or averages two in distilled models; ``reparameterize_model`` fuses either into one Linear.
    """
    module = submodule(model, name)
    if isinstance(getattr(module, "distillation", None), bool):  # RepVitClassifier (RepViT, iFormer)
        if module.distillation and not isinstance(module.head_dist, nn.Identity):
            raise UnsupportedModel(
                f"{name} averages the logits of two classifiers (head and the distillation head_dist), so no "
                "single Linear layer produces the logits; reparameterise the model first "
                "(timm.utils.reparameterize_model(model)), which fuses them into the one Linear it deploys"
            )
        return bn_linear_classifier(model, f"{name}.head")
    if isinstance(module, nn.Sequential) and list(module._modules) == ["bn", "l"]:
        norm = module.bn
        if not isinstance(norm, nn.BatchNorm1d) or norm.running_mean is None:
            raise UnsupportedModel(f"{name}.bn is not a BatchNorm1d with running statistics: the head is not fixed")
        require_linear(module.l, f"{name}.l")  # type: ignore[arg-type]
        return f"{name}.l", module
    require_linear(module, name)
    return name, None


def nas_cell_head(model: nn.Module, cell: str) -> NormalisedHead:
    """NASNet / PNASNet: the last cell concatenates its branches, then act (ReLU) -> global_pool -> last_linear.

    The last weight layer executed is the point-wise conv of the cell's last branch ``comb_iter_4_left``
    (-> bn_sep_2, + the cell's right input or its 1x1 projection); it feeds the last channels of the concat.
    """
    if getattr(model, cell, None) is None:
        raise UnsupportedModel(f"{cell} was pruned (prune_intermediate_layers): the classifier head is gone")
    branch = f"{cell}.comb_iter_4_left"
    head = normalised_head(
        model,
        feature_layer=f"{branch}.separable_2.pointwise_conv2d",
        norm=f"{branch}.bn_sep_2",
        activation="act",
        pool="global_pool",
        classifier="last_linear",
    )
    # bn_sep_2 spans only the branch's channels; act's input (the pre-activation) spans the whole concat.
    total = model.num_features
    return replace(head, channels=slice(total - head.channel_scale.shape[0], total))  # type: ignore[operator]


@dataclass(frozen=True, eq=False)
class PooledCoupling:
    """A tail that couples positions and channels through per-channel pooled moments (gates, GroupNorm, ...).

    Between the feature layer and the pre-activation: ``y = channel_scale * z + shift + r1`` is read at
    ``inner_input``; ``w = inner_activation(y)``; ``u = mean over positions of (w, w^2)[:moments]``, (N, C, k),
    flattened in (channel, moment) order; ``z = squeeze() @ u``, R few statistics (an SE gate's first 1x1 conv,
    GroupNorm's group averages; ``squeeze`` None: z = u); ``alpha, beta = excitation(z)``, each (N, C); the
    pre-activation is ``v = alpha * w + beta + r2``, whose
    ``alpha * w + beta`` is read at ``affine_output`` (None: at the pre-activation itself, r2 = 0).
    ``pooled_layout``: the coupling's taps have the pooled vector's channel layout and are cut to the head's
    ``channels`` like the pre-activation; False: they hold the feature layer's channels only (a gate before a
    concatenation, as in RDNet's BlockESE).
    """

    inner_input: Tap
    excitation: Callable[[Tensor], tuple[Tensor, Tensor]]
    label: str
    moments: int = 1
    squeeze: Callable[[], Tensor] | None = None  # E (R, C * moments), read from the module when called
    inner_activation: Activation | ChannelSiLU = field(default_factory=lambda: Activation("identity"))
    affine_output: Tap | None = None
    statistics_of_input: bool = False  # u are moments of y itself, not of w (EvoNorm-S0)
    statistics_dtype: torch.dtype | None = None  # the module computes its statistics in this dtype (EvoNorm: float32)
    modules: tuple[str, ...] = ()  # the modules ``affine`` runs (a gate's convs): part of the tail, not downstream
    pooled_layout: bool = True

    def affine(self, stats: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha, beta) of the pooled moments ``stats`` (N, C, k)."""
        flat = stats.flatten(1)
        return self.excitation(flat if self.squeeze is None else flat @ self.squeeze().to(flat).T)


_GATES = (SEModule, EcaModule, EffectiveSEModule, LegacySEModule)


def _require_gate(module: nn.Module, where: str) -> None:
    if type(module) not in _GATES:
        raise UnsupportedModel(
            f"{where} ({type(module).__name__}) gates the feature layer's output with a value computed from that "
            "output, and flatscan knows no closed form of its gate (known: SEModule, EcaModule, EffectiveSEModule)"
        )
    if getattr(module, "add_maxpool", False):
        raise UnsupportedModel(f"{where} also max-pools the feature map: its gate is not a function of the mean")


def _gate_squeeze(module: nn.Module) -> Callable[[], Tensor] | None:
    """E of a squeeze-excitation gate whose first layer is a 1x1 conv (SEModule, legacy SENet's): its weight (R, C)."""
    if isinstance(module, (SEModule, LegacySEModule)):
        fc1 = cast(nn.Conv2d, module.fc1)
        return lambda: fc1.weight.detach().flatten(1)
    return None


def _gate_logits(module: nn.Module, squeezed: Tensor) -> Tensor:
    """The pre-gate values of a squeeze-excitation ``module`` for its squeezed statistics (N, R), as (N, C).

    For SEModule and legacy SENet's, ``squeezed`` is fc1's weight times the pooled mean (the bias is added here);
    for the others it is the pooled mean itself.
    """
    if isinstance(module, EcaModule):
        y = module.conv(squeezed.unsqueeze(1))
        if module.conv2 is not None:
            y = module.conv2(module.act(y))
        return y.flatten(1)
    if isinstance(module, EffectiveSEModule):
        return _pointwise(module.fc, squeezed)
    fc1 = cast(nn.Conv2d, module.fc1)
    x = squeezed if fc1.bias is None else squeezed + fc1.bias
    if isinstance(module, SEModule):
        if not isinstance(module.bn, nn.Identity):
            x = module.bn(x[:, :, None, None]).flatten(1)
        return _pointwise(module.fc2, module.act(x))
    return _pointwise(cast(nn.Module, module.fc2), module.relu(x))  # type: ignore[operator]


def _pointwise(conv: nn.Module, x: Tensor) -> Tensor:
    """A gate's 1x1 conv on pooled vectors (N, C_in), as (N, C_out): a plain one as a linear map, which torch.func
    differentiates far faster than a batched convolution."""
    if isinstance(conv, nn.Conv2d) and conv.groups == 1 and conv.kernel_size == (1, 1) and conv.padding == (0, 0):
        return F.linear(x, conv.weight.flatten(1), conv.bias)
    return conv(x[:, :, None, None]).flatten(1)


def _hard_sigmoid(x: Tensor) -> Tensor:
    return F.relu6(x + 3) / 6


def _twice_differentiable(gate: nn.Module) -> Callable[[Tensor], Tensor]:
    """The gate's activation as a function torch can differentiate twice (F.hardsigmoid has no second derivative)."""
    if type(gate) in (nn.Hardsigmoid, timm_act.HardSigmoid, timm_act_me.HardSigmoidMe):
        return _hard_sigmoid  # the same function, piecewise linear: relu6(x + 3) / 6
    return gate


def squeeze_excitation(
    model: nn.Module, gate: str, inner_input: Tap, scale: Tensor | None = None, inner: Activation | None = None
) -> PooledCoupling:
    """The coupling of a squeeze-excitation ``gate`` (timm's SEModule, EcaModule, EffectiveSEModule, legacy SENet's).

    The gate multiplies its input w (read before it, at ``inner_input``, as y with ``w = inner(y)``) by
    ``gate(mean_p w)``; ``scale`` is a per-channel factor applied after the gate (a layer scale), folded into alpha.
    Without ``scale``, alpha * w is the gate's output; with it, alpha * w is read at the pre-activation (r2 = 0).
    """
    module = submodule(model, gate)
    _require_gate(module, gate)
    activation = _twice_differentiable(module.sigmoid if isinstance(module, LegacySEModule) else module.gate)  # type: ignore[arg-type]

    def excitation(squeezed: Tensor) -> tuple[Tensor, Tensor]:
        alpha = activation(_gate_logits(module, squeezed))
        if scale is not None:
            alpha = alpha * scale
        return alpha, torch.zeros_like(alpha)

    return PooledCoupling(
        inner_input=inner_input,
        excitation=excitation,
        squeeze=_gate_squeeze(module),
        label=f"{type(module).__name__} gate",
        inner_activation=inner or Activation("identity"),
        affine_output=Tap(gate, "output") if scale is None else None,
        modules=(gate,),
    )


def group_norm(model: nn.Module, norm: str, inner_input: Tap | None = None) -> PooledCoupling:
    """The coupling of a GroupNorm ``norm`` (torch's, timm's GroupNormAct / GroupNorm1) after the feature layer.

    alpha = gamma / sqrt(var_g + eps), beta = beta_c - alpha * mean_g, the group statistics from the per-channel
    moments (mean, mean of squares). ``inner_input`` defaults to the norm's input.
    """
    module = submodule(model, norm)
    if not isinstance(module, nn.GroupNorm):
        raise UnsupportedModel(f"{norm} is {type(module).__name__}, not a GroupNorm")
    groups, eps, channels = module.num_groups, module.eps, module.num_channels

    def excitation(grouped: Tensor) -> tuple[Tensor, Tensor]:
        mean, square = grouped[:, 0::2], grouped[:, 1::2]
        rstd = torch.rsqrt(square - mean.square() + eps).repeat_interleave(channels // groups, 1)
        alpha = rstd if module.weight is None else module.weight * rstd
        beta = -alpha * mean.repeat_interleave(channels // groups, 1)
        return alpha, beta if module.bias is None else beta + module.bias

    return PooledCoupling(
        inner_input=inner_input or Tap(norm, "input"),
        excitation=excitation,
        squeeze=lambda: group_averages(groups, channels),
        label=f"GroupNorm({groups})",
        moments=2,
        modules=(norm,),
    )


def group_averages(groups: int, channels: int) -> Tensor:
    """E (2 groups, 2 channels) mapping per-channel (mean, mean of squares) to per-group ones, (group, moment) rows."""
    # float64: 1 / group size is rarely a float32 number, and float64 models are measured in float64.
    members = torch.eye(groups, dtype=torch.float64).repeat_interleave(channels // groups, 1) * (groups / channels)
    return torch.kron(members, torch.eye(2, dtype=torch.float64))


@dataclass(frozen=True, eq=False)
class ChannelNorm:
    """A LayerNorm across channels at every position after the feature layer (timm's LayerNorm2d, a channels-last
    nn.LayerNorm, LayerNormAct2d): the pre-activation is ``v = weight * (y - mean_c y) / sqrt(var_c y + eps) + bias``
    with ``y = channel_scale * z + shift + r`` read at ``norm_input``."""

    norm_input: Tap
    weight: Tensor | None
    bias: Tensor | None
    eps: float
    label: str
    modules: tuple[str, ...] = ()
    pooled_layout: bool = True  # its taps have the pooled vector's channels (the norm spans all of them)


def channel_layer_norm(model: nn.Module, name: str) -> ChannelNorm:
    """The :class:`ChannelNorm` of the LayerNorm ``name`` over the channels of the feature map (read at its input)."""
    norm = submodule(model, name)
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        raise UnsupportedModel(f"{name} is {type(norm).__name__}, not a LayerNorm over the channels")
    channels_last = type(norm) is nn.LayerNorm  # timm's LayerNorm2d / LayerNormAct2d take (N, C, H, W)
    weight = None if norm.weight is None else norm.weight.detach()
    bias = None if norm.bias is None else norm.bias.detach()
    return ChannelNorm(
        norm_input=Tap(name, "input", channels_last=channels_last),
        weight=weight,
        bias=bias,
        eps=norm.eps,
        label=f"{type(norm).__name__} across channels",
    )


def evo_norm(model: nn.Module, norm: str) -> PooledCoupling:
    """The coupling of timm's EvoNorm2dS0 / S0a ``norm``: ``rho(y) / std_g(y) * weight + bias``, with
    rho(y) = y * sigmoid(v y) (or y without ``v``) and std_g the group standard deviation of y over channels and
    positions: alpha = weight / std_g from the moments of y, beta = bias."""
    found = submodule(model, norm)
    if type(found) not in (EvoNorm2dS0, EvoNorm2dS0a):
        raise UnsupportedModel(f"{norm} is {type(found).__name__}, not EvoNorm2dS0 / S0a")
    module = cast(EvoNorm2dS0, found)
    groups, eps, channels = int(module.groups), float(module.eps), cast(Tensor, module.weight).shape[0]

    def excitation(grouped: Tensor) -> tuple[Tensor, Tensor]:
        std = (grouped[:, 1::2] - grouped[:, 0::2].square() + eps).sqrt().repeat_interleave(channels // groups, 1)
        alpha = cast(Tensor, module.weight) / std
        return alpha, cast(Tensor, module.bias).expand_as(alpha)

    inner: Activation | ChannelSiLU = (
        Activation("identity") if module.v is None else ChannelSiLU(cast(Tensor, module.v).detach())
    )
    return PooledCoupling(
        inner_input=Tap(norm, "input"),
        excitation=excitation,
        squeeze=lambda: group_averages(groups, channels),
        label=f"{type(module).__name__}({groups})",
        moments=2,
        inner_activation=inner,
        statistics_of_input=True,
        statistics_dtype=torch.float32,  # timm's group_std upcasts to float32 and back
        modules=(norm,),
    )


@contextmanager
def exact_evo_norm_statistics() -> Iterator[None]:
    """timm's EvoNorm group std in the input's own dtype (it computes it in float32): for float64 references."""

    def group_std(x: Tensor, groups: int = 32, eps: float = 1e-5, flatten: bool = False) -> Tensor:
        b, c, h, w = x.shape
        std = x.reshape(b, groups, -1).var(dim=2, unbiased=False, keepdim=True).add(eps).sqrt()
        return std.expand(b, groups, c // groups * h * w).reshape(b, c, h, w)

    original = timm_evo_norm.group_std
    timm_evo_norm.group_std = group_std
    try:
        yield
    finally:
        timm_evo_norm.group_std = original


EVO_NORMS = (EvoNorm2dS0, EvoNorm2dS0a)


def evo_norm_head(model: nn.Module, *, feature_layer: str, norm: str, pool: str, classifier: str) -> NormalisedHead:
    """feature_layer -> EvoNorm2dS0 / S0a ``norm`` (its own non-linearity, no activation after) -> GAP -> Linear."""
    require_average_pool(submodule(model, pool), pool)
    require_linear(submodule(model, classifier), classifier)
    conv = require_plain_conv(model, feature_layer)
    return NormalisedHead(
        feature_layer=feature_layer,
        pre_activation=Tap(norm, "output"),
        pooled=Tap(classifier, "input"),
        channel_scale=conv.weight.new_ones(conv.out_channels).detach(),
        activation=Activation("identity"),
        classifier=classifier,
        coupling=evo_norm(model, norm),
    )
