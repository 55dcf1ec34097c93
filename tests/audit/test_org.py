"""flatscan.audit.org: listing an organisation (paged, filtered, offline from the cache) and auditing it into the
results store: statuses and reasons, numbers equal to a direct scan, resume (also after SIGKILL), force, pattern,
limit."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from hub_server import HubServer
from huggingface_hub import constants
from org_cases import EXPECTED, MEASURES, OK, OPTIONS, ORG, TRANSFORMERS, N, save_model

import flatscan
import flatscan.audit.run
from flatscan.audit.options import AuditOptions
from flatscan.audit.org import AuditRow, OrgModel, audit_org, list_org_models
from flatscan.audit.ray_audit import audit_org_ray
from flatscan.audit.store import ResultsStore
from flatscan.errors import FlatscanError
from flatscan.io.data import open_eval_data
from flatscan.io.models import load_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved timm-format directories, built once for the module."""
    root = tmp_path_factory.mktemp("zoo")
    return {
        "resnet": save_model(root / "resnet", "test_resnet"),
        "efficientnet": save_model(root / "efficientnet", "test_efficientnet", seed=1),
        "convnext": save_model(root / "convnext", "test_convnext", seed=2, ls_init_value=1.0),  # timm: 1e-6
        "cbam-resnet": save_model(root / "cbam-resnet", "test_resnet", block_args={"attn_layer": "cbam"}),
        "five-classes": save_model(root / "five-classes", "test_resnet", num_classes=5),
    }


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zoo: dict[str, Path]) -> Iterator[HubServer]:
    """A loopback Hub with the org (pages of 2 entries), an empty cache, and no way to reach the real Hub."""
    with HubServer(page_size=2) as server:
        server.patch(monkeypatch, tmp_path / "hf-cache")
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        files = {name: {p.name: p.read_bytes() for p in path.iterdir()} for name, path in zoo.items()}
        corrupt = dict(files["resnet"], **{"model.safetensors": files["resnet"]["model.safetensors"][:1000]})
        repos = {
            "test-org/resnet": files["resnet"],
            "test-org/corrupt": corrupt,
            "test-org/efficientnet": files["efficientnet"],
            "test-org/cbam-resnet": files["cbam-resnet"],
            "test-org/no-weights": {"config.json": files["resnet"]["config.json"]},
            "test-org/convnext": files["convnext"],
            "test-org/five-classes": files["five-classes"],
        }
        for downloads, (repo_id, repo_files) in zip(range(900, 0, -100), repos.items(), strict=False):
            server.add_repo(repo_id, repo_files, downloads=downloads)
        vit_config = {"config.json": json.dumps({"architectures": ["ViTForImageClassification"]}).encode()}
        server.add_repo(
            TRANSFORMERS, vit_config | {"model.safetensors": b"0"}, downloads=5000, library_name="transformers"
        )
        server.add_repo("test-org/features", files["resnet"], downloads=4000, pipeline_tag="image-feature-extraction")
        server.add_repo("other-org/resnet", files["resnet"], downloads=3000)
        yield server


def _audit(store: ResultsStore, force: bool = False, offline: bool = False, **kwargs: Any) -> list[AuditRow]:
    options = AuditOptions(OPTIONS, num_samples=N, device="cpu", force=force, offline=offline)
    return audit_org(ORG, store, options, **kwargs)


def _listing_requests(hub: HubServer) -> list[str]:
    return [path for _, path in hub.requests if path.startswith("/api/models")]


def test_listing_pages_filters_and_sorts(hub: HubServer) -> None:
    models = list_org_models(ORG)
    assert [m.repo_id for m in models] == list(EXPECTED)
    assert models[0] == OrgModel("test-org/resnet", 900, "timm", hub.repos["test-org/resnet"].commit)
    assert len(_listing_requests(hub)) == 4  # 7 models in pages of 2, each next page from the Link header
    first = _listing_requests(hub)[0]
    assert (
        "author=test-org" in first and "filter=image-classification&filter=timm" in first and "sort=downloads" in first
    )

    hub.requests.clear()
    assert [m.repo_id for m in list_org_models(ORG, limit=1)] == ["test-org/resnet"]
    assert len(_listing_requests(hub)) == 1  # later pages are never requested
    assert [m.repo_id for m in list_org_models(ORG, pattern="*net*", limit=3)] == [
        "test-org/resnet",
        "test-org/efficientnet",
        "test-org/cbam-resnet",
    ]
    by_prefix = list_org_models(ORG, pattern="test-org/co*")
    assert [m.repo_id for m in by_prefix] == ["test-org/corrupt", "test-org/convnext"]
    assert list_org_models(ORG, pattern="*NET*") == []  # case-sensitive
    with_transformers = list_org_models(ORG, include_transformers=True, limit=2)
    assert [(m.repo_id, m.library) for m in with_transformers] == [(TRANSFORMERS, "transformers"), (OK[0], "timm")]
    assert list_org_models("nobody") == []
    with pytest.raises(FlatscanError, match="limit must be a positive"):
        list_org_models(ORG, limit=0)


