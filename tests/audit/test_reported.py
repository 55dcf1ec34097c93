"""Reported accuracy: timm's real results CSVs (from a cache dir), user CSV, model cards, offline, download."""

from __future__ import annotations

import functools
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
import timm.models
from huggingface_hub import EvalResult

from flatscan.audit import reported as reported_module
from flatscan.audit.reported import Reported, ReportedAccuracy, card_reported, default_cache_dir, timm_name
from flatscan.errors import FlatscanError

TIMM_RESULTS = Path(__file__).parents[2] / ".." / "shared" / "data" / "timm-results"
IMAGENET = "results-imagenet.csv"


@pytest.fixture(scope="module")
def published() -> pd.DataFrame:
    return pd.read_csv(TIMM_RESULTS / IMAGENET)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A cache dir holding copies of timm's published results, as a download would leave it."""
    directory = tmp_path / "cache"
    directory.mkdir()
    for name in (IMAGENET, "results-imagenet-real.csv"):
        shutil.copy(TIMM_RESULTS / name, directory / name)
    return directory


def _row(frame: pd.DataFrame, model: str, img_size: int) -> Reported:
    [row] = frame[(frame["model"] == model) & (frame["img_size"] == img_size)].itertuples()
    return Reported(row.top1, row.top5, img_size, f"timm {IMAGENET}")


def test_timm_names() -> None:
    default_tag = timm.models.get_pretrained_cfg("resnet50").tag
    assert timm_name("resnet50") == f"resnet50.{default_tag}"
    assert timm_name("resnet50.tv_in1k") == "resnet50.tv_in1k"
    assert timm_name("timm/resnet50.tv_in1k") == "resnet50.tv_in1k"
    assert timm_name("hf-hub:timm/resnet50.tv_in1k") == "resnet50.tv_in1k"
    assert timm_name("hf-hub:facebook/convnext-tiny-224") is None
    assert timm_name("resnet50.no_such_tag") == "resnet50.no_such_tag"


def test_real_values_and_img_size_rule(cache: Path, published: pd.DataFrame) -> None:
    accuracy = ReportedAccuracy(results_dir=cache, offline=True)
    # resnet50.a1_in1k is published at 224 (its pretrained input_size) and 288 (its test_input_size).
    assert set(published.loc[published["model"] == "resnet50.a1_in1k", "img_size"]) == {224, 288}
    at_224, at_288 = _row(published, "resnet50.a1_in1k", 224), _row(published, "resnet50.a1_in1k", 288)
    assert at_224.top1 != at_288.top1
    for name in ("resnet50.a1_in1k", "timm/resnet50.a1_in1k", "hf-hub:timm/resnet50.a1_in1k"):
        assert accuracy.lookup(name, img_size=288) == at_288
        assert accuracy.lookup(name, img_size=224) == at_224
        assert accuracy.lookup(name) == at_224  # no size given: the default input size
        assert accuracy.lookup(name, img_size=320) == at_224  # a size with no row: the default input size
    # A bare architecture is its default pretrained tag.
    default = f"resnet50.{timm.models.get_pretrained_cfg('resnet50').tag}"
    assert accuracy.lookup("resnet50") == _row(published, default, 224)
    assert accuracy.lookup("efficientnet_b0.ra_in1k") == _row(published, "efficientnet_b0.ra_in1k", 224)
    assert accuracy.lookup("convnext_tiny.fb_in1k", img_size=288) == _row(published, "convnext_tiny.fb_in1k", 288)


def test_real_variant(cache: Path) -> None:
    real = pd.read_csv(TIMM_RESULTS / "results-imagenet-real.csv")
    [row] = real[(real["model"] == "resnet18.a1_in1k") & (real["img_size"] == 288)].itertuples()
    got = ReportedAccuracy(results_dir=cache, offline=True, variant="imagenet-real").lookup("resnet18.a1_in1k", 288)
    assert got == Reported(row.top1, row.top5, 288, "timm results-imagenet-real.csv")
    with pytest.raises(FlatscanError, match="unknown reported-accuracy variant"):
        ReportedAccuracy(results_dir=cache, variant="imagenet-sketch")


