"""Stream evaluation batches through a model once and measure its feature layer exactly."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame, pad_same
from timm.layers.conv2d_same import Conv2dSameExport
from torch import Tensor, nn

from flatscan import flatness
from flatscan.contract import NormalisedHead, Tap
from flatscan.errors import ScanError, ScanInterrupted, UnsupportedModel
from flatscan.registry import describe

# Per-chunk working memory for the per-sample matrices (C x C and classes x C for kappa). A GPU gets more: each
# chunk is a few dozen kernel launches, and small chunks leave it waiting on them.
_CHUNK_BYTES = {"cpu": 256 * 2**20, "cuda": 2 * 2**30}


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


class _Recorder:
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
def _recording(model: nn.Module, taps: dict[str, Tap]) -> Iterator[_Recorder]:
    recorder = _Recorder(model, taps)
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
    kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
    if isinstance(layer, (Conv2dSame, Conv2dSameExport)):
        # TensorFlow 'SAME' padding depends on the input size; timm's own pad_same applies it.
        inputs = pad_same(inputs, kernel, stride, dilation)
        padding = (0, 0, 0, 0)
    elif layer.padding == "same":
        # As torch does it: the odd pixel of an asymmetric padding goes right / bottom.
        th, tw = (d * (k - 1) for d, k in zip(dilation, kernel, strict=True))
        padding = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    elif layer.padding == "valid":
        padding = (0, 0, 0, 0)
    else:
        ph, pw = layer.padding
        padding = (pw, pw, ph, ph)
    return flatness.conv_patches(inputs, kernel, stride, dilation, padding, layer.groups, layer.padding_mode)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``; None or "auto": CUDA when available, then MPS, else CPU."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class _Constants:
    """Per-scan tensors on the compute device and dtype."""

    feature_layer: nn.Module
    classifier_weight: Tensor
    channel_scale: Tensor
    kernel_gram: Tensor


def _check_normalisation(
    head: NormalisedHead, pre_activation: Tensor, pooled: Tensor, logits: Tensor, tap_dtype: torch.dtype
) -> None:
    """Refuse a model whose pooled vector (or logits) the normalised head does not reproduce."""
    # Loose enough for the rounding of a half-precision (--amp) forward, tight enough to catch a wrong head.
    tolerance = min(1e3 * torch.finfo(tap_dtype).eps, 2e-2)
    got = pooled[:, head.channels]
    expected = head.activation(pre_activation).mean(-1)
    if (expected - got).abs().max() > tolerance * (1 + got.abs().max()):
        raise UnsupportedModel(
            f"the pooled vector ({head.pooled.point} of {head.pooled.module}) is not the average of "
            f"{head.activation.label}(pre-activation at {head.pre_activation.module}): something between "
            f"the feature layer and the pool is not element-wise, or the {head.family} adapter is wrong"
        )
    if head.head_fn is not None:
        recomputed = head.head_fn(pooled)
        if (recomputed - logits).abs().max() > tolerance * (1 + logits.abs().max()):
            raise UnsupportedModel(f"the {head.family} adapter's head function does not reproduce the logits")


def _prepare(
    head: NormalisedHead, tapped: dict[str, Tensor], logits: Tensor, dtype: torch.dtype
) -> tuple[dict[str, Tensor], Tensor]:
    """Tapped tensors and logits in the compute dtype; the pre-activation cut to the feature layer's channels."""
    tapped = {key: value.to(dtype) for key, value in tapped.items()}
    if head.pre_activation.channels_last:
        tapped["pre_activation"] = tapped["pre_activation"].movedim(-1, 1)
    tapped["pre_activation"] = tapped["pre_activation"][:, head.channels]
    return tapped, logits.to(dtype)


def _constants(model: nn.Module, head: NormalisedHead, device: torch.device, dtype: torch.dtype) -> _Constants:
    modules = dict(model.named_modules())
    feature_layer = modules[head.feature_layer]
    kernel = feature_layer.weight.detach().to(dtype).flatten(1)
    return _Constants(
        feature_layer=feature_layer,
        # (classes, C): a 1x1-conv classifier's (classes, C, 1, 1) kernel is the same matrix
        classifier_weight=modules[head.classifier].weight.detach().to(dtype).flatten(1),
        channel_scale=head.channel_scale.to(device, dtype),
        kernel_gram=kernel @ kernel.T,
    )


