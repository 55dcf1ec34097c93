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

An organisation can also be a local directory of timm/Hub-format model folders (a zoo of ``flatscan zoo train``):
a folder's model is its absolute path, and its revision a hash of its config and weights, which stands in for the
commit in its keys.

The per-model work is :func:`audit_model`, which writes nothing: :func:`audit_org` commits its rows one by one, and
the driver of :func:`flatscan.audit.ray_audit.audit_org_ray` commits the rows that its Ray tasks return.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, scan_cache_dir
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import CacheNotFound

import flatscan
from flatscan.audit.options import AuditOptions
from flatscan.audit.run import measure, prepare
from flatscan.audit.store import ResultsStore, RunKey, preprocessing_key
from flatscan.errors import EnvironmentFault, FlatscanError, ScanInterrupted, UnsupportedModel
from flatscan.io.data import DataOptions
from flatscan.io.messages import first_line
from flatscan.io.models import WEIGHT_FILES, is_offline, load_model
from flatscan.scanner import ScanResult

logger = logging.getLogger(__name__)

TASK = "image-classification"
# With `expand` the Hub returns these properties (and the id) only; `sha` lets a rerun skip a refused model unloaded.
_EXPAND: Any = ["downloads", "library_name", "tags", "pipeline_tag", "sha"]


@dataclass(frozen=True)
class OrgModel:
    """One model of an organisation, as the listing gave it."""

    repo_id: str  # org/name, or the absolute path of a local model folder
    downloads: int | None  # None offline: the cache does not know
    library: str | None  # the listing's library_name ("timm" also for a timm tag); offline "timm" for a timm config
    revision: str | None  # commit sha of main: listed (online) or cached (offline); sha256:... of a local folder


# Rows an audit does not write: done before (skipped), or a fault of the network or machine (retry, next run).
UNSTORED = frozenset({"skipped", "retry"})


