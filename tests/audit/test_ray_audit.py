"""flatscan.audit.ray_audit on a local Ray cluster (2 CPUs, started once for the module): the rows equal the
single-process audit's, progress streams from the workers, a task whose worker dies is retried and then recorded as
failed, a driver killed mid-audit resumes from the store, `flatscan org --ray`, and a clear error without Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import ray
from hub_server import HubServer
from org_cases import EXPECTED, MEASURES, OK, OPTIONS, ORG, N, save_model  # the org of the single-machine tests

from flatscan.audit.options import AuditOptions
from flatscan.audit.org import AuditRow, audit_org
from flatscan.audit.ray_audit import audit_org_ray
from flatscan.audit.store import ResultsStore
from flatscan.errors import FlatscanError
from flatscan.io.data import DataOptions

ROOT = Path(__file__).resolve().parents[2]
TESTS = str(Path(__file__).resolve().parent)
CRASH_ORG = "crash-org"
MEMORY_GB = 0.5  # the tasks' scheduling hint: small, so that two fit on any test machine
# Float measures may differ in the last bits: the workers run torch with 1 thread (Ray's OMP_NUM_THREADS), pytest not.
RTOL = 1e-6
FLOATS = [m for m in MEASURES if m not in ("n_samples", "feature_layer")]


@dataclass(frozen=True)
class Cluster:
    address: str
    crash_attempts: Path  # one line (the worker's pid) per attempt to load crash-org/crash


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """The loopback Hub with test-org (as in test_org.py) and crash-org, for the whole module.

    This process reaches it through patched constants; the Ray processes, started later, inherit its environment
    (HF_ENDPOINT, HF_HOME), as workers on a cluster inherit the environment of `ray start`.
    """
    root = tmp_path_factory.mktemp("ray-hub")
    zoo = {
        "resnet": save_model(root / "resnet", "test_resnet"),
        "efficientnet": save_model(root / "efficientnet", "test_efficientnet", seed=1),
        "convnext": save_model(root / "convnext", "test_convnext", seed=2, ls_init_value=1.0),
        "cbam-resnet": save_model(root / "cbam-resnet", "test_resnet", block_args={"attn_layer": "cbam"}),
        "five-classes": save_model(root / "five-classes", "test_resnet", num_classes=5),
    }
    files = {name: {p.name: p.read_bytes() for p in path.iterdir()} for name, path in zoo.items()}
    weights = files["resnet"]["model.safetensors"]
    repos = {
        "test-org/resnet": files["resnet"],
        "test-org/corrupt": dict(files["resnet"], **{"model.safetensors": weights[:1000]}),
        "test-org/efficientnet": files["efficientnet"],
        "test-org/cbam-resnet": files["cbam-resnet"],
        "test-org/no-weights": {"config.json": files["resnet"]["config.json"]},
        "test-org/convnext": files["convnext"],
        "test-org/five-classes": files["five-classes"],
    }
    assert list(repos) == list(EXPECTED)
    crash_config = json.loads(files["resnet"]["config.json"]) | {"architecture": "test_crashing_net"}
    with HubServer() as server, pytest.MonkeyPatch.context() as monkeypatch:
        for downloads, (repo_id, repo_files) in zip(range(900, 0, -100), repos.items(), strict=False):
            server.add_repo(repo_id, repo_files, downloads=downloads)
        server.add_repo(
            f"{CRASH_ORG}/crash",
            {"config.json": json.dumps(crash_config).encode(), "model.safetensors": weights},
            downloads=2,
        )
        server.add_repo(f"{CRASH_ORG}/resnet", files["resnet"], downloads=1)
        # One cache for all, as for the processes of one machine: the error messages that name a file are the same.
        server.patch(monkeypatch, root / "hf-home" / "hub")
        for key, value in (server.env(root / "hf-home") | {"TORCH_HOME": str(root / "torch")}).items():
            monkeypatch.setenv(key, value)
        yield server


@pytest.fixture(scope="module")
def cluster(hub: HubServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A local Ray cluster of 2 CPUs whose workers know the architecture that kills them (tests/ray_crash_model.py)."""
    attempts = tmp_path_factory.mktemp("crash") / "attempts"

    def load_crashing_architecture() -> None:  # nested, so that Ray ships it by value
        sys.path.insert(0, TESTS)
        import ray_crash_model

        ray_crash_model.attempts_file = str(attempts)

    context = ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        runtime_env={"worker_process_setup_hook": load_crashing_architecture},
    )
    try:
        yield Cluster(context.address_info["address"], attempts)
    finally:
        ray.shutdown()


def _ray_audit(store: ResultsStore, org: str = ORG, **kwargs: Any) -> list[AuditRow]:
    options = AuditOptions(OPTIONS, num_samples=N, device="cpu", force=kwargs.pop("force", False))
    return audit_org_ray(org, store, options, memory_gb=MEMORY_GB, **kwargs)


