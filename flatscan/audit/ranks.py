"""Rank statistics shared by the leaderboard and the study: Kendall tau and Spearman rho with bootstrap intervals,
and Kendall tau within groups, weighted by bootstrap multiplicities."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
# The leaderboard's correlation table: each measure against reported top-1, per group.
CORRELATION_COLUMNS = [
    "measure",
    "group",
    "n",
    "kendall_tau",
    "tau_ci_low",
    "tau_ci_high",
    "spearman_rho",
    "rho_ci_low",
    "rho_ci_high",
]


def rank_correlation(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Kendall tau and Spearman rho with paired-bootstrap 95% CIs; NaN below 3 pairs or for constant input."""
    nan = dict.fromkeys(CORRELATION_COLUMNS[3:], math.nan)
    if len(x) < 3:
        return nan

    def statistic(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.array([stats.kendalltau(a, b).statistic, stats.spearmanr(a, b).statistic])

    # A constant sample (or resample, likely below about 7 pairs) has no rank correlation: the estimate or
    # its interval is NaN, which says so; the warnings scipy raises on the way would only repeat it.
    with warnings.catch_warnings():
        for category in (stats.ConstantInputWarning, stats.DegenerateDataWarning, RuntimeWarning):
            warnings.simplefilter("ignore", category)
        tau, rho = statistic(x, y)
        if math.isnan(tau):
            return nan
        ci = stats.bootstrap(
            (x, y),
            statistic,
            paired=True,
            vectorized=False,
            n_resamples=BOOTSTRAP_RESAMPLES,
            rng=np.random.default_rng(BOOTSTRAP_SEED),
        ).confidence_interval
    return {
        "kendall_tau": tau,
        "tau_ci_low": ci.low[0],
        "tau_ci_high": ci.high[0],
        "spearman_rho": rho,
        "rho_ci_low": ci.low[1],
        "rho_ci_high": ci.high[1],
    }


def kendall(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b; NaN for constant input."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.kendalltau(x, y).statistic)


def percentile_interval(values: np.ndarray) -> tuple[float, float]:
    """Percentile 95% interval of the bootstrap values that are defined."""
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return math.nan, math.nan
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def group_pairs(groups: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index pairs (i < j) of the models that share a group, and the pair's group."""
    by_group: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        by_group.setdefault(group, []).append(index)
    first, second, pair_group = [], [], []
    for group, members in by_group.items():
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                first.append(members[a])
                second.append(members[b])
                pair_group.append(group)
    return np.array(first, dtype=int), np.array(second, dtype=int), np.array(pair_group, dtype=int)


def weighted_group_taus(
    x: np.ndarray, y: np.ndarray, groups: Sequence[int] | np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """Kendall's tau-b of (x, y) within each group, for each row of ``weights`` (model multiplicities, R x n).

    A model taken w times is w tied copies, so the tau is scipy's ``kendalltau`` of the expanded sample; computed
    from the pairs of distinct models (copies are tied in both x and y and count in no term), it is vectorised over
    bootstrap resamples. Returns (R, groups) in the order of ``np.unique(groups)``; NaN where a group has no pair
    untied in x or in y.
    """
    first, second, pair_group = group_pairs(groups)
    labels = np.unique(np.asarray(groups))
    column = np.searchsorted(labels, pair_group)
    sx, sy = np.sign(x[first] - x[second]), np.sign(y[first] - y[second])
    pair_weights = weights[:, first] * weights[:, second]  # (R, pairs)
    indicator = np.zeros((len(first), len(labels)))
    indicator[np.arange(len(first)), column] = 1.0
    concordance = (pair_weights * (sx * sy)) @ indicator
    untied_x = (pair_weights * np.abs(sx)) @ indicator
    untied_y = (pair_weights * np.abs(sy)) @ indicator
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = concordance / np.sqrt(untied_x * untied_y)
    return np.where((untied_x > 0) & (untied_y > 0), tau, np.nan)
