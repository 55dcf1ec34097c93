"""Evaluation data for a scan: a dataset the user names, streamed in the model's own preprocessing.

Sources (``DataOptions.dataset``):

- ``"digits"``: scikit-learn's 1797 real 8x8 handwritten digits (labels 0..9), shipped with scikit-learn, so it
  works offline. Splits: ``all`` (default, all 1797), and a seeded, disjoint 80/20 partition of them: ``train``
  (1438) and ``test`` (359), drawn with ``numpy.random.default_rng(seed)``.
- a Hugging Face dataset id (``owner/name``), streamed with ``datasets`` (gated or private ones with the user's
  usual token: ``hf auth login``);
- a local directory: images in one folder per class (split folders ``train/``, ``validation/``, ``test/`` allowed),
  or a directory of .parquet / .arrow files (file names may carry the split, e.g. ``validation-0.parquet``);
- a local .parquet or .arrow file (one ``train`` split).

The split defaults to ``validation``, else ``test``, else ``train`` (else the only split); ``EvalData.name`` and
``EvalData.split`` say which was used.

Default source (``default_dataset``): ``digits`` for models without 1000 classes; for ImageNet-1k classifiers
``timm/mini-imagenet``, the ImageNet subset that timm's author publishes on the Hub: parquet (streams without a
loading script), not gated, 100 ImageNet-1k classes labelled by WordNet synset (mapped to the model's indices with
timm's ImageNet metadata), original resolution. Its ``validation`` split (the default; 10,000 images) comes, per its
card, from ImageNet-1k's train images, the data the flatness theory speaks about; ``test`` (5,000 images) is from
ImageNet-1k's validation set, for held-out accuracy. For all 1000 classes pass ``ILSVRC/imagenet-1k`` (gated: accept
its terms on the Hub and log in); a class list in the model's order maps as identity.

Labels are mapped to the model's class indices; a label space the source declares (class names, folder names) is
checked completely before any image is read, other labels as they come:

- ``identity``: the dataset's labels are the model's indices (same ImageNet class list, or class indices / unnamed
  classes that fit the model's number of classes);
- ``synset``: ImageNet subsets labelled by WordNet synset (``n01440764``) or ImageNet class description, mapped with
  ``timm.data.ImageNetInfo`` for models with an ImageNet label space (1k, 12k, 21k, 22k);
- ``class-map:<file>``: ``DataOptions.class_map``, a JSON object ``{"dataset_label": model_index}`` (.json files) or a
  text file of lines ``dataset_label model_index`` (split at the last whitespace, so labels may contain spaces; blank
  lines and lines starting with ``#`` are skipped). A dataset label is its class name or its integer value.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import datasets
import numpy as np
import PIL.Image
import pyarrow.parquet as pq
import timm.data
import torch
from datasets.exceptions import DatasetsError
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader

from flatscan.errors import FlatscanError
from flatscan.io.messages import few, first_line

DIGITS = "digits"
IMAGENET_DEFAULT = "timm/mini-imagenet"

_SPLIT_ORDER = ("validation", "test", "train")
_DIGITS_SPLITS = ("all", "train", "test")
_IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "picture", "photo")
_LABEL_COLUMNS = ("label", "labels", "cls", "class", "fine_label", "target", "category")
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos")
_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
_IMAGE_SUFFIXES = frozenset(ImageFolder.EXTENSIONS)
_INDEX = re.compile(r"\d+")
# Decodes the {"bytes", "path"} values of an image column (local or hf:// paths, EXIF orientation) as datasets does.
_DECODER = datasets.Image()


class DataError(FlatscanError):
    """The evaluation data cannot be opened or read; the message names the problem and the fix."""

    exit_code = 2


@dataclass(frozen=True)
class DataOptions:
    """What to evaluate on and how to preprocess it; None means the default described in the module docstring."""

    dataset: str | None = None  # None: default_dataset(model)
    config: str | None = None  # Hugging Face dataset config name
    split: str | None = None
    image_column: str | None = None  # None: auto-detected
    label_column: str | None = None  # None: auto-detected
    class_map: Path | None = None  # dataset label -> model class index (format in the module docstring)
    img_size: int | None = None  # overrides of the model's pretrained data config
    crop_pct: float | None = None
    interpolation: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    batch_size: int = 64
    workers: int = 4
    seed: int = 0  # of the digits train/test partition
    streaming: bool = True  # False: download and prepare the whole dataset first (then usable offline)


@dataclass(frozen=True)
class EvalData:
    """Batches of (float32 NCHW images, int64 labels in the model's class indices), and where they come from."""

    batches: Iterable[tuple[torch.Tensor, torch.Tensor]]  # re-iterable
    name: str  # e.g. "digits:all", "owner/name:validation", "/data/folder:train"
    split: str | None
    num_samples: int | None  # None when the source does not say
    label_mapping: str  # "identity" | "synset" | "class-map:<file>"
    data_config: dict[str, Any]  # the timm data config used (input_size, interpolation, mean, std, crop_pct, ...)
    notes: tuple[str, ...] = ()  # what the user should know about how the data was read (one line each)


def default_dataset(model: nn.Module) -> str:
    """``timm/mini-imagenet`` for a 1000-class (ImageNet-1k) model, else the offline ``digits``."""
    return IMAGENET_DEFAULT if _num_classes(model) == 1000 else DIGITS


def open_eval_data(model: nn.Module, options: DataOptions, limit: int | None = None) -> EvalData:
    """Resolve ``options`` for ``model``: the source, split, columns and label mapping are checked here, before any
    batch is read; the batches then stream in constant memory. Raises :class:`DataError`.

    ``limit``: only the split's first ``limit`` samples, in its own order, whatever the workers and batch size (the
    seed, through the split, is what chooses them)."""
    if options.batch_size < 1 or options.workers < 0:
        raise DataError(
            f"batch_size must be >= 1 and workers >= 0 (got {options.batch_size}, {options.workers}): fix the option"
        )
    num_classes = _num_classes(model)
    data_config = _data_config(model, options)
    source = options.dataset or default_dataset(model)
    if source == DIGITS:
        num_samples: int | None
        dataset, name, split, num_samples = _digits(options, limit)
    else:
        dataset, name, split, num_samples = _datasets_source(source, options, limit)
    if num_samples == 0:
        raise DataError(f"{name} has no samples: pick another split with --split, or check the files")
    columns, features = _columns(dataset, name)
    image_column = _pick_column("image", options.image_column, _IMAGE_COLUMNS, columns, features, datasets.Image, name)
    label_column = _pick_column(
        "label", options.label_column, _LABEL_COLUMNS, columns, features, datasets.ClassLabel, name
    )
    names, text_labels = _label_space(features, label_column, name)
    labels = _label_map(model, num_classes, names, text_labels, options.class_map, name)
    notes = []
    if names and all(label.isdigit() for label in names) and names != sorted(names, key=int):
        # datasets (and torchvision) sort class folders as text: "10" comes before "2".
        moved = next(i for i, (a, b) in enumerate(zip(names, sorted(names, key=int), strict=True)) if a != b)
        notes.append(
            f"the class folders of {name} are numbers sorted as text ({few(names, 4)}): folder {names[moved]!r} is "
            f"class {moved}; pass --class-map FILE if the numbers are the class indices"
        )
    dataset = dataset.select_columns([image_column, label_column])
    if features is not None and isinstance(features[image_column], datasets.Image):
        # Raw bytes / paths: this module decodes them itself, to name the file that fails.
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    workers = options.workers
    if limit is not None and options.streaming and source != DIGITS:
        workers = min(workers, 1)  # in several DataLoader workers, take() would take the first samples of each
    elif dataset.num_shards < workers:
        dataset = dataset.reshard()  # parquet: one shard per row group instead of per file
    stream = _Stream(
        dataset=dataset,
        image_column=image_column,
        label_column=label_column,
        transform=timm.data.create_transform(**data_config, is_training=False),
        labels=labels,
        batch_size=options.batch_size,
        name=name,
    )
    # In a DataLoader worker, a datasets IterableDataset iterates only its share of the shards (whole files or
    # row groups), so each sample comes once; a worker beyond the number of shards would have nothing to do.
    loader = DataLoader(stream, batch_size=None, num_workers=min(workers, dataset.num_shards))
    return EvalData(
        batches=_Batches(loader, name),
        name=name,
        split=split,
        num_samples=num_samples,
        label_mapping=labels.kind,
        data_config=data_config,
        notes=tuple(notes),
    )


def _num_classes(model: nn.Module) -> int:
    classes = getattr(model, "num_classes", None)
    if classes is None:  # transformers classifiers keep it in their config
        classes = getattr(getattr(model, "config", None), "num_labels", None)
    if not isinstance(classes, int) or classes < 1:
        raise DataError(
            f"cannot tell how many classes {type(model).__name__} has (num_classes={classes!r}): "
            "flatscan evaluates classifiers with a head; use a timm classifier"
        )
    return classes


def _data_config(model: nn.Module, options: DataOptions) -> dict[str, Any]:
    """The model's pretrained data config with the overrides of ``options`` (timm's own resolution)."""
    if options.img_size is not None and options.img_size < 1:
        raise DataError(f"img_size must be a positive number of pixels, got {options.img_size}")
    if options.crop_pct is not None and not 0 < options.crop_pct <= 1:
        raise DataError(f"crop_pct must be in (0, 1], got {options.crop_pct}")
    if options.interpolation is not None and options.interpolation not in _INTERPOLATIONS:
        raise DataError(f"unknown interpolation {options.interpolation!r}: use one of {', '.join(_INTERPOLATIONS)}")
    for what, values in (("mean", options.mean), ("std", options.std)):
        if values is not None and len(values) != 3:
            raise DataError(f"{what} needs 3 values (R, G, B), got {len(values)}")
    if options.std is not None and min(options.std) <= 0:
        raise DataError(f"std values must be positive, got {options.std}")
    overrides = {
        "img_size": options.img_size,
        "crop_pct": options.crop_pct,
        "interpolation": options.interpolation,
        "mean": options.mean,
        "std": options.std,
    }
    return timm.data.resolve_model_data_config(model, args=overrides)


def _digits(options: DataOptions, limit: int | None) -> tuple[datasets.IterableDataset, str, str, int]:
    split = options.split or "all"
    if split not in _DIGITS_SPLITS:
        raise DataError(f"digits has no split {split!r}: use one of {', '.join(_DIGITS_SPLITS)}")
    digits = load_digits()
    order = np.random.default_rng(options.seed).permutation(len(digits.target))
    test = np.sort(order[: len(order) // 5])
    keep = {"all": np.arange(len(order)), "test": test, "train": np.sort(order[len(order) // 5 :])}[split][:limit]
    # Pixel values are 0..16: scaled to 8-bit grayscale; the model's transform makes them RGB and resizes them.
    images = [PIL.Image.fromarray(np.round(digits.images[i] * (255 / 16)).astype(np.uint8)) for i in keep]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    table = datasets.Dataset.from_dict({"image": images, "label": digits.target[keep].tolist()}, features=features)
    dataset = table.to_iterable_dataset(num_shards=max(1, min(options.workers, len(keep))))
    return dataset, f"{DIGITS}:{split}", split, len(keep)


def _datasets_source(
    source: str, options: DataOptions, limit: int | None
) -> tuple[datasets.IterableDataset, str, str, int | None]:
    """A Hub id, local directory or local .parquet/.arrow file as a datasets IterableDataset of one split."""
    path = Path(source).expanduser()
    if path.is_file():
        builder_name = _FILE_BUILDERS.get(path.suffix.lower())
        if builder_name is None:
            raise DataError(
                f"{path} is neither a .parquet nor an .arrow file: pass one of those, a directory of them, "
                "or a directory of images with one folder per class"
            )
        label = str(path.resolve())
        builder = _load(label, options, lambda: datasets.load_dataset_builder(builder_name, data_files=[label]))
    elif path.is_dir():
        label = str(path.resolve())
        builder = _load(label, options, lambda: datasets.load_dataset_builder(label, name=options.config))
    elif source.startswith((".", "~", os.sep)) or path.suffix.lower() in _FILE_BUILDERS or source.count("/") > 1:
        raise DataError(f"{source} does not exist: check the path (or give a Hugging Face dataset id owner/name)")
    else:
        label = source
        builder = _load(label, options, lambda: datasets.load_dataset_builder(source, name=options.config))
    # What load_dataset(streaming=True) does; the builder also knows the split sizes and files.
    splits = _load(label, options, builder.as_streaming_dataset)
    split = _pick_split(options.split, list(splits), label)
    name = f"{label}:{split}" if options.config is None else f"{label}[{options.config}]:{split}"
    if options.streaming:
        size = _split_size(builder, split)
        if limit is None:
            return splits[split], name, split, size
        return splits[split].take(limit), name, split, min(size or limit, limit)
    _load(label, options, builder.download_and_prepare)
    prepared = builder.as_dataset(split=split)
    if limit is not None:
        prepared = prepared.select(range(min(limit, len(prepared))))
    return (
        prepared.to_iterable_dataset(num_shards=max(1, min(options.workers, len(prepared)))),
        name,
        split,
        len(prepared),
    )


def _load(label: str, options: DataOptions, step: Any) -> Any:
    """``step()``, with the errors of datasets / the Hub turned into one-line DataErrors with the fix."""
    try:
        return step()
    except ConnectionError as error:
        folder = "" if Path(label).is_absolute() else f"there is no folder {Path(label).resolve()}, and "
        raise DataError(
            f"{folder}cannot reach the Hugging Face Hub for {label} ({first_line(error)}) and it is not in the local "
            "cache: "
            f"check the network, or download it (hf download {label} --repo-type dataset --local-dir DIR) and pass DIR"
        ) from None
    except FileNotFoundError as error:
        if not Path(label).is_absolute():  # a Hub id, or a relative folder that does not exist
            raise DataError(
                f"there is no folder {Path(label).resolve()}, and no dataset {label} on the Hub "
                f"({first_line(error)}): check the path or the Hub id (gated or private: log in with `hf auth login`)"
            ) from None
        raise DataError(
            f"cannot find dataset {label} ({first_line(error)}): check the path or Hub id; for a gated or private "
            "Hub dataset accept its terms on the Hub and log in with `hf auth login`"
        ) from None
    except (OSError, ValueError, DatasetsError) as error:
        hint = "check --config" if options.config else "check the id, or pick a config with --config"
        raise DataError(f"cannot load dataset {label} ({first_line(error)}): {hint}") from None


def _pick_split(wanted: str | None, available: list[str], label: str) -> str:
    if wanted is not None:
        if wanted not in available:
            raise DataError(f"{label} has no split {wanted!r}: pick one of {', '.join(available)} with --split")
        return wanted
    preferred = [split for split in _SPLIT_ORDER if split in available]
    if preferred or len(available) == 1:
        return (preferred or available)[0]
    raise DataError(f"{label} has no validation, test or train split: pick one of {', '.join(available)} with --split")


def _split_size(builder: datasets.DatasetBuilder, split: str) -> int | None:
    """Samples in ``split``: from the dataset card's metadata, else counted in local files, else None."""
    known = builder.info.splits.get(split) if builder.info.splits else None
    if known is not None and known.num_examples:
        return known.num_examples
    files = [Path(file) for file in (builder.config.data_files or {}).get(split, [])]
    if not files or not all(file.is_file() for file in files):
        return None  # remote files: not opened before streaming
    if all(file.suffix.lower() == ".parquet" for file in files):
        return sum(_parquet_rows(file) for file in files)
    images = sum(file.suffix.lower() in _IMAGE_SUFFIXES for file in files)
    return images or None


def _parquet_rows(file: Path) -> int:
    try:
        return pq.read_metadata(file).num_rows
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read {file} ({first_line(error)}): it is not a valid parquet file") from None


def _columns(dataset: datasets.IterableDataset, name: str) -> tuple[list[str], datasets.Features | None]:
    """Column names and features; a source without declared features shows its columns in its first example."""
    if dataset.features is not None:
        return list(dataset.features), dataset.features
    first = next(iter(_examples(dataset, name)), None)
    if first is None:
        raise DataError(f"{name} has no samples: pick another split with --split, or check the files")
    return list(first), None


def _pick_column(
    role: str,
    wanted: str | None,
    candidates: tuple[str, ...],
    columns: list[str],
    features: datasets.Features | None,
    feature_type: type,
    name: str,
) -> str:
    """``wanted``, else the first column named like ``candidates``, else the only column of ``feature_type``."""
    listing = ", ".join(columns)
    if wanted is not None:
        if wanted not in columns:
            raise DataError(
                f"{name} has no column {wanted!r} (columns: {listing}): pass one of them with --{role}-column"
            )
        return wanted
    lowered = {column.lower(): column for column in columns}
    found = next((lowered[c] for c in candidates if c in lowered), None)
    typed = [column for column in columns if features is not None and isinstance(features[column], feature_type)]
    if found is None and len(typed) == 1:
        found = typed[0]
    if found is None:
        raise DataError(
            f"{name} has no {role} column that flatscan recognises (columns: {listing}): pass --{role}-column"
        )
    return found


def _label_space(features: datasets.Features | None, column: str, name: str) -> tuple[list[str] | None, bool]:
    """The class names of a ClassLabel column (None if unknown), and whether the labels are text."""
    feature = None if features is None else features[column]
    if feature is None:
        return None, False  # told apart per sample
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), False
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return None, True
    if isinstance(feature, datasets.Value) and "int" in feature.dtype:
        return None, False
    raise DataError(
        f"column {column!r} of {name} holds {feature}, not one class label per image: name the label column "
        "with --label-column"
    )


@dataclass(frozen=True)
class _LabelMap:
    """Dataset label -> model class index, checked per sample."""

    kind: str
    num_classes: int
    by_index: Mapping[int, int] | None  # integer labels; None: identity within the model's classes
    by_name: Mapping[str, int] | None  # text labels; None: text labels cannot be mapped
    name: str

    def __call__(self, label: int | str) -> int:
        if isinstance(label, str):
            index = None if self.by_name is None else self.by_name.get(label)
        elif self.by_index is not None:
            index = self.by_index.get(label)
        else:
            index = label if 0 <= label < self.num_classes else None
        if index is not None:
            return index
        if self.kind.startswith("class-map:"):
            fix = f"add it to {self.kind.removeprefix('class-map:')}"
        elif isinstance(label, int) and label < 0:
            fix = "negative labels mark unlabelled samples, pick a labelled split with --split"
        else:
            fix = "map the dataset's labels to the model's classes with --class-map FILE"
        raise DataError(
            f"label {label!r} of {self.name} is not one of the model's {self.num_classes} classes ({self.kind}): {fix}"
        )


def _label_map(
    model: nn.Module,
    num_classes: int,
    names: list[str] | None,
    text_labels: bool,
    class_map: Path | None,
    name: str,
) -> _LabelMap:
    """How the dataset's labels become model indices; a label space known now is checked completely now."""
    if class_map is not None:
        table = _read_class_map(class_map, num_classes)
        kind = f"class-map:{class_map}"
        if names is None:
            by_index = {int(key): index for key, index in table.items() if _INDEX.fullmatch(key)}
            return _LabelMap(kind, num_classes, by_index, table, name)
        resolved = [table.get(label, table.get(str(i))) for i, label in enumerate(names)]
        missing = [label for label, index in zip(names, resolved, strict=True) if index is None]
        if missing:
            raise DataError(
                f"labels {few(list(map(repr, missing)), 5)} of {name} are not in the class map {class_map}: add them"
            )
        return _LabelMap(kind, num_classes, dict(enumerate(cast("list[int]", resolved))), None, name)
    imagenet = _imagenet_classes(model)
    # Names "0", "1", ... are what datasets calls classes that have no names: they fit by index.
    if imagenet is not None and names is not None and names != [str(i) for i in range(len(names))]:
        positional, lookup = imagenet
        matches = sum(label in classes for label, classes in zip(names, positional, strict=False))
        if len(names) == len(positional) and matches >= 0.99 * len(names):
            # The model's own class list in its order, up to a few renamed duplicates (ILSVRC's two "crane" classes).
            return _LabelMap("identity", num_classes, None, None, name)
        resolved = [lookup.get(label) for label in names]
        missing = [label for label, index in zip(names, resolved, strict=True) if index is None]
        if missing:
            raise DataError(
                f"labels {few(list(map(repr, missing)), 5)} of {name} are not among the model's ImageNet classes: "
                "map them with --class-map FILE"
            )
        return _LabelMap("synset", num_classes, dict(enumerate(cast("list[int]", resolved))), None, name)
    if names is not None and len(names) > num_classes:
        raise DataError(
            f"labels {few(list(map(repr, names[num_classes:])), 5)} of {name} are outside the model's {num_classes} "
            "classes: "
            "map them with --class-map FILE"
        )
    if text_labels and imagenet is None:
        raise DataError(
            f"the labels of {name} are text and the model's classes have no names: map them with --class-map FILE"
        )
    # Class indices are the model's; text labels (ImageNet models only) are looked up by synset per sample.
    by_name = None if imagenet is None else imagenet[1]
    return _LabelMap("synset" if text_labels else "identity", num_classes, None, by_name, name)


def _imagenet_classes(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, int]] | None:
    """For a model with an ImageNet label space: (synset, description) per index, and name -> index."""
    subset = timm.data.infer_imagenet_subset(model)
    if subset is None:
        return None
    info = timm.data.ImageNetInfo(subset)
    synsets, descriptions = info.label_names(), info.label_descriptions()
    counts = Counter(descriptions)
    # A description shared by two classes ("crane": the bird and the machine) names neither.
    lookup = {text: i for i, text in enumerate(descriptions) if counts[text] == 1}
    lookup.update((synset, i) for i, synset in enumerate(synsets))
    return list(zip(synsets, descriptions, strict=True)), lookup


def _read_class_map(path: Path, num_classes: int) -> dict[str, int]:
    """``dataset label -> model index`` from a JSON object (.json) or lines ``dataset_label model_index``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read the class map {path} ({first_line(error)}): check the path") from None
    entries: list[tuple[str, object, str]] = []
    if path.suffix.lower() == ".json":
        try:
            content = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f'class map {path} is not valid JSON ({error}): write {{"label": index, ...}}') from None
        if not isinstance(content, dict):
            raise DataError(f'class map {path} is not a JSON object: write {{"label": index, ...}}')
        entries = [(str(key), value, f"key {key!r}") for key, value in content.items()]
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2:
                raise DataError(f"class map {path} line {number} ({line.strip()!r}) is not 'dataset_label model_index'")
            entries.append((parts[0].strip(), parts[1], f"line {number}"))
    table: dict[str, int] = {}
    for label, value, where in entries:
        if isinstance(value, str) and _INDEX.fullmatch(value):
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < num_classes:
            raise DataError(
                f"class map {path} {where}: {value!r} is not a model class index (0..{num_classes - 1}): fix the file"
            )
        if label in table:
            raise DataError(f"class map {path} {where}: label {label!r} is mapped twice: keep one mapping")
        table[label] = value
    if not table:
        raise DataError(f"class map {path} maps no label: write lines 'dataset_label model_index'")
    return table


@dataclass(frozen=True)
class _Failure:
    """A DataError raised in a loader worker, sent as data: torch re-raises worker errors with a traceback text."""

    message: str


class _Stream(torch.utils.data.IterableDataset):
    """Decoded, transformed, label-mapped batches of a datasets IterableDataset (of this worker's shards)."""

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        image_column: str,
        label_column: str,
        transform: Any,
        labels: _LabelMap,
        batch_size: int,
        name: str,
    ) -> None:
        self.dataset, self.image_column, self.label_column = dataset, image_column, label_column
        self.transform, self.labels, self.batch_size, self.name = transform, labels, batch_size, name

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor] | _Failure]:
        images: list[torch.Tensor] = []
        labels: list[int] = []
        try:
            for example in _examples(self.dataset, self.name):
                images.append(self.transform(_rgb_image(example[self.image_column], self.image_column, self.name)))
                labels.append(self.labels(example[self.label_column]))
                if len(labels) == self.batch_size:
                    yield torch.stack(images), torch.tensor(labels, dtype=torch.int64)
                    images, labels = [], []
        except DataError as error:
            yield _Failure(str(error))
            return
        if labels:
            yield torch.stack(images), torch.tensor(labels, dtype=torch.int64)


class _Batches:
    """The loader's batches, re-iterable; a worker's DataError is raised here, in the caller's process."""

    def __init__(self, loader: DataLoader, name: str) -> None:
        self.loader, self.name = loader, name

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seen = 0
        for item in self.loader:
            if isinstance(item, _Failure):
                raise DataError(item.message)
            images, labels = item
            seen += len(labels)
            yield images, labels
        if seen == 0:
            raise DataError(f"{self.name} has no samples: pick another split with --split, or check the files")


def _examples(dataset: datasets.IterableDataset, name: str) -> Iterator[dict[str, Any]]:
    """The examples of ``dataset``, with read errors (network, corrupt parquet) as one-line DataErrors."""
    iterator = iter(dataset)
    while True:
        try:
            example = next(iterator)
        except StopIteration:
            return
        except (OSError, ValueError, DatasetsError) as error:
            raise DataError(f"reading {name} failed ({first_line(error)}): check its files or the network") from None
        yield example


def _rgb_image(value: object, column: str, name: str) -> PIL.Image.Image:
    """An RGB PIL image from an image column's value: {"bytes", "path"}, raw bytes, or a file path."""
    if isinstance(value, bytes):
        value = {"bytes": value, "path": None}
    elif isinstance(value, str):
        value = {"bytes": None, "path": value}
    if not isinstance(value, dict):
        raise DataError(f"column {column!r} of {name} holds {type(value).__name__}, not images: pass --image-column")
    # Structs written by other tools (pandas, pyarrow) may carry only one of the two keys.
    value = {"bytes": value.get("bytes"), "path": value.get("path")}
    where = value.get("path") or f"in column {column!r} of {name}"
    try:
        image = _DECODER.decode_example(value)
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # PIL converts a palette's transparency only by way of RGBA
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {where} ({first_line(error)}): remove or re-encode the file") from None
