"""Splitting a dataset among agents: iid, label skew (Dirichlet) and shards. Seeded, pure.

For regression targets, `dirichlet` and `shards` work on ten quantile bins of y.
"""

from __future__ import annotations

import numpy as np


def parse_scheme(text: str) -> tuple[str, float]:
    """``iid``, ``dirichlet:ALPHA`` (ALPHA > 0) or ``shards:K`` (K >= 1) -> (name, parameter)."""
    name, _, arg = text.strip().partition(":")
    if name == "iid" and not arg:
        return name, 0.0
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"partition {text!r}: use iid, dirichlet:ALPHA or shards:K") from None
    if name == "dirichlet" and value > 0:
        return name, value
    if name == "shards" and value >= 1 and value == int(value):
        return name, value
    raise ValueError(f"partition {text!r}: use iid, dirichlet:ALPHA (ALPHA > 0) or shards:K (integer K >= 1)")


def partition(y: np.ndarray, n_parts: int, scheme: str = "iid", *, seed: int = 0, min_size: int = 2) -> list[np.ndarray]:
    """Disjoint index arrays, one per part, covering every row of `y`."""
    name, param = parse_scheme(scheme)
    y = np.asarray(y)
    if n_parts < 1 or n_parts * min_size > len(y):
        raise ValueError(f"cannot give {n_parts} parts at least {min_size} of {len(y)} rows each")
    rng = np.random.default_rng(seed)
    labels = _label_bins(y)
    if name == "iid":
        parts = np.array_split(rng.permutation(len(y)), n_parts)
    elif name == "dirichlet":
        parts = _dirichlet(labels, n_parts, param, rng, min_size)
    else:
        parts = _shards(labels, n_parts, int(param), rng)
    return [np.sort(p) for p in parts]


def _label_bins(y: np.ndarray) -> np.ndarray:
    if np.issubdtype(y.dtype, np.integer) or len(np.unique(y)) <= 20:
        return y
    return np.digitize(y, np.quantile(y, np.linspace(0, 1, 11)[1:-1]))


def _dirichlet(labels, n_parts, alpha, rng, min_size, tries: int = 100) -> list[np.ndarray]:
    """Per class, split its rows among parts in Dirichlet(alpha) proportions (Hsu et al., 2019)."""
    for _ in range(tries):
        parts: list[list[int]] = [[] for _ in range(n_parts)]
        for label in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == label))
            cuts = (np.cumsum(rng.dirichlet(np.full(n_parts, alpha))) * len(rows)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(rows, cuts)):
                part.extend(chunk)
        if min(len(p) for p in parts) >= min_size:
            return [np.array(p, dtype=np.int64) for p in parts]
    # Deterministic fix after bounded retries: top up the smallest parts from the largest.
    parts = sorted((list(p) for p in parts), key=len)
    for small in parts:
        while len(small) < min_size:
            small.append(max(parts, key=len).pop())
    return [np.array(p, dtype=np.int64) for p in parts]


def _shards(labels, n_parts, k, rng) -> list[np.ndarray]:
    """Sort by label, cut into n_parts * k shards, give each part k random shards (McMahan et al., 2017)."""
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, n_parts * k)
    picks = rng.permutation(len(shards)).reshape(n_parts, k)
    return [np.concatenate([shards[i] for i in row]) for row in picks]
