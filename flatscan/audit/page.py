"""The leaderboard as one self-contained, interactive HTML page: a sortable, filterable table with value ± SE, and a
Vega-Lite scatter (JavaScript inlined, nothing fetched at view time) whose points name and filter the models."""

from __future__ import annotations

import math
import warnings
from functools import cache
from typing import TYPE_CHECKING, Any

import altair as alt
import jinja2
import pandas as pd
import vl_convert
from uncertainties import ufloat

from flatscan.io.messages import printable

if TYPE_CHECKING:
    from flatscan.audit.leaderboard import Leaderboard

LABELS = {
    "relative_flatness": "relative flatness κ",
    "trace": "Tr(H)",
    "classifier_flatness": "classifier flatness κ_W",
    "top1_scanned": "top-1 scanned (%)",
    "reported_top1": "reported top-1 (%)",
    "reported_top5": "reported top-5 (%)",
    "top1_real": "ImageNet-ReaL top-1 (%)",
    "top1_v2": "ImageNetV2 top-1 (%)",
    "n_samples": "samples",
}
_PERCENTAGES = ("top1_scanned", "reported_top1", "reported_top5", "top1_real", "top1_v2")
_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("flatscan.audit", "templates"), autoescape=True, undefined=jinja2.StrictUndefined
)


def with_error(value: float, se: float | None) -> str:
    """``value ± se`` rounded to the standard error's second significant digit (``1235±12``; large and small values
    with a common power of ten); the value alone, to 4 significant digits, without a positive finite error; empty
    for a missing value."""
    if not _finite(value):
        return ""
    if se is None or not _finite(se) or se <= 0:
        return f"{value:.4g}"
    return f"{ufloat(value, se):.2uP}"


def interval(estimate: float, low: float, high: float) -> str:
    """``0.42 [0.10, 0.71]``; the estimate alone without an interval; empty without an estimate."""
    if not _finite(estimate):
        return ""
    if not (_finite(low) and _finite(high)):
        return f"{estimate:.2f}"
    return f"{estimate:.2f} [{low:.2f}, {high:.2f}]"


def leaderboard_page(board: Leaderboard) -> str:
    """The page for ``board``; every value from the results is escaped by the template (HTML) or ``tojson``."""
    table = board.table
    measures = [c for c in table.columns if f"{c}_se" in table.columns]
    extra = [c for c in LABELS if c not in measures and c in table.columns and table[c].notna().any()]
    columns = [
        {"label": "rank", "kind": "number"},
        {"label": "model", "kind": "text model"},
        {"label": "family", "kind": "text"},
        *({"label": LABELS.get(c, c), "kind": "value"} for c in [*measures, *extra]),
    ]
    rows = [_row(record, measures, extra) for record in table.to_dict("records")]
    statuses = (["ok"] if len(table) else []) + sorted(set(board.skipped.get("status", [])) - {"ok"})
    spec = _scatter_spec(table, board.rank_by)
    return _TEMPLATES.get_template("leaderboard.html.j2").render(
        command=None if board.command is None else printable(board.command),
        summary=board.summary(),
        measure_label=LABELS.get(board.rank_by, board.rank_by),
        spec=spec,
        vega_bundle=_vega_bundle() if spec else "",
        families=sorted({row["family"] for row in rows} - {""}),
        statuses=statuses,
        columns=columns,
        rows=rows,
        correlations=[
            {
                "measure": LABELS.get(r["measure"], r["measure"]),
                "group": r["group"],
                "n": r["n"],
                "tau": interval(r["kendall_tau"], r["tau_ci_low"], r["tau_ci_high"]),
                "rho": interval(r["spearman_rho"], r["rho_ci_low"], r["rho_ci_high"]),
            }
            for r in board.correlations.to_dict("records")
        ],
        skipped=[
            {key: _text(r.get(key)) for key in ("model", "architecture", "status", "reason")}
            for r in board.skipped.to_dict("records")
        ],
    )


def _row(record: dict[str, Any], measures: list[str], extra: list[str]) -> dict[str, Any]:
    """One ranked model: the cells' text and the raw values they sort by."""
    details = ", ".join(f"{key} {_text(record.get(key))}" for key in ("architecture", "revision") if record.get(key))
    cells = [
        _cell(_text(record["rank"]), _raw(record["rank"])),
        _cell(_text(record["model"]), _text(record["model"]), details),
        _cell(_text(record["family"]), _text(record["family"])),
    ]
    cells += [_cell(with_error(record[c], record[f"{c}_se"]), _raw(record[c])) for c in measures]
    cells += [_cell(_number(c, record[c]), _raw(record[c])) for c in extra]
    return {"model": _text(record["model"]), "family": _text(record["family"]), "cells": cells}


def _cell(text: str, value: str, title: str = "") -> dict[str, str]:
    return {"text": text, "value": value, "title": title}


def _scatter_spec(table: pd.DataFrame, measure: str) -> dict[str, Any] | None:
    """Vega-Lite: ``measure`` ± SE (bars) against reported top-1, one colour per family; hover names the model."""
    points = table.dropna(subset=[measure, "reported_top1"])
    if not len(points):
        return None
    value = points[measure].astype(float)
    se = points.get(f"{measure}_se", pd.Series(0.0, index=points.index)).astype(float).fillna(0.0)
    log = bool((value > 0).all())  # flatness spans orders of magnitude across architectures
    low = value - se
    data = pd.DataFrame(
        {
            "model": points["model"].astype(str),
            "family": points["family"].fillna("").astype(str),
            "value": value,
            "low": low.where(low > 0, value) if log else low,  # a bar below zero has no place on a log axis
            "high": value + se,
            "shown": [with_error(v, s) for v, s in zip(value, se, strict=True)],
            "top1": points["reported_top1"].astype(float),
        }
    )
    label = LABELS.get(measure, measure)
    x_scale = alt.Scale(type="log" if log else "linear", zero=False)
    y = alt.Y("top1:Q", title="reported top-1 (%)", scale=alt.Scale(zero=False, padding=8))
    color = alt.Color("family:N", title="family")
    base = alt.Chart(data)
    bars = base.mark_rule(opacity=0.6).encode(
        x=alt.X("low:Q", title=label, scale=x_scale), x2="high:Q", y=y, color=color
    )
    dots = base.mark_point(filled=True, size=70, cursor="pointer").encode(
        x=alt.X("value:Q", title=label, scale=x_scale),
        y=y,
        color=color,
        tooltip=[
            alt.Tooltip("model:N"),
            alt.Tooltip("family:N"),
            alt.Tooltip("shown:N", title=label),
            alt.Tooltip("top1:Q", title="reported top-1 (%)", format=".2f"),
        ],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # altair's own use of jsonschema internals
        return (bars + dots).properties(width=720, height=380).to_dict()


@cache
def _vega_bundle() -> str:
    """Vega, Vega-Lite and vega-embed as one script (about 0.9 MB; built once per process, ~2 s)."""
    return vl_convert.javascript_bundle("window.vegaEmbed = vegaEmbed;")


def _finite(value: Any) -> bool:
    return value is not None and not pd.isna(value) and math.isfinite(float(value))


def _raw(value: Any) -> str:
    return repr(float(value)) if _finite(value) else ""


def _text(value: Any) -> str:
    return "" if value is None or (not isinstance(value, (list, tuple)) and pd.isna(value)) else str(value)


def _number(column: str, value: Any) -> str:
    if not _finite(value):
        return ""
    return f"{float(value):.2f}" if column in _PERCENTAGES else f"{float(value):.6g}"
