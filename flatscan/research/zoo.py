"""Model zoos: small timm CNNs trained with PGDL-style hyperparameter variation, saved as a local organisation.

A zoo is a directory of timm/Hub-format model folders, ``<zoo>/<name>/{config.json, model.safetensors, README.md}``,
that ``flatscan org <zoo>`` audits like a Hub organisation; ``manifest.json`` and ``manifest.csv`` at its root record
each model's hyperparameters and its train/test loss and accuracy. Every model is a stock timm architecture rebuilt
from ``config.json`` (``architecture`` + ``model_args``, which timm passes to ``create_model``), so timm alone loads
it too. Families (each measured by a flatscan adapter):

- ``resnet``: timm ResNet with BasicBlocks (``resnet18`` with ``layers``, ``channels``, a deep stem);
- ``efficientnet``: timm's test EfficientNet (``test_efficientnet``: conv, edge and inverted-residual blocks with SE,
  ``conv_head``) with ``channel_multiplier`` / ``depth_multiplier``;
- ``mobilenetv1``: MobileNet-V1, a plain stack of depthwise-separable conv-BN-act layers without skip connections
  (EfficientNet class; ``mobilenetv1_100`` with ``depth_multiplier``): timm's builders fix its width (1.0).

All keep an output stride of 8, so the feature layer sees ``img_size / 8`` pixels a side. A :class:`ZooSpec` is a
seeded sample of a hyperparameter grid; the same spec gives the same zoo, bit for bit on one machine: each model
is trained single-process on CPU with ``torch.use_deterministic_algorithms``, a fixed number of threads and its own
seed (initialisation, data subset, label noise, batch order, augmentation, dropout). Training reads the data through
:func:`flatscan.io.data.open_eval_data` in the models' own preprocessing, so any source flatscan evaluates on (digits,
a Hugging Face dataset, an image folder, parquet files) can train a zoo; it is held in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from timm.models import save_for_hf
from timm.optim import create_optimizer_v2
from torch import nn

import flatscan
from flatscan.errors import FlatscanError
from flatscan.io.data import DIGITS, DataOptions, open_eval_data

MANIFEST = "manifest.json"
MANIFEST_CSV = "manifest.csv"
STORE = "flatscan-results.sqlite"
ACTIVATIONS = ("relu", "silu")
# The preprocessing every zoo model declares (and is trained in): the image resized to img_size, no crop.
_DATA_CONFIG = {"crop_pct": 1.0, "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
# Entries of the base architecture's pretrained config that describe its ImageNet weights, not a zoo model.
_NOT_OURS = ("tag", "test_input_size", "test_crop_pct", "pool_size", "license", "paper_ids", "origin_url", "notes")
# The training recipe's version, part of every model name: bumped when training changes, so cached zoos retrain.
_RECIPE = 1


@dataclass(frozen=True)
class TrainConfig:
    """One zoo model: its family, size and training hyperparameters (``width`` and ``depth`` are family-relative)."""

    family: str  # resnet | efficientnet | mobilenetv1
    width: float = 1.0  # resnet: channels (16, 32, 64, 128) x width; efficientnet: channel_multiplier; mobilenetv1: 1
    depth: int = 1  # resnet: blocks per stage; efficientnet: depth_multiplier; mobilenetv1: depth_multiplier / 2
    lr: float = 0.05  # peak learning rate (linear warm-up, cosine decay), SGD with Nesterov momentum 0.9
    batch_size: int = 64
    weight_decay: float = 5e-4  # not on biases and norm parameters (timm's optimizer factory)
    dropout: float = 0.0  # before the classifier
    label_noise: float = 0.0  # fraction of training labels replaced by another class
    train_fraction: float = 1.0  # fraction of the training split kept (a seeded subset)
    augment: bool = False  # random rotation (10 deg), scale (10 %) and shift (1/8 side)
    activation: str = "relu"
    epochs: int = 4  # training length, in passes over the whole training split (a subset is repeated)
    seed: int = 0

    def check(self) -> None:
        """Raise a FlatscanError naming the first value out of range."""
        problems = [
            (self.family not in FAMILIES, f"family {self.family!r} is not one of {', '.join(FAMILIES)}"),
            (self.activation not in ACTIVATIONS, f"activation {self.activation!r} is not one of relu, silu"),
            (self.width <= 0 or self.depth < 1, f"width {self.width} and depth {self.depth} must be positive"),
            (self.lr <= 0 or self.weight_decay < 0, f"lr {self.lr} must be > 0, weight_decay {self.weight_decay} >= 0"),
            (self.batch_size < 1 or self.epochs < 1, f"batch_size {self.batch_size} and epochs {self.epochs} >= 1"),
            (not 0 <= self.dropout < 1, f"dropout {self.dropout} must be in [0, 1)"),
            (not 0 <= self.label_noise < 1, f"label_noise {self.label_noise} must be in [0, 1)"),
            (not 0 < self.train_fraction <= 1, f"train_fraction {self.train_fraction} must be in (0, 1]"),
            (self.family == "mobilenetv1" and self.width != 1, "mobilenetv1 has width 1.0 only"),
        ]
        for bad, message in problems:
            if bad:
                raise FlatscanError(f"zoo model {message}: fix the zoo spec")

    def architecture(self) -> tuple[str, dict[str, Any]]:
        """The timm architecture and its ``model_args`` (what config.json records for timm to rebuild it)."""
        return FAMILIES[self.family](self)


def _resnet(config: TrainConfig) -> tuple[str, dict[str, Any]]:
    # resnet18 fixes block=BasicBlock only; a deep stem is the one whose width is set (the 7x7 stem is 64 wide).
    channels = [max(8, round(c * config.width)) for c in (16, 32, 64, 128)]
    stem = max(8, round(8 * config.width))
    args = {"layers": [config.depth] * 4, "channels": channels, "stem_width": stem, "stem_type": "deep"}
    return "resnet18", {**args, "output_stride": 8, "act_layer": config.activation}


def _efficientnet(config: TrainConfig) -> tuple[str, dict[str, Any]]:
    args = {"channel_multiplier": config.width, "depth_multiplier": float(config.depth)}
    return "test_efficientnet", {**args, "output_stride": 8, "act_layer": config.activation}


def _mobilenetv1(config: TrainConfig) -> tuple[str, dict[str, Any]]:
    args = {"depth_multiplier": config.depth / 2, "output_stride": 8, "act_layer": config.activation}
    return "mobilenetv1_100", args


FAMILIES: dict[str, Callable[[TrainConfig], tuple[str, dict[str, Any]]]] = {
    "resnet": _resnet,
    "efficientnet": _efficientnet,
    "mobilenetv1": _mobilenetv1,
}
# Hyperparameters a family cannot vary: the value its models get whatever the grid says.
_FIXED = {"mobilenetv1": {"width": 1.0}}
_GRID_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "seed")


@dataclass(frozen=True)
class ZooSpec:
    """A seeded sample of ``size`` configurations from ``grid`` (hyperparameter -> candidate values); ``size=None``
    takes every combination. Families take turns; the other values are drawn uniformly, with a seed per model, so a
    larger ``size`` keeps the models of a smaller one."""

    grid: Mapping[str, tuple[Any, ...]]
    size: int | None = 10
    seed: int = 0
    img_size: int = 16
    dataset: str = DIGITS
    train_split: str = "train"
    test_split: str = "test"
    num_classes: int = 10
    data_seed: int = 0  # of the digits train/test partition: audit with the same --seed (flatscan's default, 0)
    # torch threads while training: bit-identical results hold for one thread count; tiny models gain little from
    # more, and lose much when other processes share the cores.
    threads: int = 1

    def configs(self) -> list[TrainConfig]:
        """The configurations of the zoo, in order (each checked)."""
        unknown = set(self.grid) - set(_GRID_KEYS)
        if unknown:
            raise FlatscanError(
                f"zoo spec grid has unknown keys {sorted(unknown)}: use some of {', '.join(_GRID_KEYS)}"
            )
        empty = [key for key, values in self.grid.items() if not values]
        if empty or (self.size is not None and self.size < 1):
            raise FlatscanError(f"zoo spec needs size >= 1 and values for every grid key (empty: {empty})")
        rng = np.random.default_rng(self.seed)
        grid = {key: list(values) for key, values in self.grid.items()}
        families = grid.pop("family", ["resnet"])
        if self.size is None:
            combos: Iterator[dict[str, Any]] = (
                {"family": family, **dict(zip(grid, values, strict=True))}
                for family in families
                for values in itertools.product(*grid.values())
            )
        else:
            combos = (
                {"family": families[i % len(families)], **{k: v[rng.integers(len(v))] for k, v in grid.items()}}
                for i in range(self.size)
            )
        configs = []
        for combo in combos:  # lazily: a model's seed is drawn right after its values, so a prefix stays the same
            combo.update(_FIXED.get(combo["family"], {}))
            values = {key: value.item() if isinstance(value, np.generic) else value for key, value in combo.items()}
            config = TrainConfig(**values, seed=int(rng.integers(2**31)))
            config.check()
            configs.append(config)
        return configs

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "grid": {key: list(values) for key, values in self.grid.items()}}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], base: ZooSpec | None = None) -> ZooSpec:
        """A spec from JSON-like ``values``; missing fields (and grid keys) keep those of ``base``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise FlatscanError(
                f"zoo spec has unknown fields {sorted(unknown)}: use some of {', '.join(sorted(names))}"
            )
        merged = {**(base.to_dict() if base else {}), **values}
        grid = {**(base.grid if base else {}), **dict(values.get("grid", {}))}
        merged["grid"] = {key: tuple(v) if isinstance(v, (list, tuple)) else (v,) for key, v in grid.items()}
        return cls(**merged)


