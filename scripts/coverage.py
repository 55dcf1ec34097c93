"""Coverage sweep: which timm architectures with pretrained weights flatscan audits exactly.

For every architecture in ``timm.list_models(pretrained=True)`` (tags dropped): build it without
weights (on the meta device for detection), run adapter detection, and for supported ones run
``flatscan.verify`` at a small input size on CPU with randomised normalisation statistics (timm
zero-initialises some last BatchNorms, which would make the certificate vacuous). Writes
``reports/coverage.md`` and ``reports/coverage.csv``.

    python scripts/coverage.py                      # all architectures, 2 processes
    python scripts/coverage.py --filter 'resnet*' --workers 1
    python scripts/coverage.py --filter 'sequencer*' --merge   # re-run one family into the committed sweep
"""

from __future__ import annotations

import argparse
import math
import re
import time
import warnings
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import pandas as pd
import timm
import torch
from rich.progress import Progress
from torch import nn

import flatscan

# A "convolutional" architecture has no attention layer; channel gates (SE, ECA, SK, ...) are not attention.
_ATTENTION = re.compile(r"attention|attn|transformer|mixer", re.IGNORECASE)
_CHANNEL_GATES = {
    "SEModule",
    "SqueezeExcite",
    "EcaModule",
    "CecaModule",
    "EffectiveSEModule",
    "SplitAttn",
    "SelectiveKernel",
    "SelectiveKernelAttn",
    "CbamModule",
    "LightCbamModule",
    "GatherExcite",
    "GlobalContext",
}
VERIFY_SIZE = 96
VERIFY_BATCH = 2
VERIFIED_PER_GROUP = 2
VERIFIED_UP_TO_PARAMS_M = 60  # every supported architecture up to this size is verified


def architectures(pattern: str) -> list[str]:
    return sorted({name.split(".")[0] for name in timm.list_models(pattern, pretrained=True)})


def module_map() -> dict[str, str]:
    """Architecture -> timm module (the family as timm files it)."""
    return {name: module for module in timm.list_modules() for name in timm.list_models(module=module)}


def is_convolutional(model: nn.Module) -> bool:
    kinds = {type(m).__name__ for m in model.modules()}
    return not any(_ATTENTION.search(kind) and kind not in _CHANNEL_GATES for kind in kinds) and not any(
        isinstance(m, nn.MultiheadAttention) for m in model.modules()
    )


def reason_kind(reason: str) -> str:
    """A refusal reason with module paths and numbers folded, so equal reasons count together."""
    reason = reason.split(" (supported families:")[0]
    return re.sub(r"\b[\w]*\d[\w.]*\b", "#", reason)


def randomise_for_verify(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.running_var is not None:
                c = module.num_features
                module.running_mean.copy_(0.2 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(c, generator=generator))
            if (
                isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
                and getattr(module, "weight", None) is not None
            ):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
            # Layer scales (timm's LayerScale.gamma, MetaFormer's Scale.scale) start near 1e-6: make them O(1).
            for name in ("gamma", "scale"):
                value = getattr(module, name, None)
                if isinstance(value, nn.Parameter) and value.dim() == 1:
                    value.copy_(0.5 + torch.rand(value.shape, generator=generator))


def temper_logits(model: nn.Module, images: torch.Tensor) -> None:
    """Scale the classifier so the logits' spread is O(1).

    Random-init deep nets with randomised norms give logits in the hundreds: the softmax is one-hot to
    float64 precision, where autograd's own softmax backward cancels and the reference loses digits.
    """
    classifier = dict(model.named_modules())[flatscan.describe(model).classifier]
    with torch.no_grad():
        if not classifier.weight.any():  # zero-initialised heads (Sequencer2d): no curvature to certify
            classifier.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(2))
        factor = 2.0 / model(images).std().clamp_min(1e-6)
        classifier.weight.mul_(factor)
        if classifier.bias is not None:
            classifier.bias.mul_(factor)


def detect(arch: str) -> dict[str, Any]:
    """Detection on the meta device (no weights, no memory); CPU when a model cannot be built on meta."""
    start = time.perf_counter()
    row: dict[str, Any] = {"architecture": arch}
    warnings.filterwarnings("ignore")
    try:
        try:
            with torch.device("meta"):
                model = flatscan.inference_form(timm.create_model(arch, pretrained=False))
        except Exception:  # some constructors and fusions compute on tensors (e.g. .item()), which meta cannot
            model = flatscan.inference_form(timm.create_model(arch, pretrained=False))
    except Exception as error:
        return {**row, "status": "failed", "reason": f"build: {type(error).__name__}: {error}"[:300]}
    row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    row["convolutional"] = is_convolutional(model)
    try:
        head = flatscan.describe(model)
    except flatscan.UnsupportedModel as refusal:
        return {**row, "status": "refused", "reason": refusal.reason, "seconds": time.perf_counter() - start}
    except Exception as error:
        return {**row, "status": "failed", "reason": f"detect: {type(error).__name__}: {error}"[:300]}
    return {
        **row,
        "status": "supported",
        "family": head.family,
        "feature_layer": head.feature_layer,
        "activation": head.activation.label,
        "head_type": head.head_type,
        "seconds": time.perf_counter() - start,
    }


