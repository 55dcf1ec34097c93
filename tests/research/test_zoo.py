"""flatscan.research.zoo: a seeded spec trains the same weights twice; each saved folder loads with flatscan and timm
alone, is described by an adapter and carries its test accuracy in its card; a zoo is an organisation for `flatscan
org` (one store row per model folder, skipped unloaded when unchanged); `flatscan demo` ranks a tiny zoo."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import timm
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from typer.testing import CliRunner

import flatscan
import flatscan.audit.org
from flatscan import cli
from flatscan.audit import reported
from flatscan.audit.options import AuditOptions
from flatscan.audit.org import audit_org, list_org_models
from flatscan.audit.reported import ReportedAccuracy
from flatscan.audit.store import ResultsStore
from flatscan.cli import app
from flatscan.errors import FlatscanError
from flatscan.io.data import DataOptions, open_eval_data
from flatscan.io.models import load_model
from flatscan.research import zoo

# One model per family, every source of randomness on (subset, label noise, augmentation, dropout), 23 steps each.
TINY = zoo.ZooSpec(
    grid={
        "family": tuple(zoo.FAMILIES),
        "width": (0.5,),
        "train_fraction": (0.25,),
        "label_noise": (0.2,),
        "augment": (True,),
        "dropout": (0.1,),
        "activation": ("silu",),
        "epochs": (1,),
    },
    size=3,
)
TEST = DataOptions(dataset="digits", split="test", batch_size=128, workers=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second thread, and lose much when another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zoo") / "tiny"
    zoo.train_zoo(TINY, root)
    return root


def _models(root: Path) -> dict[str, zoo.ZooModel]:
    return {model.name: model for model in zoo.read_manifest(root)}


def test_spec_samples_are_seeded_and_checked() -> None:
    configs = TINY.configs()
    assert [c.family for c in configs] == ["resnet", "efficientnet", "mobilenetv1"]
    assert configs[2].width == 1.0  # timm's MobileNet-V1 builders fix the width
    assert configs == TINY.configs()
    bigger = zoo.load_spec("study", size=12).configs()
    assert zoo.load_spec("study", size=6).configs() == bigger[:6]  # a larger zoo keeps the smaller one's models
    assert zoo.load_spec("study", size=6, seed=1).configs() != bigger[:6]
    assert {c.epochs for c in zoo.load_spec("demo", epochs=2).configs()} == {2}
    with pytest.raises(FlatscanError, match=r"unknown keys \['lr_max'\]"):
        zoo.ZooSpec(grid={"lr_max": (1,)}).configs()
    with pytest.raises(FlatscanError, match=r"label_noise 1\.5 must be in"):
        zoo.ZooSpec(grid={"label_noise": (1.5,)}).configs()
    with pytest.raises(FlatscanError, match="unknown zoo preset"):
        zoo.load_spec("huge")


def test_same_spec_same_weights(tiny_zoo: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    zoo.train_zoo(TINY, again)
    assert _models(again).keys() == _models(tiny_zoo).keys()
    for name, model in _models(tiny_zoo).items():
        first, second = load_file(tiny_zoo / name / "model.safetensors"), load_file(again / name / "model.safetensors")
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
        assert _models(again)[name].test_accuracy == model.test_accuracy
    # Another seed: other weights.
    other = tmp_path / "other"
    (resnet,) = zoo.train_zoo(zoo.ZooSpec(grid=TINY.grid, size=1, seed=1), other)
    (first_name,) = [name for name in _models(tiny_zoo) if name.startswith("resnet")]
    weights, others = (
        load_file(tiny_zoo / first_name / "model.safetensors"),
        load_file(other / resnet.name / "model.safetensors"),
    )
    assert not torch.equal(weights["fc.weight"], others["fc.weight"])
    # Trained models are reused, not trained again; a folder of another spec is refused.
    reused: list[bool] = []
    zoo.train_zoo(TINY, again, on_model=lambda model, i, n, was_reused: reused.append(was_reused))
    assert reused == [True, True, True]
    with pytest.raises(FlatscanError, match="holds models that this zoo spec does not make"):
        zoo.train_zoo(zoo.ZooSpec(grid=TINY.grid, size=1, seed=1), again)


def test_saved_folders_load_and_are_described(tiny_zoo: Path) -> None:
    for name, model in _models(tiny_zoo).items():
        folder = tiny_zoo / name
        loaded = load_model(str(folder))
        assert (loaded.source, loaded.architecture, loaded.name) == ("local", model.architecture, str(folder))
        assert flatscan.describe(loaded.model).family == (
            "resnet" if model.config.family == "resnet" else "efficientnet"
        )
        # timm alone rebuilds it from config.json (architecture + model_args) and loads the same weights.
        rebuilt = timm.create_model(f"local-dir:{folder}", pretrained=True)
        expected = loaded.model.state_dict()
        assert all(torch.equal(value, expected[key]) for key, value in rebuilt.state_dict().items())
        # Its declared preprocessing is the one it was trained and tested in: the same test accuracy.
        data = open_eval_data(loaded.model, TEST)
        with torch.no_grad():
            correct = sum((loaded.model(x).argmax(1) == y).sum().item() for x, y in data.batches)
        assert correct / data.num_samples == pytest.approx(model.test_accuracy, abs=1 / data.num_samples)
        assert data.data_config["input_size"] == (3, TINY.img_size, TINY.img_size)


def test_card_and_manifest_record_test_accuracy(tiny_zoo: Path) -> None:
    for name, model in _models(tiny_zoo).items():
        (result,) = ModelCard.load(tiny_zoo / name / "README.md").data.eval_results
        assert (result.dataset_type, result.dataset_split) == ("digits", "test")
        assert reported._metric(result) == "top1"
        assert result.metric_value == pytest.approx(model.test_accuracy, abs=1e-6)
        # manifest.csv is a `--reported` file keyed as `flatscan org` names the folder.
        found = ReportedAccuracy(user_csv=tiny_zoo / zoo.MANIFEST_CSV, offline=True).lookup(str(tiny_zoo / name))
        assert found is not None and found.top1 == pytest.approx(100 * model.test_accuracy)


def test_zoo_trains_on_an_image_folder(tmp_path: Path) -> None:
    """Any source flatscan evaluates on trains a zoo: here an image folder of three digit classes, 16 px PNGs."""
    digits = load_digits()
    for split, indices in (("train", range(300)), ("test", range(300, 420))):
        for i in (i for i in indices if digits.target[i] < 3):
            path = tmp_path / "images" / split / f"digit{digits.target[i]}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            PIL.Image.fromarray((digits.images[i] * 15).astype(np.uint8)).resize((16, 16)).save(path)
    spec = zoo.ZooSpec(
        grid={"family": ("resnet",), "epochs": (1,)}, size=1, dataset=str(tmp_path / "images"), num_classes=3
    )
    (model,) = zoo.train_zoo(spec, tmp_path / "zoo")
    n_train = sum(1 for _ in (tmp_path / "images" / "train").rglob("*.png"))
    assert model.n_train == n_train and 0 <= model.test_accuracy <= 1
    (result,) = ModelCard.load(tmp_path / "zoo" / model.name / "README.md").data.eval_results
    assert result.dataset_type == str(tmp_path / "images") and result.metric_value == pytest.approx(
        model.test_accuracy, abs=1e-6
    )
    assert load_model(str(tmp_path / "zoo" / model.name)).model.num_classes == 3


def test_local_directory_is_an_organisation(tiny_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    org = tmp_path / "org"
    shutil.copytree(tiny_zoo, org)
    models = _models(org)
    broken = org / "zz-broken"
    shutil.copytree(org / next(iter(models)), broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    (org / "reports").mkdir()  # no config.json: not a model
    shutil.copytree(broken, org / ".hidden")
    monkeypatch.chdir(tmp_path)

    listed = list_org_models("./org")
    assert [Path(m.repo_id).name for m in listed] == [*sorted(models), "zz-broken"]
    assert all(Path(m.repo_id).is_absolute() and re.fullmatch(r"sha256:[0-9a-f]{16}", m.revision) for m in listed)
    assert [Path(m.repo_id).name for m in list_org_models("./org", pattern="resnet-*")] == [
        n for n in sorted(models) if n.startswith("resnet")
    ]
    assert len(list_org_models("./org", pattern="org/*net-*")) == 2  # the directory name, then the folder name
    with pytest.raises(FlatscanError, match="is not a directory"):
        list_org_models("./missing")

    with ResultsStore(tmp_path / "results.sqlite") as store:
        # Tr(H) only: kappa of MobileNet-V1's 1024 channels is the slow part, and the demo test audits kappa.
        rows = audit_org("./org", store, AuditOptions(TEST, device="cpu", trace_only=True))
        frame = store.frame()
    assert [(Path(row.model).name, row.status) for row in rows] == [
        *((n, "ok") for n in sorted(models)),
        ("zz-broken", "failed"),
    ]
    assert "ModelLoadError" in rows[-1].reason
    assert list(frame["model"]) == [m.repo_id for m in listed]  # one row per model folder
    assert list(frame["revision"]) == [m.revision for m in listed]
    for _, row in frame[frame["status"] == "ok"].iterrows():
        test_accuracy = models[Path(row["model"]).name].test_accuracy
        assert row["dataset"] == "digits:test" and row["n_samples"] == 359
        assert row["accuracy"] == pytest.approx(test_accuracy, abs=1 / 359)

    # A rerun skips every folder; the failed one (its key known from its hash alone) is not even loaded.
    loads: list[str] = []
    monkeypatch.setattr(flatscan.audit.org, "load_model", lambda name, **kwargs: loads.append(name) or load_model(name))
    with ResultsStore(tmp_path / "results.sqlite") as store:
        assert {
            row.status for row in audit_org(str(org), store, AuditOptions(TEST, device="cpu", trace_only=True))
        } == {"skipped"}
    assert sorted(Path(name).name for name in loads) == sorted(models)
    # A changed folder is a new revision: audited again.
    (broken / "model.safetensors").write_bytes(b"still not safetensors")
    assert list_org_models(str(org), pattern="zz-*")[0].revision != listed[-1].revision


def test_demo_and_zoo_train_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.console, "width", 200)  # tables unwrapped
    runner = CliRunner()
    demo_zoo = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--zoo-dir", str(demo_zoo), "--size", "3", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "flatscan leaderboard" in result.stdout and "Kendall tau" in result.stdout
    names = sorted(_models(demo_zoo))
    assert len(names) == 3 and all(name in result.stdout for name in names)
    markdown = (demo_zoo / "reports" / "leaderboard.md").read_text()
    # The rank correlation over all 3 models is a number (per family, with 1 or 2 models, there is none).
    tau = re.search(r"\| relative_flatness\s+\| all\s+\|\s+3 \|\s+(-?[\d.]+) \|", markdown)
    assert tau is not None and -1 <= float(tau.group(1)) <= 1
    # The demo wrote the rows `flatscan org` writes: auditing the zoo again finds them all.
    store = demo_zoo / zoo.STORE
    args = ["org", str(demo_zoo), "--store", str(store), "--dataset", "digits", "--split", "test", "-j", "0"]
    again = runner.invoke(app, [*args, "--device", "cpu"])
    assert again.exit_code == 0, again.output
    assert "3 models: 3 skipped" in again.stdout

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"size": 1, "grid": {"family": ["efficientnet"], "train_fraction": [0.1]}}))
    trained = runner.invoke(app, ["zoo", "train", str(tmp_path / "z"), "--spec", str(spec), "--epochs", "1"])
    assert trained.exit_code == 0, trained.output
    ((name, model),) = _models(tmp_path / "z").items()
    assert model.config.family == "efficientnet" and model.config.epochs == 1 and model.n_train == 144
    assert name in trained.stdout and "audit it with: flatscan org" in trained.stdout
    bad = runner.invoke(app, ["zoo", "train", str(tmp_path / "y"), "--preset", "huge"])
    assert bad.exit_code == 1 and "unknown zoo preset 'huge'" in bad.stderr
