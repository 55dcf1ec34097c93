"""flatscan's exact Tr(H) and relative flatness against curvlinops' stochastic trace estimators on the same operator.

H is the Hessian of the mean cross-entropy over N images w.r.t. the feature layer's kernel K (only K varies), and
kappa = Tr((S (x) I) H (S (x) I)), S = (K K^T)^{1/2} on the filter axis, = sum_{c,c'} <K_c, K_c'> Tr(H_cc'). curvlinops'
Hutchinson, Hutch++ and XTrace (Rademacher vectors) run on these operators. Per target relative error (vs flatscan's
exact value), the table gives the median over seeds of the products needed: walking down the budgets 3 * 2^k (k >= 1)
from --max-matvecs, each a fresh estimator call from the seed, the smallest budget from which on every estimate is
within the target (">cap": not even the cap's). Then the time of the peer for that (its setup plus the estimator call
at that budget, products included) and its ratio to flatscan's scan of the same images in the same process (the
trace-only scan for Tr(H)); for ">cap", the time at the cap.

The peers get the cheapest exact Hessian-vector product we could make, generic in what follows the feature layer. Their
setup, timed, is one forward pass capturing the feature layer's input A (for a ResNet also the last block's shortcut)
and its patches P (unfold), plus S for kappa. As z = conv(A; K) is linear in K, H V = J^T M J V for a block of vectors:
J V and J^T are GEMMs with P (oneDNN's conv and its weight gradient are much slower with all vectors' filters stacked),
M = d2 loss / dz2 at the captured z is applied by torch.func (forward-over-reverse, vmapped over the vectors) through
the rest of the network only (norm, shortcut, activation, pool, head). S mixes filters, or channels of J V and M J V
when N L < D (cheaper). This is 2-3x faster than curvlinops' HessianLinearOperator on the same tail module (vmapped conv
backward), which also fails on SiLU tails (torch has no forward AD for silu_backward under its no_grad).

First, a tiny model (--check-model, test_resnet for ResNets; BatchNorm randomised) checks the operators in float64:
products against autograd through the whole model, and their exact traces (one product per basis vector) against
flatscan's Tr(H) and kappa.

Random-init timm model (timm's init; BatchNorm weights it zeroes set to one), 10 classes, flatscan's offline digits
upscaled, float32:

    python benchmarks/peer_estimators.py                 # efficientnet_lite0, 32 px, N = 8 64 512, 5 seeds, cap 96
    python benchmarks/peer_estimators.py --n 8 --seeds 2 --max-matvecs 24
    python benchmarks/peer_estimators.py --model resnet18 --check-model test_resnet --n 8 64
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from functools import partial
from importlib.metadata import version
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


def randomise_norms(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (timm's init leaves them the identity), for the check."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.2)  # type: ignore[union-attr]
                module.running_var.uniform_(0.5, 1.5)  # type: ignore[union-attr]
                module.weight.uniform_(0.5, 2.0)
                module.bias.normal_(0, 0.3)
    return model


def unzero_norms(model: nn.Module) -> nn.Module:
    """BatchNorm weights one where timm's init zeroes them (a residual block's last): a ResNet's feature layer would
    have a zero Hessian."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d) and not module.weight.any():
                module.weight.fill_(1)
    return model