@dataclass(frozen=True)
class AuditRow:
    """The outcome for one model: ``record`` is the row written to the store (None when skipped)."""

    model: str  # hf-hub:org/name
    status: str  # "ok" | "unsupported" | "failed" (stored); "skipped" (stored before), "retry" (not stored)
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
    local Hugging Face cache, by name, with a warning that the listing is the cache's.

    ``org`` may also be a local directory, written as a path (``./zoo``, ``~/zoo``, ``/data/zoo``): its model
    folders (timm/Hub format: config.json and weights), by name; ``pattern`` matches the folder names."""
    if limit is not None and limit < 1:
        raise FlatscanError(f"limit must be a positive number of models, got {limit}")
    directory = _local_org(org)
    if directory is not None:
        listed = _local_models(directory)
    else:
        listed = _cached_models(org) if offline or is_offline(None) else _hub_models(org, include_transformers)
    picked: list[OrgModel] = []
    for model in listed:
        # A local model's repo_id is its absolute path: matched as directory-name/folder-name.
        repo_id = model.repo_id if directory is None else f"{directory.name}/{Path(model.repo_id).name}"
        if (include_transformers or model.library == "timm") and _matches(repo_id, pattern):
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
            f"cannot list the models of {org} on {api.endpoint} ({type(error).__name__}: {first_line(error)}): "
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


def _local_org(org: str) -> Path | None:
    """The directory that ``org`` names as a path (a Hub name has no ``/``), else None."""
    if not (org.startswith((".", "~", os.sep)) or os.sep in org):
        return None
    directory = Path(org).expanduser().resolve()
    if not directory.is_dir():
        raise FlatscanError(f"{org} is not a directory: give a directory of model folders, or a Hub organisation")
    return directory


def _local_models(directory: Path) -> Iterator[OrgModel]:
    """The folders of ``directory`` with a config.json, by name (hidden ones skipped). A folder has no commit: its
    revision is a hash of its config and weights, so a rerun skips an unchanged model and audits a changed one."""
    for folder in sorted(p.resolve() for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
        config = folder / "config.json"
        if config.is_file():
            digest = hashlib.sha256()
            for file in [config, *(folder / name for name in WEIGHT_FILES)]:
                if file.is_file():
                    with file.open("rb") as content:
                        while chunk := content.read(1 << 20):
                            digest.update(chunk)
            library = "timm" if _is_timm_config(config) else None
            yield OrgModel(str(folder), None, library, f"sha256:{digest.hexdigest()[:16]}")


def audit_org(
    org: str,
    store: ResultsStore,
    options: AuditOptions,
    *,
    pattern: str | None = None,
    limit: int | None = None,
    include_transformers: bool = False,
    on_model: Callable[[AuditRow, int, int], None] | None = None,
    on_batch_factory: Callable[[str], Callable[[ScanResult], bool | None] | None] | None = None,
) -> list[AuditRow]:
    """Scan every model that :func:`list_org_models` gives, as ``options`` say (the data opened per model, in its own
    preprocessing), committing each model's row to ``store`` at once; run keys are in the module docstring.

    A refused model becomes an ``unsupported`` row, any other error a ``failed`` row with a one-line reason, and the
    audit goes on; only Ctrl-C (:class:`ScanInterrupted`, KeyboardInterrupt) stops it, the rows so far committed.
    ``on_model(row, i, n)`` follows the i-th (1-based) of n models; ``on_batch_factory(model)`` gives the scan's
    ``on_batch`` callback for that model (progress; returning True stops its scan early).
    """
    options.check_storable()
    models = list_org_models(
        org, pattern=pattern, limit=limit, include_transformers=include_transformers, offline=options.offline
    )
    rows = []
    for i, listed in enumerate(models, 1):
        key, row = audit_model(listed, options, done=store.taken, on_batch_factory=on_batch_factory)
        if row.status not in UNSTORED:
            store.put(key, row.record, row.status, row.reason)  # type: ignore[arg-type]  # a record unless skipped
        rows.append(row)
        if on_model is not None:
            on_model(row, i, len(models))
    return rows


def audit_model(
    listed: OrgModel,
    options: AuditOptions,
    *,
    done: Callable[[RunKey], bool],
    on_batch_factory: Callable[[str], Callable[[ScanResult], bool | None] | None] | None = None,
) -> tuple[RunKey, AuditRow]:
    """One model's audit (load, describe, open the data, scan), writing nothing: the run key and the row to commit
    under it, or a ``skipped`` row (nothing to commit) when ``done(key)`` says the store has the key (unless
    ``options.force``). :func:`audit_org` and the Ray tasks of :mod:`flatscan.audit.ray_audit` both call it, so both
    paths write the same rows."""
    name, force = model_name(listed), options.force
    key = requested_key(name, listed.revision, options.data, options.num_samples)
    if not force and listed.revision is not None and done(key):
        return key, AuditRow(name, "skipped", None, None)  # refused or failed before, same commit: not even loaded
    record: dict[str, Any] = {"model": name, "revision": listed.revision}
    try:
        # offline=None: HF_HUB_OFFLINE set after import is honoured, as in the CLI.
        loaded = load_model(name, offline=options.offline or None)
        if loaded.source == "local":  # no commit: the listing's hash of its files stands in
            loaded = dataclasses.replace(loaded, revision=listed.revision)
        key = dataclasses.replace(key, revision=loaded.revision)
        record = {
            "model": name,
            "revision": loaded.revision,
            "source": loaded.source,
            "architecture": loaded.architecture,
            "flatscan_version": flatscan.__version__,
        }
        run = prepare(loaded, options)  # refuses before touching any data
        data = run.data
        key = RunKey(
            name, loaded.revision, data.name, data.split, options.num_samples, preprocessing_key(data.data_config)
        )
        if not force and done(key):
            return key, AuditRow(name, "skipped", None, None)
        on_batch = on_batch_factory(name) if on_batch_factory else None  # only for a model that is scanned
        record, status, reason = measure(run, options, on_batch=on_batch), "ok", None
    except ScanInterrupted:
        raise
    except UnsupportedModel as error:  # from describe, or the scanner's checks on the first batch
        status, reason = "unsupported", error.reason
    except EnvironmentFault as error:  # the network's or machine's fault: reported, not stored, retried next run
        return key, AuditRow(name, "retry", first_line(error), None)
    except Exception as error:  # one broken repo must not end the audit of the others
        status, reason = "failed", f"{type(error).__name__}: {first_line(error)}"
    if status != "ok" and not force and done(key):
        return key, AuditRow(name, "skipped", None, None)
    return key, AuditRow(name, status, reason, record)


def model_name(listed: OrgModel) -> str:
    """The name the model loads by and its rows carry: a local model folder (its repo_id an absolute path) loads as
    a directory, a Hub repo as hf-hub:org/name."""
    return listed.repo_id if Path(listed.repo_id).is_absolute() else f"hf-hub:{listed.repo_id}"


def requested_key(name: str, revision: str | None, options: DataOptions, num_samples: int | None) -> RunKey:
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
