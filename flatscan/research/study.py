"""Does relative flatness predict generalisation? Measures of a trained zoo, rank-correlated with its generalisation.

For every model of a zoo (:mod:`flatscan.research.zoo`) the study measures, on the model's own training set (the
subset and noisy labels it was trained on) and on the test split:

- flatscan's exact measures of the feature layer: relative flatness kappa and Tr(H), and the classifier layer's
  kappa_W (:func:`flatscan.scan`);
- baselines (:mod:`flatscan.research.baselines`) on the training set: a Hutchinson estimate of the full-network Hessian
  trace, the sum of squared weights, the log product of spectral norms, Jiang et al.'s sharpness 1/sigma^2 and
  WeightWatcher's alpha_weighted.

Each measure is then rank-correlated (Kendall tau) with the generalisation gap (train - test accuracy; test - train
loss) and with the test accuracy: over all models, and granulated (Jiang et al. 2019, psi): tau within each group of
models that differ in one hyperparameter only, averaged over the groups of that hyperparameter, then over the
hyperparameters. Confidence intervals come from a seeded bootstrap over models.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import Tensor, nn

import flatscan
from flatscan.audit.ranks import kendall, percentile_interval, weighted_group_taus
from flatscan.errors import FlatscanError
from flatscan.io.data import DataOptions, open_eval_data
from flatscan.io.models import load_model
from flatscan.research import baselines
from flatscan.research.zoo import MANIFEST, TrainConfig, ZooModel, ZooSpec, read_manifest, torch_threads, training_set
from flatscan.scanner import resolve_device

CACHE = "study-measures.jsonl"
# Targets: larger means worse generalisation for the two gaps, better for the test accuracy.
TARGETS = {
    "gap_accuracy": "train accuracy - test accuracy",
    "gap_loss": "test loss - train loss",
    "test_accuracy": "test accuracy",
}
MEASURES = {
    "kappa_train": "relative flatness kappa of the feature layer (flatscan, exact), training set",
    "trace_train": "Tr(H) of the feature layer (flatscan, exact), training set",
    "kappa_w_train": "classifier kappa_W (flatscan), training set",
    "kappa_test": "relative flatness kappa of the feature layer, test set",
    "trace_test": "Tr(H) of the feature layer, test set",
    "kappa_w_test": "classifier kappa_W, test set",
    "hutchinson_trace": "Hutchinson estimate of the full-network Hessian trace, training set",
    "sum_squared_weights": "sum of squared Conv2d/Linear weights",
    "log_spectral_product": "log product of the spectral norms of the Conv2d/Linear weights (kernels reshaped)",
    "sharpness": "1/sigma^2 of the random-perturbation sharpness (Jiang et al. 2019), training set",
    "ww_alpha_weighted": "WeightWatcher alpha_weighted",
}
HYPERPARAMETERS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "seed")
_SCATTER = (
    "kappa_train",
    "trace_train",
    "kappa_w_train",
    "hutchinson_trace",
    "sharpness",
    "sum_squared_weights",
    "log_spectral_product",
    "ww_alpha_weighted",
)


@dataclass(frozen=True)
class StudyOptions:
    """How the measures are computed; all fields but ``device`` and ``threads`` key the cache of a model's row."""

    probes: int = 32  # Rademacher probes of the Hutchinson estimate
    sharpness_criterion: str = "error"  # training error (Jiang et al.) or cross_entropy
    sharpness_threshold: float = 0.1
    sharpness_samples: int = 8  # Gaussian draws per sigma
    sharpness_steps: int = 20  # bisection halvings at most
    sharpness_tolerance: float = 0.01  # stop once the increase is this close below the threshold
    sharpness_range: tuple[float, float] = (1e-4, 10.0)  # where the bisection looks for sigma
    weightwatcher: bool = True
    batch_size: int = 512
    seed: int = 0  # of the probes and perturbations
    device: str = "cpu"  # where the measures run ("auto": CUDA when available); recorded in each row
    # torch CPU threads while measuring: small models gain little from more, and on a busy machine two threads
    # waiting on each other were measured 100x slower than one
    threads: int = 1

    def key(self) -> str:
        """The options that decide the numbers (the device and threads only round them differently)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("device", "threads")}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class StudyResult:
    """One row per model (``table``) and the rank correlations of each measure with each target."""

    root: Path  # the zoo
    spec: ZooSpec  # as its manifest records it
    table: pd.DataFrame
    correlations: pd.DataFrame
    options: StudyOptions
    resamples: int
    seconds: float


def _split(spec: ZooSpec, model: nn.Module, split: str) -> tuple[Tensor, Tensor]:
    """A whole split in the model's preprocessing: what the zoo trained and evaluated on."""
    options = DataOptions(dataset=spec.dataset, split=split, batch_size=256, workers=0, seed=spec.data_seed)
    images, labels = zip(*open_eval_data(model, options).batches, strict=True)
    return torch.cat(images), torch.cat(labels)


