"""The machinery the scanner and the verifier share: taps on a forward pass and the closed form's ingredients.

Private to flatscan (import it from flatscan.scanner and flatscan.verify only): the public entry points are
:func:`flatscan.scan` and :func:`flatscan.verify`. Given a :class:`~flatscan.contract.NormalisedHead`, this
module records the tensors it names during one forward pass (:func:`recording`), checks that they reproduce
the model's pooled vector (:func:`check_normalisation`), and forms the per-sample terms of the closed form
(:func:`sample_terms`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame, pad_same
from timm.layers.conv2d_same import Conv2dSameExport
from torch import Tensor, nn

from flatscan import flatness
from flatscan.contract import ChannelNorm, NormalisedHead, Tap
from flatscan.errors import UnsupportedModel


class Recorder:
    """Forward hooks that keep a copy of each tapped tensor of one forward pass."""

    def __init__(self, model: nn.Module, taps: dict[str, Tap]) -> None:
        modules = dict(model.named_modules())
        self.taps = taps
        self.values: dict[str, Tensor] = {}
        self.recording = False  # only the model's own forward is recorded, not the head calls of the math
        self.handles = []
        for key, tap in taps.items():
            module = modules.get(tap.module)
            if module is None:
                raise UnsupportedModel(f"the adapter taps {tap.module!r}, which the model does not have")
            if tap.point == "input":
                self.handles.append(module.register_forward_pre_hook(partial(self._keep_input, key)))
            else:
                self.handles.append(module.register_forward_hook(partial(self._keep_output, key)))

    def _keep(self, key: str, tensor: Tensor) -> None:
        if not self.recording:
            return
        if key in self.values:
            raise UnsupportedModel(
                f"{self.taps[key].module} runs more than once in a forward pass; flatscan needs one call"
            )
        if key == "pooled" and tensor.dim() == 4 and tensor.shape[2] * tensor.shape[3] != 1:
            # Refused here, before the rest of the forward: a fixed-size pool (transformers' EfficientNet pools
            # with AvgPool2d(hidden_dim)) is global only up to its window, and the model may fail after it.
            positions = "x".join(str(n) for n in tensor.shape[2:])
            raise UnsupportedModel(
                f"the pool ({self.taps[key].module}) leaves {positions} positions per channel at this input size, "
                "not one: it is not a global pool for images this large; scan smaller images (--img-size)"
            )
        # A copy: in-place activations (ReLU(inplace=True), x += shortcut) overwrite the original.
        self.values[key] = tensor.detach().clone()

    def _keep_input(self, key: str, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self._keep(key, args[0])

    def _keep_output(self, key: str, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        self._keep(key, output)

    def forward(self, model: nn.Module, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The model's logits and the tensors tapped during that forward pass."""
        self.recording = True
        try:
            logits = model_logits(model(images))
        finally:
            self.recording = False
        missing = [self.taps[key].module for key in self.taps if key not in self.values]
        if missing:
            raise UnsupportedModel(f"{', '.join(missing)} did not run in the forward pass")
        values, self.values = self.values, {}
        return logits, values

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def model_logits(output: Any) -> Tensor:
    """The logits of a model's forward: the tensor itself, or the ``logits`` of a transformers ``ModelOutput``."""
    return getattr(output, "logits", output)


@contextmanager
def recording(model: nn.Module, taps: dict[str, Tap]) -> Iterator[Recorder]:
    """A :class:`Recorder` of ``taps`` on ``model``, its hooks removed on leaving (also on error)."""
    recorder = Recorder(model, taps)
    try:
        yield recorder
    finally:
        recorder.remove()