def test_listing_without_network_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # huggingface_hub's retry backoff
    with pytest.raises(FlatscanError, match=f"cannot list the models of {ORG} on {dead} .*pass --offline") as info:
        list_org_models(ORG)
    assert "\n" not in str(info.value)


def _check_store(frame: pd.DataFrame, hub: HubServer) -> None:
    """One row per model of the org, in listing order, with the expected status, reason and revision."""
    assert list(frame["model"]) == [f"hf-hub:{repo}" for repo in EXPECTED]
    for (_, row), (repo, (status, reason)) in zip(frame.iterrows(), EXPECTED.items(), strict=True):
        assert row["status"] == status, (repo, row["reason"])
        if reason is None:
            assert pd.isna(row["reason"])
        else:
            assert re.search(reason, row["reason"]) and "\n" not in row["reason"], row["reason"]
        assert (row["revision"], row["num_samples"]) == (hub.repos[repo].commit, N)


def test_audits_refuse_kappa_rtol_before_listing(tmp_path: Path) -> None:
    # A store's run keys do not record kappa_rtol: a bounded kappa must never pass for an exact one there.
    options = AuditOptions(OPTIONS, num_samples=N, device="cpu", kappa_rtol=1e-3)
    with ResultsStore(tmp_path / "results.sqlite") as store:
        for audit in (audit_org, audit_org_ray):
            with pytest.raises(FlatscanError, match="kappa_rtol is for single scans"):
                audit("no-such-org-anywhere", store, options)
        assert store.frame().empty


def test_audit_rows_and_numbers_resume_force(hub: HubServer, tmp_path: Path) -> None:
    with ResultsStore(tmp_path / "results.sqlite") as store:
        seen: list[tuple[str, int, int]] = []
        rows = _audit(store, on_model=lambda row, i, n: seen.append((row.model, i, n)))
        frame = store.frame()
    assert seen == [(f"hf-hub:{repo}", i, len(EXPECTED)) for i, repo in enumerate(EXPECTED, 1)]
    _check_store(frame, hub)
    reasons = [None if pd.isna(reason) else reason for reason in frame["reason"]]
    assert [(row.model, row.status, row.reason) for row in rows] == list(
        zip(frame["model"], frame["status"], reasons, strict=True)
    )
    by_model = frame.set_index("model")
    for repo in OK:
        # The audit's numbers are a plain scan's: same model, same data, same preprocessing.
        loaded = load_model(f"hf-hub:{repo}", offline=True)
        data = open_eval_data(loaded.model, OPTIONS)
        direct = flatscan.scan(loaded.model, data.batches, device="cpu", max_samples=N)
        assert min(abs(direct.relative_flatness), abs(direct.trace)) > 1e-6  # random norms and scales: not degenerate
        row = next(row for row in rows if row.model == f"hf-hub:{repo}")
        for measure in MEASURES:
            assert row.record[measure] == by_model.loc[row.model, measure] == getattr(direct, measure), measure
        assert (row.record["dataset"], row.record["split"], row.record["input_size"]) == (
            "digits:all",
            "all",
            [3, 64, 64],
        )
    refused = by_model.loc["hf-hub:test-org/cbam-resnet"]
    assert (refused["architecture"], refused["dataset"]) == ("test_resnet", "digits") and pd.isna(refused["split"])
    assert json.loads(refused["preprocessing"])["input_size"] == [3, 64, 64]  # the requested key: data never opened

    # A rerun computes nothing and writes nothing; refused and failed models are not even downloaded again.
    hub.requests.clear()
    with ResultsStore(tmp_path / "results.sqlite") as store:
        again = _audit(store)
        assert store.frame().equals(frame)
    assert [row.status for row in again] == ["skipped"] * len(EXPECTED)
    assert all(row.record is None and row.reason is None for row in again)
    not_ok = [repo for repo in EXPECTED if repo not in OK]
    assert not [path for _, path in hub.requests if any(repo in path for repo in not_ok)]

    # force recomputes (here the first model the pattern picks: resnet, not cbam-resnet) and replaces its row.
    with ResultsStore(tmp_path / "results.sqlite") as store:
        forced = _audit(store, force=True, pattern="*resnet", limit=1)
        after = store.frame().set_index("model")
    assert [(row.model, row.status) for row in forced] == [("hf-hub:test-org/resnet", "ok")]
    assert len(after) == len(EXPECTED)
    assert after.loc["hf-hub:test-org/resnet", "seconds"] == forced[0].record["seconds"]
    assert after.loc["hf-hub:test-org/resnet", "trace"] == by_model.loc["hf-hub:test-org/resnet", "trace"]


