"""Stream evaluation batches through a model once and measure its feature layer exactly."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatscan import flatness
from flatscan._engine import (
    Constants,
    Recorder,
    Terms,
    check_coupling,
    check_normalisation,
    head_taps,
    prepare_tapped,
    recording,
    sample_terms,
    scan_constants,
    tapped_offset,
)
from flatscan.contract import NormalisedHead
from flatscan.errors import FlatscanError, NonFiniteValue, ScanError, ScanInterrupted
from flatscan.registry import describe

# Per-chunk working memory for the per-sample matrices (C x C and classes x C for kappa). A GPU gets more: each
# chunk is a few dozen kernel launches, and small chunks leave it waiting on them.
_CHUNK_BYTES = {"cpu": 256 * 2**20, "cuda": 2 * 2**30}
# The split-precision contraction is kept for a scan only if its kappa agrees with the float32 one this closely
# on the scan's first samples (relative to the largest kappa there).
SPLIT_PRECISION_RTOL = 1e-6


@dataclass(frozen=True)
class ScanResult:
    """Dataset values (means over samples, i.e. of the Hessian of the mean loss) with standard errors."""

    architecture: str
    family: str
    feature_layer: str
    activation: str
    head_type: str
    n_samples: int
    trace: float
    trace_se: float
    relative_flatness: float | None  # None when scanned with trace_only
    relative_flatness_se: float | None
    classifier_flatness: float
    classifier_flatness_se: float
    loss: float
    loss_se: float
    accuracy: float
    accuracy_top5: float
    device: str
    seconds: float
    # With kappa_rtol: the mean of each sample's certified bound on the classes left out; the exact kappa lies in
    # [relative_flatness, relative_flatness + relative_flatness_bound]. None: kappa over all classes (exact).
    relative_flatness_bound: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Moments:
    """Count, mean and sum of squared deviations in float64, merged batch by batch (Chan et al.)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, values: Tensor) -> None:
        """Merge per-sample ``values`` (float64, on the CPU)."""
        count = values.numel()
        mean = values.mean().item()
        m2 = (values - mean).square().sum().item()
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * count / total
        self.m2 += m2 + delta * delta * self.count * count / total
        self.count = total

    @property
    def se(self) -> float:
        """Standard error of the mean (sample standard deviation / sqrt(n))."""
        return math.sqrt(self.m2 / (self.count - 1) / self.count) if self.count > 1 else math.nan


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``; None or "auto": CUDA when available, then MPS, else CPU."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        known = "use cpu, cuda, cuda:N, mps or auto"
        raise FlatscanError(f"device {device!r} is not a device torch knows; {known}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FlatscanError(f"device {device!r}: CUDA is not available on this machine; use cpu or auto")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise FlatscanError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise FlatscanError(f"device {device!r}: MPS is not available on this machine; use cpu or auto")
    return resolved


def _chunk_size(const: Constants, device: torch.device, trace_only: bool) -> int:
    """Samples per chunk of the closed form, so that its per-sample matrices fit the device's chunk budget."""
    channels, classes = const.kernel_gram.shape[0], const.classifier_weight.shape[0]
    kernel_size = cast(Tensor, const.feature_layer.weight)[0].numel()  # D, the length of g_c when g is formed
    # Per sample: a few (classes, C) and (C, D) matrices, and for kappa (C, C) ones too.
    per_sample = channels * max(classes, kernel_size, 0 if trace_only else channels) * 3
    budget = _CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    if device.type == "cuda":
        budget = min(budget, torch.cuda.mem_get_info(device)[0] // 4)
    return max(1, budget // (per_sample * const.kernel_gram.element_size()))


def _measure(
    head: NormalisedHead,
    const: Constants,
    tapped: dict[str, Tensor],
    logits: Tensor,
    labels: Tensor,
    trace_only: bool,
    kappa_rtol: float | None,
) -> dict[str, Tensor]:
    """Per-sample measures (float64) of one chunk of samples."""
    terms = sample_terms(head, const, tapped, logits, labels)
    out = {
        "trace": terms.trace(),
        "classifier_flatness": flatness.classifier_flatness(
            tapped["classifier_input"].flatten(1), logits, const.classifier_weight
        ),
        "loss": F.cross_entropy(logits, labels, reduction="none").double(),
        "correct": (logits.argmax(1) == labels).double(),
        "correct_top5": (logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]).any(1).double(),
    }
    if trace_only:
        return out
    if kappa_rtol is None:
        out["relative_flatness"] = terms.relative_flatness(const)
    else:
        assert isinstance(terms, Terms)  # scan refuses kappa_rtol for the other tails
        out["relative_flatness"], out["relative_flatness_bound"] = terms.bounded_relative_flatness(const, kappa_rtol)
    return out


def _result(
    model: nn.Module, head: NormalisedHead, moments: dict[str, _Moments], device: torch.device, seconds: float
) -> ScanResult:
    kappa, bound = moments.get("relative_flatness"), moments.get("relative_flatness_bound")
    return ScanResult(
        architecture=getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__,
        family=head.family,
        feature_layer=head.feature_layer,
        activation=head.activation.label,
        head_type=head.head_type,
        n_samples=moments["loss"].count,
        trace=moments["trace"].mean,
        trace_se=moments["trace"].se,
        relative_flatness=None if kappa is None else kappa.mean,
        relative_flatness_se=None if kappa is None else kappa.se,
        classifier_flatness=moments["classifier_flatness"].mean,
        classifier_flatness_se=moments["classifier_flatness"].se,
        loss=moments["loss"].mean,
        loss_se=moments["loss"].se,
        accuracy=moments["correct"].mean,
        accuracy_top5=moments["correct_top5"].mean,
        device=str(device),
        seconds=seconds,
        relative_flatness_bound=None if bound is None else bound.mean,
    )


def _check_finite_weights(model: nn.Module) -> None:
    """Refuse a model whose parameters or buffers hold NaN/Inf, naming the first such tensor."""
    named = [(name, t) for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()]
    if not named:
        return
    # One pass per tensor (NaN and Inf propagate through a float64 sum) and one device-to-host copy for all: a check
    # per tensor would wait for a GPU hundreds of times. A non-finite sum is looked at element by element, since
    # huge finite float64 values may also overflow it.
    finite = torch.stack([tensor.sum(dtype=torch.float64) for _, tensor in named]).isfinite().tolist()
    for (name, tensor), ok in zip(named, finite, strict=True):
        count = 0 if ok else int((~torch.isfinite(tensor)).sum())
        if count:
            raise NonFiniteValue(
                f"the model's {name} holds {count} NaN/Inf value(s) of {tensor.numel()}: the weights are corrupt; "
                "load an intact checkpoint"
            )


def _check_finite(values: Tensor, what: str, n_seen: int) -> None:
    """Refuse NaN/Inf in ``values`` (one row per sample), naming ``what`` and the first sample."""
    bad = ~torch.isfinite(values.reshape(values.shape[0], -1)).all(1)
    if bool(bad.any()):
        first = n_seen + int(bad.nonzero()[0, 0])
        raise NonFiniteValue(
            f"the {what} of {int(bad.sum())} of {values.shape[0]} samples (the first: sample {first}) are NaN/Inf, "
            "so no finite result exists; check the weights and the input images (or scan without --amp)"
        )


def _check_labels(labels: Tensor, classes: int) -> None:
    """Refuse labels outside the model's ``classes``."""
    if labels.min() < 0 or labels.max() >= classes:
        bad = labels[(labels < 0) | (labels >= classes)][0].item()
        raise ScanError(
            f"label {bad} is outside the model's {classes} classes; map the dataset's labels to the model's classes"
        )


def _forward_batch(
    recorder: Recorder,
    model: nn.Module,
    head: NormalisedHead,
    batch: tuple[Tensor, Tensor],
    device: torch.device,
    dtypes: tuple[torch.dtype, torch.dtype],
    amp: bool,
    first: bool,
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """(tapped tensors, logits) of one forward pass in the compute dtype, and the labels on ``device``.

    ``dtypes`` are the model's and the compute dtype. The labels are checked against the model's classes, and
    on the ``first`` batch the tapped tensors against the normalised head.
    """
    images, labels = batch
    param_dtype, compute_dtype = dtypes
    images = images.to(device, param_dtype if images.is_floating_point() else None)
    # Checked where the loader made them (the CPU, as a rule): a check on the GPU would wait for it.
    given_labels, labels = labels, labels.to(device, non_blocking=True)
    low_precision = torch.bfloat16 if device.type == "cpu" else torch.float16
    with torch.autocast(device.type, low_precision) if amp else nullcontext():
        logits, tapped = recorder.forward(model, images)
    _check_labels(given_labels, logits.shape[1])
    tap_dtype = tapped["pooled"].dtype
    tapped, logits = prepare_tapped(head, tapped, logits, compute_dtype)
    if first:
        check_normalisation(
            head,
            tapped["pre_activation"].flatten(2),
            tapped["pooled"].flatten(1),
            logits,
            tap_dtype,
            tapped_offset(tapped),
        )
        check_coupling(head, tapped, tap_dtype)
    return tapped, logits, labels


def _check_split_precision(
    head: NormalisedHead, const: Constants, tapped: dict[str, Tensor], logits: Tensor, labels: Tensor, chunk: int
) -> Constants:
    """``const``, or ``const`` without split precision (with a warning) if the first chunk's kappa through it differs
    from the float32 product's by more than ``SPLIT_PRECISION_RTOL`` of the largest."""
    part = slice(0, chunk)
    parts = {key: value[part] for key, value in tapped.items()}
    split, plain = (
        sample_terms(head, flagged, parts, logits[part], labels[part]).relative_flatness(flagged)
        for flagged in (replace(const, split_precision=flag) for flag in (True, False))
    )
    scale = plain.abs().max()
    deviation = float((split - plain).abs().max() / scale) if scale > 0 else float((split - plain).abs().max())
    if deviation <= SPLIT_PRECISION_RTOL:
        return const
    warnings.warn(
        f"the split-precision (3xTF32) contraction differs from float32 by {deviation:.1e} relative "
        f"(> {SPLIT_PRECISION_RTOL:g}) on this model's first samples; computing kappa in float32",
        stacklevel=3,
    )
    return replace(const, split_precision=False)


def _bounded_kappa_constants(head: NormalisedHead, const: Constants, kappa_rtol: float, trace_only: bool) -> Constants:
    """``const`` with lambda_max(K K^T) for kappa over the likeliest classes; refuses what that cannot bound."""
    if not 0 < kappa_rtol < 1:
        raise FlatscanError(f"kappa_rtol (--kappa-rtol) must be between 0 and 1, not {kappa_rtol} (e.g. 1e-3)")
    if trace_only:
        raise FlatscanError(
            "kappa_rtol (--kappa-rtol) bounds kappa, which a trace-only scan does not compute; drop one of them"
        )
    if head.coupling is not None or head.head_fn is not None:
        what = "its head is not a Linear classifier" if head.head_fn is not None else "its tail is coupled"
        raise ScanError(
            f"kappa_rtol leaves out classes of a Linear head after an element-wise tail; this {head.family} model's "
            f"{what}: scan it without kappa_rtol (exact)"
        )
    groups = getattr(const.feature_layer, "groups", 1)
    return replace(const, kernel_norm=flatness.within_group_norm(const.kernel, groups))


def _measure_batch(
    head: NormalisedHead,
    const: Constants,
    tapped: dict[str, Tensor],
    logits: Tensor,
    labels: Tensor,
    chunk: int,
    names: list[str],
    kappa_rtol: float | None = None,
) -> Tensor:
    """Per-sample measures ``names`` of one batch, (len(names), N) on the CPU, computed ``chunk`` samples at a time."""
    trace_only = "relative_flatness" not in names
    values: dict[str, list[Tensor]] = {name: [] for name in names}
    for lo in range(0, labels.shape[0], chunk):
        part = slice(lo, lo + chunk)
        parts = {key: value[part] for key, value in tapped.items()}
        for name, value in _measure(head, const, parts, logits[part], labels[part], trace_only, kappa_rtol).items():
            values[name].append(value)
    # One device-to-host copy per batch: a copy per chunk and measure would stall a GPU on each.
    return torch.stack([torch.cat(values[name]) for name in names]).cpu()


def scan(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: str | torch.device | None = None,
    max_samples: int | None = None,
    trace_only: bool = False,
    amp: bool = False,
    on_batch: Callable[[ScanResult], bool | None] | None = None,
    split_precision: bool | None = None,
    kappa_rtol: float | None = None,
) -> ScanResult:
    """Exact Tr(H), relative flatness and classifier flatness of ``model``'s feature layer over ``batches``.

    ``batches`` yields (images, labels) in the model's preprocessing. The model is moved to ``device``
    (default: CUDA when available) and run once per batch in eval mode without an autograd graph; its
    dtype is kept (float64 models are measured in float64 end to end). ``amp`` runs the model's forward
    under autocast (bfloat16 on CPU, float16 on CUDA); the measure's own math stays in float32 or
    float64. ``on_batch`` is called with the running result after every batch; returning True stops
    the stream there. ``split_precision`` runs kappa's largest product (classes x C^2 per sample) as three TF32
    tensor-core products with float32 accuracy (:func:`flatscan.flatness.split_matmul`); default: on CUDA for a
    float32 model, kept only if it agrees with the float32 product to ``SPLIT_PRECISION_RTOL`` on the first chunk
    (True forces it anywhere, e.g. as a CPU emulation for tests). ``kappa_rtol`` (off: None) computes kappa's
    classes x C^2 part over the likeliest classes only, each sample's left-out part certified at most ``kappa_rtol``
    of its kept part (:func:`flatscan.flatness.truncated_gram_contraction`); the result's
    ``relative_flatness_bound`` then bounds the difference to the exact value. Raises :class:`UnsupportedModel`
    with the reason for a model outside the supported class, and :class:`ScanInterrupted` holding the partial result
    on Ctrl-C.
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be positive, got {max_samples}")
    head = describe(model)
    dev = resolve_device(device)
    param_dtype = next(model.parameters()).dtype
    compute_dtype = torch.promote_types(param_dtype, torch.float32)
    was_training = model.training
    model.to(dev).eval()
    _check_finite_weights(model)
    const = scan_constants(model, head, dev, compute_dtype)
    if split_precision is None:
        split_precision = dev.type == "cuda" and compute_dtype == torch.float32
    if split_precision and compute_dtype != torch.float32:
        raise ValueError(f"split_precision needs a float32 model; this one computes in {compute_dtype}")
    const = replace(const, split_precision=split_precision and not trace_only)
    if kappa_rtol is not None:
        const = _bounded_kappa_constants(head, const, kappa_rtol, trace_only)
    names = ["trace", "classifier_flatness", "loss", "correct", "correct_top5"]
    names += [] if trace_only else ["relative_flatness"]
    names += [] if kappa_rtol is None else ["relative_flatness_bound"]
    moments = {name: _Moments() for name in names}
    chunk = _chunk_size(const, dev, trace_only)
    start, n_seen = time.perf_counter(), 0
    try:
        with recording(model, head_taps(head)) as recorder, torch.no_grad():
            for images, labels in batches:
                if max_samples is not None:
                    images, labels = images[: max_samples - n_seen], labels[: max_samples - n_seen]
                tapped, logits, labels = _forward_batch(
                    recorder, model, head, (images, labels), dev, (param_dtype, compute_dtype), amp, n_seen == 0
                )
                _check_finite(logits, "logits", n_seen)
                if n_seen == 0 and const.split_precision:
                    const = _check_split_precision(head, const, tapped, logits, labels, chunk)
                per_sample = _measure_batch(head, const, tapped, logits, labels, chunk, names, kappa_rtol)
                for name, row in zip(names, per_sample, strict=True):
                    _check_finite(row[:, None], name.replace("_", " "), n_seen)
                    moments[name].add(row)
                n_seen += labels.shape[0]
                if on_batch is not None and on_batch(_result(model, head, moments, dev, time.perf_counter() - start)):
                    break
                if max_samples is not None and n_seen >= max_samples:
                    break
    except KeyboardInterrupt:
        partial_result = _result(model, head, moments, dev, time.perf_counter() - start) if n_seen else None
        raise ScanInterrupted(partial_result) from None
    finally:
        model.train(was_training)
    if n_seen == 0:
        raise ScanError("the evaluation data yielded no samples; check the dataset, split and --num-samples")
    return _result(model, head, moments, dev, time.perf_counter() - start)
