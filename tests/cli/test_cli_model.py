"""`flatscan model`: the main job end to end, through typer's runner and as a subprocess. No network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from hessian_reference import randomise_norms
from PIL import Image
from timm.models import save_for_hf
from typer.testing import CliRunner

import flatscan
import flatscan.audit.run as audit_run
import flatscan.cli as cli
from flatscan.io.data import DataOptions, open_eval_data
from flatscan.io.models import load_model

runner = CliRunner()
BASE = ["-j", "0", "--dataset", "digits"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10-class timm ResNet with non-trivial BatchNorms, saved in Hub format (config.json + safetensors)."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    randomise_norms(model, torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("models") / "tiny-resnet"
    save_for_hf(model, path, safe_serialization=True)
    return path


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(cli.app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_model_json_equals_the_python_api(tiny_dir: Path) -> None:
    code, out, err = invoke("model", str(tiny_dir), *BASE, "--num-samples", "256", "-b", "64", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["n_samples"] == 256 and record["dataset"] == "digits:all" and record["source"] == "local"
    expected_keys = {"model", "feature_layer", "activation", "trace", "trace_se", "relative_flatness",
                     "relative_flatness_se", "classifier_flatness", "loss", "accuracy", "accuracy_top5", "seconds",
                     "input_size", "timm_version", "flatscan_version"}  # fmt: skip
    assert expected_keys <= record.keys()
    # The same numbers from the Python API on the same data.
    model = load_model(str(tiny_dir)).model
    data = open_eval_data(model, DataOptions(dataset="digits", batch_size=64, workers=0))
    api = flatscan.scan(model, data.batches, device="cpu", max_samples=256)
    for key in ("trace", "relative_flatness", "classifier_flatness", "loss", "accuracy", "trace_se"):
        assert record[key] == pytest.approx(getattr(api, key), rel=1e-9, abs=1e-12), key
    assert record["trace"] > 0 and record["relative_flatness"] > 0
    # Without --json the table goes to stdout.
    code, out, _ = invoke("model", str(tiny_dir), *BASE, "--num-samples", "64")
    assert code == 0 and "relative_flatness" not in out and "kappa" in out and "layer4.0.conv2" in out


def test_model_as_a_subprocess_prints_table_and_json(tiny_dir: Path) -> None:
    exe = Path(sys.executable).parent / "flatscan"
    done = subprocess.run(
        [str(exe), "model", str(tiny_dir), *BASE, "--num-samples", "64", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["n_samples"] == 64
    assert "kappa" in done.stderr  # the table, on stderr when stdout carries the JSON


def test_image_folder_and_parquet_sources(tiny_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    rows = []
    for label in range(3):
        (folder / f"class{label}").mkdir(parents=True)
        for i in range(4):
            image = Image.fromarray((torch.rand(20, 20, 3) * 255).to(torch.uint8).numpy())
            image.save(folder / f"class{label}" / f"{i}.png")
            rows.append({"image": {"bytes": (folder / f"class{label}" / f"{i}.png").read_bytes()}, "label": label})
    code, out, err = invoke("model", str(tiny_dir), "-j", "0", "--dataset", str(folder), "--json")
    assert code == 0, err
    assert json.loads(out)["n_samples"] == 12
    parquet = tmp_path / "eval.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    code, out, err = invoke("model", str(tiny_dir), "-j", "0", "--dataset", str(parquet), "--json")
    assert code == 0, err
    assert json.loads(out)["n_samples"] == 12


def test_labels_outside_the_model_fail_before_scanning(tmp_path: Path) -> None:
    model = timm.create_model("test_resnet", num_classes=5)
    save_for_hf(model, tmp_path / "five", safe_serialization=True)
    code, _, err = invoke("model", str(tmp_path / "five"), *BASE)
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("error:") and "--class-map" in err
    assert "Traceback" not in err


def test_offline_cache_miss_names_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    code, _, err = invoke("model", "hf-hub:some-org/not-cached", "--offline", *BASE)
    assert code != 0 and err.count("\n") == 1
    assert "some-org/not-cached" in err and "offline" in err.lower()


def test_unsupported_model_is_refused_with_the_reason(tmp_path: Path) -> None:
    # CBAM: a channel gate from the max as well as the mean, and a spatial gate; no closed form.
    cbam = {"block_args": {"attn_layer": "cbam"}}
    model = timm.create_model("test_resnet", num_classes=10, **cbam)
    save_for_hf(model, tmp_path / "cbam", safe_serialization=True, model_args=cbam)
    code, _, err = invoke("model", str(tmp_path / "cbam"), *BASE)
    assert code == 3
    assert err.startswith("unsupported:") and "gates the feature layer" in err and err.count("\n") == 1


def test_until_se_stops_early_and_results_file(tiny_dir: Path, tmp_path: Path) -> None:
    csv = tmp_path / "runs.csv"
    args = ["model", str(tiny_dir), *BASE, "-b", "32", "--until-se", "100", "--results-file", str(csv)]
    code, _, err = invoke(*args)
    assert code == 0, err
    code, _, err = invoke(*args)  # appends a second row
    frame = pd.read_csv(csv)
    assert list(frame["n_samples"]) == [32, 32]  # a loose target is met by the first batch's standard error
    # A file from another version (here: without the kappa bound column, an extra one at the end) gets the union
    frame.drop(columns="relative_flatness_bound").assign(old_column="kept").to_csv(csv, index=False)
    code, _, err = invoke(*args)
    merged = pd.read_csv(csv)
    assert code == 0 and list(merged["n_samples"]) == [32, 32, 32] and list(merged["model"]) == [str(tiny_dir)] * 3
    assert list(merged["old_column"].fillna("")) == ["kept", "kept", ""], merged
    code, _, err = invoke("model", str(tiny_dir), *BASE, "-b", "32", "--until-se", "1e-9", "--num-samples", "96")
    assert code == 0, err  # an unreachable target streams until the data (here --num-samples) ends
    target = tmp_path / "run.json"
    code, _, _ = invoke("model", str(tiny_dir), *BASE, "--num-samples", "32", "--results-file", str(target))
    assert code == 0 and json.loads(target.read_text())["n_samples"] == 32
    code, _, err = invoke(
        "model", str(tiny_dir), *BASE, "--num-samples", "32", "--results-file", str(tmp_path / "x.txt")
    )
    assert code != 0 and ".json or .csv" in err


def test_ctrl_c_prints_the_partial_result(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = audit_run.open_eval_data

    def interrupted_after_two_batches(model: torch.nn.Module, options: DataOptions, limit: int | None = None):
        data = real_open(model, options, limit)

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for i, batch in enumerate(data.batches):
                if i == 2:
                    raise KeyboardInterrupt
                yield batch

        return type(data)(**{**data.__dict__, "batches": batches()})

    monkeypatch.setattr(audit_run, "open_eval_data", interrupted_after_two_batches)
    code, out, err = invoke("model", str(tiny_dir), *BASE, "-b", "16", "--json")
    assert code == 130
    partial = json.loads(out)
    assert partial["n_samples"] == 32 and partial["partial"] is True  # the finished batches, marked as partial
    assert "interrupted after 32 samples" in err


def test_verify_command_certifies_a_model(tiny_dir: Path) -> None:
    code, out, err = invoke("verify", str(tiny_dir), "--pairs", "6", "--json")
    assert code == 0, err
    certificate = json.loads(out)
    assert certificate["passed"] and not certificate["degenerate"] and len(certificate["pairs"]) == 6
    assert certificate["max_relative_error"] <= 1e-8


def test_verify_command_fails_on_a_zero_scale(tmp_path: Path) -> None:
    # timm zero-initialises the last BatchNorm of a block: every Tr(H_cc') is 0 and nothing is certified.
    save_for_hf(timm.create_model("test_resnet", num_classes=10), tmp_path / "zero", safe_serialization=True)
    code, out, _ = invoke("verify", str(tmp_path / "zero"), "--pairs", "4")
    assert code == 1 and "FAIL" in out and "nothing was" in out


def test_leaderboard_command_writes_reports(tiny_dir: Path, tmp_path: Path) -> None:
    from flatscan.audit.store import ResultsStore, RunKey, preprocessing_key

    torch.manual_seed(1)
    other = timm.create_model("test_efficientnet", num_classes=10)
    randomise_norms(other, torch.Generator().manual_seed(1))
    save_for_hf(other, tmp_path / "tiny-effnet", safe_serialization=True)
    store_path = tmp_path / "results.sqlite"
    with ResultsStore(store_path) as store:
        for path in (tiny_dir, tmp_path / "tiny-effnet"):
            code, out, err = invoke("model", str(path), *BASE, "--num-samples", "64", "--json")
            assert code == 0, err
            record = json.loads(out)
            config = {"input_size": record["input_size"], "interpolation": record["interpolation"]}
            key = RunKey(record["model"], record["revision"], record["dataset"], record["split"], 64,
                         preprocessing_key(config))  # fmt: skip
            store.put(key, record)
    reported = tmp_path / "reported.csv"
    reported.write_text(f"model,top1\n{tiny_dir},71.5\n{tmp_path / 'tiny-effnet'},65.0\n")
    out_dir = tmp_path / "reports"
    code, out, err = invoke("leaderboard", str(store_path), "--reported", str(reported), "--out", str(out_dir))
    assert code == 0, err
    assert {p.name for p in out_dir.iterdir()} == {"leaderboard.md", "leaderboard.csv", "leaderboard.html"}
    table = pd.read_csv(out_dir / "leaderboard.csv")
    ranked = table[table["status"] == "ok"].sort_values("rank")
    assert list(ranked["relative_flatness"]) == sorted(ranked["relative_flatness"])
    assert set(ranked["reported_top1"]) == {71.5, 65.0}
    command = f"flatscan leaderboard {store_path} --rank-by relative_flatness --reported {reported} --out {out_dir}"
    assert f"Made with: {command} --stem leaderboard" in (out_dir / "leaderboard.md").read_text()
    assert f"<code>{command} --stem leaderboard</code>" in (out_dir / "leaderboard.html").read_text()
    code, _, err = invoke("leaderboard", str(tmp_path / "missing.sqlite"))
    assert code != 0 and "flatscan org" in err