def _comparable(frame: pd.DataFrame) -> pd.DataFrame:
    """The store's rows by model, without what differs between two runs of the same audit (time, duration)."""
    return frame.drop(columns=["written_at", "seconds"]).sort_values("model").reset_index(drop=True)


def _check_statuses(frame: pd.DataFrame, hub: HubServer, repos: Iterable[str] = tuple(EXPECTED)) -> None:
    """One row per model of ``repos``, each with its expected status and the listed revision."""
    assert sorted(frame["model"]) == sorted(f"hf-hub:{repo}" for repo in repos)
    for _, row in frame.iterrows():
        repo = row["model"].removeprefix("hf-hub:")
        assert (row["status"], row["revision"], row["num_samples"]) == (EXPECTED[repo][0], hub.repos[repo].commit, N)


def test_ray_rows_equal_the_single_process_audit(cluster: Cluster, hub: HubServer, tmp_path: Path) -> None:
    with ResultsStore(tmp_path / "single.sqlite") as store:
        single_rows = audit_org(ORG, store, AuditOptions(OPTIONS, num_samples=N, device="cpu"))
        single = store.frame()

    finished: list[tuple[str, int, int]] = []
    progress: dict[str, list[int]] = defaultdict(list)

    def on_batch_factory(model: str) -> Any:
        return lambda running: progress[model].append(running.n_samples)

    with ResultsStore(tmp_path / "ray.sqlite") as store:
        rows = _ray_audit(
            store, on_model=lambda row, i, n: finished.append((row.model, i, n)), on_batch_factory=on_batch_factory
        )
        frame = store.frame()
    _check_statuses(frame, hub)
    # The returned rows are in listing order, as the single-process audit's; on_model follows each model as it ends.
    assert [(r.model, r.status, r.reason) for r in rows] == [(r.model, r.status, r.reason) for r in single_rows]
    assert sorted(model for model, _, _ in finished) == sorted(r.model for r in rows)
    assert [(i, n) for _, i, n in finished] == [(i, len(EXPECTED)) for i in range(1, len(EXPECTED) + 1)]
    # Every scanned model's progress came from its worker, batch by batch (32 images each), up to N.
    assert dict(progress) == {f"hf-hub:{repo}": [32, 64] for repo in OK}

    ours, theirs = _comparable(frame), _comparable(single)
    assert list(ours.columns) == list(theirs.columns)
    exact = [column for column in ours.columns if column not in FLOATS]
    pd.testing.assert_frame_equal(ours[exact], theirs[exact])
    pd.testing.assert_frame_equal(ours[FLOATS], theirs[FLOATS], check_exact=False, rtol=RTOL, atol=0)
    assert (ours.loc[ours["status"] == "ok", FLOATS].abs() > 1e-6).all().all()  # not degenerate: a real comparison
    worst = ((ours[FLOATS] - theirs[FLOATS]).abs() / theirs[FLOATS].abs()).max().max()
    print(f"largest relative difference ray vs single process over {FLOATS}: {worst:.3g}")

    # A rerun commits nothing: refused and failed models are not even submitted, measured ones are found in the store.
    with ResultsStore(tmp_path / "ray.sqlite") as store:
        again = _ray_audit(store)
        assert store.frame().equals(frame)
    assert [row.status for row in again] == ["skipped"] * len(EXPECTED)


def test_a_task_whose_worker_dies_is_retried_then_failed(cluster: Cluster, hub: HubServer, tmp_path: Path) -> None:
    with ResultsStore(tmp_path / "results.sqlite") as store:
        rows = _ray_audit(store, CRASH_ORG, max_retries=1)
        frame = store.frame().set_index("model")
    crash, resnet = rows
    assert (resnet.model, resnet.status) == (f"hf-hub:{CRASH_ORG}/resnet", "ok")  # the audit went on
    assert (crash.model, crash.status) == (f"hf-hub:{CRASH_ORG}/crash", "failed")
    print(f"reason: {crash.reason}")
    assert crash.reason.startswith("WorkerCrashedError: ") and "\n" not in crash.reason
    pids = cluster.crash_attempts.read_text().split()
    assert len(pids) == 2 and len(set(pids)) == 2  # the first attempt and its one retry, each in a fresh worker
    failed = frame.loc[crash.model]
    # The requested key, as for a model that fails before its data is opened.
    assert (failed["status"], failed["reason"], failed["revision"]) == (
        "failed",
        crash.reason,
        hub.repos[f"{CRASH_ORG}/crash"].commit,
    )
    assert failed["dataset"] == "digits" and pd.isna(failed["split"])

    with ResultsStore(tmp_path / "results.sqlite") as store:
        assert [row.status for row in _ray_audit(store, CRASH_ORG, max_retries=1)] == ["skipped", "skipped"]
    assert cluster.crash_attempts.read_text().split() == pids  # not submitted again