def test_a_miss_is_none(cache: Path) -> None:
    accuracy = ReportedAccuracy(results_dir=cache, offline=True)
    assert accuracy.lookup("resnet50.no_such_tag") is None
    assert accuracy.lookup("not_an_architecture") is None
    # A non-timm Hub model whose card is not in the local cache (offline): listed without reported accuracy.
    assert accuracy.lookup("hf-hub:no-such-org/no-such-model-3f9a") is None
    assert accuracy.lookup("./a/local/model/dir") is None


def test_user_csv_overrides(cache: Path, tmp_path: Path, published: pd.DataFrame) -> None:
    user = tmp_path / "mine.csv"
    user.write_text(
        "model,top1,top5,img_size\n"
        "resnet50.a1_in1k,0.5,0.75,224\n"  # fractions: the whole file is
        "my-org/net,0.7,,224\n"
        "my-org/net,0.72,,256\n"
        "resnet,0.6,,\n"
    )
    accuracy = ReportedAccuracy(results_dir=cache, user_csv=user, offline=True)
    assert accuracy.lookup("hf-hub:timm/resnet50.a1_in1k") == Reported(50.0, 75.0, 224, "user: mine.csv")
    assert accuracy.lookup("my-org/net", img_size=224) == Reported(70.0, None, 224, "user: mine.csv")
    assert accuracy.lookup("hf-hub:my-org/net", img_size=300) == Reported(72.0, None, 256, "user: mine.csv")
    assert accuracy.lookup("resnet") == Reported(60.0, None, None, "user: mine.csv")
    # Not in the user's file: timm's results still answer.
    assert accuracy.lookup("efficientnet_b0.ra_in1k") == _row(published, "efficientnet_b0.ra_in1k", 224)

    bad = tmp_path / "bad.csv"
    bad.write_text("name,acc\nresnet50,80\n")
    with pytest.raises(FlatscanError, match=r"lacks column\(s\) model, top1"):
        ReportedAccuracy(user_csv=bad)


def test_offline_with_an_empty_cache_names_the_file(tmp_path: Path) -> None:
    accuracy = ReportedAccuracy(results_dir=tmp_path / "empty", offline=True)
    with pytest.raises(FlatscanError) as error:
        accuracy.lookup("resnet50.a1_in1k")
    message = str(error.value)
    assert "\n" not in message
    assert IMAGENET in message and "offline" in message and str(tmp_path / "empty") in message
    assert "raw.githubusercontent.com/huggingface/pytorch-image-models" in message


