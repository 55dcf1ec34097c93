"""Baseline generalisation measures the study compares flatscan's exact measures with.

Each is the standard estimator of the literature, on the model in eval mode (BatchNorm running statistics,
no dropout: the function whose flatness flatscan measures) over the same (images, labels) batches:

- :func:`hutchinson_trace`: PyHessian-style Hutchinson estimate of the trace of the full-network Hessian of the
  mean training loss (Rademacher probes, Hessian-vector products by double backpropagation over every parameter);
- :func:`sum_squared_weights` and :func:`log_spectral_norm_product`: norm-based measures over the Conv2d and Linear
  weights;
- :func:`sharpness_sigma`: Jiang et al. (2019)'s random-perturbation sharpness, the largest sigma whose Gaussian
  weight perturbation raises the expected training error (or loss) by at most a threshold, found by bisection;
- :func:`weightwatcher_alpha_weighted`: WeightWatcher's ``alpha_weighted`` (the optional ``study`` extra).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatscan.errors import FlatscanError

Batches = Sequence[tuple[Tensor, Tensor]]
CRITERIA = ("error", "cross_entropy")
_WEIGHTWATCHER_MISSING = (
    "weightwatcher is not installed: pip install 'flatscan[study]' for the WeightWatcher baseline "
    "(or leave it out: --no-weightwatcher)"
)


@dataclass(frozen=True)
class TraceEstimate:
    """A Hutchinson estimate: the mean of the quadratic forms v^T H v of the probes, and its standard error."""

    trace: float
    se: float
    quadratic_forms: tuple[float, ...]  # v_k^T H v_k of probe k (:func:`rademacher_probe`)

    @property
    def probes(self) -> int:
        return len(self.quadratic_forms)


@dataclass(frozen=True)
class Sharpness:
    """The largest sigma found whose expected increase of the criterion stays at most ``threshold``.

    ``increase`` is the measured increase at ``sigma`` (same noise draws); ``bracketed`` is False when the
    search range did not contain the crossing (``sigma`` is then the range's end that was reached).
    """

    sigma: float
    increase: float
    threshold: float
    criterion: str
    samples: int
    evaluations: int
    bracketed: bool

    @property
    def measure(self) -> float:
        """1 / sigma^2, Jiang et al.'s sharpness measure (larger: sharper)."""
        return 1.0 / self.sigma**2


def _check_batches(batches: Batches) -> int:
    total = sum(len(labels) for _, labels in batches)
    if total == 0:
        raise FlatscanError("the baselines got no samples: pass at least one non-empty (images, labels) batch")
    return total


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def rademacher_probe(params: Sequence[Tensor], seed: int, k: int) -> list[Tensor]:
    """Probe ``k`` of :func:`hutchinson_trace`: independent +-1 entries shaped like ``params``."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + k)
    return [(2 * torch.randint(0, 2, p.shape, generator=generator) - 1).to(p.device, p.dtype) for p in params]


def hutchinson_trace(model: nn.Module, batches: Batches, probes: int = 64, seed: int = 0) -> TraceEstimate:
    """Tr of the Hessian of the mean cross-entropy over ``batches`` w.r.t. all trainable parameters, estimated as
    the mean of v^T H v over ``probes`` Rademacher vectors v (shared by all batches: H is the sample-weighted sum
    of the batch Hessians)."""
    if probes < 2:
        raise FlatscanError(f"the Hutchinson estimate needs at least 2 probes for its standard error, got {probes}")
    total = _check_batches(batches)
    params = _trainable(model)
    was_training = model.training
    model.eval()
    quadratic = torch.zeros(probes, dtype=torch.float64)
    try:
        for images, labels in batches:
            loss = F.cross_entropy(model(images), labels) * (len(labels) / total)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            for k in range(probes):
                vector = rademacher_probe(params, seed, k)  # drawn again per batch: the same
                hv = torch.autograd.grad(grads, params, grad_outputs=vector, retain_graph=k < probes - 1)
                quadratic[k] += sum((h.double() * v.double()).sum() for h, v in zip(hv, vector, strict=True)).item()  # type: ignore[union-attr]
    finally:
        model.train(was_training)
    return TraceEstimate(
        quadratic.mean().item(), (quadratic.std() / math.sqrt(probes)).item(), tuple(quadratic.tolist())
    )


def _weight_layers(model: nn.Module) -> list[tuple[str, Tensor]]:
    layers = [(name, m.weight) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not layers:
        raise FlatscanError(f"{type(model).__name__} has no Conv2d or Linear layer: the norm measures need weights")
    return layers


def sum_squared_weights(model: nn.Module) -> float:
    """Sum of the squared entries of every Conv2d and Linear weight (biases and norm parameters left out)."""
    return sum(weight.detach().double().square().sum().item() for _, weight in _weight_layers(model))


def spectral_norms(model: nn.Module) -> dict[str, float]:
    """Largest singular value of each Conv2d / Linear weight; a conv kernel (out, in/groups, kh, kw) as the
    (out, in/groups * kh * kw) matrix it reshapes to (not the operator norm of the convolution)."""
    return {
        name: torch.linalg.matrix_norm(weight.detach().double().flatten(1), ord=2).item()
        for name, weight in _weight_layers(model)
    }


def log_spectral_norm_product(model: nn.Module) -> float:
    """log of the product of the layers' spectral norms (:func:`spectral_norms`), summed in log space."""
    return sum(math.log(norm) for norm in spectral_norms(model).values())


@torch.no_grad()
def _criterion(model: nn.Module, batches: Batches, criterion: str, total: int) -> float:
    """Mean training error (0-1) or cross-entropy over ``batches``."""
    value = 0.0
    for images, labels in batches:
        logits = model(images)
        if criterion == "error":
            value += (logits.argmax(1) != labels).sum().item()
        else:
            value += F.cross_entropy(logits, labels, reduction="sum").item()
    return value / total


@torch.no_grad()
def perturbed_increase(
    model: nn.Module, batches: Batches, sigma: float, criterion: str = "error", samples: int = 8, seed: int = 0
) -> float:
    """Mean over ``samples`` draws u ~ N(0, sigma^2 I) on every parameter of criterion(w + u) - criterion(w).

    Draw m uses the seed ``(seed, m)`` whatever sigma is (common random numbers: the increase is a deterministic
    function of sigma, which a bisection needs). The weights are restored exactly afterwards.
    """
    if criterion not in CRITERIA:
        raise FlatscanError(f"unknown sharpness criterion {criterion!r}: use one of {', '.join(CRITERIA)}")
    total = _check_batches(batches)
    params = list(model.parameters())
    original = [p.detach().clone() for p in params]
    was_training = model.training
    model.eval()
    try:
        base = _criterion(model, batches, criterion, total)
        increase = 0.0
        for m in range(samples):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + m)
            for p, p0 in zip(params, original, strict=True):
                noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
                p.copy_(p0 + (sigma * noise).to(p.device, p.dtype))
            increase += _criterion(model, batches, criterion, total) - base
    finally:
        for p, p0 in zip(params, original, strict=True):
            p.copy_(p0)
        model.train(was_training)
    return increase / samples


