"""Results store: round trip, run keys (NULLs included), replace, concurrent reading, and a SIGKILL mid-write."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest

from flatscan.audit.store import ResultsStore, RunKey, preprocessing_key
from flatscan.errors import FlatscanError

CONFIG = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "crop_pct": 0.95,
    "crop_mode": "center",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
}
PREPROCESSING = preprocessing_key(CONFIG)


def _key(model: str = "timm/resnet50.a1_in1k", revision: str | None = "abc123", **changes: object) -> RunKey:
    fields = {"dataset": "imagenet-1k", "split": "validation", "num_samples": 512, "preprocessing": PREPROCESSING}
    return RunKey(model=model, revision=revision, **{**fields, **changes})


def _record(trace: float = 1.5) -> dict[str, object]:
    """A row as flatscan.audit.run.result_record builds it, plus one key the store does not know."""
    return {
        "model": "timm/resnet50.a1_in1k",
        "revision": "abc123",
        "source": "hub",
        "architecture": "resnet50",
        "family": "resnet",
        "feature_layer": "layer4.2.conv3",
        "activation": "relu",
        "head_type": "linear",
        "n_samples": 512,
        "trace": trace,
        "trace_se": 0.25,
        "relative_flatness": None,  # a trace_only scan
        "relative_flatness_se": None,
        "classifier_flatness": 3.0,
        "classifier_flatness_se": float("nan"),
        "loss": 0.9,
        "loss_se": 0.01,
        "accuracy": 0.8,
        "accuracy_top5": 0.95,
        "device": "cpu",
        "seconds": 12.5,
        "dataset": "imagenet-1k",
        "split": "validation",
        "label_mapping": "identity",
        "input_size": [3, 224, 224],
        "interpolation": "bicubic",
        "crop_pct": 0.95,
        "batch_size": 64,
        "flatscan_version": "0.1.0",
        "timm_version": "1.0.0",
        "torch_version": "2.5.0",
        "python_version": "3.11.7",
        "reported_top1": 80.4,  # not a known column: kept in the JSON extra column
    }


def test_preprocessing_key_is_canonical() -> None:
    shuffled = dict(reversed(list(CONFIG.items())))
    assert preprocessing_key(shuffled) == PREPROCESSING
    assert preprocessing_key({**CONFIG, "input_size": [3, 224, 224], "num_classes": 1000}) == PREPROCESSING
    assert preprocessing_key({**CONFIG, "crop_pct": 0.875}) != PREPROCESSING
    assert json.loads(PREPROCESSING)["mean"] == [0.485, 0.456, 0.406]


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite"
    with ResultsStore(path) as store:
        store.put(_key(), _record())
    with ResultsStore(path) as store:  # reopened: nothing lives only in memory
        frame = store.frame()
    assert len(frame) == 1
    row = frame.iloc[0]
    expected = _record()
    for name in ("model", "revision", "source", "family", "feature_layer", "label_mapping", "python_version"):
        assert row[name] == expected[name]
    for name in ("trace", "trace_se", "loss", "accuracy", "crop_pct", "seconds", "reported_top1"):
        assert row[name] == pytest.approx(expected[name], abs=0, rel=1e-15)
    assert row["n_samples"] == 512 and row["batch_size"] == 64 and row["num_samples"] == 512
    assert row["input_size"] == [3, 224, 224]
    assert math.isnan(row["relative_flatness"]) and math.isnan(row["classifier_flatness_se"])
    assert row["status"] == "ok" and row["preprocessing"] == PREPROCESSING
    # The known fields are real SQL columns, usable without pandas.
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT trace, family FROM runs").fetchone() == (1.5, "resnet")
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("1",)


def test_done_tells_keys_apart_with_nulls(tmp_path: Path) -> None:
    with ResultsStore(tmp_path / "r.sqlite") as store:
        key = _key(revision=None, split=None, num_samples=None)
        assert not store.done(key)
        store.put(key, {}, status="unsupported", reason="SE gate after the feature conv")
        assert store.done(key)
        assert store.done(_key(revision=None, split=None, num_samples=None))  # an equal key, not the same object
        for other in (
            _key(revision="abc123", split=None, num_samples=None),
            _key(revision=None, split="validation", num_samples=None),
            _key(revision=None, split=None, num_samples=100),
            _key(revision=None, split=None, num_samples=None, preprocessing=preprocessing_key({})),
            _key(model="timm/resnet18.a1_in1k", revision=None, split=None, num_samples=None),
        ):
            assert not store.done(other)
        # The same NULL-holding key again replaces its row: NULLs must not make keys distinct.
        store.put(key, {}, status="failed", reason="out of memory")
        frame = store.frame()
    assert len(frame) == 1
    assert (frame["status"].iloc[0], frame["reason"].iloc[0]) == ("failed", "out of memory")


def test_put_replaces_the_row_of_a_key(tmp_path: Path) -> None:
    with ResultsStore(tmp_path / "r.sqlite") as store:
        store.put(_key(), {}, status="failed", reason="CUDA error")
        store.put(_key(model="timm/resnet18.a1_in1k"), _record(trace=7.0) | {"model": "timm/resnet18.a1_in1k"})
        store.put(_key(), _record(trace=2.5))  # --force: the run again
        frame = store.frame().set_index("model")
    assert len(frame) == 2
    again = frame.loc["timm/resnet50.a1_in1k"]
    assert (again["status"], again["trace"]) == ("ok", 2.5)
    assert pd.isna(again["reason"])  # the failed run's reason went with its row
    assert frame.loc["timm/resnet18.a1_in1k", "trace"] == 7.0


def test_put_refuses_inconsistent_rows(tmp_path: Path) -> None:
    with ResultsStore(tmp_path / "r.sqlite") as store:
        with pytest.raises(ValueError, match="disagrees"):
            store.put(_key(), {**_record(), "dataset": "cifar10"})
        with pytest.raises(ValueError, match="status"):
            store.put(_key(), {}, status="skipped")
        with pytest.raises(ValueError, match="reserved"):
            store.put(_key(), {"status": "ok"})
        assert store.frame().empty


def test_reader_sees_only_committed_rows_while_another_writes(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    with ResultsStore(path) as writer, ResultsStore(path) as reader:
        writer.put(_key(model="first"), {"trace": 1.0})
        # A write transaction left open by another connection: WAL lets the reader through, without its row.
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        other.execute(
            "INSERT INTO runs (run_key, model, dataset, preprocessing, status, written_at) "
            "VALUES ('k', 'uncommitted', 'd', '{}', 'ok', 'now')"
        )
        assert list(reader.frame()["model"]) == ["first"]
        other.execute("ROLLBACK")
        other.close()

        # A writer thread putting rows while the reader reads: every read is a consistent prefix.
        def write() -> None:
            with ResultsStore(path) as store:
                for i in range(40):
                    store.put(_key(model=f"m{i}"), {"trace": float(i), "n_samples": i})

        thread = threading.Thread(target=write)
        thread.start()
        counts = []
        while thread.is_alive() or not counts:
            frame = reader.frame()
            rows = frame[frame["model"] != "first"]
            assert list(rows["model"]) == [f"m{i}" for i in range(len(rows))]
            assert list(rows["trace"]) == [float(i) for i in range(len(rows))]
            counts.append(len(rows))
        thread.join()
        assert counts == sorted(counts)
        assert len(reader.frame()) == 41


def test_schema_errors_are_one_line(tmp_path: Path) -> None:
    newer = tmp_path / "newer.sqlite"
    ResultsStore(newer).close()
    with sqlite3.connect(newer) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(FlatscanError, match="schema version 99"):
        ResultsStore(newer)
    not_sqlite = tmp_path / "results.csv"
    not_sqlite.write_text("model,trace\nresnet50,1.0\n" * 100)
    with pytest.raises(FlatscanError, match="not a usable flatscan results store"):
        ResultsStore(not_sqlite)


def test_columns_missing_from_an_older_file_are_added(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with ResultsStore(path) as store:
        store.put(_key(), {"trace": 1.0})
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE runs DROP COLUMN python_version")  # as if written before the column existed
    with ResultsStore(path) as store:
        store.put(_key(model="new"), {"python_version": "3.12.0"})
        frame = store.frame().set_index("model")
    assert frame.loc["new", "python_version"] == "3.12.0"
    assert frame.loc["timm/resnet50.a1_in1k", "trace"] == 1.0


WRITER = """
import sys
from flatscan.audit.store import ResultsStore, RunKey
store = ResultsStore(sys.argv[1])
for i in range(100_000):
    key = RunKey(f"model-{i}", None, "imagenet-1k", None, None, "{}")
    store.put(key, {"trace": float(i), "n_samples": i, "blob": str(i) * 5_000})
    print(i, flush=True)