_DRIVER = """
import sys, time
from flatscan.audit.options import AuditOptions
from flatscan.audit.ray_audit import audit_org_ray
from flatscan.audit.store import ResultsStore
from flatscan.io.data import DataOptions

committed = []

def on_model(row, i, n):
    committed.append(row.model)
    print("row", row.model, row.status, flush=True)
    if len(committed) == 2:
        time.sleep(600)  # the driver stops here, its tasks running, until it is killed

with ResultsStore(sys.argv[1]) as store:
    options = DataOptions(dataset="digits", batch_size=32, workers=0, img_size=64)
    audit_org_ray("test-org", store, AuditOptions(options, num_samples=64, device="cpu"), address=sys.argv[2],
                  limit=4, memory_gb=0.5, on_model=on_model)
"""


def test_killed_driver_resumes_from_the_store(cluster: Cluster, hub: HubServer, tmp_path: Path) -> None:
    """A driver on the cluster killed (SIGKILL) after 2 of 4 committed rows: a rerun keeps them, does the rest, once."""
    path = tmp_path / "results.sqlite"
    with (tmp_path / "stderr").open("w") as stderr:
        driver = subprocess.Popen(
            [sys.executable, "-c", _DRIVER, str(path), cluster.address],
            env=os.environ,  # the hub fixture's: this driver lists the org on the loopback Hub
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        watchdog = threading.Timer(180, driver.kill)  # a driver that never gets there ends the test, not the session
        watchdog.start()
        committed = []
        try:
            for line in driver.stdout or ():
                if line.startswith(b"row "):  # Ray also forwards its workers' output
                    committed.append(line.decode().split()[1])
                if len(committed) == 2:
                    driver.send_signal(signal.SIGKILL)
                    break
        finally:
            watchdog.cancel()
            driver.wait()
    assert driver.returncode == -signal.SIGKILL, (tmp_path / "stderr").read_text()[-3000:]
    with ResultsStore(path) as store:
        before = store.frame().set_index("model")
    assert sorted(before.index) == sorted(committed)

    with ResultsStore(path) as store:
        rows = _ray_audit(store, limit=4)
        frame = store.frame()
    _check_statuses(frame, hub, list(EXPECTED)[:4])  # every model exactly once
    assert sorted(row.model for row in rows if row.status == "skipped") == sorted(committed)  # not recomputed
    kept = ["status", "reason", "written_at", "seconds", "trace", "relative_flatness"]
    assert frame.set_index("model").loc[committed, kept].equals(before.loc[committed, kept])  # intact


def test_org_command_with_ray(cluster: Cluster, hub: HubServer, tmp_path: Path) -> None:
    """`flatscan org --ray` on the cluster this process is connected to (which it leaves running)."""
    from typer.testing import CliRunner

    from flatscan.cli import app

    store = tmp_path / "results.sqlite"
    args = ["org", ORG, "--filter", "*resnet", "--ray", "--ray-memory-gb", str(MEMORY_GB), "--store", str(store)]
    args += ["--dataset", "digits", "--img-size", "64", "-b", "32", "-j", "0", "--num-samples", str(N)]
    result = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "2 models: 1 ok, 1 unsupported" in result.stdout
    assert "unsupported: hf-hub:test-org/cbam-resnet" in result.stderr  # refusals are reported as they arrive
    with ResultsStore(store) as results:
        _check_statuses(results.frame(), hub, ["test-org/resnet", "test-org/cbam-resnet"])
    assert ray.is_initialized()


def test_without_ray_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flatscan.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with ResultsStore(tmp_path / "results.sqlite") as store, pytest.raises(FlatscanError) as info:
        audit_org_ray(ORG, store, AuditOptions(OPTIONS))
    assert str(info.value) == "auditing on a Ray cluster needs Ray: pip install 'flatscan[ray]'"
    result = CliRunner().invoke(app, ["org", ORG, "--ray", "--store", str(tmp_path / "results.sqlite")])
    assert result.exit_code == 1 and "pip install 'flatscan[ray]'" in result.stderr


def test_relative_data_paths_are_refused(tmp_path: Path) -> None:
    """A worker would resolve them in its own directory: a one-line error names the absolute path to give."""
    with ResultsStore(tmp_path / "results.sqlite") as store:
        with pytest.raises(FlatscanError, match=r"^dataset \./tests is a relative path, .* give it as /\S+/tests "):
            audit_org_ray(ORG, store, AuditOptions(DataOptions(dataset="./tests")))
        with pytest.raises(FlatscanError, match=r"^class map map\.txt is a relative path"):
            audit_org_ray(ORG, store, AuditOptions(DataOptions(dataset="digits", class_map=Path("map.txt"))))
