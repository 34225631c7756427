"""Splitting a dataset among agents: iid, label skew (Dirichlet) and shards. Seeded and pure.

Schemes are written as text so they fit a CLI flag: ``iid``, ``dirichlet:ALPHA``
(smaller ALPHA, more skew) or ``shards:K`` (each part gets K label-sorted shards).
Regression targets (floats with more than 20 distinct values) are skewed by their
decile: `dirichlet` and `shards` treat the ten quantile bins of y as the labels.
"""

from __future__ import annotations

import math

import numpy as np

SCHEMES = "iid, dirichlet:ALPHA (ALPHA > 0) or shards:K (integer K >= 1)"
_MAX_LABELS = 20  # more distinct float values than this: a regression target
_DIRICHLET_TRIES = 100


def parse_scheme(text: str) -> tuple[str, float | int | None]:
    """``"iid"`` -> ("iid", None); ``"dirichlet:0.5"`` -> ("dirichlet", 0.5); ``"shards:2"`` -> ("shards", 2)."""
    name, colon, arg = str(text).strip().partition(":")
    if name == "iid" and not colon:
        return "iid", None
    if name not in ("dirichlet", "shards"):
        raise ValueError(f"unknown partition scheme {text!r}: use {SCHEMES}")
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"partition {text!r}: {name} needs a number after the colon, e.g. {name}:2") from None
    if name == "dirichlet":
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"partition {text!r}: Dirichlet ALPHA must be a finite number > 0")
        return name, value
    if not (math.isfinite(value) and value >= 1 and value == int(value)):
        raise ValueError(f"partition {text!r}: shards K must be an integer >= 1")
    return name, int(value)


def partition(
    y: np.ndarray, n_parts: int, scheme: str = "iid", *, seed: int = 0, min_size: int = 2
) -> list[np.ndarray]:
    """Sorted, disjoint index arrays, one per part, together covering every row of `y`.

    Every part gets at least `min_size` rows. The same (y, n_parts, scheme, seed)
    always gives the same parts.
    """
    name, param = parse_scheme(scheme)
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"partition needs a 1-D target, got shape {y.shape}")
    if isinstance(n_parts, bool) or not isinstance(n_parts, (int, np.integer)) or n_parts < 1:
        raise ValueError(f"number of parts must be an integer >= 1, got {n_parts!r}")
    if n_parts * min_size > len(y):
        raise ValueError(f"cannot give {n_parts} parts at least {min_size} of {len(y)} rows each")
    if name == "shards" and n_parts * param > len(y):
        raise ValueError(f"shards:{param} for {n_parts} parts needs {n_parts * param} rows, there are {len(y)}")
    rng = np.random.default_rng(seed)
    labels = _label_bins(y)
    if name == "iid":
        parts = np.array_split(rng.permutation(len(y)), n_parts)
    elif name == "dirichlet":
        parts = _dirichlet(labels, n_parts, param, rng, min_size)
    else:
        parts = _shards(labels, n_parts, param, rng)
    return [np.sort(p) for p in _top_up(parts, min_size)]


def _label_bins(y: np.ndarray) -> np.ndarray:
    """The labels skew is measured on: y itself, or the decile of y for a regression target."""
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.floating) or len(np.unique(y)) <= _MAX_LABELS:
        return y
    return np.digitize(y, np.quantile(y, np.linspace(0, 1, 11)[1:-1]))


def _dirichlet(labels, n_parts, alpha, rng, min_size) -> list[np.ndarray]:
    """Per class, split its rows among parts in Dirichlet(alpha) proportions (Hsu et al., 2019).

    Redrawn while some part is under `min_size`, as the usual FL benchmark code does;
    after a bounded number of tries the last draw is kept and `_top_up` fixes it.
    """
    for _ in range(_DIRICHLET_TRIES):
        parts: list[list[int]] = [[] for _ in range(n_parts)]
        for label in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == label))
            cuts = (np.cumsum(rng.dirichlet(np.full(n_parts, alpha))) * len(rows)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(rows, cuts)):
                part.extend(chunk)
        if min(len(p) for p in parts) >= min_size:
            break
    return [np.array(p, dtype=np.int64) for p in parts]


def _shards(labels, n_parts, k, rng) -> list[np.ndarray]:
    """Sort by label, cut into n_parts * k shards, give each part k random shards (McMahan et al., 2017)."""
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, n_parts * k)
    picks = rng.permutation(len(shards)).reshape(n_parts, k)
    return [np.concatenate([shards[i] for i in row]) for row in picks]


def _top_up(parts: list[np.ndarray], min_size: int) -> list[np.ndarray]:
    """Move rows from the largest parts to any part under `min_size`; deterministic."""
    parts = [list(p) for p in parts]
    for small in parts:
        while len(small) < min_size:
            small.append(max(parts, key=len).pop())
    return [np.asarray(p, dtype=np.int64) for p in parts]
