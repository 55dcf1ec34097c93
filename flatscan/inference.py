"""A model's inference form: the kernels it applies at eval time, held as plain convolutions.

flatscan measures the kernel a layer applies. Two kinds of timm layers store something else:

- multi-branch blocks (RepVGG, MobileOne, RepGhost, RepViT, FastViT, ...) sum several convolutions at train
  time; timm fuses them into one kernel for inference (``timm.utils.reparameterize_model``);
- weight-standardised convolutions (NFNet's ``ScaledStdConv2d``, BiT's ``StdConv2d``, and transformers' BiT
  ``WeightStandardizedConv2d``) standardise their stored weight in every forward; the kernel they apply is
  ``gain * scale * (W - mean) / std``.

:func:`inference_form` turns both into plain convolutions computing the same function.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from timm.utils import reparameterize_model
from torch import nn

_STANDARDISED = (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)
# transformers' BiT module (transformers is optional: without the module imported, no such convolution exists).
_TRANSFORMERS_BIT = "transformers.models.bit.modeling_bit"


def _standardised() -> tuple[type[nn.Conv2d], ...]:
    """The weight-standardised convolution classes: timm's, and transformers' BiT one once it is imported."""
    bit = sys.modules.get(_TRANSFORMERS_BIT)
    hf = getattr(bit, "WeightStandardizedConv2d", None)
    return _STANDARDISED + ((hf,) if isinstance(hf, type) else ())


def inference_form(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with multi-branch blocks fused and weight-standardised convolutions materialised.

    In place (the returned module is ``model``, unless timm's fusion replaced the root); the function computed
    is unchanged up to rounding.
    """
    model = reparameterize_model(model.eval(), inplace=True)
    standardised = _standardised()
    for name, module in list(model.named_modules()):
        if isinstance(module, standardised):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, applied_conv(module))
    return model


def applied_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A plain convolution holding the kernel that the weight-standardised ``conv`` applies."""
    gain = None
    if isinstance(conv, (ScaledStdConv2d, ScaledStdConv2dSame)):
        gain = (conv.gain * conv.scale).reshape(-1)
    with torch.no_grad():
        # timm's own standardisation, so the kernel is the one its forward computes.
        kernel = F.batch_norm(
            conv.weight.reshape(1, conv.out_channels, -1),
            None,
            None,
            weight=gain,
            training=True,
            momentum=0.0,
            eps=conv.eps,  # type: ignore[arg-type]
        ).reshape_as(conv.weight)
    # timm's *Same variants pad dynamically (same_pad); transformers' BiT conv through its DynamicPad2d ``pad``,
    # the same TF 'SAME' padding (pad_h // 2 on top, the rest below; likewise for the width).
    dynamic_same = getattr(conv, "same_pad", False) or (
        type(conv).__module__ == _TRANSFORMERS_BIT and getattr(conv, "pad", None) is not None
    )
    plain_type = Conv2dSame if dynamic_same else nn.Conv2d
    plain = plain_type(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=0 if dynamic_same else conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=conv.groups,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    plain.weight = nn.Parameter(kernel)
    if conv.bias is not None:
        plain.bias = nn.Parameter(conv.bias.detach().clone())
    return plain.train(conv.training)
