"""Privacy accounting over Google's dp-accounting: epsilon at a delta for n Gaussian releases.

Each contribution of a device (an update it sends under local DP, or a buffer its update
was part of under central DP) is one Gaussian release of noise std sigma C. Its
sensitivity depends on the neighbour relation (`NEIGHBOURS`): C under add-remove (the output with or without the device), 2C
under replace-one (the device's data swapped for any other: the relation that means
something when the device's participation is public). One release is then one
`GaussianDpEvent` of multiplier sigma (add-remove) or sigma / 2 (replace-one). The events are composed with `dp_accounting.rdp.RdpAccountant`
and converted to epsilon at delta.

No sampling amplification is claimed: agents choose when to train, nobody samples them
with a known probability, so the bound is the unamplified composition (docs/security.md).

Pure functions apart from the import; needs the `dp` extra (pip install 'fedmq[dp]').
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache


def _dp():
    """The dp_accounting module, or ImportError naming the extra to install."""
    try:
        import dp_accounting
        import dp_accounting.rdp  # noqa: F401
    except ImportError:
        raise ImportError("differential privacy needs dp-accounting: pip install 'fedmq[dp]'") from None
    return dp_accounting


def check_available() -> None:
    """ImportError with the install command when dp-accounting is missing."""
    _dp()


NEIGHBOURS = ("add-remove", "replace-one")


def event_multiplier(noise_multiplier: float, neighbours: str = "add-remove") -> float:
    """The GaussianDpEvent multiplier of one release: noise std / sensitivity (C, or 2C for replace-one)."""
    if neighbours not in NEIGHBOURS:
        raise ValueError(f"--dp-neighbours must be {' or '.join(NEIGHBOURS)}, got {neighbours!r}")
    return noise_multiplier / 2 if neighbours == "replace-one" else noise_multiplier


def _check(noise_multiplier: float, delta: float) -> None:
    if not noise_multiplier > 0 or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise multiplier must be a finite number > 0, got {noise_multiplier}")
    if not 0 < delta < 1:
        raise ValueError(f"--dp-delta must be in (0, 1), got {delta}")


@lru_cache(maxsize=4096)
def epsilon(noise_multiplier: float, contributions: int, delta: float, neighbours: str = "add-remove") -> float:
    """Epsilon at `delta` after `contributions` Gaussian releases with `noise_multiplier` (RDP),
    under the `neighbours` relation."""
    _check(noise_multiplier, delta)
    noise_multiplier = event_multiplier(noise_multiplier, neighbours)
    if contributions < 0:
        raise ValueError(f"contributions must be >= 0, got {contributions}")
    if contributions == 0:
        return 0.0
    dp = _dp()
    accountant = dp.rdp.RdpAccountant()
    accountant.compose(dp.GaussianDpEvent(noise_multiplier), contributions)
    return float(accountant.get_epsilon(delta))


def max_contributions(noise_multiplier: float, delta: float, budget: float, limit: int = 1_000_000,
                      neighbours: str = "add-remove") -> int:
    """The most releases whose epsilon stays <= `budget` (0 if even one exceeds it)."""
    if not budget > 0:
        return 0
    lo, hi = 0, 1
    while hi <= limit and epsilon(noise_multiplier, hi, delta, neighbours) <= budget:
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # epsilon(lo) <= budget < epsilon(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if epsilon(noise_multiplier, mid, delta, neighbours) <= budget else (lo, mid)
    return lo


def calibrate_noise(target_epsilon: float, contributions: int, delta: float, tol: float = 1e-3) -> float:
    """The smallest noise multiplier (to `tol` relative) whose epsilon after `contributions` is <= target."""
    if not target_epsilon > 0 or contributions < 1:
        raise ValueError("calibration needs a target epsilon > 0 and at least one contribution")
    lo, hi = 1e-2, 1.0
    while epsilon(hi, contributions, delta) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"no noise multiplier up to 1e6 reaches epsilon {target_epsilon}")
    while (hi - lo) / hi > tol:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if epsilon(mid, contributions, delta) <= target_epsilon else (mid, hi)
    return hi


@dataclass
class Budget:
    """One device's spending under a fixed (sigma, delta): contributions so far and an optional cap.

    `can_contribute()` is False once the *next* contribution would take epsilon above
    `epsilon_budget`, so the budget is never exceeded, not even by one update.
    """

    noise_multiplier: float
    delta: float
    epsilon_budget: float | None = None
    contributions: int = 0
    neighbours: str = "add-remove"

    def __post_init__(self) -> None:
        _check(self.noise_multiplier, self.delta)
        event_multiplier(self.noise_multiplier, self.neighbours)
        if self.epsilon_budget is not None and not self.epsilon_budget > 0:
            raise ValueError(f"--dp-epsilon-budget must be > 0, got {self.epsilon_budget}")
        check_available()

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far, at `delta`."""
        return epsilon(self.noise_multiplier, self.contributions, self.delta, self.neighbours)

    def epsilon_after(self, more: int = 1) -> float:
        """Epsilon if `more` contributions were made now."""
        return epsilon(self.noise_multiplier, self.contributions + more, self.delta, self.neighbours)

    def can_contribute(self) -> bool:
        """True while one more contribution stays within the budget (always without one)."""
        return self.epsilon_budget is None or self.epsilon_after(1) <= self.epsilon_budget

    def record(self, n: int = 1) -> None:
        """Count `n` contributions made."""
        self.contributions += n

    def report(self) -> dict:
        """The JSON-ready account: epsilon at delta, sigma, contributions, budget."""
        return {
            "epsilon": self.epsilon,  # not rounded: a rounded figure could read above the budget
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "contributions": self.contributions,
            "epsilon_budget": self.epsilon_budget,
            "neighbours": self.neighbours,
            "accountant": "rdp",
        }


def fleet_report(counts: Mapping[str, int], noise_multiplier: float, delta: float, mode: str,
                 clip_norm: float, releases: int | None = None, neighbours: str = "add-remove") -> dict:
    """The fleet's account: the largest epsilon any device reached (the worst-off device) and the spread."""
    eps = sorted(epsilon(noise_multiplier, n, delta, neighbours) for n in counts.values())
    report = {
        "mode": mode,
        "epsilon": eps[-1] if eps else 0.0,
        "epsilon_median": _median(eps) if eps else 0.0,
        "delta": delta,
        "noise_multiplier": noise_multiplier,
        "clip": clip_norm,
        "agents": len(eps),
        "contributions_max": max(counts.values(), default=0),
        "neighbours": neighbours,
        "accountant": "rdp",
    }
    if releases is not None:
        report["releases"] = releases
    return report


def _median(values: Iterable[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
