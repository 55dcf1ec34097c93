"""Faults and bad input: a non-finite number is never a result, and the CLI's errors are one line, checked early."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import timm
import torch
from hessian_reference import randomise_norms
from timm.models import save_for_hf
from typer.testing import CliRunner

import flatscan
import flatscan.cli as cli
from flatscan.io.data import DataOptions, open_eval_data

runner = CliRunner()
BASE = ["-j", "0", "--dataset", "digits", "--num-samples", "32", "-b", "16"]


def tiny_resnet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=10)
    randomise_norms(model, torch.Generator().manual_seed(seed))
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An intact model and one whose feature layer holds a NaN, in Hub format, in one folder (a local org)."""
    root = tmp_path_factory.mktemp("faults")
    save_for_hf(tiny_resnet(), root / "intact", safe_serialization=True)
    broken = tiny_resnet()
    with torch.no_grad():
        broken.layer4[0].conv2.weight[0, 0, 0, 0] = float("nan")
    save_for_hf(broken, root / "orgs" / "nan-weights", safe_serialization=True)
    return root


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(cli.app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_nan_weights_are_an_error_naming_the_tensor(models: Path) -> None:
    model = flatscan.load_model(str(models / "orgs" / "nan-weights")).model
    data = open_eval_data(model, DataOptions(dataset="digits", batch_size=16, workers=0))
    with pytest.raises(flatscan.NonFiniteValue, match=r"layer4\.0\.conv2\.weight holds 1 NaN/Inf value"):
        flatscan.scan(model, data.batches, device="cpu", max_samples=16)


def test_nan_logits_are_an_error_naming_the_logits(models: Path) -> None:
    # Finite weights whose forward is not: a negative BatchNorm variance makes sqrt(var + eps) NaN.
    model = flatscan.load_model(str(models / "intact")).model
    with torch.no_grad():
        model.layer1[0].bn1.running_var[0] = -1.0
    data = open_eval_data(model, DataOptions(dataset="digits", batch_size=16, workers=0))
    with pytest.raises(flatscan.NonFiniteValue, match=r"the logits of 16 of 16 samples .* are NaN/Inf"):
        flatscan.scan(model, data.batches, device="cpu", max_samples=16)


def test_org_stores_non_finite_models_as_failed_and_exits_non_zero(models: Path, tmp_path: Path) -> None:
    store = tmp_path / "audit.sqlite"
    code, _, err = invoke("org", str(models / "orgs"), "--store", str(store), *BASE)
    assert code != 0 and "every model" in err and "Traceback" not in err
    with sqlite3.connect(store) as connection:
        rows = connection.execute("SELECT status, reason FROM runs").fetchall()
    assert len(rows) == 1 and rows[0][0] == "failed" and "NaN/Inf" in rows[0][1], rows


def test_one_sample_json_is_strict(models: Path) -> None:
    code, out, err = invoke("model", str(models / "intact"), "-j", "0", "--dataset", "digits", "--num-samples", "1",
                            "--json")  # fmt: skip
    assert code == 0, err
    record = json.loads(out, parse_constant=lambda name: pytest.fail(f"bare {name} in the JSON"))
    assert record["trace_se"] is None and record["n_samples"] == 1


def test_kappa_rtol_prints_its_bound_and_refuses_trace_only(models: Path) -> None:
    intact = str(models / "intact")
    code, out, err = invoke("model", intact, *BASE, "--kappa-rtol", "0.5", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["relative_flatness_bound"] >= 0 and record["relative_flatness"] is not None
    code, out, err = invoke("model", intact, *BASE, "--kappa-rtol", "0.5")
    assert code == 0 and "classes left out: exact value within +" in out, out
    code, _, err = invoke("model", intact, *BASE, "--kappa-rtol", "0.5", "--trace-only")
    assert code != 0 and "drop one of them" in err and "Traceback" not in err, err


# Each case: CLI arguments (after `model <path>`), what the one-line error names. They fail before the model loads:
# the model path does not exist, so an error about it would mean the check came too late.
CASES = {
    "unknown device": (["--device", "foo"], "not a device torch knows"),
    "missing CUDA device": (["--device", "cuda:7"], "cuda"),
    "results file in a missing folder": (["--results-file", "no/such/folder/r.csv"], "does not exist"),
    "results file of another kind": (["--results-file", "r.txt"], "use a .json or .csv"),
}
if not torch.backends.mps.is_available():
    CASES["MPS on a machine without it"] = (["--device", "mps"], "MPS is not available")
if not torch.cuda.is_available():
    CASES["CUDA on a machine without it"] = (["--device", "cuda"], "CUDA is not available")


@pytest.mark.parametrize("case", CASES)
def test_bad_options_are_one_line_before_loading(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args, named = CASES[case]
    code, out, err = invoke("model", str(tmp_path / "not-loaded"), *BASE, *args)
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and err.startswith("error:") and "Traceback" not in err, err
    message = err.removeprefix(f"error: {tmp_path / 'not-loaded'}: ")  # the subject, then what is wrong
    assert named in message and "not-loaded" not in message, err


# `flatscan leaderboard` report targets: checked first, whatever the store.
REPORT_CASES = {
    "stem with a folder": (["--stem", "../outside"], "plain file name"),
    "out that is a file": (["--out", "a-file"], "is a file"),
}


@pytest.mark.parametrize("case", REPORT_CASES)
def test_bad_report_targets_are_one_line(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    args, named = REPORT_CASES[case]
    code, _, err = invoke("leaderboard", str(tmp_path / "missing.sqlite"), *args)
    assert code != 0 and err.count("\n") == 1 and named in err and "Traceback" not in err, err
    assert not (tmp_path.parent / "outside.md").exists()


def test_ctrl_c_while_loading_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.models, "load", interrupted)
    code, _, err = invoke("model", "resnet18", *BASE)
    assert code == 130 and err.count("\n") == 1 and err.startswith("interrupted:"), err


def test_control_characters_in_names_are_shown_escaped(tmp_path: Path) -> None:
    code, _, err = invoke("model", str(tmp_path / "red\x1b[31mname"), *BASE)
    assert code != 0 and err.count("\n") == 1
    assert "\x1b" not in err and "\\x1b[31m" in err, repr(err)


def test_model_args_the_architecture_rejects_are_one_line(models: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bad-args"
    save_for_hf(tiny_resnet(), folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    config["model_args"] = {"no_such_argument": 1}
    (folder / "config.json").write_text(json.dumps(config))
    code, _, err = invoke("model", str(folder), *BASE)
    assert code == 2 and err.count("\n") == 1 and "rejects the model_args" in err and "no_such_argument" in err, err


def test_another_applications_database_is_refused_untouched(tmp_path: Path) -> None:
    foreign = tmp_path / "app.sqlite"
    with sqlite3.connect(foreign) as connection:
        connection.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT)")
        connection.execute("INSERT INTO runs (name) VALUES ('theirs')")
    connection.close()
    before = foreign.read_bytes()
    code, _, err = invoke("org", str(tmp_path / "no-such-org"), "--store", str(foreign), *BASE)
    assert code != 0 and err.count("\n") == 1 and "another application's SQLite database" in err, err
    assert foreign.read_bytes() == before and not (tmp_path / "app.sqlite-wal").exists()


def test_numeric_class_folders_sorted_as_text_get_a_note(models: Path, tmp_path: Path) -> None:
    from PIL import Image

    for folder in ("1", "10", "2"):
        (tmp_path / "images" / folder).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (24, 24), (40 * i, 90, 160)).save(tmp_path / "images" / folder / f"{i}.png")
    code, _, err = invoke("model", str(models / "intact"), "-j", "0", "--dataset", str(tmp_path / "images"))
    assert code == 0, err
    assert "note:" in err and "sorted as text" in err and "folder '10' is class 1" in err, err


def test_relative_dataset_path_that_does_not_exist_says_so(models: Path, tmp_path: Path) -> None:
    code, _, err = invoke("model", str(models / "intact"), "-j", "0", "--dataset", "no-such/folder")
    assert code != 0 and err.count("\n") == 1 and "there is no folder" in err, err


def test_zoo_train_into_a_file_is_one_line_before_training(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    code, _, err = invoke("zoo", "train", str(tmp_path / "a-file" / "zoo"), "--size", "1", "--epochs", "1")
    assert code != 0 and err.count("\n") == 1 and "cannot create" in err and "Traceback" not in err, err


def test_num_samples_picks_the_same_images_whatever_the_workers_and_batch_size(models: Path, tmp_path: Path) -> None:
    # A parquet file of 3 row groups (3 shards): workers interleave them, so "the first N to arrive" would differ.
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    digits = load_digits()
    from io import BytesIO

    from PIL import Image

    def png(index: int) -> bytes:
        buffer = BytesIO()
        Image.fromarray((digits.images[index] * 15).astype("uint8")).save(buffer, format="PNG")
        return buffer.getvalue()

    rows = [{"image": {"bytes": png(i), "path": None}, "label": int(digits.target[i])} for i in range(60)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "digits.parquet", row_group_size=20)
    records = []
    for workers, batch in (("0", "16"), ("2", "7")):
        code, out, err = invoke("model", str(models / "intact"), "--dataset", str(tmp_path / "digits.parquet"),
                                "-j", workers, "-b", batch, "--num-samples", "30", "--json")  # fmt: skip
        assert code == 0, err
        records.append(json.loads(out))
    assert records[0]["n_samples"] == records[1]["n_samples"] == 30
    for key in ("trace", "relative_flatness", "loss", "accuracy"):
        # The same 30 images; float32 convolutions round a little differently in batches of 7 and of 16.
        assert records[1][key] == pytest.approx(records[0][key], rel=1e-5), key


# The one-line rule over the CLI as a whole: every command, bad input of each kind. {model} is an intact model
# folder, {tmp} the test's folder (holding a-file, a plain file). Each: argv, a phrase the line must contain.
WHOLE_CLI = {
    "describe: unknown model": (["describe", "no_such_net"], "no_such_net"),
    "verify: unknown model": (["verify", "no_such_net"], "no_such_net"),
    "verify: not a checkpoint": (["verify", "--checkpoint", "{tmp}/a-file", "--arch", "resnet18"], "a-file"),
    "model: missing folder": (["model", "{tmp}/nothing-here", *BASE], "nothing-here"),
    "model: unknown device": (["model", "{model}", *BASE, "--device", "foo"], "not a device"),
    "model: dataset path": (["model", "{model}", "-j", "0", "--dataset", "./no-such-folder"], "does not exist"),
    "model: class map missing": (["model", "{model}", *BASE, "--class-map", "{tmp}/none.txt"], "none.txt"),
    "model: results file": (["model", "{model}", *BASE, "--results-file", "{tmp}/no/r.csv"], "does not exist"),
    "org: unknown device": (["org", "{tmp}", "--store", "{tmp}/s.sqlite", *BASE, "--device", "foo"], "not a device"),
    "org: store that is a file of text": (["org", "{tmp}", "--store", "{tmp}/a-file", *BASE], "a-file"),
    "org: empty folder": (["org", "{tmp}/empty", "--store", "{tmp}/s.sqlite", *BASE], "empty"),
    "leaderboard: missing store": (["leaderboard", "{tmp}/none.sqlite", "--out", "{tmp}/r"], "no results store"),
    "leaderboard: stem": (["leaderboard", "{tmp}/none.sqlite", "--stem", "../x"], "plain file name"),
    "leaderboard: out is a file": (["leaderboard", "{tmp}/none.sqlite", "--out", "{tmp}/a-file"], "is a file"),
    "zoo train: into a file": (["zoo", "train", "{tmp}/a-file/zoo", "--size", "1"], "cannot create"),
    "zoo study: missing zoo": (["zoo", "study", "{tmp}/no-zoo", "--out", "{tmp}/study"], "no-zoo"),
}


@pytest.mark.parametrize("case", WHOLE_CLI)
def test_every_command_fails_in_one_line(
    case: str, models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a model, a store or a folder")
    (tmp_path / "empty").mkdir()
    argv, phrase = WHOLE_CLI[case]
    argv = [arg.format(model=models / "intact", tmp=tmp_path) for arg in argv]
    code, _, err = invoke(*argv)
    assert code != 0, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(("error:", "unsupported:")) and phrase in err, err
