"""The Gaussian mechanism on feature statistics: clip every row, noise count, sum and sum of squares.

Pure functions (no I/O): the agent applies them to its window before the statistics
message is encoded (edge_agent/statistics.py), when started with ``--stats-noise``.

Neighbouring windows differ by one row (add or remove). Each value of feature j is first
clipped to the declared range [lo_j, hi_j]; with B_j = max(|lo_j|, |hi_j|) one row changes
count_j by at most 1, sum_j by at most B_j and sumsq_j by at most B_j^2. Divided by those
bounds, the 3d released numbers form one vector whose L2 sensitivity is sqrt(3 d) (d the
number of features), so one release is one Gaussian mechanism with noise multiplier sigma:
noise of standard deviation sigma x sqrt(3 d) x (1, B_j, B_j^2) on (count_j, sum_j, sumsq_j).
Its epsilon at delta is `protocol.accounting.epsilon(sigma, releases, delta)` (RDP over
dp-accounting); every new release of an overlapping window composes.

Min and max have no bounded sensitivity (one row moves them anywhere in the range), so
they are not released: the message carries the declared bounds in their place. Rounding
the noised count and keeping it and the sum of squares >= 0 is post-processing (free).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from protocol.privacy import lattice_release
from protocol.statistics import FeatureStats, describe, from_sums


def parse_bounds(text: str) -> tuple[tuple[float, float], ...] | float:
    """``--stats-clip``: one bound B (every feature to [-B, B]) or ``LO:HI,LO:HI,...`` per feature."""
    text = text.strip()
    if ":" not in text:
        bound = float(text)
        if not bound > 0 or not math.isfinite(bound):
            raise ValueError(f"--stats-clip B must be a finite number > 0, got {text}")
        return bound
    pairs = []
    for part in text.split(","):
        lo, sep, hi = part.partition(":")
        try:
            pair = (float(lo), float(hi))
        except ValueError:
            raise ValueError(f"--stats-clip wants LO:HI per feature, got {part!r}") from None
        if not (sep and math.isfinite(pair[0]) and math.isfinite(pair[1]) and pair[0] < pair[1]):
            raise ValueError(f"--stats-clip wants finite LO < HI per feature, got {part!r}")
        pairs.append(pair)
    return tuple(pairs)


@dataclass(frozen=True)
class StatsMechanism:
    """Clip each row to `bounds` (one B, or (lo, hi) per feature), noise the sums with sigma x sensitivity."""

    noise_multiplier: float
    bounds: float | tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0 or not math.isfinite(self.noise_multiplier):
            raise ValueError(f"--stats-noise must be a finite number > 0, got {self.noise_multiplier}")
        if isinstance(self.bounds, tuple):
            if not self.bounds or not all(math.isfinite(lo) and math.isfinite(hi) and lo < hi for lo, hi in self.bounds):
                raise ValueError("--stats-clip ranges must be finite with LO < HI")
        elif not self.bounds > 0 or not math.isfinite(self.bounds):
            raise ValueError(f"--stats-clip must be a finite number > 0, got {self.bounds}")

    def ranges(self, n_features: int) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) vectors for `n_features` (ValueError when the declared ranges are for another count)."""
        if isinstance(self.bounds, tuple):
            if len(self.bounds) != n_features:
                raise ValueError(f"--stats-clip declares {len(self.bounds)} ranges for {n_features} features")
            lo, hi = (np.array(v, dtype=np.float64) for v in zip(*self.bounds))
            return lo, hi
        return np.full(n_features, -float(self.bounds)), np.full(n_features, float(self.bounds))

    @staticmethod
    def sensitivity(n_features: int) -> float:
        """L2 sensitivity of the bound-scaled (count, sum/B, sumsq/B^2) vector to one row: sqrt(3 d)."""
        return math.sqrt(3 * n_features)

    def stds(self, n_features: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Noise standard deviations on (count, sum, sumsq) per feature: sigma sqrt(3d) (1, B, B^2)."""
        lo, hi = self.ranges(n_features)
        bound = np.maximum(np.abs(lo), np.abs(hi))
        unit = self.noise_multiplier * self.sensitivity(n_features)
        return np.full(n_features, unit), unit * bound, unit * bound * bound

    def clip(self, X: np.ndarray) -> np.ndarray:
        """Every present value of `X` clipped to its feature's range (NaN stays missing)."""
        X = np.asarray(X, dtype=np.float64)
        lo, hi = self.ranges(X.shape[1])
        return np.clip(X, lo, hi)  # NaN passes through np.clip unchanged

    def noised_sums(self, X: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(count, sum, sumsq) of the clipped rows of `X` plus the noise, before post-processing: the
        bound-scaled vector (count, sum/B, sumsq/B^2) released by the discrete Gaussian mechanism
        (protocol/privacy.py) with sensitivity sqrt(3d), then scaled back."""
        count, total, squares = describe(self.clip(X)).sums()
        d = len(count)
        lo, hi = self.ranges(d)
        bound = np.maximum(np.abs(lo), np.abs(hi))
        scaled = np.concatenate([count, total / bound, squares / (bound * bound)])
        noised = lattice_release(scaled, self.sensitivity(d), self.noise_multiplier, rng)
        return noised[:d], noised[d:2 * d] * bound, noised[2 * d:] * bound * bound

    def release(self, X: np.ndarray, rng) -> FeatureStats:
        """One noised release of `X`'s statistics, ready for the wire: count rounded and >= 0, sumsq >= 0,
        min and max the declared bounds (not the data's)."""
        count, total, squares = self.noised_sums(X, rng)
        lo, hi = self.ranges(len(count))
        count = np.maximum(np.round(count), 0.0)
        present = count > 0
        return from_sums(count, np.where(present, total, 0.0), np.where(present, np.maximum(squares, 0.0), 0.0),
                         np.where(present, lo, np.inf), np.where(present, hi, -np.inf))

    def report(self, releases: int, delta: float) -> dict:
        """The JSON-ready account of the releases made: epsilon at delta (per row of the window)."""
        from protocol.accounting import epsilon  # needs the dp extra

        return {
            "epsilon": epsilon(self.noise_multiplier, releases, delta) if releases else 0.0,
            "delta": delta,
            "noise_multiplier": self.noise_multiplier,
            "releases": releases,
            "unit": "row",
            "accountant": "rdp",
        }