def test_offline_audit_lists_the_cache(hub: HubServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with ResultsStore(tmp_path / "results.sqlite") as store:
        _audit(store, pattern="[!e]*", include_transformers=True)  # downloads all but efficientnet into the cache
        frame = store.frame()
        hub.requests.clear()
        with caplog.at_level(logging.WARNING, logger="flatscan.audit.org"):
            cached = list_org_models(ORG, offline=True, include_transformers=True)
        assert "offline: the models of test-org are listed from the Hugging Face cache" in caplog.text
        # By name, no download counts; the transformers repo is cached but not timm.
        names = sorted(repo for repo in [*EXPECTED, TRANSFORMERS] if repo != "test-org/efficientnet")
        assert [m.repo_id for m in cached] == names
        assert all(m.downloads is None and m.revision == hub.repos[m.repo_id].commit for m in cached)
        assert {m.repo_id for m in cached if m.library != "timm"} == {TRANSFORMERS}
        assert [m.repo_id for m in list_org_models(ORG, offline=True)] == [n for n in names if n != TRANSFORMERS]
        rows = _audit(store, offline=True, include_transformers=True)
        assert [row.status for row in rows] == ["skipped"] * len(names)
        assert store.frame().equals(frame)
    assert hub.requests == []
    transformers_row = frame.set_index("model").loc[f"hf-hub:{TRANSFORMERS}"]
    assert transformers_row["status"] == "failed" and "is not a timm model" in transformers_row["reason"]


def test_out_of_memory_halves_the_batch(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scan = flatscan.scan
    # The scan that runs.scan_with_retry calls, failing like CUDA does when the batch is too large.

    def scan_fitting(largest: int) -> Any:
        def scan_or_run_out(model: torch.nn.Module, batches: Any, **kwargs: Any) -> Any:
            if len(next(iter(batches))[1]) > largest:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return scan(model, batches, **kwargs)

        return scan_or_run_out

    monkeypatch.setattr(flatscan.audit.run, "scan", scan_fitting(8))
    with ResultsStore(tmp_path / "results.sqlite") as store:
        (row,) = _audit(store, pattern="resnet")
        assert (row.status, row.record["batch_size"], row.record["n_samples"]) == ("ok", 8, N)
        monkeypatch.setattr(flatscan.audit.run, "scan", scan_fitting(0))
        (row,) = _audit(store, pattern="convnext")
        assert (row.status, row.reason) == (
            "failed",
            "FlatscanError: out of memory even at batch size 1; try --device cpu",
        )
        assert [row.status for row in _audit(store, pattern="convnext")] == ["skipped"]
        failed = store.frame().set_index("model").loc["hf-hub:test-org/convnext"]
    assert (failed["dataset"], failed["split"]) == ("digits:all", "all")  # failed while scanning: the scan's key


_AUDIT_SCRIPT = """
import sys, time
from flatscan.audit.options import AuditOptions
from flatscan.audit.org import audit_org
from flatscan.audit.store import ResultsStore
from flatscan.io.data import DataOptions

committed = []

def on_model(row, i, n):
    committed.append(row.model)
    print("row", row.model, row.status, flush=True)

def on_batch_factory(model):
    def on_batch(running):
        print("batch", model, flush=True)
        if committed:
            time.sleep(600)  # every model after the first: scanning until killed
    return on_batch

with ResultsStore(sys.argv[1]) as store:
    options = DataOptions(dataset="digits", batch_size=32, workers=0, img_size=64)
    audit_org("test-org", store, AuditOptions(options, num_samples=64, device="cpu"), on_model=on_model,
              on_batch_factory=on_batch_factory)
"""


def test_sigkill_mid_audit_resumes_without_recomputing(hub: HubServer, tmp_path: Path) -> None:
    """Kill -9 while a model is being scanned: the committed rows survive and are skipped, the rest are done."""
    path = tmp_path / "results.sqlite"
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env |= hub.env(tmp_path / "hf-home") | {"TORCH_HOME": str(tmp_path / "torch")}
    with (tmp_path / "stderr").open("w") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", _AUDIT_SCRIPT, str(path)], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr
        )
        watchdog = threading.Timer(120, child.kill)  # a child that never gets there ends the test, not the session
        watchdog.start()
        lines = []
        try:
            for raw in child.stdout or ():
                lines.append(raw.decode().split())
                if lines[-1][0] == "batch" and any(line[0] == "row" for line in lines):
                    child.send_signal(signal.SIGKILL)  # mid-scan of the model after the first rows
                    break
        finally:
            watchdog.cancel()
            child.wait()
    assert child.returncode == -signal.SIGKILL, (tmp_path / "stderr").read_text()
    committed = [line[1] for line in lines if line[0] == "row"]
    scanning = lines[-1][1]
    assert committed == ["hf-hub:test-org/resnet", "hf-hub:test-org/corrupt"] and scanning not in committed

    with ResultsStore(path) as store:
        before = store.frame().set_index("model")
    assert list(before.index) == committed
    assert before.loc["hf-hub:test-org/resnet", "status"] == "ok"

    with ResultsStore(path) as store:
        rows = _audit(store)
        frame = store.frame()
    _check_store(frame, hub)
    assert {row.model for row in rows if row.status == "skipped"} == set(committed)  # not recomputed
    after = frame.set_index("model")
    kept = ["status", "reason", "written_at", "seconds", "trace", "relative_flatness"]
    assert after.loc[committed, kept].equals(before.loc[committed, kept])  # intact


def test_org_and_leaderboard_commands(hub: HubServer, tmp_path: Path) -> None:
    """The acceptance path through the CLI: `flatscan org` audits the loopback org, `flatscan leaderboard` ranks it."""
    from typer.testing import CliRunner

    from flatscan.cli import app

    runner = CliRunner()
    store = tmp_path / "results.sqlite"
    args = ["org", ORG, "--store", str(store), "--dataset", "digits", "--img-size", "64", "-b", "32", "-j", "0"]
    result = runner.invoke(app, [*args, "--num-samples", str(N), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"{len(EXPECTED)} models" in result.stdout and "3 ok" in result.stdout
    assert "unsupported: hf-hub:test-org/" in result.stderr  # refusals are reported as they happen
    with ResultsStore(store) as results:
        _check_store(results.frame(), hub)
    again = runner.invoke(app, [*args, "--num-samples", str(N), "--device", "cpu"])
    assert again.exit_code == 0 and f"{len(EXPECTED)} skipped" in again.stdout
    out = tmp_path / "reports"
    board = runner.invoke(app, ["leaderboard", str(store), "--dataset", "digits:all", "--out", str(out), "--offline"])
    assert board.exit_code == 0, board.output
    assert {p.suffix for p in out.iterdir()} == {".md", ".csv", ".html"}
    assert "test-org/resnet" in (out / "leaderboard.md").read_text()


def test_network_faults_are_not_stored_and_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zoo: dict[str, Path]
) -> None:
    # The listing and metadata answer, then every file download is refused (the CDN is down): the network's fault.
    store_path = tmp_path / "audit.sqlite"
    options = AuditOptions(OPTIONS, num_samples=32, device="cpu")
    for cdn_up in (False, True):
        with HubServer() as server:
            server.patch(monkeypatch, tmp_path / f"hf-cache-{cdn_up}")
            server.add_repo("test-org/resnet", zoo["resnet"])
            if not cdn_up:
                server._cdn.shutdown()
                server._cdn.server_close()
            with ResultsStore(store_path) as store:
                (row,) = audit_org(ORG, store, options)
                stored = store.frame()
        if not cdn_up:
            assert row.status == "retry" and "rerun to retry" in (row.reason or ""), row
            assert stored.empty  # nothing recorded as the model's verdict
        else:
            assert row.status == "ok" and list(stored["status"]) == ["ok"]