def feature_patches(layer: nn.Module, inputs: Tensor) -> Tensor:
    """Patches (N, groups, D, L) seen by ``layer``: Conv2d, timm's Conv2dSame, or a channels-last Linear."""
    if isinstance(layer, nn.Linear):
        return flatness.linear_patches(inputs)
    if not isinstance(layer, nn.Conv2d):
        raise UnsupportedModel(f"the feature layer is {type(layer).__name__}; flatscan measures Conv2d and Linear")
    # Conv2d stores its 2-d settings as pairs; torch's stubs type them tuple[int, ...].
    kernel = cast(tuple[int, int], layer.kernel_size)
    stride = cast(tuple[int, int], layer.stride)
    dilation = cast(tuple[int, int], layer.dilation)
    if isinstance(layer, (Conv2dSame, Conv2dSameExport)):
        # TensorFlow 'SAME' padding depends on the input size; timm's own pad_same applies it.
        inputs = pad_same(inputs, kernel, stride, dilation)  # type: ignore[arg-type]  # timm types them List[int]
        padding = (0, 0, 0, 0)
    elif layer.padding == "same":
        # As torch does it: the odd pixel of an asymmetric padding goes right / bottom.
        th, tw = (d * (k - 1) for d, k in zip(dilation, kernel, strict=True))
        padding = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    elif layer.padding == "valid":
        padding = (0, 0, 0, 0)
    else:
        ph, pw = cast(tuple[int, int], layer.padding)
        padding = (pw, pw, ph, ph)
    return flatness.conv_patches(inputs, kernel, stride, dilation, padding, layer.groups, layer.padding_mode)


@dataclass(frozen=True)
class Constants:
    """Per-scan tensors on the compute device and dtype."""

    feature_layer: nn.Module
    classifier_weight: Tensor
    channel_scale: Tensor
    kernel_gram: Tensor
    kernel: Tensor  # K (C, D), the flattened filters
    split_precision: bool = False  # kappa's contraction through flatness.split_matmul (float32, checked by the scan)
    kernel_norm: Tensor | None = None  # lambda_max(kernel_gram), for kappa over the likeliest classes (kappa_rtol)


def channel_index(head: NormalisedHead, device: torch.device) -> slice | Tensor:
    """The head's pooled channels as an index for tensors on ``device`` (a slice, or a LongTensor there)."""
    return head.channels if isinstance(head.channels, slice) else head.channels.to(device)


def tapped_offset(tapped: dict[str, Tensor]) -> Tensor | None:
    """The term added after the activation (tapped at ``head.pooled_offset``) as (N, C, L), or None."""
    offset = tapped.get("pooled_offset")
    return None if offset is None else offset.flatten(2)


def check_normalisation(
    head: NormalisedHead,
    pre_activation: Tensor,
    pooled: Tensor,
    logits: Tensor,
    tap_dtype: torch.dtype,
    pooled_offset: Tensor | None = None,
) -> None:
    """Refuse a model whose pooled vector (or logits) the normalised head does not reproduce.

    ``pooled_offset`` is the tapped term added after the activation (``head.pooled_offset``), (N, C, L), cut to
    the head's channels; its mean over positions is added to the expected pooled vector.
    """
    # Loose enough for the rounding of a half-precision (--amp) forward, tight enough to catch a wrong head.
    tolerance = min(1e3 * torch.finfo(tap_dtype).eps, 2e-2)
    got = pooled[:, channel_index(head, pooled.device)]
    expected = head.activation(pre_activation).mean(-1)
    if (head.pooled_offset is None) != (pooled_offset is None):
        raise ValueError("pooled_offset is the tensor read at head.pooled_offset, given exactly when it is set")
    if pooled_offset is not None and head.pooled_offset is not None:
        if pooled_offset.shape != pre_activation.shape:
            raise UnsupportedModel(
                f"the term added after the activation ({head.pooled_offset.point} of {head.pooled_offset.module}) "
                f"has shape {tuple(pooled_offset.shape)}, not the pre-activation's {tuple(pre_activation.shape)}"
            )
        expected = expected + pooled_offset.mean(-1)
    if expected.shape != got.shape or (expected - got).abs().max() > tolerance * (1 + got.abs().max()):
        offset = (
            ""
            if head.pooled_offset is None
            else f" + the mean of {head.pooled_offset.module}'s {head.pooled_offset.point}"
        )
        raise UnsupportedModel(
            f"the pooled vector ({head.pooled.point} of {head.pooled.module}) is not the average of "
            f"{head.activation.label}(pre-activation at {head.pre_activation.module}){offset}: something between "
            f"the feature layer and the pool is not element-wise, or the {head.family} adapter is wrong"
        )
    if head.head_fn is not None:
        recomputed = head.head_fn(pooled)
        if (recomputed - logits).abs().max() > tolerance * (1 + logits.abs().max()):
            raise UnsupportedModel(f"the {head.family} adapter's head function does not reproduce the logits")