class Tail:
    """The network after its feature conv, on tensors captured once: (z, shortcut) -> logits."""

    def __init__(self, model: nn.Module, feature_layer: str) -> None:
        self.model: Any = model  # timm's forward_head, bn2, blocks
        conv = model.get_submodule(feature_layer)
        if not (type(conv) is nn.Conv2d and conv.groups == 1 and conv.padding_mode == "zeros"):
            raise SystemExit(f"{feature_layer} is not a plain ungrouped Conv2d: its filters cannot be stacked")
        self.conv = conv
        block_name, _, conv_name = feature_layer.rpartition(".")
        self.block: Any = model.get_submodule(block_name) if block_name else None
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
    """(S (x) I) H (S (x) I) on flattened kernels (``mix`` S; None: H), with the shape, device, dtype and ``@`` that
    curvlinops' estimators use.

    H V = J^T M J V (see the module docstring), ``chunk`` vectors at a time; ``matvecs`` counts the products. S mixes
    the filters of V, or (cheaper when N L < D) the channels of J V and of M J V.
    """

    def __init__(self, tail: Tail, captured: tuple[Tensor, Tensor, Tensor], mix: Tensor | None) -> None:
        inputs, shortcut, labels = captured
        conv = tail.conv
        weight = conv.weight.detach()
        self.shape = (weight.numel(), weight.numel())
        self.device, self.dtype = weight.device, weight.dtype
        with torch.no_grad():
            z = conv(inputs)
        self.z_shape = z.shape
        # J as a GEMM with the patches: oneDNN's conv and its weight gradient are far slower at k C filters
        patches = F.unfold(inputs, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # type: ignore[arg-type]
        self.patches = patches.transpose(1, 2)  # (N, L, D)
        on_responses = z[0, 0].numel() * z.shape[0] < weight[0].numel()
        self.filter_mix: Tensor | None = None if on_responses else mix
        self.response_mix: Tensor | None = mix if on_responses else None

        def loss(z: Tensor) -> Tensor:
            return F.cross_entropy(tail.logits(z, shortcut), labels)

        grad = torch.func.grad(loss)
        # the vectors on the last axis of z: (N, C, H, W, k)
        self.loss_hvp = torch.func.vmap(lambda u: torch.func.jvp(grad, (z,), (u,))[1], in_dims=-1, out_dims=-1)
        self.chunk = max(1, min(1024, 2**24 // z.numel()))  # vectors per block: M's tangents stay ~64 MiB in float32
        self.matvecs = 0

    @torch.no_grad()  # the network's own parameters: no graph (in-place ops on the result would leak it)
    def __matmul__(self, x: Tensor) -> Tensor:
        columns = x.reshape(x.shape[0], -1)
        self.matvecs += columns.shape[1]
        return torch.cat([self._apply(part) for part in columns.split(self.chunk, dim=1)], dim=1).reshape(x.shape)

    def _apply(self, columns: Tensor) -> Tensor:
        """The operator on (dim, k) ``columns``."""
        _, channels, *spatial = self.z_shape
        filters = mixed(self.filter_mix, columns.reshape(channels, -1, columns.shape[1]), 0)  # (C, D, k)
        responses = mixed(self.response_mix, torch.einsum("nld,cdk->nclk", self.patches, filters), 1)  # J V
        tangents = self.loss_hvp(responses.unflatten(2, spatial)).flatten(2, -2)  # M J V
        product = torch.einsum("nclk,nld->cdk", mixed(self.response_mix, tangents, 1), self.patches)  # J^T M J V
        return mixed(self.filter_mix, product, 0).reshape(columns.shape)


def mixed(mix: Tensor | None, tensor: Tensor, axis: int) -> Tensor:
    """``mix`` (None: identity) on the channel ``axis`` of ``tensor``."""
    return tensor if mix is None else torch.tensordot(mix, tensor, dims=([1], [axis])).movedim(0, axis)


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
    model = randomise_norms(timm.create_model(name, pretrained=False, num_classes=10)).double().eval()
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
    for (measure, op), exact in zip(ops.items(), (result.trace, result.relative_flatness), strict=True):
        assert exact is not None
        dense = 0.0
        for start in range(0, dim, 256):  # the identity, 256 columns at a time
            block = torch.zeros(dim, min(256, dim - start), dtype=torch.float64)
            block[start : start + block.shape[1]].fill_diagonal_(1)
            dense += (op @ block)[start : start + block.shape[1]].diagonal().sum().item()
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
    """Per target: (products, seconds) of the smallest budget from which on every budget's estimate is within it,
    walking down from the cap; (inf, seconds at the cap) when the cap's estimate is not within it."""
    found = [(math.inf, 0.0)] * len(TARGETS)
    within = [True] * len(TARGETS)
    for budget in reversed(budgets):
        torch.manual_seed(seed)
        op.matvecs = 0
        value, seconds = timed(partial(estimator, op, budget))
        if op.matvecs != budget:
            raise SystemExit(f"{estimator.__name__} used {op.matvecs} products for a budget of {budget}")
        error = abs(value.item() - exact) / abs(exact)  # NaN (an estimator breaking down) is within no target
        within = [still and error <= target for still, target in zip(within, TARGETS, strict=True)]
        found = [
            (budget, seconds) if still else (math.inf, seconds) if budget == budgets[-1] else hit
            for still, hit in zip(within, found, strict=True)
        ]
        if not any(within):
            break
    return found


def measure(model: nn.Module, n: int, args: argparse.Namespace) -> list[str]:
    """Markdown rows for ``n`` images: per measure and estimator, products, time and ratio for each target."""
    device = torch.device(args.device)
    batches = digits(model, n, args.img_size)
    result, trace_s = median_time(lambda: flatscan.scan(model, batches, device=device, trace_only=True), args.reps)
    result, kappa_s = median_time(lambda: flatscan.scan(model, batches, device=device), args.reps)
    tail = Tail(model, result.feature_layer)
    # the peers' setup: the capture (one forward pass) and the operator's patches; for kappa also S
    _, setup_s = median_time(lambda: Operator(tail, tail.capture(batches, device), None), args.reps)
    mix, root_s = median_time(lambda: gram_root(tail.conv.weight), args.reps)
    ops = operators(tail, tail.capture(batches, device), mix)
    budgets = [3 * 2**k for k in range(1, 64) if 3 * 2**k <= args.max_matvecs]
    cases = {
        "Tr(H)": (result.trace, trace_s, setup_s),
        "kappa": (result.relative_flatness, kappa_s, setup_s + root_s),
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
    parser.add_argument("--max-matvecs", type=int, default=96, help="cap of the budget grid 3 * 2^k")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of the scans and the capture (median)")
    parser.add_argument("--check-model", default="test_efficientnet", help="tiny model of the float64 check")
    args = parser.parse_args()

    check(args.check_model, args.img_size)
    torch.manual_seed(0)
    model = unzero_norms(timm.create_model(args.model, pretrained=False, num_classes=10)).to(args.device).eval()
    header = (
        f"{args.model} (random init), digits at {args.img_size} px, {args.device}, float32; "
        f"curvlinops {version('curvlinops-for-pytorch')}, median of {args.seeds} seeds, budgets 3 * 2^k up to "
        f"{args.max_matvecs} products"
    )
    print(header, flush=True)
    rows = [row for n in args.n for row in measure(model, n, args)]
    targets = [f"{target:.1%}".replace(".0%", "%") for target in TARGETS]
    columns = ["N", "measure", "exact", "flatscan (s)", "estimator"]
    columns += [f"{what} ({target})" for target in targets for what in ("products", "time (s)", "x flatscan")]
    print(f"\n{header}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---:" for _ in columns) + "|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
