"""Leaderboard: ranking, correlations against scipy, per-family groups, escaping, reports."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from scipy import stats
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from flatscan.audit import leaderboard as leaderboard_module
from flatscan.audit import ranks as ranks_module
from flatscan.audit.leaderboard import Leaderboard, build_leaderboard, write_reports
from flatscan.audit.page import with_error
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
    assert HOSTILE not in page and NASTY not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the table cells
    assert "&#34;&amp;&lt;&gt;" in page  # the family, and the unsupported row's reason
    assert f"boom {HOSTILE}".replace("<", "&lt;").replace(">", "&gt;") in page
    # The chart's data: JSON inside a script element, with "<" escaped so no name can close the element.
    [spec] = re.findall(r'vegaEmbed\("#scatter", (\{.*?\}), \{ renderer', page)
    assert "</" not in spec and json.loads(spec)["$schema"].startswith("https://vega.github.io/schema/vega-lite/")
    # Only the page's own scripts: no script element from the data.
    assert page.count("<script") == 2


@pytest.mark.parametrize(
    ("value", "se", "shown"),
    [
        (1234.567, 12.3, "1235±12"),
        (0.1715539, 0.0048932, "0.1716±0.0049"),
        (5.3e7, 2.1e6, "(5.30±0.21)×10⁷"),  # noqa: RUF001
        (12.3456, 0.5, "12.35±0.50"),
        (0.5, 0.0, "0.5"),
        (0.123456, np.nan, "0.1235"),
        (np.nan, 0.1, ""),
    ],
)
def test_value_with_error(value: float, se: float, shown: str) -> None:
    assert with_error(value, se) == shown


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


@pytest.fixture(scope="module")
def chromium() -> Iterator[webdriver.Chrome]:
    """Headless Chromium (Debian's chromium and chromium-driver), 1400 x 1000 px."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("no Chromium or chromedriver on PATH: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    chrome = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    yield chrome
    chrome.quit()


def _shown(chrome: webdriver.Chrome, table: str) -> list[str]:
    """The models of the rows of ``table`` the page shows, top to bottom."""
    rows = chrome.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr")
    return [row.get_attribute("data-model") or "" for row in rows if row.is_displayed()]


def _header(chrome: webdriver.Chrome, label: str) -> WebElement:
    [button] = [b for b in chrome.find_elements(By.CSS_SELECTOR, "#ranking th button") if b.text.startswith(label)]
    return button


def test_page_in_a_browser(board: Leaderboard, chromium: webdriver.Chrome, tmp_path: Path) -> None:
    """Load the page in Chromium: the table, sorting, the family and status filters, the chart's hover and click."""
    page = tmp_path / "leaderboard.html"
    page.write_text(board.to_html(), encoding="utf-8")
    chromium.get(page.as_uri())  # an alert from a hostile name would fail every call below
    points = WebDriverWait(chromium, 30).until(
        lambda c: c.find_elements(By.CSS_SELECTOR, "#scatter svg .mark-symbol.role-mark path")
    )
    table = board.table
    assert len(points) == table["reported_top1"].notna().sum() == 23
    assert _shown(chromium, "ranking") == list(table["model"])  # ranked flatter first
    assert chromium.find_element(By.ID, "shown-count").text == "27 of 27 models shown"
    width = chromium.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"the page overflows {width[1]} px: {width[0]} px wide"
    rows = chromium.find_elements(By.CSS_SELECTOR, "#ranking tbody tr")
    cells = [row.find_elements(By.TAG_NAME, "td") for row in rows]
    first = table.iloc[0]
    assert cells[0][3].text == with_error(first["relative_flatness"], first["relative_flatness_se"])
    assert cells[int(np.flatnonzero(table["model"] == HOSTILE)[0])][1].text == HOSTILE  # shown literally, not run

    # Sorting: twice on the measure (descending), then by reported top-1 (empty cells last).
    _header(chromium, "relative flatness").click()
    _header(chromium, "relative flatness").click()
    assert _shown(chromium, "ranking") == list(table.sort_values("relative_flatness", ascending=False)["model"])
    _header(chromium, "reported top-1").click()
    by_top1 = table.sort_values("reported_top1", na_position="last", kind="stable")
    assert _shown(chromium, "ranking")[:23] == list(by_top1["model"][:23])
    assert set(_shown(chromium, "ranking")[23:]) == {HOSTILE, MARKUP}

    # Filters: a family, then a status (the family filter reset), each also applied to the unranked table.
    Select(chromium.find_element(By.ID, "family-filter")).select_by_value("convnext")
    shown = _shown(chromium, "ranking")
    assert sorted(shown) == sorted(table.loc[table["family"] == "convnext", "model"]) and len(shown) == 9
    assert _shown(chromium, "skipped") == []
    Select(chromium.find_element(By.ID, "family-filter")).select_by_value("")
    Select(chromium.find_element(By.ID, "status-filter")).select_by_value("unsupported")
    assert _shown(chromium, "ranking") == [] and _shown(chromium, "skipped") == ["seresnet50.a1_in1k"]
    Select(chromium.find_element(By.ID, "status-filter")).select_by_value("")

    # The chart: hovering a point names its model, clicking it shows only that model, "show all" undoes it.
    point = chromium.find_elements(By.CSS_SELECTOR, "#scatter svg .mark-symbol.role-mark path")[0]
    ActionChains(chromium).move_to_element(point).perform()
    tooltip = WebDriverWait(chromium, 10).until(lambda c: c.find_element(By.ID, "vg-tooltip-element").text)
    [model] = [m for m in table["model"] if m in tooltip.split("\n")[0]]
    ActionChains(chromium).move_to_element(point).click().perform()
    assert _shown(chromium, "ranking") == [model]
    assert chromium.find_element(By.ID, "picked-model").text == model
    screenshot = tmp_path / "leaderboard.png"
    assert chromium.save_screenshot(str(screenshot)) and screenshot.read_bytes().startswith(b"\x89PNG")
    print(f"screenshot: {screenshot}")
    chromium.find_element(By.ID, "show-all").click()
    assert len(_shown(chromium, "ranking")) == 25
