"""Results store: one SQLite row per run key, committed as soon as it is written, so an audit can resume."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
import types
import typing
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import astuple, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flatscan.errors import FlatscanError
from flatscan.scanner import ScanResult

SCHEMA_VERSION = 1
STATUSES = ("ok", "unsupported", "failed")

# What defines a distinct evaluation of the same model: these go into the preprocessing key.
_PREPROCESSING_FIELDS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")

_SQL_TYPES = {int: "INTEGER", float: "REAL", str: "TEXT"}
# frame() dtypes: SQLite gives back None for an all-NULL column and floats for integers with NULLs.
_PANDAS_DTYPES = {"INTEGER": "Int64", "REAL": "float64"}


def _sql_type(annotation: Any) -> str:
    """SQLite type of a ScanResult field annotation (``float | None`` -> REAL)."""
    if isinstance(annotation, types.UnionType):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return _SQL_TYPES[annotation]


# Record columns stored as real columns; ScanResult's fields are read from the dataclass so a new field
# becomes a new column (added to existing files on open). JSON columns hold lists and are decoded by frame().
_RECORD_COLUMNS: dict[str, str] = {
    "source": "TEXT",
    **{name: _sql_type(hint) for name, hint in typing.get_type_hints(ScanResult).items()},
    "label_mapping": "TEXT",
    "input_size": "JSON",
    "interpolation": "TEXT",
    "crop_pct": "REAL",
    "batch_size": "INTEGER",
    "flatscan_version": "TEXT",
    "timm_version": "TEXT",
    "torch_version": "TEXT",
    "python_version": "TEXT",
}
_INTERNAL_COLUMNS = ("id", "run_key", "status", "reason", "written_at", "extra")


@dataclass(frozen=True)
class RunKey:
    """One evaluation: the same key again is the same run (skipped by an audit unless forced)."""

    model: str
    revision: str | None
    dataset: str
    split: str | None
    num_samples: int | None  # requested; None = all
    preprocessing: str  # preprocessing_key(data_config)

    def canonical(self) -> str:
        """The key as one string: SQLite UNIQUE treats NULLs as distinct, a JSON ``null`` is equal to itself."""
        return json.dumps(astuple(self))


_KEY_FIELDS = tuple(field.name for field in fields(RunKey))


def preprocessing_key(data_config: Mapping[str, Any]) -> str:
    """Canonical JSON of the preprocessing part of a timm data config (missing entries are null)."""
    picked = {
        name: list(value) if isinstance(value, (tuple, list)) else value
        for name in _PREPROCESSING_FIELDS
        for value in [data_config.get(name)]
    }
    return json.dumps(picked, sort_keys=True, separators=(",", ":"))


def _sql_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return value


_CLAIM_SECONDS = 24 * 3600  # a claim from another machine older than this is stale


def _claim_alive(host: str, pid: int, claimed_at: float) -> bool:
    """Whether the run that made a claim may still be measuring: its process lives (on this machine), or the claim
    is younger than a day (on another machine, where its process cannot be seen)."""
    if host != socket.gethostname():
        return time.time() - claimed_at < _CLAIM_SECONDS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class ResultsStore:
    """SQLite results store (WAL mode, one transaction per row): a kill mid-audit loses no committed row."""

    def __init__(self, path: str | Path = "flatscan-results.sqlite") -> None:
        self.path = Path(path)
        self._owner = uuid.uuid4().hex  # this handle, in the claims table
        try:
            # isolation_level=None: no implicit transactions; put() opens and commits its own.
            self._conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._refuse_foreign()  # before anything is written: WAL mode alone changes the file
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed row also survives a power cut, not only a killed process.
            self._conn.execute("PRAGMA synchronous=FULL")
            self._create_schema()
        except sqlite3.DatabaseError as error:
            raise FlatscanError(
                f"{self.path} is not a usable flatscan results store ({error}); pass another store file"
            ) from None

    def _refuse_foreign(self) -> None:
        """Refuse, untouched, an SQLite file with tables but no flatscan schema (another application's database)."""
        tables = {row[0] for row in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        ours = (
            "meta" in tables
            and self._conn.execute("SELECT 1 FROM meta WHERE key = 'schema_version'").fetchone() is not None
        )
        if tables and not ours:
            self._conn.close()
            raise FlatscanError(
                f"{self.path} is another application's SQLite database (tables: {', '.join(sorted(tables))}), not a "
                "flatscan results store; it was left untouched: pass another store file"
            )

    def _create_schema(self) -> None:
        with self._transaction():
            self._conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
            (version,) = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if int(version) > SCHEMA_VERSION:
                raise FlatscanError(
                    f"{self.path} has results schema version {version}, newer than this flatscan's "
                    f"{SCHEMA_VERSION}; upgrade flatscan or use another store file"
                )
            self._conn.execute(
                """CREATE TABLE IF NOT EXISTS runs (
                    id INTEGER PRIMARY KEY,
                    run_key TEXT NOT NULL UNIQUE,
                    model TEXT NOT NULL,
                    revision TEXT,
                    dataset TEXT NOT NULL,
                    split TEXT,
                    num_samples INTEGER,
                    preprocessing TEXT NOT NULL,
                    status TEXT NOT NULL CHECK (status IN ('ok', 'unsupported', 'failed')),
                    reason TEXT,
                    written_at TEXT NOT NULL,
                    extra TEXT
                )"""
            )
            # A run's claim on a model it is measuring (see taken()).
            self._conn.execute(
                """CREATE TABLE IF NOT EXISTS claims (
                    run_key TEXT PRIMARY KEY, owner TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
                    claimed_at REAL NOT NULL
                )"""
            )
            # Columns added since a file was created: additive changes need no schema version bump.
            present = {row[1] for row in self._conn.execute("PRAGMA table_info(runs)")}
            for name, sql_type in _RECORD_COLUMNS.items():
                if name not in present:
                    declared = "TEXT" if sql_type == "JSON" else sql_type
                    self._conn.execute(f'ALTER TABLE runs ADD COLUMN "{name}" {declared}')

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """The block as one transaction; IMMEDIATE takes the write lock up front, so it cannot fail half-way."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def taken(self, key: RunKey) -> bool:
        """Whether ``key`` has a row or another live run holds its claim; if neither, claim it for this handle.

        Two audits on one store thus share the work instead of computing a model twice. A claim whose process is
        gone (same machine) or older than a day (another machine) is stale and taken over; claims are released when
        the row is written and when the store closes.
        """
        with self._transaction():
            if self.done(key):
                return True
            held = self._conn.execute(
                "SELECT owner, host, pid, claimed_at FROM claims WHERE run_key = ?", (key.canonical(),)
            ).fetchone()
            if held is not None and held[0] != self._owner and _claim_alive(*held[1:]):
                return True
            self._conn.execute(
                "INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?)",
                (key.canonical(), self._owner, socket.gethostname(), os.getpid(), time.time()),
            )
        return False

    def done(self, key: RunKey) -> bool:
        """Whether ``key`` has a row, whatever its status."""
        query = "SELECT 1 FROM runs WHERE run_key = ?"
        return self._conn.execute(query, (key.canonical(),)).fetchone() is not None

    def put(self, key: RunKey, record: Mapping[str, Any], status: str = "ok", reason: str | None = None) -> None:
        """Insert the row of ``key`` (replacing an existing one) and commit it.

        Known record fields become columns, other keys go into the JSON ``extra`` column. Record fields
        that repeat the key (model, revision, dataset, split) must agree with it.
        """
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        row: dict[str, Any] = {
            **{name: getattr(key, name) for name in _KEY_FIELDS},
            "run_key": key.canonical(),
            "status": status,
            "reason": reason,
            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        extra = {}
        for name, value in record.items():
            if name in _KEY_FIELDS:
                if value != row[name]:
                    raise ValueError(f"record {name}={value!r} disagrees with the run key's {row[name]!r}")
            elif name in _INTERNAL_COLUMNS:
                raise ValueError(f"record field {name!r} is reserved by the results store")
            elif name in _RECORD_COLUMNS:
                row[name] = _sql_value(value)
            else:
                extra[name] = value
        row["extra"] = json.dumps(extra, default=str) if extra else None
        columns = ", ".join(f'"{name}"' for name in row)
        placeholders = ", ".join("?" for _ in row)
        with self._transaction():
            self._conn.execute(f"INSERT OR REPLACE INTO runs ({columns}) VALUES ({placeholders})", list(row.values()))
            self._conn.execute("DELETE FROM claims WHERE run_key = ?", (key.canonical(),))

    def frame(self) -> pd.DataFrame:
        """All rows in writing order: key, status, reason, record columns, and the extra keys as columns."""
        frame = pd.read_sql_query("SELECT * FROM runs ORDER BY id", self._conn)
        for name, sql_type in {"num_samples": "INTEGER", **_RECORD_COLUMNS}.items():
            if sql_type == "JSON":
                frame[name] = [json.loads(value) if isinstance(value, str) else None for value in frame[name]]
            elif sql_type in _PANDAS_DTYPES:
                frame[name] = frame[name].astype(_PANDAS_DTYPES[sql_type])
        extras = pd.DataFrame([json.loads(v) if isinstance(v, str) else {} for v in frame["extra"]], index=frame.index)
        frame = frame.drop(columns=["id", "run_key", "extra"])
        return pd.concat([frame, extras.drop(columns=frame.columns.intersection(extras.columns))], axis=1)

    def close(self) -> None:
        with self._transaction():
            self._conn.execute("DELETE FROM claims WHERE owner = ?", (self._owner,))
        self._conn.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