def check_coupling(head: NormalisedHead, tapped: dict[str, Tensor], tap_dtype: torch.dtype) -> None:
    """Refuse a model whose gate or norm the coupling does not reproduce (alpha * w + beta, or the LayerNorm)."""
    coupling = head.coupling
    if coupling is None:
        return
    inputs = tapped["inner_input"].flatten(2)
    if isinstance(coupling, ChannelNorm):
        expected = channel_layer_norm_of(coupling, inputs)
        got, where = tapped["pre_activation"].flatten(2), head.pre_activation.module
    else:
        inner = coupling.inner_activation(inputs)
        base = inputs if coupling.statistics_of_input else inner
        stats = torch.stack([base.mean(-1), base.square().mean(-1)][: coupling.moments], -1)
        alpha, beta = coupling.affine(stats)
        expected = alpha[..., None] * inner + beta[..., None]
        got = tapped["affine_output" if coupling.affine_output is not None else "pre_activation"].flatten(2)
        where = (coupling.affine_output or head.pre_activation).module
    if not isinstance(coupling, ChannelNorm) and coupling.statistics_dtype is not None:
        tap_dtype = min(tap_dtype, coupling.statistics_dtype, key=lambda dtype: torch.finfo(dtype).bits)
    tolerance = min(1e3 * torch.finfo(tap_dtype).eps, 2e-2)
    if expected.shape != got.shape or (expected - got).abs().max() > tolerance * (1 + got.abs().max()):
        raise UnsupportedModel(
            f"the {coupling.label} read at {where} is not what the {head.family} adapter's description of the tail "
            "computes from the feature layer's output: the adapter is wrong about this model"
        )


def channel_layer_norm_of(norm: ChannelNorm, inputs: Tensor) -> Tensor:
    """The LayerNorm across channels of ``inputs`` (N, C, L)."""
    out = F.layer_norm(inputs.transpose(1, 2), inputs.shape[1:2], eps=norm.eps)
    if norm.weight is not None:
        out = out * norm.weight.to(out)
    if norm.bias is not None:
        out = out + norm.bias.to(out)
    return out.transpose(1, 2)


def prepare_tapped(
    head: NormalisedHead, tapped: dict[str, Tensor], logits: Tensor, dtype: torch.dtype
) -> tuple[dict[str, Tensor], Tensor]:
    """Tapped tensors and logits in the compute dtype; the pre-activation cut to the feature layer's channels."""
    tapped = {key: value.to(dtype) for key, value in tapped.items()}
    if head.pre_activation.channels_last:
        tapped["pre_activation"] = tapped["pre_activation"].movedim(-1, 1)
    if head.pooled_offset is not None and head.pooled_offset.channels_last:
        tapped["pooled_offset"] = tapped["pooled_offset"].movedim(-1, 1)
    for key, tap in coupling_taps(head).items():
        if tap.channels_last:
            tapped[key] = tapped[key].movedim(-1, 1)
    offset = ("pooled_offset",) if head.pooled_offset is not None else ()
    coupled = tuple(coupling_taps(head)) if head.coupling is not None and head.coupling.pooled_layout else ()
    for key in ("pre_activation", *offset, *coupled):
        tapped[key] = tapped[key][:, channel_index(head, tapped[key].device)]
    return tapped, logits.to(dtype)


