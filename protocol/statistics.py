"""Federated feature statistics: describe local data, merge across agents, scale, re-express.

Pure functions, no I/O. An agent describes its window (`describe`); the coordinator merges
every agent's description with Chan et al.'s parallel update of (count, mean, M2) and turns
the result into a `Scaling` (mean, population standard deviation) that every side applies
the same way (`impute`, `standardize`). When the scaling is refined, `reexpress` rewrites a
linear model's parameters so that it computes exactly the same function of the raw features.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class FeatureStats:
    """Per-feature count of present values, mean, M2 (sum of squared deviations), min, max."""

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    min: np.ndarray
    max: np.ndarray

    @property
    def n_features(self) -> int:
        """Number of features described."""
        return len(self.count)

    def sums(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(count, sum, sum of squares), the form the statistics travel in."""
        total = self.count * self.mean
        return self.count.copy(), total, self.m2 + total * self.mean

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FeatureStats) and all(
            np.array_equal(getattr(self, k), getattr(other, k), equal_nan=True)
            for k in ("count", "mean", "m2", "min", "max"))


def describe(X: np.ndarray) -> FeatureStats:
    """The statistics of the rows of `X`; NaN cells (missing values) are left out per feature."""
    X = np.asarray(X, dtype=np.float64)
    present = ~np.isnan(X)
    count = present.sum(axis=0).astype(np.float64)
    filled = np.where(present, X, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, filled.sum(axis=0) / np.maximum(count, 1), 0.0)
    dev = np.where(present, X - mean, 0.0)
    m2 = (dev * dev).sum(axis=0)
    low = np.where(present, X, np.inf).min(axis=0, initial=np.inf)
    high = np.where(present, X, -np.inf).max(axis=0, initial=-np.inf)
    return FeatureStats(count, mean, m2, low, high)


def from_sums(count: np.ndarray, total: np.ndarray, squares: np.ndarray,
              low: np.ndarray, high: np.ndarray) -> FeatureStats:
    """Statistics from (count, sum, sum of squares, min, max) as they travel."""
    count = np.asarray(count, dtype=np.float64)
    total, squares = np.asarray(total, dtype=np.float64), np.asarray(squares, dtype=np.float64)
    safe = np.maximum(count, 1.0)
    mean = np.where(count > 0, total / safe, 0.0)
    m2 = np.maximum(np.where(count > 0, squares - total * total / safe, 0.0), 0.0)
    return FeatureStats(count, mean, m2, np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64))


def merge(a: FeatureStats, b: FeatureStats) -> FeatureStats:
    """Chan, Golub and LeVeque's pairwise update: the statistics of both data sets together."""
    if a.n_features != b.n_features:
        raise ValueError(f"cannot merge statistics of {a.n_features} and {b.n_features} features")
    n = a.count + b.count
    safe = np.maximum(n, 1.0)
    delta = b.mean - a.mean
    mean = np.where(n > 0, a.mean + delta * b.count / safe, 0.0)
    m2 = a.m2 + b.m2 + delta * delta * a.count * b.count / safe
    return FeatureStats(n, mean, m2, np.minimum(a.min, b.min), np.maximum(a.max, b.max))


def merge_all(parts: Iterable[FeatureStats]) -> FeatureStats | None:
    """All `parts` merged in the given order; None when there are none."""
    merged = None
    for part in parts:
        merged = part if merged is None else merge(merged, part)
    return merged


def robust_merge(parts: list[FeatureStats], *, trim: float = 0.2, count_factor: float = 4.0) -> FeatureStats | None:
    """The agents' statistics merged so that no one agent decides them; None when there are none.

    Per feature, over the agents that saw it: each count is capped at `count_factor` x their
    median count (from 3 agents on), then the `trim` fraction of agents with the lowest and as
    many with the highest means are left out of the mean and of the spread between agents, and
    likewise by variance out of the variance within agents. Nothing is trimmed below 5 agents
    (at 0.2): there, with no cap binding, this is the exact pooled merge (`merge_all`).
    """
    if not parts:
        return None
    count = np.stack([p.count for p in parts])
    mean = np.stack([p.mean for p in parts])
    var = np.where(count > 0, np.stack([p.m2 for p in parts]) / np.maximum(count, 1.0), 0.0)
    present = count > 0
    n = present.sum(axis=0)
    with np.errstate(all="ignore"):
        median = np.nanmedian(np.where(present, count, np.nan), axis=0) if (n > 0).any() else np.zeros(n.shape)
    cap = np.where(n >= 3, count_factor * np.nan_to_num(median), np.inf)
    weight = np.where(present, np.minimum(count, cap), 0.0)
    cut = np.floor(trim * n).astype(np.int64)
    by_mean, by_var = weight * _middle(mean, present, cut), weight * _middle(var, present, cut)
    total, spread = by_mean.sum(axis=0), by_var.sum(axis=0)
    safe, safe_spread = np.maximum(total, np.finfo(float).tiny), np.maximum(spread, np.finfo(float).tiny)
    merged_mean = np.where(total > 0, (by_mean * mean).sum(axis=0) / safe, 0.0)
    between = (by_mean * (mean - merged_mean) ** 2).sum(axis=0) / safe
    within = (by_var * var).sum(axis=0) / safe_spread
    kept = by_mean > 0
    low = np.where(kept, np.stack([p.min for p in parts]), np.inf).min(axis=0)
    high = np.where(kept, np.stack([p.max for p in parts]), -np.inf).max(axis=0)
    return FeatureStats(total, merged_mean, np.where(total > 0, (within + between) * total, 0.0), low, high)


