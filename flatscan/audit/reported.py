"""Reported top-1/top-5 accuracy of a model: a user CSV, timm's published results, or the model card.

Which row of timm's results (a model can have several, one per ``img_size``): the row at the evaluated
image size; else the row at the model's default input size (its timm pretrained cfg ``input_size``, at
which flatscan evaluates unless told otherwise); else the row with the largest ``img_size`` (timm's
headline number, usually ``test_input_size``). ``Reported.img_size`` says which size the number is for.
Accuracies are percentages, as timm publishes them; card or user values all <= 1 are taken as fractions.
A downloaded CSV is kept in the cache and used as is; delete it to fetch timm's newer results.
"""

from __future__ import annotations

import io
import os
import re
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import timm.models
from huggingface_hub import ModelCard, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError

from flatscan.errors import FlatscanError
from flatscan.io.messages import first_line

TIMM_RESULTS_URL = "https://raw.githubusercontent.com/huggingface/pytorch-image-models/main/results/"
VARIANTS = ("imagenet", "imagenet-real", "imagenetv2-matched-frequency")

# Data set names on model cards, lower-case alphanumerics of the last path part ("ILSVRC/imagenet-1k").
_CARD_DATASETS = {
    "imagenet": {"imagenet", "imagenet1k", "ilsvrc2012", "imagenet2012", "imagenetilsvrc2012"},
    "imagenet-real": {"imagenetreal", "imagenet1kreal"},
    "imagenetv2-matched-frequency": {"imagenetv2", "imagenetv2matchedfrequency"},
}
_TOP1_METRICS = {"accuracy", "acc", "top1", "top1accuracy", "acc1", "accuracytop1", "top1acc"}
_TOP5_METRICS = {"top5", "top5accuracy", "acc5", "accuracytop5", "top5acc"}


@dataclass(frozen=True)
class Reported:
    """Reported accuracy (percent) and where it comes from."""

    top1: float | None
    top5: float | None
    img_size: int | None
    source: str  # "timm results-imagenet.csv", "model card", "user: file.csv"


def default_cache_dir() -> Path:
    """``$FLATSCAN_CACHE/timm-results``, by default ``~/.cache/flatscan/timm-results``."""
    root = os.environ.get("FLATSCAN_CACHE") or Path.home() / ".cache" / "flatscan"
    return Path(root) / "timm-results"


def timm_name(model: str) -> str | None:
    """``arch.tag`` of a timm model ("resnet50", "timm/resnet50.a1_in1k", "hf-hub:timm/..."); None otherwise."""
    name = model.removeprefix("hf-hub:")
    org, slash, rest = name.partition("/")
    if slash:
        if org != "timm":
            return None
        name = rest
    if "." not in name:
        # A bare architecture means its default pretrained weights, as timm.create_model(pretrained=True).
        cfg = _pretrained_cfg(name)
        if cfg is not None and cfg.tag:
            return f"{name}.{cfg.tag}"
    return name


def _pretrained_cfg(name: str) -> Any:
    try:
        return timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # an arch.tag with a tag the installed timm does not know
        return None


def _canonical(model: str) -> str:
    """The name models are matched on: the timm ``arch.tag``, else the Hub id without ``hf-hub:``."""
    return timm_name(model) or model.removeprefix("hf-hub:")


def _pick(rows: pd.DataFrame, img_size: int | None, name: str | None) -> pd.Series:
    """The row for ``img_size``, else for the model's default input size, else the largest img_size."""
    cfg = _pretrained_cfg(name) if name else None
    default = cfg.input_size[-1] if cfg is not None and cfg.input_size else None
    for size in (img_size, default):
        if size is not None:
            matching = rows[rows["img_size"] == size]
            if len(matching):
                return matching.iloc[0]
    return rows.sort_values("img_size", ascending=False, na_position="last").iloc[0]


def _number(value: Any) -> float | None:
    return None if pd.isna(value) else float(value)


def _reported(row: pd.Series, source: str) -> Reported:
    size = row.get("img_size")
    return Reported(_number(row["top1"]), _number(row.get("top5")), None if pd.isna(size) else int(size), source)


def _key(text: str | None) -> str:
    return re.sub(r"[^a-z0-9]", "", (text or "").rsplit("/", 1)[-1].lower())


def _metric(result: Any) -> str | None:
    """Which accuracy an EvalResult holds (top1, top5 or None); its metric name is more specific than its type."""
    for text in (result.metric_name, result.metric_type):
        if _key(text) in _TOP5_METRICS:
            return "top5"
        if _key(text) in _TOP1_METRICS:
            return "top1"
    return None


def card_reported(eval_results: Iterable[Any] | None, variant: str = "imagenet") -> Reported | None:
    """Top-1/top-5 from a model card's eval results (``card_data.eval_results``) on an ImageNet data set."""
    values: dict[str, float] = {}
    for result in eval_results or ():
        datasets = {_key(result.dataset_type), _key(result.dataset_name)}
        metric = _metric(result)
        if metric and metric not in values and datasets & _CARD_DATASETS[variant]:
            try:
                values[metric] = float(result.metric_value)
            except (TypeError, ValueError):  # a card's free-form value ("81.2 %", a list): not a number to use
                continue
    if "top1" not in values:
        return None
    # A card's accuracy <= 1 is a fraction: no ImageNet classifier worth auditing has 1 % top-1.
    scale = 100.0 if values["top1"] <= 1 else 1.0
    top5 = values.get("top5")
    return Reported(values["top1"] * scale, None if top5 is None else top5 * scale, None, "model card")


