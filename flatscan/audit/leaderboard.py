"""Leaderboard: audited models ranked by a flatness measure, joined with reported accuracy, with rank correlations."""

from __future__ import annotations

import html
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.table import Table
from rich.text import Text

from flatscan.audit.page import leaderboard_page
from flatscan.audit.ranks import CORRELATION_COLUMNS, rank_correlation
from flatscan.audit.reported import ReportedAccuracy
from flatscan.errors import FlatscanError
from flatscan.io.messages import printable
from flatscan.io.paths import writable_folder

# Other timm results of the same models: how much of the accuracy survives relabelling and a new test set.
_PROXIES = {"top1_real": "imagenet-real", "top1_v2": "imagenetv2-matched-frequency"}
# Left out of the terminal table for width; the reports have them.
_RICH_HIDDEN = {"revision", "architecture", "reported_top5", "top1_real", "n_samples", "dataset", "split", "status"}
_SKIPPED_COLUMNS = ["model", "revision", "architecture", "status", "reason"]


@dataclass(frozen=True)
class Leaderboard:
    """Ranked rows (``table``), rank correlations with reported top-1, and the rows not ranked (``skipped``)."""

    table: pd.DataFrame
    correlations: pd.DataFrame
    skipped: pd.DataFrame
    rank_by: str = "relative_flatness"
    command: str | None = None  # the command that made it, shown at the top of the reports

    def to_markdown(self) -> str:
        return "\n\n".join(
            [
                f"# flatscan leaderboard\n\n{self._made_with_markdown()}{html.escape(self.summary(), quote=False)}",
                f"## Ranking\n\n{_markdown(self.table)}",
                f"## Rank correlation with reported top-1\n\n{_markdown(self.correlations)}",
                f"## Not ranked (unsupported or failed)\n\n{_markdown(self.skipped) if len(self.skipped) else 'None.'}",
            ]
        )

    def _made_with_markdown(self) -> str:
        return "" if self.command is None else f"Made with: {_markdown_cell(self.command)}\n\n"

    def to_csv(self, path: str | Path) -> None:
        """Ranked and unranked rows in one file (``status`` and ``reason`` tell them apart)."""
        pd.concat([self.table, self.skipped], ignore_index=True).to_csv(path, index=False)

    def to_html(self) -> str:
        """A self-contained interactive page (see ``flatscan.audit.page``); every value from the results is escaped."""
        return leaderboard_page(self)

    def rich_table(self) -> Table:
        """The ranking for the terminal; cells are Text, so markup in a model name is shown, not interpreted."""
        table = Table(title=Text(f"flatscan leaderboard: {self.summary()}"))
        columns = [c for c in self.table.columns if c not in _RICH_HIDDEN and not c.endswith("_se")]
        for column in columns:
            table.add_column(column, overflow="fold")
        for _, row in self.table.iterrows():
            table.add_row(*(Text(self._cell(row, column)) for column in columns))
        if len(self.skipped):
            table.caption = f"{len(self.skipped)} model(s) not ranked (unsupported or failed); see the report"
        return table

    def _cell(self, row: pd.Series, column: str) -> str:
        """A value, with its standard error when the table has one."""
        se = row.get(f"{column}_se")
        if se is None or pd.isna(se) or pd.isna(row[column]):
            return _format(row[column])
        return f"{_format(row[column])} ± {se:.2g}"

    def summary(self) -> str:
        return (
            f"{len(self.table)} model(s) ranked by {self.rank_by} (ascending: smaller, i.e. flatter, first), "
            f"{len(self.skipped)} not ranked; evaluated on {', '.join(_settings(self.table)) or '-'}"
        )


def _settings(frame: pd.DataFrame) -> list[str]:
    """The evaluation settings of a results frame: "dataset (split)" for each distinct pair."""
    if "dataset" not in frame.columns:
        return []
    pairs = frame.reindex(columns=["dataset", "split"]).drop_duplicates()  # NaN equals NaN here, unlike in a set
    return sorted(f"{d} ({s})" if pd.notna(s) else str(d) for d, s in pairs.itertuples(index=False))


