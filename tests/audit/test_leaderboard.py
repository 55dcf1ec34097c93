"""Leaderboard: ranking, correlations against scipy, per-family groups, escaping, reports."""

from __future__ import annotations

import base64
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from scipy import stats

from flatscan.audit import leaderboard as leaderboard_module
from flatscan.audit import ranks as ranks_module
from flatscan.audit.leaderboard import Leaderboard, build_leaderboard, write_reports
from flatscan.audit.reported import ReportedAccuracy
from flatscan.audit.store import ResultsStore, RunKey
from flatscan.errors import FlatscanError

TIMM_RESULTS = Path(__file__).parents[2] / ".." / "shared" / "data" / "timm-results"
CSVS = ("results-imagenet.csv", "results-imagenet-real.csv", "results-imagenetv2-matched-frequency.csv")
HOSTILE = "<script>alert(1)</script>"
MARKUP = "[red]markup[/red]"
NASTY = '"&<>'
MEASURES = ("relative_flatness", "trace", "classifier_flatness")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("timm-results")
    for name in CSVS:
        shutil.copy(TIMM_RESULTS / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """A store's frame: 12 ResNets and 9 ConvNeXts from timm's results, two hostile names, 2 refusals."""
    published = pd.read_csv(TIMM_RESULTS / "results-imagenet.csv")
    names = published["model"].drop_duplicates()
    families = {
        "resnet": names[names.str.match(r"resnet\d+\.")].head(12),
        "convnext": names[names.str.match(r"convnext_(tiny|small)\.")].head(9),
        NASTY: pd.Series([HOSTILE, MARKUP]),
        "mobilenetv2": pd.Series(["mobilenetv2_100.ra_in1k", "mobilenetv2_110d.ra_in1k"]),
    }
    rng = np.random.default_rng(0)
    with ResultsStore(tmp_path_factory.mktemp("store") / "results.sqlite") as store:
        for family, models in families.items():
            for model in models:
                key = RunKey(model, None, "imagenet-1k", "validation", 256, "{}")
                kappa = float(rng.lognormal())
                record = {
                    "family": family,
                    "architecture": model.split(".")[0],
                    "relative_flatness": kappa,
                    "relative_flatness_se": kappa / 20,
                    "trace": float(rng.lognormal()),
                    "trace_se": 0.1,
                    "classifier_flatness": float(rng.lognormal()),
                    "classifier_flatness_se": 0.1,
                    "accuracy": float(rng.uniform(0.6, 0.9)),
                    "n_samples": 256,
                    "dataset": "imagenet-1k",
                    "split": "validation",
                    "input_size": [3, 224, 224],
                }
                store.put(key, record)
        store.put(RunKey("seresnet50.a1_in1k", None, "imagenet-1k", "validation", 256, "{}"), {}, "unsupported", NASTY)
        store.put(RunKey(HOSTILE + "2", None, "imagenet-1k", "validation", 256, "{}"), {}, "failed", f"boom {HOSTILE}")
        return store.frame()


@pytest.fixture(scope="module")
def board(results: pd.DataFrame, cache: Path) -> Leaderboard:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ranks_module, "BOOTSTRAP_RESAMPLES", 300)  # the estimates do not depend on it
        return build_leaderboard(results, ReportedAccuracy(results_dir=cache, offline=True))


def test_ranking_order(board: Leaderboard, results: pd.DataFrame, cache: Path) -> None:
    table = board.table
    assert len(table) == (results["status"] == "ok").sum() == 25
    assert table["relative_flatness"].is_monotonic_increasing
    assert list(table["rank"]) == list(range(1, 26))
    assert table.loc[0, "model"] == results.loc[results["relative_flatness"].idxmin(), "model"]
    assert (table["top1_scanned"] == 100 * table["model"].map(results.set_index("model")["accuracy"])).all()

    by_trace = build_leaderboard(results, None, rank_by="trace", measures=("trace",))
    assert by_trace.table["trace"].is_monotonic_increasing
    assert list(by_trace.correlations["group"]) == ["all", NASTY, "convnext", "mobilenetv2", "resnet"]
    assert by_trace.correlations[["kendall_tau", "spearman_rho"]].isna().all().all()  # nothing reported


def test_missing_measure_ranks_last(results: pd.DataFrame) -> None:
    trace_only = results.copy()
    trace_only.loc[trace_only["model"] == MARKUP, "relative_flatness"] = np.nan
    table = build_leaderboard(trace_only, None, measures=()).table
    assert table.iloc[-1]["model"] == MARKUP and pd.isna(table.iloc[-1]["rank"])
    assert list(table["rank"][:-1]) == list(range(1, 25))


def test_reported_accuracy_joined_and_missing_listed(board: Leaderboard, cache: Path) -> None:
    published = pd.read_csv(cache / "results-imagenet.csv")
    v2 = pd.read_csv(cache / "results-imagenetv2-matched-frequency.csv")
    table = board.table.set_index("model")
    resnet = table[table["family"] == "resnet"].index[0]
    expected = published[(published["model"] == resnet) & (published["img_size"] == 224)]["top1"].item()
    assert table.loc[resnet, "reported_top1"] == expected
    assert table.loc[resnet, "reported_source"] == "timm results-imagenet.csv"
    assert table.loc[resnet, "top1_v2"] == v2[(v2["model"] == resnet) & (v2["img_size"] == 224)]["top1"].item()
    # No reported accuracy: still ranked, with empty reported columns.
    assert HOSTILE in table.index and MARKUP in table.index
    assert pd.isna(table.loc[HOSTILE, "reported_top1"]) and pd.notna(table.loc[HOSTILE, "rank"])
    assert table["reported_top1"].notna().sum() == 23


