"""Resolve what the user names (timm name, Hub id, local directory, checkpoint file) to an eval-mode CPU model."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError
from timm.models import PretrainedCfg, get_pretrained_cfg, load_state_dict, split_model_name_tag
from torch import nn

from flatscan.inference import inference_form
from flatscan.io.errors import DownloadFailed, ModelLoadError, OfflineCacheMiss
from flatscan.io.hf_transformers import PREPROCESSOR, build_transformers, transformers_architecture
from flatscan.io.messages import few, first_line

# The weight files of a timm-format repo or directory, in the order timm prefers them.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(@[\w./-]+)?")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model and where it came from."""

    model: nn.Module  # eval mode, weights loaded, on CPU
    name: str  # canonical id, as the user would type it again
    architecture: str  # timm architecture name, or the transformers class (ResNetForImageClassification)
    source: str  # "timm" | "hub" | "local" | "checkpoint" | "random"
    revision: str | None  # Hub commit sha when loaded from the Hub


def load_model(
    name: str | None = None,
    *,
    checkpoint: str | Path | None = None,
    arch: str | None = None,
    offline: bool | None = None,
    pretrained: bool = True,
    num_classes: int | None = None,
) -> LoadedModel:
    """Load a timm name, ``hf-hub:owner/name[@revision]``, ``owner/name``, a local timm-format directory, or
    ``checkpoint`` (safetensors or torch state dict) for the timm architecture ``arch``.

    A Hub repo or directory in transformers format (``save_pretrained``) loads with transformers when flatscan's
    ``transformers`` extra is installed. ``offline`` (default: the ``HF_HUB_OFFLINE`` environment variable) reads
    the Hugging Face cache only. ``pretrained=False`` builds the architecture with random weights. Pickles are never
    unpickled beyond tensors. The model comes in its inference form (:func:`flatscan.inference.inference_form`):
    multi-branch blocks fused, weight-standardised convolutions holding the kernel they apply.
    """
    loaded = _resolve(name, checkpoint, arch, is_offline(offline), pretrained, num_classes)
    return dataclasses.replace(loaded, model=inference_form(loaded.model))


def _resolve(
    name: str | None,
    checkpoint: str | Path | None,
    arch: str | None,
    offline: bool,
    pretrained: bool,
    num_classes: int | None,
) -> LoadedModel:
    if checkpoint is not None:
        if name is not None:
            raise ModelLoadError(f"give a model name ({name!r}) or --checkpoint with --arch, not both")
        if arch is None:
            raise ModelLoadError(
                "--checkpoint needs --arch, the timm architecture of its weights (e.g. --arch resnet50)"
            )
        if not pretrained:
            raise ModelLoadError("--random-init and --checkpoint exclude each other: drop one of them")
        return _from_checkpoint(Path(checkpoint), arch, num_classes)
    if arch is not None:
        raise ModelLoadError("--arch goes with --checkpoint: add --checkpoint FILE, or pass the model as NAME")
    if not name:
        raise ModelLoadError(
            "no model given: pass a timm name, a Hub id, a local directory, or --checkpoint with --arch"
        )
    if name.startswith("hf-hub:"):
        return _from_hub(name.removeprefix("hf-hub:"), offline, pretrained, num_classes)
    path = Path(name.removeprefix("local-dir:")).expanduser()
    if _names_a_path(name, path):
        return _from_directory(path, pretrained, num_classes)
    if _HUB_ID.fullmatch(name):
        return _from_hub(name, offline, pretrained, num_classes)
    return _from_timm(name, offline, pretrained, num_classes)


def _names_a_path(name: str, path: Path) -> bool:
    """Whether ``name`` means a local path: explicitly, or because it exists and is no timm name."""
    if name.startswith(("local-dir:", ".", "~", os.sep)):
        return True
    if os.sep in name:  # a directory owner/name wins over the Hub repo, as in transformers; a/b/c is no Hub id
        return path.exists() or not _HUB_ID.fullmatch(name)
    return path.exists() and not timm.is_model(split_model_name_tag(name)[0])


def is_offline(offline: bool | None) -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import, and then refuses every request: offline=False cannot
    # undo that; the variable set later (offline=None) is honoured here.
    if hub_constants.HF_HUB_OFFLINE:
        return True
    if offline is None:
        return os.environ.get("HF_HUB_OFFLINE", "").upper() in hub_constants.ENV_VARS_TRUE_VALUES
    return offline