def _format(value: Any) -> str:
    if value is None or (not isinstance(value, (list, tuple)) and pd.isna(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def _formatted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.map(_format) if len(frame.columns) else frame


def _markdown(frame: pd.DataFrame) -> str:
    return _formatted(frame).map(_markdown_cell).to_markdown(index=False)


def _markdown_cell(text: str) -> str:
    """``text`` inert in a Markdown table: no raw HTML, link (``[x](javascript:...)``), code span, row break or
    terminal control sequence survives."""
    text = html.escape(printable(text), quote=False)
    for special in "\\`[]|":
        text = text.replace(special, "\\" + special)
    return text


def _correlations(table: pd.DataFrame, measures: Sequence[str]) -> pd.DataFrame:
    """Each measure against reported top-1, over all ranked models and per family."""
    groups = [("all", table)] + [(str(family), rows) for family, rows in table.groupby("family", sort=True)]
    records = []
    for measure in measures:
        for group, rows in groups:
            pairs = rows[[measure, "reported_top1"]].astype(float).dropna()
            x, y = pairs[measure].to_numpy(), pairs["reported_top1"].to_numpy()
            records.append({"measure": measure, "group": group, "n": len(pairs), **rank_correlation(x, y)})
    return pd.DataFrame(records, columns=CORRELATION_COLUMNS)


def _img_size(input_size: Any) -> int | None:
    """The image size timm's results use: the last entry of a (C, H, W) input size."""
    return int(input_size[-1]) if isinstance(input_size, (list, tuple)) and input_size else None


def _join_reported(ok: pd.DataFrame, reported: ReportedAccuracy) -> pd.DataFrame:
    sizes = ok["input_size"].map(_img_size) if "input_size" in ok.columns else pd.Series(None, index=ok.index)
    found = [reported.lookup(model, size) for model, size in zip(ok["model"], sizes, strict=True)]
    ok["reported_top1"] = [r.top1 if r else None for r in found]
    ok["reported_top5"] = [r.top5 if r else None for r in found]
    ok["reported_img_size"] = pd.array([r.img_size if r else None for r in found], dtype="Int64")
    ok["reported_source"] = [r.source if r else None for r in found]
    for column, variant in _PROXIES.items():
        proxy = ReportedAccuracy(
            reported.results_dir, offline=reported.offline, variant=variant, base_url=reported.base_url
        )
        try:
            # Only for numbers from timm's results, at the same image size as the reported top-1.
            values = [
                proxy.lookup(model, size) if r and r.source.startswith("timm") else None
                for model, size, r in zip(ok["model"], ok["reported_img_size"], found, strict=True)
            ]
        except FlatscanError as error:
            warnings.warn(f"no {column}: {error}", stacklevel=3)
            values = [None] * len(ok)
        ok[column] = [v.top1 if v else None for v in values]
    return ok


def build_leaderboard(
    results: pd.DataFrame,
    reported: ReportedAccuracy | None,
    rank_by: str = "relative_flatness",
    measures: Sequence[str] = ("relative_flatness", "trace", "classifier_flatness"),
) -> Leaderboard:
    """Rank the ``ok`` rows of ``results`` (a ResultsStore frame) by ``rank_by``, ascending (flatter first).

    Rows without reported accuracy are ranked with empty reported columns; unsupported or failed rows go
    to ``skipped`` with their reasons. The results must come from one evaluation data set and split.
    """
    status = results["status"] if "status" in results.columns else pd.Series("ok", index=results.index)
    settings = _settings(results[status == "ok"])
    if len(settings) > 1:
        raise FlatscanError(
            f"the results mix {len(settings)} evaluation settings: {', '.join(settings)}; "
            "build one leaderboard per setting by filtering the frame on dataset and split"
        )
    ok = results[status == "ok"].copy()
    ok["status"] = "ok"
    if "family" not in ok.columns:
        ok["family"] = None
    if "accuracy" in ok.columns:
        ok["top1_scanned"] = 100 * ok["accuracy"]
    if reported is not None:
        ok = _join_reported(ok, reported)
    else:
        ok[["reported_top1", "reported_top5", "reported_img_size", "reported_source", *_PROXIES]] = None
    wanted = list(dict.fromkeys([rank_by, *measures]))
    missing = [name for name in wanted if name not in ok.columns]
    if missing:
        raise FlatscanError(
            f"no measure {', '.join(missing)} in the results; rank by or correlate one of their numeric columns"
        )
    ok[wanted] = ok[wanted].astype(float)
    ok = ok.sort_values(rank_by, na_position="last", kind="stable")
    ok.insert(0, "rank", ok[rank_by].rank(method="min").astype("Int64"))
    shown = [
        "rank",
        "model",
        "revision",
        "family",
        "architecture",
        *[c for name in wanted for c in (name, f"{name}_se")],
        "top1_scanned",
        "reported_top1",
        "reported_top5",
        "reported_img_size",
        "reported_source",
        *_PROXIES,
        "n_samples",
        "dataset",
        "split",
        "status",
    ]
    table = ok[[c for c in dict.fromkeys(shown) if c in ok.columns]].reset_index(drop=True)
    skipped = results[status != "ok"]
    skipped = skipped[[c for c in _SKIPPED_COLUMNS if c in skipped.columns]].reset_index(drop=True)
    return Leaderboard(table, _correlations(table, list(dict.fromkeys(measures))), skipped, rank_by)


def check_report_target(out_dir: Path, stem: str) -> None:
    """Refuse a ``stem`` that is not a plain file name (it would write outside ``out_dir``) and an ``out_dir`` that
    is a file or cannot be created or written, each in one line."""
    if not stem or Path(stem).name != stem or stem in (".", ".."):
        raise FlatscanError(f"--stem {stem!r}: give a plain file name (no folders); choose the folder with --out")
    writable_folder(out_dir, f"--out {out_dir}")


def write_reports(board: Leaderboard, out_dir: Path = Path("reports"), stem: str = "leaderboard") -> list[Path]:
    """Write ``stem``.md, .csv and .html into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    check_report_target(out_dir, stem)
    markdown, csv, page = (out_dir / f"{stem}{suffix}" for suffix in (".md", ".csv", ".html"))
    markdown.write_text(board.to_markdown() + "\n", encoding="utf-8")
    board.to_csv(csv)
    page.write_text(board.to_html(), encoding="utf-8")
    return [markdown, csv, page]