def _middle(values: np.ndarray, present: np.ndarray, cut: np.ndarray) -> np.ndarray:
    """Per column, True for the present entries ranked `cut` or more from either end."""
    order = np.argsort(np.where(present, values, np.inf), axis=0, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(len(values))[:, None].repeat(values.shape[1], axis=1), axis=0)
    return present & (rank >= cut) & (rank < present.sum(axis=0) - cut)


@dataclass(frozen=True, eq=False)
class Scaling:
    """What every side standardizes with: z = (x - mean) / scale, missing x taken as mean."""

    mean: np.ndarray
    scale: np.ndarray

    def __post_init__(self) -> None:
        if self.mean.shape != self.scale.shape or self.mean.ndim != 1:
            raise ValueError("scaling mean and scale must be vectors of one length")
        if not (np.isfinite(self.mean).all() and np.isfinite(self.scale).all() and (self.scale > 0).all()):
            raise ValueError("scaling mean must be finite and scale finite and positive")

    @property
    def n_features(self) -> int:
        """Number of features scaled."""
        return len(self.mean)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Scaling) and np.array_equal(self.mean, other.mean) \
            and np.array_equal(self.scale, other.scale)


def identity(n_features: int) -> Scaling:
    """The scaling that changes nothing (mean 0, scale 1): raw features."""
    return Scaling(np.zeros(n_features), np.ones(n_features))


def scaling_of(stats: FeatureStats) -> Scaling:
    """Mean and population standard deviation; a feature seen constant or never gets scale 1."""
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.sqrt(np.where(stats.count > 0, stats.m2 / np.maximum(stats.count, 1.0), 0.0))
    finite = np.isfinite(stats.mean)
    scale = np.where(finite & np.isfinite(std) & (std > 0), std, 1.0)
    return Scaling(np.where(finite, stats.mean, 0.0), scale)


def impute(X: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, int]:
    """`X` with every NaN replaced by the feature's `mean`, and how many were replaced."""
    X = np.asarray(X, dtype=np.float64)
    missing = np.isnan(X)
    n = int(missing.sum())
    if n:
        X = np.where(missing, mean, X)
    return X, n


def standardize(X: np.ndarray, scaling: Scaling) -> np.ndarray:
    """(X - mean) / scale, missing values imputed with the mean first (so they become 0)."""
    X, _ = impute(X, scaling.mean)
    return (X - scaling.mean) / scaling.scale


def reexpress_gain(old: Scaling, new: Scaling, shift: float = 0.0) -> float:
    """An upper bound of how much `reexpress` can lengthen a parameter vector (its operator norm).

    Per class the map is [[diag(r), 0], [u^T, 1]] with r = s'/s and u = (m' - m)/s + shift (1 - r):
    at most max|r| + sqrt(|u|^2 + 1). The norm bound converts distances judged under `old` with it
    (never below what an honest update's distance becomes, so no one is refused for the units)."""
    r = new.scale / old.scale
    u = (new.mean - old.mean) / old.scale + shift * (1.0 - r)
    return float(np.max(np.abs(r), initial=0.0) + np.sqrt(np.dot(u, u) + 1.0))


def reexpress(params: np.ndarray, coef_shape: tuple[int, ...], old: Scaling, new: Scaling,
              shift: float = 0.0) -> np.ndarray:
    """Flat linear-model parameters (coef_ then intercept_) for `new` scaling, same function.

    For z = (x - m) / s: w' = w * s' / s and b' = b + sum_j w_j (m'_j - m_j) / s_j, exact
    for any affine change of the features. A model fed z + `shift` (the one-class model)
    has the effective intercept b + shift * sum_j w_j on z, re-expressed the same way. The
    map is linear in the parameters, so it applies unchanged to deltas of them too.
    """
    params = np.asarray(params, dtype=np.float64)
    n_coef = int(np.prod(coef_shape))
    coef = params[:n_coef].reshape(coef_shape)
    intercept = params[n_coef:] + shift * np.atleast_2d(coef).sum(axis=1)
    new_coef = coef * (new.scale / old.scale)
    new_intercept = intercept + np.atleast_2d(coef) @ ((new.mean - old.mean) / old.scale) \
        - shift * np.atleast_2d(new_coef).sum(axis=1)
    return np.concatenate([new_coef.ravel(), np.ravel(new_intercept)])
