"""Batch audit of a Hugging Face Hub organisation: list its image classifiers, scan each, one committed row per model.

Every model of the listing ends as one row of the results store, committed before the next model starts, so an
audit that is killed resumes where it stopped: a model whose run key already has a row is skipped (unless
``force``). The run key of a measured model is the scan's own (``hf-hub:org/name``, the commit sha loaded, the
dataset name and split that the data resolver picked, ``num_samples``, the preprocessing of the model's data
config). A model that is refused or fails *before its data is opened* (loading, ``describe``, opening the data)
gets the key of what was requested instead, computable without the model's data config:

- revision: the commit sha loaded, else the one the listing gave (else None);
- dataset: ``DataOptions.dataset`` as given (``default`` when None, ``[config]`` appended when given), split:
  ``DataOptions.split`` as given (None when not given);
- preprocessing: ``preprocessing_key`` of the overrides in ``DataOptions`` (``img_size`` as ``input_size``,
  ``crop_pct``, ``interpolation``, ``mean``, ``std``; None where not given).

So a rerun with the same options skips these models too (before loading them, when the listing gave the sha), a new
commit of the repo or other data options try them again, and ``force`` retries everything. A model that fails while
being scanned keeps the scan's key.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, scan_cache_dir
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import CacheNotFound

import flatscan
from flatscan.data import DataOptions, open_eval_data
from flatscan.errors import FlatscanError, ScanInterrupted, UnsupportedModel
from flatscan.models import _first_line, _is_offline, load_model
from flatscan.runs import result_record, scan_with_retry
from flatscan.scanner import ScanResult
from flatscan.store import ResultsStore, RunKey, preprocessing_key

logger = logging.getLogger(__name__)

TASK = "image-classification"
# With `expand` the Hub returns these properties (and the id) only; `sha` lets a rerun skip a refused model unloaded.
_EXPAND = ["downloads", "library_name", "tags", "pipeline_tag", "sha"]


@dataclass(frozen=True)
class OrgModel:
    """One model of an organisation, as the listing gave it."""

    repo_id: str  # org/name
    downloads: int | None  # None offline: the cache does not know
    library: str | None  # the listing's library_name ("timm" also for a timm tag); offline "timm" for a timm config
    revision: str | None  # commit sha of main: listed (online) or cached (offline)


@dataclass(frozen=True)
class AuditRow:
    """The outcome for one model: ``record`` is the row written to the store (None when skipped)."""

    model: str  # hf-hub:org/name
    status: str  # "ok" | "unsupported" | "failed" | "skipped"
    reason: str | None
    record: dict[str, Any] | None


def list_org_models(
    org: str,
    *,
    pattern: str | None = None,
    limit: int | None = None,
    include_transformers: bool = False,
    offline: bool = False,
) -> list[OrgModel]:
    """The image classifiers of ``org`` on the Hub, most downloaded first; timm models only unless
    ``include_transformers``. ``pattern`` is a glob on the name after ``org/`` (on the whole id when it has a
    ``/``); ``limit`` keeps the first matches. Offline (``offline`` or ``HF_HUB_OFFLINE``), the org's models in the
    local Hugging Face cache, by name, with a warning that the listing is the cache's."""
    if limit is not None and limit < 1:
        raise FlatscanError(f"limit must be a positive number of models, got {limit}")
    listed = _cached_models(org) if offline or _is_offline(None) else _hub_models(org, include_transformers)
    picked: list[OrgModel] = []
    for model in listed:
        if (include_transformers or model.library == "timm") and _matches(model.repo_id, pattern):
            picked.append(model)
            if len(picked) == limit:
                break  # the listing is paged lazily: later pages are never requested
    return picked


def _matches(repo_id: str, pattern: str | None) -> bool:
    if pattern is None:
        return True
    # Case-sensitive on every platform (fnmatch.fnmatch follows the OS's file name rules).
    return fnmatch.fnmatchcase(repo_id if "/" in pattern else repo_id.partition("/")[2], pattern)


def _hub_models(org: str, include_transformers: bool) -> Iterator[OrgModel]:
    api = HfApi()
    # Every filter is a tag the models must all have; the library name is a tag on the Hub.
    filters = [TASK] if include_transformers else [TASK, "timm"]
    try:
        for info in api.list_models(author=org, filter=filters, sort="downloads", expand=_EXPAND):
            library = info.library_name or ("timm" if "timm" in (info.tags or ()) else None)
            yield OrgModel(info.id, info.downloads, library, info.sha)
    except Exception as error:
        # No common base class: HfHubHTTPError is an OSError, connection errors are the HTTP client's own.
        raise FlatscanError(
            f"cannot list the models of {org} on {api.endpoint} ({type(error).__name__}: {_first_line(error)}): "
            "check the network, proxy or HF_ENDPOINT, or pass --offline to audit the org's models in the local cache"
        ) from error


