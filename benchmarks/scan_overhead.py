"""Scan time as a multiple of the model's own eval forward pass over the same batches.

Same process, interleaved repetitions, medians of each repetition's ratio to the forwards around it. Random-init
timm models, random images. "kappa floor" is the part of kappa no exact route avoids: the classes x C^2 contraction
per sample (its lower block triangle, float32, as flatscan batches it: ``flatness.gram_contraction``), timed alone
on random matrices of the model's sizes, as a multiple of the same forward:

    python benchmarks/scan_overhead.py                       # resnet50, efficientnet_b0; CPU, batch 16, 224 px
    python benchmarks/scan_overhead.py --device cuda --batch-size 64 --models resnet50
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import timm
import torch
from rich.console import Console
from rich.table import Table

import flatscan
from flatscan import flatness


def timed(fn: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(name: str, device: str, batch_size: int, img_size: int, n_batches: int, reps: int) -> dict[str, float]:
    torch.manual_seed(0)
    # The inference form, as flatscan's loader measures it (fused branches, materialised weight standardisation).
    model = flatscan.inference_form(timm.create_model(name, pretrained=False)).to(device).eval()
    batches = [
        (torch.randn(batch_size, 3, img_size, img_size, device=device), torch.randint(0, 1000, (batch_size,)))
        for _ in range(n_batches)
    ]

    def forward() -> None:
        with torch.no_grad():
            for images, _ in batches:
                model(images)

    head = flatscan.describe(model)
    modules = dict(model.named_modules())
    channels = modules[head.feature_layer].weight.shape[0]
    classes = modules[head.classifier].weight.shape[0]
    n_samples = batch_size * n_batches
    chunk = min(n_samples, 4)
    labels = torch.zeros(chunk, dtype=torch.long, device=device)
    weight = torch.randn(classes, channels, device=device)
    derivatives = flatness.linear_head_derivatives(torch.randn(chunk, classes, device=device), labels, weight)
    derivatives.factor(weight.dtype)  # V (classes, C) per sample is formed once, outside the timing
    columns = torch.randn(chunk, channels, 1, device=device)  # left right^T of rank one: the contraction alone
    channel_weight = torch.randn(channels, channels, device=device)

    def floor() -> None:
        for _ in range(math.ceil(n_samples / chunk)):
            flatness.gram_contraction(columns, columns, channel_weight, derivatives)

    runs = {
        "trace": lambda: flatscan.scan(model, batches, device=device, trace_only=True),
        "kappa": lambda: flatscan.scan(model, batches, device=device),
        "floor": floor,
    }
    for run in (forward, *runs.values()):  # warm-up: allocator, oneDNN / cuDNN kernel choice
        run()
    # Each repetition runs the three between two forwards and is divided by their mean: on a shared machine whose
    # speed drifts, a ratio of neighbours is steadier than a ratio of medians taken minutes apart. The order
    # rotates, so no run always follows the forward.
    forwards = [timed(forward)]
    ratios: dict[str, list[float]] = {key: [] for key in runs}
    for rep in range(reps):
        keys = list(runs)[rep % len(runs) :] + list(runs)[: rep % len(runs)]
        times = {key: timed(runs[key]) for key in keys}
        forwards.append(timed(forward))
        baseline = (forwards[-2] + forwards[-1]) / 2
        for key, seconds in times.items():
            ratios[key].append(seconds / baseline)
    return {
        "forward_s": statistics.median(forwards),
        **{f"{key}_ratio": statistics.median(values) for key, values in ratios.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "efficientnet_b0"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=2, help="batches per timed run")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions (median reported)")
    args = parser.parse_args()

    table = Table(
        title=f"scan / forward, {args.device}, batch {args.batch_size}, {args.img_size} px, "
        f"{args.batches} batches, median of {args.reps} ratios"
    )
    for column in ("model", "forward (s)", "Tr(H) only", "Tr(H) + kappa", "kappa floor"):
        table.add_column(column, justify="right")
    console = Console()
    for name in args.models:
        r = measure(name, args.device, args.batch_size, args.img_size, args.batches, args.reps)
        row = (
            name,
            f"{r['forward_s']:.3f}",
            f"{r['trace_ratio']:.2f}x",
            f"{r['kappa_ratio']:.2f}x",
            f"{r['floor_ratio']:.2f}x",
        )
        console.print(" ".join(row))  # as each model finishes: a later model's failure keeps the earlier rows
        table.add_row(*row)
    console.print(table)


if __name__ == "__main__":
    main()
