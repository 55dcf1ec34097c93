"""flatscan.io.data: sources, splits, columns, label mapping, preprocessing and errors, all on local data."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_digits

from flatscan.io.data import DataError, DataOptions, EvalData, default_dataset, open_eval_data

IMAGENET = timm.data.ImageNetInfo()
SMALL = {"img_size": 16, "workers": 0}  # fast: small images, no worker processes


@pytest.fixture(scope="module")
def model10() -> torch.nn.Module:
    return timm.create_model("test_resnet", num_classes=10)


@pytest.fixture(scope="module")
def model1k() -> torch.nn.Module:
    return timm.create_model("test_resnet", num_classes=1000)


def collect(data: EvalData) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(data.batches)
    return torch.cat([images for images, _ in batches]), torch.cat([labels for _, labels in batches])


def digests(images: torch.Tensor) -> Counter[str]:
    return Counter(hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in images)


def png(path: Path, value: int = 128, mode: str = "RGB", size: tuple[int, int] = (12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode in ("L", "P") else (value,) * len(mode)).save(path)


def image_folder(root: Path, classes: list[str], per_class: int = 3) -> Path:
    modes = ["RGB", "L", "RGBA"]  # grayscale and alpha are converted to RGB
    for c in classes:
        for i in range(per_class):
            png(root / c / f"{i}.png", value=40 * i, mode=modes[i % len(modes)])
    return root


def parquet_file(path: Path, columns: dict[str, list], features: datasets.Features | None = None) -> Path:
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))
    return path


def encoded(value: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (size, size), value).save(buffer, format="PNG")
    return buffer.getvalue()


# --- digits and defaults ---------------------------------------------------------------------------------------------


def test_default_dataset(model10, model1k):
    assert default_dataset(model10) == "digits"
    assert default_dataset(model1k) == "timm/mini-imagenet"


def test_digits_batches(model10):
    data = open_eval_data(model10, DataOptions(batch_size=500, **SMALL))
    assert (data.name, data.split, data.num_samples, data.label_mapping) == ("digits:all", "all", 1797, "identity")
    assert data.data_config["input_size"] == (3, 16, 16)
    shapes = [tuple(images.shape) for images, _ in data.batches]
    assert shapes == [(500, 3, 16, 16)] * 3 + [(297, 3, 16, 16)]
    images, labels = collect(data)
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert Counter(labels.tolist()) == Counter(load_digits().target.tolist())
    # test_resnet normalises with mean = std = 0.5: the white strokes reach 1, the black background -1.
    assert images.min() == pytest.approx(-1.0) and images.max() == pytest.approx(1.0, abs=0.05)
    assert torch.equal(collect(data)[0], images)  # re-iterable, same order


def test_digits_seeded_split(model10):
    def run(split: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return collect(open_eval_data(model10, DataOptions(split=split, seed=seed, batch_size=1000, **SMALL)))

    train, test, everything = run("train"), run("test"), run("all")
    assert (len(train[1]), len(test[1])) == (1438, 359)
    # A partition of all 1797 images (with their labels), the same for the same seed, another for another seed.
    assert digests(train[0]) + digests(test[0]) == digests(everything[0])
    assert Counter(train[1].tolist()) + Counter(test[1].tolist()) == Counter(everything[1].tolist())
    assert torch.equal(run("test")[0], test[0])
    assert not torch.equal(run("test", seed=1)[0], test[0])
    with pytest.raises(DataError, match="digits has no split 'validation'"):
        open_eval_data(model10, DataOptions(split="validation", **SMALL))


def test_labels_outside_the_model_fail_before_the_first_batch():
    model = timm.create_model("test_resnet", num_classes=5)
    with pytest.raises(DataError, match=r"labels '5', '6', '7', '8', '9' of digits:all are outside the model's 5"):
        open_eval_data(model, DataOptions(**SMALL))


# --- image folders ---------------------------------------------------------------------------------------------------


def test_image_folder(model10, tmp_path):
    root = image_folder(tmp_path / "pets", ["cat", "dog"])
    Image.new("P", (6, 6), 3).save(root / "dog" / "palette.png", transparency=3)  # palette with transparency
    data = open_eval_data(model10, DataOptions(dataset=str(root), batch_size=4, **SMALL))
    assert (data.name, data.split, data.num_samples) == (f"{root}:train", "train", 7)
    assert data.label_mapping == "identity"
    images, labels = collect(data)
    assert images.shape == (7, 3, 16, 16)
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 1]  # folders in sorted order: cat 0, dog 1


def test_image_folder_of_synsets_maps_to_imagenet_indices(model1k, tmp_path):
    synsets = ["n02102040", "n01440764"]  # English springer, tench
    root = image_folder(tmp_path / "imagenette", synsets, per_class=2)
    data = open_eval_data(model1k, DataOptions(dataset=str(root), **SMALL))
    assert data.label_mapping == "synset"
    expected = sorted(IMAGENET.label_names().index(s) for s in synsets for _ in range(2))
    assert expected == [0, 0, 217, 217]
    assert sorted(collect(data)[1].tolist()) == expected


def test_image_folder_with_split_folders(model10, tmp_path):
    image_folder(tmp_path / "data" / "train", ["a", "b"], per_class=2)
    image_folder(tmp_path / "data" / "validation", ["a", "b"], per_class=1)
    data = open_eval_data(model10, DataOptions(dataset=str(tmp_path / "data"), **SMALL))
    assert (data.split, data.num_samples, len(collect(data)[1])) == ("validation", 2, 2)
    with pytest.raises(DataError, match=r"has no split 'test': pick one of .*train.*validation.* with --split"):
        open_eval_data(model10, DataOptions(dataset=str(tmp_path / "data"), split="test", **SMALL))


def test_named_classes_that_are_not_the_models_need_a_class_map(model1k, tmp_path):
    root = image_folder(tmp_path / "pets", ["cat", "dog"])
    with pytest.raises(DataError, match=r"labels 'cat', 'dog' of .* are not among the model's ImageNet .*--class-map"):
        open_eval_data(model1k, DataOptions(dataset=str(root), **SMALL))


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_names_the_file(model10, tmp_path, workers):
    root = image_folder(tmp_path / "pets", ["cat", "dog"])
    bad = root / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is no jpeg")
    data = open_eval_data(model10, DataOptions(dataset=str(root), img_size=16, workers=workers))
    with pytest.raises(DataError, match=r"cannot read image .*broken\.jpg .*remove or re-encode") as error:
        collect(data)
    assert "\n" not in str(error.value)


# --- class maps ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".txt", ".json"])
def test_class_map(model1k, tmp_path, suffix):
    root = image_folder(tmp_path / "pets", ["cat", "dog"], per_class=2)
    class_map = tmp_path / f"map{suffix}"
    if suffix == ".json":
        class_map.write_text(json.dumps({"cat": 281, "dog": "207"}))
    else:
        class_map.write_text("# folder  imagenet index\ncat 281\n\ndog 207\n")
    data = open_eval_data(model1k, DataOptions(dataset=str(root), class_map=class_map, **SMALL))
    assert data.label_mapping == f"class-map:{class_map}"
    assert sorted(collect(data)[1].tolist()) == [207, 207, 281, 281]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cat 281\ndog\n", r"line 2 \('dog'\) is not 'dataset_label model_index'"),
        ("cat 281\ndog two\n", r"line 2: 'two' is not a model class index \(0\.\.999\)"),
        ("cat 281\ndog 1000\n", r"line 2: 1000 is not a model class index"),
        ("cat 281\ncat 282\n", r"line 2: label 'cat' is mapped twice"),
        ("# nothing\n", r"maps no label"),
        ("cat 281\n", r"labels 'dog' of .* are not in the class map"),
    ],
)
def test_malformed_class_map(model1k, tmp_path, text, message):
    root = image_folder(tmp_path / "pets", ["cat", "dog"], per_class=1)
    class_map = tmp_path / "map.txt"
    class_map.write_text(text)
    with pytest.raises(DataError, match=message):
        open_eval_data(model1k, DataOptions(dataset=str(root), class_map=class_map, **SMALL))


def test_class_map_of_integer_labels(model10, tmp_path):
    path = parquet_file(tmp_path / "ints.parquet", {"image": [encoded(9)] * 3, "label": [100, 200, 100]})
    class_map = tmp_path / "map.txt"
    class_map.write_text("100 3\n200 7\n")
    data = open_eval_data(model10, DataOptions(dataset=str(path), class_map=class_map, **SMALL))
    assert collect(data)[1].tolist() == [3, 7, 3]


# --- parquet, columns, label spaces ----------------------------------------------------------------------------------


def test_parquet_with_image_feature_and_auto_detected_columns(model10, tmp_path):
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["x", "y", "z"])})
    images = [Image.new("L", (9, 9), 50), Image.new("RGB", (5, 7), (1, 2, 3)), Image.new("RGBA", (8, 8))]
    path = parquet_file(tmp_path / "set.parquet", {"img": images, "fine_label": [2, 0, 1]}, features)
    data = open_eval_data(model10, DataOptions(dataset=str(path), **SMALL))
    assert (data.split, data.num_samples, data.label_mapping) == ("train", 3, "identity")
    images, labels = collect(data)
    assert images.shape == (3, 3, 16, 16) and labels.tolist() == [2, 0, 1]


def test_parquet_of_image_bytes(model10, tmp_path):
    table = pa.table({"__key__": ["a", "b"], "jpg": [encoded(0), encoded(255)], "cls": [4, 9]})
    pq.write_table(table, tmp_path / "shard.parquet")
    images, labels = collect(open_eval_data(model10, DataOptions(dataset=str(tmp_path / "shard.parquet"), **SMALL)))
    assert labels.tolist() == [4, 9]
    assert images[0].max() == pytest.approx(-1.0) and images[1].min() == pytest.approx(1.0)


def test_missing_columns_are_listed(model10, tmp_path):
    path = parquet_file(tmp_path / "odd.parquet", {"pixels": [encoded(1)], "y": [1], "score": [0.5]})
    with pytest.raises(DataError, match=r"no image column .*\(columns: pixels, y, score\): pass --image-column"):
        open_eval_data(model10, DataOptions(dataset=str(path), **SMALL))
    with pytest.raises(DataError, match=r"no label column .*\(columns: pixels, y, score\): pass --label-column"):
        open_eval_data(model10, DataOptions(dataset=str(path), image_column="pixels", **SMALL))
    with pytest.raises(DataError, match=r"has no column 'lbl' \(columns: pixels, y, score\)"):
        open_eval_data(model10, DataOptions(dataset=str(path), image_column="pixels", label_column="lbl", **SMALL))
    with pytest.raises(DataError, match=r"column 'score' of .* holds float, not images"):
        collect(
            open_eval_data(model10, DataOptions(dataset=str(path), image_column="score", label_column="y", **SMALL))
        )
    options = DataOptions(dataset=str(path), image_column="pixels", label_column="y", **SMALL)
    assert collect(open_eval_data(model10, options))[1].tolist() == [1]


def test_integer_label_outside_the_model_fails_mid_stream(model10, tmp_path):
    path = parquet_file(tmp_path / "ints.parquet", {"image": [encoded(9)] * 3, "label": [1, 12, 2]})
    data = open_eval_data(model10, DataOptions(dataset=str(path), **SMALL))
    assert data.label_mapping == "identity"
    with pytest.raises(DataError, match=r"label 12 of .* is not one of the model's 10 classes .*--class-map"):
        collect(data)


CARD = """---
dataset_info:
  features:
  - name: image
    dtype: image
  - name: label
    dtype:
      class_label:
        names:
          '0': n01532829
          '1': n01558993
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: validation
    path: data/validation-*