DEMO = ZooSpec(
    grid={
        # MobileNet-V1 (1024 wide) costs several times a small ResNet: one model in five.
        "family": ("resnet", "efficientnet", "resnet", "efficientnet", "mobilenetv1"),
        "width": (0.5, 1.0),
        "lr": (0.02, 0.1),
        "weight_decay": (0.0, 5e-4),
        "dropout": (0.0, 0.2),
        "label_noise": (0.0, 0.2, 0.4),
        "train_fraction": (0.25, 0.5, 1.0),
        "augment": (False, True),
        "activation": ACTIVATIONS,
        "epochs": (4,),
    },
    size=10,
)
STUDY = ZooSpec(
    grid={
        "family": ("resnet", "efficientnet", "mobilenetv1"),
        "width": (0.5, 1.0, 2.0),
        "depth": (1, 2),
        "lr": (0.02, 0.05, 0.1),
        "batch_size": (32, 64, 128),
        "weight_decay": (0.0, 1e-4, 1e-3),
        "dropout": (0.0, 0.25),
        "label_noise": (0.0, 0.1, 0.3),
        "train_fraction": (0.25, 0.5, 1.0),
        "augment": (False, True),
        "activation": ACTIVATIONS,
        "epochs": (2, 4, 8),
    },
    size=64,
)
PRESETS = {"demo": DEMO, "study": STUDY}