def verify_at(arch: str, size: int) -> flatscan.VerifyResult:
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False).eval()
    randomise_for_verify(model)  # before fusing: multi-branch fusion folds the BatchNorm statistics
    model = flatscan.inference_form(model)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(VERIFY_BATCH, 3, size, size, generator=generator)
    labels = torch.randint(0, model.num_classes, (VERIFY_BATCH,), generator=generator)
    temper_logits(model, images)
    return flatscan.verify(model, (images, labels), pairs=16)


def run_verify(arch: str) -> dict[str, Any]:
    """verify at VERIFY_SIZE px; at the model's own input size when the small input fails (fixed-size
    attention blocks assert their size; some random-init nets overflow to NaN on small inputs)."""
    start = time.perf_counter()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    cfg = timm.get_pretrained_cfg(arch)
    sizes = dict.fromkeys([max(VERIFY_SIZE, (cfg.min_input_size or (3, 0, 0))[-1]), cfg.input_size[-1]])
    row: dict[str, Any] = {"architecture": arch}
    for size in sizes:
        try:
            result = verify_at(arch, size)
        except flatscan.UnsupportedModel as refusal:  # refused at run time (the first-batch consistency check)
            row = {**row, "verify": "refused", "reason": refusal.reason}
            break
        except Exception as error:
            row = {**row, "verify": "error", "reason": f"verify at {size} px: {type(error).__name__}: {error}"[:300]}
            continue
        if math.isnan(sum(result.autograd)):
            row = {
                **row,
                "verify": "error",
                "reason": f"the random-init forward is NaN at {size} px: nothing certified",
            }
            continue
        row = {
            "architecture": arch,
            "verify": "pass" if result.passed else "FAIL",
            "verify_size": size,
            "max_relative_error": result.max_relative_error,
            "downstream_layers": ",".join(result.downstream_layers),
        }
        break
    return {**row, "verify_seconds": time.perf_counter() - start}


def parallel(fn: Any, items: Iterable[str], workers: int, label: str) -> list[dict[str, Any]]:
    items = list(items)
    out = []
    with Progress() as progress, ProcessPoolExecutor(workers) as pool:
        task = progress.add_task(label, total=len(items))
        for future in as_completed([pool.submit(fn, item) for item in items]):
            out.append(future.result())
            progress.advance(task)
    return out


def verify_plan(supported: pd.DataFrame) -> pd.DataFrame:
    """Supported architectures grouped by head signature, smallest first, with their rank in the group."""
    signature = supported["feature_layer"].map(lambda name: re.sub(r"\d+", "#", name))
    frame = supported.assign(signature=signature).sort_values("params_m")
    keys = ["module", "family", "signature", "activation", "head_type"]
    return frame.assign(rank=frame.groupby(keys).cumcount(), group=frame.groupby(keys).ngroup())