def _cached_models(org: str) -> Iterator[OrgModel]:
    # scan_cache_dir's default is the cache directory at import time; the constant is the one downloads use now.
    cache = hub_constants.HF_HUB_CACHE
    try:
        repos = [
            repo
            for repo in scan_cache_dir(cache).repos
            if repo.repo_type == "model" and repo.repo_id.partition("/")[0].lower() == org.lower()
        ]
    except CacheNotFound:
        repos = []
    logger.warning(
        "offline: the models of %s are listed from the Hugging Face cache %s (%d found), not from the Hub; "
        "models never downloaded are missing and download counts are unknown",
        org,
        cache,
        len(repos),
    )
    for repo in sorted(repos, key=lambda repo: repo.repo_id):
        main = repo.refs.get("main")  # what load_model resolves offline
        config = next((f.file_path for f in main.files if f.file_name == "config.json"), None) if main else None
        library = "timm" if config is not None and _is_timm_config(config) else None
        yield OrgModel(repo.repo_id, None, library, main.commit_hash if main else None)


def _is_timm_config(path: Path) -> bool:
    """Whether ``path`` is a timm config.json (it names an ``architecture``; transformers' name ``architectures``)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and isinstance(config.get("architecture"), str)


def audit_org(
    org: str,
    store: ResultsStore,
    data_options: DataOptions,
    *,
    pattern: str | None = None,
    limit: int | None = None,
    include_transformers: bool = False,
    offline: bool = False,
    force: bool = False,
    num_samples: int | None = None,
    device: str | torch.device | None = None,
    amp: bool = False,
    trace_only: bool = False,
    on_model: Callable[[AuditRow, int, int], None] | None = None,
    on_batch_factory: Callable[[str], Callable[[ScanResult], bool | None] | None] | None = None,
) -> list[AuditRow]:
    """Scan every model that :func:`list_org_models` gives, on ``data_options`` (opened per model, in its own
    preprocessing), committing each model's row to ``store`` at once; run keys are in the module docstring.

    A refused model becomes an ``unsupported`` row, any other error a ``failed`` row with a one-line reason, and the
    audit goes on; only Ctrl-C (:class:`ScanInterrupted`, KeyboardInterrupt) stops it, the rows so far committed.
    ``on_model(row, i, n)`` follows the i-th (1-based) of n models; ``on_batch_factory(model)`` gives the scan's
    ``on_batch`` callback for that model (progress; returning True stops its scan early).
    """
    models = list_org_models(
        org, pattern=pattern, limit=limit, include_transformers=include_transformers, offline=offline
    )
    rows = []
    for i, listed in enumerate(models, 1):
        row = _audit_model(
            listed,
            store,
            data_options,
            offline=offline,
            force=force,
            num_samples=num_samples,
            device=device,
            amp=amp,
            trace_only=trace_only,
            on_batch_factory=on_batch_factory,
        )
        rows.append(row)
        if on_model is not None:
            on_model(row, i, len(models))
    return rows


def _audit_model(
    listed: OrgModel,
    store: ResultsStore,
    options: DataOptions,
    *,
    offline: bool,
    force: bool,
    num_samples: int | None,
    device: str | torch.device | None,
    amp: bool,
    trace_only: bool,
    on_batch_factory: Callable[[str], Callable[[ScanResult], bool | None] | None] | None,
) -> AuditRow:
    name = f"hf-hub:{listed.repo_id}"
    key = _requested_key(name, listed.revision, options, num_samples)
    if not force and listed.revision is not None and store.done(key):
        return AuditRow(name, "skipped", None, None)  # refused or failed before, same commit: not even loaded
    record: dict[str, Any] = {"model": name, "revision": listed.revision}
    try:
        # offline=None: HF_HUB_OFFLINE set after import is honoured, as in the CLI.
        loaded = load_model(name, offline=offline or None)
        key = dataclasses.replace(key, revision=loaded.revision)
        record = {
            "model": name,
            "revision": loaded.revision,
            "source": loaded.source,
            "architecture": loaded.architecture,
            "flatscan_version": flatscan.__version__,
        }
        flatscan.describe(loaded.model)  # refuse before touching any data
        data = open_eval_data(loaded.model, options)
        key = RunKey(name, loaded.revision, data.name, data.split, num_samples, preprocessing_key(data.data_config))
        if not force and store.done(key):
            return AuditRow(name, "skipped", None, None)
        on_batch = on_batch_factory(name) if on_batch_factory else None  # only for a model that is scanned
        result, data, used = scan_with_retry(
            loaded.model,
            options,
            data,
            device=device,
            max_samples=num_samples,
            trace_only=trace_only,
            amp=amp,
            on_batch=on_batch,
        )
        record, status, reason = result_record(loaded, data, result, used), "ok", None
    except ScanInterrupted:
        raise
    except UnsupportedModel as error:  # from describe, or the scanner's checks on the first batch
        status, reason = "unsupported", error.reason
    except Exception as error:  # one broken repo must not end the audit of the others
        status, reason = "failed", f"{type(error).__name__}: {_first_line(error)}"
    if status != "ok" and not force and store.done(key):
        return AuditRow(name, "skipped", None, None)
    store.put(key, record, status, reason)
    return AuditRow(name, status, reason, record)


def _requested_key(name: str, revision: str | None, options: DataOptions, num_samples: int | None) -> RunKey:
    """The run key of a model whose data was not opened: the data options as given (see the module docstring)."""
    dataset = (options.dataset or "default") + (f"[{options.config}]" if options.config else "")
    overrides = {
        "input_size": None if options.img_size is None else [3, options.img_size, options.img_size],
        "crop_pct": options.crop_pct,
        "interpolation": options.interpolation,
        "mean": options.mean,
        "std": options.std,
    }
    return RunKey(name, revision, dataset, options.split, num_samples, preprocessing_key(overrides))