def test_correlations_match_scipy(board: Leaderboard) -> None:
    correlations = board.correlations.set_index(["measure", "group"])
    for measure in MEASURES:
        for group, rows in [("all", board.table), *board.table.groupby("family")]:
            pairs = rows[[measure, "reported_top1"]].dropna()
            got = correlations.loc[(measure, group)]
            assert got["n"] == len(pairs)
            if len(pairs) < 3:
                assert got[["kendall_tau", "tau_ci_low", "spearman_rho", "rho_ci_high"]].isna().all()
                continue
            tau = stats.kendalltau(pairs[measure], pairs["reported_top1"]).statistic
            rho = stats.spearmanr(pairs[measure], pairs["reported_top1"]).statistic
            assert got["kendall_tau"] == pytest.approx(tau, abs=1e-12)
            assert got["spearman_rho"] == pytest.approx(rho, abs=1e-12)
            assert got["tau_ci_low"] <= tau <= got["tau_ci_high"]
            assert got["rho_ci_low"] <= rho <= got["rho_ci_high"]
            assert -1 <= got["tau_ci_low"] < got["tau_ci_high"] <= 1
    assert correlations.loc[("relative_flatness", "all"), "n"] == 23
    assert correlations.loc[("relative_flatness", "resnet"), "n"] == 12
    assert correlations.loc[("relative_flatness", "mobilenetv2"), "n"] == 2  # n < 3: NaN, not a crash


def test_bootstrap_is_reproducible(results: pd.DataFrame, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ranks_module, "BOOTSTRAP_RESAMPLES", 100)
    first, second = (
        build_leaderboard(results, ReportedAccuracy(results_dir=cache, offline=True), measures=("trace",)).correlations
        for _ in range(2)
    )
    assert first["tau_ci_low"].notna().sum() == 3  # all, convnext, resnet
    pd.testing.assert_frame_equal(first, second)


def test_hostile_names_are_escaped_in_html(board: Leaderboard) -> None:
    page = board.to_html()
    assert HOSTILE not in page and "<script" not in page
    assert NASTY not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&quot;&amp;&lt;&gt;" in page  # the family, and the unsupported row's reason
    assert f"boom {HOSTILE}".replace("<", "&lt;").replace(">", "&gt;") in page
    [image] = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert base64.b64decode(image).startswith(b"\x89PNG\r\n\x1a\n")


def test_not_ranked_section(board: Leaderboard) -> None:
    assert list(board.skipped["status"]) == ["unsupported", "failed"]
    assert list(board.skipped["reason"]) == [NASTY, f"boom {HOSTILE}"]
    assert "seresnet50.a1_in1k" not in set(board.table["model"])
    markdown = board.to_markdown()
    assert markdown.index("## Not ranked") < markdown.index("seresnet50.a1_in1k")


def test_rich_table_shows_markup_literally(board: Leaderboard) -> None:
    console = Console(record=True, width=400)
    console.print(board.rich_table())
    text = console.export_text()
    assert MARKUP in text and HOSTILE in text
    assert "2 model(s) not ranked" in text


def test_write_reports(board: Leaderboard, tmp_path: Path) -> None:
    paths = write_reports(board, tmp_path / "reports", stem="org")
    assert [path.name for path in paths] == ["org.md", "org.csv", "org.html"]
    assert all(path.stat().st_size > 0 for path in paths)
    written = pd.read_csv(paths[1])
    assert len(written) == 27
    assert list(written["status"].value_counts().sort_index()) == [1, 25, 1]  # failed, ok, unsupported
    assert written.loc[written["status"] == "unsupported", "reason"].item() == NASTY
    assert written.loc[0, "relative_flatness"] == board.table.loc[0, "relative_flatness"]
    markdown = paths[0].read_text()
    assert re.search(r"^\|\s+rank\s+\|\s+model", markdown, re.MULTILINE) and "kendall_tau" in markdown
    assert HOSTILE not in markdown and "&lt;script&gt;" in markdown  # a Markdown renderer passes raw HTML through


def test_one_evaluation_setting_and_known_measures(results: pd.DataFrame) -> None:
    mixed = results.copy()
    mixed.loc[0, "dataset"] = "imagenetv2"
    with pytest.raises(FlatscanError, match="mix 2 evaluation settings"):
        build_leaderboard(mixed, None)
    # Rows without a split are one setting, shown without "(split)".
    assert "evaluated on imagenet-1k\n" in build_leaderboard(results.assign(split=np.nan), None).to_markdown()
    with pytest.raises(FlatscanError, match="no measure sharpness"):
        build_leaderboard(results, None, rank_by="sharpness")


def test_missing_proxy_files_warn(results: pd.DataFrame, tmp_path: Path) -> None:
    shutil.copy(TIMM_RESULTS / "results-imagenet.csv", tmp_path / "results-imagenet.csv")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = build_leaderboard(results, ReportedAccuracy(results_dir=tmp_path, offline=True), measures=()).table
    assert table["reported_top1"].notna().sum() == 23
    assert table[["top1_real", "top1_v2"]].isna().all().all()
    assert any("results-imagenet-real.csv" in str(warning.message) for warning in caught)


def test_markdown_cells_are_inert(board: Leaderboard) -> None:
    link = "[click](javascript:alert(1))"
    frame = pd.DataFrame({"model": [link, "red\x1b[31mname", "a|b `code`"]})
    markdown = leaderboard_module._markdown(frame)
    assert link not in markdown and r"\[click\](javascript:alert(1))" in markdown
    assert "\x1b" not in markdown and "\\x1b[31m" not in markdown and r"red\\x1b\[31mname" in markdown
    assert r"a\|b \`code\`" in markdown
    assert MARKUP not in board.to_markdown() and r"\[red\]markup\[/red\]" in board.to_markdown()