def _chunk_size(const: _Constants, device: torch.device, trace_only: bool) -> int:
    """Samples per chunk of the closed form, so that its per-sample matrices fit the device's chunk budget."""
    channels, classes = const.kernel_gram.shape[0], const.classifier_weight.shape[0]
    kernel_size = const.feature_layer.weight[0].numel()  # D, the length of g_c when g is formed
    # Per sample: a few (classes, C) and (C, D) matrices, and for kappa (C, C) ones too.
    per_sample = channels * max(classes, kernel_size, 0 if trace_only else channels) * 3
    budget = _CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    if device.type == "cuda":
        budget = min(budget, torch.cuda.mem_get_info(device)[0] // 4)
    return max(1, budget // (per_sample * const.kernel_gram.element_size()))


def _taps(head: NormalisedHead) -> dict[str, Tap]:
    return {
        "features": Tap(head.feature_layer, "input"),
        "pre_activation": head.pre_activation,
        "pooled": head.pooled,
        "classifier_input": Tap(head.classifier, "input"),
    }


@dataclass(frozen=True)
class _Terms:
    """Per-sample ingredients of the closed form: patches P, sigma'(v), curv_c, and e, B of the head."""

    patches: Tensor
    slopes: Tensor
    curv: Tensor
    derivatives: flatness.HeadDerivatives


def _terms(
    head: NormalisedHead, const: _Constants, tapped: dict[str, Tensor], logits: Tensor, labels: Tensor
) -> _Terms:
    scale = const.channel_scale
    pre_activation = tapped["pre_activation"].flatten(2)
    patches = feature_patches(const.feature_layer, tapped["features"])
    if pre_activation.shape[-1] != patches.shape[-1]:
        raise UnsupportedModel(
            f"the pre-activation has {pre_activation.shape[-1]} positions but the feature layer "
            f"{patches.shape[-1]}: something between them changes the spatial size"
        )
    slopes, curvatures = head.activation.derivatives(pre_activation)
    if head.head_fn is None:
        derivatives = flatness.linear_head_derivatives(logits, labels, const.classifier_weight)
    else:
        derivatives = flatness.head_derivatives(head.head_fn, tapped["pooled"].flatten(1), labels)
    curv = flatness.curvature(curvatures, patches, scale)
    return _Terms(patches, slopes, curv, derivatives.select(head.channels))


def _measure(
    head: NormalisedHead,
    const: _Constants,
    tapped: dict[str, Tensor],
    logits: Tensor,
    labels: Tensor,
    trace_only: bool,
) -> dict[str, Tensor]:
    """Per-sample measures (float64) of one chunk of samples."""
    terms = _terms(head, const, tapped, logits, labels)
    scale = const.channel_scale
    sqnorms = flatness.gradient_sqnorms(terms.slopes, terms.patches, scale)
    out = {
        "trace": flatness.hessian_trace(sqnorms, terms.curv, terms.derivatives),
        "classifier_flatness": flatness.classifier_flatness(
            tapped["classifier_input"].flatten(1), logits, const.classifier_weight
        ),
        "loss": F.cross_entropy(logits, labels, reduction="none").double(),
        "correct": (logits.argmax(1) == labels).double(),
        "correct_top5": (logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]).any(1).double(),
    }
    if not trace_only:
        grad_gram = flatness.gradient_gram(terms.slopes, terms.patches, scale)
        out["relative_flatness"] = flatness.relative_flatness(
            const.kernel_gram, grad_gram, terms.curv, terms.derivatives
        )
    return out


def _result(
    model: nn.Module, head: NormalisedHead, moments: dict[str, _Moments], device: torch.device, seconds: float
) -> ScanResult:
    kappa = moments.get("relative_flatness")
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
    )


def scan(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: str | torch.device | None = None,
    max_samples: int | None = None,
    trace_only: bool = False,
    amp: bool = False,
    on_batch: Callable[[ScanResult], bool | None] | None = None,
) -> ScanResult:
    """Exact Tr(H), relative flatness and classifier flatness of ``model``'s feature layer over ``batches``.

    ``batches`` yields (images, labels) in the model's preprocessing. The model is moved to ``device``
    (default: CUDA when available) and run once per batch in eval mode without an autograd graph; its
    dtype is kept (float64 models are measured in float64 end to end). ``amp`` runs the model's forward
    under autocast (bfloat16 on CPU, float16 on CUDA); the measure's own math stays in float32 or
    float64. ``on_batch`` is called with the running result after every batch; returning True stops
    the stream there. Raises :class:`UnsupportedModel` with the reason for a model outside the supported
    class, and :class:`ScanInterrupted` holding the partial result on Ctrl-C.
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be positive, got {max_samples}")
    head = describe(model)
    dev = resolve_device(device)
    param_dtype = next(model.parameters()).dtype
    compute_dtype = torch.promote_types(param_dtype, torch.float32)
    was_training = model.training
    model.to(dev).eval()
    const = _constants(model, head, dev, compute_dtype)
    names = ["trace", "classifier_flatness", "loss", "correct", "correct_top5"]
    names += [] if trace_only else ["relative_flatness"]
    moments = {name: _Moments() for name in names}
    chunk = _chunk_size(const, dev, trace_only)
    autocast = partial(torch.autocast, dev.type, torch.bfloat16 if dev.type == "cpu" else torch.float16)
    start, n_seen = time.perf_counter(), 0
    try:
        with _recording(model, _taps(head)) as recorder, torch.no_grad():
            for images, labels in batches:
                if max_samples is not None:
                    images, labels = images[: max_samples - n_seen], labels[: max_samples - n_seen]
                images = images.to(dev, param_dtype if images.is_floating_point() else None)
                # Checked where the loader made them (the CPU, as a rule): a check on the GPU would wait for it.
                given_labels, labels = labels, labels.to(dev, non_blocking=True)
                with autocast() if amp else nullcontext():
                    logits, tapped = recorder.forward(model, images)
                if given_labels.min() < 0 or given_labels.max() >= logits.shape[1]:
                    bad = given_labels[(given_labels < 0) | (given_labels >= logits.shape[1])][0].item()
                    raise ScanError(
                        f"label {bad} is outside the model's {logits.shape[1]} classes; "
                        "map the dataset's labels to the model's classes"
                    )
                tap_dtype = tapped["pooled"].dtype
                tapped, logits = _prepare(head, tapped, logits, compute_dtype)
                if n_seen == 0:
                    _check_normalisation(
                        head, tapped["pre_activation"].flatten(2), tapped["pooled"].flatten(1), logits, tap_dtype
                    )
                values: dict[str, list[Tensor]] = {name: [] for name in names}
                for lo in range(0, labels.shape[0], chunk):
                    part = slice(lo, lo + chunk)
                    parts = {key: value[part] for key, value in tapped.items()}
                    for name, value in _measure(head, const, parts, logits[part], labels[part], trace_only).items():
                        values[name].append(value)
                # One device-to-host copy per batch: a copy per chunk and measure would stall a GPU on each.
                per_sample = torch.stack([torch.cat(values[name]) for name in names]).cpu()
                for name, row in zip(names, per_sample, strict=True):
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