def load_spec(preset: str = "study", path: str | Path | None = None, **overrides: Any) -> ZooSpec:
    """The ``preset`` spec, with the fields of the JSON file ``path`` (grid keys merge into the preset's grid), then
    the ``overrides`` that are not None (``epochs`` gives every model that training length)."""
    if preset not in PRESETS:
        raise FlatscanError(f"unknown zoo preset {preset!r}: use one of {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    if path is not None:
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise FlatscanError(
                f"cannot read the zoo spec {path} ({error}): give a JSON object of ZooSpec fields"
            ) from None
        if not isinstance(values, dict):
            raise FlatscanError(f'the zoo spec {path} is not a JSON object: write {{"size": 64, "grid": {{...}}}}')
        spec = ZooSpec.from_dict(values, spec)
    epochs = overrides.pop("epochs", None)
    if epochs is not None:
        overrides["grid"] = {**spec.grid, "epochs": (epochs,)}
    return dataclasses.replace(spec, **{key: value for key, value in overrides.items() if value is not None})


@dataclass(frozen=True)
class ZooModel:
    """A trained zoo model: its folder name, configuration and what training measured."""

    name: str
    config: TrainConfig
    architecture: str
    model_args: dict[str, Any]
    params: int
    n_train: int
    train_loss: float  # on the training subset with the labels it was trained on (noisy ones included)
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        return {"name": values.pop("name"), **values.pop("config"), **values}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ZooModel:
        config_keys = {f.name for f in dataclasses.fields(TrainConfig)}
        config = TrainConfig(**{k: v for k, v in values.items() if k in config_keys})
        return cls(config=config, **{k: v for k, v in values.items() if k not in config_keys})


def model_name(config: TrainConfig, spec: ZooSpec) -> str:
    """``family-<hash>``: the hash covers everything that determines the weights, so a name is a cache key."""
    data = {k: v for k, v in spec.to_dict().items() if k not in ("grid", "size", "seed")}
    key = {"config": dataclasses.asdict(config), "data": data, "timm": timm.__version__, "recipe": _RECIPE}
    text = json.dumps(key, sort_keys=True)
    return f"{config.family}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def build_model(config: TrainConfig, spec: ZooSpec) -> nn.Module:
    """The untrained timm model of ``config`` (random init from the global torch RNG), declaring the zoo's
    preprocessing; refused here, before training, if no flatscan adapter measures it."""
    architecture, model_args = config.architecture()
    overlay = {**_DATA_CONFIG, "input_size": (3, spec.img_size, spec.img_size), **dict.fromkeys(_NOT_OURS)}
    model = timm.create_model(
        architecture,
        num_classes=spec.num_classes,
        drop_rate=config.dropout,
        pretrained_cfg_overlay=overlay,
        **model_args,
    )
    flatscan.describe(model)
    return model


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` inside the block, restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _reproducible(threads: int) -> Iterator[None]:
    """Deterministic kernels, a fixed thread count and a private RNG state, restored afterwards."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch_threads(threads), torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _tensors(model: nn.Module, spec: ZooSpec, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split, preprocessed as the model declares (the transform flatscan evaluates with)."""
    options = DataOptions(dataset=spec.dataset, split=split, batch_size=256, workers=0, seed=spec.data_seed)
    images, labels = zip(*open_eval_data(model, options).batches, strict=True)
    return torch.cat(images), torch.cat(labels)


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random rotation (+-10 deg), scale (+-10 %) and shift (+-1/8 of the side) per image."""
    n = len(images)
    angle = (2 * torch.rand(n, generator=generator) - 1) * math.radians(10)
    scale = 1 + (2 * torch.rand(n, generator=generator) - 1) * 0.1
    shift = (2 * torch.rand(n, 2, generator=generator) - 1) * 0.25  # grid coordinates span 2 per side
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="border", align_corners=False)


def _warmup_cosine(step: int, steps: int) -> float:
    """The learning rate factor at ``step``: linear warm-up over the first fifth, then cosine decay towards 0."""
    warmup = max(1, steps // 5)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.no_grad()
def _evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy in eval mode."""
    model.eval()
    logits = torch.cat([model(batch) for batch in images.split(256)])
    loss = F.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(1) == labels).double().mean().item()


def training_set(
    config: TrainConfig,
    spec: ZooSpec,
    train: tuple[torch.Tensor, torch.Tensor],
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded subset of the ``train`` split that ``config`` trains on, with its noisy labels: the first draws of
    ``generator`` (default: a new one seeded with ``config.seed``, as :func:`train_model` draws them)."""
    generator = generator or torch.Generator().manual_seed(config.seed)
    images, labels = train
    keep = torch.randperm(len(labels), generator=generator)[: max(1, round(config.train_fraction * len(labels)))]
    images, labels = images[keep], labels[keep].clone()
    noisy = torch.randperm(len(labels), generator=generator)[: round(config.label_noise * len(labels))]
    offset = torch.randint(1, spec.num_classes, (len(noisy),), generator=generator)
    labels[noisy] = (labels[noisy] + offset) % spec.num_classes  # always another class
    return images, labels


def train_model(
    config: TrainConfig,
    spec: ZooSpec,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    on_step: Callable[[int, int], None] | None = None,
) -> tuple[nn.Module, dict[str, float]]:
    """Train ``config`` on the ``train`` split: a seeded subset with seeded label noise, SGD with Nesterov momentum,
    warm-up then cosine learning rate; returns the eval-mode model and its train/test loss and accuracy.
    ``on_step(step, steps)`` follows each optimiser step."""
    config.check()
    with _reproducible(spec.threads):
        torch.manual_seed(config.seed)
        model = build_model(config, spec)
        generator = torch.Generator().manual_seed(config.seed)
        images, labels = training_set(config, spec, train, generator)
        # Epochs of the whole split: a subset is passed over more often, so every training-set size gets as many steps.
        steps = config.epochs * math.ceil(len(train[1]) / config.batch_size)
        optimizer = create_optimizer_v2(model, "sgd", lr=config.lr, weight_decay=config.weight_decay, momentum=0.9)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(_warmup_cosine, steps=steps))
        passes = (torch.randperm(len(labels), generator=generator).split(config.batch_size) for _ in itertools.count())
        model.train()
        for step, batch in enumerate(itertools.islice(itertools.chain.from_iterable(passes), steps), 1):
            inputs = _augment(images[batch], generator) if config.augment else images[batch]
            loss = F.cross_entropy(model(inputs), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if on_step is not None:
                on_step(step, steps)
        train_loss, train_accuracy = _evaluate(model, images, labels)
        test_loss, test_accuracy = _evaluate(model, *test)
    metrics = {"train_loss": train_loss, "train_accuracy": train_accuracy, "n_train": len(labels)}
    return model, {**metrics, "test_loss": test_loss, "test_accuracy": test_accuracy}


def _card(entry: ZooModel, spec: ZooSpec) -> ModelCard:
    """A Hub model card whose model-index holds the test accuracy (a fraction), with the hyperparameters below."""
    dataset = "scikit-learn digits" if spec.dataset == DIGITS else spec.dataset
    data = ModelCardData(
        library_name="timm",
        pipeline_tag="image-classification",
        tags=["image-classification", "timm", "flatscan-zoo"],
        model_name=entry.name,
        eval_results=[
            EvalResult(
                task_type="image-classification",
                dataset_type=spec.dataset,
                dataset_name=dataset,
                dataset_split=spec.test_split,
                metric_type="accuracy",
                metric_name="top-1 accuracy",
                metric_value=round(entry.test_accuracy, 6),
            )
        ],
    )
    rows = "\n".join(f"| {key} | {_cell(value)} |" for key, value in entry.to_dict().items() if key != "name")
    return ModelCard(
        f"---\n{data.to_yaml()}\n---\n\n# {entry.name}\n\n"
        f"A `{entry.architecture}` (timm) trained by `flatscan zoo train` on {dataset} ({spec.train_split} split, "
        f"{spec.img_size} px) for studying flatness against generalisation; not a general-purpose model.\n\n"
        f"| setting | value |\n|---|---|\n{rows}\n"
    )


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, dict) else str(value)


def _save(model: nn.Module, entry: ZooModel, spec: ZooSpec, folder: Path) -> None:
    """Write the folder next to its final place, then move it there: a listing never sees half a model."""
    staging = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    # model_args given explicitly too: older timm versions do not record create_model's arguments themselves.
    model_args = {**entry.model_args, "num_classes": spec.num_classes}
    save_for_hf(model, str(staging), model_args=model_args, safe_serialization=True)
    _card(entry, spec).save(staging / "README.md")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def _write_manifest(root: Path, spec: ZooSpec, entries: list[ZooModel]) -> None:
    """manifest.json (portable: folder names) and manifest.csv (``model`` the folder's absolute path as flatscan org
    names it, ``top1`` the test accuracy in percent: a ``flatscan leaderboard --reported`` file)."""
    manifest = {"spec": spec.to_dict(), "models": [entry.to_dict() for entry in entries]}
    staging = root / f".{MANIFEST}.partial"
    staging.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    staging.replace(root / MANIFEST)
    table = pd.DataFrame([entry.to_dict() for entry in entries])
    table.insert(0, "model", [str((root / entry.name).resolve()) for entry in entries])
    table.insert(1, "top1", 100 * table["test_accuracy"])
    table["model_args"] = table["model_args"].map(json.dumps)
    table.to_csv(root / MANIFEST_CSV, index=False)


def read_manifest(root: str | Path) -> list[ZooModel]:
    """The models recorded in ``root``/manifest.json (none when it has no manifest)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return []
    try:
        return [ZooModel.from_dict(values) for values in json.loads(path.read_text(encoding="utf-8"))["models"]]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise FlatscanError(f"{path} is not a zoo manifest ({error}): delete it to train the zoo again") from None


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", "README.md"))


def train_zoo(
    spec: ZooSpec,
    root: str | Path,
    *,
    on_model: Callable[[ZooModel, int, int, bool], None] | None = None,
    on_step: Callable[[str, int, int], None] | None = None,
) -> list[ZooModel]:
    """Train the models of ``spec`` into ``root``, one folder each, reusing those already there (a complete folder
    recorded in the manifest: same name, same configuration). The manifest is rewritten after every model, so an
    interrupted run resumes. ``on_model(model, i, n, reused)`` follows the i-th of n; ``on_step(name, step, steps)``
    each optimiser step."""
    root = Path(root).expanduser().resolve()
    configs = spec.configs()
    names = [model_name(config, spec) for config in configs]
    if root.is_file():
        raise FlatscanError(f"{root} is a file: give a directory for the zoo")
    folders = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    stray = sorted(p.name for p in folders if _complete(p) and p.name not in names)
    if stray:
        raise FlatscanError(
            f"{root} holds models that this zoo spec does not make ({', '.join(stray[:3])}, ...): "
            "an audit of the directory would include them; give an empty or new directory"
        )
    root.mkdir(parents=True, exist_ok=True)
    # What the manifest keeps is written after every model, so an interrupted run loses no finished model.
    done = {e.name: e for e in read_manifest(root) if e.name in names and _complete(root / e.name)}
    data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, (config, name) in enumerate(zip(configs, names, strict=True), 1):
        reused = name in done  # the name hashes the configuration
        if not reused:
            if not data:  # every zoo model declares the same preprocessing: the splits are read once
                with _reproducible(spec.threads):
                    probe = build_model(config, spec)
                data = {split: _tensors(probe, spec, split) for split in (spec.train_split, spec.test_split)}
            start = time.perf_counter()
            report = None if on_step is None else partial(on_step, name)
            model, metrics = train_model(config, spec, data[spec.train_split], data[spec.test_split], report)
            architecture, model_args = config.architecture()
            params = sum(p.numel() for p in model.parameters())
            seconds = time.perf_counter() - start
            done[name] = ZooModel(name, config, architecture, model_args, params, **metrics, seconds=seconds)  # type: ignore[arg-type]
            _save(model, done[name], spec, root / name)
            _write_manifest(root, spec, [done[n] for n in names if n in done])
        if on_model is not None:
            on_model(done[name], i, len(configs), reused)
    entries = [done[name] for name in names]
    _write_manifest(root, spec, entries)
    return entries


def default_zoo_dir(spec: ZooSpec) -> Path:
    """``$FLATSCAN_CACHE/zoo/<spec hash>``, by default under ``~/.cache/flatscan``: one cached zoo per spec."""
    root = Path(os.environ.get("FLATSCAN_CACHE") or Path.home() / ".cache" / "flatscan")
    digest = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return root / "zoo" / f"{spec.dataset.replace('/', '_')}-{digest}"
