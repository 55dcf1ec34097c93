"""An independent certificate for one model: closed-form block traces Tr(H_cc') against autograd.

The closed form goes through the adapter's normalised head; the reference differentiates the real
model graph twice with respect to the feature layer's kernel (Hessian-vector products, everything
before the feature layer constant). Agreement means the adapter normalised the head correctly.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from typing import cast

import torch
import torch.nn.functional as F
from timm.layers.activations import HardSigmoid
from torch import Tensor, nn

from flatscan._engine import (
    check_coupling,
    check_normalisation,
    head_taps,
    model_logits,
    prepare_tapped,
    recording,
    sample_terms,
    scan_constants,
    tapped_offset,
)
from flatscan.contract import NormalisedHead, exact_evo_norm_statistics
from flatscan.registry import describe

# One-hot filters pushed through the feature layer together (memory: chunk x one output channel).
_RESPONSE_CHUNK = 512
# Relative errors are taken against the entry or, for entries near zero, this fraction of the largest one.
_ERROR_FLOOR = 1e-4


@dataclass(frozen=True)
class VerifyResult:
    """Sampled (c, c') pairs with both values of Tr(H_cc') for the batch's mean loss, in float64.

    All-zero reference values (a degenerate batch: saturated softmax, dead units) certify nothing and fail.
    """

    feature_layer: str
    pairs: list[tuple[int, int]]
    closed_form: list[float]
    autograd: list[float]
    max_relative_error: float
    tolerance: float
    downstream_layers: list[str]  # weight layers fed by the feature layer outside the normalised head

    @property
    def degenerate(self) -> bool:
        """All sampled reference values are zero: nothing was certified."""
        return not any(self.autograd)

    @property
    def passed(self) -> bool:
        return self.max_relative_error <= self.tolerance and not self.downstream_layers

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "degenerate": self.degenerate, "passed": self.passed}


def _head_modules(model: nn.Module, head: NormalisedHead, pooled: Tensor) -> set[str]:
    """Names of the modules the normalised head runs: the classifier, a general head's, a coupling's (its gate)."""
    used = {head.classifier, *(name for name, _ in head.parallel_classifiers)}
    if head.coupling is not None:
        roots = head.coupling.modules
        used |= {
            name
            for name, _ in model.named_modules()
            if any(name.split(".")[: len(r.split("."))] == r.split(".") for r in roots)
        }
    if head.head_fn is not None:
        handles = [
            module.register_forward_pre_hook(lambda *_, name=name: used.add(name))
            for name, module in model.named_modules()
        ]
        try:
            with torch.no_grad():
                head.head_fn(pooled)
        finally:
            for handle in handles:
                handle.remove()
    return used


def _downstream_weight_layers(model: nn.Module, head: NormalisedHead, images: Tensor, exempt: set[str]) -> list[str]:
    """Conv/Linear layers whose input depends on the feature layer's output, except ``exempt``.

    Found by data flow, not by execution order: a shortcut conv that runs after the feature layer
    (ResNet's downsample) does not depend on it and is not reported.
    """
    modules = dict(model.named_modules())
    fed: list[str] = []

    def note_if_fed(name: str, _module: nn.Module, args: tuple[Tensor, ...]) -> None:
        if args[0].requires_grad:
            fed.append(name)

    # The feature layer's output becomes the only tensor that requires grad (parameters do not); a copy of
    # that leaf, so an in-place activation right after the layer is allowed.
    handles = [
        modules[head.feature_layer].register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_(True).clone())
    ]
    for name, module in modules.items():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and name != head.feature_layer and name not in exempt:
            handles.append(module.register_forward_pre_hook(partial(note_if_fed, name)))
    try:
        with torch.enable_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return fed


def _basis_responses(layer: nn.Module, inputs: Tensor, column: int, coords: Tensor) -> Tensor:
    """d z / d K_{column, d} for d in ``coords``: the layer's own op (padding, stride, dilation) on one-hot filters.

    Shape (N, len(coords), H', W') for a conv, (N, ..., len(coords)) for a channels-last Linear.
    """
    weight = cast(Tensor, layer.weight)
    basis = torch.zeros(len(coords), weight[0].numel(), dtype=weight.dtype)
    basis[torch.arange(len(coords)), coords] = 1.0
    if isinstance(layer, nn.Conv2d) and layer.groups > 1:
        # Filter `column` sees only its group's input channels: run the op on those, ungrouped.
        group = column // (weight.shape[0] // layer.groups)
        inputs = inputs[:, group * weight.shape[1] : (group + 1) * weight.shape[1]]
        layer = copy.copy(layer)
        layer.groups = 1
    params = {"weight": basis.view(len(coords), *weight.shape[1:])}
    if getattr(layer, "bias", None) is not None:
        params["bias"] = basis.new_zeros(len(coords))
    return torch.func.functional_call(layer, params, (inputs,))


@dataclass(frozen=True)
class _OutputLayout:
    """The feature layer's output z as the verifier moves through it: (N, C, L) channel-first, or the layer's own."""

    output: Tensor
    channel_axis: int

    @property
    def n(self) -> int:
        return self.output.shape[0]

    @property
    def channels(self) -> int:
        return self.output.shape[self.channel_axis]

    @property
    def spatial(self) -> torch.Size:
        return self.output.movedim(self.channel_axis, 1).shape[2:]

    @property
    def positions(self) -> int:
        return math.prod(self.spatial)

    def channel_first(self, z: Tensor) -> Tensor:
        """(N, C, L) view of a tensor in the layer's output layout."""
        return z.movedim(self.channel_axis, 1).flatten(2)

    def in_channel(self, values: Tensor, column: int) -> Tensor:
        """(N, L) ``values`` placed in channel ``column``, zero elsewhere, in the layer's output layout."""
        tangent = self.output.new_zeros(self.n, self.channels, self.positions)
        tangent[:, column] = values
        return tangent.view(self.n, self.channels, *self.spatial).movedim(1, self.channel_axis)


def _feature_layer_io(model: nn.Module, layer: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """The feature layer's input and (a copy of) its output in a forward pass of ``images``."""
    captured: dict[str, Tensor] = {}
    handle = layer.register_forward_hook(lambda _m, args, out: captured.update(inputs=args[0], output=out.clone()))
    with torch.no_grad():
        model(images)
    handle.remove()
    return captured["inputs"], captured["output"]


@contextmanager
def _loss_hvp(
    model: nn.Module, layer: nn.Module, images: Tensor, labels: Tensor, output: Tensor
) -> Iterator[Callable[[Tensor], Tensor]]:
    """``tangent -> M tangent``, M = d2 loss / dz2 at z = ``output``: Hessian-vector products of the model's tail.

    The loss is a function of the layer's output z (the layer's output is replaced by z, so nothing before it
    is differentiated).
    """
    replacement: dict[str, Tensor] = {}
    # Replace the layer's output only while the loss is traced (not in the basis responses), and by a copy, so
    # in-place activations after the layer (ReLU(inplace=True)) do not write into z.
    handle = layer.register_forward_hook(lambda *_: replacement["z"].clone() if replacement else None)

    def loss(z: Tensor) -> Tensor:
        replacement["z"] = z
        return F.cross_entropy(model_logits(model(images)), labels)

    try:
        _, vjp = torch.func.vjp(torch.func.grad(loss), output)  # type: ignore[misc]  # stubs: has_aux's 3-tuple
        replacement.clear()
        yield lambda tangent: vjp(tangent)[0]
    finally:
        handle.remove()


def _autograd_block_traces(
    model: nn.Module, feature_layer: str, images: Tensor, labels: Tensor, column: int, rows: list[int]
) -> Tensor:
    """Tr(H_{r,column}) for each r in ``rows``, shape (len(rows),), through the real model graph.

    The loss is taken as a function of the feature layer's output z (:func:`_loss_hvp`), and the kernel enters z
    linearly through the layer's own op J: H = J^T M J with M = d2 loss / dz2, and filter c' moves only channel
    c' of z. So

        Tr(H_{r,c'}) = sum_d <J e_{r,d}, M J e_{c',d}>                                  (D products with M)
                     = sum_{(n,p),(m,q)} M[(n,r,p), (m,c',q)] sum_d J^r_d[n,p] J^c'_d[m,q]     (N x L products)

    whichever needs fewer Hessian-vector products of the model's tail. J^r_d = J e_{r,d} is the same for every
    filter of an ungrouped layer; in a grouped conv it depends on the filter's group (its input channels).
    """
    layer = dict(model.named_modules())[feature_layer]
    inputs, output = _feature_layer_io(model, layer, images)
    layout = _OutputLayout(output, 1 if isinstance(layer, nn.Conv2d) else output.dim() - 1)
    # A grouped conv's filters see their own group's input channels: row r's J e_{r,d} is not column's.
    per_group = layout.channels // layer.groups if isinstance(layer, nn.Conv2d) else layout.channels
    representative = {row // per_group: row for row in rows}  # one filter of each row group
    row_group = [row // per_group for row in rows]

    def responses(coords: Tensor, filter_index: int) -> Tensor:  # J e_{filter,d} in its channel: (N, len(coords), L)
        return layout.channel_first(_basis_responses(layer, inputs, filter_index, coords))

    with _loss_hvp(model, layer, images, labels, output) as tail_hvp:

        def hvp(values: Tensor) -> Tensor:  # M times (N, L) values in channel `column`, channel-first, rows: (N, R, L)
            return layout.channel_first(tail_hvp(layout.in_channel(values, column)))[:, rows]

        basis = _Basis(responses, column, representative, row_group, layer.weight[0].numel())
        if basis.dim <= layout.n * layout.positions:
            return _traces_by_coordinate(basis, hvp, output.new_zeros(len(rows)))
        return _traces_by_position(basis, hvp, layout, output.new_zeros(len(rows)))


@dataclass(frozen=True)
class _Basis:
    """The responses J e_{f,d} of the feature layer to one-hot filters, for ``column`` and the rows' groups."""

    responses: Callable[[Tensor, int], Tensor]  # (coords, filter) -> (N, len(coords), L)
    column: int
    representative: dict[int, int]  # row group -> one filter of it
    row_group: list[int]  # the group of each row
    dim: int  # D, the length of a filter

    def chunks(self) -> Iterator[Tensor]:
        """The filter coordinates d, in chunks of at most ``_RESPONSE_CHUNK``."""
        for start in range(0, self.dim, _RESPONSE_CHUNK):
            yield torch.arange(start, min(start + _RESPONSE_CHUNK, self.dim))


def _traces_by_coordinate(basis: _Basis, hvp: Callable[[Tensor], Tensor], traces: Tensor) -> Tensor:
    """sum_d <J e_{r,d}, M J e_{c',d}>: one Hessian-vector product per filter coordinate d."""
    for coords in basis.chunks():
        chunk = basis.responses(coords, basis.column)
        by_group = {group: basis.responses(coords, row) for group, row in basis.representative.items()}
        row_chunk = torch.stack([by_group[group] for group in basis.row_group], 1)  # (N, R, len(coords), L)
        for d in range(chunk.shape[1]):
            traces += torch.einsum("nrp,nrp->r", hvp(chunk[:, d]), row_chunk[:, :, d])
    return traces


def _traces_by_position(
    basis: _Basis, hvp: Callable[[Tensor], Tensor], layout: _OutputLayout, traces: Tensor
) -> Tensor:
    """sum over (n,p),(m,q) of M entries times Gram sums over d: one Hessian-vector product per sample position."""
    n, positions = layout.n, layout.positions
    grams = {group: traces.new_zeros(n, positions, n, positions) for group in basis.representative}
    for coords in basis.chunks():
        chunk = basis.responses(coords, basis.column)
        for group, row in basis.representative.items():
            grams[group] += torch.einsum("ndp,mdq->npmq", basis.responses(coords, row), chunk)
    for sample in range(n):
        for position in range(positions):
            one_hot = traces.new_zeros(n, positions)
            one_hot[sample, position] = 1.0
            row_gram = torch.stack([grams[group][:, :, sample, position] for group in basis.row_group], 1)
            traces += torch.einsum("nrp,nrp->r", hvp(one_hot), row_gram)
    return traces


def _twice_differentiable(model: nn.Module) -> nn.Module:
    """``model`` with torch's Hardsigmoid (no second derivative in autograd) replaced by relu6(x + 3) / 6, the same
    function written in ops autograd differentiates twice (eSE gates)."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Hardsigmoid:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, HardSigmoid())
    return model


def verify(
    model: nn.Module, batch: tuple[Tensor, Tensor], pairs: int = 16, seed: int = 0, tolerance: float = 1e-8
) -> VerifyResult:
    """Compare closed-form and autograd Tr(H_cc') on ``pairs`` sampled filter pairs, in float64 on CPU.

    The model is copied (the caller's is untouched). Raises :class:`UnsupportedModel` as ``scan`` does.
    """
    with exact_evo_norm_statistics():  # float64 throughout: timm's EvoNorm would take its group std in float32
        return _verify_copy(model, batch, pairs, seed, tolerance)


def _verify_copy(
    model: nn.Module, batch: tuple[Tensor, Tensor], pairs: int, seed: int, tolerance: float
) -> VerifyResult:
    model = _twice_differentiable(copy.deepcopy(model).to("cpu", torch.float64).eval())
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    head = describe(model)
    images, labels = batch[0].to("cpu", torch.float64), batch[1].to("cpu")
    const = scan_constants(model, head, torch.device("cpu"), torch.float64)
    with recording(model, head_taps(head)) as recorder, torch.no_grad():
        logits, tapped = recorder.forward(model, images)
    tapped, logits = prepare_tapped(head, tapped, logits, torch.float64)
    check_normalisation(
        head,
        tapped["pre_activation"].flatten(2),
        tapped["pooled"].flatten(1),
        logits,
        torch.float64,
        tapped_offset(tapped),
    )
    check_coupling(head, tapped, torch.float64)
    closed = sample_terms(head, const, tapped, logits, labels).block_traces().mean(0)

    generator = torch.Generator().manual_seed(seed)
    channels = closed.shape[0]
    n_columns = min(channels, max(1, math.ceil(pairs / 4)))
    per_column = max(1, math.ceil(pairs / n_columns))
    sampled: list[tuple[int, int]] = []
    autograd_values: list[float] = []
    # Columns mostly among filters the closed form sees as active (dead ReLU filters give 0 = 0, a vacuous
    # check), plus one drawn from all filters so that a closed form wrongly reporting zero is still caught.
    nonzero = closed.diagonal().nonzero().flatten()
    active: list[int] = nonzero[torch.randperm(len(nonzero), generator=generator)][: n_columns - 1].tolist()
    anywhere = [c for c in torch.randperm(channels, generator=generator).tolist() if c not in active]
    for column in (active + anywhere)[:n_columns]:
        # The diagonal pair checks the curvature term, the others the cross term.
        others = [c for c in torch.randperm(channels, generator=generator).tolist() if c != column]
        rows = [column, *others][: min(per_column, pairs - len(sampled))]
        if not rows:
            break
        autograd_values += _autograd_block_traces(model, head.feature_layer, images, labels, column, rows).tolist()
        sampled += [(row, column) for row in rows]
    closed_values = [closed[row, column].item() for row, column in sampled]
    scale = max(abs(v) for v in autograd_values)
    floor = _ERROR_FLOOR * scale
    errors = [
        abs(a - b) / max(abs(b), floor) if scale > 0 else math.inf
        for a, b in zip(closed_values, autograd_values, strict=True)
    ]
    return VerifyResult(
        feature_layer=head.feature_layer,
        pairs=sampled,
        closed_form=closed_values,
        autograd=autograd_values,
        max_relative_error=max(errors),
        tolerance=tolerance,
        downstream_layers=_downstream_weight_layers(
            model, head, images, _head_modules(model, head, tapped["pooled"].flatten(1))
        ),
    )