def scan_constants(model: nn.Module, head: NormalisedHead, device: torch.device, dtype: torch.dtype) -> Constants:
    """The feature layer, the classifier's weight, the channel scale and the kernel Gram matrix K K^T in ``dtype``
    (within-group pairs only for a grouped convolution: :func:`within_group_gram`)."""
    modules = dict(model.named_modules())
    feature_layer = modules[head.feature_layer]
    kernel = feature_layer.weight.detach().to(dtype).flatten(1)
    # (classes, C): a 1x1-conv classifier's (classes, C, 1, 1) kernel is the same matrix
    classifiers = [(head.classifier, head.classifier_gain), *head.parallel_classifiers]
    weights = [
        torch.as_tensor(gain).to(dtype) * modules[name].weight.detach().to(dtype).flatten(1)
        for name, gain in classifiers
    ]
    return Constants(
        feature_layer=feature_layer,
        classifier_weight=torch.stack(weights).sum(0),
        channel_scale=head.channel_scale.to(device, dtype),
        kernel_gram=within_group_gram(kernel, getattr(feature_layer, "groups", 1)),
        kernel=kernel,
    )


def within_group_gram(kernel: Tensor, groups: int) -> Tensor:
    """K K^T of the flattened filters (C, D), zero between filters of different groups.

    A grouped convolution is ``groups`` independent layers on disjoint input channels: relative flatness sums
    only pairs (c, c') of the same group (the spec's "Grouped and depthwise feature layers"); for a depthwise
    layer only the diagonal ||K_c||^2 remains.
    """
    gram = kernel @ kernel.T
    if groups == 1:
        return gram
    group = torch.arange(kernel.shape[0], device=kernel.device) // (kernel.shape[0] // groups)
    return gram * (group[:, None] == group[None, :]).to(gram.dtype)


def head_taps(head: NormalisedHead) -> dict[str, Tap]:
    """What a scan records: the feature layer's input, the pre-activation, the pooled vector, the classifier's input."""
    return {
        "features": Tap(head.feature_layer, "input"),
        "pre_activation": head.pre_activation,
        "pooled": head.pooled,
        "classifier_input": Tap(head.classifier, "input"),
        **({} if head.pooled_offset is None else {"pooled_offset": head.pooled_offset}),
        **coupling_taps(head),
    }


def coupling_taps(head: NormalisedHead) -> dict[str, Tap]:
    """The coupling's taps: y before the pooled statistics, and alpha * w + beta when it is read apart from v."""
    if head.coupling is None:
        return {}
    if isinstance(head.coupling, ChannelNorm):
        return {"inner_input": head.coupling.norm_input}
    taps = {"inner_input": head.coupling.inner_input}
    if head.coupling.affine_output is not None:
        taps["affine_output"] = head.coupling.affine_output
    return taps