class ReportedAccuracy:
    """Looks up reported accuracy: the user CSV first, then timm's results CSV, then the model card."""

    def __init__(
        self,
        results_dir: Path | None = None,
        user_csv: Path | None = None,
        offline: bool = False,
        variant: str = "imagenet",
        base_url: str = TIMM_RESULTS_URL,
    ) -> None:
        if variant not in VARIANTS:
            raise FlatscanError(f"unknown reported-accuracy variant {variant!r}; use one of {', '.join(VARIANTS)}")
        self.results_dir = Path(results_dir) if results_dir is not None else default_cache_dir()
        self.offline = offline
        self.variant = variant
        self.base_url = base_url
        self.filename = f"results-{variant}.csv"
        self._user = None if user_csv is None else _read_user_csv(Path(user_csv))
        self._user_source = None if user_csv is None else f"user: {Path(user_csv).name}"
        self._timm: dict[str, pd.DataFrame] | None = None  # loaded (or downloaded) on first use

    def lookup(self, model: str, img_size: int | None = None, card_eval_results: Any | None = None) -> Reported | None:
        """Reported accuracy of ``model`` at ``img_size``, or None when there is none.

        ``card_eval_results``: the model card's ``card_data.eval_results`` when the caller has it; for a
        non-timm Hub model without it, the card is read from the Hub (the local cache only when offline).
        """
        name = timm_name(model)
        if self._user is not None:
            rows = self._user[self._user["key"] == _canonical(model)]
            if len(rows):
                return _reported(_pick(rows, img_size, name), self._user_source)  # type: ignore[arg-type]
        if name is not None:
            rows = self._timm_results().get(name)
            if rows is not None:
                return _reported(_pick(rows, img_size, name), f"timm {self.filename}")
        if card_eval_results is None and name is None:
            card_eval_results = self._card_eval_results(model.removeprefix("hf-hub:"))
        return card_reported(card_eval_results, self.variant)

    def _timm_results(self) -> dict[str, pd.DataFrame]:
        if self._timm is None:
            path = self.results_dir / self.filename
            if not path.exists():
                self._download(path)
            try:
                frame = pd.read_csv(path, usecols=["model", "img_size", "top1", "top5"])
            except (ValueError, UnicodeDecodeError) as error:  # pandas' ParserError is a ValueError
                raise FlatscanError(
                    f"{path} is not a timm results CSV ({first_line(error)}); delete it so that it is downloaded again"
                ) from None
            self._timm = {str(model): rows for model, rows in frame.groupby("model", sort=False)}
        return self._timm

    def _download(self, path: Path) -> None:
        url = self.base_url.rstrip("/") + "/" + self.filename
        if self.offline:
            raise FlatscanError(
                f"{self.filename} is not in the cache {self.results_dir} (offline); "
                f"download {url} there, or run once without --offline"
            )
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                content = response.read()
        except OSError as error:  # URLError, HTTPError and timeouts are all OSErrors
            raise FlatscanError(
                f"cannot download {url} ({first_line(error)}); check the network, "
                f"or put {self.filename} into {self.results_dir}"
            ) from None
        try:
            columns = pd.read_csv(io.BytesIO(content), nrows=1).columns
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
            columns = pd.Index([])
        if not {"model", "img_size", "top1", "top5"} <= set(columns):
            raise FlatscanError(f"{url} is not a timm results CSV; check the base URL")
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: an interrupted download never leaves a truncated CSV in the cache.
        partial = path.with_name(path.name + ".part")
        partial.write_bytes(content)
        partial.replace(path)

    def _card_eval_results(self, repo_id: str) -> Any | None:
        try:
            readme = hf_hub_download(repo_id, "README.md", local_files_only=self.offline)
        except (EntryNotFoundError, HFValidationError):  # no card, not cached offline, or not a Hub id (a local dir)
            return None
        except OSError as error:
            raise FlatscanError(
                f"cannot read the model card of {repo_id} ({first_line(error)}); retry, or give --reported FILE.csv"
            ) from None
        return ModelCard.load(readme).data.eval_results


def _read_user_csv(path: Path) -> pd.DataFrame:
    """The user's CSV (model, top1, optional top5 and img_size) with a ``key`` column to match names on."""
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        reason = first_line(error)
        raise FlatscanError(f"cannot read --reported {path} ({reason}); give a CSV with columns model, top1") from None
    missing = {"model", "top1"} - set(frame.columns)
    if missing:
        raise FlatscanError(
            f"--reported {path} lacks column(s) {', '.join(sorted(missing))}; "
            "give columns model, top1 (optional top5, img_size)"
        )
    frame = frame.reindex(columns=["model", "top1", "top5", "img_size"])
    try:
        frame[["top1", "top5", "img_size"]] = frame[["top1", "top5", "img_size"]].apply(pd.to_numeric)
    except ValueError as error:
        reason = first_line(error)
        raise FlatscanError(f"--reported {path}: {reason}; top1, top5 and img_size must be numbers") from None
    if frame["top1"].max() <= 1:  # the whole file in fractions
        frame[["top1", "top5"]] *= 100
    frame["key"] = [_canonical(str(model)) for model in frame["model"]]
    return frame
