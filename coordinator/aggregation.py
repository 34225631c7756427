"""Combining a buffer of updates into one step: weighted mean and the robust rules.

Pure functions over a (K, n) matrix of deltas, each row already staleness-weighted.
"""

from __future__ import annotations

import numpy as np


def capped_weights(weights: np.ndarray) -> tuple[np.ndarray, int]:
    """`weights` with none above their lower median (from 2 rows on), and how many were lowered.

    A buffer's mean weighs each agent's row by the count it claims; capped here, no row outweighs the
    typical one, whatever it claims: one agent of K owns at most about 1/K of a step (issue 18 point 3).
    The lower median: of two rows, the smaller, so one of two agents cannot lift the cap.
    """
    if len(weights) < 2:
        return weights, 0
    cap = float(np.sort(weights)[(len(weights) - 1) // 2])
    over = weights > cap
    if cap > 0 and over.any():
        return np.minimum(weights, cap), int(over.sum())
    return weights, 0


def agent_index(agents: list) -> np.ndarray:
    """Each update's agent as a number 0..A-1, in order of first appearance; an update of no known agent (None)
    is an agent of its own."""
    seen: dict = {}
    return np.array([seen.setdefault(a if a is not None else (i,), len(seen)) for i, a in enumerate(agents)], dtype=int)


def agent_capped_weights(weights: np.ndarray, agents: list) -> tuple[np.ndarray, int]:
    """`weights` (one per update, `agents` naming each update's agent) with no agent's total above the lower median
    of the agents' totals (capped_weights over agents, not updates), each of its updates lowered alike; and how
    many updates were lowered. Where an agent's many updates meet (a tier's partial or buffer) they weigh as one
    agent's: many updates of one agent neither own the mean nor lower the median (issue 18 point 3)."""
    index = agent_index(agents)
    totals = np.bincount(index, weights=weights, minlength=index.max() + 1) if len(index) else np.zeros(0)
    capped, lowered = capped_weights(totals)
    if not lowered:
        return weights, 0
    factor = np.divide(capped, totals, out=np.ones_like(totals), where=totals > 0)[index]
    return weights * factor, int((factor < 1).sum())


def weighted_mean(deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Sum of weights[i] * deltas[i] over sum(weights) (sample-count weights)."""
    return weights @ deltas / weights.sum()


def coordinate_median(deltas: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Coordinate-wise median: each coordinate ignores the extreme half (Yin et al., 2018)."""
    return np.median(deltas, axis=0)


def trimmed_mean(deltas: np.ndarray, fraction: float) -> np.ndarray:
    """Coordinate-wise mean after dropping the `fraction` largest and smallest values."""
    k = len(deltas)
    cut = int(np.floor(fraction * k))
    if 2 * cut >= k:
        cut = (k - 1) // 2
    ordered = np.sort(deltas, axis=0)
    return ordered[cut:k - cut].mean(axis=0)


def parse_aggregate(text: str):
    """``mean``, ``median`` or ``trimmed-mean:FRACTION`` -> f(deltas, weights) -> step."""
    name, _, arg = text.strip().partition(":")
    if name == "mean" and not arg:
        return weighted_mean
    if name == "median" and not arg:
        return coordinate_median
    if name == "trimmed-mean":
        try:
            fraction = float(arg or 0.1)
        except ValueError:
            raise ValueError(f"aggregate {text!r}: fraction must be a number") from None
        if not 0 <= fraction < 0.5:
            raise ValueError(f"aggregate {text!r}: fraction must be in [0, 0.5)")
        return lambda deltas, weights: trimmed_mean(deltas, fraction)
    raise ValueError(f"unknown aggregate {text!r}: use mean, median or trimmed-mean:FRACTION")
