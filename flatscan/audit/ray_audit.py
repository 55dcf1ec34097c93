"""Audit a Hub organisation on a Ray cluster: one Ray task per model, every row committed by the driver.

The driver lists the models (:func:`flatscan.audit.org.list_org_models`), skips those the store already has as
:func:`flatscan.audit.org.audit_org` does, and submits one task per remaining model: a model refused or failed before,
at the listed commit, is not submitted; a measured model's key depends on its data config, so its task loads it and
opens its data, finds the key among the store's keys that the driver passed along, and returns it skipped, unscanned.
Each task runs :func:`flatscan.audit.org.audit_model`, the per-model work of the single-machine audit, so both paths
write the same rows: it loads the model, streams the data and returns the run key and the row, which the driver commits
to the SQLite store as it arrives; workers never open the store. A task whose worker dies (a crash, a lost node) is
retried by Ray ``max_retries`` times, then recorded as ``failed`` with Ray's reason under the requested run key (see
:mod:`flatscan.audit.org`); a killed driver loses no committed row, and a rerun resumes from the store.

Ray is optional (``pip install 'flatscan[ray]'``) and imported only here, when an audit starts. Every node needs
flatscan installed, and its workers reach the Hub and the data themselves (their own ``HF_HOME`` cache).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pandas as pd

from flatscan.audit.options import DEFAULT_MEMORY_GB, DEFAULT_RETRIES, AuditOptions
from flatscan.audit.org import (
    UNSTORED,
    AuditRow,
    OrgModel,
    audit_model,
    list_org_models,
    model_name,
    requested_key,
)
from flatscan.audit.store import ResultsStore, RunKey
from flatscan.errors import FlatscanError
from flatscan.io.data import DataOptions
from flatscan.io.messages import first_line
from flatscan.scanner import ScanResult, resolve_device

if TYPE_CHECKING:
    from ray.util.queue import Queue

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MEMORY_GB", "DEFAULT_RETRIES", "audit_org_ray"]

_POLL_SECONDS = 0.2  # how often the driver refreshes the progress of running tasks

BatchFactory = Callable[[str], Callable[[ScanResult], bool | None] | None]


def audit_org_ray(
    org: str,
    store: ResultsStore,
    options: AuditOptions,
    *,
    address: str | None = None,
    num_gpus: float | None = None,
    num_cpus: float = 1,
    memory_gb: float | None = DEFAULT_MEMORY_GB,
    max_retries: int = DEFAULT_RETRIES,
    pattern: str | None = None,
    limit: int | None = None,
    include_transformers: bool = False,
    on_model: Callable[[AuditRow, int, int], None] | None = None,
    on_batch_factory: BatchFactory | None = None,
) -> list[AuditRow]:
    """:func:`flatscan.audit.org.audit_org` with one Ray task per model; the rows (in listing order) are the same.

    ``address`` is the cluster to join, as ``ray.init`` takes it (``auto``, ``HOST:6379``, ``ray://HOST:10001``);
    None starts a local cluster (or joins ``RAY_ADDRESS``). If this process is connected to Ray already, that
    connection is used and left open. Each task asks for ``num_cpus``, ``num_gpus`` (default: 1 when the cluster has
    GPUs, else 0) and ``memory_gb`` (a scheduling hint); ``options.device`` is resolved in the worker (None or
    ``auto``: the task's GPU when it has one). ``on_model(row, i, n)`` follows the i-th model to finish;
    ``on_batch_factory`` gives a model's progress callback, fed with the running results the worker streams (its
    return value is ignored).
    """
    options.check_storable()
    ray = _import_ray()
    check_paths(options.data)
    models = list_org_models(
        org, pattern=pattern, limit=limit, include_transformers=include_transformers, offline=options.offline
    )
    if not models:
        return []
    started = not ray.is_initialized()
    if started:
        ray.init(address=address)
    progress: Queue | None = None
    pending: dict[Any, int] = {}  # task -> index of its model in the listing
    try:
        if on_batch_factory is not None:
            progress = _progress_queue()
        resources = _task_options(ray, num_cpus, num_gpus, memory_gb, max_retries)
        rows = _Rows(models, on_model)
        pending.update(_submit(ray, rows, store, options, resources, progress))
        _collect(ray, rows, store, options, pending, progress, on_batch_factory)
        return rows.finished()
    except BaseException:
        for ref in pending:  # stopped early (Ctrl-C): the cluster may outlive this driver's connection
            with contextlib.suppress(Exception):  # the error that stopped the audit is the one to report
                ray.cancel(ref)
        raise
    finally:
        if progress is not None:
            progress.shutdown(force=True)
        if started:
            ray.shutdown()


class _Rows:
    """The rows of the listed models, in listing order, filled as their tasks finish."""

    def __init__(self, models: list[OrgModel], on_model: Callable[[AuditRow, int, int], None] | None) -> None:
        self.models = models
        self.rows: list[AuditRow | None] = [None] * len(models)
        self.on_model = on_model
        self.count = itertools.count(1)

    def finish(self, index: int, row: AuditRow) -> None:
        self.rows[index] = row
        if self.on_model is not None:
            self.on_model(row, next(self.count), len(self.models))

    def finished(self) -> list[AuditRow]:
        return [row for row in self.rows if row is not None]


def _task_options(
    ray: ModuleType, num_cpus: float, num_gpus: float | None, memory_gb: float | None, max_retries: int
) -> dict[str, Any]:
    """Ray's options of every task: its resources and retries."""
    if num_gpus is None:
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    options: dict[str, Any] = {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "max_retries": max_retries,
        "retry_exceptions": False,  # audit_model records a model's own errors; only lost workers are retried
    }
    if memory_gb:
        options["memory"] = int(memory_gb * 2**30)
    return options


def _submit(
    ray: ModuleType,
    rows: _Rows,
    store: ResultsStore,
    options: AuditOptions,
    resources: dict[str, Any],
    progress: Queue | None,
) -> dict[Any, int]:
    """Submit one task per model the store does not have yet; the tasks, with the index of their model."""
    task = ray.remote(_audit_task)
    stored = {} if options.force else _stored_keys(store)
    pending: dict[Any, int] = {}
    for index, listed in enumerate(rows.models):
        name = model_name(listed)
        requested = requested_key(name, listed.revision, options.data, options.num_samples)
        if not options.force and listed.revision is not None and store.done(requested):
            rows.finish(index, AuditRow(name, "skipped", None, None))  # refused or failed before, same commit
            continue
        ref = task.options(name=f"flatscan {listed.repo_id}", **resources).remote(
            listed, options, frozenset(stored.get(name, ())), progress
        )
        pending[ref] = index
    return pending


def _collect(
    ray: ModuleType,
    rows: _Rows,
    store: ResultsStore,
    options: AuditOptions,
    pending: dict[Any, int],
    progress: Queue | None,
    on_batch_factory: BatchFactory | None,
) -> None:
    """Commit each task's row as it arrives (removing the task from ``pending``), feeding progress meanwhile."""
    callbacks: dict[str, Callable[[ScanResult], bool | None] | None] = {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=_POLL_SECONDS)
        if progress is not None and on_batch_factory is not None:
            _show_progress(progress, callbacks, on_batch_factory)
        for ref in ready:
            index = pending.pop(ref)
            key, row = _task_result(ray, ref, rows.models[index], options, store)
            if row.status not in UNSTORED:
                store.put(key, row.record, row.status, row.reason)  # type: ignore[arg-type]  # a record unless skipped
            rows.finish(index, row)


def _import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise FlatscanError("auditing on a Ray cluster needs Ray: pip install 'flatscan[ray]'") from None
    return ray


def check_paths(options: DataOptions) -> None:
    """Refuse a relative data or class-map path: a worker resolves it in its own working directory, on its node."""
    paths = {"dataset": options.dataset, "class map": options.class_map}
    for what, value in paths.items():
        if value is None:
            continue
        path = Path(value).expanduser()
        # As flatscan.io.data reads a dataset: a path when it exists or is written as one, else a Hub id (owner/name).
        if not path.is_absolute() and (what == "class map" or path.exists() or str(value).startswith(".")):
            raise FlatscanError(
                f"{what} {value} is a relative path, which Ray workers resolve in their own directory: give it as "
                f"{path.resolve()} (a path that every node of the cluster has)"
            )


def _progress_queue() -> Queue:
    from ray.util.queue import Queue

    # No CPU: the queue's actor must never wait for the CPUs that the audit's tasks hold.
    return Queue(actor_options={"num_cpus": 0})


def _stored_keys(store: ResultsStore) -> dict[str, set[RunKey]]:
    """The run keys in ``store``, by model: the tasks' ``done`` (workers never open the store)."""
    frame = store.frame()
    keys: dict[str, set[RunKey]] = defaultdict(set)
    columns = ["model", "revision", "dataset", "split", "num_samples", "preprocessing"]
    for model, revision, dataset, split, num_samples, preprocessing in frame[columns].itertuples(index=False):
        keys[model].add(
            RunKey(
                model,
                None if pd.isna(revision) else revision,
                dataset,
                None if pd.isna(split) else split,
                None if pd.isna(num_samples) else int(num_samples),
                preprocessing,
            )
        )
    return keys


def _audit_task(
    listed: OrgModel, options: AuditOptions, stored: frozenset[RunKey], progress: Queue | None
) -> tuple[RunKey, AuditRow]:
    """The Ray task: one model's :func:`flatscan.audit.org.audit_model` in a worker, its progress sent to
    ``progress``."""

    def on_batch_factory(name: str) -> Callable[[ScanResult], None] | None:
        return None if progress is None else partial(_report, progress, name)

    resolved = dataclasses.replace(options, device=resolve_device(options.device))
    return audit_model(listed, resolved, done=stored.__contains__, on_batch_factory=on_batch_factory)


def _report(progress: Queue, name: str, running: ScanResult) -> None:
    try:
        progress.put((name, running))
    except Exception as error:  # progress only: a lost queue must not fail the model's audit
        logger.debug("progress of %s not sent: %s", name, first_line(error))


def _show_progress(
    progress: Queue,
    callbacks: dict[str, Callable[[ScanResult], bool | None] | None],
    factory: Callable[[str], Callable[[ScanResult], bool | None] | None],
) -> None:
    """Feed the running results that the workers sent to each model's progress callback (made on its first)."""
    for name, running in progress.get_nowait_batch(progress.qsize()):
        if name not in callbacks:
            callbacks[name] = factory(name)
        callback = callbacks[name]
        if callback is not None:
            callback(running)


def _task_result(
    ray: ModuleType, ref: Any, listed: OrgModel, options: AuditOptions, store: ResultsStore
) -> tuple[RunKey, AuditRow]:
    """The task's key and row. A task that Ray gave up on (its worker died ``max_retries`` + 1 times, its node was
    lost, ...) is a ``failed`` row under the requested key with Ray's reason, as a model that fails before its data
    is opened (``skipped`` if the store has that key already, unless ``options.force``)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as error:
        cause = error.cause if isinstance(error, ray.exceptions.RayTaskError) and error.cause else error
        name = model_name(listed)
        key = requested_key(name, listed.revision, options.data, options.num_samples)
        if not options.force and store.done(key):
            return key, AuditRow(name, "skipped", None, None)
        reason = f"{type(cause).__name__}: {first_line(cause)}"
        return key, AuditRow(name, "failed", reason, {"model": name, "revision": listed.revision})
