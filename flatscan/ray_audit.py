"""Audit a Hub organisation on a Ray cluster: one Ray task per model, every row committed by the driver.

The driver lists the models (:func:`flatscan.org.list_org_models`), skips those the store already has as
:func:`flatscan.org.audit_org` does, and submits one task per remaining model: a model refused or failed before,
at the listed commit, is not submitted; a measured model's key depends on its data config, so its task loads it and
opens its data, finds the key among the store's keys that the driver passed along, and returns it skipped, unscanned.
Each task runs
:func:`flatscan.org.audit_model`, the per-model work of the single-machine audit, so both paths write the same rows:
it loads the model, streams the data and returns the run key and the row, which the driver commits to the SQLite
store as it arrives; workers never open the store. A task whose worker dies (a crash, a lost node) is retried by Ray
``max_retries`` times, then recorded as ``failed`` with Ray's reason under the requested run key (see
:mod:`flatscan.org`); a killed driver loses no committed row, and a rerun resumes from the store.

Ray is optional (``pip install 'flatscan[ray]'``) and imported only here, when an audit starts. Every node needs
flatscan installed, and its workers reach the Hub and the data themselves (their own ``HF_HOME`` cache).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pandas as pd

from flatscan.data import DataOptions
from flatscan.errors import FlatscanError
from flatscan.models import _first_line
from flatscan.org import AuditRow, OrgModel, _model_name, _requested_key, audit_model, list_org_models
from flatscan.scanner import ScanResult, resolve_device
from flatscan.store import ResultsStore, RunKey

if TYPE_CHECKING:
    from ray.util.queue import Queue

logger = logging.getLogger(__name__)

# Ray's `memory` is a scheduling hint, not a limit: room for a typical timm model, its data loaders and a batch.
DEFAULT_MEMORY_GB = 4.0
DEFAULT_RETRIES = 3  # Ray's own default for tasks
_POLL_SECONDS = 0.2  # how often the driver refreshes the progress of running tasks


def audit_org_ray(
    org: str,
    store: ResultsStore,
    data_options: DataOptions,
    *,
    address: str | None = None,
    num_gpus: float | None = None,
    num_cpus: float = 1,
    memory_gb: float | None = DEFAULT_MEMORY_GB,
    max_retries: int = DEFAULT_RETRIES,
    pattern: str | None = None,
    limit: int | None = None,
    include_transformers: bool = False,
    offline: bool = False,
    force: bool = False,
    num_samples: int | None = None,
    device: str | None = None,
    amp: bool = False,
    trace_only: bool = False,
    on_model: Callable[[AuditRow, int, int], None] | None = None,
    on_batch_factory: Callable[[str], Callable[[ScanResult], bool | None] | None] | None = None,
) -> list[AuditRow]:
    """:func:`flatscan.org.audit_org` with one Ray task per model; the rows (in listing order) are the same.

    ``address`` is the cluster to join, as ``ray.init`` takes it (``auto``, ``HOST:6379``, ``ray://HOST:10001``);
    None starts a local cluster (or joins ``RAY_ADDRESS``). If this process is connected to Ray already, that
    connection is used and left open. Each task asks for ``num_cpus``, ``num_gpus`` (default: 1 when the cluster has
    GPUs, else 0) and ``memory_gb`` (a scheduling hint); ``device`` is resolved in the worker (None or ``auto``: the
    task's GPU when it has one). ``on_model(row, i, n)`` follows the i-th model to finish; ``on_batch_factory`` gives
    a model's progress callback, fed with the running results the worker streams (its return value is ignored).
    """
    ray = _import_ray()
    _check_paths(data_options)
    models = list_org_models(
        org, pattern=pattern, limit=limit, include_transformers=include_transformers, offline=offline
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
        task = ray.remote(_audit_task)
        settings = {
            "offline": offline,
            "force": force,
            "num_samples": num_samples,
            "device": device,
            "amp": amp,
            "trace_only": trace_only,
        }
        stored = {} if force else _stored_keys(store)
        rows: list[AuditRow | None] = [None] * len(models)
        finished = itertools.count(1)

        def finish(index: int, row: AuditRow) -> None:
            rows[index] = row
            if on_model is not None:
                on_model(row, next(finished), len(models))

        for index, listed in enumerate(models):
            name = _model_name(listed)
            requested = _requested_key(name, listed.revision, data_options, num_samples)
            if not force and listed.revision is not None and store.done(requested):
                finish(index, AuditRow(name, "skipped", None, None))  # refused or failed before, same commit
                continue
            ref = task.options(name=f"flatscan {listed.repo_id}", **options).remote(
                listed, data_options, frozenset(stored.get(name, ())), progress, **settings
            )
            pending[ref] = index
        callbacks: dict[str, Callable[[ScanResult], bool | None] | None] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=_POLL_SECONDS)
            if progress is not None and on_batch_factory is not None:
                _show_progress(progress, callbacks, on_batch_factory)
            for ref in ready:
                index = pending.pop(ref)
                key, row = _task_result(ray, ref, models[index], data_options, num_samples, store, force)
                if row.status != "skipped":
                    store.put(key, row.record, row.status, row.reason)
                finish(index, row)
        return [row for row in rows if row is not None]
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


def _import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise FlatscanError("auditing on a Ray cluster needs Ray: pip install 'flatscan[ray]'") from None
    return ray


def _check_paths(options: DataOptions) -> None:
    """Refuse a relative data or class-map path: a worker resolves it in its own working directory, on its node."""
    paths = {"dataset": options.dataset, "class map": options.class_map}
    for what, value in paths.items():
        if value is None:
            continue
        path = Path(value).expanduser()
        # As flatscan.data reads a dataset: a path when it exists or is written as one, else a Hub id (owner/name).
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
    listed: OrgModel,
    options: DataOptions,
    stored: frozenset[RunKey],
    progress: Queue | None,
    *,
    device: str | None,
    **settings: Any,
) -> tuple[RunKey, AuditRow]:
    """The Ray task: one model's :func:`flatscan.org.audit_model` in a worker, its progress sent to ``progress``."""

    def on_batch_factory(name: str) -> Callable[[ScanResult], None] | None:
        return None if progress is None else partial(_report, progress, name)

    return audit_model(
        listed,
        options,
        done=stored.__contains__,
        device=resolve_device(device),
        on_batch_factory=on_batch_factory,
        **settings,
    )


def _report(progress: Queue, name: str, running: ScanResult) -> None:
    try:
        progress.put((name, running))
    except Exception as error:  # progress only: a lost queue must not fail the model's audit
        logger.debug("progress of %s not sent: %s", name, _first_line(error))


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
    ray: ModuleType,
    ref: Any,
    listed: OrgModel,
    options: DataOptions,
    num_samples: int | None,
    store: ResultsStore,
    force: bool,
) -> tuple[RunKey, AuditRow]:
    """The task's key and row. A task that Ray gave up on (its worker died ``max_retries`` + 1 times, its node was
    lost, ...) is a ``failed`` row under the requested key with Ray's reason, as a model that fails before its data
    is opened (``skipped`` if the store has that key already, unless ``force``)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as error:
        cause = error.cause if isinstance(error, ray.exceptions.RayTaskError) and error.cause else error
        name = _model_name(listed)
        key = _requested_key(name, listed.revision, options, num_samples)
        if not force and store.done(key):
            return key, AuditRow(name, "skipped", None, None)
        reason = f"{type(cause).__name__}: {_first_line(cause)}"
        return key, AuditRow(name, "failed", reason, {"model": name, "revision": listed.revision})