"""


def _check_row(row: dict[str, object]) -> int:
    """The index of an intact row written by WRITER; fails on any torn field."""
    i = int(str(row["model"]).removeprefix("model-"))
    assert (row["trace"], row["n_samples"], row["blob"]) == (float(i), i, str(i) * 5_000)
    return i


def test_sigkill_mid_audit_loses_no_committed_row(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2]
    )
    assert writer.stdout is not None
    committed = []
    for line in writer.stdout:
        committed.append(int(line))
        if len(committed) == 30:
            os.kill(writer.pid, signal.SIGKILL)
            break
    committed += [int(line) for line in writer.stdout]  # printed before the kill landed
    writer.wait()
    assert writer.returncode == -signal.SIGKILL
    assert committed == list(range(len(committed)))

    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with ResultsStore(path) as store:
        rows = store.frame().to_dict("records")
    present = sorted(_check_row(row) for row in rows)
    # Every reported row is there; at most one more, committed in the instant before its print.
    assert present[: len(committed)] == committed
    assert len(present) - len(committed) in (0, 1)
    assert present == list(range(len(present)))


def test_two_runs_share_the_work_through_claims(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite"
    first, second = ResultsStore(path), ResultsStore(path)  # two audits on one store
    try:
        measured, waiting = _key("m/measured"), _key("m/waiting")
        assert not first.taken(measured) and not first.taken(waiting)  # claimed by the first run
        assert first.taken(measured) is False  # its own claim does not stop it
        assert second.taken(measured) and second.taken(waiting)  # the second run leaves them to the first
        first.put(measured, {"trace": 1.0})
        assert second.taken(measured)  # now done
        first.close()  # the first run ends without measuring `waiting`: its claim goes with it
        assert not second.taken(waiting)
    finally:
        second.close()


def test_a_claim_of_a_dead_process_is_stale(tmp_path: Path) -> None:
    path = tmp_path / "stale.sqlite"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with ResultsStore(path) as store:
        key = _key("m/orphaned")
        store.taken(key)
        with sqlite3.connect(path) as connection:  # as if a killed run on this machine had claimed it
            connection.execute("UPDATE claims SET owner = 'killed', pid = ?", (int(dead.stdout),))
        connection.close()
        assert not store.taken(key)  # taken over, not waited for
