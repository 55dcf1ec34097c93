"""flatscan's exact Tr(H) and relative flatness against curvlinops' stochastic trace estimators on the same operator.

H is the Hessian of the mean cross-entropy over N images w.r.t. the feature layer's kernel K (only K varies), and
kappa = Tr((S (x) I) H (S (x) I)), S = (K K^T)^{1/2} acting on the filter axis: sum_{c,c'} <K_c, K_c'> Tr(H_cc').
Hutchinson, Hutch++ and XTrace (curvlinops) run on these operators. For each target relative error (vs flatscan's
exact value) the table gives the median over seeds of the matrix-vector products needed (the first budget on the grid
3 * 2^k, k >= 1, whose estimate is within the target; each budget re-runs the estimator from the seed), the time for
that, and its ratio to flatscan's scan of the same images, timed in the same process (the trace-only scan for Tr(H)).
">cap": no budget up to --max-matvecs reached the target; the time is then that of the call at the cap.

The peers get the cheapest exact Hessian-vector product we could make, generic in what follows the feature layer: one
forward pass captures the feature layer's input A (for a ResNet also the last block's shortcut), and then, z = conv(A;
K) being linear in K, H V = J^T M J V for a block of vectors: J V = conv(A; V) with all vectors' filters stacked in one
conv, M = d2 loss / dz2 at the captured z applied by torch.func (forward-over-reverse, vmapped over the vectors, through
the rest of the network only: norm, shortcut, activation, pool, head), and J^T by one weight gradient of that conv.
This is several times faster than curvlinops' HessianLinearOperator on the same tail, whose vmapped conv backward takes
a slow path. The capture (one forward pass over the images) is part of the peers' time. Before the benchmark, a tiny
model checks the operators in float64: products against curvlinops' HessianLinearOperator, and dense exact traces
(one product per basis vector) against flatscan's Tr(H) and kappa.

Random-init timm model with 10 classes, flatscan's offline digits (upscaled), CPU, float32:

    python benchmarks/peer_estimators.py                     # efficientnet_lite0, 32 px, N = 8 64 512, 5 seeds
    python benchmarks/peer_estimators.py --n 8 --seeds 2 --max-matvecs 96
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import timm
import torch
import torch.nn.functional as F
from curvlinops import hutchinson_trace, hutchpp_trace, xtrace
from torch import Tensor, nn

import flatscan

ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "Hutchinson": hutchinson_trace,
    "Hutch++": hutchpp_trace,
    "XTrace": xtrace,
}
TARGETS = (1e-2, 1e-3)
Batches = list[tuple[Tensor, Tensor]]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), seconds), synchronising CUDA."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def digits(model: nn.Module, n: int, img_size: int) -> Batches:
    """The first ``n`` digits images, upscaled to ``img_size``, in batches of 64."""
    options = flatscan.DataOptions(dataset="digits", img_size=img_size, crop_pct=1.0, batch_size=64, workers=0)
    return list(flatscan.open_eval_data(model, options, limit=n).batches)


class Tail:
    """The network after its feature conv, on tensors captured once: (z, shortcut) -> logits."""

    def __init__(self, model: nn.Module, feature_layer: str) -> None:
        self.model = model
        self.conv = model.get_submodule(feature_layer)
        if type(self.conv) is not nn.Conv2d or self.conv.groups != 1 or self.conv.padding_mode != "zeros":
            raise SystemExit(f"{feature_layer} is not a plain ungrouped Conv2d: its filters cannot be stacked")
        block_name, _, conv_name = feature_layer.rpartition(".")
        self.block = model.get_submodule(block_name) if block_name else None
        resnet_block = block_name.startswith("layer4.") and conv_name == (
            "conv3" if hasattr(self.block, "conv3") else "conv2"
        )
        if not (feature_layer == "conv_head" or resnet_block):
            raise SystemExit(
                f"{feature_layer}: the tail is written for EfficientNet-style (conv_head) and ResNet models"
            )
        self.last = conv_name[-1]  # the ResNet block's norm and activation after its feature conv: bn{last}, act{last}

    def capture(self, batches: Batches, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(feature-layer input, ResNet shortcut or an empty tensor, labels) of one forward pass over ``batches``."""
        seen: dict[str, list[Tensor]] = {"inputs": [], "shortcut": []}
        hooks = [self.conv.register_forward_pre_hook(lambda _m, args: seen["inputs"].append(args[0]))]
        if self.block is not None:
            block = self.block

            def shortcut(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
                seen["shortcut"].append(args[0] if block.downsample is None else block.downsample(args[0]))

            hooks.append(block.register_forward_pre_hook(shortcut))
        with torch.no_grad():
            for images, _ in batches:
                self.model(images.to(device))
        for hook in hooks:
            hook.remove()
        labels = torch.cat([labels for _, labels in batches]).to(device)
        return torch.cat(seen["inputs"]), torch.cat(seen["shortcut"]) if seen["shortcut"] else torch.empty(0), labels

    def logits(self, z: Tensor, shortcut: Tensor) -> Tensor:
        if self.block is None:
            return self.model.forward_head(self.model.bn2(z))
        x = getattr(self.block, f"bn{self.last}")(z)
        if self.block.se is not None:
            x = self.block.se(x)
        return self.model.forward_head(getattr(self.block, f"act{self.last}")(x + shortcut))


class Operator:
    """(S (x) I) H (S (x) I) on flattened kernels (``mix`` S; None: H), as curvlinops' estimators use an operator.

    H V = J^T M J V (see the module docstring), ``chunk`` vectors at a time; ``matvecs`` counts the products.
    """

    def __init__(self, tail: Tail, captured: tuple[Tensor, Tensor, Tensor], mix: Tensor | None) -> None:
        self.mix = mix
        inputs, shortcut, labels = captured
        conv = tail.conv
        weight = conv.weight.detach()
        self.kernel_shape = weight.shape
        self.shape = (weight.numel(), weight.numel())
        self.device, self.dtype = weight.device, weight.dtype
        with torch.no_grad():
            z = conv(inputs)
        self.z_shape = z.shape
        # J as a GEMM with the patches (rows n, p): oneDNN's conv and its weight gradient are far slower at k C filters
        patches = F.unfold(inputs, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # type: ignore[arg-type]
        self.patches = patches.transpose(1, 2).flatten(0, 1)

        def loss(z: Tensor) -> Tensor:
            return F.cross_entropy(tail.logits(z, shortcut), labels)

        grad = torch.func.grad(loss)
        self.loss_hvp = torch.func.vmap(lambda u: torch.func.jvp(grad, (z,), (u,))[1])
        self.chunk = max(1, min(256, 2**24 // z.numel()))  # vectors per block: M's tangents stay ~64 MiB in float32
        self.matvecs = 0

    def __matmul__(self, x: Tensor) -> Tensor:
        columns = x.reshape(x.shape[0], -1)
        self.matvecs += columns.shape[1]
        return torch.cat([self._apply(part) for part in columns.split(self.chunk, dim=1)], dim=1).reshape(x.shape)

    def _mixed(self, filters: Tensor) -> Tensor:
        """(k, C, D) ``filters`` times S on the filter axis."""
        return filters if self.mix is None else self.mix @ filters

    def _apply(self, columns: Tensor) -> Tensor:
        """The operator on (dim, k) ``columns``."""
        k = columns.shape[1]
        n, channels, *spatial = self.z_shape
        filters = self._mixed(columns.T.reshape(k, channels, -1)).flatten(0, 1)  # (k C, D)
        responses = (filters @ self.patches.T).view(k, channels, n, *spatial)  # J V
        tangents = self.loss_hvp(responses.transpose(1, 2)).transpose(1, 2)  # M J V, (k, C, N, ...)
        product = tangents.reshape(k * channels, -1) @ self.patches  # J^T M J V
        return self._mixed(product.view(k, channels, -1)).reshape(k, -1).T


def gram_root(kernel: Tensor) -> Tensor:
    """(K K^T)^{1/2} of the (C, ...) ``kernel``, from its eigendecomposition in float64."""
    flat = kernel.detach().flatten(1).double()
    values, vectors = torch.linalg.eigh(flat @ flat.T)
    return ((vectors * values.clamp(min=0).sqrt()) @ vectors.T).to(kernel.dtype)


def median_time(fn: Callable[[], Any], reps: int) -> tuple[Any, float]:
    """(fn(), median seconds of ``reps`` runs after a warm-up run)."""
    out = fn()
    return out, statistics.median(timed(fn)[1] for _ in range(reps))


def operators(tail: Tail, captured: tuple[Tensor, Tensor, Tensor], mix: Tensor) -> dict[str, Operator]:
    """The Tr(H) and kappa operators, warmed up (torch.func's first call traces)."""
    ops = {"Tr(H)": Operator(tail, captured, None), "kappa": Operator(tail, captured, mix)}
    for op in ops.values():
        op @ torch.randn(op.shape[0], 2, device=op.device, dtype=op.dtype)
    return ops


def check(name: str, img_size: int) -> None:
    """Float64, tiny ``name`` model: products against autograd's, dense exact traces against flatscan."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).double().eval()
    batches = [(images.double(), labels) for images, labels in digits(model, 4, img_size)]
    result = flatscan.scan(model, batches, device="cpu")
    tail = Tail(model, result.feature_layer)
    captured = tail.capture(batches, torch.device("cpu"))
    ops = operators(tail, captured, gram_root(tail.conv.weight))
    images = torch.cat([images for images, _ in batches])
    labels = captured[2]
    weight_name = f"{result.feature_layer}.weight"

    def loss(weight: Tensor) -> Tensor:  # through the whole model: independent of the tail's split
        return F.cross_entropy(torch.func.functional_call(model, {weight_name: weight}, (images,)), labels)

    weight = tail.conv.weight.detach()
    dim = ops["Tr(H)"].shape[0]
    vectors = torch.randn(dim, 3, dtype=torch.float64)
    expected = torch.stack(
        [torch.func.jvp(torch.func.grad(loss), (weight,), (v.view_as(weight),))[1].flatten() for v in vectors.T], 1
    )
    errors = {"H V vs autograd": ((ops["Tr(H)"] @ vectors - expected).norm() / expected.norm()).item()}
    basis = torch.eye(dim, dtype=torch.float64).split(1024, dim=1)
    for (measure, op), exact in zip(ops.items(), (result.trace, result.relative_flatness), strict=True):
        assert exact is not None
        offset = 0
        dense = 0.0
        for block in basis:
            dense += (op @ block)[offset : offset + block.shape[1]].diagonal().sum().item()
            offset += block.shape[1]
        errors[f"dense {measure} {dense:.12g} vs flatscan {exact:.12g}"] = abs(dense - exact) / abs(exact)
    print(
        f"check ({name}, {result.feature_layer}, {dim} weights, float64): "
        + "; ".join(f"{what}: {error:.1e}" for what, error in errors.items())
    )
    if max(errors.values()) > 1e-9:
        raise SystemExit("check failed: the operators do not match autograd / flatscan")


def search(
    estimator: Callable[..., Tensor], op: Operator, exact: float, seed: int, budgets: list[int]
) -> list[tuple[float, float]]:
    """Per target: (matvecs, seconds) of the first budget whose estimate is within it, else (inf, time at the cap)."""
    hits: list[tuple[float, float] | None] = [None] * len(TARGETS)
    seconds = 0.0
    for budget in budgets:
        torch.manual_seed(seed)
        op.matvecs = 0
        value, seconds = timed(partial(estimator, op, budget))
        estimate = value.item()
        if op.matvecs != budget:
            raise SystemExit(f"{estimator.__name__} used {op.matvecs} products for a budget of {budget}")
        error = abs(estimate - exact) / abs(exact)  # NaN (an estimator breaking down) reaches no target
        hits = [
            hit if hit is not None or not error <= target else (budget, seconds)
            for hit, target in zip(hits, TARGETS, strict=True)
        ]
        if all(hit is not None for hit in hits):
            break
    return [hit if hit is not None else (math.inf, seconds) for hit in hits]


def measure(model: nn.Module, n: int, args: argparse.Namespace) -> list[str]:
    """Markdown rows for ``n`` images: per measure and estimator, products, time and ratio for each target."""
    device = torch.device(args.device)
    batches = digits(model, n, args.img_size)
    result, trace_s = median_time(lambda: flatscan.scan(model, batches, device=device, trace_only=True), args.reps)
    result, kappa_s = median_time(lambda: flatscan.scan(model, batches, device=device), args.reps)
    tail = Tail(model, result.feature_layer)
    captured, capture_s = median_time(lambda: tail.capture(batches, device), args.reps)
    mix, root_s = median_time(lambda: gram_root(tail.conv.weight), args.reps)
    ops = operators(tail, captured, mix)
    budgets = [3 * 2**k for k in range(1, 64) if 3 * 2**k <= args.max_matvecs]
    cases = {
        "Tr(H)": (result.trace, trace_s, capture_s),
        "kappa": (result.relative_flatness, kappa_s, capture_s + root_s),
    }
    rows = []
    for measure_name, (exact, flatscan_s, setup_s) in cases.items():
        assert exact is not None
        for name, estimator in ESTIMATORS.items():
            runs = [search(estimator, ops[measure_name], exact, seed, budgets) for seed in range(args.seeds)]
            cells = []
            for per_seed in zip(*runs, strict=True):
                matvecs, seconds = sorted(per_seed)[len(per_seed) // 2]  # the median seed (the upper one of two)
                more = ">" if math.isinf(matvecs) else ""
                total = setup_s + seconds
                count = f">{budgets[-1]}" if more else f"{matvecs:.0f}"
                cells += [count, f"{more}{total:.2f}", f"{more}{total / flatscan_s:.1f}x"]
            row = f"| {n} | {measure_name} | {exact:.5g} | {flatscan_s:.2f} | {name} | " + " | ".join(cells) + " |"
            print(row, flush=True)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--n", type=int, nargs="+", default=[8, 64, 512], help="numbers of images")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--max-matvecs", type=int, default=1536, help="cap of the budget grid 3 * 2^k")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of the scans and the capture (median)")
    parser.add_argument("--check-model", default="test_efficientnet", help="tiny model of the float64 check")
    args = parser.parse_args()

    check(args.check_model, args.img_size)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=10).to(args.device).eval()
    header = (
        f"{args.model} (random init), digits at {args.img_size} px, {args.device}, float32; "
        f"median of {args.seeds} seeds, budgets 3 * 2^k up to {args.max_matvecs} products"
    )
    print(header, flush=True)
    rows = [row for n in args.n for row in measure(model, n, args)]
    targets = [f"{target:.1%}".replace(".0%", "%") for target in TARGETS]
    columns = ["N", "measure", "exact", "flatscan (s)", "estimator"]
    columns += [f"{what} {target}" for target in targets for what in ("products", "time (s)", "x flatscan")]
    print(f"\n{header}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---:" for _ in columns) + "|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