def _from_timm(name: str, offline: bool, pretrained: bool, num_classes: int | None) -> LoadedModel:
    arch, cfg = _timm_cfg(name)
    if not pretrained:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        return LoadedModel(model.eval(), name, arch, "random", None)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ModelLoadError(f"timm has no pretrained weights for {name!r}: {_pick_weights(arch)}")
    weights, revision = None, None
    if cfg.hf_hub_id:
        repo_id, _, hub_revision = cfg.hf_hub_id.partition("@")
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else WEIGHT_FILES
        weights = _fetch(repo_id, files, hub_revision or None, offline)
        revision = _snapshot_commit(weights)
    else:
        # A few old timm weights are GitHub release files, which timm downloads into torch.hub's cache.
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name  # type: ignore[arg-type]
        if cached.is_file():
            weights = str(cached)
        elif offline:
            raise OfflineCacheMiss(
                f"offline, and the weights of {name} ({cfg.url}) are not in the torch hub cache {cached.parent}: "
                "load it once without --offline"
            )
    # The weights are a local file now (or, for a GitHub release file, timm downloads it itself): timm loads it with
    # its registry adaptations (checkpoint filters, classifier reset when num_classes differs) and weights_only=True.
    overlay = {"file": weights} if weights else None
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes)
    except (SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        where = weights or cfg.url
        raise ModelLoadError(
            f"cannot load the weights of {name} from {where} ({first_line(error)}): the cached file may be corrupt, "
            "delete it and load again online"
        ) from None
    tag = model.pretrained_cfg.get("tag")  # type: ignore[union-attr, operator]
    return LoadedModel(model.eval(), f"{arch}.{tag}" if tag else arch, arch, "timm", revision)


def _from_hub(hub_id: str, offline: bool, pretrained: bool, num_classes: int | None) -> LoadedModel:
    repo_id, _, revision = hub_id.partition("@")
    config = _fetch(repo_id, ("config.json",), revision or None, offline)
    if transformers_architecture(_read_config(Path(config))) is not None:
        _fetch_if_present(repo_id, PREPROCESSOR, revision or None, offline)
    weights = _fetch(repo_id, WEIGHT_FILES, revision or None, offline) if pretrained else None
    # The snapshot directory of the cache is a timm-format directory like any other.
    model, arch = _build_from_config(Path(config).parent, f"hf-hub:{repo_id}", weights, num_classes)
    commit = _snapshot_commit(weights or config)
    return LoadedModel(model, f"hf-hub:{hub_id}", arch, "hub" if pretrained else "random", commit)


def _from_directory(path: Path, pretrained: bool, num_classes: int | None) -> LoadedModel:
    directory = path.resolve()
    if not directory.is_dir():
        if directory.is_file():
            raise ModelLoadError(f"{directory} is a file: load a weights file with --checkpoint FILE --arch ARCH")
        raise ModelLoadError(f"{directory} does not exist: check the path (or the timm name / Hub id)")
    if not (directory / "config.json").is_file():
        raise ModelLoadError(
            f"{directory} has no config.json, so it is not a timm-format model directory: write one with "
            "timm.models.save_for_hf(model, dir, safe_serialization=True), or load a weights file with "
            "--checkpoint FILE --arch ARCH"
        )
    weights = None
    if pretrained:
        weights = next((str(directory / f) for f in WEIGHT_FILES if (directory / f).is_file()), None)
        if weights is None:
            raise ModelLoadError(
                f"{directory} has no {' or '.join(WEIGHT_FILES)}: save the weights there, or use --random-init"
            )
    model, arch = _build_from_config(directory, str(directory), weights, num_classes)
    return LoadedModel(model, str(directory), arch, "local" if pretrained else "random", None)


def _from_checkpoint(checkpoint: Path, arch: str, num_classes: int | None) -> LoadedModel:
    path = checkpoint.expanduser().resolve()
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist: check the path")
    architecture, _ = _timm_cfg(arch)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    _load_weights(model, path, f"timm {arch}", resize_head=num_classes is None)
    return LoadedModel(model.eval(), f"{arch}@{path}", architecture, "checkpoint", None)


def _timm_cfg(name: str) -> tuple[str, PretrainedCfg | None]:
    """The timm architecture of ``name`` and the pretrained config of its tag, or a ModelLoadError with suggestions."""
    arch, _ = split_model_name_tag(name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "list names with timm.list_models('*pattern*')"
        raise ModelLoadError(f"unknown timm model {arch!r}; {hint}")
    try:
        return arch, get_pretrained_cfg(name)
    except RuntimeError:  # timm's "Invalid pretrained tag"
        raise ModelLoadError(f"timm has no weights {name!r}: {_pick_weights(arch)}") from None


def _pick_weights(arch: str) -> str:
    names = timm.list_pretrained(f"{arch}.*")
    return f"pick one of {few(names, 6)}, or use --random-init" if names else "use --random-init"


def _network_error(error: BaseException) -> bool:
    """Whether ``error`` is the network's (a connection refused or reset mid-file, a timeout) rather than the repo's.

    By module, not class: huggingface_hub's HTTP stack (httpx, httpx2, requests) changes between its versions.
    """
    module = type(error).__module__.split(".")[0]
    return isinstance(error, (ConnectionError, TimeoutError)) or module in {"httpx", "httpx2", "httpcore", "requests"}


def _fetch(repo_id: str, filenames: tuple[str, ...], revision: str | None, offline: bool) -> str:
    """Cache path of the first of ``filenames`` that the repo has, downloaded into the cache unless offline."""
    at = f"@{revision}" if revision else ""
    for filename in filenames:
        try:
            with _hub_offline() if offline else nullcontext():
                return hf_hub_download(repo_id, filename, revision=revision, local_files_only=offline)
        except RemoteEntryNotFoundError:
            continue  # the repo has no such file: try the next name
        except LocalEntryNotFoundError as error:
            if offline:
                continue  # not cached under this name, maybe under the next
            raise DownloadFailed(
                f"cannot download {filename} of hf-hub:{repo_id}{at} from {hub_constants.ENDPOINT} "
                f"({first_line(error.__cause__ or error)}) and it is not in the Hugging Face cache: check the "
                "network, proxy or HF_ENDPOINT, or pass --offline to use a model already in the cache"
            ) from None
        except GatedRepoError:
            raise ModelLoadError(
                f"hf-hub:{repo_id} is gated: accept its terms on the Hub, then log in with `hf auth login`"
            ) from None
        except RepositoryNotFoundError:
            raise ModelLoadError(
                f"hf-hub:{repo_id} is not on the Hub, or is private: check the id, or log in with `hf auth login`"
            ) from None
        except RevisionNotFoundError:
            raise ModelLoadError(
                f"hf-hub:{repo_id} has no revision {revision!r}: check the branch, tag or commit"
            ) from None
        except HfHubHTTPError as error:
            status = error.response.status_code if error.response is not None else 0
            kind = DownloadFailed if status >= 500 or status == 429 else ModelLoadError  # the server's fault: retry
            raise kind(f"the Hub refused {filename} of hf-hub:{repo_id}{at}: {first_line(error)}") from None
        except HFValidationError:
            raise ModelLoadError(f"{repo_id!r} is not a valid Hub repo id: write it as owner/name") from None
        except Exception as error:
            if not _network_error(error):
                raise
            raise DownloadFailed(
                f"downloading {filename} of hf-hub:{repo_id}{at} from {hub_constants.ENDPOINT} failed "
                f"({type(error).__name__}: {first_line(error)}); rerun to retry, or check the network"
            ) from None
    wanted = filenames[0] + "".join(f" (or {f})" for f in filenames[1:])
    if offline:
        revision_option = f" --revision {revision}" if revision else ""
        raise OfflineCacheMiss(
            f"offline, and {wanted} of hf-hub:{repo_id}{at} is not in the Hugging Face cache "
            f"{hub_constants.HF_HUB_CACHE}: load it once without --offline, or fetch it with "
            f"`hf download {repo_id} {filenames[0]}{revision_option}`"
        )
    raise ModelLoadError(
        f"hf-hub:{repo_id}{at} has no {wanted}: flatscan loads timm-format and transformers repos (config.json and "
        "model.safetensors)"
    )


def _fetch_if_present(repo_id: str, filename: str, revision: str | None, offline: bool) -> str | None:
    """Cache path of ``filename`` of the repo, or None when the repo has no such file (offline: none is cached)."""
    try:
        with _hub_offline() if offline else nullcontext():
            return hf_hub_download(repo_id, filename, revision=revision, local_files_only=offline)
    except RemoteEntryNotFoundError:
        return None
    except LocalEntryNotFoundError:
        if offline:
            return None
        return _fetch(repo_id, (filename,), revision, offline)  # its error message names the network problem


@contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub's own offline mode, in which it sends no request at all (local_files_only alone still lets it
    fetch side data such as its agent registry). It reads the HF_HUB_OFFLINE constant at each call, the environment
    variable only at import. A process-wide switch: loads are not meant to run concurrently with other Hub calls."""
    previous = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = previous


def _snapshot_commit(path: str) -> str | None:
    """The commit sha of a Hugging Face cache path ``.../snapshots/<sha>/<file>``, else None."""
    snapshot = Path(path).parent
    return snapshot.name if snapshot.parent.name == "snapshots" and _COMMIT.fullmatch(snapshot.name) else None


def _build_from_config(
    directory: Path, where: str, weights: str | None, num_classes: int | None
) -> tuple[nn.Module, str]:
    """The timm or transformers model that ``directory/config.json`` describes, with ``weights`` loaded (random when
    None)."""
    config = _read_config(directory / "config.json")
    arch = config.get("architecture") if isinstance(config, dict) else None
    if not isinstance(arch, str):
        transformers_arch = transformers_architecture(config)
        if transformers_arch is not None:
            return build_transformers(directory, where, transformers_arch, weights, num_classes)
        raise ModelLoadError(
            f"{where} is not a timm model: its config.json names no 'architecture' (timm) nor 'architectures' "
            "(transformers); flatscan loads timm-format models, as written by timm.models.save_for_hf, and "
            "transformers image classifiers, as written by save_pretrained"
        )
    _timm_cfg(arch)
    # timm's own reader of the format: architecture, model_args and pretrained_cfg (preprocessing) from config.json.
    try:
        model = timm.create_model(f"local-dir:{directory}", pretrained=False, num_classes=num_classes)
    except (TypeError, ValueError, KeyError, AssertionError) as error:  # what a builder raises for arguments it rejects
        raise ModelLoadError(
            f"{where}: {arch} rejects the model_args of its config.json ({type(error).__name__}: "
            f"{first_line(error)}): fix or remove them, or re-export the model with timm.models.save_for_hf"
        ) from None
    if weights is not None:
        _load_weights(model, Path(weights), f"{where} ({arch})", resize_head=False)
    return model.eval(), arch


def _read_config(config_file: Path) -> Any:
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"cannot read {config_file} ({first_line(error)}): re-export or re-download it") from None


def _load_weights(model: nn.Module, path: Path, target: str, *, resize_head: bool) -> None:
    """Load the state dict in ``path`` into ``model`` strictly; a mismatch is one line naming the first keys."""
    state = _read_state_dict(path)
    if resize_head:
        _fit_classifier(model, state)
    expected = model.state_dict()
    # BatchNorm fills in a missing num_batches_tracked itself (checkpoints from before torch 0.4.1 lack it).
    missing = [key for key in expected if key not in state and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in expected]
    wrong = [
        f"{key} {_shape(state[key])} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and _shape(state[key]) != tuple(value.shape)
    ]
    problems = [f"{kind} {few(keys, 3)}" for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    problems += [f"shapes differ: {few(wrong, 3)}"] if wrong else []
    if problems:
        raise ModelLoadError(
            f"the weights in {path} do not fit {target}: {'; '.join(problems)}; check that they were saved from it"
        )
    model.load_state_dict(state)


def _read_state_dict(path: Path) -> dict[str, Any]:
    """The tensors of a safetensors file or torch checkpoint, without unpickling anything but tensors."""
    try:
        # timm's reader: safetensors, or torch.load(weights_only=True) (argparse.Namespace allowed for timm's training
        # checkpoints); it unwraps {"state_dict": ...} / {"model": ...} and strips "module." / "_orig_mod." prefixes.
        return load_state_dict(str(path), use_ema=False, weights_only=True)
    except SafetensorError as error:
        raise ModelLoadError(f"{path} is not a valid safetensors file ({error}): re-export or re-download it") from None
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, AttributeError) as error:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise ModelLoadError(
                f"refusing to unpickle {path}: besides tensors it holds {few(unsafe, 3)}, and flatscan only loads "
                "weights (torch.load weights_only=True); save model.state_dict() or safetensors instead"
            ) from None
        reason = "it holds no state dict" if isinstance(error, AttributeError) else first_line(error)
        raise ModelLoadError(
            f"cannot read {path} as weights ({reason}): it is corrupt or not a safetensors / torch state-dict file; "
            "re-export or re-download it"
        ) from None


def _unsafe_globals(path: Path) -> list[str]:
    """The Python objects (other than tensors) that a torch zip checkpoint would import to unpickle."""
    find = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
    try:
        return list(find(str(path))) if find else []
    except (RuntimeError, ValueError, OSError, pickle.UnpicklingError):
        return []  # not a torch zip file


def _fit_classifier(model: nn.Module, state: dict[str, Any]) -> None:
    """Give ``model`` as many classes as the checkpoint's classifier (e.g. a model fine-tuned on 10 classes)."""
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    weight = state.get(f"{classifier}.weight") if isinstance(classifier, str) else None
    classes = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.ndim >= 2 else None
    if classes is not None and classes != getattr(model, "num_classes", classes) and hasattr(model, "reset_classifier"):
        model.reset_classifier(classes)  # type: ignore[operator]


def _shape(value: object) -> tuple[int, ...] | str:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