def test_cache_dir_follows_flatscan_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLATSCAN_CACHE", str(cache.parent))
    shutil.move(cache, cache.parent / "timm-results")
    assert default_cache_dir() == cache.parent / "timm-results"
    assert ReportedAccuracy(offline=True).lookup("resnet18.a1_in1k") is not None
    monkeypatch.delenv("FLATSCAN_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "flatscan" / "timm-results"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server over a folder: the base URL and the folder."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{httpd.server_address[1]}/results/", served
        httpd.shutdown()


def test_download_into_the_cache(server: tuple[str, Path], tmp_path: Path, published: pd.DataFrame) -> None:
    base_url, served = server
    (served / "results").mkdir()
    shutil.copy(TIMM_RESULTS / IMAGENET, served / "results" / IMAGENET)
    cache = tmp_path / "new-cache"
    accuracy = ReportedAccuracy(results_dir=cache, base_url=base_url)
    assert accuracy.lookup("resnet50.a1_in1k", 288) == _row(published, "resnet50.a1_in1k", 288)
    assert (cache / IMAGENET).read_bytes() == (TIMM_RESULTS / IMAGENET).read_bytes()
    assert not list(cache.glob("*.part"))
    # Now offline works from what was downloaded.
    (served / "results" / IMAGENET).unlink()
    assert ReportedAccuracy(results_dir=cache, offline=True).lookup("resnet50.a1_in1k", 288) is not None


def test_download_failures(server: tuple[str, Path], tmp_path: Path) -> None:
    base_url, served = server
    cache = tmp_path / "cache"
    with pytest.raises(FlatscanError, match=f"cannot download {base_url}{IMAGENET}.*404"):
        ReportedAccuracy(results_dir=cache, base_url=base_url).lookup("resnet50.a1_in1k")
    (served / "results").mkdir()
    (served / "results" / IMAGENET).write_text("<html><body>Rate limited</body></html>\n")
    with pytest.raises(FlatscanError, match="is not a timm results CSV"):
        ReportedAccuracy(results_dir=cache, base_url=base_url).lookup("resnet50.a1_in1k")
    assert not (cache / IMAGENET).exists()  # nothing bad is cached
    cache.mkdir()
    (cache / IMAGENET).write_text("model,top1\nresnet50.a1_in1k,80\n")  # a stray file in the cache
    with pytest.raises(FlatscanError, match=r"is not a timm results CSV.*delete it"):
        ReportedAccuracy(results_dir=cache, offline=True).lookup("resnet50.a1_in1k")


def _result(dataset: str, metric_type: str, value: float, metric_name: str | None = None) -> EvalResult:
    return EvalResult(
        task_type="image-classification",
        dataset_type=dataset,
        dataset_name=dataset.upper(),
        metric_type=metric_type,
        metric_value=value,
        metric_name=metric_name,
    )


def test_card_eval_results() -> None:
    results = [
        _result("cifar10", "accuracy", 0.99),
        _result("imagenet-v2", "accuracy", 0.70),
        _result("ILSVRC/imagenet-1k", "accuracy", 0.812, "Top 1 Accuracy"),
        _result("imagenet-1k", "accuracy", 0.955, "Top-5 accuracy"),
    ]
    got = card_reported(results)
    assert got is not None and got.source == "model card" and got.img_size is None
    assert got.top1 == pytest.approx(81.2) and got.top5 == pytest.approx(95.5)
    v2 = card_reported(results, variant="imagenetv2-matched-frequency")
    assert v2 is not None and v2.top1 == pytest.approx(70.0)
    assert card_reported([_result("imagenet", "acc@1", 79.1)]) == Reported(79.1, None, None, "model card")
    assert card_reported(results[:1]) is None
    assert card_reported([_result("imagenet", "f1", 0.8)]) is None
    assert card_reported(None) is None
    assert card_reported([_result("imagenet", "accuracy", "n/a"), *results]).top1 == pytest.approx(81.2)


def test_card_is_read_for_hub_models(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(
        "---\nmodel-index:\n- name: net\n  results:\n  - task: {type: image-classification}\n"
        "    dataset: {name: ImageNet-1k, type: imagenet-1k}\n"
        "    metrics:\n    - {type: accuracy, value: 77.5, name: top-1}\n---\n# net\n"
    )
    calls = []

    def fake_download(repo_id: str, filename: str, *, local_files_only: bool) -> str:
        calls.append((repo_id, filename, local_files_only))
        return str(readme)

    monkeypatch.setattr(reported_module, "hf_hub_download", fake_download)
    accuracy = ReportedAccuracy(results_dir=cache, offline=True)
    assert accuracy.lookup("hf-hub:some-org/net") == Reported(77.5, None, None, "model card")
    assert calls == [("some-org/net", "README.md", True)]
    # Given by the caller, the card is not read again; timm models never read it.
    assert accuracy.lookup("some-org/net", card_eval_results=[_result("imagenet", "accuracy", 0.5)]).top1 == 50.0
    assert accuracy.lookup("resnet50.no_such_tag") is None
    assert len(calls) == 1