---
"""


def test_local_copy_of_a_hub_dataset(model1k, tmp_path):
    # What `hf download timm/mini-imagenet --repo-type dataset --local-dir DIR` lays out: card, data/<split>-*.parquet
    (tmp_path / "mini" / "data").mkdir(parents=True)
    (tmp_path / "mini" / "README.md").write_text(CARD)
    for split, count in (("train", 3), ("validation", 2)):
        rows = {"image": [{"bytes": encoded(9), "path": f"{i}.png"} for i in range(count)], "label": [1, 0, 1][:count]}
        pq.write_table(pa.table(rows), tmp_path / "mini" / "data" / f"{split}-00000-of-00001.parquet")
    data = open_eval_data(model1k, DataOptions(dataset=str(tmp_path / "mini"), **SMALL))
    assert (data.split, data.num_samples, data.label_mapping) == ("validation", 2, "synset")
    house_finch, robin = (IMAGENET.label_names().index(s) for s in ("n01532829", "n01558993"))
    assert collect(data)[1].tolist() == [robin, house_finch]


def test_imagenet_class_list_in_model_order_is_identity(model1k, tmp_path):
    names = IMAGENET.label_descriptions()
    names[IMAGENET.label_names().index("n03126707")] = "crane (machine)"  # ClassLabel names must be unique
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    path = parquet_file(tmp_path / "in1k.parquet", {"image": [encoded(1)] * 2, "label": [0, 999]}, features)
    data = open_eval_data(model1k, DataOptions(dataset=str(path), **SMALL))
    assert data.label_mapping == "identity" and collect(data)[1].tolist() == [0, 999]


def test_text_synset_labels(model1k, tmp_path):
    path = parquet_file(tmp_path / "text.parquet", {"image": [encoded(1)] * 2, "label": ["n01440764", "n02102040"]})
    data = open_eval_data(model1k, DataOptions(dataset=str(path), **SMALL))
    assert data.label_mapping == "synset" and collect(data)[1].tolist() == [0, 217]
    path = parquet_file(tmp_path / "bad.parquet", {"image": [encoded(1)], "label": ["n99999999"]})
    with pytest.raises(DataError, match=r"label 'n99999999' of .* is not one of the model's 1000 classes"):
        collect(open_eval_data(model1k, DataOptions(dataset=str(path), **SMALL)))


def test_text_labels_need_named_model_classes(model10, tmp_path):
    path = parquet_file(tmp_path / "text.parquet", {"image": [encoded(1)], "label": ["cat"]})
    with pytest.raises(DataError, match=r"labels of .* are text and the model's classes have no names: .*--class-map"):
        open_eval_data(model10, DataOptions(dataset=str(path), **SMALL))


def test_empty_dataset(model10, tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a"])})
    path = parquet_file(tmp_path / "empty.parquet", {"image": [], "label": []}, features)
    with pytest.raises(DataError, match="has no samples"):
        open_eval_data(model10, DataOptions(dataset=str(path), **SMALL))


# --- workers ---------------------------------------------------------------------------------------------------------


def test_two_workers_give_each_sample_once(model10, tmp_path):
    # 40 uniform gray images, value 5 * id: a sample's id can be read back from its pixels.
    ids = list(range(40))
    folder = tmp_path / "shards"
    folder.mkdir()
    for part in (0, 1):
        rows = ids[part::2]
        parquet_file(folder / f"train-{part}.parquet", {"image": [encoded(5 * i) for i in rows], "label": [0] * 20})
    options = DataOptions(dataset=str(folder), img_size=8, mean=(0, 0, 0), std=(1, 1, 1), batch_size=6, workers=2)
    data = open_eval_data(model10, options)
    assert data.batches.loader.num_workers == 2  # the test means something only with two processes
    images, _ = collect(data)
    seen = sorted(round(float(image.mean()) * 255 / 5) for image in images)
    assert seen == ids and data.num_samples == 40
    assert sorted(round(float(image.mean()) * 255 / 5) for image in collect(data)[0]) == ids  # again


def test_digits_with_workers_match_in_process(model10):
    alone = collect(open_eval_data(model10, DataOptions(**SMALL)))
    shared = collect(open_eval_data(model10, DataOptions(img_size=16, workers=2)))
    assert digests(shared[0]) == digests(alone[0])
    assert Counter(shared[1].tolist()) == Counter(alone[1].tolist())


def test_prepared_instead_of_streamed(model10, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))  # not the user's cache
    image_folder(tmp_path / "pets", ["cat", "dog"], per_class=2)
    data = open_eval_data(model10, DataOptions(dataset=str(tmp_path / "pets"), streaming=False, img_size=16, workers=2))
    assert data.num_samples == 4 and sorted(collect(data)[1].tolist()) == [0, 0, 1, 1]
    assert any((tmp_path / "cache").rglob("*.arrow"))


# --- preprocessing overrides -----------------------------------------------------------------------------------------


def test_transform_overrides(model10):
    def first_batch(**overrides) -> tuple[torch.Tensor, dict]:
        data = open_eval_data(model10, DataOptions(batch_size=8, workers=0, **overrides))
        return next(iter(data.batches))[0], data.data_config

    default, config = first_batch()
    assert default.shape == (8, 3, 160, 160) and config["input_size"] == (3, 160, 160)
    bigger, config = first_batch(img_size=48)
    assert bigger.shape == (8, 3, 48, 48) and config["input_size"] == (3, 48, 48)
    plain, config = first_batch(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert config["mean"] == (0.0, 0.0, 0.0) and config["std"] == (1.0, 1.0, 1.0)
    assert plain.min() >= 0 and plain.max() <= 1
    torch.testing.assert_close(default, (plain - 0.5) / 0.5)  # the model's own mean = std = 0.5
    nearest, config = first_batch(img_size=48, interpolation="nearest", crop_pct=1.0)
    assert (config["interpolation"], config["crop_pct"]) == ("nearest", 1.0)
    assert nearest.shape == bigger.shape and not torch.allclose(nearest, bigger)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"interpolation": "cubic"}, "unknown interpolation 'cubic': use one of bilinear, bicubic"),
        ({"img_size": 0}, "img_size must be a positive"),
        ({"crop_pct": 1.5}, r"crop_pct must be in \(0, 1\]"),
        ({"std": (1.0, 0.0, 1.0)}, "std values must be positive"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_bad_options(model10, overrides, message):
    with pytest.raises(DataError, match=message):
        open_eval_data(model10, DataOptions(**overrides))


# --- sources that do not resolve -------------------------------------------------------------------------------------


def test_unknown_paths(model10, tmp_path):
    with pytest.raises(DataError, match="does not exist: check the path"):
        open_eval_data(model10, DataOptions(dataset=str(tmp_path / "nowhere"), **SMALL))
    with pytest.raises(DataError, match="does not exist"):
        open_eval_data(model10, DataOptions(dataset="missing.parquet", **SMALL))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"neither a \.parquet nor an \.arrow file"):
        open_eval_data(model10, DataOptions(dataset=str(tmp_path / "notes.txt"), **SMALL))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"cannot find dataset .*empty"):
        open_eval_data(model10, DataOptions(dataset=str(tmp_path / "empty"), **SMALL))


def test_uncached_hub_dataset_offline(model10, monkeypatch):
    # As with HF_HUB_OFFLINE=1 at start-up (both libraries read it at import).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        DataError, match=r"cannot reach the Hugging Face Hub for flatscan-tests/absent .*hf download"
    ) as e:
        open_eval_data(model10, DataOptions(dataset="flatscan-tests/absent", **SMALL))
    assert "\n" not in str(e.value)