@dataclass(frozen=True)
class Terms:
    """Per-sample ingredients of the element-wise closed form: patches P, sigma'(v), curv_c, e and B of the head, and
    the factors of <g_c, g_c'> (:func:`flatness.gradient_factors`, formed once for Tr(H), kappa and the checks)."""

    patches: Tensor
    slopes: Tensor
    curv: Tensor
    derivatives: flatness.HeadDerivatives
    factors: tuple[Tensor, Tensor]

    def trace(self) -> Tensor:
        """Tr(H) per sample, float64."""
        left, right = self.factors
        return flatness.hessian_trace((left * right).sum(-1), self.curv, self.derivatives)

    def relative_flatness(self, const: Constants) -> Tensor:
        """kappa per sample, float64: through the positions on small maps of one group, else through the Gram
        matrix K K^T o <g_c, g_c'> (its lower blocks: :func:`flatness.gram_contraction`)."""
        _, groups, kernel_size, positions = self.patches.shape
        channels, rows = self.slopes.shape[1], self.derivatives.rows
        if groups == 1 and flatness.positions_route_is_cheaper(channels, positions, kernel_size, rows):
            return flatness.relative_flatness_by_positions(
                const.kernel, self.slopes, self.patches, const.channel_scale, self.curv, self.derivatives
            )
        return flatness.relative_flatness(const.kernel_gram, self.factors, self.curv, self.derivatives)

    def bounded_relative_flatness(self, const: Constants, rtol: float) -> tuple[Tensor, Tensor]:
        """kappa over the likeliest classes and a bound on the rest per sample, float64: the exact kappa lies in
        [kappa, kappa + bound], bound <= ``rtol`` x the classes' part (:func:`flatness.truncated_gram_contraction`;
        a linear head, the Gram route)."""
        assert const.kernel_norm is not None
        cross, bound = flatness.truncated_gram_contraction(
            *self.factors, const.kernel_gram, const.kernel_norm, self.derivatives, rtol
        )
        return cross + flatness.kernel_curvature(const.kernel_gram, self.curv, self.derivatives), bound

    def block_traces(self) -> Tensor:
        """Tr(H_cc') per sample, (N, C, C), float64."""
        left, right = self.factors
        return flatness.block_traces(left @ right.transpose(1, 2), self.curv, self.derivatives)


@dataclass(frozen=True)
class CoupledSampleTerms:
    """Per-sample ingredients of a tail coupled through pooled statistics (:class:`flatness.CoupledTerms`)."""

    terms: flatness.CoupledTerms | flatness.ChannelNormTerms
    channel_scale: Tensor

    def trace(self) -> Tensor:
        return self.terms.trace(self.channel_scale)

    def relative_flatness(self, const: Constants) -> Tensor:
        scale = self.channel_scale
        return self.terms.contract(const.kernel_gram * scale[:, None] * scale[None, :])

    def block_traces(self) -> Tensor:
        return self.terms.block_traces(self.channel_scale)


def sample_terms(
    head: NormalisedHead, const: Constants, tapped: dict[str, Tensor], logits: Tensor, labels: Tensor
) -> Terms | CoupledSampleTerms:
    """The per-sample terms of the tapped tensors (prepared by :func:`prepare_tapped`)."""
    pre_activation = tapped["pre_activation"].flatten(2)
    patches = feature_patches(const.feature_layer, tapped["features"])
    if pre_activation.shape[-1] != patches.shape[-1]:
        raise UnsupportedModel(
            f"the pre-activation has {pre_activation.shape[-1]} positions but the feature layer "
            f"{patches.shape[-1]}: something between them changes the spatial size"
        )
    if head.head_fn is None:
        derivatives = flatness.linear_head_derivatives(logits, labels, const.classifier_weight)
        derivatives = replace(derivatives, split_precision=const.split_precision)
    else:
        derivatives = flatness.head_derivatives(head.head_fn, tapped["pooled"].flatten(1), labels)
    derivatives = derivatives.select(channel_index(head, pre_activation.device))
    if isinstance(head.coupling, ChannelNorm):
        norm = head.coupling
        return CoupledSampleTerms(
            flatness.channel_norm_terms(
                tapped["inner_input"].flatten(2),
                pre_activation,
                patches,
                norm.weight,
                norm.eps,
                head.activation,
                derivatives,
            ),
            const.channel_scale,
        )
    if head.coupling is not None:
        coupling = head.coupling
        terms = flatness.coupled_terms(
            tapped["inner_input"].flatten(2),
            pre_activation,
            patches,
            coupling.inner_activation,
            head.activation,
            coupling.moments,
            None if coupling.squeeze is None else coupling.squeeze(),
            coupling.excitation,
            derivatives,
            coupling.statistics_of_input,
        )
        return CoupledSampleTerms(terms, const.channel_scale)
    slopes, curvatures = head.activation.derivatives(pre_activation)
    curv = flatness.curvature(curvatures, patches, const.channel_scale)
    factors = flatness.gradient_factors(slopes, patches, const.channel_scale)
    return Terms(patches, slopes, curv, derivatives, factors)
