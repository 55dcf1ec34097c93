"""Exact Hessian trace and relative flatness of a CNN's feature layer, in closed form.

Pure tensor functions, batched over samples (leading dimension N); each returns per-sample
values. Notation of ``shared/docs/flatness-math.md``: the feature layer's filters K_c (flattened
to R^D) act on input patches P_p at the L output positions, ``v = s * z + t + r`` is the
pre-activation, ``h = mean_p sigma(v)`` the pooled vector, ``loss = CE(head(h), y)``::

    g_c     = (s_c / L) sum_p sigma'(v_cp) P_p                    gradient of h_c w.r.t. K_c
    e       = dloss/dh,   B = d2loss/dh2
    curv_c  = (s_c^2 / L) sum_p sigma''(v_cp) ||P_p||^2
    Tr(H)   = sum_c B_cc ||g_c||^2 + sum_c e_c curv_c
    kappa   = sum_{c,c'} (K K^T)_cc' B_cc' <g_c, g_c'> + sum_c ||K_c||^2 e_c curv_c
    kappa_W = ||x||^2 (sum_j p_j ||w_j||^2 - ||W^T p||^2)        classifier layer W acting on x

GEMMs run in the inputs' dtype (float32, or float64 end to end); every reduction to a per-sample number is
accumulated in float64. On CUDA the largest product, the contraction with the head's factor (classes x C^2 per
sample), may run as three TF32 tensor-core products (:func:`split_matmul`) with float32 accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("identity", "relu", "relu6", "leaky_relu", "silu", "gelu", "gelu_tanh", "hardswish", "mish")
_PIECEWISE_LINEAR = frozenset({"identity", "relu", "relu6", "leaky_relu"})
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_CUBIC = 0.044715
# Block columns of a symmetric (C, C) contraction (:func:`gram_contraction`): 8 do 9/16 of the whole product's work,
# in GEMMs still large enough to run at full speed (measured on CPU: 4 blocks 0.6x the full product's time, 8 0.5x).
_GRAM_BLOCKS = 8


@dataclass(frozen=True)
class Activation:
    """An element-wise activation ``gain * sigma(v)`` with closed-form first and second derivatives.

    ``gain`` is a constant factor on the output (NFNet's scaled activations), which a per-channel scale
    before a nonlinearity cannot express.
    """

    name: str
    negative_slope: float = 0.01  # leaky_relu only
    gain: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.name!r}; known: {', '.join(ACTIVATIONS)}")

    @property
    def label(self) -> str:
        """The name, with the gain when it is not 1 (e.g. ``1.7017*gelu``)."""
        return self.name if self.gain == 1.0 else f"{self.gain:g}*{self.name}"

    @property
    def piecewise_linear(self) -> bool:
        """Whether sigma'' vanishes almost everywhere (the curvature term is then zero)."""
        return self.name in _PIECEWISE_LINEAR

    def __call__(self, v: Tensor) -> Tensor:
        return self._sigma(v) if self.gain == 1.0 else self.gain * self._sigma(v)

    def derivatives(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """(gain * sigma'(v), gain * sigma''(v)), element-wise; kinks get the one-sided value (a null set)."""
        slopes, curvatures = self._derivatives(v)
        if self.gain == 1.0:
            return slopes, curvatures
        return self.gain * slopes, self.gain * curvatures

    def _sigma(self, v: Tensor) -> Tensor:
        match self.name:
            case "identity":
                return v
            case "relu":
                return F.relu(v)
            case "relu6":
                return F.relu6(v)
            case "leaky_relu":
                return F.leaky_relu(v, self.negative_slope)
            case "silu":
                return F.silu(v)
            case "gelu":
                return F.gelu(v)
            case "gelu_tanh":
                return F.gelu(v, approximate="tanh")
            case "hardswish":
                return F.hardswish(v)
            case _:
                return F.mish(v)

    def _derivatives(self, v: Tensor) -> tuple[Tensor, Tensor]:
        zero = torch.zeros_like(v)
        match self.name:
            case "identity":
                return torch.ones_like(v), zero
            case "relu":
                return (v > 0).to(v.dtype), zero
            case "relu6":
                return ((v > 0) & (v < 6)).to(v.dtype), zero
            case "leaky_relu":
                return torch.where(v > 0, 1.0, torch.full_like(v, self.negative_slope)), zero
            case "silu":
                sg = torch.sigmoid(v)
                return sg * (1 + v * (1 - sg)), sg * (1 - sg) * (2 + v * (1 - 2 * sg))
            case "gelu":
                pdf = torch.exp(-0.5 * v * v) / math.sqrt(2 * math.pi)
                cdf = 0.5 * (1 + torch.erf(v / math.sqrt(2.0)))
                return cdf + v * pdf, pdf * (2 - v * v)
            case "gelu_tanh":
                u1 = _SQRT_2_OVER_PI * (1 + 3 * _GELU_TANH_CUBIC * v * v)
                u2 = _SQRT_2_OVER_PI * 6 * _GELU_TANH_CUBIC * v
                t = torch.tanh(_SQRT_2_OVER_PI * (v + _GELU_TANH_CUBIC * v**3))
                sech2 = 1 - t * t
                return 0.5 * (1 + t) + 0.5 * v * sech2 * u1, sech2 * (u1 + 0.5 * v * (u2 - 2 * t * u1 * u1))
            case "hardswish":
                inside = (v > -3) & (v < 3)
                # Scalars are broadcast as tensors of v's dtype: a Python float alone would become float32.
                d1 = torch.where(v >= 3, 1.0, torch.where(inside, (2 * v + 3) / 6, zero))
                return d1, torch.where(inside, torch.full_like(v, 1 / 3), zero)
            case _:
                sg = torch.sigmoid(v)
                t = torch.tanh(F.softplus(v))
                dt = (1 - t * t) * sg
                return t + v * dt, dt * (2 + v * (1 - sg - 2 * t * sg))


@dataclass(frozen=True, eq=False)
class ChannelSiLU:
    """rho_c(y) = y * sigmoid(v_c y), a SiLU with a per-channel slope ``v`` (EvoNorm-S0's non-linearity).

    Same interface as :class:`Activation` for tensors (N, C, L).
    """

    slope: Tensor
    label: str = "y*sigmoid(v*y)"

    def __call__(self, y: Tensor) -> Tensor:
        return y * torch.sigmoid(self._slope(y) * y)

    def derivatives(self, y: Tensor) -> tuple[Tensor, Tensor]:
        v = self._slope(y)
        sg = torch.sigmoid(v * y)
        ds = sg * (1 - sg)
        return sg + v * y * ds, 2 * v * ds + v.square() * y * ds * (1 - 2 * sg)

    def _slope(self, y: Tensor) -> Tensor:
        return self.slope.to(y)[:, None]


def conv_patches(
    inputs: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    padding: tuple[int, int, int, int],
    groups: int,
    padding_mode: str = "zeros",
) -> Tensor:
    """Input patches P of a 2-D convolution, shape (N, groups, D, L), D = C_in/groups * kh * kw.

    ``padding`` is (left, right, top, bottom); the D axis is ordered like ``weight.reshape(C, -1)``.
    """
    if any(padding):
        inputs = F.pad(inputs, padding, mode="constant" if padding_mode == "zeros" else padding_mode)
    cols = F.unfold(inputs, kernel_size, dilation=dilation, stride=stride)
    return cols.unflatten(1, (groups, -1))


def linear_patches(inputs: Tensor) -> Tensor:
    """Patches of a Linear layer applied over a channels-last map (N, ..., D): shape (N, 1, D, L)."""
    return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1]).transpose(1, 2).unsqueeze(1)


