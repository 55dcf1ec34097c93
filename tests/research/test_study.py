"""The study: baselines against exact references, rank correlations on designed tables, a tiny end-to-end study."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hessian_reference import randomise_norms
from scipy import stats
from torch import nn
from typer.testing import CliRunner

from flatscan.cli import app
from flatscan.errors import FlatscanError
from flatscan.research import baselines, study
from flatscan.research.zoo import MANIFEST, ZooSpec, train_zoo

runner = CliRunner()


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads; on a busy machine two threads waiting on each other crawl."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_cnn(activation: nn.Module, groups: int = 1) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        activation,
        nn.Conv2d(4, 6, 3, padding=1, groups=groups),
        nn.BatchNorm2d(6),
        activation,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    ).double()
    randomise_norms(model, torch.Generator().manual_seed(1))
    return model.eval()


def tiny_data(n: int = 8, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 5, 5, generator=generator, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=generator
    )


def fitted(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int = 150) -> nn.Module:
    """``model`` trained (in eval mode: BatchNorm statistics kept) until it fits the data: near a minimum."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return model


def exact_hessian(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The autograd Hessian of the mean cross-entropy w.r.t. all parameters, flattened (P x P)."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss(vector: torch.Tensor) -> torch.Tensor:
        pieces = vector.split([math.prod(s) for s in shapes])
        params = {n: piece.view(s) for n, piece, s in zip(names, pieces, shapes, strict=True)}
        return F.cross_entropy(torch.func.functional_call(model, params, (images,)), labels)

    return torch.autograd.functional.hessian(loss, flat, vectorize=True)


def test_hutchinson_converges_to_the_exact_full_hessian_trace() -> None:
    model = tiny_cnn(nn.SiLU())  # smooth: the second-derivative terms of the activation count
    images, labels = tiny_data()
    hessian = exact_hessian(model, images, labels)
    exact = hessian.trace().item()
    probes = 400
    estimate = baselines.hutchinson_trace(model, [(images, labels)], probes=probes, seed=0)
    assert estimate.probes == probes and model.training is False
    # Rademacher probes: Var(v^T H v) = 2 sum_{i != j} H_ij^2, exactly.
    expected_se = math.sqrt(2 * (hessian.square().sum() - hessian.diagonal().square().sum()).item() / probes)
    assert abs(estimate.trace - exact) < 4 * expected_se
    assert estimate.se == pytest.approx(expected_se, rel=0.25)
    assert expected_se < 0.15 * abs(exact)
    # Each quadratic form is exactly v^T H v of its probe with the autograd Hessian.
    for k in (0, 1, probes - 1):
        v = torch.cat([p.flatten() for p in baselines.rademacher_probe(list(model.parameters()), 0, k)])
        assert estimate.quadratic_forms[k] == pytest.approx((v @ hessian @ v).item(), rel=1e-10)
    # Unequal batches are weighted by their size: the same probes give the same quadratic forms.
    split = baselines.hutchinson_trace(model, [(images[:5], labels[:5]), (images[5:], labels[5:])], probes=5)
    assert split.quadratic_forms == pytest.approx(estimate.quadratic_forms[:5], rel=1e-10)


def test_norm_measures_against_numpy() -> None:
    model = tiny_cnn(nn.ReLU(), groups=2)
    weights = {name: p.detach().numpy() for name, p in model.named_parameters()}
    layers = ["0.weight", "3.weight", "8.weight"]  # the Conv2d and Linear weights; BatchNorm's are left out
    expected_norms = [np.linalg.norm(weights[name].reshape(weights[name].shape[0], -1), 2) for name in layers]
    assert list(baselines.spectral_norms(model).values()) == pytest.approx(expected_norms, rel=1e-12)
    assert baselines.log_spectral_norm_product(model) == pytest.approx(math.log(np.prod(expected_norms)), rel=1e-12)
    squares = sum(float(np.square(weights[name]).sum()) for name in layers)
    assert baselines.sum_squared_weights(model) == pytest.approx(squares, rel=1e-12)
    # torch's own matrix norm of the reshaped grouped kernel: (6, 2 * 3 * 3)
    grouped = model[3].weight.detach().reshape(6, -1)
    assert baselines.spectral_norms(model)["3"] == pytest.approx(torch.linalg.matrix_norm(grouped, ord=2).item())
    with pytest.raises(FlatscanError, match="no Conv2d or Linear"):
        baselines.sum_squared_weights(nn.Sequential(nn.ReLU()))


def test_sharpness_bisection_stops_at_the_threshold() -> None:
    images, labels = tiny_data(32)
    model = fitted(tiny_cnn(nn.ReLU()), images, labels)
    assert (model(images).argmax(1) == labels).all()
    batches = [(images, labels)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    threshold, tolerance = 0.05, 0.002
    found = baselines.sharpness_sigma(
        model, batches, threshold=threshold, criterion="cross_entropy", samples=6, tolerance=tolerance, steps=40
    )
    assert found.bracketed
    assert threshold - tolerance <= found.increase <= threshold
    # Measured again at the returned sigma (the same draws): the same increase; a bit further out it is above.
    again = baselines.perturbed_increase(model, batches, found.sigma, "cross_entropy", samples=6)
    assert again == pytest.approx(found.increase, rel=1e-12)
    assert baselines.perturbed_increase(model, batches, 1.2 * found.sigma, "cross_entropy", samples=6) > threshold
    assert found.measure == pytest.approx(found.sigma**-2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights restored exactly
    # The training error (Jiang et al.'s criterion) never exceeds the threshold at the returned sigma.
    error = baselines.sharpness_sigma(model, batches, threshold=0.1, samples=4)
    assert error.bracketed and error.increase <= 0.1
    # A range without the crossing says so.
    assert not baselines.sharpness_sigma(
        model, batches, threshold=0.05, criterion="cross_entropy", upper=1e-3
    ).bracketed
    with pytest.raises(FlatscanError, match="unknown sharpness criterion"):
        baselines.perturbed_increase(model, batches, 0.1, "accuracy")


def test_weightwatcher_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "weightwatcher", None)  # what Python does for a package not installed
    with pytest.raises(FlatscanError, match=r"pip install 'flatscan\[study\]'"):
        baselines.weightwatcher_alpha_weighted(tiny_cnn(nn.ReLU()))


def test_weightwatcher_alpha_weighted_or_the_reason() -> None:
    pytest.importorskip("weightwatcher", reason="the study extra (weightwatcher) is not installed")
    small = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    value, reason = baselines.weightwatcher_alpha_weighted(small)
    assert math.isnan(value) and "analysed no layer" in reason  # 3 and 3 eigenvalues: fewer than it fits
    torch.manual_seed(0)
    larger = nn.Sequential(nn.Conv2d(32, 48, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 40))
    value, reason = baselines.weightwatcher_alpha_weighted(larger)
    assert math.isfinite(value) and reason is None


def test_weighted_tau_is_scipys_on_the_expanded_sample() -> None:
    rng = np.random.default_rng(0)
    n = 30
    x, y = rng.integers(0, 6, n).astype(float), rng.normal(size=n).round(1)  # ties in both
    groups = rng.integers(0, 4, n)
    weights = rng.integers(0, 4, (5, n)).astype(float)
    taus = study.weighted_group_taus(x, y, groups, weights)
    for r in range(len(weights)):
        for g in range(4):
            keep = np.repeat(np.arange(n), weights[r].astype(int))
            keep = keep[groups[keep] == g]
            expected = stats.kendalltau(x[keep], y[keep]).statistic if len(keep) > 1 else math.nan
            if math.isnan(expected):
                assert math.isnan(taus[r, g])
            else:
                assert taus[r, g] == pytest.approx(expected, abs=1e-12)


def designed_grid() -> pd.DataFrame:
    """a in {0, 1}, b in {0, 1, 2}, c in {0, 1}: every combination once."""
    rows = [{"a": a, "b": b, "c": c} for a in (0, 1) for b in (0, 1, 2) for c in (0, 1)]
    table = pd.DataFrame(rows)
    table["gap"] = table["a"] + 10 * table["b"] + 100 * table["c"]
    table["same"] = table["gap"]
    table["mixed"] = table["a"] - table["b"] + table["c"]  # agrees with the gap along a and c, not b
    return table


def test_granulated_tau_on_a_designed_grid() -> None:
    table = designed_grid()
    psi, per = study.granulated_tau(table, "mixed", "gap", ["a", "b", "c"])
    assert per == {"a": 1.0, "b": -1.0, "c": 1.0}
    assert psi == pytest.approx(1 / 3)
    assert study.varied_hyperparameters(table, ("a", "b", "c", "d")) == ["a", "b", "c"]


def test_correlations_tau_psi_and_bootstrap() -> None:
    table = designed_grid()
    rng = np.random.default_rng(1)
    table["noisy"] = table["gap"] + rng.normal(scale=40, size=len(table))
    table.loc[0, "noisy"] = np.nan  # left out of its correlations
    result = study.correlations(table, ["same", "mixed", "noisy"], ["gap"], ["a", "b", "c"], resamples=300, seed=0)
    same = result.set_index("measure").loc["same"]
    assert same["n"] == 12
    assert [same["tau"], same["tau_ci_low"], same["tau_ci_high"]] == pytest.approx([1.0, 1.0, 1.0])
    assert [same["psi"], same["psi_ci_low"], same["psi_ci_high"]] == pytest.approx([1.0, 1.0, 1.0])
    mixed = result.set_index("measure").loc["mixed"]
    assert mixed["tau"] == pytest.approx(stats.kendalltau(table["mixed"], table["gap"]).statistic)
    assert mixed["psi"] == pytest.approx(1 / 3)
    assert [mixed["psi_a"], mixed["psi_b"], mixed["psi_c"]] == pytest.approx([1.0, -1.0, 1.0])
    noisy = result.set_index("measure").loc["noisy"]
    assert noisy["n"] == 11
    assert noisy["tau_ci_low"] < noisy["tau"] < noisy["tau_ci_high"]
    pd.testing.assert_frame_equal(
        result, study.correlations(table, ["same", "mixed", "noisy"], ["gap"], ["a", "b", "c"], resamples=300, seed=0)
    )


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four tiny ResNets: label noise x training-set size, one epoch (of the whole split) each."""
    spec = ZooSpec(
        grid={
            "family": ("resnet",),
            "width": (0.25,),
            "label_noise": (0.0, 0.3),
            "train_fraction": (0.1, 0.2),
            "epochs": (1,),
            "batch_size": (32,),
        },
        size=None,
        img_size=16,
    )
    root = tmp_path_factory.mktemp("zoo")
    train_zoo(spec, root)
    return root


def test_tiny_study_writes_every_column(tiny_zoo: Path, tmp_path: Path) -> None:
    options = study.StudyOptions(probes=4, sharpness_samples=2)  # what the CLI test below asks for
    seen: list[bool] = []
    result = study.run_study(tiny_zoo, options, resamples=50, on_model=lambda name, i, n, reused: seen.append(reused))
    assert seen == [False] * 4
    table = result.table
    assert len(table) == 4
    for column in [*study.MEASURES, *study.TARGETS, "label_noise", "train_fraction", "n_train", "ww_reason"]:
        assert column in table.columns
    flat = [m for m in study.MEASURES if m != "ww_alpha_weighted"]
    assert table[flat].notna().all().all()
    # The training-set scan saw the noisy labels the zoo trained on (checked against its record, else it raises).
    assert table["scanned_train_accuracy"].to_numpy() == pytest.approx(table["train_accuracy"].to_numpy(), abs=0.02)
    assert (table["trace_train"] > 0).all() and (table["hutchinson_trace"] > 0).all()
    assert set(result.correlations["measure"]) == {m for m in study.MEASURES if table[m].notna().any()}
    assert set(result.correlations["psi_label_noise"].dropna().abs()) <= {0.0, 1.0}  # groups of two models

    paths = study.write_study(result, tmp_path / "reports", command="flatscan zoo study ZOO")
    names = {path.name for path in paths}
    assert names == {"study.md", "study.csv", "study_spec.json", "study_gap_accuracy.png", "study_test_accuracy.png"}
    written = pd.read_csv(tmp_path / "reports" / "study.csv")
    assert list(written.columns) == list(table.columns)
    markdown = (tmp_path / "reports" / "study.md").read_text()
    assert "flatscan zoo study ZOO" in markdown and "4 Rademacher probes" in markdown and "a full grid" in markdown
    assert f"flatscan zoo train {tiny_zoo} --spec {tmp_path / 'reports' / 'study_spec.json'}" in markdown
    respec = json.loads((tmp_path / "reports" / "study_spec.json").read_text())
    assert [config.seed for config in ZooSpec.from_dict(respec).configs()] == list(table["seed"])
    for measure in result.correlations["measure"].unique():
        assert f"| {measure} " in markdown

    # A second run reuses every measured row.
    seen.clear()
    again = study.run_study(tiny_zoo, options, resamples=50, on_model=lambda name, i, n, reused: seen.append(reused))
    assert seen == [True] * 4
    pd.testing.assert_frame_equal(again.table, table)


def test_cli_zoo_study(tiny_zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports"
    arguments = ["zoo", "study", str(tiny_zoo), "--out", str(out), "--probes", "4", "--sharpness-samples", "2"]
    result = runner.invoke(app, [*arguments, "--resamples", "20"])
    assert result.exit_code == 0, result.output
    assert "kappa_train" in result.output and "psi (granulated)" in result.output
    command = f"flatscan zoo study {tiny_zoo} --out {out} --probes 4 --sharpness-criterion error"
    assert command in (out / "study.md").read_text()
    assert len(pd.read_csv(out / "study.csv")) == 4
    bad = runner.invoke(app, ["zoo", "study", str(tmp_path / "nothing")])
    assert bad.exit_code == 1 and "not a zoo manifest" in bad.output


def test_study_refuses_a_zoo_whose_training_set_it_cannot_rebuild(tiny_zoo: Path, tmp_path: Path) -> None:
    copy = tmp_path / "zoo"
    copy.mkdir()
    for path in tiny_zoo.iterdir():
        if path.is_dir():
            (copy / path.name).symlink_to(path)
    manifest = json.loads((tiny_zoo / MANIFEST).read_text())
    manifest["models"][0]["train_accuracy"] -= 0.2
    (copy / MANIFEST).write_text(json.dumps(manifest))
    options = study.StudyOptions(probes=2, sharpness_samples=1, sharpness_steps=1, weightwatcher=False)
    with pytest.raises(FlatscanError, match="training set rebuilt from its seed"):
        study.measure_zoo(copy, options)
    with pytest.raises(FlatscanError, match="not a zoo manifest"):
        study.measure_zoo(tmp_path / "empty", options)