def sharpness_sigma(
    model: nn.Module,
    batches: Batches,
    threshold: float = 0.1,
    criterion: str = "error",
    samples: int = 8,
    seed: int = 0,
    lower: float = 1e-4,
    upper: float = 10.0,
    steps: int = 20,
    tolerance: float = 0.005,
) -> Sharpness:
    """Largest sigma in [lower, upper] with expected increase of ``criterion`` (training ``error``, as Jiang et al.
    2019 with threshold 0.1, or ``cross_entropy``) under u ~ N(0, sigma^2 I) at most ``threshold``: a bisection in
    log sigma on :func:`perturbed_increase`, stopped once the increase is within ``tolerance`` below the threshold
    or after ``steps`` halvings."""
    if threshold <= 0 or not 0 < lower < upper or samples < 1 or steps < 1 or tolerance <= 0:
        raise FlatscanError(
            "sharpness needs threshold > 0, 0 < lower < upper, samples >= 1, steps >= 1 and tolerance > 0 "
            f"(got {threshold}, {lower}, {upper}, {samples}, {steps}, {tolerance}): fix the options"
        )

    def increase(sigma: float) -> float:
        return perturbed_increase(model, batches, sigma, criterion, samples, seed)

    evaluations = 2
    low, high = increase(lower), increase(upper)
    if low > threshold:
        return Sharpness(lower, low, threshold, criterion, samples, evaluations, bracketed=False)
    if high <= threshold:
        return Sharpness(upper, high, threshold, criterion, samples, evaluations, bracketed=False)
    lo, hi = math.log(lower), math.log(upper)
    for _ in range(steps):
        if threshold - low <= tolerance:
            break
        mid = (lo + hi) / 2
        value = increase(math.exp(mid))
        evaluations += 1
        if value <= threshold:
            lo, low = mid, value
        else:
            hi = mid
    return Sharpness(math.exp(lo), low, threshold, criterion, samples, evaluations, bracketed=True)


@contextlib.contextmanager
def _quiet_weightwatcher() -> Iterator[None]:
    """WeightWatcher prints progress and fit notes and warns (CUDA, pandas): the study shows its own."""
    logger = logging.getLogger("weightwatcher")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with (
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def require_weightwatcher() -> Any:
    """The ``weightwatcher`` module; a one-line FlatscanError naming the extra to install when it is missing."""
    with _quiet_weightwatcher():
        try:
            import weightwatcher
        except ImportError:
            raise FlatscanError(_WEIGHTWATCHER_MISSING) from None
    return weightwatcher


def weightwatcher_alpha_weighted(model: nn.Module) -> tuple[float, str | None]:
    """WeightWatcher's summary ``alpha_weighted`` of ``model`` (its ``analyze()`` with default settings), and None;
    or NaN and the reason when WeightWatcher analyses no layer (it needs layers with enough eigenvalues)."""
    weightwatcher = require_weightwatcher()
    try:
        with _quiet_weightwatcher():
            watcher = weightwatcher.WeightWatcher(model=model)
            details = watcher.analyze()
            summary = watcher.get_summary(details)
    except Exception as error:  # its failures are a measure it could not compute, recorded with the reason
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return math.nan, f"weightwatcher failed: {type(error).__name__}: {first_line}"
    if details is None or len(details) == 0:
        return math.nan, "weightwatcher analysed no layer (each needs at least 8 eigenvalues)"
    value = summary.get("alpha_weighted", math.nan)
    if value is None or not math.isfinite(value):
        return math.nan, f"weightwatcher gave no finite alpha_weighted over its {len(details)} layer(s)"
    return float(value), None