def _scaled_slopes(slopes: Tensor, channel_scale: Tensor, groups: int) -> Tensor:
    """(s_c / L) sigma'(v_cp) as (N, groups, C/groups, L)."""
    n, c, positions = slopes.shape
    return (slopes * (channel_scale[:, None] / positions)).view(n, groups, c // groups, positions)


def feature_gradients(slopes: Tensor, patches: Tensor, channel_scale: Tensor) -> Tensor:
    """g_c = d h_c / d K_c = (s_c / L) sum_p sigma'(v_cp) P_p, shape (N, C, D).

    ``slopes`` is sigma'(v) as (N, C, L).
    """
    factor = _scaled_slopes(slopes, channel_scale, patches.shape[1])
    return (factor @ patches.transpose(2, 3)).flatten(1, 2)


def gradient_factors(slopes: Tensor, patches: Tensor, channel_scale: Tensor) -> tuple[Tensor, Tensor]:
    """(a, b) with <g_c, g_c'> = a_c . b_c': (F P^T P, F) for the scaled slopes F (N, C, L) when one group has
    L < D, never forming g; else (g, g), (N, C, D)."""
    _, groups, d, positions = patches.shape
    if groups == 1 and positions < d:
        factor = _scaled_slopes(slopes, channel_scale, 1)[:, 0]
        return _patch_left(patches, factor), factor
    g = feature_gradients(slopes, patches, channel_scale)
    return g, g


def curvature(curvatures: Tensor, patches: Tensor, channel_scale: Tensor) -> Tensor:
    """curv_c = (s_c^2 / L) sum_p sigma''(v_cp) ||P_p||^2, shape (N, C); ``curvatures`` is sigma''(v)."""
    n, groups, _, positions = patches.shape
    patch_sqnorms = patches.square().sum(2).unsqueeze(-1)  # (N, groups, L, 1)
    per_group = curvatures.view(n, groups, -1, positions) @ patch_sqnorms
    return per_group.reshape(n, -1) * (channel_scale.square() / positions)


@dataclass(frozen=True)
class HeadDerivatives:
    """e = dloss/dh (N, C) and B = d2loss/dh2 per sample.

    A general head keeps B (N, C, C). A linear head keeps the softmax ``probs`` (N, classes, float64)
    and ``weight`` W instead, since B = W^T (diag(p) - p p^T) W: its diagonal is then two small
    GEMMs and its contraction never forms B.
    """

    grad: Tensor
    hessian: Tensor | None = None
    probs: Tensor | None = None
    weight: Tensor | None = None
    split_precision: bool = False  # the factor's products through split_matmul (float32 inputs)
    classes: Tensor | None = None  # (N, J') the classes the factor keeps (linear head, --kappa-rtol); None: all

    def diagonal(self) -> Tensor:
        """B_cc, shape (N, C); for a linear head sum_k p_k (W_kc - (W^T p)_c)^2 in float64."""
        if self.hessian is not None:
            return self.hessian.diagonal(dim1=1, dim2=2)
        assert self.probs is not None and self.weight is not None
        return class_spread(self.probs, self.weight)

    def contract(self, q: Tensor, start: int, columns: slice) -> Tensor:
        """sum_{c,c'} q_cc' B_cc' per sample, float64, over a block of a (C, C) matrix: ``q`` holds its rows from
        ``start`` on and its columns ``columns`` (:func:`gram_contraction`'s block columns).

        A linear head uses B = sum_k p_k V_k^T V_k, V_k = w_k - W^T p: a sum of non-negative terms, each
        V_k^T q V_k in q's dtype, with no cancellation between two large numbers.
        """
        if self.hessian is not None:
            return (q * self.hessian[:, start:, columns]).sum((1, 2), dtype=torch.float64)
        assert self.probs is not None and self.weight is not None
        factor = self._factor(q.dtype)
        if self.split_precision:
            hi, lo = self._split_factor
            product = split_matmul((hi[:, :, start:], lo[:, :, start:]), q)
        else:
            product = factor[:, :, start:] @ q
        # V_k^T q V_k in q's dtype (a dot as long as the block is wide), weighted by p_k and summed in float64
        per_class = product.mul_(factor[:, :, columns]).sum(-1)
        return (per_class.double() * self._class_probs).sum(-1)

    def _factor(self, dtype: torch.dtype) -> Tensor:
        """V with B = sum_k p_k V_k^T V_k, V_k = w_k - W^T p: (N, classes, C) in ``dtype`` (linear head)."""
        return self._rows.to(dtype)

    @cached_property
    def _rows(self) -> Tensor:
        """V in the classifier weight's dtype, formed once: the contractions of one batch share it."""
        assert self.probs is not None and self.weight is not None
        dtype = self.weight.dtype
        mean_row = (self.probs @ self.weight.double()).to(dtype)  # W^T p, over all classes
        kept = self.weight if self.classes is None else self.weight[self.classes]
        return kept - mean_row.unsqueeze(1)

    @property
    def _class_probs(self) -> Tensor:
        """p_k of the factor's classes, (N, J'), float64."""
        probs = cast(Tensor, self.probs)
        return probs if self.classes is None else probs.gather(1, self.classes)

    @cached_property
    def _split_factor(self) -> tuple[Tensor, Tensor]:
        """V (float32) as :func:`split_tf32`'s pair, split once for the products of all blocks."""
        return split_tf32(self._factor(torch.float32))

    @property
    def rows(self) -> int:
        """J, the rows of :meth:`factor`: a linear head's classes (those kept), or C for a general head."""
        if self.hessian is not None:
            return self.hessian.shape[-1]
        return (self.classes if self.classes is not None else cast(Tensor, self.probs)).shape[1]

    def factor(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Rows V_j and weights w_j with B = sum_j w_j V_j^T V_j: (N, J, C) and (N, J).

        A linear head has J = classes and w = p (V as in :meth:`contract`); a general head's B is split by
        its eigendecomposition (J = C, w = +-1).
        """
        if self.hessian is None:
            return self._factor(dtype), self._class_probs.to(dtype)
        values, vectors = torch.linalg.eigh(self.hessian.double())
        rows = (values.abs().sqrt()[..., None] * vectors.transpose(1, 2)).to(dtype)
        return rows, values.sign().to(dtype)

    def take(self, sample: int) -> HeadDerivatives:
        """The derivatives of one sample, as a batch of one."""
        part = slice(sample, sample + 1)
        if self.hessian is not None:
            return replace(self, grad=self.grad[part], hessian=self.hessian[part])
        assert self.probs is not None
        classes = None if self.classes is None else self.classes[part]
        return replace(self, grad=self.grad[part], probs=self.probs[part], classes=classes)

    def apply_and_sandwich(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B x, x^T B x) per sample for ``x`` (N, C, A); a linear head goes through V x (classes x C x A), never
        forming B, and never a (C, C) x (C, A) product."""
        if self.hessian is not None:
            bx = self.hessian.to(x.dtype) @ x
            return bx, x.transpose(1, 2) @ bx
        factor, weights = self.factor(x.dtype)
        vx = factor @ x
        weighted = vx * weights.unsqueeze(-1)
        return factor.transpose(1, 2) @ weighted, vx.transpose(1, 2) @ weighted

    def matrix(self) -> Tensor:
        """B itself, shape (N, C, C); formed only for checks (``flatscan.verify``)."""
        if self.hessian is not None:
            return self.hessian
        assert self.probs is not None and self.weight is not None
        weight = self.weight.double()
        mean_row = self.probs @ weight
        return torch.einsum("nk,kc,kd->ncd", self.probs, weight, weight) - mean_row[:, :, None] * mean_row[:, None, :]

    def select(self, channels: slice | Tensor) -> HeadDerivatives:
        """Restrict to the pooled channels the feature layer feeds: a slice, or an index set (LongTensor)."""
        if self.hessian is not None:
            if isinstance(channels, Tensor):
                channels = channels.to(self.hessian.device)
            # Two steps: one [:, idx, idx] with index tensors would pair the indices (a diagonal), not cross them.
            return replace(self, grad=self.grad[:, channels], hessian=self.hessian[:, channels][:, :, channels])
        assert self.weight is not None
        if isinstance(channels, Tensor):
            channels = channels.to(self.weight.device)
        return replace(self, grad=self.grad[:, channels], weight=self.weight[:, channels])


def round_to_tf32(x: Tensor) -> Tensor:
    """Float32 ``x`` rounded to the nearest TF32 value (10 explicit mantissa bits; ties away from zero)."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


def split_tf32(x: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo), both TF32 values, with x = hi + lo + r and |r| <= 2^-22 |x|."""
    hi = round_to_tf32(x)
    return hi, round_to_tf32(x - hi)


@contextmanager
def _tf32_matmuls(device: torch.device) -> Iterator[None]:
    """CUDA float32 matmuls on TF32 tensor cores inside the block; a no-op elsewhere."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def split_matmul(a: Tensor | tuple[Tensor, Tensor], b: Tensor) -> Tensor:
    """a @ b for float32 ``a``, ``b`` as three TF32 products, hi hi + (hi lo + lo hi), accumulated in float32.

    The pieces are exact TF32 values, so a tensor core multiplies them exactly; what is dropped (lo lo and the
    residuals r) is at most about 3 x 2^-22 (< 2^-20) of each product term: float32 accuracy at tensor-core speed
    on CUDA. Elsewhere the same products run as float32 matmuls (exact products of 11-bit significands): an
    emulation, for tests. ``a`` may come split already (:func:`split_tf32`'s pair): a factor of many products is
    split once.
    """
    a_hi, a_lo = split_tf32(a) if isinstance(a, Tensor) else a
    b_hi, b_lo = split_tf32(b)
    with _tf32_matmuls(b.device):
        return a_hi @ b_hi + (a_hi @ b_lo + a_lo @ b_hi)


# Below this 1 - max_k p_k, sum_k p_k W_kc^2 - (W^T p)_c^2 would lose more than ~1e-10 to cancellation.
_NEAR_ONE_HOT = 1e-6


def class_spread(probs: Tensor, weight: Tensor) -> Tensor:
    """sum_k p_k (W_kc - (W^T p)_c)^2 per sample and channel, shape (N, C), float64.

    Two GEMMs, sum_k p_k W_kc^2 - (W^T p)_c^2, except for near one-hot p, where that difference cancels
    (relative error ~1e-16 / (1 - max p)): those samples are summed term by term, which never cancels.
    """
    weight = weight.double()
    spread = probs @ weight.square() - (probs @ weight).square()
    confident = (1 - probs.max(1).values) < _NEAR_ONE_HOT
    if confident.any():
        p = probs[confident]
        centred = weight - (p @ weight).unsqueeze(1)  # (n, classes, C)
        spread[confident] = (p.unsqueeze(-1) * centred.square()).sum(1)
    return spread


def linear_head_derivatives(logits: Tensor, labels: Tensor, weight: Tensor) -> HeadDerivatives:
    """e = W^T (p - onehot(y)) (float64) and B = W^T (diag(p) - p p^T) W, kept as (p, W)."""
    probs = torch.softmax(logits.double(), dim=1)
    target = F.one_hot(labels, probs.shape[1]).bool()
    # p_y - 1 = -sum_{k != y} p_k: summing the small probabilities keeps it exact when p_y is near 1.
    residual = probs.masked_scatter(target, -probs.masked_fill(target, 0).sum(1))
    return HeadDerivatives(residual @ weight.double(), probs=probs, weight=weight)


def head_derivatives(head: Callable[[Tensor], Tensor], pooled: Tensor, labels: Tensor) -> HeadDerivatives:
    """Exact e and B of ``CE(head(h), y)`` for a general differentiable head, by torch.func."""

    def loss(h: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(head(h.unsqueeze(0)), y.unsqueeze(0))

    grad = torch.func.grad(loss)
    # Reverse over reverse: exact, like torch.func.hessian, without loading forward-mode AD.
    hessian = torch.func.vmap(torch.func.jacrev(grad))(pooled, labels)
    return HeadDerivatives(torch.func.vmap(grad)(pooled, labels), hessian=hessian)


def hessian_trace(sqnorms: Tensor, curv: Tensor, head: HeadDerivatives) -> Tensor:
    """Tr(H) = sum_c B_cc ||g_c||^2 + sum_c e_c curv_c, per sample, float64."""
    return (head.diagonal() * sqnorms).sum(1, dtype=torch.float64) + (head.grad * curv).sum(1, dtype=torch.float64)


def block_traces(grad_gram: Tensor, curv: Tensor, head: HeadDerivatives) -> Tensor:
    """Tr(H_cc') = B_cc' <g_c, g_c'> + [c == c'] e_c curv_c per sample, shape (N, C, C), float64."""
    return head.matrix() * grad_gram.double() + torch.diag_embed(head.grad.double() * curv.double())


def gram_contraction(left: Tensor, right: Tensor, weight: Tensor, head: HeadDerivatives) -> Tensor:
    """sum_{c,c'} weight_cc' B_cc' (left right^T)_cc' per sample, float64, for a symmetric ``weight`` (C, C) and a
    symmetric left right^T (``left``, ``right``: (N, C, r)).

    The summand is symmetric in (c, c'), so only the lower triangle of a grid of blocks is formed, each block off
    the diagonal counted twice: (k + 1) / 2k of the C^2 (r + classes) products per sample for k block columns
    (each a product with a long inner dimension and a narrow result, which runs at full speed).
    """
    channels = left.shape[1]
    block = -(-channels // _GRAM_BLOCKS)
    total = left.new_zeros(left.shape[0], dtype=torch.float64)
    for lo in range(0, channels, block):
        hi = min(lo + block, channels)
        folded = weight[lo:, lo:hi].clone()
        folded[hi - lo :] *= 2
        q = (left[:, lo:] @ right[:, lo:hi].transpose(1, 2)).mul_(folded)  # rows c >= lo, columns lo:hi
        total += head.contract(q, lo, slice(lo, hi))
    return total


def class_tail_spread(probs: Tensor, weight: Tensor, order: Tensor) -> Tensor:
    """T_t = sum_{i >= t} p_(i) ||w_(i) - W^T p||^2 for t = 0 .. classes, the classes taken in ``order`` (N, classes):
    (N, classes + 1), float64, T_classes = 0.

    Each ||w_k - W^T p||^2 is expanded in float64 and raised by 1e-10 of ||w_k||^2 + ||W^T p||^2, far more than the
    expansion's and the sums' rounding: an upper bound.
    """
    weight = weight.double()
    mean_row = probs @ weight
    w2, m2 = weight.square().sum(1), mean_row.square().sum(1, keepdim=True)
    distance = (w2 - 2 * (mean_row @ weight.T) + m2).clamp_min(0) + 1e-10 * (w2 + m2)
    tail = (probs * distance).gather(1, order).flip(1).cumsum(1).flip(1)
    return torch.cat([tail, tail.new_zeros(tail.shape[0], 1)], 1)


def within_group_norm(kernel: Tensor, groups: int) -> Tensor:
    """lambda_max of the within-group K K^T (:func:`flatscan._engine.within_group_gram`), float64, raised by 1e-12 of
    itself (eigvalsh's rounding): the largest lambda_max(K_g K_g^T) over the groups, from the smaller Gram side."""
    per_group = kernel.double().reshape(groups, -1, kernel.shape[1])
    gram = per_group @ per_group.transpose(1, 2) if per_group.shape[1] <= per_group.shape[2] else None
    gram = per_group.transpose(1, 2) @ per_group if gram is None else gram
    return torch.linalg.eigvalsh(gram).max() * (1 + 1e-12)


def truncated_gram_contraction(
    left: Tensor, right: Tensor, weight: Tensor, weight_norm: Tensor, head: HeadDerivatives, rtol: float
) -> tuple[Tensor, Tensor]:
    """:func:`gram_contraction` of a linear head over its likeliest classes, and a bound on the rest: (value, bound)
    per sample, float64, value <= the whole <= value + bound, bound <= ``rtol`` value.

    B = sum_k p_k V_k^T V_k (V_k = w_k - W^T p), so each class adds p_k V_k^T Q V_k >= 0 with Q = weight o left right^T
    (PSD: a PSD ``weight``, lambda_max ``weight_norm``, and a Gram matrix left right^T); and V_k^T Q V_k <=
    lambda_max(Q) ||V_k||^2, lambda_max(Q) <= min(weight_norm max_c (left right^T)_cc, Tr Q) (Schur). Classes go by
    p, the likeliest first: as many as leave at most ``rtol`` of the softmax mass out, then twice as many per round
    until every sample's bound is within ``rtol`` of its value (at worst all classes: bound 0).
    """
    assert head.probs is not None and head.weight is not None and head.hessian is None and head.classes is None
    sqnorms = (left * right).sum(-1).double()  # (left right^T)_cc
    spectral = torch.minimum(weight_norm * sqnorms.max(1).values, (weight.diagonal().double() * sqnorms).sum(1))
    order = head.probs.argsort(1, descending=True)
    bounds = class_tail_spread(head.probs, head.weight, order) * spectral[:, None]  # (N, classes + 1)
    mass_left = head.probs.gather(1, order).flip(1).cumsum(1).flip(1)
    classes = order.shape[1]
    count, kept = max(1, int((mass_left > rtol).sum(1).max())), 0
    value = left.new_zeros(left.shape[0], dtype=torch.float64)
    while True:
        value += gram_contraction(left, right, weight, replace(head, classes=order[:, kept:count]))
        kept = count
        if kept == classes or bool((bounds[:, kept] <= rtol * value).all()):
            return value, bounds[:, kept]
        count = min(2 * count, classes)


def kernel_curvature(kernel_gram: Tensor, curv: Tensor, head: HeadDerivatives) -> Tensor:
    """sum_c ||K_c||^2 e_c curv_c per sample, float64: kappa's part outside the (C, C) contraction."""
    return (kernel_gram.diagonal() * head.grad * curv).sum(1, dtype=torch.float64)


def relative_flatness(
    kernel_gram: Tensor, factors: tuple[Tensor, Tensor], curv: Tensor, head: HeadDerivatives
) -> Tensor:
    """kappa = sum_{c,c'} (K K^T)_cc' B_cc' <g_c, g_c'> + sum_c ||K_c||^2 e_c curv_c, per sample, float64.

    ``kernel_gram`` is K K^T (C, C); ``factors`` come from :func:`gradient_factors`.
    """
    return gram_contraction(*factors, kernel_gram, head) + kernel_curvature(kernel_gram, curv, head)


def relative_flatness_by_positions(
    kernel: Tensor, slopes: Tensor, patches: Tensor, channel_scale: Tensor, curv: Tensor, head: HeadDerivatives
) -> Tensor:
    """kappa without a (C, C) matrix: with P^T P = R R^T (L x L) and A = F R, <g_c, g_c'> = (A A^T)_cc', so

        sum_{c,c'} (K K^T)_cc' B_cc' <g_c, g_c'> = sum_j w_j sum_l ||K^T (V_j o a_l)||^2

    for B = sum_j w_j V_j^T V_j (:meth:`HeadDerivatives.factor`) and a_l the columns of A: J x L x C x D per sample
    instead of about C^2 (L + J) / 2; cheaper on small maps (:func:`positions_route_is_cheaper`). One group;
    ``kernel`` is K (C, D).
    """
    factor = _scaled_slopes(slopes, channel_scale, 1)[:, 0]  # F: (N, C, L)
    p = patches[:, 0]
    values, vectors = torch.linalg.eigh(p.transpose(1, 2) @ p)
    columns = factor @ (vectors * values.clamp_min(0).sqrt().unsqueeze(1))  # A = F R: (N, C, L)
    rows, weights = head.factor(kernel.dtype)  # (N, J, C), (N, J)
    cross = torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device)
    for column in columns.unbind(-1):
        projected = (rows * column.unsqueeze(1)) @ kernel  # (N, J, D)
        cross += (projected.square().sum(-1) * weights).sum(-1, dtype=torch.float64)
    return cross + (kernel.square().sum(1) * head.grad * curv).sum(1, dtype=torch.float64)


def positions_route_is_cheaper(channels: int, positions: int, kernel_size: int, rows: int) -> bool:
    """Whether :func:`relative_flatness_by_positions` (rows x L x C x D) costs less than the Gram route
    (:func:`gram_contraction`'s share of C^2 x (min(L, D) + rows))."""
    share = (_GRAM_BLOCKS + 1) / (2 * _GRAM_BLOCKS)
    return rows * positions * kernel_size < share * channels * (min(positions, kernel_size) + rows)


def classifier_flatness(inputs: Tensor, logits: Tensor, weight: Tensor) -> Tensor:
    """kappa_W = ||x||^2 (sum_j p_j ||w_j||^2 - ||W^T p||^2) of a Linear classifier W on x, per sample, float64."""
    spread = class_spread(torch.softmax(logits.double(), dim=1), weight).sum(1)
    return inputs.square().sum(1, dtype=torch.float64) * spread


# Beyond the element-wise tail: tails that couple positions and channels only through pooled statistics.
#
# For one sample, with y = s * z + t + r1 the feature layer's output after its per-channel affine map, the tail is
#
#     w = rho(y)                                         element-wise "inner" activation (identity for SE / norms)
#     u_ci = mean_p psi_i(w_cp),  psi = (w, w^2)[:k]     k = 1 or 2 pooled moments per channel
#     alpha, beta = Theta(u) = Xi(E u)                   per-channel scale and shift (SE gate, GroupNorm, ...)
#     v = alpha * w + beta + r2;  a = sigma(v);  h = mean_p a;  loss = CE(head(h), y)
#
# E (R x C*k) is the tail's squeeze: a linear map to R few statistics (an SE gate's first 1x1 conv, GroupNorm's group
# averages; the identity when the tail has none), Xi its excitation. Everything that passes through the statistics
# has rank R, so no product costs more than classes x C x R or C x C x R.
#
# With F(y, theta) = sigma(alpha rho(y) + beta + r2), theta = (alpha, beta), and U = du/dy, the Hessian of the loss
# w.r.t. y is  Phi_yy + Phi_yu U + U^T Phi_uy + U^T Phi_uu U + sum_ci (dl/du_ci) Hess u_ci  (u as a function of y
# pulled out of the tail). Each piece contracts with Qy (x) G (Qy = S Q S, G the patch Gram) in closed form:
#
#     gamma_c = mean_p F_y P_p,  mu_ci = mean_p psi_i' P_p,  chi_cj = mean_p F_{y theta_j} P_p          (in R^D)
#     J = dXi/dz (C x 2 x R),  M = dh/du = diag-block(mean_p F_theta) J E = M_z E,   lambda = M^T e
#     Phi_uu = E^T Phi_z E,  Phi_z = M_z^T B M_z + Hess_z [ sum_cj e_c (mean_p F_theta_j) Xi_cj
#                                                         + 1/2 sum_c e_c dXi_c^T Omega_c dXi_c ]
#              (Omega_c = mean_p F_theta_theta; the second part is J^T diag(e Omega) J, one Hessian by torch.func)
#     <H, Qy (x) G> = sum_cc' Qy_cc' [ B_cc' <gamma_c, gamma_c'>
#                                      + sum_ii' Phi_uu[ci, c'i'] <mu_ci, mu_c'i'>
#                                      + 2 sum_i ((B M)_{c,c'i} <gamma_c, mu_c'i>
#                                                 + e_c sum_j (J_j E)[c, c'i] <chi_cj, mu_c'i>) ]
#                     + sum_c Qy_cc [ e_c mean_p F_yy ||P_p||^2 + sum_i lambda_ci mean_p psi_i'' ||P_p||^2 ]
#
# Tr(H) needs only the diagonal of each (C x C) term: O(C R) each, no C x C product.


@dataclass(frozen=True, eq=False)
class CoupledTerms:
    """Per-sample pieces of <Hess_y loss, Qy (x) G> for a pooled-statistic tail (see the comment above).

    Coefficients over positions (the 1/L of the means included): ``slope`` of gamma (N, C, L), ``stat`` of mu
    (N, k, C, L), ``mixed`` of chi (N, 2, C, L). Through the squeezed statistics: ``phi`` Phi_z (N, R, R),
    ``head_path`` B M_z (N, C, R), ``jac`` J (N, C, 2, R) and ``squeeze`` E as (R, C, k), None for the identity.
    ``local`` (N, C) is the diagonal rest. Tr(H) forms no (C, C) matrix; kappa forms slope_gram and the (C, C) terms
    of a moment that neither folds nor groups; ``block_traces`` (for checks) forms them all.
    """

    patches: Tensor
    slope: Tensor
    stat: Tensor
    mixed: Tensor
    phi: Tensor
    head_path: Tensor
    jac: Tensor
    squeeze: Tensor | None
    local: Tensor
    head: HeadDerivatives

    def contract(self, channel_weight: Tensor) -> Tensor:
        """<Hess_y loss, Qy (x) G> per sample, float64; ``channel_weight`` is Qy (C, C), symmetric."""
        dense = self._coupling(diagonal=False, weight=channel_weight)
        local = (channel_weight.diagonal() * self.local).sum(1, dtype=torch.float64)
        left, right = _patch_left(self.patches, self.slope), _patch_right(self.patches, self.slope)
        return gram_contraction(left, right, channel_weight, self.head) + dense + local

    def trace(self, channel_scale: Tensor) -> Tensor:
        """Tr(H) = <Hess_y loss, S^2 (x) G> per sample, float64, from diagonals only."""
        scale2 = channel_scale.square()
        gram = (self.head.diagonal() * _coefficient_grams(self.patches, self.slope, self.slope, True)).double()
        rest = self._coupling(diagonal=True) + self.local
        return (scale2 * gram).sum(1, dtype=torch.float64) + (scale2 * rest).sum(1, dtype=torch.float64)

    def block_traces(self, channel_scale: Tensor) -> Tensor:
        """Tr(H_cc') = s_c s_c' <Hess_y loss, sym(E_cc') (x) G>, (N, C, C), float64; formed only for checks."""
        coupling = self.coupling.double()
        total = self.head.matrix() * self.slope_gram.double() + 0.5 * (coupling + coupling.transpose(1, 2))
        total = total + torch.diag_embed(self.local.double())
        scale = channel_scale.double()
        return total * scale[:, None] * scale[None, :]

    @cached_property
    def slope_gram(self) -> Tensor:
        """<gamma_c, gamma_c'>, (N, C, C)."""
        return _coefficient_grams(self.patches, self.slope, self.slope)

    @cached_property
    def coupling(self) -> Tensor:
        """The (C, C) matrix the channel weight contracts with, beyond B o slope_gram and the diagonal ``local``."""
        return self._coupling(diagonal=False)

    def _expand(self, x: Tensor, moment: int, diagonal: bool) -> Tensor:
        """(x E_i)[c, c'] for x (N, C, R), E_i the squeeze's columns of the moment ``i``: (N, C, C), or its diagonal.

        A squeeze whose columns each hold one entry (the identity, group averages) gathers instead of multiplying.
        """
        if self.squeeze is None:  # R = C k, E_i selects the moment's columns: a view, no copy
            picked = x[..., moment :: self.stat.shape[1]]
            return picked.diagonal(dim1=1, dim2=2) if diagonal else picked
        columns = self._columns(moment, x)  # (R, C)
        single = _single_entries(columns)
        if single is None:
            return (x * columns.T).sum(-1) if diagonal else x @ columns
        rows, weights = single
        picked = x.gather(2, rows.expand(x.shape[0], -1)[..., None])[..., 0] if diagonal else x[..., rows]
        return picked * weights

    def _columns(self, moment: int, like: Tensor) -> Tensor:
        """E_i, the squeeze's columns of the moment ``i``, (R, C), in ``like``'s dtype and device."""
        if self.squeeze is not None:
            return self.squeeze[..., moment].to(like)
        channels, moments = self.slope.shape[1], self.stat.shape[1]
        selection = torch.zeros(channels * moments, channels, dtype=like.dtype, device=like.device)
        selection[moment::moments] = torch.eye(channels, dtype=like.dtype, device=like.device)
        return selection

    def _coupling(self, diagonal: bool, weight: Tensor | None = None) -> Tensor:
        """sum_ii' Phi_uu o <mu, mu> + 2 sum_i (B M o <gamma, mu> + e (J_j E) o <chi_j, mu>): (N, C, C) or (N, C);
        with a channel ``weight`` Qy, its contraction sum_cc' Qy_cc' [...]_cc' per sample (N,), float64.

        Every term is (X E_i')[c, c'] <a_c, mu_c'i'> for some X (N, C, R) and coefficients a: the terms are taken by
        the right-hand moment i'. When mu_c'i' is the same for every channel (psi_i' = y), <a_c, mu_c'i'> depends on c
        alone and all terms of that moment fold into one expansion Y E_i', Y = sum_t diag(<a_t, mu>) X_t, which
        contracts with Qy as <Y, Qy E_i'^T>: (C, R) per sample, no (C, C) product.
        """
        moments = self.stat.shape[1]
        grad = self.head.grad.to(self.phi.dtype)[..., None]
        left = [(2 * self.head_path, self.slope)]
        left += [(2 * grad * self.jac[:, :, j], self.mixed[:, j]) for j in range(2) if self.jac[:, :, j].any()]
        # E_i^T Phi_z (N, C, R): with E_i' on the right, the (C, C) block i, i' of Phi_uu, never all (C k)^2 at once.
        left += [(self._expand(self.phi, i, False).transpose(1, 2), self.stat[:, i]) for i in range(moments)]
        n, channels = self.local.shape
        shape = (n,) if weight is not None else (n, channels) if diagonal else (n, channels, channels)
        total = self.local.new_zeros(shape, dtype=None if weight is None else torch.float64)
        matrix: Tensor | None = None  # the unfolded terms, (C, C) or diagonal
        for i2 in range(moments):
            right = self.stat[:, i2]
            if bool((right == right[:, :1]).all()):
                folded = cast(Tensor, sum(x * _coefficient_grams(self.patches, a, right[:, :1]) for x, a in left))
                if weight is None:
                    total = total + self._expand(folded, i2, diagonal)
                else:
                    weighted_columns = weight.to(folded) @ self._columns(i2, folded).T  # Qy E_i'^T (C, R)
                    total = total + (folded * weighted_columns).sum((1, 2), dtype=torch.float64)
                continue
            if weight is not None and (grouped := self._grouped_contraction(left, i2, weight)) is not None:
                total = total + grouped
                continue
            for x, a in left:
                term = self._expand(x, i2, diagonal) * _coefficient_grams(self.patches, a, right, diagonal)
                matrix = term if matrix is None else matrix + term
        if matrix is None:
            return total
        return total + (matrix if weight is None else (matrix * weight).sum((1, 2), dtype=torch.float64))

    def _grouped_contraction(self, left: list[tuple[Tensor, Tensor]], moment: int, weight: Tensor) -> Tensor | None:
        """sum_t <Qy, (X_t E_i') o <a_t, mu_i'>> per sample, float64, when each column c' of E_i' holds one entry w_c'
        in row s(c') and every used row the same number of columns (GroupNorm's averages): as
        sum_t sum_cs X_t[c, s] <a_tc, T_cs> with T_cs = sum_{c': s(c') = s} Qy_cc' w_c' mu_c', (N, C, S, L); no (C, C)
        matrix per sample. None when the per-term (C, C) route is cheaper."""
        if self.squeeze is None:  # one statistic per channel: the (C, C) route is cheaper
            return None
        single = _single_entries(self._columns(moment, weight))
        if single is None:
            return None
        rows, entries = single
        order = rows.argsort(stable=True)
        statistics, members = rows.unique(return_counts=True)
        right = _patch_right(self.patches, self.stat[:, moment])  # mu_c' (N, C, L) in patch space
        n, channels, space = right.shape
        if bool((members != members[0]).any()) or len(statistics) * space > channels:
            return None
        grouped_weight = (weight.to(right) * entries)[:, order].view(channels, len(statistics), -1)
        grouped_right = right[:, order].view(n, len(statistics), -1, space).permute(1, 2, 0, 3).flatten(2)  # (S, m, NL)
        spread = (grouped_weight.transpose(0, 1) @ grouped_right).view(len(statistics), channels, n, space)
        spread = spread.permute(2, 1, 0, 3)  # T_cs (N, C, S, L)
        coefficients = torch.stack([_patch_left(self.patches, a) for _, a in left], 2)  # (N, C, terms, L)
        projected = spread @ coefficients.transpose(2, 3)  # <a_tc, T_cs> (N, C, S, terms), one batched product
        factors = torch.stack([x[:, :, statistics] for x, _ in left], -1)  # X_t[c, s] (N, C, S, terms)
        return (factors * projected).sum((1, 2, 3), dtype=torch.float64)


def _single_entries(columns: Tensor) -> tuple[Tensor, Tensor] | None:
    """(row, entry) of each column of ``columns`` (R, C) when every column holds one entry (group averages), else
    None: then x @ columns is a gather."""
    if (columns != 0).sum(0).max() > 1:
        return None
    rows = columns.abs().argmax(0)
    return rows, columns.gather(0, rows[None])[0]


def _patch_left(patches: Tensor, left: Tensor) -> Tensor:
    """a' with <a_x, b_y> = a'_x . b'_y for a_x = sum_p left[x, p] P_p (b' from :func:`_patch_right`): left P^T P
    (N, X, L) when L < D, else left P^T (N, X, D)."""
    p = patches[:, 0]  # (N, D, L)
    return left @ (p.transpose(1, 2) @ p) if p.shape[-1] < p.shape[-2] else left @ p.transpose(1, 2)


def _patch_right(patches: Tensor, right: Tensor) -> Tensor:
    """b', the right factor of :func:`_patch_left`: ``right`` itself when L < D, else right P^T."""
    p = patches[:, 0]
    return right if p.shape[-1] < p.shape[-2] else right @ p.transpose(1, 2)


def _stat_hessian(
    excitation: Callable[[Tensor], tuple[Tensor, Tensor]],
    squeezed: Tensor,
    linear: Tensor,
    jac: Tensor,
    quadratic: Tensor,
) -> Tensor:
    """Hess_z [<linear, Xi(z)> + 1/2 sum_c dXi_c^T quadratic_c dXi_c] at ``squeezed`` z (N, R), per sample: (N, R, R).

    ``linear`` is (N, C, 2), ``jac`` dXi/dz (N, C, 2, R), ``quadratic`` (N, C, 2, 2); Xi(z) = stack(alpha, beta).
    The quadratic part is J^T quadratic J; the linear one forward over reverse, exact: vmapped reverse-mode through a
    gate's convolutions would expand their weight gradient per basis vector.
    """

    def objective(z: Tensor, lin: Tensor) -> Tensor:
        return (lin * torch.stack(excitation(z.unsqueeze(0)), -1)[0]).sum()

    hessian = torch.func.vmap(torch.func.jacfwd(torch.func.grad(objective)))(squeezed, linear)
    weighted = torch.einsum("ncjk,ncks->ncjs", quadratic, jac).flatten(1, 2)  # (N, 2C, R)
    return hessian + jac.flatten(1, 2).transpose(1, 2) @ weighted


def _coefficient_grams(patches: Tensor, left: Tensor, right: Tensor, diagonal: bool = False) -> Tensor:
    """<a_x, b_y> for D-vectors a_x = sum_p left[x, p] P_p and b_y likewise: (N, X, Y), via P^T P when L < D; with
    ``diagonal``, only <a_x, b_x> (N, X)."""
    left, right = _patch_left(patches, left), _patch_right(patches, right)
    return (left * right).sum(-1) if diagonal else left @ right.transpose(1, 2)


def _affine_derivatives(
    alpha: Tensor, w: Tensor, rho1: Tensor, rho2: Tensor, sig1: Tensor, sig2: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Derivatives of F(y, theta) = sigma(alpha rho(y) + beta + r2), theta = (alpha, beta), element-wise: F_y, F_yy
    (N, C, L), mean_p F_theta (N, C, 2), F_{y theta} (N, 2, C, L), Omega = mean_p F_theta_theta (N, C, 2, 2)."""
    slope = sig1 * alpha * rho1
    second = sig2 * (alpha * rho1).square() + sig1 * alpha * rho2
    param_slope = torch.stack([sig1 * w, sig1], -1).mean(2)
    mixed = torch.stack([sig2 * alpha * rho1 * w + sig1 * rho1, sig2 * alpha * rho1], 1)
    param_curv = torch.stack(
        [torch.stack([sig2 * w.square(), sig2 * w], -1), torch.stack([sig2 * w, sig2], -1)], -2
    ).mean(2)
    return slope, second, param_slope, mixed, param_curv


def _pooled_moments(
    base: Tensor, slope: Tensor | None, curvature: Tensor | None, moments: int
) -> tuple[Tensor, Tensor, Tensor]:
    """u = mean_p (b, b^2)[:k] of ``base`` b (N, C, L), and psi', psi'' of psi = (b, b^2) w.r.t. y, (N, k, C, L).

    ``slope``, ``curvature`` are db/dy and d2b/dy2 (None: b is y itself).
    """
    db = torch.ones_like(base) if slope is None else slope
    d2b = torch.zeros_like(base) if curvature is None else curvature
    stats = torch.stack([base.mean(-1), base.square().mean(-1)][:moments], -1)  # (N, C, k)
    psi1 = torch.stack([db, 2 * base * db][:moments], 1)
    psi2 = torch.stack([d2b, 2 * db.square() + 2 * base * d2b][:moments], 1)
    return stats, psi1, psi2


def coupled_terms(
    inner_input: Tensor,
    pre_activation: Tensor,
    patches: Tensor,
    inner: Activation | ChannelSiLU,
    outer: Activation,
    moments: int,
    squeeze: Tensor | None,
    excitation: Callable[[Tensor], tuple[Tensor, Tensor]],
    head: HeadDerivatives,
    statistics_of_input: bool = False,
) -> CoupledTerms:
    """The pieces of a pooled-statistic tail's Hessian contraction, per sample (formulas in the comment above).

    ``inner_input`` is y and ``pre_activation`` v, both (N, C, L); ``patches`` (N, 1, D, L) (one group);
    ``squeeze`` is E (R, C * ``moments``), columns in (channel, moment) order, or None for the identity;
    ``excitation`` maps the squeezed statistics z = E u (N, R) to (alpha, beta), each (N, C); ``head`` holds e, B.
    The moments are of w = inner(y), or of y itself with ``statistics_of_input`` (psi then acts on y).
    """
    n, channels, positions = inner_input.shape
    w = inner(inner_input)
    rho1, rho2 = inner.derivatives(inner_input)
    sig1, sig2 = outer.derivatives(pre_activation)
    base, base1, base2 = (inner_input, None, None) if statistics_of_input else (w, rho1, rho2)
    stats, psi1, psi2 = _pooled_moments(base, base1, base2, moments)
    squeeze = None if squeeze is None else squeeze.to(stats)
    squeezed = stats.flatten(1) if squeeze is None else stats.flatten(1) @ squeeze.T  # z (N, R)
    alpha = excitation(squeezed)[0]
    slope, second, param_slope, mixed, param_curv = _affine_derivatives(
        alpha.detach()[..., None], w, rho1, rho2, sig1, sig2
    )
    grad = head.grad.to(stats.dtype)

    def theta(z: Tensor) -> Tensor:
        return torch.stack(excitation(z.unsqueeze(0)), -1)[0]

    with torch.enable_grad():
        jac = torch.func.vmap(torch.func.jacfwd(theta))(squeezed)  # (N, C, 2, R)
        linear, quadratic = grad[..., None] * param_slope, grad[..., None, None] * param_curv
        stat_hessian = _stat_hessian(excitation, squeezed, linear, jac, quadratic)
    dh_dz = torch.einsum("ncj,ncjs->ncs", param_slope, jac)  # M_z (N, C, R)
    lam = torch.einsum("ncs,nc->ns", dh_dz, grad)  # M_z^T e (N, R)
    lam = (lam if squeeze is None else lam @ squeeze).view(n, channels, moments)  # lambda = E^T M_z^T e
    head_path, sandwich = head.apply_and_sandwich(dh_dz)  # B M_z (N, C, R) and M_z^T B M_z (N, R, R)

    scale = 1.0 / positions
    patch_sqnorms = patches[:, 0].square().sum(1)  # (N, L)
    psi_curv = ((psi2 * scale) @ patch_sqnorms[:, None, :, None])[..., 0]  # (N, k, C)
    local = grad * ((second * scale) @ patch_sqnorms[..., None])[..., 0]
    local = local + (lam.transpose(1, 2) * psi_curv).sum(1)
    return CoupledTerms(
        patches=patches,
        slope=slope * scale,
        stat=psi1 * scale,
        mixed=mixed * scale,
        phi=stat_hessian + sandwich,
        head_path=head_path,
        jac=jac,
        squeeze=None if squeeze is None else squeeze.view(-1, channels, moments),
        local=local,
        head=head,
    )


# LayerNorm across channels at every position (LayerNorm2d, channel LayerNorm) after the feature layer:
#
#     xhat_p = (y_p - mean_c y_p) / r_p,  r_p = sqrt(var_c y_p + eps);  v = gamma * xhat + beta;  h = mean_p sigma(v)
#
# Per position, dv_p/dy_p = diag(gamma) Pi_p / r_p with Pi = I - (1 1^T + xhat xhat^T) / C, so with d = sigma' gamma / r
# and the rows V_j of B = sum_j w_j V_j^T V_j, the loss Hessian contracted with Qy (x) G is (Qy 1 = q, m = q^T xhat,
# R = xhat^T Qy xhat, all per position; coefficients carry the 1/L of the mean):
#
#     sum_j w_j [ sum_cc' Qy_cc' V_jc V_jc' (d G d^T)_cc'                                              (X1 X1)
#               + q^T 1 / C^2  alpha_j G alpha_j^T  +  1 / C^2  beta_j (G o R) beta_j^T                (X2 X2, X3 X3)
#               - 2 / C  sum_c V_jc (q_c (d G alpha_j^T)_c + (((d G) o (Qy xhat)) beta_j^T)_c)         (X1 X2, X1 X3)
#               + 2 / C^2  alpha_j G (beta_j o m)^T ]                                                 (X2 X3)
#     + sum_p G_pp / L  sum_k [ e_k sigma''_kp gamma_k^2 / r_p^2  diag(Pi Qy Pi)_kp  +  e_k sigma'_kp gamma_k t_kp ]
#
# with alpha_j = V_j d, beta_j = V_j (d o xhat), and t_kp = <Qy, Hess_y xhat_kp> =
# -(2 (Qy xhat)_k + xhat_k Tr Qy - 2 m / C - xhat_k q^T 1 / C - 3 xhat_k R_pp / C) / (C r_p^2).


@dataclass(frozen=True)
class ChannelNormTerms:
    """Per-sample pieces of <Hess_y loss, Qy (x) G> for a LayerNorm across channels after the feature layer."""

    xhat: Tensor  # (N, C, L)
    rstd: Tensor  # 1 / r_p, (N, L)
    slope: Tensor  # d = sigma' gamma / (r L), (N, C, L)
    curv: Tensor  # e_k sigma''_kp gamma_k^2 / r_p^2 (N, C, L)
    grad_curv: Tensor  # e_k sigma'_kp gamma_k (N, C, L)
    patch_gram: Tensor  # G (N, L, L)
    head: HeadDerivatives

    def contract(self, channel_weight: Tensor) -> Tensor:
        """<Hess_y loss, Qy (x) G> per sample, float64, for a symmetric ``channel_weight`` Qy (C, C)."""
        xhat, d, gram = self.xhat, self.slope, self.patch_gram
        channels, positions = xhat.shape[1], xhat.shape[2]
        qx = channel_weight @ xhat  # (N, C, L)
        q = channel_weight.sum(1)  # Qy 1
        q11 = q.sum()
        m = torch.einsum("c,ncl->nl", q, xhat)
        r = xhat.transpose(1, 2) @ qx  # (N, L, L)
        dg = d @ gram
        rows, weights = self.head.factor(d.dtype)  # (N, J, C), (N, J)
        alpha, beta = rows @ d, rows @ (d * xhat)  # (N, J, L)
        paired = gram_contraction(dg, d, channel_weight, self.head)
        quad = (
            q11 * ((alpha @ gram) * alpha).sum(-1)
            + ((beta @ (gram * r)) * beta).sum(-1)
            + 2 * ((alpha @ gram) * beta * m[:, None, :]).sum(-1)
        ) / channels**2
        mixed = (rows.transpose(1, 2) * (q[:, None] * (dg @ alpha.transpose(1, 2)))).sum(1)
        mixed = mixed + (rows.transpose(1, 2) * ((dg * qx) @ beta.transpose(1, 2))).sum(1)
        classes = (weights * (quad - 2 / channels * mixed)).sum(1, dtype=torch.float64)
        diag_pqp = (
            channel_weight.diagonal()[:, None]
            - 2 / channels * (q[:, None] + xhat * qx)
            + (q11 + 2 * xhat * m[:, None, :] + xhat.square() * r.diagonal(dim1=1, dim2=2)[:, None, :]) / channels**2
        )
        rstd2 = self.rstd.square()[:, None, :]
        hess_xhat = -(
            2 * qx
            + xhat * channel_weight.trace()
            - 2 / channels * m[:, None, :]
            - xhat * q11 / channels
            - 3 * xhat * r.diagonal(dim1=1, dim2=2)[:, None, :] / channels
        ) * (rstd2 / channels)
        local = (self.curv * diag_pqp + self.grad_curv * hess_xhat) * (
            gram.diagonal(dim1=1, dim2=2)[:, None, :] / positions
        )
        return paired + classes + local.sum((1, 2), dtype=torch.float64)

    def trace(self, channel_scale: Tensor) -> Tensor:
        """Tr(H) per sample, float64."""
        return self.contract(torch.diag(channel_scale.square()))

    def block_traces(self, channel_scale: Tensor) -> Tensor:
        """Tr(H_cc') per sample (N, C, C), float64: the gradient of the linear map Qy -> contract(Qy); for checks."""
        weight = torch.zeros(channel_scale.shape[0], channel_scale.shape[0], dtype=self.xhat.dtype)
        blocks = []
        for sample in range(self.xhat.shape[0]):
            part = slice(sample, sample + 1)
            one = ChannelNormTerms(
                self.xhat[part],
                self.rstd[part],
                self.slope[part],
                self.curv[part],
                self.grad_curv[part],
                self.patch_gram[part],
                self.head.take(sample),
            )
            with torch.enable_grad():
                weight.requires_grad_(True)
                (grad,) = torch.autograd.grad(one.contract(weight).sum(), weight)
                weight.requires_grad_(False)
            blocks.append(0.5 * (grad + grad.T))
        scale = channel_scale.double()
        return torch.stack(blocks).double() * scale[:, None] * scale[None, :]


def channel_norm_terms(
    norm_input: Tensor,
    pre_activation: Tensor,
    patches: Tensor,
    weight: Tensor | None,
    eps: float,
    outer: Activation,
    head: HeadDerivatives,
) -> ChannelNormTerms:
    """The pieces of a channel LayerNorm tail (formulas in the comment above); ``norm_input`` y and
    ``pre_activation`` v = LayerNorm(y) are (N, C, L), ``patches`` (N, 1, D, L), ``weight`` the norm's gamma."""
    positions = norm_input.shape[-1]
    mean = norm_input.mean(1, keepdim=True)
    rstd = torch.rsqrt(norm_input.var(1, unbiased=False, keepdim=True) + eps)
    xhat = (norm_input - mean) * rstd
    gamma = torch.ones_like(xhat[0, :, :1]) if weight is None else weight.to(xhat)[:, None]
    sig1, sig2 = outer.derivatives(pre_activation)
    grad = head.grad.to(xhat.dtype)[..., None]
    p = patches[:, 0]
    return ChannelNormTerms(
        xhat=xhat,
        rstd=rstd[:, 0],
        slope=sig1 * gamma * rstd / positions,
        curv=grad * sig2 * gamma.square() * rstd.square(),
        grad_curv=grad * sig1 * gamma,
        patch_gram=p.transpose(1, 2) @ p,
        head=head,
    )