def _batches(data: tuple[Tensor, Tensor], size: int, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    return [(x.to(device), y.to(device)) for x, y in zip(data[0].split(size), data[1].split(size), strict=True)]


@contextmanager
def _full_float32() -> Iterator[None]:
    """No TF32 on a GPU: float32 measures as on the CPU (TF32 keeps 10 mantissa bits)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def measure_model(
    model: nn.Module, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], options: StudyOptions
) -> dict[str, Any]:
    """Every measure of ``model`` (and its scanned loss and accuracy), with the seconds each group took."""
    device = resolve_device(options.device)
    with torch_threads(options.threads), _full_float32():
        row = _measure(model.to(device), train, test, options, device)
        row["device"] = str(device)
        model.to("cpu")
        start = time.perf_counter()
        alpha, reason = (
            baselines.weightwatcher_alpha_weighted(model)
            if options.weightwatcher
            else (math.nan, "not computed (--no-weightwatcher)")
        )
    row |= {"ww_alpha_weighted": alpha, "ww_reason": reason}
    row["seconds_weightwatcher"] = time.perf_counter() - start
    return row


def _measure(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    options: StudyOptions,
    device: torch.device,
) -> dict[str, Any]:
    train_batches = _batches(train, options.batch_size, device)
    test_batches = _batches(test, options.batch_size, device)
    row: dict[str, Any] = {}
    start = time.perf_counter()
    for split, batches in (("train", train_batches), ("test", test_batches)):
        result = flatscan.scan(model, batches, device=device)
        row |= {
            f"kappa_{split}": result.relative_flatness,
            f"kappa_{split}_se": result.relative_flatness_se,
            f"trace_{split}": result.trace,
            f"trace_{split}_se": result.trace_se,
            f"kappa_w_{split}": result.classifier_flatness,
            f"kappa_w_{split}_se": result.classifier_flatness_se,
            f"scanned_{split}_loss": result.loss,
            f"scanned_{split}_accuracy": result.accuracy,
        }
    row["feature_layer"] = result.feature_layer
    row["seconds_flatscan"] = time.perf_counter() - start

    start = time.perf_counter()
    estimate = baselines.hutchinson_trace(model, train_batches, options.probes, options.seed)
    row |= {"hutchinson_trace": estimate.trace, "hutchinson_trace_se": estimate.se}
    row["seconds_hutchinson"] = time.perf_counter() - start

    start = time.perf_counter()
    row["sum_squared_weights"] = baselines.sum_squared_weights(model)
    row["log_spectral_product"] = baselines.log_spectral_norm_product(model)
    row["seconds_norms"] = time.perf_counter() - start

    start = time.perf_counter()
    sharpness = baselines.sharpness_sigma(
        model,
        train_batches,
        threshold=options.sharpness_threshold,
        criterion=options.sharpness_criterion,
        samples=options.sharpness_samples,
        seed=options.seed,
        lower=options.sharpness_range[0],
        upper=options.sharpness_range[1],
        steps=options.sharpness_steps,
        tolerance=options.sharpness_tolerance,
    )
    row |= {
        "sharpness": sharpness.measure,
        "sharpness_sigma": sharpness.sigma,
        "sharpness_increase": sharpness.increase,
        "sharpness_bracketed": sharpness.bracketed,
    }
    row["seconds_sharpness"] = time.perf_counter() - start
    return row


def _check_reconstruction(entry: ZooModel, row: Mapping[str, Any]) -> None:
    """Refuse to go on when the training set rebuilt here (:func:`flatscan.research.zoo.training_set`) is not the one
    the zoo trained on."""
    # Batch sizes differ from the zoo's evaluation: logits may differ in the last bits, flipping a near tie.
    accuracy_ok = abs(row["scanned_train_accuracy"] - entry.train_accuracy) <= 2.5 / entry.n_train
    loss_ok = abs(row["scanned_train_loss"] - entry.train_loss) <= 1e-4 * (1 + abs(entry.train_loss))
    if not (accuracy_ok and loss_ok):
        raise FlatscanError(
            f"{entry.name}: the training set rebuilt from its seed gives loss {row['scanned_train_loss']:.6g} and "
            f"accuracy {row['scanned_train_accuracy']:.4f}, the zoo recorded {entry.train_loss:.6g} and "
            f"{entry.train_accuracy:.4f}: the zoo was trained by another version of flatscan; train it again"
        )


def _read_spec(root: Path) -> ZooSpec:
    path = root / MANIFEST
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))["spec"]
        return ZooSpec.from_dict(spec)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise FlatscanError(
            f"{path} is not a zoo manifest ({error}): train the zoo with `flatscan zoo train`"
        ) from None


def _read_cache(path: Path, key: str) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    rows = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by an interruption: that model is measured again
        if record.get("options") == key:
            rows[record["name"]] = record["row"]
    return rows


def measure_zoo(
    root: str | Path,
    options: StudyOptions = StudyOptions(),
    *,
    on_model: Callable[[str, int, int, bool], None] | None = None,
) -> pd.DataFrame:
    """One row per model of the zoo in ``root``: its hyperparameters, what the zoo recorded, and every measure.

    Rows are appended to ``root``/study-measures.jsonl as each model finishes and reused by a later run with the
    same options, so an interrupted study resumes. ``on_model(name, i, n, reused)`` follows the i-th of n models.
    """
    root = Path(root).expanduser().resolve()
    spec = _read_spec(root)
    entries = list({entry.name: entry for entry in read_manifest(root)}.values())
    if not entries:
        raise FlatscanError(f"{root} has no trained models in its manifest: train the zoo with `flatscan zoo train`")
    cache_path, key = root / CACHE, options.key()
    cached = _read_cache(cache_path, key)
    splits: dict[str, tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]] = {}
    rows = []
    for i, entry in enumerate(entries, 1):
        row = cached.get(entry.name)
        if row is None:
            model = load_model(str(root / entry.name)).model
            config_key = json.dumps(model.pretrained_cfg.get("input_size"))  # type: ignore[union-attr, operator]
            if config_key not in splits:  # every zoo model declares the same preprocessing: read the data once
                splits[config_key] = (_split(spec, model, spec.train_split), _split(spec, model, spec.test_split))
            train, test = splits[config_key]
            row = measure_model(model, training_set(entry.config, spec, train), test, options)
            _check_reconstruction(entry, row)
            with cache_path.open("a", encoding="utf-8") as cache:
                cache.write(json.dumps({"name": entry.name, "options": key, "row": row}) + "\n")
        rows.append({**entry.to_dict(), **row})
        if on_model is not None:
            on_model(entry.name, i, len(entries), entry.name in cached)
    table = pd.DataFrame(rows)
    table["model_args"] = table["model_args"].map(json.dumps)
    table["gap_accuracy"] = table["train_accuracy"] - table["test_accuracy"]
    table["gap_loss"] = table["test_loss"] - table["train_loss"]
    return table


def _group_ids(frame: pd.DataFrame, others: Sequence[str]) -> np.ndarray:
    """One integer per distinct combination of the ``others`` columns (all models in one group when empty)."""
    if not others:
        return np.zeros(len(frame), dtype=int)
    keys = frame[list(others)].astype(str).agg("\x1f".join, axis=1)
    return pd.factorize(keys)[0]


def varied_hyperparameters(table: pd.DataFrame, candidates: Sequence[str] = HYPERPARAMETERS) -> list[str]:
    """The hyperparameter columns that take more than one value in ``table``."""
    return [name for name in candidates if name in table.columns and table[name].astype(str).nunique() > 1]


def granulated_tau(
    table: pd.DataFrame, measure: str, target: str, hyperparameters: Sequence[str]
) -> tuple[float, dict[str, float]]:
    """Jiang et al.'s psi: for each hyperparameter, the mean Kendall tau (scipy) over the groups of models equal in
    every other hyperparameter (groups with a defined tau, i.e. two models not tied in either variable); psi is the
    mean of these over the hyperparameters that have such a group. Rows with a NaN in either column are left out."""
    frame = table.dropna(subset=[measure, target])
    per_hyperparameter = {}
    for name in hyperparameters:
        others = [other for other in hyperparameters if other != name]
        taus = []
        for _, rows in frame.groupby(_group_ids(frame, others)):
            if len(rows) >= 2:
                tau = kendall(rows[measure].to_numpy(float), rows[target].to_numpy(float))
                if not math.isnan(tau):
                    taus.append(tau)
        per_hyperparameter[name] = float(np.mean(taus)) if taus else math.nan
    defined = [value for value in per_hyperparameter.values() if not math.isnan(value)]
    return (float(np.mean(defined)) if defined else math.nan), per_hyperparameter


def _bootstrap_psi(
    x: np.ndarray, y: np.ndarray, frame: pd.DataFrame, hyperparameters: Sequence[str], weights: np.ndarray
) -> np.ndarray:
    """psi for each bootstrap row of ``weights``: per hyperparameter the mean tau over defined groups, then the
    mean over hyperparameters with one."""
    per_hyperparameter = []
    for name in hyperparameters:
        groups = _group_ids(frame, [other for other in hyperparameters if other != name])
        taus = weighted_group_taus(x, y, groups, weights)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample without a defined group: NaN
            per_hyperparameter.append(np.nanmean(taus, axis=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack(per_hyperparameter, axis=1), axis=1)


def correlations(
    table: pd.DataFrame,
    measures: Sequence[str],
    targets: Sequence[str] = tuple(TARGETS),
    hyperparameters: Sequence[str] | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Kendall tau (overall) and granulated psi of each measure with each target, with percentile bootstrap 95%
    intervals over ``resamples`` resamples of the models (seeded; the same resamples for every measure and target,
    restricted to the models where both are defined). Columns ``psi_<hyperparameter>`` hold the per-hyperparameter
    means."""
    hyperparameters = varied_hyperparameters(table) if hyperparameters is None else list(hyperparameters)
    table = table.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    all_weights = rng.multinomial(len(table), np.full(len(table), 1 / len(table)), size=resamples).astype(float)
    records = []
    for measure in measures:
        for target in targets:
            defined = table[[measure, target]].notna().all(axis=1).to_numpy()
            frame = table[defined].reset_index(drop=True)
            x, y = frame[measure].to_numpy(float), frame[target].to_numpy(float)
            record: dict[str, Any] = {"measure": measure, "target": target, "n": len(frame)}
            if len(frame) < 2:
                records.append(record)
                continue
            weights = all_weights[:, defined]
            tau = kendall(x, y)
            boot_tau = weighted_group_taus(x, y, np.zeros(len(frame), dtype=int), weights)[:, 0]
            psi, per_hyperparameter = granulated_tau(frame, measure, target, hyperparameters)
            boot_psi = _bootstrap_psi(x, y, frame, hyperparameters, weights)
            record |= dict(
                zip(("tau", "tau_ci_low", "tau_ci_high"), (tau, *percentile_interval(boot_tau)), strict=True)
            )
            record |= dict(
                zip(("psi", "psi_ci_low", "psi_ci_high"), (psi, *percentile_interval(boot_psi)), strict=True)
            )
            record |= {f"psi_{name}": value for name, value in per_hyperparameter.items()}
            records.append(record)
    return pd.DataFrame(records)


def run_study(
    root: str | Path,
    options: StudyOptions = StudyOptions(),
    *,
    resamples: int = 1000,
    on_model: Callable[[str, int, int, bool], None] | None = None,
) -> StudyResult:
    """Measure every model of the zoo in ``root`` and correlate the measures with its generalisation."""
    start = time.perf_counter()
    if options.weightwatcher:
        baselines.require_weightwatcher()  # before any model is measured
    root = Path(root).expanduser().resolve()
    table = measure_zoo(root, options, on_model=on_model)
    measures = [m for m in MEASURES if m in table.columns and table[m].notna().any()]
    result = correlations(table, measures, resamples=resamples, seed=options.seed)
    return StudyResult(root, _read_spec(root), table, result, options, resamples, time.perf_counter() - start)


def _scatter(table: pd.DataFrame, target: str, path: Path) -> None:
    """Small multiples: each headline measure against ``target``, one colour per family, crosses for the models
    trained with label noise."""
    shown = [m for m in _SCATTER if m in table.columns and table[m].notna().any()]
    columns = 4
    rows = math.ceil(len(shown) / columns)
    figure = Figure(figsize=(2.6 * columns, 2.2 * rows), layout="constrained")
    colours = colormaps["tab10"]
    families = sorted(table["family"].astype(str).unique())
    for k, measure in enumerate(shown):
        axes = figure.add_subplot(rows, columns, k + 1)
        for i, family in enumerate(families):
            for noisy, marker in ((False, "o"), (True, "x")):
                points = table[(table["family"].astype(str) == family) & ((table["label_noise"] > 0) == noisy)]
                label = f"{family}{', label noise' if noisy else ''}"
                axes.scatter(points[measure], points[target], s=8, marker=marker, color=colours(i % 10), label=label)
        values = table[measure].dropna()
        if len(values) and (values > 0).all() and values.max() / values.min() > 100:
            axes.set_xscale("log")  # spans orders of magnitude
        axes.set_xlabel(measure, fontsize=7)
        axes.set_ylabel(target, fontsize=7)
        axes.tick_params(labelsize=6)
        if k == 0:
            axes.legend(fontsize=6)
    figure.savefig(path, format="png", dpi=60)


def _with_interval(value: float, low: float, high: float) -> str:
    if pd.isna(value):
        return "-"
    return f"{value:+.2f} [{low:+.2f}, {high:+.2f}]"


def _target_table(correlations: pd.DataFrame, target: str) -> str:
    """Markdown: per measure, tau and psi with intervals and the per-hyperparameter psi."""
    rows = correlations[correlations["target"] == target]
    shown = pd.DataFrame({"measure": rows["measure"], "n": rows["n"]})
    shown["tau [95% CI]"] = [_with_interval(r.tau, r.tau_ci_low, r.tau_ci_high) for r in rows.itertuples()]
    shown["psi [95% CI]"] = [_with_interval(r.psi, r.psi_ci_low, r.psi_ci_high) for r in rows.itertuples()]
    for column in [c for c in rows.columns if c.startswith("psi_") and c not in ("psi_ci_low", "psi_ci_high")]:
        shown[column.removeprefix("psi_")] = rows[column].map(lambda v: "-" if pd.isna(v) else f"{v:+.2f}")
    return shown.to_markdown(index=False)


def _weightwatcher_version() -> str:
    try:
        return importlib.metadata.version("weightwatcher")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _settings(result: StudyResult) -> str:
    table, options = result.table, result.options
    unbracketed = int((~table["sharpness_bracketed"].astype(bool)).sum())
    missing = table.loc[table["ww_alpha_weighted"].isna(), "ww_reason"].dropna().value_counts()
    ww_note = "; ".join(f"{count} model(s): {reason}" for reason, count in missing.items())
    low, high = options.sharpness_range
    lines = [
        "Training-set measures use each model's own training subset with the labels it was trained on (label noise "
        "included), rebuilt from its seed and checked against the zoo's recorded train loss and accuracy; test-set "
        "measures use the test split. Every model in eval mode (BatchNorm running statistics, no dropout).",
        f"Hutchinson (PyHessian-style): {options.probes} Rademacher probes per model over all trainable parameters "
        "(BatchNorm affine included); Hessian-vector products by double backpropagation of the mean training "
        "cross-entropy; `hutchinson_trace_se` in the CSV is the standard error over the probes.",
        f"Sharpness (Jiang et al. 2019): the largest sigma whose perturbation u ~ N(0, sigma^2 I) of every parameter "
        f"raises the mean training {options.sharpness_criterion} by at most {options.sharpness_threshold}, with "
        f"{options.sharpness_samples} draws per sigma (the same draws at every sigma), bisection in log sigma over "
        f"[{low:g}, {high:g}] (at most {options.sharpness_steps} halvings, stopped within "
        f"{options.sharpness_tolerance} below the threshold); the measure is 1/sigma^2. Crossing outside the range: "
        f"{unbracketed} model(s).",
        "Norms: `sum_squared_weights` over the Conv2d and Linear weights (no biases, no BatchNorm); "
        "`log_spectral_product` sums the log of the largest singular value of each Conv2d kernel reshaped to the "
        "(out, in/groups*kh*kw) matrix (not the operator norm of the convolution) and of each Linear weight; "
        "BatchNorm is not folded into the kernels.",
        f"WeightWatcher {_weightwatcher_version()}: `WeightWatcher(model=...).analyze()` with its defaults, "
        "`get_summary()['alpha_weighted']`" + (f"; NaN for {ww_note}" if ww_note else "") + ".",
        "Kendall tau: `scipy.stats.kendalltau` (tau-b) over all models. psi (Jiang et al. 2019's granulated tau): for "
        "each varied hyperparameter, the mean tau over the groups of models equal in every other hyperparameter "
        "(the per-model seed is not a hyperparameter), then the mean over hyperparameters; the per-hyperparameter "
        f"means are the last columns. 95% intervals: percentile bootstrap over {result.resamples} resamples of the "
        f"models (seed {options.seed}; the same resamples for every measure).",
        "Sign: tau > 0 with a gap means a larger measure goes with a larger gap (what a sharpness/flatness measure "
        "should show); with test accuracy, a predictive sharpness measure has tau < 0.",
    ]
    return "\n".join(f"- {line}" for line in lines)


def write_study(
    result: StudyResult, out_dir: str | Path = "reports", command: str = "", stem: str = "study"
) -> list[Path]:
    """``stem``.md (tables, plots, settings, the commands that reproduce it), ``stem``.csv (one row per model),
    ``stem``_spec.json (the zoo's spec, for ``flatscan zoo train --spec``) and the scatter plots
    ``stem``_<target>.png in ``out_dir``; returns their paths. ``command`` is the study's own command line."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = result.table
    md_path, csv_path, spec_path = out_dir / f"{stem}.md", out_dir / f"{stem}.csv", out_dir / f"{stem}_spec.json"
    table.to_csv(csv_path, index=False)
    spec_path.write_text(json.dumps(result.spec.to_dict(), indent=2) + "\n", encoding="utf-8")
    pngs = [out_dir / f"{stem}_{target}.png" for target in ("gap_accuracy", "test_accuracy")]
    for png, target in zip(pngs, ("gap_accuracy", "test_accuracy"), strict=True):
        _scatter(table, target, png)
    families = ", ".join(f"{n} {f}" for f, n in table["family"].value_counts().sort_index().items())
    hyperparameters = varied_hyperparameters(table)
    levels = {name: sorted(table[name].unique()) for name in hyperparameters}
    design = "a full grid" if len(table) == math.prod(len(v) for v in levels.values()) else "a sample of a grid"
    varied = ", ".join(f"{name} ({', '.join(map(str, values))})" for name, values in levels.items())
    train = f"flatscan zoo train {result.root} --spec {spec_path}"
    seconds = table[[c for c in table.columns if c.startswith("seconds_")]].sum()
    devices = ", ".join(f"{device} ({n} models)" for device, n in table["device"].value_counts().items())
    timings = [f"training the zoo (CPU, recorded by `zoo train`): {table['seconds'].sum():.0f} s"]
    timings += [
        f"{name.removeprefix('seconds_')} ({'cpu' if name == 'seconds_weightwatcher' else devices}): {value:.0f} s"
        for name, value in seconds.items()
    ]
    timings.append(f"this run of the study (models measured in an earlier run are reused): {result.seconds:.0f} s")
    sections = [
        "# Does relative flatness predict generalisation?",
        f"{len(table)} models ({families}) trained on scikit-learn digits ({result.spec.img_size} px), {design} "
        f"over {varied}; training subsets of {table['n_train'].min()} to {table['n_train'].max()} images, test "
        f"accuracy {table['test_accuracy'].min():.3f} to {table['test_accuracy'].max():.3f}, accuracy gap "
        f"{table['gap_accuracy'].min():+.3f} to {table['gap_accuracy'].max():+.3f}. Numbers as measured.",
        "Reproduce with:\n\n```\n" + "\n".join(line for line in (train, command) if line) + "\n```",
        *(
            f"## Kendall tau with {target} ({description})\n\n{_target_table(result.correlations, target)}"
            for target, description in TARGETS.items()
        ),
        "## Measures\n\n" + "\n".join(f"- `{m}`: {d}" for m, d in MEASURES.items()),
        f"## Settings\n\n{_settings(result)}",
        "## Plots\n\n" + "\n\n".join(f"![{png.stem}]({png.name})" for png in pngs),
        "## Timings (sums over models)\n\n" + "\n".join(f"- {line}" for line in timings),
    ]
    md_path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return [md_path, csv_path, spec_path, *pngs]