def markdown(frame: pd.DataFrame, seconds: float, command: str) -> str:
    cnn = frame[frame["convolutional"].fillna(False).astype(bool)]
    supported = cnn[cnn["status"] == "supported"]
    verified = frame[frame["verify"].isin(["pass", "FAIL", "error", "refused"])]
    lines = [
        "# flatscan coverage of timm architectures with pretrained weights",
        "",
        f"timm {timm.__version__}, flatscan {flatscan.__version__}, torch {torch.__version__}; "
        f"{len(frame)} architectures (`timm.list_models(pretrained=True)`, tags dropped); "
        f"{seconds / 60:.1f} min. Command: `{command}`.",
        "",
        "An architecture counts as convolutional when none of its modules is an attention block (channel gates such as "
        "SE/ECA/SK do not count as attention). Each model is taken in its inference form, as flatscan's loader does "
        "(`flatscan.inference_form`: multi-branch blocks fused, weight-standardised convolutions materialised). "
        "Detection builds each model on the meta device; `verify` builds it at "
        f"random init with randomised normalisation statistics and compares closed-form Tr(H_cc') with autograd on 16 "
        f"sampled filter pairs ({VERIFY_BATCH} images of {VERIFY_SIZE} px, float64, tolerance 1e-8), and checks by "
        f"data flow that no weight layer sits between the feature layer and the head. Within a group of architectures "
        f"with the same module, adapter, feature-layer path, activation and head type, the {VERIFIED_PER_GROUP} "
        f"smallest and every one up to {VERIFIED_UP_TO_PARAMS_M}M parameters are verified; larger siblings are "
        "skipped when those pass.",
        "",
        "## Summary",
        "",
        f"- convolutional architectures: {len(cnn)}; supported: {len(supported)} "
        f"({100 * len(supported) / max(len(cnn), 1):.1f}%); refused: {(cnn['status'] == 'refused').sum()}; "
        f"failed to build or detect: {(cnn['status'] == 'failed').sum()}",
        f"- all architectures: {len(frame)}; supported: {(frame['status'] == 'supported').sum()}",
        f"- verify: {(verified['verify'] == 'pass').sum()} pass / {len(verified)} verified "
        f"({(frame['verify'] == 'skipped').sum()} skipped as larger siblings of passing ones); "
        f"FAIL: {(verified['verify'] == 'FAIL').sum()}, error: {(verified['verify'] == 'error').sum()}, "
        f"refused at run time: {(verified['verify'] == 'refused').sum()}",
        "",
        "## Refusals by reason (convolutional architectures)",
        "",
    ]
    reasons = cnn[cnn["status"] != "supported"]["reason"].fillna("").map(reason_kind).value_counts()
    lines += ["| count | reason |", "|---:|---|"] + [f"| {n} | {r} |" for r, n in reasons.items()]
    lines += ["", "## Per timm module", ""]
    per_module = (
        frame.assign(
            cnn=frame["convolutional"].fillna(False).astype(bool),
            supported=frame["status"] == "supported",
            refused=frame["status"] == "refused",
            failed=frame["status"] == "failed",
            passed=frame["verify"] == "pass",
            not_passed=frame["verify"].isin(["FAIL", "error", "refused"]),
            skipped=frame["verify"] == "skipped",
        )
        .groupby("module")[["cnn", "supported", "refused", "failed", "passed", "not_passed", "skipped"]]
        .sum()
    )
    per_module.insert(0, "architectures", frame.groupby("module").size())
    lines.append(per_module.sort_values("architectures", ascending=False).to_markdown())
    problems = frame[frame["verify"].isin(["FAIL", "error", "refused"])]
    if len(problems):
        lines += ["", "## Verify problems", "", problems[["architecture", "verify", "reason"]].to_markdown(index=False)]
    return "\n".join(lines) + "\n"


def merged(out: Path, frame: pd.DataFrame, seconds: float, command: str) -> tuple[pd.DataFrame, float, str]:
    """The sweep in ``out`` with ``frame``'s architectures replaced; its time and command extended by this run's."""
    previous = pd.read_csv(out / "coverage.csv")
    header = re.search(r"; ([\d.]+) min\. Command: `(.*)`\.", (out / "coverage.md").read_text())
    if header is None:
        raise SystemExit(f"{out / 'coverage.md'} has no sweep header to merge into: run the full sweep first")
    rows = pd.concat([previous[~previous["architecture"].isin(frame["architecture"])], frame])
    return rows.sort_values("architecture"), seconds + 60 * float(header[1]), f"{header[2]}`, then `{command}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filter", default="*", help="fnmatch pattern of architecture names")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument(
        "--merge", action="store_true", help="replace only the filtered architectures' rows of an existing sweep"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    frame = pd.DataFrame(parallel(detect, architectures(args.filter), args.workers, "detect"))
    frame["module"] = frame["architecture"].map(module_map())
    plan = verify_plan(frame[frame["status"] == "supported"])
    first = plan[(plan["rank"] < VERIFIED_PER_GROUP) | (plan["params_m"] <= VERIFIED_UP_TO_PARAMS_M)]
    verified = pd.DataFrame(parallel(run_verify, first["architecture"], args.workers, "verify"))
    # Groups where a verified member did not pass get all their members verified.
    bad_groups = first[first["architecture"].isin(verified.loc[verified["verify"] != "pass", "architecture"])]["group"]
    rest = plan[~plan["architecture"].isin(first["architecture"]) & plan["group"].isin(bad_groups)]
    if len(rest):
        verified = pd.concat(
            [verified, pd.DataFrame(parallel(run_verify, rest["architecture"], args.workers, "verify"))]
        )
    frame = frame.merge(verified, on="architecture", how="left", suffixes=("", "_verify"))
    skipped = frame["architecture"].isin(plan["architecture"]) & frame["verify"].isna()
    frame.loc[skipped, "verify"] = "skipped"
    # Either column is absent when no row of its stage had a reason (e.g. a --filter without refusals).
    reason = frame.get("reason", pd.Series(None, index=frame.index, dtype=object))
    frame["reason"] = reason.fillna(frame["reason_verify"]) if "reason_verify" in frame else reason
    frame = frame.drop(columns=[c for c in ("reason_verify",) if c in frame]).sort_values("architecture")
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python scripts/coverage.py" + ("" if args.filter == "*" else f" --filter '{args.filter}'")
    seconds = time.perf_counter() - start
    if args.merge:
        frame, seconds, command = merged(args.out, frame, seconds, command + " --merge")
    frame.to_csv(args.out / "coverage.csv", index=False)
    (args.out / "coverage.md").write_text(markdown(frame, seconds, command))
    print(f"wrote {args.out / 'coverage.md'} and {args.out / 'coverage.csv'}")


if __name__ == "__main__":
    main()
